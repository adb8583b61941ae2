"""The small sums that end a backward (weight and bias gradients from per-program partials), as Triton kernels.

The backward kernels leave float32 partial sums (one row per program, per chunk or per split of a group), and
torch's `sum(...).to(dtype)` and `copy_` finished them: about 20 PyTorch ops per Mamba-2 layer, each with its own
host cost, between the launches. As launches, a backward is launches and allocations only, which
`plans.Planned` can replay without its Python (BENCHMARKS.md, thirteenth session).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cdiv, fast_launch, next_power_of_2, on_device_of

# kept columns and summed rows of one program's tile (a norm's weight gradient sums about 1,000 rows of partials)
SUM_BLOCK_J = 32
SUM_BLOCK_K = 64


@triton.jit
def _sum_one(parts_ptr, out_ptr, n1, s0, s1, s2, n0, n2, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    j_mask = j < n1
    acc = tl.zeros((BLOCK_J, BLOCK_K), dtype=tl.float32)
    for i in range(0, n0):
        for k0 in range(0, n2, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            # partials are small (a row per program or chunk): 32-bit offsets
            offs = i * s0 + j[:, None] * s1 + k[None, :] * s2
            acc += tl.load(parts_ptr + offs, mask=j_mask[:, None] & (k < n2)[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + j, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=j_mask)


@fast_launch
@triton.jit
def _sum_parts_kernel(p0_ptr, o0_ptr, p1_ptr, o1_ptr, p2_ptr, o2_ptr, n1_0, n1_1, n1_2, s0_0, s0_1, s0_2,
                      s2_0, s2_1, s2_2, n0, n2, s1, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    """out_q[j] = Σ_{i<n0, k<n2} parts_q[i * s0_q + j * s1 + k * s2_q] for j < n1_q, summed in float32 and stored
    in out_q's dtype; pair q = program_id(1) (up to three pairs of one launch share n0, n2 and s1)."""
    which = tl.program_id(1)
    if which == 0:
        _sum_one(p0_ptr, o0_ptr, n1_0, s0_0, s1, s2_0, n0, n2, BLOCK_J, BLOCK_K)
    elif which == 1:
        _sum_one(p1_ptr, o1_ptr, n1_1, s0_1, s1, s2_1, n0, n2, BLOCK_J, BLOCK_K)
    else:
        _sum_one(p2_ptr, o2_ptr, n1_2, s0_2, s1, s2_2, n0, n2, BLOCK_J, BLOCK_K)


def sum_parts(pairs: list[tuple[torch.Tensor, int, torch.dtype]], summed_outer: int, summed_inner: int,
              kept_stride: int) -> list[torch.Tensor]:
    """Sums of float32 partials, one launch for up to three. Each (parts, kept, dtype) of `pairs` is contiguous,
    shaped (summed_outer, kept, summed_inner) with its kept index at `kept_stride` (1: the summed inner index is the
    slowest after the outer one, as in a (rows, kept) partial; summed_inner: as in (batch, heads, chunks)). Returns
    out (kept,) in dtype per pair, out[j] = Σ_{i, k} parts[i, j, k] (zeros where nothing is summed). A (rows,
    kept) partial is summed_outer=1, summed_inner=rows, kept_stride=1."""
    if not 1 <= len(pairs) <= 3:
        raise ValueError(f"sum_parts takes one to three partials; got {len(pairs)}")
    if kept_stride not in (1, summed_inner):
        raise ValueError(f"sum_parts: kept_stride must be 1 or summed_inner ({summed_inner}); got {kept_stride}")
    first = pairs[0][0]
    outs, args, kept, outer_strides, inner_strides = [], [], [], [], []
    for parts, n_kept, dtype in pairs:
        if parts.numel() != summed_outer * n_kept * summed_inner or not parts.is_contiguous():
            raise ValueError(f"sum_parts: partials of shape {tuple(parts.shape)} are not a contiguous "
                             f"({summed_outer}, {n_kept}, {summed_inner}) set")
        out = torch.empty(n_kept, dtype=dtype, device=first.device)
        outs.append(out)
        args += [parts, out]
        kept.append(n_kept)
        outer_strides.append(n_kept * summed_inner)
        inner_strides.append(n_kept if kept_stride == 1 else 1)
    while len(kept) < 3:  # unused pairs: never read (their program axis is not launched)
        args += [first, outs[0]]
        kept.append(0)
        outer_strides.append(0)
        inner_strides.append(0)
    if max(kept):
        with on_device_of(first):
            _sum_parts_kernel[(cdiv(max(kept), SUM_BLOCK_J), len(pairs))](
                *args, *kept, *outer_strides, *inner_strides, summed_outer, summed_inner, kept_stride,
                BLOCK_J=SUM_BLOCK_J, BLOCK_K=SUM_BLOCK_K, num_warps=4)
    return outs


@triton.jit
def _sum_split_one(parts_ptr, out_ptr, stride_b, stride_t, n_rows, L, splits_per_group, N, BLOCK_R: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    g = tl.program_id(1)
    n = tl.arange(0, BLOCK_N)
    mask = (r < n_rows)[:, None] & (n < N)[None, :]
    part = (r[:, None] * tl.num_programs(1) * splits_per_group + g * splits_per_group) * N + n[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for j in range(0, splits_per_group):
        acc += tl.load(parts_ptr + part + j * N, mask=mask, other=0.0)
    out_rows = (r // L) * stride_b + (r % L) * stride_t
    tl.store(out_ptr + out_rows[:, None] + g * N + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@fast_launch
@triton.jit
def _sum_splits_kernel(p0_ptr, o0_ptr, p1_ptr, o1_ptr, n_rows, L, splits_per_group, N, stride_o0_b, stride_o0_t,
                       stride_o1_b, stride_o1_t, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """out_q[b, t, g, n] = Σ_j parts_q[b, t, g * splits_per_group + j, n] (parts float32 contiguous (batch, L,
    groups * splits_per_group, N); out_q in its dtype, (groups, N) packed within a token, any batch and token
    strides). Grid: (row blocks, groups, pairs)."""
    if tl.program_id(2) == 0:
        _sum_split_one(p0_ptr, o0_ptr, stride_o0_b, stride_o0_t, n_rows, L, splits_per_group, N, BLOCK_R, BLOCK_N)
    else:
        _sum_split_one(p1_ptr, o1_ptr, stride_o1_b, stride_o1_t, n_rows, L, splits_per_group, N, BLOCK_R, BLOCK_N)


def sum_splits_into(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """For each (parts, out) of `pairs` (one or two, of one shape): out[b, t, g] = Σ_j parts[b, t, g * k + j] with
    parts float32 contiguous (batch, seqlen, groups * k, d_state) and out (batch, seqlen, groups, d_state) of any
    dtype, (groups, d_state) packed within a token, any batch and token strides (a column slice of a wider
    gradient). One launch."""
    if not 1 <= len(pairs) <= 2:
        raise ValueError(f"sum_splits_into takes one or two partials; got {len(pairs)}")
    parts0, out0 = pairs[0]
    batch, seqlen, groups, d_state = out0.shape
    for parts, out in pairs:
        # (the kernel writes out_ptr + b * stride_b + t * stride_t + g * d_state + n: a dimension of size 1 may
        # have any stride)
        packed = (d_state <= 1 or out.stride(3) == 1) and (groups <= 1 or out.stride(2) == d_state)
        if (out.shape != out0.shape or parts.shape != parts0.shape or parts.shape[:2] != out.shape[:2]
                or parts.shape[3] != d_state or parts.shape[2] % max(groups, 1) or not parts.is_contiguous()
                or parts.dtype != torch.float32 or not packed):
            raise ValueError(f"sum_splits_into needs float32 contiguous parts (batch, seqlen, groups * k, d_state) "
                             f"and out (batch, seqlen, groups, d_state) packed within a token; got parts "
                             f"{tuple(parts.shape)} {parts.dtype}, out {tuple(out.shape)} strides {out.stride()}")
    rows = batch * seqlen
    if not rows or not groups or not d_state:
        return
    parts1, out1 = pairs[-1]
    block_r = 32
    with on_device_of(out0):
        _sum_splits_kernel[(cdiv(rows, block_r), groups, len(pairs))](
            parts0, out0, parts1, out1, rows, seqlen, parts0.shape[2] // groups, d_state, out0.stride(0),
            out0.stride(1), out1.stride(0), out1.stride(1), BLOCK_R=block_r, BLOCK_N=next_power_of_2(d_state),
            num_warps=4)


@triton.jit
def _sum_middle_one(parts_ptr, out_ptr, n_middle, R, BLOCK: tl.constexpr):
    # (outer row, column block) flattened on grid axis 0, which has room for any size (axes 1 and 2 stop at 65,535)
    blocks = tl.cdiv(R, BLOCK)
    a = (tl.program_id(0) // blocks).to(tl.int64)
    r = (tl.program_id(0) % blocks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = r < R
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for m in range(0, n_middle):
        acc += tl.load(parts_ptr + (a * n_middle + m) * R + r, mask=mask, other=0.0)
    tl.store(out_ptr + a * R + r, acc.to(out_ptr.dtype.element_ty), mask=mask)


@fast_launch
@triton.jit
def _sum_middle_kernel(p0_ptr, o0_ptr, p1_ptr, o1_ptr, n_middle, R, BLOCK: tl.constexpr):
    """out_q[a, r] = Σ_m parts_q[a, m, r] (parts float32 contiguous (A, n_middle, R), out_q contiguous (A, R) in its
    dtype). Grid: (A x column blocks, pairs)."""
    if tl.program_id(1) == 0:
        _sum_middle_one(p0_ptr, o0_ptr, n_middle, R, BLOCK)
    else:
        _sum_middle_one(p1_ptr, o1_ptr, n_middle, R, BLOCK)


def sum_middle(pairs: list[tuple[torch.Tensor, torch.dtype]]) -> list[torch.Tensor]:
    """For each (parts, dtype) of `pairs` (one or two, of one shape): parts float32 contiguous (outer, middle,
    *inner) summed over its middle axis into a new contiguous (outer, *inner) in dtype. One launch."""
    if not 1 <= len(pairs) <= 2:
        raise ValueError(f"sum_middle takes one or two partials; got {len(pairs)}")
    parts0 = pairs[0][0]
    outer, middle, inner = parts0.shape[0], parts0.shape[1], tuple(parts0.shape[2:])
    for parts, _ in pairs:
        if parts.shape != parts0.shape or not parts.is_contiguous() or parts.dtype != torch.float32:
            raise ValueError(f"sum_middle needs float32 contiguous partials of one shape; got {tuple(parts.shape)} "
                             f"{parts.dtype}, contiguous {parts.is_contiguous()}")
    outs = [torch.empty((outer, *inner), dtype=dtype, device=parts0.device) for _, dtype in pairs]
    size = outs[0].numel() // max(outer, 1)
    if outs[0].numel():
        block = min(next_power_of_2(size), 1024)
        with on_device_of(parts0):
            _sum_middle_kernel[(outer * cdiv(size, block), len(pairs))](
                parts0, outs[0], pairs[-1][0], outs[-1], middle, size, BLOCK=block, num_warps=4)
    return outs
