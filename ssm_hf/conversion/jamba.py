"""transformers' in-tree Jamba <-> ssm-hf hybrid: config fields and tensor names, both ways, tensors unchanged.

Jamba keys                                          ssm-hf keys
model.embed_tokens.weight                           backbone.embeddings.weight
model.layers.N.input_layernorm.weight               backbone.layers.N.norm.weight
model.layers.N.mamba.<p> / .self_attn.<p>           backbone.layers.N.mixer.<p>
model.layers.N.pre_ff_layernorm.weight              backbone.layers.N.ffn_norm.weight
model.layers.N.feed_forward.<p>                     backbone.layers.N.ffn.<p>
model.final_layernorm.weight                        backbone.norm_f.weight
lm_head.weight                                      lm_head.weight
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..configs.hybrid import HybridConfig
from ..models.hybrid import HybridForCausalLM
from .validation import check_state_dict

# Jamba config fields with the same name and meaning in HybridConfig
_SHARED_FIELDS = (
    "vocab_size", "tie_word_embeddings", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "hidden_act", "initializer_range", "rms_norm_eps", "use_cache",
    "output_router_logits", "router_aux_loss_coef", "pad_token_id", "bos_token_id", "eos_token_id",
    "attention_dropout", "num_experts_per_tok", "num_experts", "expert_layer_period", "expert_layer_offset",
    "attn_layer_period", "attn_layer_offset", "mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_dt_rank",
    "mamba_conv_bias", "mamba_proj_bias",
)
# Not carried over: Jamba's implementation switches (use_mamba_kernels, use_mambapy, use_associative_scan) and
# max_position_embeddings (Jamba has no positional encoding; nothing depends on it).

_TO_OURS = [
    (r"^model\.embed_tokens\.", "backbone.embeddings."),
    (r"^model\.final_layernorm\.", "backbone.norm_f."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"backbone.layers.\1.norm."),
    (r"^model\.layers\.(\d+)\.pre_ff_layernorm\.", r"backbone.layers.\1.ffn_norm."),
    (r"^model\.layers\.(\d+)\.(?:mamba|self_attn)\.", r"backbone.layers.\1.mixer."),
    (r"^model\.layers\.(\d+)\.feed_forward\.", r"backbone.layers.\1.ffn."),
    (r"^lm_head\.", "lm_head."),
]


def _config_dict(config) -> dict:
    return dict(config) if isinstance(config, Mapping) else config.to_dict()


def jamba_to_hybrid(jamba_config, state_dict: Mapping[str, torch.Tensor]) -> tuple[HybridConfig, dict]:
    """A transformers `JambaConfig` (or its dict) and `JambaForCausalLM` state dict -> (HybridConfig, state dict
    for `HybridForCausalLM`). Raises ValueError naming any tensor that does not fit."""
    fields = _config_dict(jamba_config)
    if fields.get("model_type", "jamba") != "jamba":
        raise ValueError(f"expected a Jamba config, got model_type={fields.get('model_type')!r}")
    kwargs = {name: fields[name] for name in _SHARED_FIELDS if name in fields}
    kwargs.update(ssm_mixer="mamba", mamba_inner_layernorms=True, head_dim=fields.get("head_dim"))
    if fields.get("num_experts", 1) <= 1:  # Jamba builds plain MLPs everywhere then
        kwargs["layers_mlp_type"] = ["dense"] * fields["num_hidden_layers"]
    config = HybridConfig(**kwargs)

    converted = {}
    for name, tensor in state_dict.items():
        for pattern, replacement in _TO_OURS:
            new_name, hits = re.subn(pattern, replacement, name)
            if hits:
                converted[new_name] = tensor
                break
        else:
            raise ValueError(f"unknown Jamba tensor {name!r}")
    if config.tie_word_embeddings:
        converted.setdefault("lm_head.weight", converted.get("backbone.embeddings.weight"))
    check_state_dict(HybridForCausalLM, config, converted)
    return config, converted


def hybrid_to_jamba(config: HybridConfig, state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """The inverse of `jamba_to_hybrid`: (JambaConfig fields, JambaForCausalLM state dict). Only hybrids that
    Jamba can express convert: Mamba mixers with inner layernorms, attention and MoE placed by period/offset."""
    if "mamba2" in config.layers_block_type or not config.mamba_inner_layernorms:
        raise ValueError("only hybrids of Mamba (with inner layernorms) and attention layers have a Jamba form")
    jamba_lacks = [f"{name}={getattr(config, name)!r}" for name, default in (
        ("attention_rope_dim", 0), ("attention_qkv_bias", False), ("attention_out_bias", False))
        if getattr(config, name) != default]
    if "none" in config.layers_mlp_type:
        jamba_lacks.append("layers without an MLP (layers_mlp_type 'none')")
    if jamba_lacks:
        raise ValueError(f"Jamba has no equivalent of this hybrid's {', '.join(jamba_lacks)}")
    jamba_mlps = config.periodic_mlp_types() if config.num_experts > 1 else ["dense"] * config.num_hidden_layers
    if config.periodic_block_types() != config.layers_block_type or jamba_mlps != config.layers_mlp_type:
        raise ValueError("Jamba places attention and MoE layers by period and offset; this hybrid's explicit layer "
                         "lists do not follow them")
    fields = {name: getattr(config, name) for name in _SHARED_FIELDS}
    fields.update(model_type="jamba", head_dim=config.head_dim)
    # layouts a period of 0 expresses here, in Jamba's terms
    if "moe" not in config.layers_mlp_type:
        fields.update(num_experts=1, expert_layer_period=max(config.expert_layer_period, 1), expert_layer_offset=0)
    if "attention" not in config.layers_block_type:
        fields.update(attn_layer_period=config.num_hidden_layers + 1, attn_layer_offset=config.num_hidden_layers)
    attention = {i for i, kind in enumerate(config.layers_block_type) if kind == "attention"}
    converted = {}
    for name, tensor in state_dict.items():
        layer = re.match(r"^backbone\.layers\.(\d+)\.", name)
        mixer = "self_attn" if layer and int(layer.group(1)) in attention else "mamba"
        new_name = (name.replace("backbone.embeddings.", "model.embed_tokens.")
                    .replace("backbone.norm_f.", "model.final_layernorm."))
        new_name = re.sub(r"^backbone\.layers\.(\d+)\.norm\.", r"model.layers.\1.input_layernorm.", new_name)
        new_name = re.sub(r"^backbone\.layers\.(\d+)\.ffn_norm\.", r"model.layers.\1.pre_ff_layernorm.", new_name)
        new_name = re.sub(r"^backbone\.layers\.(\d+)\.mixer\.", rf"model.layers.\1.{mixer}.", new_name)
        new_name = re.sub(r"^backbone\.layers\.(\d+)\.ffn\.", r"model.layers.\1.feed_forward.", new_name)
        if new_name == name and not name.startswith("lm_head."):
            raise ValueError(f"unknown hybrid tensor {name!r}")
        converted[new_name] = tensor
    return fields, converted
