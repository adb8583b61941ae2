"""Pieces shared by every model family: input checks, cache selection, pooling, strict checkpoint loading."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache

from ..layers import RMSNorm, RMSNormGated
from ..layers.mlp import Experts, Router


@torch.no_grad()
def init_module_weights(module: nn.Module, initializer_range: float, rescale_out_proj_layers: int | None) -> None:
    """The weight init of every model here, one module at a time (transformers applies it children first).

    SSM mixers (modules with `init_ssm_weights`) get their A, D and Δ init, Kaiming-uniform conv and output
    projection, the latter divided by sqrt(rescale_out_proj_layers) if given (GPT-2's depth scaling); other
    linear, embedding and expert weights are normal(0, initializer_range); norms start at 1.
    """
    if hasattr(module, "init_ssm_weights"):
        module.init_ssm_weights()
        init.kaiming_uniform_(module.conv1d.weight, a=math.sqrt(5))
        if module.conv1d.bias is not None:
            init.zeros_(module.conv1d.bias)
        init.kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))
        if rescale_out_proj_layers:
            init.copy_(module.out_proj.weight, module.out_proj.weight / math.sqrt(rescale_out_proj_layers))
    elif isinstance(module, nn.Linear):
        init.normal_(module.weight, std=initializer_range)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        init.normal_(module.weight, std=initializer_range)
    elif isinstance(module, (RMSNorm, RMSNormGated)):
        init.ones_(module.weight)
    elif isinstance(module, Router):
        init.normal_(module.weight, std=initializer_range)
    elif isinstance(module, Experts):
        init.normal_(module.gate_up_proj, std=initializer_range)
        init.normal_(module.down_proj, std=initializer_range)


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Raise a ValueError naming the offending id when `input_ids` has ids outside [0, vocab_size)."""
    if torch.compiler.is_compiling() or input_ids.numel() == 0:
        return
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"input_ids contains token id {bad}, outside the vocabulary [0, {vocab_size}).")


def pick_cache(cache_params: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """Models accept the state as `cache_params` (transformers' Mamba name) or `past_key_values`."""
    if cache_params is not None and past_key_values is not None and cache_params is not past_key_values:
        raise ValueError("Pass the cache as either `cache_params` or `past_key_values`, not two different ones.")
    return cache_params if cache_params is not None else past_key_values


def last_token_indices(
    input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, pad_token_id: int | None, batch_size: int,
    seqlen: int, device: torch.device,
) -> torch.Tensor:
    """Index of the last real token of each row: from `attention_mask` if given, else from `pad_token_id`;
    works for left and right padding. Without either, the last position."""
    positions = torch.arange(seqlen, device=device)
    if attention_mask is not None:
        real = attention_mask.to(device).bool()
    elif input_ids is not None and pad_token_id is not None:
        real = input_ids != pad_token_id
    else:
        if batch_size != 1:
            raise ValueError(
                "Sequence classification of a batch needs an attention_mask or a pad_token_id in the config "
                "to find each row's last token."
            )
        return torch.full((batch_size,), seqlen - 1, device=device, dtype=torch.long)
    return (positions * real).argmax(-1)


class StrictLoadingMixin:
    """`from_pretrained` that refuses a checkpoint missing weights of the backbone.

    transformers only warns about missing weights and initialises them at random; for a converted or shared SSM
    checkpoint that silently gives a broken model. A newly added task head (e.g. a classifier `score` on top of a
    causal-LM checkpoint) is the one legitimate gap: a class lists such prefixes in `_new_head_prefixes`.
    Mis-shaped tensors already raise in transformers (unless `ignore_mismatched_sizes=True`).
    """

    _new_head_prefixes: tuple[str, ...] = ()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        allow_mismatch = kwargs.pop("ignore_mismatched_sizes", False)
        # transformers names mis-shaped tensors only in a log; load with them allowed, then raise naming them.
        model, info = PreTrainedModel.from_pretrained.__func__(
            cls, *args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
        problems = []
        missing = sorted(key for key in info.get("missing_keys", ()) if not key.startswith(cls._new_head_prefixes))
        if missing:
            problems.append(f"missing {len(missing)} weight(s): {_first(missing)}")
        mismatched = sorted(
            (key, tuple(ckpt), tuple(expected)) for key, ckpt, expected in info.get("mismatched_keys", ())
            if not key.startswith(cls._new_head_prefixes)
        )
        if mismatched and not allow_mismatch:
            problems.append("mis-shaped weight(s): " + _first(
                [f"{key} has shape {list(ckpt)} in the checkpoint, the model expects {list(expected)}"
                 for key, ckpt, expected in mismatched]))
        if problems:
            raise ValueError(f"Cannot load {cls.__name__} from this checkpoint: " + "; ".join(problems))
        return (model, info) if want_info else model


def _first(items: list[str], limit: int = 20) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")
