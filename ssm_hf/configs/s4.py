"""Configuration of the S4 / S4D (structured state space) language model."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN

from .checks import check_positive_sizes

KERNELS = ("dplr", "diag")
S4_INITS = ("legs", "s4d_lin", "s4d_inv")
DISCRETIZATIONS = ("zoh", "bilinear")
OUTPUT_ACTIVATIONS = ("glu", "gelu", "linear")
CLASSIFIER_POOLINGS = ("last", "mean")


@strict
class S4Config(PreTrainedConfig):
    r"""Configuration for [`S4Model`] and its heads.

    Each layer is a residual block around an S4 layer: LayerNorm (before the layer with `prenorm`, after the
    residual otherwise) → SSM convolution per channel plus the D skip term → `hidden_act` → dropout → linear map
    back to `hidden_size` (`output_activation`) → dropout → residual. Training and prefill use the convolution view
    (kernel by FFT, O(L log L)); decoding with a cache uses the recurrent view (O(state_size) per token and SSM).

    Args:
        vocab_size: number of tokens in the vocabulary.
        hidden_size: width of the residual stream (H, `d_model`).
        num_hidden_layers: number of S4 blocks.
        state_size: SSM state size N per SSM; kept as N/2 complex conjugate pairs, so it must be even.
        kernel: `"dplr"` (S4: diagonal plus low rank, A = Λ - P P*, kernel by the Cauchy kernel) or `"diag"` (S4D:
            diagonal A, kernel by a Vandermonde product).
        init: initialisation of (A, B): `"legs"` (HiPPO-LegS in normal-plus-low-rank form; with `kernel="diag"`
            the low-rank part is dropped: S4D-LegS), `"s4d_lin"` or `"s4d_inv"` (S4D; with `kernel="dplr"` the
            low-rank part P starts at zero).
        discretization: `"zoh"` (zero-order hold) or `"bilinear"`; the DPLR kernel supports only `"bilinear"`.
        rank: rank of the low-rank part P (DPLR only; HiPPO-LegS needs 1, extra ranks start at zero).
        num_ssm_copies: independent SSMs per channel, each with its own Δ, A, B, C, D and state; their outputs are
            mixed by the output linear layer (state-spaces' `channels`).
        l_max: DPLR only: the length L that the trained output vector C̃ = C (I - Ā^L) is attuned to (state-spaces'
            `l_max`, its `l_kernel` buffer). Shorter inputs use the first taps of the length-L kernel; longer ones
            extend C̃ to L·2^k with dense powers of Ā (exact, but O(N^3) per SSM), so set it to the usual training
            length.
        time_step_min, time_step_max: Δ = exp(log_dt) starts log-uniform in this range.
        hidden_act: activation after the SSM (a key of `transformers.activations.ACT2FN`).
        output_activation: `"glu"` (linear to 2·hidden_size, then GLU), `"gelu"` (linear, then GELU) or `"linear"`.
        dropout: dropout after the activation and on the residual branch.
        prenorm: normalise before each layer (and once more at the end) rather than after each residual.
        layer_norm_epsilon: epsilon of the LayerNorms.
        initializer_range: std of the normal init of embeddings and heads.
        classifier_pooling: how [`S4ForSequenceClassification`] pools the sequence: `"last"` real token or `"mean"`
            over the real tokens (Long Range Arena style).
        head_bias: give `lm_head` / `score` a bias, as the `nn.Linear` decoder of state-spaces models has (set by
            `ssm-hf convert --from s4`).
    """

    model_type = "ssm_s4"

    vocab_size: int = 50280
    hidden_size: int = 256
    num_hidden_layers: int = 6
    state_size: int = 64
    kernel: str = "dplr"
    init: str = "legs"
    discretization: str = "bilinear"
    rank: int = 1
    num_ssm_copies: int = 1
    l_max: int = 1024
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    hidden_act: str = "gelu"
    output_activation: str = "glu"
    dropout: float = 0.0
    prenorm: bool = True
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    classifier_pooling: str = "last"
    head_bias: bool = False
    pad_token_id: int | None = 0
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0
    use_cache: bool = True
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        kwargs.pop("model_type", None)  # a class attribute; a saved dict must not shadow it
        super().__post_init__(**kwargs)

    @property
    def num_ssms(self) -> int:
        """Independent SSMs per layer: hidden_size * num_ssm_copies."""
        return self.hidden_size * self.num_ssm_copies

    @property
    def layer_types(self) -> list[str]:
        """Cache layer type per layer: each S4 layer keeps one recurrent state (no conv state)."""
        return ["linear_attention"] * self.num_hidden_layers

    def validate_s4_sizes(self):
        check_positive_sizes(self, ("vocab_size", "hidden_size", "num_hidden_layers", "state_size", "rank",
                                    "num_ssm_copies", "l_max"))
        if self.state_size % 2:
            raise ValueError(
                f"S4Config.state_size must be even: the SSM keeps state_size/2 complex conjugate pairs; got "
                f"{self.state_size}."
            )
        if not 0 < self.time_step_min <= self.time_step_max:
            raise ValueError(f"S4Config needs 0 < time_step_min <= time_step_max, got {self.time_step_min} and "
                             f"{self.time_step_max}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"S4Config.dropout must be in [0, 1), got {self.dropout}.")
        if self.layer_norm_epsilon <= 0:
            raise ValueError(f"S4Config.layer_norm_epsilon must be positive, got {self.layer_norm_epsilon}.")

    def validate_s4_choices(self):
        for name, choices in (("kernel", KERNELS), ("init", S4_INITS), ("discretization", DISCRETIZATIONS),
                              ("output_activation", OUTPUT_ACTIVATIONS),
                              ("classifier_pooling", CLASSIFIER_POOLINGS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"S4Config.{name}={getattr(self, name)!r} is not supported; choose one of {choices}.")
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"S4Config.hidden_act={self.hidden_act!r} is not a known activation; "
                             f"choose one of {sorted(ACT2FN.keys())}.")
        if self.kernel == "dplr" and self.discretization == "zoh":
            raise NotImplementedError(
                "S4Config: kernel='dplr' with discretization='zoh' is not implemented: the DPLR (Cauchy) kernel of S4 "
                "is derived for the bilinear transform. Use discretization='bilinear', or kernel='diag' for ZOH."
            )


__all__ = ["S4Config"]
