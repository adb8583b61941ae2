"""Mamba-2's gated RMS norm as Triton kernels (forward and backward), one program per (row, group).

Same function as `norm_torch.rms_norm_gated`: y = weight * n with n = u / rms(u) over each group and
u = x * silu(gate). The backward recomputes u and the group's rms from x and gate rather than storing them. The
gate is read in place through its row stride (Mamba-2's z, a column slice of in_proj's output, is not copied).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import on_device_of, row_alignment


@triton.jit
def _gated_input(x_ptr, z_ptr, row, cols, mask, H, stride_z, HAS_GATE: tl.constexpr, Z_ALIGN: tl.constexpr):
    # x's row is contiguous (H apart), the gate's rows stride_z apart: a multiple of Z_ALIGN, rebuilt as such so
    # that the compiler loads the gate in vectors (tl.multiple_of has no effect on an argument)
    x = tl.load(x_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    z = tl.zeros_like(x)
    u = x
    if HAS_GATE:
        z = tl.load(z_ptr + row * ((stride_z // Z_ALIGN) * Z_ALIGN) + cols, mask=mask, other=0.0).to(tl.float32)
        u = x * z * tl.sigmoid(z)
    return x, z, u


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


@triton.jit
def _norm_bwd_kernel(x_ptr, z_ptr, w_ptr, dy_ptr, dx_ptr, dz_ptr, dw_ptr, M, H, G, eps, rows_per_program,
                     stride_z, HAS_GATE: tl.constexpr, Z_ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    # dx and dz are stored in their tensors' dtypes (x's and the gate's), rounded once
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
                tl.store(dz_ptr + offs, (du * x * sig * (1.0 + z * (1.0 - sig))).to(dz_ptr.dtype.element_ty),
                         mask=mask)
            else:
                tl.store(dx_ptr + offs, du.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + block.to(tl.int64) * H + cols, dw, mask=mask)


class _RMSNormGated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, weight, group_size, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        # the gate keeps its row stride (Mamba-2's z: a column slice of in_proj's output, saved as that view rather
        # than as a copy); a copy only where its rows cannot be flattened to one stride or its columns are strided
        z2 = gate.reshape(-1, shape[-1]) if gate is not None else None
        if z2 is not None and z2.stride(-1) != 1:
            z2 = z2.contiguous()
        weight = weight.contiguous()  # indexed as weight_ptr + column
        rows, hidden = x2.shape
        out_dtype = torch.promote_types(weight.dtype, x.dtype)
        y = torch.empty((rows, hidden), dtype=out_dtype, device=x.device)
        block = triton.next_power_of_2(group_size)
        if rows:
            with on_device_of(x2):
                _norm_fwd_kernel[(rows, hidden // group_size)](
                    x2, z2 if z2 is not None else x2, weight, y, hidden, group_size, eps,
                    z2.stride(0) if z2 is not None else hidden,
                    HAS_GATE=gate is not None, ROUND_TO_INPUT=x.dtype != torch.float32,
                    Z_ALIGN=row_alignment(z2.stride(0)) if z2 is not None else 1, BLOCK=block,
                    num_warps=min(max(block // 256, 1), 8))
        ctx.save_for_backward(x2, z2, weight)
        ctx.group_size, ctx.eps, ctx.shape = group_size, eps, shape
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, z2, weight = ctx.saved_tensors
        rows, hidden = x2.shape
        group_size = ctx.group_size
        dx = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
        dz = torch.empty(x2.shape, dtype=z2.dtype, device=x2.device) if z2 is not None else None
        # a few hundred programs per group, each summing its rows' share of dweight
        programs = max(min(rows, 512 // max(hidden // group_size, 1)), 1)
        rows_per_program = triton.cdiv(max(rows, 1), programs)
        dw = torch.zeros((programs, hidden), dtype=torch.float32, device=x2.device)
        block = triton.next_power_of_2(group_size)
        if rows:
            with on_device_of(x2):
                _norm_bwd_kernel[(programs, hidden // group_size)](
                    x2, z2 if z2 is not None else x2, weight, dy.reshape(rows, hidden).contiguous(), dx,
                    dz if dz is not None else dx, dw, rows, hidden, group_size, ctx.eps, rows_per_program,
                    z2.stride(0) if z2 is not None else hidden, HAS_GATE=z2 is not None,
                    Z_ALIGN=row_alignment(z2.stride(0)) if z2 is not None else 1, BLOCK=block,
                    num_warps=min(max(block // 256, 1), 8))
        shape = ctx.shape
        return (dx.reshape(shape), dz.reshape(shape) if dz is not None else None,
                dw.sum(0).to(weight.dtype), None, None)


def rms_norm_gated_triton(x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor, group_size: int,
                          eps: float) -> torch.Tensor:
    """As `norm_torch.rms_norm_gated`, with Triton kernels. x, gate: (..., hidden); weight: (hidden,)."""
    if x.shape[-1] % group_size:
        raise ValueError(f"hidden size {x.shape[-1]} is not a multiple of the norm's group size {group_size}")
    if tuple(weight.shape) != (x.shape[-1],):  # the kernels would read past the weight's end
        raise ValueError(f"the norm's weight has shape {tuple(weight.shape)}; inputs of hidden size {x.shape[-1]} "
                         f"need ({x.shape[-1]},)")
    return _RMSNormGated.apply(x, gate, weight, group_size, eps)
