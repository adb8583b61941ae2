"""Configuration of hybrid stacks: per layer an SSM or attention mixer, and a dense or mixture-of-experts MLP."""

from __future__ import annotations

import math

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN

from .checks import check_positive_sizes
from .mamba import MambaConfig
from .mamba2 import Mamba2Config

MIXERS = ("mamba", "mamba2", "attention")
MLPS = ("dense", "moe", "none")


@strict
class HybridConfig(PreTrainedConfig):
    r"""Configuration for [`HybridModel`] and its heads (Jamba-style stacks).

    Each layer is `x + mixer(norm(x))` then `x + mlp(ffn_norm(x))`. The mixer of each layer is `"mamba"`,
    `"mamba2"` or `"attention"`, the MLP `"dense"`, `"moe"` or `"none"` (no MLP and no ffn_norm in that layer, as
    in mamba_ssm hybrids with `d_intermediate=0`); give them as explicit lists (`layers_block_type`,
    `layers_mlp_type`) or by period and offset: layer i is attention when `i % attn_layer_period ==
    attn_layer_offset` (else `ssm_mixer`), and MoE when `i % expert_layer_period == expert_layer_offset`
    (Jamba: attention every 8 layers at offset 4, MoE every 2 at offset 1).

    Field names follow transformers' `JambaConfig` where the concept is the same (`attn_layer_period`,
    `num_experts`, `num_experts_per_tok`, `router_aux_loss_coef`, `mamba_d_state`, ...), so a Jamba config maps
    onto this one (see `ssm_hf.conversion.jamba`). The SSM layers are the same mixers as the pure models, built
    from `mamba_config()` / `mamba2_config()`.

    Args:
        intermediate_size: width of the dense MLP and of each expert.
        num_attention_heads, num_key_value_heads, head_dim: attention heads (grouped-query when fewer KV heads);
            head_dim defaults to hidden_size // num_attention_heads.
        attention_rope_dim: rotary position embedding on the first `attention_rope_dim` channels of each query and
            key head (the two halves of that slice rotated together, GPT-NeoX style), base `attention_rope_theta`;
            0 (the default) means no positional encoding, as in Jamba.
        attention_qkv_bias, attention_out_bias: biases in q/k/v_proj and in o_proj (mamba_ssm's MHA has them).
        num_experts, num_experts_per_tok: MoE size and top-k.
        router_aux_loss_coef: weight of the load-balancing loss added to the LM loss when training (or when
            `output_router_logits`); under Trainer it counts once per optimizer step (see
            `models.hybrid.aux_loss_share`).
        mamba_d_state, mamba_d_conv, mamba_expand, mamba_dt_rank, mamba_conv_bias, mamba_proj_bias,
        mamba_inner_layernorms: the Mamba mixers' sizes (inner layernorms on Δ, B, C as in Jamba).
        mamba2_d_state, mamba2_head_dim, mamba2_n_groups, mamba2_chunk_size: the Mamba-2 mixers' sizes (their
            conv width, expand and biases are the mamba_* ones).
    """

    model_type = "ssm_hybrid"

    vocab_size: int = 65536
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    layers_block_type: list[str] | None = None
    layers_mlp_type: list[str] | None = None
    ssm_mixer: str = "mamba"
    attn_layer_period: int = 8
    attn_layer_offset: int = 4
    expert_layer_period: int = 2
    expert_layer_offset: int = 1
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None
    attention_dropout: float = 0.0
    attention_rope_dim: int = 0
    attention_rope_theta: float = 10000.0
    attention_qkv_bias: bool = False
    attention_out_bias: bool = False
    num_experts: int = 16
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int | str = "auto"
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mamba_inner_layernorms: bool = True
    mamba2_d_state: int = 128
    mamba2_head_dim: int = 64
    mamba2_n_groups: int = 1
    mamba2_chunk_size: int = 256
    use_cache: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self, **kwargs):
        kwargs.pop("model_type", None)
        if self.mamba_dt_rank == "auto":
            self.mamba_dt_rank = math.ceil(self.hidden_size / 16)
        if self.head_dim is None and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.layers_block_type is None:
            self.layers_block_type = self.periodic_block_types()
        if self.layers_mlp_type is None:
            # as in Jamba, a single expert means dense MLPs throughout
            self.layers_mlp_type = (self.periodic_mlp_types() if self.num_experts > 1
                                    else ["dense"] * self.num_hidden_layers)
        self.layers_block_type = list(self.layers_block_type)
        self.layers_mlp_type = list(self.layers_mlp_type)
        super().__post_init__(**kwargs)

    def periodic_block_types(self) -> list[str]:
        """Mixer per layer from attn_layer_period/offset: attention where i % period == offset, else ssm_mixer."""
        period, offset = self.attn_layer_period, self.attn_layer_offset
        return ["attention" if period > 0 and i % period == offset else self.ssm_mixer
                for i in range(self.num_hidden_layers)]

    def periodic_mlp_types(self) -> list[str]:
        """MLP per layer from expert_layer_period/offset: MoE where i % period == offset, else dense."""
        period, offset = self.expert_layer_period, self.expert_layer_offset
        return ["moe" if period > 0 and i % period == offset else "dense" for i in range(self.num_hidden_layers)]

    @property
    def layer_types(self) -> list[str]:
        """Cache layer type per layer: a recurrent state for SSM layers, a growing KV cache for attention."""
        return ["full_attention" if kind == "attention" else "linear_attention" for kind in self.layers_block_type]

    def mamba_config(self) -> MambaConfig:
        """The config the Mamba mixers are built from."""
        return MambaConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            state_size=self.mamba_d_state, conv_kernel=self.mamba_d_conv, expand=self.mamba_expand,
            time_step_rank=self.mamba_dt_rank, use_conv_bias=self.mamba_conv_bias, use_bias=self.mamba_proj_bias,
            hidden_act=self.hidden_act, layer_norm_epsilon=self.rms_norm_eps,
            inner_layernorms=self.mamba_inner_layernorms, pad_token_id=None, bos_token_id=None, eos_token_id=None,
        )

    def mamba2_config(self) -> Mamba2Config:
        """The config the Mamba-2 mixers are built from."""
        return Mamba2Config(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            state_size=self.mamba2_d_state, head_dim=self.mamba2_head_dim,
            num_heads=self.mamba_expand * self.hidden_size // self.mamba2_head_dim, n_groups=self.mamba2_n_groups,
            chunk_size=self.mamba2_chunk_size, conv_kernel=self.mamba_d_conv, expand=self.mamba_expand,
            use_conv_bias=self.mamba_conv_bias, use_bias=self.mamba_proj_bias, hidden_act=self.hidden_act,
            layer_norm_epsilon=self.rms_norm_eps, pad_token_id=None, bos_token_id=None, eos_token_id=None,
        )

    def validate_hybrid_layers(self):
        check_positive_sizes(self, ("vocab_size", "hidden_size", "num_hidden_layers"))
        if set(self.layers_mlp_type or ()) - {"none"} and self.intermediate_size <= 0:
            raise ValueError(f"HybridConfig.intermediate_size must be a positive integer (its layers have MLPs), got "
                             f"{self.intermediate_size}.")
        if self.ssm_mixer not in ("mamba", "mamba2"):
            raise ValueError(f"HybridConfig.ssm_mixer must be 'mamba' or 'mamba2', got {self.ssm_mixer!r}.")
        for name, kinds, allowed in (("layers_block_type", self.layers_block_type, MIXERS),
                                     ("layers_mlp_type", self.layers_mlp_type, MLPS)):
            if len(kinds) != self.num_hidden_layers:
                raise ValueError(f"HybridConfig.{name} has {len(kinds)} entries for num_hidden_layers="
                                 f"{self.num_hidden_layers}.")
            unknown = sorted(set(kinds) - set(allowed))
            if unknown:
                raise ValueError(f"HybridConfig.{name} has unknown kind(s) {unknown}; allowed: {list(allowed)}.")
        for period, offset in (("attn_layer_period", "attn_layer_offset"),
                               ("expert_layer_period", "expert_layer_offset")):
            if getattr(self, period) > 0 and not 0 <= getattr(self, offset) < getattr(self, period):
                raise ValueError(f"HybridConfig.{offset}={getattr(self, offset)} must be in [0, {period}="
                                 f"{getattr(self, period)}).")
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"HybridConfig.hidden_act={self.hidden_act!r} is not a known activation.")

    def validate_hybrid_attention(self):
        if "attention" not in self.layers_block_type:
            return
        if self.num_attention_heads <= 0 or self.num_key_value_heads <= 0 or not self.head_dim:
            raise ValueError("HybridConfig: attention layers need positive num_attention_heads, num_key_value_heads "
                             "and head_dim.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"HybridConfig.num_attention_heads={self.num_attention_heads} is not divisible by "
                             f"num_key_value_heads={self.num_key_value_heads}.")
        if self.attention_rope_dim < 0 or self.attention_rope_dim % 2 or self.attention_rope_dim > self.head_dim:
            raise ValueError(f"HybridConfig.attention_rope_dim={self.attention_rope_dim} must be even and in "
                             f"[0, head_dim={self.head_dim}].")
        if self.attention_rope_dim and self.attention_rope_theta <= 0:
            raise ValueError(f"HybridConfig.attention_rope_theta must be positive, got {self.attention_rope_theta}.")

    def validate_hybrid_experts(self):
        if "moe" in self.layers_mlp_type and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"HybridConfig needs 0 < num_experts_per_tok <= num_experts, got "
                             f"{self.num_experts_per_tok} and {self.num_experts}.")
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"HybridConfig.router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}.")

    def validate_hybrid_ssm(self):
        # building the sub-configs runs their own validation; its message is about the mixer's field names
        if "mamba" in self.layers_block_type:
            try:
                self.mamba_config()
            except Exception as err:
                raise ValueError(f"HybridConfig's mamba_* fields give an invalid Mamba mixer: {err}") from err
        if "mamba2" in self.layers_block_type:
            if (self.mamba_expand * self.hidden_size) % self.mamba2_head_dim:
                raise ValueError(f"HybridConfig: mamba_expand * hidden_size ({self.mamba_expand * self.hidden_size}) "
                                 f"is not divisible by mamba2_head_dim={self.mamba2_head_dim}.")
            try:
                self.mamba2_config()
            except Exception as err:
                raise ValueError(f"HybridConfig's mamba2_* fields give an invalid Mamba-2 mixer: {err}") from err


__all__ = ["HybridConfig"]
