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
- `StateGenerationMixin`: what the causal LMs need so that `generate()` starts from a given cache.

Everything here works layer by layer on the layers' tensors (`conv_states` / `recurrent_states` dicts, `keys` /
`values`), so any `LinearAttentionLayer` subclass holding its state in those attributes is covered too.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
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


def pick_cache(cache_params: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """Models accept the state as `cache_params` (transformers' Mamba name) or `past_key_values`."""
    if cache_params is not None and past_key_values is not None and cache_params is not past_key_values:
        raise ValueError("Pass the cache as either `cache_params` or `past_key_values`, not two different ones.")
    return cache_params if cache_params is not None else past_key_values


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
    """

    def __init__(self, config: PreTrainedConfig | None = None):
        super().__init__(config=config)
        self.config = config
        self.seen_tokens = 0
        self.model_dtype: torch.dtype | None = None
        # captured decoding steps (ssm_hf.models.graphs), by (model, batch size, dtype, device): they live and die
        # with this cache, whose state tensors they were captured on
        self.decode_graphs: dict = {}

    def __getstate__(self) -> dict:
        # copies (copy.deepcopy, pickle) get their own state tensors, which no captured graph refers to
        state = dict(self.__dict__)
        state["decode_graphs"] = {}
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
        `create_masks_for_generate`, which our models answer with the 2D padding mask they take."""
        return len(self.layers) > 0 and all(getattr(layer, "is_compileable", False) for layer in self.layers)

    @property
    def nbytes(self) -> int:
        """Bytes held by the state tensors (constant over a stream for pure SSMs; KV layers grow)."""
        return cache_nbytes(self)

    def reset(self) -> None:
        release_inference_tensors(self)   # the layers zero their states in place
        super().reset()
        self.seen_tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.seen_tokens -= abs(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row `repeats` times along the batch (row i becomes rows i*repeats ... i*repeats+repeats-1)."""
        map_cache_tensors(self, lambda t: t.repeat_interleave(repeats, dim=0), keep_addresses=True)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the batch rows `indices` (in place when as many rows are kept as there are)."""
        map_cache_tensors(self, lambda t: t[indices.to(t.device)], keep_addresses=True)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row i becomes row beam_idx[i] (beam search, every step), written into the same tensors."""
        map_cache_tensors(self, lambda t: t.index_select(0, beam_idx.to(t.device)), keep_addresses=True)


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
        raise TypeError(f"snapshot() takes the model's cache (e.g. `out.cache_params` or `out.past_key_values` "
                        f"after a forward with use_cache=True), got {type(cache).__name__}.")
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
            out = model(ids, past_key_values=cache, use_cache=True, **forward_kwargs)
        yield out


# --- generate() -------------------------------------------------------------------------------------------------

class StateGenerationMixin(GenerationMixin):
    """`generate()` for ssm-hf models: the cache is always a StateCache, so generation can start from one.

    Pass the cache as `past_key_values=` (or `cache_params=`) with `input_ids` holding the whole sequence, cached
    tokens first; transformers slices the cached prefix off (or pass only the new ids with an `attention_mask`
    covering the whole sequence). A cache of batch b given with `num_return_sequences` / `num_beams` k > 1 is
    repeated to b*k rows like the inputs. The cache is advanced in place: use a fresh `snapshot.to_cache()` per call.

    On CUDA, the decoding steps of pure SSM models (`_supports_graphed_decoding`) replay a CUDA graph
    (`ssm_hf.models.graphs`): transformers asks `get_compiled_call` for them when the cache is compileable.
    `generate(..., disable_compile=True)` or SSM_HF_NO_CUDA_GRAPHS=1 keeps them eager.
    """

    # Which models may replay their decoding steps from graphs: the pure SSM causal LMs set it (a hybrid's attention
    # layers grow a KV cache, and its MoE routing is data-dependent).
    _supports_graphed_decoding = False
    # A capture strategy from ssm_hf.models.graphs set on a model (e.g. `TracedReplay()`, which replays like a graph)
    # runs the graphed path on any device, for tests and debugging; None: CUDA graphs, on CUDA only.
    decode_capture = None

    def create_masks_for_generate(self, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
        """The mask generate() hands the model when the cache is compileable: our models take the 2D padding mask
        as it is (transformers' version would build a dict of masks per layer type)."""
        return attention_mask

    def _valid_auto_compile_criteria(self, model_kwargs: dict, generation_config) -> bool:
        if super()._valid_auto_compile_criteria(model_kwargs, generation_config):
            return True
        # transformers takes the faster decoding call on accelerators only; a capture strategy set on the model
        # takes it anywhere, with the same switch (disable_compile) and the same need for a compileable cache
        cache = model_kwargs.get("past_key_values")
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
        # Replaces transformers' version, which makes a plain DynamicCache (unable to count recurrent tokens) and
        # files a given cache under `cache_params` for classes named like Mamba, where its prefill never looks.
        cache = pick_cache(model_kwargs.pop("cache_params", None), model_kwargs.pop("past_key_values", None))
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(f"cache_implementation={generation_config.cache_implementation!r} is not supported by "
                             f"ssm-hf models: their state is a fixed-size ssm_hf.StateCache.")
        if cache is not None:
            cache = as_state_cache(cache)
            expand = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
            if expand > 1 and cache_batch_size(cache) == batch_size:
                cache.batch_repeat_interleave(expand)
        elif generation_config.use_cache is not False:
            cache = StateCache(config=self.config)
        if cache is not None:
            # under this name for every class: transformers' prefill reads it there to slice off the cached prefix
            model_kwargs["past_key_values"] = cache

    def _prefill(self, input_ids: torch.Tensor, generation_config, model_kwargs: dict, *args, **kwargs):
        cache = model_kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        if past and model_kwargs.get("inputs_embeds") is None:
            mask = model_kwargs.get("attention_mask")
            mask_length = mask.shape[1] if mask is not None else getattr(generation_config, "_mask_length", -1)
            if mask_length == input_ids.shape[1] and input_ids.shape[1] <= past:
                # transformers would slice off `input_ids.shape[1] - past` <= 0 columns, i.e. feed them all again
                raise ValueError(
                    f"generate() continues from a cache of {past} tokens, but input_ids has only "
                    f"{input_ids.shape[1]} columns: pass the whole sequence (the cached tokens followed by at least "
                    f"one new token); the cached part is sliced off. To continue right after a prompt, snapshot "
                    f"all but its last token and pass the full prompt.")
        return super()._prefill(input_ids, generation_config, model_kwargs, *args, **kwargs)
