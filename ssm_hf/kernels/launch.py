"""Where a Triton kernel launches: on the device of its tensors, not on the process's current CUDA device."""

from __future__ import annotations

import contextlib
from functools import lru_cache

import torch


def on_device_of(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context that makes `tensor`'s CUDA device current while a kernel launches.

    Triton launches on the current device; with a model split over GPUs (`device_map="auto"`), layer k's tensors
    may live on cuda:1 while the current device is cuda:0, so every launch site enters this first. CPU tensors
    (Triton's interpreter, in tests) need no guard."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


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
