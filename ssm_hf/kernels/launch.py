"""Where a Triton kernel launches: on the device of its tensors, not on the process's current CUDA device."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import threading
from collections.abc import Iterator
from functools import lru_cache

import torch

logger = logging.getLogger(__name__)


_NO_SWITCH = contextlib.nullcontext()  # stateless: one instance serves every `with`


def on_device_of(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context that makes `tensor`'s CUDA device current while a kernel launches.

    Triton launches on the current device; with a model split over GPUs (`device_map="auto"`), layer k's tensors
    may live on cuda:1 while the current device is cuda:0, so every launch site enters this first. CPU tensors
    (Triton's interpreter, in tests) and tensors on the current device need no switch: `torch.cuda.device`'s
    context costs about 4 us of host time per launch site on the device's host, a comparison under 1 us."""
    if not tensor.is_cuda:
        return _NO_SWITCH
    index = tensor.device.index
    return _NO_SWITCH if index == torch.cuda.current_device() else torch.cuda.device(index)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids; plain Python, since `triton.cdiv` is a constexpr function that costs a few
    microseconds of host time per call (a training step of a 24-layer model calls these about a thousand times)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as `triton.next_power_of_2`, in plain Python (see `cdiv`)."""
    return 1 << max(n - 1, 0).bit_length()


# CUDA's limit on the second and third axes of a launch grid (the first may reach 2**31 - 1)
MAX_GRID_YZ = 65535


def check_grid_axis(programs: int, what: str,
                    remedy: str = "split the row (e.g. pack the sequences into several rows)") -> None:
    """NotImplementedError naming `what` (and `remedy`) when `programs` (a grid's second or third axis) exceeds
    CUDA's limit: the launch would fail with an opaque 'invalid argument' (Triton's interpreter has no such limit,
    so CPU tests would never show it)."""
    if programs > MAX_GRID_YZ:
        raise NotImplementedError(f"{what} needs {programs} programs on one launch-grid axis, above CUDA's "
                                  f"{MAX_GRID_YZ}: {remedy}.")


def row_alignment(*strides: int) -> int:
    """The largest of 16, 8, 4, 2, 1 that divides every stride (in elements).

    Triton specialises an integer argument only on whether it is a multiple of 16, so a row stride such as
    Mamba-2's in_proj width (2 * d_inner + 2 * groups * d_state + heads, e.g. 3352 = 8 x 419) makes every load of a
    row view scalar. A kernel given A = row_alignment(stride) as a constexpr rebuilds the stride as (stride // A) * A,
    which the compiler can see is a multiple of A (`tl.multiple_of` has no effect on an argument), and reads 16 bytes
    at a time again."""
    alignment = 16
    while alignment > 1 and any(stride % alignment for stride in strides):
        alignment //= 2
    return alignment


@lru_cache(maxsize=None)
def _device_multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessors(tensor: torch.Tensor) -> int | None:
    """The streaming multiprocessors of `tensor`'s GPU (None on the CPU), for launch plans; cached: asking the
    driver on every call costs more host time than a short sequence's kernels take."""
    return _device_multiprocessors(tensor.device.index) if tensor.is_cuda else None


class _NoGradContext:
    """Stands in for an autograd Function's ctx when its forward runs outside autograd: nothing is kept."""

    def __init__(self, inputs: int):
        self.needs_input_grad = (False,) * inputs

    def save_for_backward(self, *tensors) -> None:
        pass

    def set_materialize_grads(self, value: bool) -> None:
        pass


def apply_function(function: type[torch.autograd.Function], *args):
    """`function.apply(*args)`; where autograd records nothing (gradients disabled, as in generation and scoring
    under no_grad or inference_mode, and not under torch.compile), the function's forward called directly with a
    context that keeps nothing: the same outputs, without `apply`'s own host time (about 8 us per call on the
    device's host, two or three calls per layer)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return function.apply(*args)
    return function.forward(_NoGradContext(len(args)), *args)


# ---------------------------------------------------------------------------------------------------------------------
# Launches with less host time
#
# Each `kernel[grid](...)` through `JITFunction.run` works out the launch's specialisation again (the binder visits
# every argument, the cache key is rebuilt with a string of the options), builds launch metadata and calls two empty
# hook chains before the compiled launcher runs: 24-59 us of host time per launch of our kernels on the device's
# host, and a 24-layer Mamba-2 training step launches 314 (BENCHMARKS.md, tenth session). `FastLaunch` keeps, per
# kernel, the compiled kernel Triton returned under a key at least as fine as Triton's specialisation, and on a hit
# calls its launcher as `JITFunction.run` does once it has the kernel: 16-51 us per launch there; with it the median
# training step of the 130M models took 5-23% less wall time in three processes (eager decoding: +3% to -40%).

_Tensor = torch.Tensor  # a module global: looked up once per argument on every launch


@lru_cache(maxsize=None)
def _triton_runtime() -> tuple | None:
    """(knobs, driver, JITFunction) of the installed Triton; None without Triton or before 3.4 (no `knobs`), where
    kernels keep Triton's own launches. (Imported here, in a try block, so that this module needs no Triton, and
    transformers' remote-code check does not ask for it.)"""
    try:
        from triton import knobs
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction
    except ImportError:
        return None
    return knobs, driver, JITFunction


def _argument_key(args: tuple) -> tuple | None:
    """A key of the positional runtime arguments, at least as fine as Triton's specialisation of them: a tensor's
    dtype and its address modulo 16; an int's class (equal to 1, a multiple of 16, 32-bit, below 2**63: what Triton
    asks) as one small code; a bool's value (after `bool`, so that True and the code 1 never meet); float; None.
    Flat (one or two entries per argument; the first entry's type says which), to build fast. None for any other
    argument (such a launch is not cached)."""
    key = []
    append = key.append
    for arg in args:
        kind = type(arg)
        if kind is int:
            append((arg == 1) | (not arg & 15) << 1 | (-0x80000000 <= arg <= 0x7FFFFFFF) << 2
                   | (arg < 0x8000000000000000) << 3)
        elif kind is _Tensor or isinstance(arg, _Tensor):
            append(arg.dtype)
            append(arg.data_ptr() & 15)
        elif arg is None:
            append(None)
        elif kind is bool:
            append(bool)
            append(arg)
        elif kind is float:
            append(float)
        else:
            return None
    return tuple(key)


_TRITON_LAUNCH_CALL = ("kernel.run(grid_0,grid_1,grid_2,stream,kernel.function,kernel.packed_metadata,launch_metadata,"
                       "knobs.runtime.launch_enter_hook,knobs.runtime.launch_exit_hook,*bound_args.values())")

_PROBE_INTS = (1, 2, 3, 8, 15, 16, 17, 31, 32, 48, 64, 100, 128, 256, 4096, 65536, 0x7FFFFFF0, 0x7FFFFFFF, 1 << 31,
               1 << 32, 1 << 40, (1 << 63) - 16, 1 << 63, (1 << 64) - 16, 0, -1, -16, -32, -(1 << 31), -(1 << 31) - 16)


@lru_cache(maxsize=None)
def _keys_separate_triton_specialisations() -> bool:
    """Whether `JITFunction.run` launches a compiled kernel as FastLaunch does, and `_argument_key` separates every
    pair of probe arguments that the installed Triton specialises apart: ints of every width, bools, a float, None,
    tensors at byte offsets 0 to 256 in two dtypes. False (and Triton's own path everywhere) if a Triton version
    launches otherwise, specialises on something the key misses, or cannot be asked."""
    runtime = _triton_runtime()
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend

        # the launcher call FastLaunch repeats (Triton 3.6 and 3.9); any other form: Triton's own path
        source = inspect.getsource(runtime[2].run)
    except (ImportError, OSError, TypeError):
        return False
    if _TRITON_LAUNCH_CALL not in "".join(source.split()):
        logger.info("Triton's launches keep their own path: JITFunction.run launches differently than FastLaunch")
        return False
    storage = {dtype: torch.empty(512, dtype=torch.uint8).view(dtype) for dtype in (torch.bfloat16, torch.float32)}
    probes = [*_PROBE_INTS, True, False, 0.5, None]
    for dtype, tensor in storage.items():
        probes += [tensor[offset // tensor.element_size():] for offset in (0, 4, 8, 12, 16, 32, 48, 64, 128, 256)]
    seen: dict = {}
    for probe in probes:
        try:
            triton_key = repr(native_specialize_impl(BaseBackend, probe, False, True, True))
        except Exception:  # an argument kind this Triton asks about differently
            return False
        ours = _argument_key((probe,))
        if seen.setdefault(ours, triton_key) != triton_key:
            logger.info("Triton's launches keep their own path: it specialises %r apart from another argument "
                        "of the same key (%s vs %s)", probe, triton_key, seen[ours])
            return False
    return True


def launch_cache_enabled() -> bool:
    """False with the environment variable SSM_HF_TRITON_LAUNCH_CACHE=0 (Triton's own launch path everywhere, for
    debugging; read at each launch) or where the installed Triton's specialisation is not what the cache's key
    assumes."""
    return (os.environ.get("SSM_HF_TRITON_LAUNCH_CACHE", "") not in ("0", "false", "False")
            and _keys_separate_triton_specialisations())


# keys kept per kernel before its cache starts again (each a few hundred bytes)
MAX_CACHED_LAUNCHES = 1024


def triton_path_required() -> bool:
    """Whether every launch must go through Triton's own path now, whatever the kernel: under torch.compile, where
    `launch_cache_enabled()` is false, and with Triton's launch hooks, debug, instrumentation or stage-inspection
    knobs on (what else enters Triton's cache key or launch)."""
    if torch.compiler.is_compiling() or not launch_cache_enabled():
        return True
    knobs = _triton_runtime()[0]
    runtime, compilation = knobs.runtime, knobs.compilation
    return (_hook_set(runtime.launch_enter_hook) or _hook_set(runtime.launch_exit_hook) or bool(runtime.debug)
            or bool(compilation.instrumentation_mode)
            or getattr(runtime, "add_stages_inspection_hook", None) is not None
            or bool(getattr(compilation, "fpsan_homomorphic_casts", False)))


def current_stream(device: int) -> int:
    """The raw handle of the current CUDA stream of `device`, as Triton's launcher takes it."""
    return _triton_runtime()[1].active.get_current_stream(device)


class Recording:
    """The launches FastLaunch makes in this thread while it is `recording()`: per launch, the compiled kernel's
    cache entry (kernel, launcher, function, metadata, the constexpr tail), the grid and the positional arguments.
    `complete` turns False at a launch that went through Triton's own path (nothing to repeat it with)."""

    def __init__(self):
        self.launches: list = []
        self.complete = True

    def note(self, jit, entry: tuple, grid: tuple, args: tuple) -> None:
        """jit: the launched JITFunction; entry: FastLaunch's cache entry of the compiled kernel."""
        self.launches.append((jit, entry, grid, args))


_RECORDING = threading.local()


def recording_now() -> bool:
    """Whether FastLaunch is noting this thread's launches (inside `recording()`)."""
    return getattr(_RECORDING, "current", None) is not None


@contextlib.contextmanager
def recording() -> Iterator[Recording]:
    """Inside, FastLaunch notes each launch of this thread in the Recording yielded (see `plans.Planned`)."""
    outer = getattr(_RECORDING, "current", None)
    _RECORDING.current = recorded = Recording()
    try:
        yield recorded
    finally:
        _RECORDING.current = outer


def _hook_set(hook) -> bool:
    """Whether a Triton launch hook is set: recent versions keep an empty `HookChain` (its `calls`) rather than
    None, and still call it on every launch."""
    return hook is not None and bool(getattr(hook, "calls", True))


class FastLaunch:
    """A `@triton.jit` kernel launched as `kernel[grid](*args, **constexprs)`, with less host time per launch.

    The first launch of each key (device, `_argument_key` of the positional arguments, the keyword arguments) goes
    through Triton (compiling if need be); later ones reuse the compiled kernel it returned and call its launcher
    with the arguments in the kernel's order, as `JITFunction.run` does once it has the kernel. Triton's own path
    runs instead under torch.compile, with launch hooks or pre-run hooks set, with Triton's debug, instrumentation
    or stage-inspection knobs on, for a callable grid, a constexpr passed positionally, a GPU other than NVIDIA's,
    and where `launch_cache_enabled()` is false. Unlike Triton's path, a cached launch does not check that the
    module globals the kernel read when it compiled are unchanged: the kernels here read only fixed constants."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)
        self._kernels: dict = {}
        self._driver = _triton_runtime()[1]  # looked up on every launch
        # Triton keys a constexpr by its value: launches that pass one positionally keep Triton's path
        self._positional_limit = next((i for i, param in enumerate(fn.params) if param.is_constexpr),
                                      len(fn.params))

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def __getattr__(self, name: str):
        # the kernel's own attributes (arg_names, params, warmup, ...): a FastLaunch stands in for its JITFunction
        if name == "fn":
            raise AttributeError(name)
        return getattr(self.fn, name)

    def __repr__(self) -> str:
        return f"FastLaunch({self.fn!r})"

    def _triton_path(self) -> bool:
        return triton_path_required() or bool(self.fn.debug) or bool(self.fn.pre_run_hooks)

    def _through_triton(self, grid, args: tuple, kwargs: dict, recording):
        if recording is not None:  # a launch the recording cannot repeat
            recording.complete = False
        return self.fn[grid](*args, **kwargs)

    def _launch(self, grid, args: tuple, kwargs: dict):
        recording = getattr(_RECORDING, "current", None)
        if callable(grid) or len(args) > self._positional_limit or self._triton_path():
            return self._through_triton(grid, args, kwargs, recording)
        argument_key = _argument_key(args)
        if argument_key is None:
            return self._through_triton(grid, args, kwargs, recording)
        active = self._driver.active
        device = active.get_current_device()
        key = (device, argument_key, tuple(kwargs.items()))
        try:
            cached = self._kernels.get(key)
        except TypeError:  # an unhashable keyword value (a list for a tuple constexpr): Triton's path
            return self._through_triton(grid, args, kwargs, recording)
        if cached is None:
            if len(self._kernels) >= MAX_CACHED_LAUNCHES:
                self._kernels.clear()
            kernel = self.fn[grid](*args, **kwargs)
            if kernel is not None and hasattr(kernel, "result"):  # an asynchronous compile's future
                kernel = kernel.result()
            tail = self._tail(len(args), kwargs)
            # NVIDIA only: other backends specialise on more (AMD's buffer ops on a tensor's size)
            if (kernel is not None and tail is not None and hasattr(kernel, "run")
                    and getattr(active.get_current_target(), "backend", None) == "cuda"):
                # the launcher, the loaded function and the metadata Triton passes it: fixed once launched
                cached = self._kernels[key] = (kernel, kernel.run, kernel.function, kernel.packed_metadata, tail)
                if recording is not None:
                    recording.note(self.fn, cached, grid, args)
            elif recording is not None:
                recording.complete = False
            return kernel
        kernel, run, function, metadata, tail = cached
        run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
            active.get_current_stream(device), function, metadata, None, None, None, *args, *tail)
        if recording is not None:
            recording.note(self.fn, cached, grid, args)
        return kernel

    def _tail(self, positional: int, kwargs: dict) -> tuple | None:
        """The kernel's arguments after the positional ones, in its parameter order: from the keywords, else the
        parameter's default; None if one has neither, or if a keyword gives a runtime (not constexpr) argument:
        the tail is kept for later launches, so it may hold only values the key compares (constexprs)."""
        tail = []
        for param in self.fn.params[positional:]:
            if param.name in kwargs:
                if not param.is_constexpr:
                    return None
                tail.append(kwargs[param.name])
            elif param.default is not inspect.Parameter.empty:
                tail.append(param.default)
            else:
                return None
        return tuple(tail)


def fast_launch(fn):
    """Decorator (above `@triton.jit`) making a kernel a `FastLaunch`; an interpreted kernel (TRITON_INTERPRET=1),
    or any kernel under a Triton older than 3.4, is returned as it is."""
    runtime = _triton_runtime()
    return FastLaunch(fn) if runtime is not None and isinstance(fn, runtime[2]) else fn
