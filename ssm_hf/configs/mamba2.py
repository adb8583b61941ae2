"""Configuration of the Mamba-2 (state space duality) language model."""

from __future__ import annotations

import math

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN

from .checks import check_positive_sizes
from .recurrent import ExpandedRecurrentLayers


@strict
class Mamba2Config(ExpandedRecurrentLayers, PreTrainedConfig):
    r"""Configuration for [`Mamba2Model`] and its heads.

    Field names, meanings and defaults follow transformers' in-tree `Mamba2Config`, so that
    `Mamba2Config(**transformers_mamba2_config.to_dict())` builds the same architecture; the `model_type` is our
    own (`ssm_mamba2`).

    Args:
        num_heads, head_dim: SSM heads; `num_heads * head_dim` must equal `expand * hidden_size`.
        state_size: SSM state size per head (`d_state`, N).
        n_groups: groups of heads sharing B and C (and the gated norm's groups); divides `num_heads`.
        chunk_size: chunk length of the chunked SSD scan; it changes speed and memory, not results.
        time_step_limit: (min, max) clamp of Δ after softplus.
        Other fields as in [`MambaConfig`].
    """

    model_type = "ssm_mamba2"

    num_heads: int = 128
    head_dim: int = 64
    vocab_size: int = 32768
    hidden_size: int = 4096
    state_size: int = 128
    num_hidden_layers: int = 64
    layer_norm_epsilon: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2
    expand: int = 2
    conv_kernel: int = 4
    n_groups: int = 8
    use_bias: bool = False
    use_conv_bias: bool = True
    hidden_act: str = "silu"
    initializer_range: float = 0.1
    residual_in_fp32: bool = True
    time_step_rank: str | int = "auto"
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: list[float] | tuple[float, ...] = (0.0, float("inf"))
    rescale_prenorm_residual: bool = False
    use_cache: bool = True
    chunk_size: int = 256
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        kwargs.pop("model_type", None)  # a transformers Mamba2Config dict carries "mamba2"
        kwargs.pop("intermediate_size", None)  # derived from expand * hidden_size, never read back
        if self.time_step_rank == "auto":
            self.time_step_rank = math.ceil(self.hidden_size / 16)
        self.time_step_limit = tuple(float(v) for v in self.time_step_limit)
        super().__post_init__(**kwargs)

    def validate_mamba2_sizes(self):
        check_positive_sizes(self, ("vocab_size", "hidden_size", "state_size", "num_hidden_layers", "num_heads",
                                    "head_dim", "n_groups", "conv_kernel", "chunk_size", "expand"))
        if self.expand * self.hidden_size != self.num_heads * self.head_dim:
            raise ValueError(
                f"Mamba2Config: expand * hidden_size ({self.expand * self.hidden_size}) must equal "
                f"num_heads * head_dim ({self.num_heads * self.head_dim})."
            )
        if self.num_heads % self.n_groups:
            raise ValueError(f"Mamba2Config.num_heads={self.num_heads} is not divisible by n_groups={self.n_groups}.")
        if len(self.time_step_limit) != 2 or not 0 <= self.time_step_limit[0] <= self.time_step_limit[1]:
            raise ValueError(f"Mamba2Config.time_step_limit must be (min, max) with 0 <= min <= max, got "
                             f"{self.time_step_limit}.")
        if self.layer_norm_epsilon <= 0:
            raise ValueError(f"Mamba2Config.layer_norm_epsilon must be positive, got {self.layer_norm_epsilon}.")

    def validate_mamba2_choices(self):
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"Mamba2Config.hidden_act={self.hidden_act!r} is not a known activation; choose one of "
                             f"{sorted(ACT2FN.keys())}.")
        if not 0 < self.time_step_min <= self.time_step_max:
            raise ValueError(f"Mamba2Config needs 0 < time_step_min <= time_step_max, got {self.time_step_min} and "
                             f"{self.time_step_max}.")


__all__ = ["Mamba2Config"]
