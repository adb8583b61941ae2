"""Pieces shared by every model family: input checks, cache selection, pooling, strict checkpoint loading."""

from __future__ import annotations

import math
import os
import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, LinearAttentionLayer

from ..kernels.packing import segment_ids, sequence_starts
from ..layers import RMSNorm, RMSNormGated
from ..layers.mlp import Experts, Router
from .state import StateCache, cache_batch_size, release_inference_tensors


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


def check_token_ids(input_ids: torch.Tensor, vocab_size: int, with_cache: bool = False) -> None:
    """Raise a ValueError naming the offending id when `input_ids` has ids outside [0, vocab_size).

    On an accelerator the check reads the ids' range back to the host: a device synchronisation, which makes the
    host wait for all the work queued before it instead of issuing the next step (on an H100, 130M models'
    prefills at 4 x 2048 were faster without it in 18 of 20 alternated pairs, training steps in 14 of 20;
    BENCHMARKS.md, eleventh session). So it runs where that costs nothing: ids on the CPU, and a forward with a
    cache (generation, which reads its tokens back anyway), except single-token steps with it (ids the model
    produced itself). A cache-less forward on an accelerator (training, scoring) leaves bad ids to the
    embedding's own bounds check (on CUDA a device-side assert) unless SSM_HF_CHECK_TOKEN_IDS=1;
    SSM_HF_CHECK_TOKEN_IDS=0 turns the check off everywhere."""
    if torch.compiler.is_compiling() or input_ids.numel() == 0 or (with_cache and input_ids.shape[1] == 1):
        return
    forced = os.environ.get("SSM_HF_CHECK_TOKEN_IDS")
    if forced == "0" or (forced != "1" and input_ids.device.type != "cpu" and not with_cache):
        return
    low, high = torch.stack((input_ids.min(), input_ids.max())).tolist()  # one read-back for both
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"input_ids contains token id {bad}, outside the vocabulary [0, {vocab_size}).")


def cu_seq_lens_of(kwargs: dict) -> torch.Tensor | None:
    """Flash attention's cumulative sequence lengths from a forward's keyword arguments (`cu_seq_lens_q`, else
    `cu_seq_lens_k`), as `DataCollatorWithFlattening(return_flash_attn_kwargs=True)` hands them over, or None."""
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    return cu_seq_lens if cu_seq_lens is not None else kwargs.get("cu_seq_lens_k")


def _seq_idx_from_cu_seq_lens(cu_seq_lens: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """(batch, length) sequence ids from cumulative lengths (n + 1,) over the batch's batch * length tokens taken
    row after row (0, len_1, len_1 + len_2, ..., batch * length), as flash attention reads them."""
    cu_seq_lens = cu_seq_lens.reshape(-1)
    total = batch * length
    if not torch.compiler.is_compiling():
        ok = cu_seq_lens.numel() >= 2 and bool(torch.stack([
            cu_seq_lens[0] == 0, cu_seq_lens[-1] == total, (cu_seq_lens.diff() >= 0).all()]).all())
        if not ok:
            raise ValueError(f"cu_seq_lens_q / cu_seq_lens_k must rise from 0 to the {total} tokens of the input "
                             f"(batch={batch} x {length}); got {cu_seq_lens.tolist()}.")
    tokens = torch.arange(total, device=cu_seq_lens.device)
    # a token's sequence: how many sequence ends lie at or before it
    return torch.searchsorted(cu_seq_lens[1:].contiguous(), tokens, right=True).view(batch, length)


def packed_seq_idx(position_ids: torch.Tensor | None, seq_idx: torch.Tensor | None, batch: int,
                   length: int, cu_seq_lens: torch.Tensor | None = None) -> torch.Tensor | None:
    """The (batch, length) sequence ids of packed rows (several sequences end to end, as transformers'
    `DataCollatorWithFlattening` makes), or None when every row holds one sequence.

    An explicit `seq_idx` (non-decreasing integers along a row) wins; then `cu_seq_lens` (flash attention's
    cumulative sequence lengths, the collator's `return_flash_attn_kwargs`; see `cu_seq_lens_of`); otherwise a
    sequence starts wherever `position_ids` (batch or 1, length) is not the previous position + 1 (positions
    0..n1-1, 0..n2-1, ...). The ids come back as `packing.segment_ids` (0, 1, 2, ... along each row), so that
    every layer reads the same boundaries. Rows without any start give None, so plain positions keep the usual
    path exactly (one host synchronisation; under torch.compile the ids are returned without that check)."""
    if seq_idx is None and cu_seq_lens is not None:
        seq_idx = _seq_idx_from_cu_seq_lens(cu_seq_lens, batch, length)
    if seq_idx is None:
        if position_ids is None or length < 2:
            return None
        position_ids = position_ids.reshape(-1, position_ids.shape[-1])
        if position_ids.shape[-1] != length or position_ids.shape[0] not in (1, batch):
            raise ValueError(f"position_ids must have shape (batch={batch}, {length}) like the input; got "
                             f"{tuple(position_ids.shape)}.")
        seq_idx = F.pad((position_ids.diff(dim=-1) != 1).cumsum(-1), (1, 0)).expand(batch, -1)
    elif seq_idx.shape != (batch, length):
        raise ValueError(f"seq_idx must have shape (batch={batch}, {length}) like the input; got "
                         f"{tuple(seq_idx.shape)}.")
    if torch.compiler.is_compiling():
        # unchecked: attention compares ids for equality, the scans look for changes; segment ids agree on both
        return segment_ids(seq_idx)
    steps = seq_idx.diff(dim=-1)
    starts, decreasing = (bool(v) for v in torch.stack([(steps != 0).any(), (steps < 0).any()]).tolist())
    if decreasing:
        raise ValueError("seq_idx must be non-decreasing along each row (one id per packed sequence, in order).")
    return segment_ids(seq_idx) if starts else None


def mask_sequence_starts(labels: torch.Tensor, seq_idx: torch.Tensor | None, kwargs: dict
                         ) -> tuple[torch.Tensor, dict]:
    """Labels (batch, seqlen) with -100 at the first token of every packed sequence but a row's first, so that the
    loss never asks a sequence's last token to predict the next sequence's first (DataCollatorWithFlattening
    already puts -100 there; labels = input_ids with position_ids or seq_idx would not). A `shift_labels` in
    `kwargs` (labels already shifted by one, as Trainer may pass them) gets the same, one position earlier.
    Returns new tensors (the caller's are left as they are) and the keyword arguments to pass on."""
    if seq_idx is None:
        return labels, kwargs
    starts = sequence_starts(seq_idx)
    if labels.shape == starts.shape:
        labels = labels.masked_fill(starts.to(labels.device), -100)
    shift_labels = kwargs.get("shift_labels")
    if shift_labels is not None and shift_labels.shape == starts.shape:
        kwargs = {**kwargs, "shift_labels": shift_labels.masked_fill(
            F.pad(starts[:, 1:], (0, 1)).to(shift_labels.device), -100)}
    return labels, kwargs


def check_padding_mask(attention_mask: torch.Tensor | None, batch_and_length: tuple[int, int]) -> None:
    """The padding mask must be (batch, n) with n ≥ the input length (it may also cover cached positions)."""
    if attention_mask is None:
        return
    batch, length = batch_and_length
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < length:
        raise ValueError(f"attention_mask must have shape (batch={batch}, n >= {length}) with 1 for real tokens and 0 "
                         f"for padding; got {tuple(attention_mask.shape)}.")


def mixer_padding(
    attention_mask: torch.Tensor | None, length: int, stateless: bool = False,
) -> tuple[torch.Tensor | None, bool]:
    """(padding mask, whether its padding leads) as the SSM mixers take them for an input of `length` tokens.

    The mask is None where its last `length` columns are all ones (generate() passes such a mask with every
    unpadded prompt), so that the mixers run their unpadded paths. It is None too for a `stateless` forward (no
    cache read or written) whose padding trails in every row (a batch padded on the right, as a training collator
    gives it): every mixer is causal, so a real token's output never depends on the padding after it (up to
    rounding: S4's FFT convolution mixes rounding across a row), and only the padded positions' own outputs, which
    nothing reads, differ. The padding leads where in every row it comes before all real tokens (a batch padded on
    the left, as generate() and a tokenizer with padding_side="left" give it): a mixer whose cache holds no state
    yet may then read the padding as zero inputs and identity steps, which gives what skipping it gives, on its
    unpadded path (no masking ops, no packing of the conv's inputs). One host synchronisation per forward that
    passes a mask, where the convs would otherwise check the mask once per layer; none under torch.compile (the
    mask is then passed on as it is)."""
    if attention_mask is None or torch.compiler.is_compiling():
        return attention_mask, False
    tail = attention_mask[:, -length:]
    all_real, leads, trails = torch.stack(
        [tail.all(), (tail[:, 1:] >= tail[:, :-1]).all(), (tail[:, 1:] <= tail[:, :-1]).all()]).tolist()
    if all_real or (stateless and trails):
        return None, False
    return attention_mask, leads


def resolve_cache(
    cache: Cache | None, use_cache: bool | None, config, training: bool, checkpointing: bool, batch_size: int,
) -> Cache | None:
    """The cache a forward pass reads and writes, or None.

    A cache passed in is used (use_cache then defaults to True); without one, a new `StateCache` (a DynamicCache
    that counts its tokens) is made from the config's `layer_types` when `use_cache` (default: config.use_cache
    outside training). An empty `DynamicCache()` gets its layers from the config. Inconsistent requests raise
    instead of being ignored.
    """
    if use_cache is None:
        use_cache = cache is not None or (config.use_cache and not training)
    if not use_cache:
        if cache is not None:
            raise ValueError("A cache was passed with use_cache=False; drop one of the two.")
        return None
    if checkpointing and training:
        if cache is not None:
            raise ValueError(
                "Activation checkpointing replays each block's forward in the backward pass, which would advance "
                "the cache twice: disable checkpointing (or call the model in eval mode) to run with a cache."
            )
        return None  # checkpointed training runs without a cache, as in transformers
    if cache is None:
        return StateCache(config=config)
    if len(cache.layers) == 0:
        cache.layers.extend(DynamicCache(config=config).layers)
        cache.layer_class_to_replicate = None
    unsupported = sorted({type(layer).__name__ for layer in cache.layers
                          if not isinstance(layer, (DynamicLayer, LinearAttentionLayer))})
    if unsupported:
        raise ValueError(f"Cache layers of type {unsupported} are not supported (static and offloaded KV caches are "
                         f"not implemented here): use ssm_hf.StateCache(config=model.config).")
    elif len(cache.layers) != config.num_hidden_layers:
        raise ValueError(f"The cache has {len(cache.layers)} layers, the model {config.num_hidden_layers}: build it "
                         f"with ssm_hf.StateCache(config=model.config).")
    cached_batch = cache_batch_size(cache)
    if cached_batch is not None and cached_batch != batch_size:
        raise ValueError(f"The cache holds states for a batch of {cached_batch}, the input has {batch_size} rows.")
    return cache


def start_backbone(
    model: nn.Module, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None, cache: Cache | None,
    use_cache: bool | None, position_ids: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None,
    cu_seq_lens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Cache | None, torch.Tensor | None]:
    """The checks and set-up every backbone's forward begins with: exactly one of ids or embeddings, packed
    sequences (`packed_seq_idx`; they run without a cache), the cache (`resolve_cache`; a StateCache records the
    model's dtype and refuses another; states it holds as inference tensors are copied outside inference mode,
    `release_inference_tensors`; a recording one keeps what `crop` needs), the padding mask's shape, the token
    ids' range. Returns (inputs_embeds,
    cache, seq_idx or None); the backbone calls `cache.advance(seqlen)` on a StateCache once its layers have run."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
    batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
    seq_idx = packed_seq_idx(position_ids, seq_idx, batch, length, cu_seq_lens)
    if seq_idx is not None:
        # a cache after a packed row would mix sequences (conv inputs and attention keys of all of them)
        if use_cache or cache is not None:
            raise ValueError(
                "Packed sequences (position_ids restarting inside a row, seq_idx or cu_seq_lens_q) run without a "
                "cache: they are for training and cache-free prefill. Drop the cache / use_cache=True, or pass one "
                "sequence per row."
            )
        use_cache = False
    cache = resolve_cache(cache, use_cache, model.config, model.training,
                          model.gradient_checkpointing, batch)
    check_padding_mask(attention_mask, (batch, length))
    if cache is not None:
        release_inference_tensors(cache)   # states filled under inference_mode, continued outside it
    if isinstance(cache, StateCache):
        cache.bind(model.config, model.dtype)
    if inputs_embeds is None:
        check_token_ids(input_ids, model.config.vocab_size, with_cache=cache is not None)
        inputs_embeds = model.get_input_embeddings()(input_ids)
    if isinstance(cache, StateCache) and cache.recording:
        cache.record_inputs(model, inputs_embeds, attention_mask)   # what `crop` rolls back (assisted decoding)
    return inputs_embeds, cache, seq_idx


def real_token_mask(
    input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, pad_token_id: int | None, batch_size: int,
    seqlen: int, device: torch.device,
) -> torch.Tensor:
    """(batch, seqlen) bool, True for real tokens: from `attention_mask` if given, else from `pad_token_id`.
    Without either, a single row is all real; a batch raises (its padding cannot be told apart)."""
    if attention_mask is not None:
        return attention_mask[:, -seqlen:].to(device).bool()
    if input_ids is not None and pad_token_id is not None:
        return input_ids != pad_token_id
    if batch_size != 1:
        raise ValueError(
            "Sequence classification of a batch needs an attention_mask (or input_ids and a pad_token_id in "
            "the config) to find each row's real tokens."
        )
    return torch.ones(batch_size, seqlen, dtype=torch.bool, device=device)


def last_token_indices(
    input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, pad_token_id: int | None, batch_size: int,
    seqlen: int, device: torch.device,
) -> torch.Tensor:
    """Index of the last real token of each row (see `real_token_mask`); works for left and right padding."""
    real = real_token_mask(input_ids, attention_mask, pad_token_id, batch_size, seqlen, device)
    return (torch.arange(seqlen, device=device) * real).argmax(-1)


class StrictLoadingMixin:
    """`from_pretrained` that refuses a checkpoint missing weights of the backbone.

    transformers only warns about missing weights and initialises them at random; for a converted or shared SSM
    checkpoint that silently gives a broken model. A newly added task head (e.g. a classifier `score` on top of a
    causal-LM checkpoint) is the one legitimate gap: a class lists such prefixes in `_new_head_prefixes`.
    Weights of blocks the model does not have (more layers in the checkpoint than in the config) are refused too,
    and mis-shaped tensors are named (transformers only logs them).
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
        # weights the checkpoint has and the model lacks: a head the model doesn't use is fine, a block is not
        # (it means the checkpoint has more layers, or other mixers, than the config)
        unexpected = sorted(key for key in info.get("unexpected_keys", ()) if _BACKBONE_KEY.search(key))
        if unexpected:
            problems.append(f"{len(unexpected)} weight(s) the model has no place for: {_first(unexpected)}")
        if mismatched and not allow_mismatch:
            problems.append("mis-shaped weight(s): " + _first(
                [f"{key} has shape {list(ckpt)} in the checkpoint, the model expects {list(expected)}"
                 for key, ckpt, expected in mismatched]))
        if problems:
            raise ValueError(f"Cannot load {cls.__name__} from this checkpoint: " + "; ".join(problems))
        return (model, info) if want_info else model


_BACKBONE_KEY = re.compile(r"(^|\.)(layers\.\d+|embeddings|norm_f)\.")


def _first(items: list[str], limit: int = 20) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")
