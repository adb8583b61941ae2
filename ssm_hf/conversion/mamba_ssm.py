"""mamba_ssm (state-spaces/mamba 2.x, `MambaLMHeadModel`) checkpoints <-> ssm-hf models, both ways.

A mamba_ssm config maps onto our `MambaConfig` (Mamba1 layers, no MLP), `Mamba2Config` (Mamba2 layers, no MLP),
or `HybridConfig` (attention layers from `attn_layer_idx`, or a gated MLP in every layer from `d_intermediate > 0`),
with an explicit `layers_block_type`:

mamba_ssm config                          ssm-hf config
d_model, n_layer                          hidden_size, num_hidden_layers
vocab_size, pad_vocab_size_multiple       vocab_size = the padded size (the padding rows are kept, so logits match)
tie_embeddings                            tie_word_embeddings
ssm_cfg (layer Mamba1: d_state, d_conv,   state_size, conv_kernel, expand, time_step_rank, use_conv_bias, use_bias
  expand, dt_rank, conv_bias, bias, ...)    (hybrid: mamba_d_state, mamba_d_conv, mamba_expand, mamba_dt_rank, ...)
ssm_cfg (layer Mamba2: headdim, ngroups,  head_dim, n_groups, chunk_size, time_step_limit, ...
  chunk_size, dt_limit, ...)                (hybrid: mamba2_head_dim, mamba2_n_groups, mamba2_chunk_size, ...)
attn_layer_idx                            layers_block_type[i] = "attention"
attn_cfg (num_heads, num_heads_kv,        num_attention_heads, num_key_value_heads, head_dim, attention_rope_dim,
  head_dim, rotary_emb_dim, ..._bias)       attention_rope_theta, attention_qkv_bias, attention_out_bias
d_intermediate                            intermediate_size (rounded up to 128, as mamba_ssm's GatedMLP does);
                                          layers_mlp_type "dense", or "none" when d_intermediate = 0
(norms: RMSNorm, eps 1e-5, fixed)         layer_norm_epsilon / rms_norm_eps = 1e-5

mamba_ssm tensors                                   ssm-hf tensors
backbone.embedding.weight                           backbone.embeddings.weight
backbone.layers.N.norm.weight                       backbone.layers.N.norm.weight
backbone.layers.N.mixer.<p> (Mamba1 / Mamba2)       backbone.layers.N.mixer.<p> (same names and shapes)
backbone.layers.N.mixer.in_proj.<w|b> (attention)   backbone.layers.N.mixer.{q,k,v}_proj.<w|b> (rows [q | k | v])
backbone.layers.N.mixer.out_proj.<w|b> (attention)  backbone.layers.N.mixer.o_proj.<w|b>
backbone.layers.N.norm2.weight                      backbone.layers.N.ffn_norm.weight
backbone.layers.N.mlp.fc1.weight                    backbone.layers.N.ffn.{up,gate}_proj.weight (rows [up | gate])
backbone.layers.N.mlp.fc2.weight                    backbone.layers.N.ffn.down_proj.weight
backbone.norm_f.weight, lm_head.weight              backbone.norm_f.weight, lm_head.weight

Export back gives the same tensors under the same names (fc1 and the attention in_proj are concatenated back).
What has no equivalent here is refused with a NotImplementedError naming the field: LayerNorm blocks
(`rms_norm=False`), Mamba2's `d_ssm` < d_inner, `D_has_hdim`, `rmsnorm=False`, `norm_before_gate=True`, and
attention with `d_conv`, `mlp_dim`, interleaved rotary embeddings, a custom `softmax_scale` or `causal=False`.
Initialisation-only fields (dt_min, dt_max, dt_init, A_init_range, ...) of hybrid layers are not kept.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import PreTrainedConfig, PreTrainedModel

from ..configs.hybrid import HybridConfig
from ..configs.mamba import MambaConfig
from ..configs.mamba2 import Mamba2Config
from ..models.hybrid import HybridForCausalLM
from ..models.mamba import MambaForCausalLM
from ..models.mamba2 import Mamba2ForCausalLM
from .validation import ConversionError, check_state_dict, compare_shapes

NORM_EPS = 1e-5        # mamba_ssm's block norms and Mamba2's gated norm; not configurable there
MLP_MULTIPLE = 128     # mamba_ssm's GatedMLP rounds its hidden width up to a multiple of this
EMBEDDING, HEAD = "backbone.embedding.weight", "lm_head.weight"

# Config fields mamba_ssm knows, with its defaults (mamba_ssm 2.x: MambaConfig, Mamba, Mamba2, MHA).
TOP_DEFAULTS = dict(d_model=2560, d_intermediate=0, n_layer=64, vocab_size=50277, ssm_cfg={}, attn_layer_idx=[],
                    attn_cfg={}, rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
                    pad_vocab_size_multiple=8, tie_embeddings=True)
# keys a config.json may carry that are bookkeeping, not architecture
METADATA_FIELDS = ("architectures", "model_type", "_name_or_path", "transformers_version", "torch_dtype", "dtype")
MAMBA1_DEFAULTS = dict(d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1, dt_init="random",
                       dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False, use_fast_path=True)
MAMBA2_DEFAULTS = dict(d_state=128, d_conv=4, conv_init=None, expand=2, headdim=64, d_ssm=None, ngroups=1,
                       A_init_range=(1, 16), D_has_hdim=False, rmsnorm=True, norm_before_gate=False, dt_min=0.001,
                       dt_max=0.1, dt_init_floor=1e-4, dt_limit=(0.0, math.inf), bias=False, conv_bias=True,
                       chunk_size=256, use_mem_eff_path=True, sequence_parallel=True)
MHA_DEFAULTS = dict(num_heads=None, num_heads_kv=None, head_dim=None, mlp_dim=0, qkv_proj_bias=True,
                    out_proj_bias=True, softmax_scale=None, causal=False, d_conv=0, rotary_emb_dim=0,
                    rotary_emb_base=10000.0, rotary_emb_interleaved=False)
LAYERS = {"Mamba1": "mamba", "Mamba2": "mamba2"}


def _with_defaults(given: object, defaults: dict, where: str, ignore: tuple[str, ...] = ()) -> dict:
    if not isinstance(given, Mapping):
        raise ConversionError(f"mamba_ssm {where} must be a JSON object, got {given!r}")
    unknown = sorted(set(given) - set(defaults) - set(ignore))
    if unknown:
        raise ConversionError(f"unknown mamba_ssm {where} field(s) {unknown}; known: {sorted(defaults)}")
    return {**defaults, **{k: v for k, v in given.items() if k not in ignore}}


def _positive_int(value: object, name: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ConversionError(f"mamba_ssm {name}={value!r} must be a {'non-negative' if allow_zero else 'positive'} "
                              "integer")
    return value


def _flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConversionError(f"mamba_ssm {name}={value!r} must be true or false")
    return value


def _refuse_unless(condition: bool, feature: str) -> None:
    if not condition:
        raise NotImplementedError(f"mamba_ssm checkpoints with {feature} are not supported: ssm-hf has no equivalent")


def round_up(value: int, multiple: int) -> int:
    """`value` rounded up to a multiple of `multiple`: mamba_ssm's embedding rows (vocab_size and
    pad_vocab_size_multiple) and GatedMLP width (d_intermediate and 128)."""
    return -(-value // multiple) * multiple


def _build(config_class: type[PreTrainedConfig], **fields) -> PreTrainedConfig:
    try:
        return config_class(**fields)
    except (ValueError, TypeError, StrictDataclassError) as err:
        message = " ".join(str(err).split())
        raise ConversionError(f"the mamba_ssm config gives an invalid {config_class.__name__}: {message}") from None


def mamba_ssm_config_to_ssm_hf(mamba_config: Mapping) -> PreTrainedConfig:
    """A mamba_ssm config.json dict -> our MambaConfig, Mamba2Config or HybridConfig. Raises ConversionError for
    values that are wrong (naming the field) and NotImplementedError for features ssm-hf does not have."""
    cfg = _with_defaults(mamba_config, TOP_DEFAULTS, "config", ignore=METADATA_FIELDS)
    d_model = _positive_int(cfg["d_model"], "d_model")
    n_layer = _positive_int(cfg["n_layer"], "n_layer")
    vocab = round_up(_positive_int(cfg["vocab_size"], "vocab_size"),
                              _positive_int(cfg["pad_vocab_size_multiple"], "pad_vocab_size_multiple"))
    d_intermediate = _positive_int(cfg["d_intermediate"], "d_intermediate", allow_zero=True)
    tied = _flag(cfg["tie_embeddings"], "tie_embeddings")
    residual_in_fp32 = _flag(cfg["residual_in_fp32"], "residual_in_fp32")
    _flag(cfg["fused_add_norm"], "fused_add_norm")  # a kernel choice: same function either way
    _refuse_unless(_flag(cfg["rms_norm"], "rms_norm"), "LayerNorm blocks (rms_norm=false)")

    ssm = cfg["ssm_cfg"]
    if not isinstance(ssm, Mapping):
        raise ConversionError(f"mamba_ssm ssm_cfg must be a JSON object, got {ssm!r}")
    layer = ssm.get("layer", "Mamba1")
    if layer not in LAYERS:
        raise ConversionError(f"mamba_ssm ssm_cfg.layer={layer!r} is not known; expected one of {sorted(LAYERS)}")
    ssm = _with_defaults({k: v for k, v in ssm.items() if k != "layer"},
                         MAMBA1_DEFAULTS if layer == "Mamba1" else MAMBA2_DEFAULTS, f"ssm_cfg ({layer})")
    for name in ("d_state", "d_conv"):
        _positive_int(ssm[name], f"ssm_cfg.{name}")
    if not isinstance(ssm["expand"], (int, float)) or isinstance(ssm["expand"], bool) or ssm["expand"] <= 0:
        raise ConversionError(f"mamba_ssm ssm_cfg.expand={ssm['expand']!r} must be a positive number")
    if float(ssm["expand"]).is_integer():
        ssm["expand"] = int(ssm["expand"])  # a JSON 2.0 means 2
    if layer == "Mamba1" and ssm["dt_init"] not in ("random", "constant"):
        raise ConversionError(f"mamba_ssm ssm_cfg.dt_init={ssm['dt_init']!r} must be 'random' or 'constant'")
    if layer == "Mamba2":
        d_inner = ssm["expand"] * d_model
        _refuse_unless(ssm["d_ssm"] in (None, d_inner), f"a gated MLP inside Mamba2 (ssm_cfg.d_ssm={ssm['d_ssm']})")
        _refuse_unless(not ssm["D_has_hdim"], "ssm_cfg.D_has_hdim=true")
        _refuse_unless(ssm["rmsnorm"], "ssm_cfg.rmsnorm=false")
        _refuse_unless(not ssm["norm_before_gate"], "ssm_cfg.norm_before_gate=true")
        if not isinstance(ssm["dt_limit"], (list, tuple)) or len(ssm["dt_limit"]) != 2:
            raise ConversionError(f"mamba_ssm ssm_cfg.dt_limit={ssm['dt_limit']!r} must be [min, max]")

    attn_idx = cfg["attn_layer_idx"]
    if not isinstance(attn_idx, list) or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layer
                                             for i in attn_idx) or len(set(attn_idx)) != len(attn_idx):
        raise ConversionError(f"mamba_ssm attn_layer_idx={attn_idx!r} must list distinct layer indices in "
                              f"[0, n_layer={n_layer})")
    shared = dict(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layer, tie_word_embeddings=tied,
                  pad_token_id=None, bos_token_id=None, eos_token_id=None)  # mamba_ssm configs name no tokens

    if not attn_idx and d_intermediate == 0:
        if layer == "Mamba1":
            return _build(
                MambaConfig, **shared, state_size=ssm["d_state"], conv_kernel=ssm["d_conv"], expand=ssm["expand"],
                time_step_rank=ssm["dt_rank"], time_step_min=ssm["dt_min"], time_step_max=ssm["dt_max"],
                time_step_init_scheme=ssm["dt_init"], time_step_scale=ssm["dt_scale"],
                time_step_floor=ssm["dt_init_floor"], use_conv_bias=ssm["conv_bias"], use_bias=ssm["bias"],
                layer_norm_epsilon=NORM_EPS, residual_in_fp32=residual_in_fp32)
        return _build(
            Mamba2Config, **shared, num_heads=_mamba2_heads(ssm, d_model), head_dim=ssm["headdim"],
            state_size=ssm["d_state"], n_groups=ssm["ngroups"], expand=ssm["expand"], conv_kernel=ssm["d_conv"],
            use_bias=ssm["bias"], use_conv_bias=ssm["conv_bias"], chunk_size=ssm["chunk_size"],
            time_step_limit=tuple(ssm["dt_limit"]), time_step_min=ssm["dt_min"], time_step_max=ssm["dt_max"],
            time_step_floor=ssm["dt_init_floor"], layer_norm_epsilon=NORM_EPS, residual_in_fp32=residual_in_fp32)

    # a hybrid; residual_in_fp32 is a precision choice the hybrid blocks do not offer (same function in float32)
    _refuse_unless(float(ssm["expand"]).is_integer(), f"a fractional ssm_cfg.expand={ssm['expand']} in a hybrid")
    kind = LAYERS[layer]
    fields = dict(
        shared, layers_block_type=["attention" if i in attn_idx else kind for i in range(n_layer)],
        layers_mlp_type=["dense" if d_intermediate else "none"] * n_layer, ssm_mixer=kind,
        intermediate_size=round_up(d_intermediate, MLP_MULTIPLE) if d_intermediate else 0,
        attn_layer_period=0, attn_layer_offset=0, expert_layer_period=0, expert_layer_offset=0, num_experts=1,
        hidden_act="silu", rms_norm_eps=NORM_EPS, mamba_d_conv=ssm["d_conv"], mamba_expand=int(ssm["expand"]),
        mamba_conv_bias=ssm["conv_bias"], mamba_proj_bias=ssm["bias"])
    if kind == "mamba":
        fields.update(mamba_d_state=ssm["d_state"], mamba_dt_rank=ssm["dt_rank"], mamba_inner_layernorms=False)
    else:
        _refuse_unless(tuple(ssm["dt_limit"]) == (0.0, math.inf),
                       f"ssm_cfg.dt_limit={list(ssm['dt_limit'])} in a hybrid (its Mamba2 layers have no Δ limit)")
        fields.update(mamba2_d_state=ssm["d_state"], mamba2_head_dim=ssm["headdim"], mamba2_n_groups=ssm["ngroups"],
                      mamba2_chunk_size=ssm["chunk_size"])
        _mamba2_heads(ssm, d_model)
    if attn_idx:
        fields.update(_attention_fields(cfg["attn_cfg"], d_model))
    return _build(HybridConfig, **fields)


def _mamba2_heads(ssm: dict, d_model: int) -> int:
    d_inner = ssm["expand"] * d_model
    headdim = _positive_int(ssm["headdim"], "ssm_cfg.headdim")
    if d_inner % headdim:
        raise ConversionError(f"mamba_ssm ssm_cfg.headdim={headdim} does not divide expand * d_model = {d_inner}")
    return int(d_inner // headdim)


def _attention_fields(attn_cfg: object, d_model: int) -> dict:
    attn = _with_defaults(attn_cfg, MHA_DEFAULTS, "attn_cfg")
    heads = _positive_int(attn["num_heads"], "attn_cfg.num_heads")
    kv_heads = _positive_int(heads if attn["num_heads_kv"] is None else attn["num_heads_kv"], "attn_cfg.num_heads_kv")
    head_dim = _positive_int(d_model // heads if attn["head_dim"] is None else attn["head_dim"], "attn_cfg.head_dim")
    rope_dim = _positive_int(attn["rotary_emb_dim"], "attn_cfg.rotary_emb_dim", allow_zero=True)
    _refuse_unless(attn["causal"] is True, "non-causal attention (attn_cfg.causal is not true)")
    _refuse_unless(not attn["d_conv"], f"a convolution in attention (attn_cfg.d_conv={attn['d_conv']})")
    _refuse_unless(not attn["mlp_dim"], f"an MLP fused into attention (attn_cfg.mlp_dim={attn['mlp_dim']})")
    _refuse_unless(not (rope_dim and attn["rotary_emb_interleaved"]),
                   "interleaved rotary embeddings (attn_cfg.rotary_emb_interleaved=true)")
    scale = attn["softmax_scale"]
    _refuse_unless(scale is None or math.isclose(scale, head_dim**-0.5, rel_tol=1e-12),
                   f"attn_cfg.softmax_scale={scale} (only head_dim ** -0.5)")
    return dict(num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                attention_rope_dim=rope_dim, attention_rope_theta=float(attn["rotary_emb_base"]),
                attention_qkv_bias=_flag(attn["qkv_proj_bias"], "attn_cfg.qkv_proj_bias"),
                attention_out_bias=_flag(attn["out_proj_bias"], "attn_cfg.out_proj_bias"))


MODEL_CLASSES: dict[type[PreTrainedConfig], type[PreTrainedModel]] = {
    MambaConfig: MambaForCausalLM, Mamba2Config: Mamba2ForCausalLM, HybridConfig: HybridForCausalLM,
}


def _attention_layers(config: PreTrainedConfig) -> set[int]:
    kinds = getattr(config, "layers_block_type", ())
    return {i for i, kind in enumerate(kinds) if kind == "attention"}


def mamba_ssm_to_ssm_hf(mamba_config: Mapping, state_dict: Mapping[str, torch.Tensor]
                        ) -> tuple[PreTrainedConfig, dict[str, torch.Tensor]]:
    """(mamba_ssm config.json dict, `MambaLMHeadModel` state dict) -> (our config, state dict for
    `MambaForCausalLM` / `Mamba2ForCausalLM` / `HybridForCausalLM`). Tensors are not copied, except the split
    attention in_proj and MLP fc1. Raises ConversionError naming missing, unexpected or mis-shaped tensors (in
    mamba_ssm's names)."""
    config = mamba_ssm_config_to_ssm_hf(mamba_config)
    model_class = MODEL_CLASSES[type(config)]
    with torch.device("meta"):
        reference = model_class(config).state_dict()
    _, expected = ssm_hf_to_mamba_ssm(config, reference)
    tied = config.tie_word_embeddings
    compare_shapes({name: tuple(t.shape) for name, t in expected.items()}, state_dict,
                   "a mamba_ssm checkpoint of this config.json", optional=(HEAD,) if tied else ())
    if tied and HEAD in state_dict and not torch.equal(state_dict[HEAD], state_dict[EMBEDDING]):
        raise ConversionError(f"tie_embeddings is true but {HEAD} differs from {EMBEDDING}")

    attention = _attention_layers(config)
    converted: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        layer = re.match(r"^backbone\.layers\.(\d+)\.(.+)$", name)
        if name == EMBEDDING:
            converted["backbone.embeddings.weight"] = tensor
        elif layer is None:  # backbone.norm_f.weight, lm_head.weight
            converted[name] = tensor
        else:
            converted.update(_layer_to_ours(int(layer.group(1)), layer.group(2), tensor, config, attention))
    if tied:
        converted["lm_head.weight"] = converted["backbone.embeddings.weight"]
    check_state_dict(model_class, config, converted)
    return config, converted


def _layer_to_ours(index: int, rest: str, tensor: torch.Tensor, config: PreTrainedConfig,
                   attention: set[int]) -> dict[str, torch.Tensor]:
    prefix = f"backbone.layers.{index}."
    if rest.startswith("norm2."):
        return {prefix + "ffn_norm." + rest[len("norm2."):]: tensor}
    if rest == "mlp.fc1.weight":
        # the split halves are cloned: views of one storage would be saved as shared tensors
        up, gate = (part.clone() for part in tensor.chunk(2, dim=0))
        return {prefix + "ffn.up_proj.weight": up, prefix + "ffn.gate_proj.weight": gate}
    if rest == "mlp.fc2.weight":
        return {prefix + "ffn.down_proj.weight": tensor}
    if index in attention and rest.startswith("mixer.in_proj."):
        q_size = config.num_attention_heads * config.head_dim
        kv_size = config.num_key_value_heads * config.head_dim
        suffix = rest[len("mixer.in_proj."):]
        q, k, v = (part.clone() for part in tensor.split([q_size, kv_size, kv_size], dim=0))
        return {f"{prefix}mixer.{proj}.{suffix}": part for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v))}
    if index in attention and rest.startswith("mixer.out_proj."):
        return {prefix + "mixer.o_proj." + rest[len("mixer.out_proj."):]: tensor}
    return {prefix + rest: tensor}


def ssm_hf_config_to_mamba_ssm(config: PreTrainedConfig) -> dict:
    """Our MambaConfig / Mamba2Config / HybridConfig -> a mamba_ssm config.json dict describing the same
    function. Raises NotImplementedError naming what mamba_ssm cannot express."""
    def refuse(what: str) -> NotImplementedError:
        return NotImplementedError(f"cannot export to mamba_ssm: it has no equivalent of {what}")

    hybrid = isinstance(config, HybridConfig)
    if not isinstance(config, (MambaConfig, Mamba2Config, HybridConfig)):
        raise refuse(f"{type(config).__name__}")
    eps = config.rms_norm_eps if hybrid else config.layer_norm_epsilon
    if not math.isclose(eps, NORM_EPS, rel_tol=1e-9):
        raise refuse(f"a norm epsilon of {eps} (mamba_ssm's norms use {NORM_EPS})")
    if config.hidden_act != "silu":
        raise refuse(f"hidden_act={config.hidden_act!r} (mamba_ssm uses silu)")
    vocab = config.vocab_size
    top = dict(d_model=config.hidden_size, d_intermediate=0, n_layer=config.num_hidden_layers, vocab_size=vocab,
               ssm_cfg={}, attn_layer_idx=[], attn_cfg={}, rms_norm=True,
               residual_in_fp32=bool(getattr(config, "residual_in_fp32", True)), fused_add_norm=True,
               pad_vocab_size_multiple=next(m for m in (16, 8, 1) if vocab % m == 0),
               tie_embeddings=bool(config.tie_word_embeddings))
    if isinstance(config, MambaConfig):
        if config.inner_layernorms:
            raise refuse("inner layernorms on Δ, B, C (inner_layernorms=True)")
        top["ssm_cfg"] = dict(layer="Mamba1", d_state=config.state_size, d_conv=config.conv_kernel,
                              expand=config.expand, dt_rank=config.time_step_rank, dt_min=config.time_step_min,
                              dt_max=config.time_step_max, dt_init=config.time_step_init_scheme,
                              dt_scale=config.time_step_scale, dt_init_floor=config.time_step_floor,
                              conv_bias=config.use_conv_bias, bias=config.use_bias)
        return top
    if isinstance(config, Mamba2Config):
        top["ssm_cfg"] = _mamba2_cfg(config.state_size, config.conv_kernel, config.expand, config.head_dim,
                                     config.n_groups, config.chunk_size, config.use_conv_bias, config.use_bias,
                                     tuple(config.time_step_limit))
        top["ssm_cfg"].update(dt_min=config.time_step_min, dt_max=config.time_step_max,
                              dt_init_floor=config.time_step_floor)
        return top

    ssm_kinds = set(config.layers_block_type) - {"attention"}
    if len(ssm_kinds) > 1:
        raise refuse("a hybrid mixing Mamba and Mamba-2 layers (one ssm_cfg.layer for all)")
    mlp_kinds = set(config.layers_mlp_type)
    if "moe" in mlp_kinds or len(mlp_kinds) > 1:
        raise refuse(f"layers_mlp_type {sorted(mlp_kinds)} (all 'dense' or all 'none' only)")
    if mlp_kinds == {"dense"}:
        if config.intermediate_size % MLP_MULTIPLE:
            raise refuse(f"intermediate_size={config.intermediate_size} (its GatedMLP width is a multiple of "
                         f"{MLP_MULTIPLE})")
        top["d_intermediate"] = config.intermediate_size
    if ssm_kinds == {"mamba2"}:
        top["ssm_cfg"] = _mamba2_cfg(config.mamba2_d_state, config.mamba_d_conv, config.mamba_expand,
                                     config.mamba2_head_dim, config.mamba2_n_groups, config.mamba2_chunk_size,
                                     config.mamba_conv_bias, config.mamba_proj_bias, (0.0, math.inf))
    else:
        if config.mamba_inner_layernorms and ssm_kinds:
            raise refuse("inner layernorms on Δ, B, C (mamba_inner_layernorms=True)")
        top["ssm_cfg"] = dict(layer="Mamba1", d_state=config.mamba_d_state, d_conv=config.mamba_d_conv,
                              expand=config.mamba_expand, dt_rank=config.mamba_dt_rank,
                              conv_bias=config.mamba_conv_bias, bias=config.mamba_proj_bias)
    top["attn_layer_idx"] = sorted(_attention_layers(config))
    if top["attn_layer_idx"]:
        top["attn_cfg"] = dict(num_heads=config.num_attention_heads, num_heads_kv=config.num_key_value_heads,
                               head_dim=config.head_dim, rotary_emb_dim=config.attention_rope_dim,
                               rotary_emb_base=config.attention_rope_theta, qkv_proj_bias=config.attention_qkv_bias,
                               out_proj_bias=config.attention_out_bias, causal=True)
    return top


def _mamba2_cfg(d_state, d_conv, expand, headdim, ngroups, chunk_size, conv_bias, bias, dt_limit) -> dict:
    cfg = dict(layer="Mamba2", d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim, ngroups=ngroups,
               chunk_size=chunk_size, conv_bias=conv_bias, bias=bias)
    if tuple(dt_limit) != (0.0, math.inf):  # the default is left out: JSON has no infinity
        cfg["dt_limit"] = list(dt_limit)
    return cfg


def ssm_hf_to_mamba_ssm(config: PreTrainedConfig, state_dict: Mapping[str, torch.Tensor]
                        ) -> tuple[dict, dict[str, torch.Tensor]]:
    """The inverse of `mamba_ssm_to_ssm_hf`: (mamba_ssm config.json dict, `MambaLMHeadModel` state dict). The
    tensors are those given (the attention q/k/v and MLP up/gate are concatenated back, bit for bit); with tied
    embeddings, lm_head.weight is the embedding tensor itself, as in mamba_ssm's own state dict."""
    mamba_config = ssm_hf_config_to_mamba_ssm(config)
    attention = _attention_layers(config)
    converted: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        layer = re.match(r"^backbone\.layers\.(\d+)\.(.+)$", name)
        if name == "backbone.embeddings.weight":
            converted[EMBEDDING] = tensor
        elif layer is None:
            converted[name] = tensor
        else:
            index, rest = int(layer.group(1)), layer.group(2)
            prefix = f"backbone.layers.{index}."
            if rest.startswith("ffn_norm."):
                converted[prefix + "norm2." + rest[len("ffn_norm."):]] = tensor
            elif rest == "ffn.up_proj.weight":
                converted[prefix + "mlp.fc1.weight"] = torch.cat([tensor, state_dict[prefix + "ffn.gate_proj.weight"]])
            elif rest == "ffn.down_proj.weight":
                converted[prefix + "mlp.fc2.weight"] = tensor
            elif index in attention and re.match(r"^mixer\.q_proj\.", rest):
                suffix = rest[len("mixer.q_proj."):]
                converted[f"{prefix}mixer.in_proj.{suffix}"] = torch.cat(
                    [state_dict[f"{prefix}mixer.{proj}.{suffix}"] for proj in ("q_proj", "k_proj", "v_proj")])
            elif index in attention and rest.startswith("mixer.o_proj."):
                converted[prefix + "mixer.out_proj." + rest[len("mixer.o_proj."):]] = tensor
            elif rest != "ffn.gate_proj.weight" and not re.match(r"^mixer\.[kv]_proj\.", rest):
                converted[prefix + rest] = tensor
    if config.tie_word_embeddings and EMBEDDING in converted:
        converted[HEAD] = converted[EMBEDDING]
    return mamba_config, converted


__all__ = ["mamba_ssm_config_to_ssm_hf", "mamba_ssm_to_ssm_hf", "ssm_hf_config_to_mamba_ssm", "ssm_hf_to_mamba_ssm"]
