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

- the state: the graph reads and writes the cache's state tensors at the addresses they had when it was
  captured; the decoding step updates them in place (`layers.conv.decoding_state`, the conv update,
  `update_recurrent_state`), and `StateCache`'s batch reorders copy into them. Before each replay the step
  checks that the cache still holds those tensors; one that was replaced (same shape) is copied into the captured
  tensor, which goes back in its place. Capture runs the step on the real state (warm-up, then the capture
  itself), so the state and the cache's token count are saved before and put back after; each replay advances
  the count by one, as the backbone's forward would.
- what is stored where: a cache's captured steps live on it (`StateCache.decode_graphs`) and go with it. They are
  keyed by (model, batch size, dtype, device, `capture_context()`: inference mode, autocast, matmul precision),
  hold the model only weakly (a kept cache does not keep the model's weights alive), and a capture for a new key
  drops the steps whose state tensors the cache no longer holds (another batch size) or whose model is gone.
- reusing a stored step (a cache continued by a later generate() call) requires the model to be unchanged where a
  replay cannot see it (`ModelFingerprint`): the same weight storages (not just addresses, which the allocator
  hands out again) and versions, and the same module types and plain settings (a PEFT adapter switched off, a
  dropout rate); otherwise it is captured again.
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
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import Protocol

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from transformers.utils import logging

from .outputs import SSMCausalLMOutput
from .state import StateCache, pick_cache, release_inference_tensors

logger = logging.get_logger(__name__)

DISABLE_ENV = "SSM_HF_NO_CUDA_GRAPHS"

# The forward arguments a decoding step may carry; with any other argument set, the step runs eagerly.
_STEP_ARGUMENTS = frozenset({"input_ids", "past_key_values", "cache_params", "attention_mask", "inputs_embeds",
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


# torch.nn.Module's own bookkeeping (parameter, buffer, submodule and hook dicts): seen elsewhere, or no settings
_MODULE_INTERNALS = frozenset(vars(torch.nn.Module())) - {"training"}


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
        tensors = [*model.parameters(), *model.buffers()]
        self._storages = [StorageWeakRef(t.untyped_storage()) for t in tensors]
        # inference tensors (weights made under inference_mode) have no version counter: their in-place edits
        # are not seen here, which is right for a replay that reads their memory (S4 then derives its step values
        # inside the graph, `S4Kernel._memoized`)
        self._layouts = tuple((t.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype,
                               None if t.is_inference() else t._version) for t in tensors)
        self._modules = tuple((name, type(module), _plain_settings(module))
                              for name, module in model.named_modules())
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


class CapturedDecodeStep:
    """One captured decoding step of `model` for one batch size on one cache: the static token buffer
    `input_ids` (batch, 1), the state tensors the step reads and writes (`slots`), the static `logits`
    (batch, 1, vocab), `replay`, and the model's `fingerprint` at capture. Counts its replays in `replays`.

    The model is held weakly (`model` is None once it is gone): the cache the step lives on may be kept long after
    the model, and must not keep its weights alive."""

    def __init__(self, model: torch.nn.Module, cache: StateCache, input_ids: torch.Tensor,
                 capture: CaptureStrategy, fingerprint: ModelFingerprint | None):
        slots = _state_slots(cache)
        if slots is None:
            raise ValueError("The cache holds no state for some layer: nothing to capture a decoding step on.")
        self._model = weakref.ref(model)
        self.fingerprint, self.replays = fingerprint, 0
        self.input_ids = input_ids.clone()
        self.slots = slots
        device = input_ids.device

        def step() -> torch.Tensor:
            return model(input_ids=self.input_ids, past_key_values=cache, use_cache=True, return_dict=True,
                         logits_to_keep=1, output_hidden_states=False).logits

        # warm-up and capture run the step on the real state: keep it, and the token count, to put them back
        saved = [tensor.clone() for *_, tensor in slots]
        seen = cache.seen_tokens
        try:
            with torch.no_grad():
                capture.warm_up(step, device)
                self.replay, self.logits = capture.capture(step, device)
        finally:
            replaced = []
            for (index, attr, idx, tensor), copy in zip(slots, saved):
                tensor.copy_(copy)
                states = getattr(cache.layers[index], attr)
                if states.get(idx) is not tensor:  # the cache gets the state it had back, also for eager steps
                    replaced.append((index, attr, idx))
                    states[idx] = tensor
            cache.seen_tokens = seen
        if replaced:
            raise RuntimeError(f"The decoding step replaced the cache's state tensors {replaced} instead of updating "
                               f"them in place: it cannot be replayed from a graph.")

    @property
    def model(self) -> torch.nn.Module | None:
        return self._model()

    def holds_state_of(self, cache: StateCache) -> bool:
        """Whether the cache holds exactly the captured state tensors (no copy needed before a replay)."""
        return all(index < len(cache.layers) and getattr(cache.layers[index], attr).get(idx) is captured
                   for index, attr, idx, captured in self.slots)

    def bind(self, cache: StateCache) -> bool:
        """Make the cache hold the captured state tensors again: a tensor replaced since (a reorder that changed
        the storage, a state set by hand) is copied into the captured one, which takes its place. False when the
        cache's states no longer fit (another layout or shape, a layer without a state): then run eagerly."""
        if len(cache.layers) <= self.slots[-1][0]:
            return False
        for slot in self.slots:
            index, attr, idx, captured = slot
            layer = cache.layers[index]
            if not layer.has_previous_state.get(idx, False):
                return False
            current = getattr(layer, attr).get(idx)
            if current is captured:
                continue
            if current is None or current.shape != captured.shape or current.dtype != captured.dtype:
                return False
            captured.copy_(current)
            getattr(layer, attr)[idx] = captured
        return True

    def __call__(self, cache: StateCache, input_ids: torch.Tensor) -> SSMCausalLMOutput:
        """Replay on input_ids (batch, 1): logits (batch, 1, vocab) in float32, the cache advanced by one token
        (call `bind` first)."""
        self.input_ids.copy_(input_ids)
        seen = cache.seen_tokens
        self.replay()
        cache.seen_tokens = seen + 1  # what the backbone's forward does, which a replay does not run
        self.replays += 1
        # the static logits: valid until the next step (generate() copies the last position right away)
        return SSMCausalLMOutput(logits=self.logits, cache_params=cache)


class GraphedDecodeStep:
    """What `get_compiled_call` returns for a pure SSM model: called like the model, it replays a captured
    decoding step for plain one-token steps (see the module docstring) and runs the model eagerly otherwise.

    Made per generate() call (cheap: the graphs live on the cache), inside generate()'s grad, inference and
    autocast modes, which it records (`capture_context`) for the keys of the steps it captures and replays.
    `eager_calls` counts the calls it passed on to the model; the replays are counted on the captured steps
    (`cache.decode_graphs[...].replays`)."""

    def __init__(self, model: torch.nn.Module, capture: CaptureStrategy):
        self.model, self.capture = model, capture
        self.device, self.dtype = model.device, model.dtype
        self.context = capture_context(self.device)
        self.eager_calls = 0
        self._fingerprint: ModelFingerprint | None = None
        self._checked: set = set()   # keys whose stored graph was checked against the model in this call
        self._failed: set = set()    # keys whose capture failed in this call: eager from then on

    def __call__(self, **kwargs):
        cache = self._plain_step_cache(kwargs)
        if cache is None:
            return self._eager(kwargs)
        input_ids = kwargs["input_ids"]
        key = (id(self.model), input_ids.shape[0], self.dtype, self.device, self.context)
        if key in self._failed:
            return self._eager(kwargs)
        entry = cache.decode_graphs.get(key)
        if entry is not None and key not in self._checked and (
                entry.model is not self.model or not entry.fingerprint.matches(self.fingerprint())):
            entry = None   # another model at a reused id, or this one changed since the capture
        self._checked.add(key)
        if entry is not None and not entry.bind(cache):
            entry = None
        if entry is None:
            entry = self._capture(cache, input_ids, key)
            if entry is None:
                return self._eager(kwargs)
        return entry(cache, input_ids)

    def fingerprint(self) -> ModelFingerprint:
        """The model's fingerprint, taken once per call (the model does not change during a generate())."""
        if self._fingerprint is None:
            self._fingerprint = ModelFingerprint(self.model)
        return self._fingerprint

    def _eager(self, kwargs: dict):
        self.eager_calls += 1
        return self.model(**kwargs)

    def _capture(self, cache: StateCache, input_ids: torch.Tensor, key: tuple) -> CapturedDecodeStep | None:
        # states filled under inference_mode become normal tensors outside it before they are captured (the
        # forward would replace them during the capture otherwise); `bind` only reads the cache's tensors
        release_inference_tensors(cache)
        slots = _state_slots(cache)
        if slots is None or any(tensor.shape[0] != input_ids.shape[0] for *_, tensor in slots):
            return None  # no state yet (e.g. after reset()), or one of another batch: the model's own call decides
        cache.decode_graphs.pop(key, None)
        try:
            entry = CapturedDecodeStep(self.model, cache, input_ids, self.capture, self.fingerprint())
        except Exception as err:  # a step that cannot be captured still decodes, eagerly
            logger.warning(f"Capturing the decoding step in a CUDA graph failed; decoding eagerly instead "
                           f"(set {DISABLE_ENV}=1 to skip the attempt): {err!r}")
            self._failed.add(key)
            return None
        # the steps captured for state tensors the cache no longer holds (another batch size) or for a model that
        # is gone hold those tensors and their graph's memory for nothing: drop them
        for other_key, other in list(cache.decode_graphs.items()):
            if other.model is None or not other.holds_state_of(cache):
                del cache.decode_graphs[other_key]
        cache.decode_graphs[key] = entry
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
        cache = pick_cache(kwargs.get("cache_params"), kwargs.get("past_key_values"))
        if not isinstance(cache, StateCache) or not cache.is_compileable:
            return None
        return cache


__all__ = ["CaptureStrategy", "CapturedDecodeStep", "CudaGraphCapture", "DISABLE_ENV", "EagerReplay",
           "GraphedDecodeStep", "ModelFingerprint", "TracedReplay", "capture_context", "decode_capture_for",
           "graphs_disabled_by_env", "python_per_step"]
