"""Mamba-2's gated RMS norm as Triton kernels (forward and backward), one program per (row, group).

Same function as `norm_torch.rms_norm_gated`: y = weight * n with n = u / rms(u) over each group and
u = x * silu(gate). The backward recomputes u and the group's rms from x and gate rather than storing them. The
gate is read in place through its row stride (Mamba-2's z, a column slice of in_proj's output, is not copied).
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from . import sums_triton
from .launch import (
    apply_function,
    cdiv,
    fast_launch,
    multiprocessors,
    next_power_of_2,
    on_device_of,
    row_alignment,
)
from .norm_torch import sum_dtype
from .plans import Planned
from .sums_triton import sum_parts
from .triton_math import aligned

# Programs per multiprocessor of the backward (all groups together; each sums its rows' share of dweight into its
# own float32 row). Without a GPU (the interpreter) BACKWARD_PROGRAMS_NO_GPU in all. Module-level so that
# bench/gpu_kernels.py can sweep it.
BACKWARD_PROGRAMS_PER_SM = 8
BACKWARD_PROGRAMS_NO_GPU = 512


@triton.jit
def _gated_input(x_ptr, z_ptr, row, cols, mask, H, stride_z, HAS_GATE: tl.constexpr, Z_ALIGN: tl.constexpr):
    # x's row is contiguous (H apart), the gate's rows stride_z apart: a multiple of Z_ALIGN (`aligned`), so that
    # the compiler loads the gate in vectors
    x = tl.load(x_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    z = tl.zeros_like(x)
    u = x
    if HAS_GATE:
        z = tl.load(z_ptr + row * aligned(stride_z, Z_ALIGN) + cols, mask=mask, other=0.0).to(tl.float32)
        u = x * z * tl.sigmoid(z)
    return x, z, u


@triton.jit
def _rms_row_backward(u, dy, w, G, eps):
    # one row's group of G channels: (the gradient of the norm's input u, this row's share of dweight), for y =
    # w * u * rstd; all float32
    rstd = 1.0 / tl.sqrt(tl.sum(u * u, axis=0) / G + eps)
    n = u * rstd
    dn = dy * w
    return rstd * (dn - n * (tl.sum(dn * n, axis=0) / G)), dy * n


@fast_launch
@triton.jit
def _norm_fwd_kernel(x_ptr, z_ptr, w_ptr, y_ptr, H, G, eps, stride_z,
                     HAS_GATE: tl.constexpr, ROUND_TO_INPUT: tl.constexpr, Z_ALIGN: tl.constexpr,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * G + tl.arange(0, BLOCK)
    mask = tl.arange(0, BLOCK) < G
    offs = row * H + cols
    _, _, u = _gated_input(x_ptr, z_ptr, row, cols, mask, H, stride_z, HAS_GATE, Z_ALIGN)
    rstd = 1.0 / tl.sqrt(tl.sum(u * u, axis=0) / G + eps)
    n = u * rstd
    if ROUND_TO_INPUT:  # as the reference: the normalised value is rounded to the input's dtype first
        n = n.to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (n * w).to(y_ptr.dtype.element_ty), mask=mask)


@fast_launch
@triton.jit
def _norm_bwd_kernel(x_ptr, z_ptr, w_ptr, dy_ptr, dx_ptr, dz_ptr, dw_ptr, M, H, G, eps, rows_per_program,
                     stride_z, stride_dz, HAS_GATE: tl.constexpr, Z_ALIGN: tl.constexpr, DZ_ALIGN: tl.constexpr,
                     BLOCK: tl.constexpr):
    # dx and dz are stored in their tensors' dtypes (x's and the gate's), rounded once; dz's rows stride_dz apart
    # (it may be a column slice of a wider gradient), a multiple of DZ_ALIGN as the gate's stride is
    block = tl.program_id(0)
    group = tl.program_id(1)
    cols = group * G + tl.arange(0, BLOCK)
    mask = tl.arange(0, BLOCK) < G
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, rows_per_program):
        row = block * rows_per_program + i
        if row < M:
            offs = row.to(tl.int64) * H + cols
            x, z, u = _gated_input(x_ptr, z_ptr, row.to(tl.int64), cols, mask, H, stride_z, HAS_GATE, Z_ALIGN)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            du, dw_row = _rms_row_backward(u, dy, w, G, eps)
            dw += dw_row
            if HAS_GATE:
                sig = tl.sigmoid(z)
                tl.store(dx_ptr + offs, (du * z * sig).to(dx_ptr.dtype.element_ty), mask=mask)
                tl.store(dz_ptr + row.to(tl.int64) * aligned(stride_dz, DZ_ALIGN) + cols,
                         (du * x * sig * (1.0 + z * (1.0 - sig))).to(dz_ptr.dtype.element_ty), mask=mask)
            else:
                tl.store(dx_ptr + offs, du.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + block.to(tl.int64) * H + cols, dw, mask=mask)


@fast_launch
@triton.jit
def _add_norm_fwd_kernel(x_ptr, r_ptr, h_ptr, w_ptr, y_ptr, u_ptr, H, eps, HAS_RESIDUAL: tl.constexpr,
                         STORE_H: tl.constexpr, ROUND_TO_WEIGHT: tl.constexpr, STORE_U: tl.constexpr,
                         BLOCK: tl.constexpr):
    # one row: h = x + residual in float32, stored (rounded) in h's dtype; the norm reads h rounded to the weight's
    # dtype (ROUND_TO_WEIGHT: a block's norm, as `hidden.to(weight.dtype)` before it) or h as stored, and rounds its
    # normalised value to that same dtype before the weight multiplies it. STORE_U: the norm's input is stored too
    # (for the backward: half of a float32 h's bytes)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    offs = row * H + cols
    h = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = h.to(h_ptr.dtype.element_ty)
    if STORE_H:
        tl.store(h_ptr + offs, h, mask=mask)
    if ROUND_TO_WEIGHT:
        u = h.to(w_ptr.dtype.element_ty).to(tl.float32)
    else:
        u = h.to(tl.float32)
    if STORE_U:
        tl.store(u_ptr + offs, u.to(u_ptr.dtype.element_ty), mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(u * u, axis=0) / H + eps)
    if ROUND_TO_WEIGHT:
        n = (u * rstd).to(w_ptr.dtype.element_ty).to(tl.float32)
    else:
        n = (u * rstd).to(h_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (n * w).to(y_ptr.dtype.element_ty), mask=mask)


@fast_launch
@triton.jit
def _add_norm_bwd_kernel(s_ptr, w_ptr, dy_ptr, dh_ptr, dx_ptr, dr_ptr, dw_ptr, M, H, eps, rows_per_program,
                         HAS_DH: tl.constexpr, STORE_DR: tl.constexpr, ROUND_TO_WEIGHT: tl.constexpr,
                         SAVED_H: tl.constexpr, BLOCK: tl.constexpr):
    # h's gradient: the norm's input gradient (rounded to the norm's input dtype, then to h's, as the casts'
    # backward gives it) plus the gradient reaching h itself (dh, where the caller uses h), rounded to h's
    # dtype once; x's and the residual's gradients are that, each in its own dtype; dweight summed per program.
    # s is what the forward kept: h (SAVED_H) or the norm's input (h float32, rounded to the weight's dtype)
    block = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, rows_per_program):
        row = block * rows_per_program + i
        if row < M:
            offs = row.to(tl.int64) * H + cols
            u = tl.load(s_ptr + offs, mask=mask, other=0.0)
            if ROUND_TO_WEIGHT:
                u = u.to(w_ptr.dtype.element_ty)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            du, dw_row = _rms_row_backward(u.to(tl.float32), dy, w, H, eps)
            dw += dw_row
            if ROUND_TO_WEIGHT:
                du = du.to(w_ptr.dtype.element_ty).to(tl.float32)
            dh = du
            if SAVED_H:
                dh = dh.to(s_ptr.dtype.element_ty).to(tl.float32)
            if HAS_DH:
                dh = dh + tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if SAVED_H:
                dh = dh.to(s_ptr.dtype.element_ty)
            tl.store(dx_ptr + offs, dh.to(dx_ptr.dtype.element_ty), mask=mask)
            if STORE_DR:
                tl.store(dr_ptr + offs, dh.to(dr_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + block.to(tl.int64) * H + cols, dw, mask=mask)


def _row_warps(block: int) -> int:
    """Warps of a program that holds one row (or group) of `block` channels: one per 256 channels, 1 to 8."""
    return min(max(block // 256, 1), 8)


def _backward_programs(x2: torch.Tensor, groups: int) -> tuple[int, int, torch.Tensor]:
    """(programs per group, rows per program, their dweight rows (programs, hidden) float32) of a backward over
    x2: (rows, hidden). Each program stores its row; without rows no kernel runs and dweight is zero."""
    rows, hidden = x2.shape
    sms = multiprocessors(x2)
    total = BACKWARD_PROGRAMS_PER_SM * sms if sms is not None else BACKWARD_PROGRAMS_NO_GPU
    programs = max(min(rows, total // max(groups, 1)), 1)
    dw = (torch.empty if rows else torch.zeros)((programs, hidden), dtype=torch.float32, device=x2.device)
    return programs, cdiv(max(rows, 1), programs), dw


def _sum_rows(dw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dweight in dtype from the backward's float32 rows (programs, hidden) (a launch: `sums_triton`)."""
    return sum_parts([(dw, dw.shape[1], dtype)], 1, dw.shape[0], kept_stride=1)[0]


def norm_forward(x2: torch.Tensor, z2: torch.Tensor | None, weight: torch.Tensor, group_size: int,
                 eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """The forward kernel, outside autograd. x2: (rows, hidden) contiguous; z2: (rows, hidden) gate with
    contiguous columns and any row stride, or None; weight: (hidden,) contiguous. Returns (rows, hidden) in
    out_dtype."""
    rows, hidden = x2.shape
    y = torch.empty((rows, hidden), dtype=out_dtype, device=x2.device)
    block = next_power_of_2(group_size)
    if rows:
        with on_device_of(x2):
            _norm_fwd_kernel[(rows, hidden // group_size)](
                x2, z2 if z2 is not None else x2, weight, y, hidden, group_size, eps,
                z2.stride(0) if z2 is not None else hidden,
                HAS_GATE=z2 is not None, ROUND_TO_INPUT=x2.dtype != torch.float32,
                Z_ALIGN=row_alignment(z2.stride(0)) if z2 is not None else 1, BLOCK=block,
                num_warps=_row_warps(block))
    return y


def norm_backward(x2: torch.Tensor, z2: torch.Tensor | None, weight: torch.Tensor, dy: torch.Tensor,
                  group_size: int, eps: float, dz: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The backward kernel, outside autograd, for `norm_forward`'s arguments and dy (rows, hidden) contiguous.
    dz: where to write the gate's gradient ((rows, hidden) in the gate's dtype, contiguous columns, any row stride:
    a column slice of a wider gradient), or None for a new contiguous tensor. Returns (dx, dz or None without a
    gate, dweight in weight's dtype)."""
    rows, hidden = x2.shape
    dx = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
    if z2 is not None and dz is None:
        dz = torch.empty(x2.shape, dtype=z2.dtype, device=x2.device)
    elif dz is not None and (dz.shape != x2.shape or dz.stride(-1) != 1):
        raise ValueError(f"dz must have shape {tuple(x2.shape)} with contiguous columns; got shape "
                         f"{tuple(dz.shape)}, strides {dz.stride()}")
    programs, rows_per_program, dw = _backward_programs(x2, hidden // group_size)
    block = next_power_of_2(group_size)
    if rows:
        with on_device_of(x2):
            _norm_bwd_kernel[(programs, hidden // group_size)](
                x2, z2 if z2 is not None else x2, weight, dy, dx, dz if dz is not None else dx, dw, rows, hidden,
                group_size, eps, rows_per_program, z2.stride(0) if z2 is not None else hidden,
                dz.stride(0) if dz is not None else hidden, HAS_GATE=z2 is not None,
                Z_ALIGN=row_alignment(z2.stride(0)) if z2 is not None else 1,
                DZ_ALIGN=row_alignment(dz.stride(0)) if dz is not None else 1, BLOCK=block,
                num_warps=_row_warps(block))
    return dx, dz, _sum_rows(dw, weight.dtype)


def gate_rows(gate: torch.Tensor, hidden: int) -> torch.Tensor:
    """The gate as (rows, hidden) with its row stride kept (Mamba-2's z, a column slice of in_proj's output, read
    in place rather than copied); a copy only where its rows cannot be flattened to one stride or its columns are
    strided."""
    z2 = gate.reshape(-1, hidden)
    return z2.contiguous() if z2.stride(-1) != 1 else z2


def _norm_launches(x, gate, weight, group_size, eps):
    """`_RMSNormGated`'s forward allocations, views and launch (`plans.Planned` replays them): (y in x's shape, then
    x, the gate and the weight as the kernels read them, for the backward)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    z2 = gate_rows(gate, shape[-1]) if gate is not None else None
    weight = weight.contiguous()  # indexed as weight_ptr + column
    y = norm_forward(x2, z2, weight, group_size, eps, torch.promote_types(weight.dtype, x.dtype))
    return y.view(shape), x2, z2, weight


def _norm_backward_launches(x2, z2, weight, dy, group_size, eps, shape):
    """`_RMSNormGated`'s backward allocations, views and launches (`plans.Planned` replays them): (dx, dgate or None,
    both `shape`; dweight)."""
    dx, dz, dw = norm_backward(x2, z2, weight, dy.reshape(x2.shape).contiguous(), group_size, eps)
    return dx.view(shape), dz.view(shape) if dz is not None else None, dw


class _RMSNormGated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, weight, group_size, eps):
        y, x2, z2, weight = _NORM_FORWARD((x, gate, weight), (group_size, eps))
        ctx.save_for_backward(x2, z2, weight)
        ctx.group_size, ctx.eps, ctx.shape = group_size, eps, x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        dx, dz, dw = _NORM_BACKWARD((*ctx.saved_tensors, dy), (ctx.group_size, ctx.eps, ctx.shape))
        return dx, dz, dw, None, None


def rms_norm_gated_triton(x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor, group_size: int,
                          eps: float) -> torch.Tensor:
    """As `norm_torch.rms_norm_gated`, with Triton kernels. x, gate: (..., hidden); weight: (hidden,)."""
    if x.shape[-1] % group_size:
        raise ValueError(f"hidden size {x.shape[-1]} is not a multiple of the norm's group size {group_size}")
    if tuple(weight.shape) != (x.shape[-1],):  # the kernels would read past the weight's end
        raise ValueError(f"the norm's weight has shape {tuple(weight.shape)}; inputs of hidden size {x.shape[-1]} "
                         f"need ({x.shape[-1]},)")
    return apply_function(_RMSNormGated, x, gate, weight, group_size, eps)


def add_norm_forward(x2: torch.Tensor, r2: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     h_dtype: torch.dtype, round_to_weight: bool, store_normed_input: bool = False,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The add-norm forward kernel, outside autograd. x2, r2 (or None): (rows, hidden) contiguous; weight (hidden,)
    contiguous. Returns (y in the dtype of weight * the norm's input, h in h_dtype: x2 itself when nothing is
    added or cast, and with `store_normed_input` the norm's input (h rounded to the weight's dtype), else None)."""
    rows, hidden = x2.shape
    store_h = r2 is not None or h_dtype != x2.dtype
    h = torch.empty((rows, hidden), dtype=h_dtype, device=x2.device) if store_h else x2
    y = torch.empty((rows, hidden), dtype=torch.promote_types(weight.dtype, weight.dtype if round_to_weight
                                                              else h_dtype), device=x2.device)
    u = torch.empty((rows, hidden), dtype=weight.dtype, device=x2.device) if store_normed_input else None
    block = next_power_of_2(hidden)
    if rows:
        with on_device_of(x2):
            _add_norm_fwd_kernel[(rows,)](x2, r2 if r2 is not None else x2, h, weight, y, u if u is not None else y,
                                          hidden, eps, HAS_RESIDUAL=r2 is not None, STORE_H=store_h,
                                          ROUND_TO_WEIGHT=round_to_weight, STORE_U=u is not None, BLOCK=block,
                                          num_warps=_row_warps(block))
    return y, h, u


def add_norm_backward(saved: torch.Tensor, saved_h: bool, weight: torch.Tensor, dy: torch.Tensor,
                      dh: torch.Tensor | None, eps: float, round_to_weight: bool, x_dtype: torch.dtype,
                      residual_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The add-norm backward kernel, outside autograd: `saved` (rows, hidden) is h as the forward stored it
    (`saved_h`) or the norm's input (h float32 rounded to the weight's dtype); dy the gradient of y and dh (or None)
    the gradient reaching h itself, contiguous. Returns (dx in x_dtype, the residual's gradient in residual_dtype or
    None without a residual, dweight in weight's dtype)."""
    rows, hidden = saved.shape
    dx = torch.empty((rows, hidden), dtype=x_dtype, device=saved.device)
    dr = (torch.empty((rows, hidden), dtype=residual_dtype, device=saved.device) if residual_dtype is not None
          else None)
    programs, rows_per_program, dw = _backward_programs(saved, 1)
    block = next_power_of_2(hidden)
    if rows:
        with on_device_of(saved):
            _add_norm_bwd_kernel[(programs,)](
                saved, weight, dy, dh if dh is not None else dy, dx, dr if dr is not None else dx, dw, rows, hidden,
                eps, rows_per_program, HAS_DH=dh is not None, STORE_DR=dr is not None,
                ROUND_TO_WEIGHT=round_to_weight, SAVED_H=saved_h, BLOCK=block,
                num_warps=_row_warps(block))
    return dx, dr, _sum_rows(dw, weight.dtype)


def _add_norm_launches(x, residual, weight, eps, h_dtype, round_to_weight, keep_input):
    """`_AddRMSNorm`'s forward allocations, views and launch (`plans.Planned` replays them): (y, h, both x's shape;
    the norm's input if `keep_input`, else None; the weight as the kernel reads it)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    r2 = residual.reshape(x2.shape).contiguous() if residual is not None else None
    weight = weight.contiguous()  # indexed as weight_ptr + column
    y, h, normed_input = add_norm_forward(x2, r2, weight, eps, h_dtype, round_to_weight, keep_input)
    return y.view(shape), h.view(shape), normed_input, weight


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps, h_dtype, round_to_weight):
        shape = x.shape
        # for the backward keep the norm's input (bf16, say: half a float32 h's bytes) where that is all it needs
        keep_input = (any(ctx.needs_input_grad[:3]) and round_to_weight and h_dtype == torch.float32
                      and weight.element_size() < 4)
        y, h, normed_input, weight = _ADD_NORM_FORWARD((x, residual, weight),
                                                       (eps, h_dtype, round_to_weight, keep_input))
        ctx.save_for_backward(normed_input if keep_input else h.view(-1, shape[-1]), weight)
        ctx.saved_h = not keep_input
        ctx.eps, ctx.round_to_weight, ctx.shape = eps, round_to_weight, shape
        ctx.x_dtype, ctx.residual_dtype = x.dtype, residual.dtype if residual is not None else None
        # a gradient not asked for (h's, where the caller does not use h) stays None, not zeros
        ctx.set_materialize_grads(False)
        return y, h

    @staticmethod
    def backward(ctx, dy, dh):
        saved, weight = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros(saved.shape, dtype=weight.dtype, device=saved.device)
        dx, dr, dw = _ADD_NORM_BACKWARD((saved, weight, dy, dh), (ctx.saved_h, ctx.eps, ctx.round_to_weight,
                                                                   ctx.x_dtype, ctx.residual_dtype, ctx.shape))
        return dx, dr, dw, None, None, None


def _add_norm_backward_launches(saved, weight, dy, dh, saved_h, eps, round_to_weight, x_dtype, residual_dtype,
                                shape):
    """`_AddRMSNorm`'s backward allocations, views and launches (`plans.Planned` replays them): (dx, the residual's
    gradient or None, both `shape`; dweight)."""
    dy = dy.reshape(saved.shape).contiguous()
    dh = dh.reshape(saved.shape).contiguous() if dh is not None else None
    dx, dr, dw = add_norm_backward(saved, saved_h, weight, dy, dh, eps, round_to_weight, x_dtype, residual_dtype)
    return dx.view(shape), dr.view(shape) if dr is not None else None, dw


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                        residual_dtype: torch.dtype | None = None, norm_dtype: torch.dtype | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """As `norm_torch.add_rms_norm`, with Triton kernels (one each way), for norm_dtype None, h's dtype or the
    weight's (what the blocks ask); x, residual: (..., hidden); weight: (hidden,)."""
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"the residual has shape {tuple(residual.shape)}; x has {tuple(x.shape)}")
    if tuple(weight.shape) != (x.shape[-1],):  # the kernels would read past the weight's end
        raise ValueError(f"the norm's weight has shape {tuple(weight.shape)}; inputs of hidden size {x.shape[-1]} "
                         f"need ({x.shape[-1]},)")
    h_dtype = sum_dtype(x, residual, residual_dtype)
    if norm_dtype not in (None, h_dtype, weight.dtype):
        raise NotImplementedError(f"add_rms_norm's Triton kernels round the norm's input to h's dtype ({h_dtype}) "
                                  f"or the weight's ({weight.dtype}), not to {norm_dtype}")
    round_to_weight = norm_dtype is not None and norm_dtype != h_dtype
    return apply_function(_AddRMSNorm, x, residual, weight, eps, h_dtype, round_to_weight)


# the norms' forwards and backwards replayed per input signature (on CUDA), reading these modules' globals
_NORM_FORWARD = Planned(_norm_launches, (sys.modules[__name__], sums_triton))
_NORM_BACKWARD = Planned(_norm_backward_launches, (sys.modules[__name__], sums_triton))
_ADD_NORM_FORWARD = Planned(_add_norm_launches, (sys.modules[__name__], sums_triton))
_ADD_NORM_BACKWARD = Planned(_add_norm_backward_launches, (sys.modules[__name__], sums_triton))
