"""Mamba-2's gated RMS norm as Triton kernels (forward and backward), one program per (row, group).

Same function as `norm_torch.rms_norm_gated`: y = weight * n with n = u / rms(u) over each group and
u = x * silu(gate). The backward recomputes u and the group's rms from x and gate rather than storing them. The
gate is read in place through its row stride (Mamba-2's z, a column slice of in_proj's output, is not copied).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cdiv, fast_launch, multiprocessors, next_power_of_2, on_device_of, row_alignment
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
            rstd = 1.0 / tl.sqrt(tl.sum(u * u, axis=0) / G + eps)
            n = u * rstd
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dw += dy * n
            dn = dy * w
            du = rstd * (dn - n * (tl.sum(dn * n, axis=0) / G))
            if HAS_GATE:
                sig = tl.sigmoid(z)
                tl.store(dx_ptr + offs, (du * z * sig).to(dx_ptr.dtype.element_ty), mask=mask)
                tl.store(dz_ptr + row.to(tl.int64) * aligned(stride_dz, DZ_ALIGN) + cols,
                         (du * x * sig * (1.0 + z * (1.0 - sig))).to(dz_ptr.dtype.element_ty), mask=mask)
            else:
                tl.store(dx_ptr + offs, du.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + block.to(tl.int64) * H + cols, dw, mask=mask)


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
                num_warps=min(max(block // 256, 1), 8))
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
    sms = multiprocessors(x2)
    total = BACKWARD_PROGRAMS_PER_SM * sms if sms is not None else BACKWARD_PROGRAMS_NO_GPU
    programs = max(min(rows, total // max(hidden // group_size, 1)), 1)  # per group
    rows_per_program = cdiv(max(rows, 1), programs)
    # each program stores its row; without rows no kernel runs and dweight is zero
    dw = (torch.empty if rows else torch.zeros)((programs, hidden), dtype=torch.float32, device=x2.device)
    block = next_power_of_2(group_size)
    if rows:
        with on_device_of(x2):
            _norm_bwd_kernel[(programs, hidden // group_size)](
                x2, z2 if z2 is not None else x2, weight, dy, dx, dz if dz is not None else dx, dw, rows, hidden,
                group_size, eps, rows_per_program, z2.stride(0) if z2 is not None else hidden,
                dz.stride(0) if dz is not None else hidden, HAS_GATE=z2 is not None,
                Z_ALIGN=row_alignment(z2.stride(0)) if z2 is not None else 1,
                DZ_ALIGN=row_alignment(dz.stride(0)) if dz is not None else 1, BLOCK=block,
                num_warps=min(max(block // 256, 1), 8))
    return dx, dz, dw.sum(0).to(weight.dtype)


def gate_rows(gate: torch.Tensor, hidden: int) -> torch.Tensor:
    """The gate as (rows, hidden) with its row stride kept (Mamba-2's z, a column slice of in_proj's output, read
    in place rather than copied); a copy only where its rows cannot be flattened to one stride or its columns are
    strided."""
    z2 = gate.reshape(-1, hidden)
    return z2.contiguous() if z2.stride(-1) != 1 else z2


class _RMSNormGated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, weight, group_size, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        z2 = gate_rows(gate, shape[-1]) if gate is not None else None
        weight = weight.contiguous()  # indexed as weight_ptr + column
        y = norm_forward(x2, z2, weight, group_size, eps, torch.promote_types(weight.dtype, x.dtype))
        ctx.save_for_backward(x2, z2, weight)
        ctx.group_size, ctx.eps, ctx.shape = group_size, eps, shape
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, z2, weight = ctx.saved_tensors
        shape = ctx.shape
        dx, dz, dw = norm_backward(x2, z2, weight, dy.reshape(x2.shape).contiguous(), ctx.group_size, ctx.eps)
        return dx.reshape(shape), dz.reshape(shape) if dz is not None else None, dw, None, None


def rms_norm_gated_triton(x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor, group_size: int,
                          eps: float) -> torch.Tensor:
    """As `norm_torch.rms_norm_gated`, with Triton kernels. x, gate: (..., hidden); weight: (hidden,)."""
    if x.shape[-1] % group_size:
        raise ValueError(f"hidden size {x.shape[-1]} is not a multiple of the norm's group size {group_size}")
    if tuple(weight.shape) != (x.shape[-1],):  # the kernels would read past the weight's end
        raise ValueError(f"the norm's weight has shape {tuple(weight.shape)}; inputs of hidden size {x.shape[-1]} "
                         f"need ({x.shape[-1]},)")
    return _RMSNormGated.apply(x, gate, weight, group_size, eps)
