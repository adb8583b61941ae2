"""The model's state as a first-class object: a cache that counts its tokens, snapshots saved to disk and reused,
streaming in chunks.

An SSM remembers the past in a fixed-size state: per layer a conv window and a recurrent state (transformers'
`LinearAttentionLayer`), plus, in hybrids, the keys and values of the attention layers (`DynamicLayer`).

- `StateCache`: the `DynamicCache` every ssm-hf model creates. It also counts the tokens it has absorbed (one
  update per forward, by the backbone), so that `generate()` can continue from it: transformers reads that count
  through `get_seq_length()` to slice the cached prefix off `input_ids`, which a plain cache of linear-attention
  layers cannot answer.
- `snapshot(cache)`: a detached copy (`StateSnapshot`) that can be saved (`save`, safetensors with the model type,
  an architecture hash, the dtype, the layer layout and the token count), loaded for a matching model
  (`load_snapshot`), turned into fresh caches as often as needed (`to_cache`) and forked into a batch (`fork`).
- `stream(model, chunks)`: feeds chunks one after the other through one state, yielding each chunk's output.
- `StateGenerationMixin`: what the causal LMs need so that `generate()` starts from a given cache, and for assisted
  decoding (an ssm-hf model as the main model or as the assistant).

A recurrent state cannot drop its last tokens the way a KV cache does (`crop`), which assisted decoding needs for
the candidate tokens a model rejects. While recording (`StateCache.activate_past_recording()`, which transformers
calls for assisted decoding), a StateCache keeps a rollback point: a copy of the state at the first forward since
the last `crop`, and the embeddings read since. `crop(-n)` puts the state back to that point and reads the kept
inputs but the last n again, in one forward of the model that filled the cache.

Everything here works layer by layer on the layers' tensors (`conv_states` / `recurrent_states` dicts, `keys` /
`values`), so any `LinearAttentionLayer` subclass holding its state in those attributes is covered too.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import GenerationMixin, PreTrainedConfig
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    DynamicCache,
    DynamicLayer,
    LinearAttentionAndFullAttentionLayer,
    LinearAttentionCacheLayerMixin,
)

from .cache_names import CACHE_IS_NAMED_CACHE, CACHE_NAME, pick_cache

SNAPSHOT_FORMAT = "ssm_hf.state/1"

# Config fields that do not change the state a model computes from given weights and tokens: bookkeeping,
# outputs, special token ids, the weight initialisation, and chunk lengths of the scans (exact reformulations).
_STATE_NEUTRAL_FIELDS = frozenset({
    "_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "use_cache",
    "output_hidden_states", "output_attentions", "output_router_logits", "return_dict", "chunk_size_feed_forward",
    "id2label", "label2id", "num_labels", "problem_type", "pad_token_id", "bos_token_id", "eos_token_id",
    "initializer_range", "rescale_prenorm_residual", "time_step_min", "time_step_max", "time_step_floor",
    "time_step_init_scheme", "time_step_scale", "router_aux_loss_coef", "attention_dropout", "scan_chunk_size",
    "chunk_size", "mamba2_chunk_size", "tie_word_embeddings",
})


def architecture_fields(config: PreTrainedConfig) -> dict:
    """The config's fields that shape the state (all but `_STATE_NEUTRAL_FIELDS`), JSON-ready."""
    fields = config.to_dict()
    return json.loads(json.dumps({k: v for k, v in sorted(fields.items()) if k not in _STATE_NEUTRAL_FIELDS},
                                 default=str))


def architecture_hash(config: PreTrainedConfig) -> str:
    """A short sha256 of `architecture_fields(config)`: equal for configs whose models have states of one kind."""
    text = json.dumps(architecture_fields(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- the tensors of a cache layer, generically -----------------------------------------------------------------

def _check_layer(layer, index: int) -> None:
    # KV layers with more bookkeeping than keys and values (sliding windows, static or quantized) are left out
    supported = (type(layer) in (DynamicLayer, LinearAttentionAndFullAttentionLayer)
                 or (isinstance(layer, LinearAttentionCacheLayerMixin) and not isinstance(layer, CacheLayerMixin)))
    if not supported:
        raise NotImplementedError(
            f"Cache layer {index} is a {type(layer).__name__}: only full KV layers (DynamicLayer) and recurrent "
            f"layers (LinearAttentionLayer and subclasses) can be snapshotted or forked.")
    for attr in ("conv_states", "recurrent_states"):
        if hasattr(layer, attr) and not isinstance(getattr(layer, attr), dict):
            raise NotImplementedError(f"Cache layer {index} ({type(layer).__name__}) keeps `{attr}` as a "
                                      f"{type(getattr(layer, attr)).__name__}, not a dict of tensors by state index.")


def layer_tensors(layer) -> dict[str, torch.Tensor]:
    """Every tensor a cache layer holds, by name: `conv_states.J`, `recurrent_states.J` (per state index J) and
    `keys`, `values` (attention layers, (batch, kv_heads, tokens, head_dim))."""
    found = {}
    for attr in ("conv_states", "recurrent_states"):
        for idx, tensor in (getattr(layer, attr, None) or {}).items():
            if tensor is not None:
                found[f"{attr}.{idx}"] = tensor
    keys = getattr(layer, "keys", None)
    if isinstance(layer, DynamicLayer) and layer.is_initialized and keys is not None and keys.dim() == 4:
        found["keys"], found["values"] = keys, layer.values
    return found


def _set_layer_tensor(layer, name: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in the place `layer_tensors` names, marking that state as initialised."""
    if name in ("keys", "values"):
        setattr(layer, name, tensor)
        layer.is_initialized = True
        layer.dtype, layer.device = tensor.dtype, tensor.device
        return
    attr, idx = name.rsplit(".", 1)
    idx = int(idx)
    getattr(layer, attr)[idx] = tensor
    if attr == "conv_states":
        layer.is_conv_states_initialized[idx] = True
        layer.conv_kernel_size[idx] = tensor.shape[-1]
        layer.dtype, layer.device = tensor.dtype, tensor.device
    else:
        layer.is_recurrent_states_initialized[idx] = True
        if layer.device is None:
            layer.device = tensor.device


def release_inference_tensors(cache: Cache) -> None:
    """Outside `torch.inference_mode()`, give the cache normal copies of the recurrent states it holds as inference
    tensors, in their place.

    States created under inference_mode (a prefill or `generate()` run inside it, `snapshot.to_cache()` called
    there) are inference tensors, which PyTorch refuses to update in place outside it; the models update their
    states in place (`LinearAttentionLayer.update_*`, the decoding steps). Called at the start of every forward:
    the first one outside inference mode copies such states once, after which they are updated in place as usual;
    a cache without inference tensors (the common case) is left untouched, and inside inference mode nothing is
    done (in-place updates of any tensor are allowed there). Keys and values of attention layers grow by
    concatenation, which reads inference tensors without trouble: they are left as they are."""
    if torch.is_inference_mode_enabled():
        return
    for layer in cache.layers:
        for attr in ("conv_states", "recurrent_states"):
            states = getattr(layer, attr, None)
            if not isinstance(states, dict):
                continue
            for idx, tensor in states.items():
                if tensor is not None and tensor.is_inference():
                    states[idx] = tensor.clone()


def map_cache_tensors(cache: Cache, fn, keep_addresses: bool = False) -> None:
    """Replace every state tensor t of `cache` by fn(t) (e.g. to repeat or select batch rows).

    With `keep_addresses`, a result of t's shape, dtype and device is copied into t instead, so the tensor keeps its
    storage: CUDA graphs captured on the cache's tensors (`ssm_hf.models.graphs`) stay valid."""
    for index, layer in enumerate(cache.layers):
        _check_layer(layer, index)
        for name, tensor in layer_tensors(layer).items():
            result = fn(tensor)
            # an inference tensor (see `release_inference_tensors`) can only be written inside inference_mode
            writable = torch.is_inference_mode_enabled() or not tensor.is_inference()
            if (keep_addresses and writable and result.shape == tensor.shape and result.dtype == tensor.dtype
                    and result.device == tensor.device):
                tensor.copy_(result)  # fn's result is a new tensor (indexing copies), so nothing aliases here
            else:
                _set_layer_tensor(layer, name, result)


def cache_batch_size(cache: Cache) -> int | None:
    """The batch size of the states a cache holds, or None while it holds none."""
    for layer in cache.layers:
        for tensor in layer_tensors(layer).values():
            if tensor.dim() > 1:
                return tensor.shape[0]
    return None


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by the cache's state tensors."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in layer_tensors(layer).values())


def _kv_length(cache: Cache) -> int | None:
    for layer in cache.layers:
        if "keys" in layer_tensors(layer):
            return layer.keys.shape[-2]
    return None


# --- rolling back ---------------------------------------------------------------------------------------------

class _RollbackPoint:
    """Where a recording StateCache can go back to: per layer, copies of its recurrent states, their
    `has_previous_state` flags and the length of its keys and values (None without any); the token count; and the
    inputs read since, as the backbone saw them (embeddings (batch, n, hidden) and mask columns (batch, n) or
    None, one pair per forward)."""

    def __init__(self, cache: StateCache):
        self.layers = []
        for index, layer in enumerate(cache.layers):
            _check_layer(layer, index)
            states = {(attr, idx): tensor.clone()
                      for attr in ("conv_states", "recurrent_states")
                      for idx, tensor in (getattr(layer, attr, None) or {}).items() if tensor is not None}
            keys = getattr(layer, "keys", None)
            kv = (keys.shape[-2] if isinstance(layer, DynamicLayer) and layer.is_initialized and keys is not None
                  and keys.dim() == 4 else None)
            self.layers.append((states, dict(getattr(layer, "has_previous_state", {})), kv))
        self.seen_tokens = cache.seen_tokens
        self.embeds: list[torch.Tensor] = []
        self.masks: list[torch.Tensor | None] = []

    @property
    def num_tokens(self) -> int:
        return sum(e.shape[1] for e in self.embeds)

    def record(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        length = inputs_embeds.shape[1]
        self.embeds.append(inputs_embeds.detach())
        self.masks.append(None if attention_mask is None else attention_mask[:, -length:].detach())

    def inputs(self, length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The first `length` recorded inputs: embeddings (batch, length, hidden), mask (batch, length) or None
        when every one of them is real."""
        embeds = torch.cat(self.embeds, 1)[:, :length]
        if all(m is None for m in self.masks):
            return embeds, None
        mask = torch.cat([torch.ones(e.shape[:2], dtype=torch.long, device=e.device) if m is None
                          else m.to(device=e.device, dtype=torch.long) for e, m in zip(self.embeds, self.masks)], 1)
        mask = mask[:, :length]
        return embeds, None if bool(mask.all()) else mask

    def restore(self, cache: StateCache) -> None:
        """Put the cache's states back as they were (written into its tensors, which keep their addresses)."""
        release_inference_tensors(cache)
        for layer, (states, flags, kv) in zip(cache.layers, self.layers):
            for attr in ("conv_states", "recurrent_states"):
                live = getattr(layer, attr, None)
                for idx, tensor in (live or {}).items():
                    saved = states.get((attr, idx))
                    if tensor is None:
                        continue
                    if saved is None:
                        tensor.zero_()   # made after this point: no state then (the flag below says so)
                    elif saved.shape == tensor.shape and saved.dtype == tensor.dtype:
                        tensor.copy_(saved)
                    else:
                        live[idx] = saved.clone()
            if flags:
                layer.has_previous_state.update(flags)
            if isinstance(layer, DynamicLayer) and layer.is_initialized and getattr(layer, "keys", None) is not None:
                length = kv or 0
                layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]
        cache.seen_tokens = self.seen_tokens

    def map(self, fn) -> None:
        """Apply a batch operation (see `map_cache_tensors`) to the kept states and inputs too."""
        self.layers = [({key: fn(t) for key, t in states.items()}, flags, kv) for states, flags, kv in self.layers]
        self.embeds = [fn(e) for e in self.embeds]
        self.masks = [None if m is None else fn(m) for m in self.masks]


# --- the cache --------------------------------------------------------------------------------------------------

class StateCache(DynamicCache):
    """A `DynamicCache` (layers from `config.layer_types`) that also knows how many tokens it has absorbed.

    `seen_tokens` counts input positions (padding included, like a KV cache's length) and is advanced once per
    forward by the model's backbone; `get_seq_length()` returns it for recurrent layers (a KV layer answers with its
    own length, which is the same number). `config` and `model_dtype` record the model that filled it, for
    `snapshot`. Made by every ssm-hf model when no cache is passed, and by `StateSnapshot.to_cache()`.

    Its layers start empty and each mixer creates its layer's state from its own inputs (transformers' lazy
    initialisation), so in a model split over devices (`device_map="auto"`) every state lives on its layer's
    device; nothing here allocates on the embeddings' device.

    Rolling back (assisted decoding): after `activate_past_recording()`, the first forward after each `crop` keeps
    a copy of the state and every forward keeps its input embeddings (the backbone calls `record_inputs`);
    `crop(-n)` restores the copy and feeds the kept inputs but the last n to the backbone again, so the state is
    the one after all but the last n tokens read since that point; `crop(0)` accepts them (the copy is dropped).
    Recorded forwards run eagerly (`is_compileable` is False), and `stop_recording()` ends it.
    """

    def __init__(self, config: PreTrainedConfig | None = None):
        super().__init__(config=config)
        self.config = config
        self.seen_tokens = 0
        self.model_dtype: torch.dtype | None = None
        # the captured decoding steps (ssm_hf.models.graphs) that decoded this cache, by key, each with its count of
        # replays here (`DecodeGraphUse`); the steps themselves are kept by the model, held weakly here
        self.decode_graphs: dict = {}
        # rolling back (see the class docstring): whether forwards are recorded, the point `crop` goes back to,
        # and the backbone that reads the kept inputs again (held weakly: a kept cache must not pin the model)
        self.recording = False
        self._rollback: _RollbackPoint | None = None
        self._backbone: weakref.ref | None = None

    def __getstate__(self) -> dict:
        # copies (copy.deepcopy, pickle) get their own state tensors and no record of graphs; the backbone
        # reference (a weakref) cannot be pickled: a copy rolls back once a forward has run on it
        state = dict(self.__dict__)
        state["decode_graphs"] = {}
        state["_backbone"] = None
        return state

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx < len(self.layers) and isinstance(self.layers[layer_idx], DynamicLayer):
            return self.layers[layer_idx].get_seq_length()
        return self.seen_tokens

    def advance(self, num_tokens: int) -> None:
        """Count `num_tokens` more input positions (called by the backbone after each forward)."""
        self.seen_tokens += num_tokens

    def bind(self, config: PreTrainedConfig, dtype: torch.dtype) -> None:
        """Record the model that uses this cache; a cache filled by a model of another dtype is refused."""
        if self.model_dtype is not None and self.model_dtype != dtype:
            raise ValueError(f"This cache holds the state of a {_dtype_name(self.model_dtype)} model; the model "
                             f"it was passed to is {_dtype_name(dtype)}: convert the model, or rebuild the state.")
        if self.config is None:
            self.config = config
        self.model_dtype = dtype

    @property
    def is_compileable(self) -> bool:
        """True when every layer is recurrent (a fixed-size state updated in place), False with KV layers.

        For a compileable cache on CUDA, generate() runs its decoding steps through `get_compiled_call`, which our
        models answer with CUDA graphs (`StateGenerationMixin.get_compiled_call`), and prepares masks through
        `create_masks_for_generate`, which our models answer with the 2D padding mask they take. False while
        recording (a replay would skip the recording)."""
        return (not self.recording and len(self.layers) > 0
                and all(getattr(layer, "is_compileable", False) for layer in self.layers))

    @property
    def nbytes(self) -> int:
        """Bytes held by the state tensors (constant over a stream for pure SSMs; KV layers grow)."""
        return cache_nbytes(self)

    def reset(self) -> None:
        release_inference_tensors(self)   # the layers zero their states in place
        super().reset()
        self.seen_tokens = 0
        self._rollback = None

    # -- rolling back ----------------------------------------------------------------------------------------

    def activate_past_recording(self) -> None:
        """Record the forwards from now on so that `crop(-n)` can take back their last n tokens (transformers
        calls this for assisted decoding). The layers' own `record_past` (keeping every conv input) is not used:
        the whole state is restored instead."""
        self.recording = True

    @property
    def is_croppable(self) -> bool:
        """Whether `crop` can take tokens back now: while recording. transformers >= 5.24's assisted decoding asks
        after it turned recording on; its deferred stop check (MPS) asks before, and would turn recording on and
        leave it on in the returned cache (every later forward kept its inputs) if this said yes then."""
        return self.recording

    def stop_recording(self) -> None:
        """Stop recording and accept what was read (the kept copy and inputs are dropped)."""
        self.recording = False
        self._rollback = None

    def record_inputs(self, backbone: torch.nn.Module, inputs_embeds: torch.Tensor,
                      attention_mask: torch.Tensor | None) -> None:
        """Called by the backbone before its layers run, while recording: keep a copy of the state at the first
        forward since the last crop, and the inputs (batch, n, hidden) of every forward."""
        if not self.recording:
            return
        if self._rollback is None:
            self._rollback = _RollbackPoint(self)
        self._rollback.record(inputs_embeds, attention_mask)
        self._backbone = weakref.ref(backbone)

    def crop(self, tokens_to_remove: int) -> None:
        """Take back the last -tokens_to_remove tokens read (transformers' convention: a negative count), which
        needs recording (`activate_past_recording`) since before they were read; crop(0) accepts every token
        read so far. The state is restored to the copy kept at the first forward since the last crop, and the
        inputs read since, minus the removed ones, are fed to the backbone again (no autograd)."""
        if tokens_to_remove > 0:
            raise ValueError(f"StateCache.crop takes the number of tokens to remove as a negative number (as "
                             f"transformers' caches do), got {tokens_to_remove}.")
        remove = -tokens_to_remove
        point = self._rollback
        if remove == 0:
            self._rollback = None
            return
        if not self.recording:
            raise RuntimeError(
                "A recurrent state cannot drop its last tokens: call cache.activate_past_recording() before the "
                "forwards to take back (generate() does so for assisted decoding), so that crop can restore it.")
        recorded = point.num_tokens if point is not None else 0
        if remove > recorded:
            raise RuntimeError(f"crop({tokens_to_remove}): this cache can take back at most {recorded} tokens, "
                               f"those read since the last crop (or since recording started).")
        backbone = self._backbone() if self._backbone is not None else None
        if backbone is None and remove < recorded:
            raise RuntimeError("The model that filled this cache is gone (or the cache is a copy): crop needs it to "
                               "read the kept tokens again.")
        embeds, mask = point.inputs(recorded - remove)
        if remove < recorded and mask is not None and any(kv for _, _, kv in point.layers):
            raise NotImplementedError("Rolling back padded inputs of a model with attention layers after a prefix "
                                      "is not supported (their mask would have to cover the earlier tokens).")
        point.restore(self)
        self._rollback = None
        if remove == recorded:
            return
        self.recording = False   # the replay is not recorded: the next forward takes a new rollback point
        try:
            with torch.no_grad():
                backbone(inputs_embeds=embeds, attention_mask=mask, cache=self, use_cache=True)
        finally:
            self.recording = True

    def _map_rows(self, fn) -> None:
        map_cache_tensors(self, fn, keep_addresses=True)
        if self._rollback is not None:
            self._rollback.map(fn)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row `repeats` times along the batch (row i becomes rows i*repeats ... i*repeats+repeats-1)."""
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the batch rows `indices` (in place when as many rows are kept as there are)."""
        self._map_rows(lambda t: t[indices.to(t.device)])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row i becomes row beam_idx[i] (beam search, every step), written into the same tensors."""
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))


def as_state_cache(cache: Cache) -> StateCache:
    """`cache` itself if it is a StateCache; a plain DynamicCache is wrapped (sharing its layers, so it is still
    updated in place) when its token count is known: empty, or holding keys and values. A pure recurrent
    DynamicCache that already holds a state cannot say how many tokens it has seen, and is refused."""
    if isinstance(cache, StateCache):
        return cache
    if type(cache) is not DynamicCache or cache.offloading:
        raise ValueError(f"A {type(cache).__name__} cannot carry an ssm-hf model's state: pass an ssm_hf.StateCache "
                         f"(what the models return), a DynamicCache(config=model.config), or snapshot.to_cache().")
    seen = _kv_length(cache)
    if seen is None:
        if any(layer_tensors(layer) for layer in cache.layers):
            raise ValueError(
                "This DynamicCache holds a recurrent state but does not count the tokens it has seen, which "
                "generate() needs: continue from the cache the model returned (an ssm_hf.StateCache), or from "
                "ssm_hf.snapshot(cache, model, num_tokens=...).to_cache().")
        seen = 0
    wrapped = StateCache()
    wrapped.layers, wrapped.layer_class_to_replicate = cache.layers, cache.layer_class_to_replicate
    wrapped.seen_tokens = seen
    return wrapped


# --- snapshots --------------------------------------------------------------------------------------------------

class StateSnapshot:
    """A detached copy of a model's state after some tokens: what `snapshot(cache)` returns.

    `tensors` maps `layers.I.NAME` (NAME as in `layer_tensors`) to a tensor (batch first); `has_previous_state[I]`
    holds the recurrent layers' flags; `layer_classes[I]` names each layer's cache class. `num_tokens` is the count
    of input positions absorbed, `dtype` the model's dtype (states keep their own: recurrent states may be float32
    in a bf16 model), `config` the model's config. A snapshot is never changed by using it: `to_cache()` copies.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], layer_classes: list[str],
                 has_previous_state: list[dict[int, bool]], config: PreTrainedConfig, dtype: torch.dtype,
                 num_tokens: int):
        self.tensors = tensors
        self.layer_classes = layer_classes
        self.has_previous_state = has_previous_state
        self.config = config
        self.dtype = dtype
        self.num_tokens = num_tokens

    @property
    def batch_size(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def __repr__(self) -> str:
        return (f"StateSnapshot({self.config.model_type}, {len(self.layer_classes)} layers, batch {self.batch_size}, "
                f"{self.num_tokens} tokens, {_dtype_name(self.dtype)}, {self.nbytes / 2**20:.2f} MiB)")

    def to_cache(self, device: torch.device | str | None = None) -> StateCache:
        """A new StateCache holding a copy of this state (on `device`, default: where the snapshot is), ready to
        be passed to the model or to `generate()`, which advance it in place; the snapshot stays as it is."""
        cache = StateCache(config=self.config)
        classes = [type(layer).__name__ for layer in cache.layers]
        if classes != self.layer_classes:
            raise ValueError(f"The snapshot's layers are {self.layer_classes}, a cache for its config has {classes}.")
        for key, tensor in self.tensors.items():
            index, name = _split_key(key)
            _set_layer_tensor(cache.layers[index], name, tensor.to(device=device, copy=True))
        for layer, flags in zip(cache.layers, self.has_previous_state):
            if flags:
                layer.has_previous_state.update(flags)
        cache.seen_tokens, cache.model_dtype = self.num_tokens, self.dtype
        return cache

    def fork(self, n: int) -> StateSnapshot:
        """A snapshot of n copies of each row (row i becomes rows i*n ... i*n+n-1, as generate() expands a batch
        for `num_return_sequences`), e.g. to sample n continuations of one prompt without reading it again."""
        if n < 1:
            raise ValueError(f"fork(n) needs n >= 1, got {n}.")
        return self._with({k: t.repeat_interleave(n, dim=0) for k, t in self.tensors.items()})

    def to(self, device: torch.device | str) -> StateSnapshot:
        """The snapshot with its tensors on `device`."""
        return self._with({k: t.to(device) for k, t in self.tensors.items()})

    def _with(self, tensors: dict[str, torch.Tensor]) -> StateSnapshot:
        return StateSnapshot(tensors, list(self.layer_classes), [dict(f) for f in self.has_previous_state],
                             self.config, self.dtype, self.num_tokens)

    def metadata(self) -> dict[str, str]:
        """What `save` records beside the tensors (all strings, as safetensors requires)."""
        return {
            "format": SNAPSHOT_FORMAT,
            "model_type": self.config.model_type,
            "architecture_hash": architecture_hash(self.config),
            "architecture": json.dumps(architecture_fields(self.config), sort_keys=True),
            "dtype": _dtype_name(self.dtype),
            "layer_classes": json.dumps(self.layer_classes),
            "has_previous_state": json.dumps([{str(k): v for k, v in f.items()} for f in self.has_previous_state]),
            "batch_size": str(self.batch_size),
            "num_tokens": str(self.num_tokens),
            "name_or_path": str(getattr(self.config, "_name_or_path", "")),
            "ssm_hf_version": _library_version(),
        }

    def save(self, path: str | Path) -> None:
        """Write the snapshot to one safetensors file (tensors on CPU, bit for bit) with `metadata()`."""
        tensors = {k: t.detach().to("cpu").contiguous() for k, t in self.tensors.items()}
        save_file(tensors, str(path), metadata=self.metadata())


def snapshot(cache: Cache, model: torch.nn.Module | None = None, num_tokens: int | None = None) -> StateSnapshot:
    """A detached copy of the state in `cache` (a StateCache, or a DynamicCache with `model` given).

    `model` supplies the config and dtype when the cache does not record them; `num_tokens` the token count of a
    plain DynamicCache of recurrent layers only (which does not count). The copy is independent of the cache:
    continuing the cache afterwards leaves the snapshot as it was.
    """
    if not isinstance(cache, Cache):
        raise TypeError(f"snapshot() takes the model's cache (e.g. `out.cache` after a forward with "
                        f"use_cache=True), got {type(cache).__name__}.")
    tensors, classes, flags = {}, [], []
    for index, layer in enumerate(cache.layers):
        _check_layer(layer, index)
        classes.append(type(layer).__name__)
        flags.append(dict(getattr(layer, "has_previous_state", {})))
        for name, tensor in layer_tensors(layer).items():
            tensors[f"layers.{index}.{name}"] = tensor.detach().clone()
    if not tensors:
        raise ValueError("The cache holds no state yet: run the model on some tokens with use_cache=True first.")
    recorded = cache if isinstance(cache, StateCache) else None
    config = model.config if model is not None else getattr(recorded, "config", None)
    dtype = model.dtype if model is not None else getattr(recorded, "model_dtype", None)
    if config is None or dtype is None:
        raise ValueError("This cache does not record which model filled it: pass the model, snapshot(cache, model).")
    if recorded is not None and recorded.model_dtype not in (None, dtype):
        raise ValueError(f"The cache holds the state of a {_dtype_name(recorded.model_dtype)} model, but the model "
                         f"passed is {_dtype_name(dtype)}.")
    if num_tokens is None:
        num_tokens = recorded.seen_tokens if recorded is not None else _kv_length(cache)
        if num_tokens is None:
            raise ValueError("A plain DynamicCache of recurrent layers does not count its tokens: pass num_tokens=, "
                             "or use the cache the model returns (an ssm_hf.StateCache).")
    return StateSnapshot(tensors, classes, flags, config, dtype, num_tokens)


def load_snapshot(path: str | Path, model: torch.nn.Module,
                  device: torch.device | str | None = None) -> StateSnapshot:
    """Read a snapshot saved by `StateSnapshot.save` for use with `model` (tensors on `device`, default the
    model's). Raises a ValueError naming what differs when the file was made by a model of another type,
    architecture (config fields that shape the state) or dtype."""
    with safe_open(str(path), framework="pt", device=str(device or model.device)) as f:
        meta = f.metadata() or {}
        if meta.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"{path} is not an ssm-hf state snapshot (format {meta.get('format')!r}, expected "
                             f"{SNAPSHOT_FORMAT!r}).")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    config = model.config
    if meta["model_type"] != config.model_type:
        raise ValueError(f"The snapshot is of a {meta['model_type']} model; this model is {config.model_type}.")
    if meta["architecture_hash"] != architecture_hash(config):
        theirs, ours = json.loads(meta["architecture"]), architecture_fields(config)
        diffs = [f"{k}: {theirs.get(k, '(absent)')} in the snapshot, {ours.get(k, '(absent)')} in the model"
                 for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
        raise ValueError(f"The snapshot was made by a model of another architecture: {'; '.join(diffs)}.")
    if meta["dtype"] != _dtype_name(model.dtype):
        raise ValueError(f"The snapshot holds the state of a {meta['dtype']} model; this model is "
                         f"{_dtype_name(model.dtype)}: convert the model (model.to(torch.{meta['dtype']})) or take "
                         f"a new snapshot.")
    flags = [{int(k): v for k, v in f.items()} for f in json.loads(meta["has_previous_state"])]
    return StateSnapshot(tensors, json.loads(meta["layer_classes"]), flags, config, model.dtype,
                         int(meta["num_tokens"]))


_KEY = re.compile(r"layers\.(\d+)\.(.+)")


def _split_key(key: str) -> tuple[int, str]:
    match = _KEY.fullmatch(key)
    if match is None:
        raise ValueError(f"Unexpected tensor name {key!r} in a state snapshot.")
    return int(match.group(1)), match.group(2)


def _library_version() -> str:
    # from the installed distribution: importing the package itself here would drag all of it into the flat
    # remote-code export (ssm_hf.remote_code follows relative imports)
    try:
        return importlib.metadata.version("ssm-hf")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- streaming --------------------------------------------------------------------------------------------------

def stream(model: torch.nn.Module, chunks: Iterable, cache: Cache | None = None,
           **forward_kwargs) -> Iterator:
    """Feed `chunks` of token ids through `model` one after the other, carrying one state, and yield each chunk's
    output (`.logits`: (batch, chunk_len, vocab) for a causal LM).

    A chunk is a (batch, n) or (n,) tensor or a list of ids; sizes may differ from chunk to chunk, and the outputs
    are those of one forward over the concatenation (up to float rounding). The state lives in `cache` (a new
    StateCache unless given) and is advanced in place, so memory does not grow with the stream for pure SSMs;
    `snapshot(cache)` copies it at any point. Runs without autograd; `forward_kwargs` go to every forward call
    (e.g. `logits_to_keep=1`).
    """
    if cache is None:
        cache = StateCache(config=model.config)
    for chunk in chunks:
        ids = torch.as_tensor(chunk, dtype=torch.long, device=model.device)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        with torch.no_grad():
            out = model(ids, use_cache=True, **{CACHE_NAME: cache}, **forward_kwargs)
        yield out


# --- generate() -------------------------------------------------------------------------------------------------

class StateGenerationMixin(GenerationMixin):
    """`generate()` for ssm-hf models: the cache is always a StateCache, so generation can start from one.

    Pass the cache as `cache=` (`past_key_values=` and `cache_params=` work too; transformers >= 5.24 renames them
    with a warning) with `input_ids` holding the whole sequence, cached tokens first; the cached prefix is sliced
    off (or pass only the new ids with an `attention_mask` covering the whole sequence). A cache of batch b given
    with `num_return_sequences` / `num_beams` k > 1 is repeated to b*k rows like the inputs. The cache is advanced
    in place: use a fresh `snapshot.to_cache()` per call.

    Assisted decoding (`assistant_model=`, `prompt_lookup_num_tokens=`) works with ssm-hf models as the main model
    and as the assistant: the rejected candidates are taken back from their StateCache (`StateCache.crop`), so
    greedy tokens equal plain greedy decoding of the main model.

    On CUDA, the decoding steps of pure SSM models (`_supports_graphed_decoding`) replay a CUDA graph
    (`ssm_hf.models.graphs`): transformers asks `get_compiled_call` for them when the cache is compileable. The
    model keeps the graphs it captured for its later calls (`decode_graphs_kept` of them), each call's cache lending
    them its state while it decodes. `generate(..., disable_compile=True)` or SSM_HF_NO_CUDA_GRAPHS=1 keeps them
    eager.
    """

    # Which models may replay their decoding steps from graphs: the pure SSM causal LMs set it (a hybrid's attention
    # layers grow a KV cache, and its MoE routing is data-dependent).
    _supports_graphed_decoding = False
    # A capture strategy from ssm_hf.models.graphs set on a model (e.g. `TracedReplay()`, which replays like a graph)
    # runs the graphed path on any device, for tests and debugging; None: CUDA graphs, on CUDA only.
    decode_capture = None
    # How many captured decoding steps (batch sizes, modes) the model keeps for later generate() calls, least
    # recently used released first; 0: none (every call captures anew). None: graphs.DEFAULT_KEPT.
    decode_graphs_kept = None

    def generate(self, *args, **kwargs):
        """transformers' `generate()`. The graphed decoding steps it uses (`get_compiled_call`) are released when
        it returns: the cache holds its own state tensors again, and the captured steps stay with the model for
        later calls (`ssm_hf.models.graphs`)."""
        from .graphs import decoding_call

        with decoding_call():
            return super().generate(*args, **kwargs)

    def create_masks_for_generate(self, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
        """The mask generate() hands the model when the cache is compileable: our models take the 2D padding mask
        as it is (transformers' version would build a dict of masks per layer type)."""
        return attention_mask

    def _valid_auto_compile_criteria(self, model_kwargs: dict, generation_config) -> bool:
        if super()._valid_auto_compile_criteria(model_kwargs, generation_config):
            return True
        # transformers takes the faster decoding call on accelerators only; a capture strategy set on the model
        # takes it anywhere, with the same switch (disable_compile) and the same need for a compileable cache
        cache = model_kwargs.get(CACHE_NAME)
        return (self.decode_capture is not None and not generation_config.disable_compile
                and isinstance(cache, Cache) and cache.is_compileable)

    def get_compiled_call(self, compile_config=None):
        """The call generate() uses for its decoding steps: a `GraphedDecodeStep` for pure SSM models on CUDA,
        the plain eager call otherwise (`compile_config` is not used: graphs replace torch.compile here)."""
        from .graphs import GraphedDecodeStep, decode_capture_for

        capture = decode_capture_for(self)
        return self.__call__ if capture is None else GraphedDecodeStep(self, capture)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, generation_mode, batch_size: int,
                                      max_cache_length: int, *args, **kwargs) -> None:
        # Replaces transformers' version, which makes a plain DynamicCache (unable to count recurrent tokens) and,
        # before 5.24, files a given cache under `cache_params` for classes named like Mamba, where its prefill
        # never looks.
        cache = pick_cache(*(model_kwargs.pop(name, None) for name in ("cache", "cache_params", "past_key_values")))
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(f"cache_implementation={generation_config.cache_implementation!r} is not supported by "
                             f"ssm-hf models: their state is a fixed-size ssm_hf.StateCache.")
        if cache is not None:
            cache = as_state_cache(cache)
            expand = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
            if expand > 1 and cache_batch_size(cache) == batch_size:
                cache.batch_repeat_interleave(expand)
            # as transformers marks a cache the caller passed: it outlives generate(), so a stop check that runs one
            # step late (transformers' deferred check on MPS) must not leave that step in it
            cache._is_user_defined = True
        elif generation_config.use_cache is not False:
            cache = StateCache(config=self.config)
        if cache is not None:
            if generation_config.is_assistant:
                # an assistant's candidates are taken back (crop) when the main model rejects them; its cache is
                # handed back to it round after round, recording throughout
                cache.activate_past_recording()
            elif cache.recording:
                cache.stop_recording()   # left recording by an earlier call; assisted decoding turns it on again
            # under this name for every class: transformers' prefill reads it there to slice off the cached prefix
            model_kwargs[CACHE_NAME] = cache

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, next_sequence_length: int | None = None,
                                      attention_mask: torch.Tensor | None = None,
                                      inputs_embeds: torch.Tensor | None = None, is_first_iteration: bool = False,
                                      **kwargs) -> dict:
        # transformers' assisted decoding feeds the whole sequence in its first step even when the cache already
        # holds a prefix of it (`_prefill` slices it off in the other decoding modes): slice it off the same way,
        # when the mask covers the whole sequence as it does there
        cache = kwargs.get(CACHE_NAME)
        if (is_first_iteration and next_sequence_length is None and inputs_embeds is None
                and isinstance(cache, Cache) and attention_mask is not None
                and attention_mask.shape[1] == input_ids.shape[1]):
            past = cache.get_seq_length()
            if 0 < past < input_ids.shape[1]:
                next_sequence_length = input_ids.shape[1] - past
        return super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs)

    def _read_all_but_the_last_token(self, input_ids: torch.Tensor, model_kwargs: dict, mask_length: int) -> None:
        """Before a forward that a rollback may follow (assisted decoding), read the part of `input_ids` (batch 1)
        that the cache does not hold yet, but its last token, without recording it: a rollback then reads again
        at most the last token and the accepted candidates, never the prompt. Only when input_ids is the whole
        sequence, which the mask's length tells (`mask_length` when generate() dropped an all-ones mask)."""
        cache, mask = model_kwargs.get(CACHE_NAME), model_kwargs.get("attention_mask")
        if (not isinstance(cache, StateCache) or cache._rollback is not None or input_ids.shape[0] != 1
                or model_kwargs.get("inputs_embeds") is not None
                or (mask.shape[1] if mask is not None else mask_length) != input_ids.shape[1]):
            return
        past = cache.get_seq_length()
        if input_ids.shape[1] - past <= 1:
            return
        recording, cache.recording = cache.recording, False
        try:
            with torch.no_grad():
                self(input_ids=input_ids[:, past:-1], attention_mask=None if mask is None else mask[:, :-1],
                     cache=cache, use_cache=True, logits_to_keep=1)
        finally:
            cache.recording = recording

    def _assisted_decoding(self, input_ids: torch.Tensor, *args, **kwargs):
        # The main model of assisted decoding: its first step would read the prompt and the first candidates
        # together, and a rejected candidate would roll the state back to before the prompt; reading the prompt
        # first keeps the rollbacks short. (Not when hidden states or attentions are returned: transformers
        # expects the first step's to cover the whole prompt.)
        if kwargs.get("attention_mask") is None and kwargs.get("inputs_embeds") is None:
            # all real; a mask tells that input_ids is the whole sequence, of which the cache may hold a prefix
            # (`prepare_inputs_for_generation`), to the main model and to the assistant
            kwargs["attention_mask"] = torch.ones_like(input_ids)
        config = kwargs.get("generation_config")
        if config is None or not (config.output_hidden_states or config.output_attentions):
            self._read_all_but_the_last_token(input_ids, kwargs, input_ids.shape[1])
        # transformers turns recording on for the main model's cache (to take back rejected candidates) and leaves
        # it on; the cache may be returned and continued, so recording ends with the call
        cache = kwargs.get(CACHE_NAME)
        try:
            return super()._assisted_decoding(input_ids, *args, **kwargs)
        finally:
            if isinstance(cache, StateCache):
                cache.stop_recording()

    def _prefill(self, input_ids: torch.Tensor, generation_config, model_kwargs: dict, *args, **kwargs):
        if generation_config.is_assistant:
            # an assistant's prompt (first call) or last accepted tokens: the rollback point comes before the last
            self._read_all_but_the_last_token(input_ids, model_kwargs, getattr(generation_config, "_mask_length", -1))
        cache = model_kwargs.get(CACHE_NAME)
        past = cache.get_seq_length() if cache is not None else 0
        embeds = model_kwargs.get("inputs_embeds")
        first = kwargs.get("is_first_iteration", args[0] if args else True)
        # transformers >= 5.24 slices the cached prefix off the inputs only for caches with attention layers (its
        # linear-attention layers cannot count tokens; a StateCache does): for the others it is sliced here, as
        # transformers slices it
        slice_here = past > 0 and CACHE_IS_NAMED_CACHE and all(cache.is_linear)
        if past and embeds is not None and first:
            if slice_here:
                model_kwargs["inputs_embeds"] = embeds[:, past:]
        elif past:
            mask = model_kwargs.get("attention_mask")
            mask_length = mask.shape[1] if mask is not None else getattr(generation_config, "_mask_length", -1)
            if mask_length == input_ids.shape[1] and input_ids.shape[1] <= past:
                # transformers would slice off `input_ids.shape[1] - past` <= 0 columns, i.e. feed them all again
                raise ValueError(
                    f"generate() continues from a cache of {past} tokens, but input_ids has only "
                    f"{input_ids.shape[1]} columns: pass the whole sequence (the cached tokens followed by at least "
                    f"one new token); the cached part is sliced off. To continue right after a prompt, snapshot "
                    f"all but its last token and pass the full prompt.")
            if slice_here and mask_length == input_ids.shape[1]:
                input_ids = input_ids[:, past:]
        return super()._prefill(input_ids, generation_config, model_kwargs, *args, **kwargs)
