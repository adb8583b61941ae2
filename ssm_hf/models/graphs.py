"""Decoding steps replayed from CUDA graphs inside `generate()`, for pure SSM models (Mamba, Mamba-2, S4).

A pure SSM decodes one token with a fixed amount of work on a fixed-size state, but that work is dozens of small
kernels per layer: at small batches the launches and the Python around them cost more than the kernels. So the
one-token forward is captured once in a `torch.cuda.CUDAGraph` and replayed for every later token.

transformers' `generate()` already asks the model for "a faster call for the decoding steps": when the cache is
compileable (`StateCache.is_compileable`: every layer recurrent) and the model is on CUDA, `_sample` runs the
decoding steps through `model.get_compiled_call(...)` (the prefill stays eager). `StateGenerationMixin` answers
that call with a `GraphedDecodeStep` instead of `torch.compile`. Turned off by `generate(..., disable_compile=True)`
(transformers' own switch) or the environment variable `SSM_HF_NO_CUDA_GRAPHS=1`.

How it stays correct. A graph is a recording of kernels on fixed addresses: a replay runs no Python (no module
code, hooks or flags), reads the weights and state at the addresses they had at capture, and redoes whatever
precision and mode choices were made then. So:

- the state: a captured step (`CapturedDecodeStep`) owns static buffers: the token ids, the logits and a state
  (a private copy of the first cache's layers, on which it was captured, so capturing changes nothing in the
  caller's cache). The decoding step updates the state in place (`layers.conv.decoding_state`, the conv update,
  `update_recurrent_state`), so those are the addresses the graph reads and writes. A cache decodes with it by
  lending it its state (`CapturedDecodeStep.attach`): the cache's state is copied into the static tensors, which
  take the place of its own in its layers while it decodes, so eager steps in between, `StateCache`'s batch
  reorders (which copy into the tensors held) and snapshots see the live state; a tensor replaced meanwhile (same
  shape) is copied in again before the next replay. When the generate() call ends (`decoding_call`, also by an
  exception) the state is copied back into the cache's own tensors, which go back in its place (`detach`): a
  returned cache never shares memory with a graph, and continuing it is a new call. Each replay advances the
  cache's token count by one, as the backbone's forward would.
- what is stored where: the model keeps its captured steps for later calls (`decode_graph_store(model)`, dropped
  with the model), so a call with a fresh cache (each plain generate() and pipeline call) replays a step captured
  by an earlier call instead of paying the capture again. They are keyed by batch size, the state's layout
  (shapes, dtypes), the model's dtype and device, `capture_context()` (inference mode, autocast, matmul
  precision) and the strategy; at most `model.decode_graphs_kept` are kept (`DEFAULT_KEPT`), the least recently
  used released first (its graph, memory pool and static state go unless a call still uses it);
  `clear_decode_graphs(model)` releases them all. A step is used by one call at a time (`claimant`): a call in
  another thread decoding meanwhile captures its own. Steps hold the model only weakly, and a cache records the
  steps that decoded it only weakly (`StateCache.decode_graphs`: `DecodeGraphUse`, with its count of replays),
  so a kept cache keeps neither the model's weights nor graphs alive.
- reusing a kept step requires the model to be unchanged where a replay cannot see it (`ModelFingerprint`, taken
  once per call): the same weight storages (not just addresses, which the allocator hands out again) and
  versions, and the same module types and plain settings (a PEFT adapter switched off, a dropout rate);
  otherwise it is captured again, and the step kept for the model's earlier state is released.
- only plain decoding steps are replayed: `input_ids` of shape (batch, 1), no attention mask (our models'
  `prepare_inputs_for_generation` passes none once the prompt is in the state: the new token is real, also in a
  left-padded batch, and the mixers only read the mask's last `seqlen` columns), a cache that already holds a
  state for every layer, no autograd, eval mode. Anything else (prefill chunks, hidden states requested, a mask)
  runs the model eagerly, as does every hybrid with attention layers (its KV cache grows), any model not on
  CUDA, and a model whose forward must run its Python at every step (`python_per_step`: forward hooks, which a
  replay would skip, or a submodule in training mode).
- the logits a replay returns are the graph's output buffer, overwritten by the next replay; transformers copies
  the last position at once (`_sample`), as it must for torch.compile's CUDA graphs too.

The capture is a strategy (`CudaGraphCapture` on CUDA). `TracedReplay` records the step's tensor operations
(`make_fx`) and replays that tape on the captured tensors, without the model's Python, on any device: the CPU
tests use it to check token for token that a replay computes what plain generate() does. `EagerReplay` runs the
step function again on the same static buffers (it does run the model's Python).

Memory: each kept step holds one static state of its batch size (`StateCache.nbytes`: in bf16, 2.5 MiB a row for
mamba-130m, 18 MiB for mamba2-130m) plus its graph's pool; while a call decodes, the cache's own state tensors are
kept aside as well (the state is held twice during a call).
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from transformers.utils import logging

from .cache_names import pick_cache
from .outputs import SSMCausalLMOutput
from .state import StateCache, release_inference_tensors

logger = logging.get_logger(__name__)

DISABLE_ENV = "SSM_HF_NO_CUDA_GRAPHS"

# How many captured decoding steps a model keeps for later generate() calls unless it says
# (`model.decode_graphs_kept`): a few batch sizes and modes; each holds its graph's memory and a static state.
DEFAULT_KEPT = 4

# The forward arguments a decoding step may carry; with any other argument set, the step runs eagerly.
_STEP_ARGUMENTS = frozenset({"input_ids", "cache", "past_key_values", "cache_params", "attention_mask", "inputs_embeds",
                             "use_cache", "return_dict", "logits_to_keep", "output_hidden_states", "position_ids",
                             "labels"})


class CaptureStrategy(Protocol):
    """How a decoding step is turned into something replayable."""

    def warm_up(self, step: Callable[[], torch.Tensor], device: torch.device) -> None:
        """Run `step` as many times as capture needs beforehand (kernels compiled, libraries initialised)."""

    def capture(self, step: Callable[[], torch.Tensor], device: torch.device
                ) -> tuple[Callable[[], object], torch.Tensor]:
        """(replay, output): calling `replay()` runs the step again and leaves its result in `output`."""


_CAPTURE_LOCK = threading.Lock()


class CudaGraphCapture:
    """Capture into a `torch.cuda.CUDAGraph`, after `warmup_steps` eager steps on a side stream (the warm-up
    compiles the Triton kernels and initialises cuBLAS outside the capture, as graph capture requires).

    The capture mode is "thread_local": only this thread is barred from calls that are unsafe while capturing
    (a synchronisation, a cudaMalloc); with PyTorch's default ("global"), another thread's eager generate() on the
    same GPU would fail, or invalidate the capture, whenever it synchronises during one. Captures themselves take
    a process-wide lock: `torch.cuda.graph` synchronises the device on entry, which must not happen while another
    thread is capturing."""

    def __init__(self, warmup_steps: int = 2):
        self.warmup_steps = warmup_steps

    def warm_up(self, step: Callable[[], torch.Tensor], device: torch.device) -> None:
        with torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup_steps):
                    step()
            torch.cuda.current_stream().wait_stream(side)

    def capture(self, step: Callable[[], torch.Tensor], device: torch.device
                ) -> tuple[Callable[[], object], torch.Tensor]:
        with _CAPTURE_LOCK, torch.cuda.device(device):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                output = step()
        # graph.replay holds the graph (and its memory pool, where `output` lives), not the step's closure
        return graph.replay, output


class EagerReplay:
    """No graph: `replay()` runs the step function again on the same static buffers and copies its result into the
    static output. For debugging (set `model.decode_capture = EagerReplay()`): the bookkeeping (static inputs,
    the state saved and restored around capture, rebinding replaced state tensors, the token count) runs as on
    CUDA, but unlike a graph each replay runs the model's Python and reads the cache's current tensors; see
    `TracedReplay` for a replay that behaves like a graph."""

    warmup_steps = 1

    def warm_up(self, step: Callable[[], torch.Tensor], device: torch.device) -> None:
        for _ in range(self.warmup_steps):
            step()

    def capture(self, step: Callable[[], torch.Tensor], device: torch.device
                ) -> tuple[Callable[[], object], torch.Tensor]:
        output = step()
        return lambda: output.copy_(step()), output


class TracedReplay:
    """No graph, but replayed like one: capture records the step's tensor operations once (`make_fx`: an op tape
    holding the very tensors the step read and wrote) and `replay()` runs that tape, without the model's Python
    (no module code, hooks or flags run again), on the tensors captured. On any device; what CPU tests use to see
    what a CUDA graph would compute."""

    def warm_up(self, step: Callable[[], torch.Tensor], device: torch.device) -> None:
        step()

    def capture(self, step: Callable[[], torch.Tensor], device: torch.device
                ) -> tuple[Callable[[], object], torch.Tensor]:
        from torch.fx.experimental.proxy_tensor import make_fx

        tape = make_fx(step)()
        # the tape refers to the step's tensors as objects (parameters, the state); a graph refers to their memory.
        # Aliases of the memory they had at capture (same storage, same version counter) make the tape read what
        # a graph would after `param.data = new` or a state tensor replaced in the cache.
        for node in tape.graph.nodes:
            if node.op == "get_attr":
                value = getattr(tape, node.target)
                delattr(tape, node.target)
                setattr(tape, node.target, value.detach())
        output = tape()
        return lambda: output.copy_(tape()), output


def graphs_disabled_by_env() -> bool:
    """Whether `SSM_HF_NO_CUDA_GRAPHS` is set to something other than "" or "0" (read at each generate call)."""
    return os.environ.get(DISABLE_ENV, "") not in ("", "0")


def python_per_step(model: torch.nn.Module) -> str | None:
    """Why `model`'s forward must run its Python at every decoding step, which a graph replay does not, or None.

    Forward hooks and pre-hooks (the module's, global ones, accelerate's `_hf_hook` wrappers) would run for the
    capture only: a hook recording activations would miss the replayed steps, and one added later would be
    ignored. A module left in training mode (not only the top one) keeps it eager too: its dropout and other
    training behaviour are for eager steps, not for a replay of what the capture did."""
    module_hooks = torch.nn.modules.module
    if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
        return "global forward hooks are registered"
    for name, module in model.named_modules():
        if module.training:
            return f"module {name or type(module).__name__!r} is in training mode"
        if module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"):
            return f"module {name or type(module).__name__!r} has forward hooks"
    return None


def decode_capture_for(model: torch.nn.Module) -> CaptureStrategy | None:
    """The capture strategy for `model`'s decoding steps in generate(), or None to keep its eager call.

    None for models that do not support it (hybrids: `_supports_graphed_decoding`), with SSM_HF_NO_CUDA_GRAPHS
    set, when the forward must run its Python at every step (`python_per_step`: hooks, training mode), and,
    unless a strategy was set on the model (`model.decode_capture`), off CUDA or with the model spread over
    several devices (`device_map`)."""
    if not getattr(model, "_supports_graphed_decoding", False) or graphs_disabled_by_env():
        return None
    reason = python_per_step(model)
    if reason is not None:
        logger.info_once(f"Decoding steps run eagerly, not from a CUDA graph: {reason}.")
        return None
    chosen = getattr(model, "decode_capture", None)
    if chosen is not None:
        return chosen
    devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        return None
    return CudaGraphCapture()


def capture_context(device: torch.device) -> tuple:
    """The global settings a capture freezes into the graph beside the model, part of a captured step's key:
    inference mode (buffers made in it are inference tensors, which cannot be written outside it), autocast (the
    dtype of each op) and the float32 matmul precision (the kernels cuBLAS picks)."""
    autocast = tuple((kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
                     for kind in sorted({device.type, "cpu"}))
    matmul = torch.backends.cuda.matmul
    precision = (torch.get_float32_matmul_precision(), getattr(matmul, "fp32_precision", None),
                 matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction)
    return torch.is_inference_mode_enabled(), autocast, precision


_NOT_PLAIN = object()
_PLAIN_TYPES = (type(None), bool, int, float, complex, str, torch.dtype, torch.device)


def _plain(value: object, depth: int = 0) -> object:
    """`value` as an immutable, comparable copy if it is a plain setting (a number, string, flag, or a small
    container of those), else `_NOT_PLAIN` (tensors, modules, configs: their changes are seen elsewhere)."""
    if isinstance(value, _PLAIN_TYPES):
        return value
    if depth >= 2:
        return _NOT_PLAIN
    if isinstance(value, (tuple, list)):
        items = tuple(_plain(item, depth + 1) for item in value)
    elif isinstance(value, (set, frozenset)):
        items = tuple(sorted((_plain(item, depth + 1) for item in value), key=repr))
    elif isinstance(value, dict):
        items = tuple((_plain(k, depth + 1), _plain(v, depth + 1)) for k, v in value.items())
        return _NOT_PLAIN if any(_NOT_PLAIN in pair for pair in items) else (dict, items)
    else:
        return _NOT_PLAIN
    return _NOT_PLAIN if _NOT_PLAIN in items else (type(value), items)


# torch.nn.Module's own bookkeeping (parameter, buffer, submodule and hook dicts): seen elsewhere, or no settings;
# and the graphs' own switches set on a model (not read by its forward)
_MODULE_INTERNALS = frozenset(vars(torch.nn.Module())) - {"training"} | {"decode_capture", "decode_graphs_kept"}


def _plain_settings(module: torch.nn.Module) -> tuple:
    """The module's plain attributes (`_plain`), by name: what its forward's Python may branch on."""
    found = []
    for name, value in vars(module).items():
        if name in _MODULE_INTERNALS:
            continue
        frozen = _plain(value)
        if frozen is not _NOT_PLAIN:
            found.append((name, frozen))
    return tuple(found)


class ModelFingerprint:
    """What a captured step took from the model besides the state, to tell whether a stored step may be replayed
    for the model as it is now (`matches`):

    - every parameter and buffer: its storage, held by a weak reference (a replay reads that memory, and a new
      storage may sit at a freed one's address, so addresses alone cannot tell), and its offset, shape, strides,
      dtype and version (an in-place update also changes values the model derives from the weights and keeps
      between calls, such as S4's discretised step, which the graph read at their old addresses; inference
      tensors have no version);
    - every module's name, type and plain settings (numbers, strings, flags, e.g. a PEFT adapter switched off):
      the Python a replay skips branched on them;
    - the kernels' path switch (SSM_HF_FORCE_REFERENCE)."""

    def __init__(self, model: torch.nn.Module):
        # one walk over the modules for their settings and tensors (taken once per generate() call: it is what a
        # call that reuses a kept step pays up front)
        tensors, seen, modules = [], set(), []
        for name, module in model.named_modules():
            modules.append((name, type(module), _plain_settings(module)))
            for tensor in (*module._parameters.values(), *module._buffers.values()):
                if tensor is not None and id(tensor) not in seen:   # tied weights once
                    seen.add(id(tensor))
                    tensors.append(tensor)
        self._storages = [StorageWeakRef(t.untyped_storage()) for t in tensors]
        # inference tensors (weights made under inference_mode) have no version counter: their in-place edits
        # are not seen here, which is right for a replay that reads their memory (S4 then derives its step values
        # inside the graph, `S4Kernel._memoized`)
        self._layouts = tuple((t.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype,
                               None if t.is_inference() else t._version) for t in tensors)
        self._modules = tuple(modules)
        self._env = os.environ.get("SSM_HF_FORCE_REFERENCE", "")

    def matches(self, current: ModelFingerprint) -> bool:
        """Whether a step captured when this fingerprint was taken is valid for a model fingerprinted `current`."""
        if (self._layouts != current._layouts or self._modules != current._modules or self._env != current._env
                or len(self._storages) != len(current._storages)):
            return False
        return all(not mine.expired() and mine.cdata == now.cdata
                   for mine, now in zip(self._storages, current._storages))


def _state_slots(cache: StateCache) -> list[tuple[int, str, int, torch.Tensor]] | None:
    """(layer index, "conv_states" or "recurrent_states", state index, tensor) for every state tensor of a cache
    whose layers are all recurrent and hold a state; None otherwise (then a step would not be a plain decode)."""
    slots = []
    for index, layer in enumerate(cache.layers):
        if not getattr(layer, "is_compileable", False) or getattr(layer, "record_past", False):
            return None
        flags = layer.has_previous_state
        for attr in ("conv_states", "recurrent_states"):
            for idx, tensor in getattr(layer, attr).items():
                if tensor is None:
                    continue
                if not flags.get(idx, False):
                    return None
                slots.append((index, attr, idx, tensor))
    return slots or None


# every static state tensor of a captured step, by id: a cache may hand one to another step (a cache decoded by two
# steps in turn without a detach between, e.g. by two GraphedDecodeSteps used directly); it is never taken as the
# cache's own tensor, which a later detach would give back to the cache while the step still writes into it
_STATIC_TENSORS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _is_static(tensor: torch.Tensor) -> bool:
    return _STATIC_TENSORS.get(id(tensor)) is tensor


def _layout(slots: list[tuple[int, str, int, torch.Tensor]]) -> tuple:
    """What a captured step needs of a cache's state: where each tensor sits, its shape and dtype."""
    return tuple((index, attr, idx, tuple(tensor.shape), tensor.dtype) for index, attr, idx, tensor in slots)


class CapturedDecodeStep:
    """One captured decoding step of `model` for one batch size and state layout, shared by the caches the model
    decodes with that layout (kept for later calls by the model's `DecodeGraphStore`).

    Its static buffers: the token ids `input_ids` (batch, 1), the state (`slots`: (layer index, attr, state index,
    tensor), held by `static_cache`, a private copy of the first cache's layers that the step was captured on) and
    the `logits` (batch, 1, vocab); `replay()` runs the step on them. `fingerprint` is the model's at capture
    (None: never checked), `key` the store's key, `replays` counts the replays over all caches.

    A cache decodes with it by lending it its state (`attach`): the state is copied into the static tensors, which
    take the place of the cache's own in its layers while it decodes (eager steps, reorders or a `snapshot` in
    between see and update the live state); `detach` copies the state back into the cache's own tensors and puts
    them back. One cache holds the static state at a time (`holder`): attaching another one detaches it first.
    `claimant` is the generate() call using it (`GraphedDecodeStep.owner`, held weakly): no other call takes it
    meanwhile.

    The model is held weakly (`model` is None once it is gone): the model's store is dropped with the model, and a
    cache must not keep its weights alive."""

    def __init__(self, model: torch.nn.Module, cache: StateCache, input_ids: torch.Tensor,
                 capture: CaptureStrategy, fingerprint: ModelFingerprint | None, key: tuple | None = None):
        if _state_slots(cache) is None:
            raise ValueError("The cache holds no state for some layer: nothing to capture a decoding step on.")
        self._model = weakref.ref(model)
        self.fingerprint, self.key, self.replays = fingerprint, key, 0
        self.holder: weakref.ref | None = None
        self.claimant: weakref.ref | None = None
        self._originals: dict[int, torch.Tensor | None] = {}   # slot number -> the holder's own tensor
        self.input_ids = input_ids.clone()
        # the step runs on a private copy of the cache (the config shared), so capturing changes nothing in the
        # caller's cache, and the state buffers outlive it; the first `attach` copies the real state in
        self.static_cache = copy.deepcopy(cache, {id(cache.config): cache.config})
        self.slots = _state_slots(self.static_cache)
        for *_, tensor in self.slots:
            _STATIC_TENSORS[id(tensor)] = tensor
        static, ids, model_ref = self.static_cache, self.input_ids, self._model   # no reference to self: no cycle

        def step() -> torch.Tensor:
            return model_ref()(input_ids=ids, cache=static, use_cache=True, return_dict=True,
                               logits_to_keep=1, output_hidden_states=False).logits

        with torch.no_grad():
            capture.warm_up(step, input_ids.device)
            self.replay, self.logits = capture.capture(step, input_ids.device)
        replaced = [(index, attr, idx) for index, attr, idx, tensor in self.slots
                    if getattr(static.layers[index], attr).get(idx) is not tensor]
        if replaced:
            raise RuntimeError(f"The decoding step replaced the cache's state tensors {replaced} instead of updating "
                               f"them in place: it cannot be replayed from a graph.")

    @property
    def model(self) -> torch.nn.Module | None:
        return self._model()

    def holds_state_of(self, cache: StateCache) -> bool:
        """Whether the cache holds exactly the static state tensors (as it does while attached)."""
        return all(index < len(cache.layers) and getattr(cache.layers[index], attr).get(idx) is static
                   for index, attr, idx, static in self.slots)

    def attach(self, cache: StateCache) -> bool:
        """Make `cache` decode on the static state: each of its state tensors is copied into the static one, which
        takes its place (the cache's own tensor is kept for `detach`). Once attached, only tensors replaced since
        (a reorder that changed the storage, a state set by hand) are copied. A cache attached before detaches
        first. False, with the cache left as it was, when its states do not fit (another layout, a layer without a
        state): then run eagerly."""
        layers, attached = cache.layers, True
        for index, attr, idx, static in self.slots:
            if index >= len(layers) or not layers[index].has_previous_state.get(idx, False):
                return False
            tensor = getattr(layers[index], attr).get(idx)
            if tensor is static:
                continue
            attached = False
            if (tensor is None or tensor.shape != static.shape or tensor.dtype != static.dtype
                    or tensor.device != static.device):
                return False
        holder = self.holder() if self.holder is not None else None
        if holder is cache and attached:
            return True
        if holder is not cache:
            self.detach()   # (a cache sharing its layers with the holder gets them back here: read them again)
        with torch.no_grad():
            for number, (index, attr, idx, static) in enumerate(self.slots):
                states = getattr(layers[index], attr)
                tensor = states[idx]
                if tensor is not static:
                    static.copy_(tensor)
                    # (another step's static tensor is not the cache's own: detach gives it a copy instead)
                    self._originals[number] = None if _is_static(tensor) else tensor
                    states[idx] = static
        self.holder = weakref.ref(cache)
        return True

    def detach(self) -> None:
        """Give the holder its own state tensors back, now holding the state it reached (where it still holds the
        static ones), and forget it. The static state is then free for another cache."""
        holder = self.holder() if self.holder is not None else None
        originals, self.holder, self._originals = self._originals, None, {}
        if holder is None:
            return
        writable = torch.is_inference_mode_enabled()
        with torch.no_grad():
            for number, (index, attr, idx, static) in enumerate(self.slots):
                states = getattr(holder.layers[index], attr, None) if index < len(holder.layers) else None
                if not isinstance(states, dict) or states.get(idx) is not static:
                    continue   # replaced since (another batch): the cache's newer tensor stays
                own = originals.get(number)
                if own is None or (own.is_inference() and not writable):
                    own = static.clone()
                else:
                    own.copy_(static)
                states[idx] = own

    def __call__(self, cache: StateCache, input_ids: torch.Tensor) -> SSMCausalLMOutput:
        """Replay on input_ids (batch, 1): logits (batch, 1, vocab) in lm_head's dtype, the cache advanced by one token
        (`attach` it first)."""
        self.input_ids.copy_(input_ids)
        seen = cache.seen_tokens
        self.replay()
        cache.seen_tokens = seen + 1  # what the backbone's forward does, which a replay does not run
        self.replays += 1
        # the static logits: valid until the next step (generate() copies the last position right away)
        return SSMCausalLMOutput(logits=self.logits, cache=cache)


class DecodeGraphUse:
    """A cache's record of a captured step that decoded it (`cache.decode_graphs`, by the step's key): the step,
    held weakly (the model's store keeps it, within its bound; a kept cache must not keep graphs alive), and
    `replays`, how many of this cache's decoding steps it replayed."""

    def __init__(self, step: CapturedDecodeStep):
        self._step = weakref.ref(step)
        self.replays = 0

    @property
    def step(self) -> CapturedDecodeStep | None:
        return self._step()

    def __repr__(self) -> str:
        step = self.step
        batch = "released" if step is None else f"batch {step.input_ids.shape[0]}"
        return f"DecodeGraphUse({batch}, {self.replays} replays)"


def _claimed_elsewhere(entry: CapturedDecodeStep, claimant: object) -> bool:
    owner = entry.claimant() if entry.claimant is not None else None
    return owner is not None and owner is not claimant


class DecodeGraphStore:
    """The captured decoding steps a model keeps for its later generate() calls (`decode_graph_store(model)`):
    `entries`, least recently used first, at most `model.decode_graphs_kept` of them (older ones are released
    when a new one is added); `captures` counts the steps captured for the model."""

    def __init__(self):
        self.entries: list[CapturedDecodeStep] = []
        self.captures = 0
        self._lock = threading.Lock()

    def acquire(self, key: tuple, claimant: object, fingerprint: Callable[[], ModelFingerprint],
                limit: int) -> CapturedDecodeStep | None:
        """A kept step of `key` that no other live call holds and that was captured for the model as it is
        (`fingerprint()`, taken only if there is a candidate), claimed for `claimant` and made the most recent;
        None if there is none. The unclaimed steps of `key` captured for an earlier state of the model are
        released (their weights were replaced or changed in place: they cannot be replayed again), and so are
        the least recently used beyond `limit` (lowered since they were kept)."""
        with self._lock:
            del self.entries[:max(0, len(self.entries) - max(0, limit))]
            for entry in reversed(list(self.entries)):
                if entry.key != key or _claimed_elsewhere(entry, claimant):
                    continue
                self.entries.remove(entry)
                if entry.fingerprint is not None and entry.fingerprint.matches(fingerprint()):
                    entry.claimant = weakref.ref(claimant)
                    self.entries.append(entry)
                    return entry
        return None

    def add(self, entry: CapturedDecodeStep, limit: int) -> None:
        """Keep a step just captured, releasing the least recently used beyond `limit` (a step a call still uses
        stays with that call until it ends)."""
        with self._lock:
            self.captures += 1
            self.entries.append(entry)
            del self.entries[:max(0, len(self.entries) - max(0, limit))]

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()


_STORES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_STORES_LOCK = threading.Lock()


def decode_graph_store(model: torch.nn.Module) -> DecodeGraphStore:
    """The store of `model`'s captured decoding steps (made on first use, dropped with the model)."""
    with _STORES_LOCK:
        store = _STORES.get(model)
        if store is None:
            store = _STORES[model] = DecodeGraphStore()
        return store


def clear_decode_graphs(model: torch.nn.Module) -> None:
    """Release the captured decoding steps `model` keeps (graphs, their memory pools, static state buffers); the
    next generate() captures again. A call decoding meanwhile finishes with the steps it holds."""
    decode_graph_store(model).clear()


_CALLS = threading.local()


class _DecodingCall:
    """One generate() call in progress (`decoding_call`), or one `GraphedDecodeStep` used on its own: the captured
    steps it took (`entries`, by key; prefill chunks and decoding steps each get a GraphedDecodeStep, which share
    them), held in its name (their `claimant`) until `release()`."""

    def __init__(self):
        self.entries: dict[tuple, CapturedDecodeStep] = {}

    def release(self) -> None:
        """Detach the caches decoded with its steps (they hold their own state tensors again) and free the steps
        for other calls; they stay kept by the model, within its bound."""
        for entry in self.entries.values():
            if entry.claimant is not None and entry.claimant() is self:
                entry.detach()
                entry.claimant = None
        self.entries.clear()


@contextlib.contextmanager
def decoding_call() -> Iterator[_DecodingCall]:
    """Around one generate() call (`StateGenerationMixin.generate`): the `GraphedDecodeStep`s made in it, in this
    thread, are released when it ends, even by an exception: the caches they decoded hold their own state
    tensors again (with the state reached), and the captured steps are free for other calls."""
    stack = getattr(_CALLS, "stack", None)
    if stack is None:
        stack = _CALLS.stack = []
    call = _DecodingCall()
    stack.append(call)
    try:
        yield call
    finally:
        stack.pop()
        call.release()


class GraphedDecodeStep:
    """What `get_compiled_call` returns for a pure SSM model: called like the model, it replays a captured
    decoding step for plain one-token steps (see the module docstring) and runs the model eagerly otherwise.

    Made per generate() call, inside generate()'s grad, inference and autocast modes, which it records
    (`capture_context`) for the keys of the steps it uses. It takes a kept step from the model's store
    (`decode_graph_store`) when one fits (same batch size and state layout, dtype, device, modes, and an unchanged
    model: `ModelFingerprint`), or captures one and keeps it there. The steps it took are its own until `release()`
    (called when generate() returns: `decoding_call`), which detaches the caches it decoded. `eager_calls` counts
    the calls it passed on to the model, `captures` the steps it captured; each cache records its replays
    (`cache.decode_graphs`)."""

    def __init__(self, model: torch.nn.Module, capture: CaptureStrategy):
        self.model, self.capture = model, capture
        self.device, self.dtype = model.device, model.dtype
        self.context = capture_context(self.device)
        self.eager_calls = self.captures = 0
        self._fingerprint: ModelFingerprint | None = None
        self._bound: tuple | None = None   # (cache, entry, its record on the cache) of the last replay
        self._failed: set = set()          # keys whose capture failed in this call: eager from then on
        # who holds the steps taken: the generate() call in progress in this thread, else this object alone
        stack = getattr(_CALLS, "stack", None)
        self.owner: _DecodingCall = stack[-1] if stack else _DecodingCall()

    def __call__(self, **kwargs):
        cache = self._plain_step_cache(kwargs)
        if cache is None:
            return self._eager(kwargs)
        input_ids = kwargs["input_ids"]
        bound = self._bound
        if (bound is not None and bound[0] is cache and bound[1].input_ids.shape[0] == input_ids.shape[0]
                and bound[1].attach(cache)):
            entry, use = bound[1], bound[2]
        else:
            found = self._attach(cache, input_ids)
            if found is None:
                return self._eager(kwargs)
            entry, use = found
        out = entry(cache, input_ids)
        use.replays += 1
        return out

    def fingerprint(self) -> ModelFingerprint:
        """The model's fingerprint, taken once per call (the model does not change during a generate())."""
        if self._fingerprint is None:
            self._fingerprint = ModelFingerprint(self.model)
        return self._fingerprint

    def release(self) -> None:
        """Detach the caches decoded with the steps its call took and free those for other calls (they stay kept
        by the model, within its bound). generate() does this when it returns."""
        self._bound = None
        self.owner.release()

    def _kept(self) -> int:
        kept = getattr(self.model, "decode_graphs_kept", None)
        return DEFAULT_KEPT if kept is None else int(kept)

    def _eager(self, kwargs: dict):
        self.eager_calls += 1
        return self.model(**kwargs)

    def _attach(self, cache: StateCache, input_ids: torch.Tensor) -> tuple[CapturedDecodeStep, DecodeGraphUse] | None:
        """The step for this cache's layout (taken, or captured), with the cache attached; None to run eagerly."""
        # states filled under inference_mode become normal tensors outside it before they are copied in (a
        # detach writes them back)
        release_inference_tensors(cache)
        slots = _state_slots(cache)
        if slots is None or any(tensor.shape[0] != input_ids.shape[0] for *_, tensor in slots):
            return None  # no state yet (e.g. after reset()), or one of another batch: the model's own call decides
        # (the strategy too: a step kept from CUDA graphs is not what `decode_capture = EagerReplay()` asks for)
        key = (input_ids.shape[0], self.dtype, self.device, self.context, type(self.capture), _layout(slots))
        if key in self._failed:
            return None
        store = decode_graph_store(self.model)
        taken = self.owner.entries
        entry = taken.get(key)
        if entry is None:
            entry = store.acquire(key, self.owner, self.fingerprint, self._kept())
        if entry is None:
            entry = self._capture(cache, input_ids, key, store)
            if entry is None:
                return None
        taken[key] = entry
        for other in taken.values():   # a cache decodes with one step at a time (e.g. before and after a repeat)
            if other is not entry and other.holder is not None and other.holder() is cache:
                other.detach()
        if not entry.attach(cache):
            return None
        use = cache.decode_graphs.get(key)
        if use is None or use.step is not entry:
            use = cache.decode_graphs[key] = DecodeGraphUse(entry)
        self._bound = (cache, entry, use)
        return entry, use

    def _capture(self, cache: StateCache, input_ids: torch.Tensor, key: tuple,
                 store: DecodeGraphStore) -> CapturedDecodeStep | None:
        try:
            entry = CapturedDecodeStep(self.model, cache, input_ids, self.capture, self.fingerprint(), key)
        except Exception as err:  # a step that cannot be captured still decodes, eagerly
            logger.warning(f"Capturing the decoding step in a CUDA graph failed; decoding eagerly instead "
                           f"(set {DISABLE_ENV}=1 to skip the attempt): {err!r}")
            self._failed.add(key)
            return None
        self.captures += 1
        entry.claimant = weakref.ref(self.owner)
        store.add(entry, self._kept())
        return entry

    def _plain_step_cache(self, kwargs: dict) -> StateCache | None:
        """The StateCache of a plain one-token decoding step, or None when the call must run eagerly."""
        if any(value is not None for name, value in kwargs.items() if name not in _STEP_ARGUMENTS):
            return None
        config = self.model.config
        input_ids = kwargs.get("input_ids")
        if (not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] != 1
                or input_ids.device != self.device or input_ids.dtype != torch.long):
            return None
        if any(kwargs.get(name) is not None for name in ("attention_mask", "inputs_embeds", "labels")):
            return None
        position_ids = kwargs.get("position_ids")
        if position_ids is not None and position_ids.shape[-1] != 1:
            return None
        if kwargs.get("use_cache") is False or not isinstance(kwargs.get("logits_to_keep", 0), int):
            return None
        if not (kwargs.get("return_dict") if kwargs.get("return_dict") is not None else config.return_dict):
            return None
        hidden = kwargs.get("output_hidden_states")
        if hidden if hidden is not None else config.output_hidden_states:
            return None
        if torch.is_grad_enabled() or self.model.training:
            return None
        cache = pick_cache(kwargs.get("cache"), kwargs.get("cache_params"), kwargs.get("past_key_values"))
        if not isinstance(cache, StateCache) or not cache.is_compileable:
            return None
        return cache


__all__ = ["CaptureStrategy", "CapturedDecodeStep", "CudaGraphCapture", "DEFAULT_KEPT", "DISABLE_ENV",
           "DecodeGraphStore", "DecodeGraphUse", "EagerReplay", "GraphedDecodeStep", "ModelFingerprint",
           "TracedReplay", "capture_context", "clear_decode_graphs", "decode_capture_for", "decode_graph_store",
           "decoding_call", "graphs_disabled_by_env", "python_per_step"]
