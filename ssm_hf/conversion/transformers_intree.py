"""transformers' in-tree Mamba, FalconMamba, Mamba2 and Jamba checkpoints <-> ssm-hf models, both ways.

transformers model_type    ssm-hf
mamba                      MambaConfig, MambaForCausalLM: the same config fields and the same tensors
falcon_mamba               MambaConfig with inner_layernorms=True and FalconMamba's mixer_rms_eps: FalconMamba
                           normalises Δ, B and C without weights; here those norms have weights
                           (mixer.{dt,b,c}_layernorm.weight), set to 1 on import and dropped on export (refused
                           unless they are still all 1)
mamba2                     Mamba2Config, Mamba2ForCausalLM: the same config fields and the same tensors
jamba                      HybridConfig, HybridForCausalLM (names mapped by `ssm_hf.conversion.jamba`); Jamba files
                           on disk hold each expert separately (experts.E.{gate,up,down}_proj.weight, what
                           transformers' save_pretrained writes and its loader stacks into experts.gate_up_proj and
                           experts.down_proj): both layouts are read, and exported files are written by
                           transformers' own save_pretrained

Implementation switches of transformers' classes (use_mambapy, use_associative_scan, use_mamba_kernels) are not
carried over; our `scan_chunk_size` is not exported.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import torch
import transformers
from huggingface_hub.errors import StrictDataclassError
from transformers import PreTrainedConfig, PreTrainedModel

from ..configs.hybrid import HybridConfig
from ..configs.mamba import MambaConfig
from ..configs.mamba2 import Mamba2Config
from ..models.hybrid import HybridForCausalLM
from ..models.mamba import MambaForCausalLM
from ..models.mamba2 import Mamba2ForCausalLM
from .jamba import hybrid_to_jamba, jamba_to_hybrid
from .validation import ConversionError, check_state_dict

# model_type -> (transformers' config class, its causal LM class, our config class, our causal LM class)
FAMILIES: dict[str, tuple[type[PreTrainedConfig], type[PreTrainedModel], type[PreTrainedConfig],
                          type[PreTrainedModel]]] = {
    "mamba": (transformers.MambaConfig, transformers.MambaForCausalLM, MambaConfig, MambaForCausalLM),
    "falcon_mamba": (transformers.FalconMambaConfig, transformers.FalconMambaForCausalLM, MambaConfig,
                     MambaForCausalLM),
    "mamba2": (transformers.Mamba2Config, transformers.Mamba2ForCausalLM, Mamba2Config, Mamba2ForCausalLM),
    "jamba": (transformers.JambaConfig, transformers.JambaForCausalLM, HybridConfig, HybridForCausalLM),
}
INNER_NORMS = ("dt_layernorm", "b_layernorm", "c_layernorm")
EMBEDDINGS = {"jamba": "model.embed_tokens.weight"}
HEAD = "lm_head.weight"


def _same_fields(source: PreTrainedConfig, target_class: type[PreTrainedConfig]) -> dict:
    """The fields of `source` that `target_class` declares too (bookkeeping fields left out)."""
    names = {field.name for field in dataclasses.fields(target_class)} - {"architectures", "transformers_version"}
    return {name: value for name, value in source.to_dict().items() if name in names}


def _build(config_class: type[PreTrainedConfig], fields: Mapping, what: str) -> PreTrainedConfig:
    try:
        return config_class.from_dict(dict(fields))
    except (ValueError, TypeError, StrictDataclassError) as err:
        raise ConversionError(f"invalid {what} config: {' '.join(str(err).split())}") from None


def transformers_config(config: Mapping | PreTrainedConfig) -> PreTrainedConfig:
    """transformers' config object for a config.json dict of one of the supported model types."""
    if isinstance(config, PreTrainedConfig):
        config = config.to_dict()
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        ours = " (that is already an ssm-hf checkpoint)" if str(model_type).startswith("ssm_") else ""
        raise ConversionError(f"config.json has model_type={model_type!r}{ours}; transformers checkpoints of "
                              f"model_type {sorted(FAMILIES)} convert")
    return _build(FAMILIES[model_type][0], config, model_type)


def merge_jamba_experts(state_dict: Mapping[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """Jamba's on-disk expert layout -> its in-memory one: per layer, experts.E.gate_proj / up_proj / down_proj
    (E = 0 .. num_experts - 1) become gate_up_proj (num_experts, 2 * intermediate, hidden; gate rows first) and
    down_proj (num_experts, hidden, intermediate). Layers whose experts are incomplete are left as they are, so
    that the state-dict check names what is missing."""
    pattern = re.compile(r"^(model\.layers\.\d+\.feed_forward\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
    found: dict[str, dict[tuple[int, str], str]] = {}
    for name in state_dict:
        match = pattern.match(name)
        if match:
            found.setdefault(match.group(1), {})[int(match.group(2)), match.group(3)] = name
    merged = dict(state_dict)
    for prefix, parts in found.items():
        if set(parts) != {(e, kind) for e in range(num_experts) for kind in ("gate", "up", "down")}:
            continue
        weights = {kind: torch.stack([merged.pop(parts[e, kind]) for e in range(num_experts)])
                   for kind in ("gate", "up", "down")}
        merged[prefix + ".gate_up_proj"] = torch.cat([weights["gate"], weights["up"]], dim=1)
        merged[prefix + ".down_proj"] = weights["down"]
    return merged


def _untie(state_dict: Mapping[str, torch.Tensor], embeddings: str, tied: bool) -> dict[str, torch.Tensor]:
    """The state dict without a tied lm_head, after checking that a present one equals the embeddings."""
    state_dict = dict(state_dict)
    if tied and HEAD in state_dict:
        head = state_dict.pop(HEAD)
        if embeddings in state_dict and not (head.shape == state_dict[embeddings].shape
                                             and torch.equal(head, state_dict[embeddings])):
            raise ConversionError(f"tie_word_embeddings is true but {HEAD} differs from {embeddings}")
    return state_dict


def transformers_to_ssm_hf(config: Mapping | PreTrainedConfig, state_dict: Mapping[str, torch.Tensor]
                           ) -> tuple[PreTrainedConfig, dict[str, torch.Tensor]]:
    """(transformers config or config.json dict, its causal LM's state dict) -> (our config, state dict for our
    causal LM). Raises ConversionError naming missing, unexpected or mis-shaped tensors (in transformers' names)."""
    theirs = transformers_config(config)
    model_type = theirs.model_type
    _, their_class, our_config_class, our_class = FAMILIES[model_type]
    tied = bool(theirs.tie_word_embeddings)
    if model_type == "jamba":
        state_dict = merge_jamba_experts(state_dict, theirs.num_experts)
    check_state_dict(their_class, theirs, state_dict, optional=(HEAD,) if tied else ())
    embeddings = EMBEDDINGS.get(model_type, "backbone.embeddings.weight")
    weights = _untie(state_dict, embeddings, tied)
    if model_type == "jamba":
        ours, converted = jamba_to_hybrid(theirs, weights)
    else:
        fields = _same_fields(theirs, our_config_class)
        if model_type == "falcon_mamba":
            fields.update(inner_layernorms=True, mixer_rms_eps=theirs.mixer_rms_eps)
        ours = _build(our_config_class, fields, f"ssm-hf {our_config_class.__name__}")
        converted = dict(weights)
        if model_type == "falcon_mamba":
            for i in range(ours.num_hidden_layers):
                prefix = f"backbone.layers.{i}.mixer."
                dtype = converted[prefix + "x_proj.weight"].dtype
                sizes = (ours.time_step_rank, ours.state_size, ours.state_size)
                for norm, size in zip(INNER_NORMS, sizes):
                    converted[f"{prefix}{norm}.weight"] = torch.ones(size, dtype=dtype)
    if ours.tie_word_embeddings:
        converted[HEAD] = converted["backbone.embeddings.weight"]
    check_state_dict(our_class, ours, converted)
    return ours, converted


def ssm_hf_to_transformers(config: PreTrainedConfig, state_dict: Mapping[str, torch.Tensor]
                           ) -> tuple[PreTrainedConfig, dict[str, torch.Tensor]]:
    """Our config and causal-LM state dict -> (transformers' config, state dict of its in-tree causal LM): Mamba
    (FalconMamba when the inner norms are on with unit weights), Mamba2, or Jamba for hybrids Jamba can express.
    Tensors are passed through unchanged. Raises ConversionError / NotImplementedError naming what does not map."""
    if isinstance(config, HybridConfig):
        model_type = "jamba"
        try:
            fields, converted = hybrid_to_jamba(config, state_dict)
        except ValueError as err:
            raise NotImplementedError(f"cannot export to transformers: {err}") from None
        theirs = _build(transformers.JambaConfig, fields, "jamba")
    elif isinstance(config, (MambaConfig, Mamba2Config)):
        converted = dict(state_dict)
        model_type = "mamba2" if isinstance(config, Mamba2Config) else "mamba"
        fields = {}
        if isinstance(config, MambaConfig) and config.inner_layernorms:
            model_type = "falcon_mamba"
            for name in sorted(converted):
                if re.search(r"\.mixer\.(dt|b|c)_layernorm\.weight$", name):
                    weight = converted.pop(name)
                    if not torch.all(weight == 1):
                        raise NotImplementedError(
                            f"cannot export to transformers: {name} is not all ones, and FalconMamba (the in-tree "
                            "Mamba with inner norms) has no weights in those norms")
            eps = config.layer_norm_epsilon if config.mixer_rms_eps is None else config.mixer_rms_eps
            fields["mixer_rms_eps"] = eps
        their_config_class = FAMILIES[model_type][0]
        fields = {**_same_fields(config, their_config_class), **fields}
        theirs = _build(their_config_class, fields, model_type)
    else:
        raise NotImplementedError(f"cannot export {type(config).__name__} to transformers: no in-tree equivalent")
    tied = bool(theirs.tie_word_embeddings)
    converted = _untie(converted, EMBEDDINGS.get(model_type, "backbone.embeddings.weight"), tied)
    check_state_dict(FAMILIES[model_type][1], theirs, converted, optional=(HEAD,) if tied else ())
    return theirs, converted


__all__ = ["merge_jamba_experts", "ssm_hf_to_transformers", "transformers_config", "transformers_to_ssm_hf"]
