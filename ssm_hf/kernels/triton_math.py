"""Triton helpers shared by the kernels: elementwise float32 math, and strides rebuilt as known multiples."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def log1p_small(e):
    """log(1 + e) for 0 ≤ e ≤ 1 to a few ulp: log(u) e / (u - 1) with u = 1 + e rounded cancels u's rounding (a
    plain log(1 + e) keeps nothing of e below float32's epsilon, and errs by ~1e-6 relative at e ~ 1e-2)."""
    u = 1.0 + e
    return tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def softplus(v):
    """softplus as torch computes it (threshold 20: v itself above), with its tiny values for very negative v
    (exp(v) where a plain log(1 + exp(v)) gives 0, below v ≈ -17)."""
    return tl.where(v > 20.0, v, tl.maximum(v, 0.0) + log1p_small(tl.exp(-tl.abs(v))))


@triton.jit
def aligned(stride, ALIGN: tl.constexpr):
    """A stride the host found to be a multiple of ALIGN elements (`launch.row_alignment`), rebuilt as one so that
    the compiler sees it and loads rows in vectors (`tl.multiple_of` has no effect on an argument)."""
    return (stride // ALIGN) * ALIGN
