"""An op's forward replayed from a plan kept per input signature, with none of its Python between launches.

After FastLaunch, a 130M model's prefill still spent 7.8-13.9 ms of host time per forward outside its launches
(BENCHMARKS.md, twelfth session): the wrappers' Python (shapes, strides, launch plans, checks, views) runs again at
every call although, for inputs of the same shapes, strides, dtypes and alignments, it computes the same grids,
arguments and allocations. `Planned` wraps a function whose only work is allocations, views and FastLaunch kernel
launches. The second call with a signature (the first only notes the signature, so that shapes seen once cost no
recording) runs the function while `launch.recording()` notes its launches and a dispatch mode checks that nothing
else computed. The plan then holds, per launch, the compiled launcher, grid, fixed arguments and where each pointer
argument lies (an input's address or a new tensor's, plus an offset). Later calls with the signature allocate the
new tensors and call the launchers with the addresses as ints.

A signature is: per tensor input its shape, strides, dtype, device and address modulo 16 (what the wrappers and
Triton's specialisation read), the function's other arguments, the current device, and the state of the modules
the function reads: every attribute assignment on a `watched` module (a knob set by a test or bench, a kernel
swapped by monkeypatch) starts a new generation of plans, and dict-valued module attributes (the WARPS tables) are
compared by content at each call.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import launch

# bumped by every attribute assignment on a watched module: plans of earlier generations are never used again
_generation = 0


class _WatchedModule(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        global _generation
        _generation += 1
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        global _generation
        _generation += 1
        super().__delattr__(name)


def watch_module(module: types.ModuleType) -> None:
    """Make an attribute assignment on `module` invalidate every plan (`Planned` watches the modules it is given)."""
    if isinstance(module, _WatchedModule):
        return
    if type(module) is not types.ModuleType:  # another module class: its setattr could not be replaced safely
        raise TypeError(f"plans can watch plain modules only; {module.__name__} is a {type(module).__name__}")
    module.__class__ = _WatchedModule


# aten ops a planned function may run: allocations (of uninitialised memory), views and dtype arithmetic; anything
# else computes, and a plan would skip it (`torch.tensor(...)` dispatches only `lift_fresh`: not allowed, its copy
# is invisible here)
_ALLOCATIONS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})
_ALLOWED_OPS = _ALLOCATIONS | frozenset({
    "view", "_unsafe_view", "as_strided", "split", "split_with_sizes", "slice", "select", "t", "transpose",
    "permute", "unsqueeze", "squeeze", "expand", "alias", "detach", "_reshape_alias", "unbind", "narrow", "view_as",
    "promote_types", "result_type", "can_cast",
})


class _OnlyAllocationsAndViews(TorchDispatchMode):
    """Notes the aten ops run inside that are not in _ALLOWED_OPS, and the storages the allocations made."""

    def __init__(self):
        super().__init__()
        self.other: list[str] = []
        self.allocated: set[int] = set()  # storage addresses

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _ALLOWED_OPS:
            self.other.append(name)
        out = func(*args, **(kwargs or {}))
        if name in _ALLOCATIONS:
            self.allocated.add(out.untyped_storage().data_ptr())
        return out


def _extent(t: torch.Tensor) -> int:
    """Bytes from t's first element to one past its last."""
    if t.numel() == 0:
        return 0
    return (sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1) * t.element_size()


class _Plan:
    """Allocations, launches and outputs of one signature (see the module's docstring); holds no tensor."""

    def __init__(self, slots: list, launches: list, outputs: list, jits: tuple):
        self.slots, self.launches, self.outputs, self.jits = slots, launches, outputs, jits

    def hooked(self) -> bool:
        """Whether a launched kernel has a pre-run hook or debug on now (FastLaunch would take Triton's path)."""
        return any(jit.debug or jit.pre_run_hooks for jit in self.jits)

    def run(self, tensors: tuple, device: torch.device) -> tuple:
        sources = [*tensors, *(torch.empty(shape, dtype=dtype, device=device) for shape, dtype in self.slots)]
        addresses = [t.data_ptr() if t is not None else 0 for t in sources]
        stream = launch.current_stream(device.index)
        for run, function, metadata, g0, g1, g2, fixed, pointers, tail, _ in self.launches:
            args = fixed.copy()
            for position, source, offset in pointers:
                args[position] = addresses[source] + offset
            run(g0, g1, g2, stream, function, metadata, None, None, None, *args, *tail)
        outputs = []
        for spec in self.outputs:
            if spec is None:
                outputs.append(None)
            elif type(spec) is int:
                outputs.append(sources[spec])
            else:
                source, shape, stride, offset = spec
                base = sources[source]
                outputs.append(base.as_strided(shape, stride, base.storage_offset() + offset))
        return tuple(outputs)


def _build_plan(tensors: tuple, outputs: tuple, recorded: launch.Recording, allocated: set[int]) -> _Plan | None:
    """The plan of a recorded call, or None where one cannot stand for it: a tensor that lies in two inputs or in
    an input's storage outside the input, or in a storage the call did not allocate (`allocated`: their addresses;
    a module-level buffer, say), a new tensor whose storage no contiguous tensor covers whole, an output view of
    another dtype."""
    spans = [(t.data_ptr(), t.data_ptr() + _extent(t)) if t is not None else None for t in tensors]
    input_storages = {t.untyped_storage().data_ptr() for t in tensors if t is not None}
    seen = [a for _, _, _, args in recorded.launches for a in args if isinstance(a, torch.Tensor)]
    seen += [t for t in outputs if t is not None]
    if any(t.numel() == 0 for t in seen):
        return None

    def in_inputs(t: torch.Tensor) -> list[int]:
        start, end = t.data_ptr(), t.data_ptr() + _extent(t)
        return [i for i, span in enumerate(spans) if span is not None and span[0] <= start and end <= span[1]]

    primaries: dict[int, torch.Tensor] = {}  # storage address -> the new tensor covering it whole
    for t in seen:
        if not in_inputs(t):
            storage = t.untyped_storage()
            if storage.data_ptr() in input_storages or storage.data_ptr() not in allocated:
                return None
            if (t.storage_offset() == 0 and t.is_contiguous()
                    and t.numel() * t.element_size() == storage.nbytes()):
                primaries.setdefault(storage.data_ptr(), t)
    slot_of = {address: len(tensors) + j for j, address in enumerate(primaries)}

    def locate(t: torch.Tensor) -> tuple[int, int] | None:
        """(source index, byte offset from the source's address)."""
        hits = in_inputs(t)
        if len(hits) == 1:
            return hits[0], t.data_ptr() - tensors[hits[0]].data_ptr()
        address = t.untyped_storage().data_ptr()
        if hits or address not in slot_of:
            return None
        return slot_of[address], t.data_ptr() - address

    launches = []
    for _, (kernel, run, function, metadata, tail), grid, args in recorded.launches:
        fixed, pointers = list(args), []
        for position, arg in enumerate(args):
            if isinstance(arg, torch.Tensor):
                located = locate(arg)
                if located is None:
                    return None
                fixed[position] = None
                pointers.append((position, *located))
        grid = (*grid, 1, 1)
        # (the compiled kernel too: its module stays loaded while the plan may launch it)
        launches.append((run, function, metadata, grid[0], grid[1], grid[2], fixed, tuple(pointers), tail, kernel))
    sources = [*tensors, *primaries.values()]
    output_specs: list = []
    for out in outputs:
        if out is None:
            output_specs.append(None)
            continue
        same = next((i for i, t in enumerate(sources) if t is out), None)
        located = locate(out)
        if same is not None:
            output_specs.append(same)
        elif located is None or sources[located[0]].dtype != out.dtype or located[1] % out.element_size():
            return None
        else:
            output_specs.append((located[0], tuple(out.shape), out.stride(), located[1] // out.element_size()))
    slots = [(tuple(t.shape), t.dtype) for t in primaries.values()]
    return _Plan(slots, launches, output_specs, tuple({id(jit): jit for jit, _, _, _ in recorded.launches}.values()))


def _on_current_gpu(t: torch.Tensor) -> bool:
    # the plan's launches go to the current device, as the recorded ones went to the tensors' (`on_device_of`)
    return t.is_cuda and t.get_device() == torch.cuda.current_device()


# signatures kept per planned function before its plans start again
MAX_PLANS = 256
_UNSEEN, _SEEN_ONCE = object(), object()  # a signature not seen yet, or seen once (its plan is made at the next)


class Planned:
    """`fn(*tensors, *extras) -> tuple of tensors (or None)`, whose work is only allocations, views and FastLaunch
    launches, called as `planned(tensors, extras)`: on CUDA, the second call with a signature records a plan and
    later ones replay it (see the module's docstring). Every tensor a launch reads must be an input, a view of one,
    or a tensor allocated in the call (whose contents the launches write: a replay allocates it anew). Wherever
    FastLaunch would take Triton's own path, on the CPU, with inputs off the current device, with a kernel of the
    watched modules that is not a FastLaunch, or where a recorded call computed something besides its launches,
    `fn` runs as it is. `watched`: the modules whose globals `fn` reads (watched from here on: `watch_module`)."""

    def __init__(self, fn: Callable, watched: tuple[types.ModuleType, ...]):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "planned")
        self._plans: dict = {}
        self._watched = watched
        for module in watched:
            watch_module(module)
        # dict-valued globals (WARPS tables), read by name at each call: assigning an entry does not pass through
        # the module's setattr
        self._tables = [(module, name) for module in watched for name, value in vars(module).items()
                        if type(value) is dict and not name.startswith("__")]

    def _kernels_recordable(self) -> bool:
        """Whether every kernel of the watched modules launches through FastLaunch (a recording sees only its
        launches): not where one was swapped for a stand-in or a wrapper (tests, bench stubs)."""
        return all(isinstance(value, launch.FastLaunch) for module in self._watched
                   for name, value in vars(module).items() if name.endswith("_kernel"))

    def __call__(self, tensors: tuple, extras: tuple) -> tuple:
        first = next((t for t in tensors if t is not None), None)
        # inside another planned function's recording, run as it is: FastLaunch notes these launches there
        if (first is None or not _on_current_gpu(first) or launch.triton_path_required()
                or launch.recording_now()):
            return self.fn(*tensors, *extras)
        key = (tuple((t.shape, t.stride(), t.dtype, t.get_device(), t.data_ptr() & 15) if t is not None else None
                     for t in tensors), extras, _generation,
               *(tuple(getattr(module, name).items()) for module, name in self._tables))
        try:
            plan = self._plans.get(key, _UNSEEN)
        except TypeError:  # an unhashable argument (a list for a tuple): no plan
            return self.fn(*tensors, *extras)
        if type(plan) is _Plan:
            if plan.hooked():
                return self.fn(*tensors, *extras)
            return plan.run(tensors, first.device)
        if plan is None:  # a signature whose call computes more than its launches
            return self.fn(*tensors, *extras)
        if len(self._plans) >= MAX_PLANS:
            self._plans.clear()
        if plan is _UNSEEN or not self._kernels_recordable():
            # a signature is recorded at its second call: shapes that never come back (a length per batch) cost
            # only the key, not a recording each
            self._plans[key] = _SEEN_ONCE if plan is _UNSEEN else None
            return self.fn(*tensors, *extras)
        with launch.recording() as recorded, _OnlyAllocationsAndViews() as ops:
            outputs = self.fn(*tensors, *extras)
        plan = (_build_plan(tensors, outputs, recorded, ops.allocated) if recorded.complete and not ops.other
                else None)
        self._plans[key] = plan
        return outputs
