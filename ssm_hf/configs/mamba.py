"""Configuration of the Mamba (selective state space) language model."""

from __future__ import annotations

import math

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN

from .checks import check_positive_sizes
from .recurrent import ExpandedRecurrentLayers


@strict
class MambaConfig(ExpandedRecurrentLayers, PreTrainedConfig):
    r"""Configuration for [`MambaModel`] and its heads.

    Field names, meanings and defaults follow transformers' in-tree `MambaConfig`, so that
    `MambaConfig(**transformers_mamba_config.to_dict())` builds the same architecture. The `model_type` is our
    own (`ssm_mamba`), so ours and transformers' classes coexist in the Auto mappings.

    Args:
        vocab_size: number of tokens in the vocabulary.
        hidden_size: width of the residual stream (`d_model`).
        state_size: SSM state size per channel (`d_state`, N).
        num_hidden_layers: number of Mamba blocks.
        layer_norm_epsilon: epsilon of the RMS norms.
        expand: `intermediate_size = expand * hidden_size` (`d_inner`); must give an integer width.
        conv_kernel: width of the causal depthwise convolution.
        use_bias: bias in `in_proj` / `out_proj`.
        use_conv_bias: bias in the depthwise convolution.
        hidden_act: activation after the convolution (a key of `transformers.activations.ACT2FN`).
        initializer_range: std of the normal init of embeddings.
        residual_in_fp32: keep the residual stream in float32.
        time_step_rank: rank of the Δ projection; `"auto"` means `ceil(hidden_size / 16)`.
        time_step_scale, time_step_min, time_step_max, time_step_init_scheme, time_step_floor: Δ initialisation.
        rescale_prenorm_residual: scale `out_proj` init by `1/sqrt(num_hidden_layers)`.
        scan_chunk_size: chunk length of the PyTorch chunked scan (CPU/reference path); it changes speed, not
            results.
        inner_layernorms: RMS-normalise Δ (before its projection), B and C inside the mixer, as Jamba does.
        mixer_rms_eps: epsilon of those inner norms (transformers' FalconMamba name); None means
            `layer_norm_epsilon` (as in Jamba).
    """

    model_type = "ssm_mamba"

    vocab_size: int = 50280
    hidden_size: int = 768
    state_size: int = 16
    num_hidden_layers: int = 32
    layer_norm_epsilon: float = 1e-5
    pad_token_id: int | None = 0
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0
    expand: int | float = 2
    conv_kernel: int = 4
    use_bias: bool = False
    use_conv_bias: bool = True
    hidden_act: str = "silu"
    initializer_range: float = 0.1
    residual_in_fp32: bool = True
    time_step_rank: str | int = "auto"
    time_step_scale: float = 1.0
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_init_scheme: str = "random"
    time_step_floor: float = 1e-4
    rescale_prenorm_residual: bool = False
    use_cache: bool = True
    tie_word_embeddings: bool = True
    scan_chunk_size: int = 32
    inner_layernorms: bool = False
    mixer_rms_eps: float | None = None

    def __post_init__(self, **kwargs):
        # A transformers `MambaConfig` dict carries its own model_type ("mamba"); ours is a class attribute and
        # must not be shadowed, or save_pretrained would write the in-tree type.
        kwargs.pop("model_type", None)
        kwargs.pop("intermediate_size", None)  # derived from expand * hidden_size, never read back
        # Options of transformers' torch fallbacks that have no meaning here (our scan is always parallel).
        for ignored in ("use_mambapy", "use_associative_scan"):
            kwargs.pop(ignored, None)
        if self.time_step_rank == "auto":
            self.time_step_rank = math.ceil(self.hidden_size / 16)
        super().__post_init__(**kwargs)

    def validate_mamba_sizes(self):
        check_positive_sizes(self, ("vocab_size", "hidden_size", "state_size", "num_hidden_layers", "conv_kernel",
                                    "scan_chunk_size"))
        if self.expand <= 0:
            raise ValueError(f"MambaConfig.expand must be positive, got {self.expand}.")
        if not isinstance(self.intermediate_size, int):
            raise ValueError(
                f"MambaConfig.expand={self.expand} times hidden_size={self.hidden_size} gives a non-integer "
                f"intermediate width {self.intermediate_size}; choose expand so that the product is an integer."
            )
        if not isinstance(self.time_step_rank, int) or self.time_step_rank <= 0:
            raise ValueError(
                f"MambaConfig.time_step_rank must be a positive integer or 'auto', got {self.time_step_rank!r}."
            )
        if self.layer_norm_epsilon <= 0:
            raise ValueError(f"MambaConfig.layer_norm_epsilon must be positive, got {self.layer_norm_epsilon}.")
        if self.mixer_rms_eps is not None and self.mixer_rms_eps <= 0:
            raise ValueError(f"MambaConfig.mixer_rms_eps must be positive (or None), got {self.mixer_rms_eps}.")

    def validate_mamba_choices(self):
        if self.hidden_act not in ACT2FN:
            raise ValueError(
                f"MambaConfig.hidden_act={self.hidden_act!r} is not a known activation; "
                f"choose one of {sorted(ACT2FN.keys())}."
            )
        if self.time_step_init_scheme not in ("random", "constant"):
            raise ValueError(
                f"MambaConfig.time_step_init_scheme must be 'random' or 'constant', got {self.time_step_init_scheme!r}."
            )
        if not 0 < self.time_step_min <= self.time_step_max:
            raise ValueError(
                f"MambaConfig needs 0 < time_step_min <= time_step_max, got {self.time_step_min} and "
                f"{self.time_step_max}."
            )


__all__ = ["MambaConfig"]
