"""Compile every Triton kernel launch of ssm_hf for real NVIDIA GPUs, on a machine without one.

Run as a script (by tests/test_kernels_compile.py) in a process where TRITON_INTERPRET is unset, so that the
kernels are real `JITFunction`s:

    env -u TRITON_INTERPRET PYTHONPATH=. python tests/kernel_launches.py OUT.json --arch 90 --arch 80 [--full]

CI otherwise runs the kernels only in Triton's interpreter, which accepts code the GPU compiler rejects. Here every
public op of `ssm_hf.kernels` (and one-layer Mamba and Mamba-2 models, which call them with their own mix of
dtypes) runs with CPU tensors while Triton believes a GPU of each target is current: a stand-in driver answers Triton's
device questions and Triton's `jit_cache_hook` records each launch's specialisation (argument types, alignment,
constexprs, options) exactly as `JITFunction.run` computes it, then tells Triton to skip the compile, so nothing
launches. The recorded launches, deduplicated, are then compiled to cubin (ptxas included) for each target, in a
few processes. The result (JSON) lists, per compiled variant, the error if any, registers, spills and shared
memory, and every `kernel[grid](...)` launch site found in the package's source, so that a kernel no driver below
reaches is reported rather than silently unchecked.

The op drivers' tensors hold garbage after a "launch" (the outputs are never written): only shapes, dtypes and
which optional inputs are passed matter.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import json
import multiprocessing
import os
import pkgutil
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("kernel_launches.py must run without TRITON_INTERPRET: interpreted kernels cannot be compiled")

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.driver import driver as triton_driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# the most shared memory one program may use (opt-in maximum per block): a kernel above it compiles but its launch
# fails with OutOfResources
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


class _TargetDriver(DriverBase):
    """Triton's view of "the current GPU" without one: device i is target i, streams are 0. Only what
    `JITFunction.run` asks before compiling is answered; a launch never happens (the cache hook stops it)."""

    def __init__(self, targets: list[GPUTarget]):
        self.targets = targets
        self.device = 0

    @classmethod
    def is_active(cls) -> bool:
        return False

    def get_current_device(self) -> int:
        return self.device

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.targets[self.device]

    def get_active_torch_device(self):
        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("no launcher is built for a recorded launch")

    def get_benchmarker(self):
        raise NotImplementedError("nothing runs: launches are only recorded")


@dataclass
class Launch:
    """One specialisation of one kernel for one target, as `JITFunction.run` would compile it."""

    kernel: JITFunction
    target: GPUTarget
    signature: dict
    constants: dict
    attrs: dict
    options: dict
    scenarios: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.kernel.fn.__module__}.{self.kernel.fn.__qualname__}"

    def variant(self) -> str:
        """Argument types and constexpr values, e.g. `x_ptr=*bf16 L=i32 HAS_D=True ... num_warps=4`."""
        values = {path[0]: value for path, value in self.constants.items() if len(path) == 1}
        parts = []
        for index, (param, ty) in enumerate(zip(self.kernel.arg_names, self.signature.values())):
            parts.append(f"{param}={values.get(index)!r}" if ty == "constexpr" else f"{param}:{ty}")
        parts.append(f"num_warps={self.options.get('num_warps')} num_stages={self.options.get('num_stages')}")
        return " ".join(parts)


# How widely a scenario is compiled: CORE for every target, PRIMARY for the first target only, FULL only in the full
# sweep (argument --full), where every scenario is compiled for every target.
CORE, PRIMARY, FULL = 0, 1, 2


class Recorder:
    """Collects launches (deduplicated, each with the scenarios that made it) while the drivers announce their
    scenarios with `begin`."""

    def __init__(self, targets: list[GPUTarget], full: bool):
        self.driver = _TargetDriver(targets)
        self.full = full
        self.launches: dict[str, Launch] = {}
        self.scenario = ""

    def wanted(self, level: int) -> bool:
        """Whether a scenario of this level is compiled for the current target."""
        return self.full or level == CORE or (level == PRIMARY and self.driver.device == 0)

    def begin(self, scenario: str, level: int) -> bool:
        """Announce the next scenario; False when the current target does not compile it (the driver skips it)."""
        self.scenario = scenario
        return self.wanted(level)

    def hook(self, *, key, repr, fn, compile, is_manual_warmup, already_compiled):  # Triton passes these by keyword
        dedup = compile["specialization_data"]  # name, signature, constants, attrs, options, key and target
        launch = self.launches.get(dedup)
        if launch is None:
            options = json.loads(dedup)["options"]
            options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
            launch = self.launches[dedup] = Launch(
                fn.jit_function, self.driver.get_current_target(), compile["signature"], compile["constants"],
                compile["configs"][0], options)
        if self.scenario not in launch.scenarios:
            launch.scenarios.append(self.scenario)
        return True  # "already handled": Triton neither compiles nor launches

    @contextlib.contextmanager
    def active(self):
        # the stand-in driver stays active afterwards: this process only records and compiles, it never launches
        triton_driver.set_active(self.driver)
        knobs.runtime.jit_cache_hook = self.hook
        try:
            yield self
        finally:
            knobs.runtime.jit_cache_hook = None

    def each_target(self):
        """Make each target current in turn (its own JIT device cache, so Triton parses options for it)."""
        for device in range(len(self.driver.targets)):
            self.driver.device = device
            yield self.driver.targets[device]


# ---------------------------------------------------------------------------------------------------------------
# Drivers: call every public op with the variants the launchers specialise on. Tensors are CPU tensors; the ops
# take the Triton path because `use_triton` (their only device check) is told that any non-float64 tensor is on
# the GPU.

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def flag_variants(names: list[str]):
    """(dtype, flags, level) to drive: every flag on in bfloat16 (CORE), float32 and float16 (PRIMARY); every flag
    off in bfloat16 (PRIMARY) and the other dtypes (FULL); in bfloat16, each flag off alone and on alone (FULL).
    So each flag's code path and its absence are compiled, and every path with each dtype's pointers."""
    on, off = dict.fromkeys(names, True), dict.fromkeys(names, False)
    for dtype in DTYPES:
        yield dtype, on, CORE if dtype == torch.bfloat16 else PRIMARY
        yield dtype, off, PRIMARY if dtype == torch.bfloat16 else FULL
    for name in names:
        yield torch.bfloat16, {**on, name: False}, FULL
        if len(names) > 1:
            yield torch.bfloat16, {**off, name: True}, FULL


def all_on(names: list[str], level: int = FULL):
    """(dtype, every flag on, level) in each dtype: for the other shapes, which change tiles, not code paths."""
    return [(dtype, dict.fromkeys(names, True), level) for dtype in DTYPES]


def _randn(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def _packed_ids(batch: int, seqlen: int) -> torch.Tensor:
    """Three packed sequences per row."""
    t = torch.arange(seqlen)
    return ((t >= seqlen // 3).long() + (t >= 2 * seqlen // 3).long()).expand(batch, -1)


def _backward(outputs, grads):
    pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad and g is not None]
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])


def drive_selective_scan(rec: Recorder, kernels) -> None:
    batch, seqlen, d_inner = 2, 40, 48
    names = ["D", "z", "delta_bias", "softplus", "initial_state", "seq_idx", "grad", "final_grad"]
    # Mamba's; the tiny test models' (a smaller tile); a wide state (64: fewer channels per program, 4x the
    # registers per thread for the state), in bfloat16 with every flag on
    for d_state in (16, 8, 64):
        variants = (flag_variants(names) if d_state == 16 else all_on(names) if d_state == 8
                    else [(torch.bfloat16, dict.fromkeys(names, True), PRIMARY)])
        for dtype, f, level in variants:
            if not rec.begin(f"selective_scan {dtype} d_state={d_state} {f}", level):
                continue
            grad = f["grad"]
            x, delta = (_randn(batch, seqlen, d_inner, dtype=dtype, grad=grad) for _ in range(2))
            A = (-torch.rand(d_inner, d_state)).requires_grad_(grad)
            B, C = (_randn(batch, seqlen, d_state, dtype=dtype, grad=grad) for _ in range(2))
            with torch.set_grad_enabled(grad):
                y, final = kernels.selective_scan(
                    x, delta, A, B, C, D=_randn(d_inner, dtype=dtype, grad=grad) if f["D"] else None,
                    z=_randn(batch, seqlen, d_inner, dtype=dtype, grad=grad) if f["z"] else None,
                    delta_bias=_randn(d_inner, grad=grad) if f["delta_bias"] else None,
                    delta_softplus=f["softplus"],
                    initial_state=_randn(batch, d_inner, d_state, grad=grad) if f["initial_state"] else None,
                    return_final_state=True, seq_idx=_packed_ids(batch, seqlen) if f["seq_idx"] else None)
            if grad:
                _backward([y, final], [torch.randn_like(y), torch.randn_like(final) if f["final_grad"] else None])


def drive_selective_scan_chunked(rec: Recorder, kernels) -> None:
    """The forward cut into chunks walked in parallel (the GPU does it when batch x channel blocks are few)."""
    from ssm_hf.kernels import selective_scan_triton

    batch, d_inner = 2, 48
    # Mamba's state in both dtypes; a wide state (64: the chunk pass loads A row by row, 64 rows) in bfloat16,
    # which a GPU walks in chunks at training shapes (B8 D1536: 1,536 programs for 2,112 wanted on an H100); one
    # token (seqlen 1 is specialised as a constant)
    for dtype, d_state, seqlen, level in ((torch.bfloat16, 16, 40, CORE), (torch.float32, 16, 40, CORE),
                                          (torch.bfloat16, 64, 40, PRIMARY), (torch.bfloat16, 16, 1, PRIMARY)):
        if not rec.begin(f"selective_scan chunked {dtype} d_state={d_state} seqlen={seqlen}", level):
            continue
        saved = dict(selective_scan_triton.FORWARD_CONFIG), dict(selective_scan_triton.BACKWARD_CONFIG)
        selective_scan_triton.FORWARD_CONFIG["min_programs"] = 10**6
        selective_scan_triton.BACKWARD_CONFIG["min_programs"] = 10**6
        try:
            x, delta, z = (_randn(batch, seqlen, d_inner, dtype=dtype, grad=True) for _ in range(3))
            B, C = (_randn(batch, seqlen, d_state, dtype=dtype, grad=True) for _ in range(2))
            y, final = kernels.selective_scan(
                x, delta, (-torch.rand(d_inner, d_state)).requires_grad_(True), B, C, D=_randn(d_inner, dtype=dtype),
                z=z, delta_bias=_randn(d_inner), delta_softplus=True,
                initial_state=_randn(batch, d_inner, d_state), return_final_state=True,
                seq_idx=_packed_ids(batch, seqlen))
            _backward([y, final], [torch.randn_like(y), torch.randn_like(final)])
        finally:
            for config, values in zip((selective_scan_triton.FORWARD_CONFIG, selective_scan_triton.BACKWARD_CONFIG),
                                      saved):
                config.clear()
                config.update(values)


def drive_ssd_scan(rec: Recorder, kernels) -> None:
    from ssm_hf.kernels import ssd_triton

    _drive_ssd_scan(rec, kernels, "")
    # the forward a GPU takes with few long rows (CPU tensors never choose it): long chunks, narrower walker tiles
    saved = ssd_triton.FORWARD_CHUNK, ssd_triton.STATE_TILE
    ssd_triton.FORWARD_CHUNK, ssd_triton.STATE_TILE = ssd_triton.LONG_CHUNK, ssd_triton.LONG_CHUNK_TILE
    try:
        _drive_ssd_scan(rec, kernels, "long chunks ")
    finally:
        ssd_triton.FORWARD_CHUNK, ssd_triton.STATE_TILE = saved
    # CPU tensors get the most gradient heads per program that divides a group's (2 or 4 here); one head per program
    # (what a GPU takes for few short rows) is another code path
    saved_heads = ssd_triton.GRADS_HEADS_PER_PROGRAM
    ssd_triton.GRADS_HEADS_PER_PROGRAM = 1
    try:
        _drive_ssd_scan(rec, kernels, "one head per gradient program ", shapes=((4, 64, 1, 128),))
    finally:
        ssd_triton.GRADS_HEADS_PER_PROGRAM = saved_heads
    # Δ made inside the chunk kernels (bias, softplus, clamp in `_chunk_decays`) rather than once beforehand
    ssd_triton.MAKE_DT_IN_KERNELS = True
    try:
        _drive_ssd_scan(rec, kernels, "Δ made in the chunk kernels ", shapes=((4, 64, 1, 128),))
    finally:
        ssd_triton.MAKE_DT_IN_KERNELS = False


# (heads, head_dim, groups, d_state): Mamba-2's; the tiny test models'; the largest head_dim (other tiles)
SSD_SHAPES = ((4, 64, 1, 128), (4, 16, 2, 8), (2, 128, 1, 64))


def _drive_ssd_scan(rec: Recorder, kernels, plan: str, shapes=SSD_SHAPES) -> None:
    batch, seqlen = 2, 40
    # dt_limit: Δ clamped in the kernels; views: x, B, C as column views of one conv-output-like tensor and Δ of a
    # wider one (row strides that are not the packed sizes), read in place
    names = ["D", "initial_state", "seq_idx", "grad", "final_grad", "dt_bias", "dt_limit", "views"]
    for shape in shapes:
        heads, head_dim, groups, d_state = shape
        variants = flag_variants(names) if head_dim == 64 else all_on(names)
        if head_dim == 128:  # float32 tiles at head_dim 128: the most shared memory (an A100 has the least)
            variants = [(dtype, f, CORE if dtype == torch.float32 else level) for dtype, f, level in variants]
        for dtype, f, level in variants:
            if not rec.begin(f"ssd_scan {plan}{dtype} (heads, head_dim, groups, d_state)={shape} {f}", level):
                continue
            grad = f["grad"]
            if f["views"]:
                widths = [heads * head_dim, groups * d_state, groups * d_state]
                xbc = _randn(batch, seqlen, sum(widths) + 8, dtype=dtype, grad=grad)
                x, B, C = (t.unflatten(-1, (-1, n)) for t, n in zip(xbc[..., 8:].split(widths, -1),
                                                                    (head_dim, d_state, d_state)))
                dt = _randn(batch, seqlen, heads + 24, dtype=dtype, grad=grad)[..., 16:16 + heads]
            else:
                x = _randn(batch, seqlen, heads, head_dim, dtype=dtype, grad=grad)
                dt = _randn(batch, seqlen, heads, dtype=dtype, grad=grad)
                B, C = (_randn(batch, seqlen, groups, d_state, dtype=dtype, grad=grad) for _ in range(2))
            A = (-torch.rand(heads)).requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                y, final = kernels.ssd_scan(
                    x, dt, A, B, C, None, D=_randn(heads, dtype=dtype, grad=grad) if f["D"] else None,
                    dt_bias=_randn(heads, grad=grad) if f["dt_bias"] else None, dt_softplus=True,
                    dt_limit=(1e-3, 0.1) if f["dt_limit"] else None,
                    initial_state=_randn(batch, heads, head_dim, d_state, grad=grad) if f["initial_state"] else None,
                    return_final_state=True, seq_idx=_packed_ids(batch, seqlen) if f["seq_idx"] else None)
            if grad:
                _backward([y, final], [torch.randn_like(y), torch.randn_like(final) if f["final_grad"] else None])


def drive_causal_conv1d(rec: Recorder, kernels) -> None:
    batch, seqlen, channels = 2, 40, 96
    names = ["bias", "past", "seq_idx", "grad", "silu"]
    for width in (4, 2):
        for dtype, f, level in flag_variants(names) if width == 4 else all_on(names):
            if not rec.begin(f"causal_conv1d {dtype} width={width} {f}", level):
                continue
            grad = f["grad"]
            x = _randn(batch, seqlen, channels, dtype=dtype, grad=grad)
            weight = _randn(channels, width, dtype=dtype, grad=grad)
            with torch.set_grad_enabled(grad):
                out = kernels.causal_conv1d(
                    x, weight, _randn(channels, dtype=dtype, grad=grad) if f["bias"] else None,
                    past=_randn(batch, channels, width, dtype=dtype) if f["past"] else None,
                    seq_idx=_packed_ids(batch, seqlen) if f["seq_idx"] else None,
                    activation="silu" if f["silu"] else None)
            if grad:
                out.backward(torch.randn_like(out))


@torch.no_grad()  # the fused decoding steps run outside autograd only
def drive_decode_steps(rec: Recorder, kernels) -> None:
    batch, channels, width = 2, 96, 4
    for dtype, f, level in flag_variants(["bias", "silu"]):
        if rec.begin(f"causal_conv1d_update {dtype} {f}", level):
            kernels.causal_conv1d_update(
                _randn(batch, channels, dtype=dtype), _randn(batch, channels, width, dtype=dtype),
                _randn(channels, width, dtype=dtype), _randn(channels, dtype=dtype) if f["bias"] else None,
                activation="silu" if f["silu"] else None)
    d_inner = 48
    names = ["D", "z", "delta_bias", "softplus", "float32_state"]
    for d_state in (16, 8):
        for dtype, f, level in flag_variants(names) if d_state == 16 else all_on(names):
            if not rec.begin(f"selective_state_update {dtype} d_state={d_state} {f}", level):
                continue
            kernels.selective_state_update(
                _randn(batch, d_inner, d_state, dtype=torch.float32 if f["float32_state"] else dtype),
                _randn(batch, d_inner, dtype=dtype), _randn(batch, d_inner, dtype=dtype), -torch.rand(d_inner, d_state),
                _randn(batch, d_state, dtype=dtype), _randn(batch, d_state, dtype=dtype),
                D=_randn(d_inner, dtype=dtype) if f["D"] else None,
                z=_randn(batch, d_inner, dtype=dtype) if f["z"] else None,
                delta_bias=_randn(d_inner) if f["delta_bias"] else None, delta_softplus=f["softplus"])
    names = ["D", "dt_bias", "softplus", "dt_limit", "float32_state"]
    for shape in ((4, 64, 1, 128), (4, 16, 2, 8)):
        heads, head_dim, groups, d_state = shape
        for dtype, f, level in flag_variants(names) if head_dim == 64 else all_on(names):
            if not rec.begin(f"ssd_state_update {dtype} (heads, head_dim, groups, d_state)={shape} {f}", level):
                continue
            kernels.ssd_state_update(
                _randn(batch, heads, head_dim, d_state, dtype=torch.float32 if f["float32_state"] else dtype),
                _randn(batch, heads, head_dim, dtype=dtype), _randn(batch, heads, dtype=dtype), -torch.rand(heads),
                _randn(batch, groups, d_state, dtype=dtype), _randn(batch, groups, d_state, dtype=dtype),
                _randn(heads, dtype=dtype) if f["D"] else None, _randn(heads) if f["dt_bias"] else None,
                f["softplus"], (0.001, 0.1) if f["dt_limit"] else None)


def drive_rms_norm_gated(rec: Recorder, kernels) -> None:
    rows = 2, 5
    names = ["gate", "grad", "float32_weight"]
    for hidden, group in ((1536, 1536), (128, 16)):  # Mamba-2 130m's (one group); the tiny test models'
        for dtype, f, level in flag_variants(names) if group > 16 else all_on(names):
            if not rec.begin(f"rms_norm_gated {dtype} hidden={hidden} group={group} {f}", level):
                continue
            grad = f["grad"]
            x = _randn(*rows, hidden, dtype=dtype, grad=grad)
            weight = _randn(hidden, dtype=torch.float32 if f["float32_weight"] else dtype, grad=grad)
            with torch.set_grad_enabled(grad):
                y = kernels.rms_norm_gated(x, _randn(*rows, hidden, dtype=dtype, grad=grad) if f["gate"] else None,
                                           weight, group, 1e-5)
            if grad:
                y.backward(torch.randn_like(y))


def drive_add_rms_norm(rec: Recorder, kernels) -> None:
    """The residual add + cast + norm op: the blocks' use (a float32 stream normed in its 16-bit weight's dtype,
    the norm's input kept for the backward) and its other paths (a residual added, kept in float32 or the inputs'
    dtype; the norm reading the stream uncast), with and without gradients."""
    rows, hidden = (2, 5), 768
    for x_dtype, with_residual, residual_dtype, norm_dtype, level in (
            (torch.float32, False, None, torch.bfloat16, CORE), (torch.float32, False, None, torch.float16, PRIMARY),
            (torch.bfloat16, True, torch.float32, torch.bfloat16, PRIMARY), (torch.bfloat16, True, None, None, FULL),
            (torch.bfloat16, False, torch.float32, None, FULL), (torch.float32, True, None, torch.float32, FULL)):
        w_dtype = norm_dtype or x_dtype
        for grad in (True, False):
            if not rec.begin(f"add_rms_norm x {x_dtype} residual {with_residual} stream {residual_dtype} norm "
                             f"{norm_dtype} grad {grad}", level):
                continue
            x = _randn(*rows, hidden, dtype=x_dtype, grad=grad)
            residual = _randn(*rows, hidden, dtype=residual_dtype or x_dtype, grad=grad) if with_residual else None
            weight = _randn(hidden, dtype=w_dtype, grad=grad)
            with torch.set_grad_enabled(grad):
                y, h = kernels.add_rms_norm(x, residual, weight, 1e-5, residual_dtype, norm_dtype)
            if grad:
                torch.autograd.backward([y, h], [torch.randn_like(y), torch.randn_like(h)])


def drive_conv_ssd_norm(rec: Recorder, kernels) -> None:
    """Mamba-2's fused conv + SSD + gated norm with gradients at mamba2-130m's widths, for every target: its
    backward's own kernel variants (the SSD gradients written into column slices, Δ's derivative and the bias's
    partials in the gradient kernel, the partial sums of `sums_triton`); the models drive it too, but only for the
    first target."""
    from ssm_hf.kernels.conv_ssd_norm import Mamba2Shape

    shape = Mamba2Shape(heads=24, head_dim=64, groups=1, d_state=128)
    for dtype, level in ((torch.bfloat16, CORE), (torch.float32, PRIMARY)):
        if not rec.begin(f"conv_ssd_norm {dtype} {shape}", level):
            continue
        zxbcdt = _randn(2, 40, shape.width, dtype=dtype, grad=True)
        params = dict(conv_weight=_randn(shape.conv_dim, 1, 4, dtype=dtype, grad=True),
                      conv_bias=_randn(shape.conv_dim, dtype=dtype, grad=True),
                      dt_bias=_randn(shape.heads, dtype=dtype, grad=True), A_log=_randn(shape.heads, dtype=dtype,
                                                                                           grad=True),
                      D=_randn(shape.heads, dtype=dtype, grad=True), norm_weight=_randn(shape.d_inner, dtype=dtype,
                                                                                         grad=True))
        out = kernels.conv_ssd_norm(zxbcdt, shape, activation="silu", dt_limit=None, norm_group_size=shape.d_inner,
                                    eps=1e-5, chunk_size=256, **params)
        out.backward(torch.randn_like(out))
        with torch.no_grad():  # a prefill continuing a cache: the conv's past inputs and the scan's initial state
            kernels.conv_ssd_norm(zxbcdt, shape, activation="silu", dt_limit=None, norm_group_size=shape.d_inner,
                                  eps=1e-5, chunk_size=256, conv_past=_randn(2, shape.conv_dim, 4, dtype=dtype),
                                  initial_state=_randn(2, shape.heads, shape.head_dim, shape.d_state),
                                  return_final_state=True, **params)


def drive_models(rec: Recorder, kernels) -> None:
    """Mamba and Mamba-2 at their real per-layer sizes (one layer, small vocabulary), calling the ops as the models
    do: training forward+backward (plain, left-padded, packed) and greedy generation (prefill, decoding steps).
    In bfloat16 (PRIMARY, but for generation with padding), and in float32, float16 and float32 weights under
    bfloat16 autocast (mixed precision) (FULL)."""
    import ssm_hf

    batch, seqlen = 2, 40
    ids = torch.randint(1, 256, (batch, seqlen), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, seqlen, dtype=torch.long)
    mask[0, :5] = 0
    packed = {"position_ids": torch.arange(seqlen).remainder(17).expand(batch, -1)}
    for preset in ("mamba-130m", "mamba2-130m"):
        config = ssm_hf.preset_config(preset, num_hidden_layers=1, vocab_size=256, pad_token_id=0,
                                      bos_token_id=None, eos_token_id=None)
        for dtype, autocast, level in ((torch.bfloat16, False, PRIMARY), (torch.float32, False, FULL),
                                       (torch.float32, True, FULL), (torch.float16, False, FULL)):
            name = f"{preset} {dtype}" + (" under bfloat16 autocast" if autocast else "")
            if not rec.wanted(level):
                continue
            torch.manual_seed(0)
            model = ssm_hf.AutoModelForCausalLM.from_config(config).to(dtype)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                for label, kwargs in (("plain", {}), ("left-padded", {"attention_mask": mask}), ("packed", packed)):
                    rec.begin(f"{name} train {label}", level)
                    model.train()
                    model(ids, labels=ids, **kwargs).loss.backward()
                model.eval()
                for label, kwargs in (("plain", {}), ("left-padded", {"attention_mask": mask[:, :9]})):
                    if not rec.begin(f"{name} generate {label}", level if label == "plain" else FULL):
                        continue
                    with torch.no_grad():
                        model.generate(ids[:, :9], max_new_tokens=3, do_sample=False, **kwargs)


DRIVERS = (drive_selective_scan, drive_selective_scan_chunked, drive_ssd_scan, drive_causal_conv1d,
           drive_decode_steps, drive_rms_norm_gated, drive_add_rms_norm, drive_conv_ssd_norm, drive_models)


# ---------------------------------------------------------------------------------------------------------------
# Launch sites in the source: `name[grid](...)` where `name` is a module-level JITFunction (or a wrapper of one)


def _jit_of(obj):
    while obj is not None and not isinstance(obj, JITFunction):
        obj = getattr(obj, "fn", None)  # Autotuner / Heuristics wrap the JITFunction as .fn
    return obj


def _resolve(module, expression: ast.expr):
    """The object a `name` or `name.attr...` expression names in the module's globals, else None (a local)."""
    attributes = []
    while isinstance(expression, ast.Attribute):
        attributes.append(expression.attr)
        expression = expression.value
    if not isinstance(expression, ast.Name):
        return None
    obj = getattr(module, expression.id, None)
    for attribute in reversed(attributes):
        obj = getattr(obj, attribute, None)
    return obj


def launch_sites(package: str = "ssm_hf") -> dict[str, list[str]]:
    """Every `kernel[grid](...)` in the package's modules that define or import Triton kernels: kernel's full name
    -> ['module.py:line', ...]."""
    root = importlib.import_module(package)
    sites: dict[str, list[str]] = {}
    for info in pkgutil.walk_packages(root.__path__, package + "."):
        spec = importlib.util.find_spec(info.name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        source = Path(spec.origin).read_text()
        if "triton" not in source:
            continue
        module = importlib.import_module(info.name)
        for node in ast.walk(ast.parse(source)):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)):
                continue
            kernel = _jit_of(_resolve(module, node.func.value))
            if kernel is not None:
                name = f"{kernel.fn.__module__}.{kernel.fn.__qualname__}"
                sites.setdefault(name, []).append(f"{Path(spec.origin).name}:{node.lineno}")
    return sites


# ---------------------------------------------------------------------------------------------------------------
# Compiling

LAUNCHES: list[Launch] = []  # read by the forked compile workers


@contextlib.contextmanager
def _captured_output():
    """Collect what this process writes to stdout and stderr (ptxas' log via print, MLIR diagnostics from C++)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        text = []
        try:
            yield text
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sink.seek(0)
            text.append(sink.read().decode(errors="replace"))


def _ptxas_numbers(log: str) -> dict:
    found = {}
    if m := re.search(r"Used (\d+) registers", log):
        found["registers"] = int(m.group(1))
    if m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log):
        found["spill_stores"], found["spill_loads"] = int(m.group(1)), int(m.group(2))
    if m := re.search(r"(\d+) bytes stack frame", log):
        found["stack_frame"] = int(m.group(1))
    return found


def compile_one(index: int) -> dict:
    launch = LAUNCHES[index]
    result = {"kernel": launch.name, "arch": launch.target.arch, "variant": launch.variant(),
              "scenarios": launch.scenarios[:3], "n_scenarios": len(launch.scenarios)}
    start = time.perf_counter()
    with _captured_output() as output:
        try:
            src = ASTSource(launch.kernel, launch.signature, launch.constants, launch.attrs)
            compiled = triton.compile(src, target=launch.target, options=launch.options)
        except Exception as error:  # any compiler failure is the finding
            compiled = None
            result["error"] = f"{type(error).__name__}: {error}"
    result["seconds"] = round(time.perf_counter() - start, 2)
    log = output[0]
    if compiled is None:
        diagnostics = [line for line in log.splitlines() if "error" in line.lower()]
        result["error"] = (result["error"][:6000] + ("\n" + "\n".join(diagnostics[-20:]) if diagnostics else ""))
        return result
    result.update(_ptxas_numbers(log))
    if result.get("spill_stores") or result.get("spill_loads"):
        result["ptxas"] = [line.strip() for line in log.splitlines() if "bytes" in line or "registers" in line]
    result["shared"] = compiled.metadata.shared
    limit = MAX_SHARED_BYTES.get(launch.target.arch)
    if limit is not None and compiled.metadata.shared > limit:
        result["error"] = (f"OutOfResources: {compiled.metadata.shared} bytes of shared memory, above sm_"
                           f"{launch.target.arch}'s {limit}: the launch would fail")
    return result


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="where the JSON report goes")
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (H100), 80 (A100); "
                        "the first one also gets the PRIMARY scenarios (default: 90 and 80)")
    parser.add_argument("--full", action="store_true", help="every scenario for every target (minutes)")
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8), help="compile processes")
    args = parser.parse_args(argv)
    archs = args.arch or [90, 80]

    started = time.perf_counter()
    import ssm_hf.kernels as kernels

    knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report (registers, spills) is printed; compile_one captures it

    recorder = Recorder([GPUTarget("cuda", arch, 32) for arch in archs], args.full)
    # the ops' only device check: pretend any non-float64 tensor is on a GPU, so that they take the Triton path
    kernels.use_triton = lambda tensor: tensor.dtype != torch.float64
    drive_errors = []
    with recorder.active():
        for target in recorder.each_target():
            for drive in DRIVERS:
                try:
                    drive(recorder, kernels)
                except Exception:  # reported, the other drivers still run
                    drive_errors.append(f"sm_{target.arch} {drive.__name__} ({recorder.scenario}):\n"
                                        f"{traceback.format_exc()}")
    recorded = time.perf_counter()
    LAUNCHES.extend(recorder.launches.values())
    # the slow ones (backward kernels) first, so that the last task of each worker is a short one
    order = sorted(range(len(LAUNCHES)), key=lambda i: not re.search("grads|bwd", LAUNCHES[i].name))
    if args.workers > 1:
        with multiprocessing.get_context("fork").Pool(args.workers) as pool:
            results = list(pool.imap_unordered(compile_one, order))
    else:
        results = [compile_one(i) for i in order]
    report = {
        "archs": archs,
        "full": args.full,
        "sites": launch_sites(),
        "results": sorted(results, key=lambda r: (r["arch"], r["kernel"], r["variant"])),
        "drive_errors": drive_errors,
        "seconds": {"record": round(recorded - started, 1), "compile": round(time.perf_counter() - recorded, 1)},
    }
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(summary(report))


def summary(report: dict) -> str:
    """Counts per target, then the failures and the variants that spill registers."""
    lines = []
    for arch in report["archs"]:
        results = [r for r in report["results"] if r["arch"] == arch]
        failed = [r for r in results if "error" in r]
        spills = [r for r in results if r.get("spill_stores") or r.get("spill_loads")]
        lines.append(f"sm_{arch}: {len(results)} variants of {len({r['kernel'] for r in results})} kernels compiled, "
                     f"{len(failed)} failed, {len(spills)} spill registers")
        lines += [f"  FAILED {r['kernel']} [{r['variant']}]: {r['error'][:500]}" for r in failed]
        lines += [f"  spills {r.get('spill_stores', 0)}/{r.get('spill_loads', 0)} bytes stored/loaded, "
                  f"{r.get('registers')} registers: {r['kernel']} (by {r['scenarios'][0]})" for r in spills]
    missing = sorted(set(report["sites"]) - {r["kernel"] for r in report["results"]})
    if missing:
        lines.append(f"launch sites no driver reached: {missing}")
    lines.append(f"seconds: {report['seconds']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
