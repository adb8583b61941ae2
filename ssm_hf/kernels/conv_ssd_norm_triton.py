"""Mamba-2's mixer core (causal conv + SiLU, SSD scan, gated RMS norm) on the Triton kernels as one autograd op.

Same function as `conv_ssd_norm.conv_ssd_norm_by_ops`. Run op by op, a training step spends as much host time as the
GPU spends computing (BENCHMARKS.md, seventh session): per layer each op is an autograd node with its own views,
casts and launches, and the gradients of in_proj's column slices are joined by two `cat`s. Here the forward runs
the three kernels on views of in_proj's output (nothing copied), and the backward writes the gradients of z, xBC
and Δ straight into their columns of one gradient tensor for in_proj's output.
"""

from __future__ import annotations

import sys

import torch

from . import causal_conv1d_triton, norm_triton, ssd_triton, sums_triton
from .causal_conv1d_triton import conv_backward, conv_forward
from .conv_ssd_norm import Mamba2Shape, gradient_through_cached_state
from .launch import apply_function
from .norm_triton import gate_rows, norm_backward, norm_forward
from .plans import Planned


def _forward_launches(zxbcdt, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight, seq_idx, conv_past,
                      initial_state, shape, activation, dt_limit, norm_group_size, eps):
    """The forward's allocations, views and launches (`plans.Planned` replays them): (out (batch, seqlen,
    d_inner), the final state (batch, heads, head_dim, d_state) float32, then what the backward keeps: zxbcdt, the
    conv's 2-D weight, its bias, the norm's weight (as the kernels read them), xBC (the conv's output), y2 (the
    scan's output, (batch * seqlen, d_inner))). conv_past (batch, conv_dim, k) and initial_state (float32) come as
    the kernels read them, or None."""
    batch, seqlen, _ = zxbcdt.shape
    if zxbcdt.stride(-1) != 1:  # the kernels read its columns in place: they must be packed
        zxbcdt = zxbcdt.contiguous()
    z, xBC_in, dt = shape.split(zxbcdt)
    weight = conv_weight.reshape(shape.conv_dim, -1).contiguous()
    conv_bias = conv_bias.contiguous() if conv_bias is not None else None
    norm_weight = norm_weight.contiguous()
    xBC = conv_forward(xBC_in, weight, conv_bias, conv_past, seq_idx, activation)
    x, B, C = shape.split_xBC(xBC)
    # A = -exp(A_log) is made in the kernels (no cast, exp and negation ops per layer here)
    y, final = ssd_triton.ssd_forward(x, dt, A_log, B, C, D, dt_bias, True, dt_limit, seq_idx, A_is_log=True,
                                      initial_state=initial_state)
    y2 = y.view(batch * seqlen, shape.d_inner)
    z2 = gate_rows(z, shape.d_inner)
    out = norm_forward(y2, z2, norm_weight, norm_group_size, eps, torch.promote_types(norm_weight.dtype, y.dtype))
    return out.view(batch, seqlen, shape.d_inner), final, zxbcdt, weight, conv_bias, norm_weight, xBC, y2


def _backward_launches(zxbcdt, weight, conv_bias, dt_bias, A_log, D, norm_weight, xBC, y2, seq_idx, dout, shape,
                       activation, dt_limit, norm_group_size, eps, conv_weight_shape):
    """The backward's allocations, views and launches (`plans.Planned` replays them) from what the forward kept and
    dout: (the gradient of zxbcdt (contiguous: z, xBC and Δ each written into its columns), of the conv's weight
    (conv_weight_shape) and bias, of the Δ bias, A_log, D and the norm's weight)."""
    z, xBC_in, dt = shape.split(zxbcdt)
    # one gradient for in_proj's output; each op below writes its columns
    dzxbcdt = torch.empty_like(zxbcdt, memory_format=torch.contiguous_format)
    dz, dxBC_in, ddt = shape.split(dzxbcdt)
    dy2, _, dnorm_weight = norm_backward(y2, gate_rows(z, shape.d_inner), norm_weight,
                                         dout.reshape(y2.shape).contiguous(), norm_group_size, eps,
                                         dz=gate_rows(dz, shape.d_inner))
    x, B, C = shape.split_xBC(xBC)
    dxBC = torch.empty_like(xBC)
    dx, dB, dC = shape.split_xBC(dxBC)
    dA_log, dD, d_dt_bias = ssd_triton.ssd_backward(x, dt, A_log, B, C, D, dt_bias, True, dt_limit, seq_idx,
                                                    dy2.view(x.shape), dx, dB, dC, ddt, A_is_log=True)
    _, dweight, dconv_bias = conv_backward(xBC_in, weight, conv_bias, None, seq_idx, activation, dxBC, dx=dxBC_in)
    return dzxbcdt, dweight.view(conv_weight_shape), dconv_bias, d_dt_bias, dA_log, dD, dnorm_weight


class _ConvSSDNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zxbcdt, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight, shape, activation, dt_limit,
                norm_group_size, eps, seq_idx):
        out, _, zxbcdt, weight, conv_bias, norm_weight, xBC, y2 = _FORWARD(
            (zxbcdt, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight, seq_idx, None, None),
            (shape, activation, dt_limit, norm_group_size, eps))
        ctx.save_for_backward(zxbcdt, weight, conv_bias, dt_bias, A_log, D, norm_weight, xBC, y2, seq_idx)
        ctx.shape, ctx.activation, ctx.dt_limit, ctx.norm_group_size, ctx.eps = \
            shape, activation, dt_limit, norm_group_size, eps
        ctx.conv_weight_shape = conv_weight.shape
        return out

    @staticmethod
    def backward(ctx, dout):
        dzxbcdt, dweight, dconv_bias, d_dt_bias, dA_log, dD, dnorm_weight = _BACKWARD(
            (*ctx.saved_tensors, dout),
            (ctx.shape, ctx.activation, ctx.dt_limit, ctx.norm_group_size, ctx.eps, tuple(ctx.conv_weight_shape)))
        return (dzxbcdt, dweight, dconv_bias, d_dt_bias, dA_log, dD, dnorm_weight, None, None, None, None, None,
                None)


def conv_ssd_norm_triton(
    zxbcdt: torch.Tensor, shape: Mamba2Shape, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
    activation: str | None, dt_bias: torch.Tensor, A_log: torch.Tensor, D: torch.Tensor,
    dt_limit: tuple[float, float] | None, norm_weight: torch.Tensor, norm_group_size: int, eps: float,
    chunk_size: int, seq_idx: torch.Tensor | None = None, conv_past: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None, return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """As `conv_ssd_norm.conv_ssd_norm_by_ops` (same arguments; `chunk_size` is the PyTorch form's: the kernels use
    their own chunks). With a cached state (conv_past, initial_state or return_final_state: a prefill that fills
    or continues a cache) the op runs without autograd: it refuses inputs that need a gradient."""
    from .causal_conv1d_torch import check_activation
    from .packing import kernel_segment_ids

    check_activation(activation)
    # what the three ops would refuse one by one (the kernels index these as ptr + column)
    if shape.d_inner % norm_group_size:
        raise ValueError(f"d_inner {shape.d_inner} is not a multiple of the norm's group size {norm_group_size}")
    if tuple(norm_weight.shape) != (shape.d_inner,):
        raise ValueError(f"the norm's weight has shape {tuple(norm_weight.shape)}; {shape} needs ({shape.d_inner},)")
    if conv_weight.shape[0] != shape.conv_dim or conv_weight[0].numel() != conv_weight.shape[-1]:
        raise ValueError(f"the conv's weight has shape {tuple(conv_weight.shape)}; {shape} needs ({shape.conv_dim}, "
                         f"width) or ({shape.conv_dim}, 1, width)")
    if seq_idx is not None:
        seq_idx = kernel_segment_ids(seq_idx, zxbcdt.shape[0], zxbcdt.shape[1], zxbcdt.device)
    if conv_past is None and initial_state is None and not return_final_state:
        return apply_function(_ConvSSDNorm, zxbcdt, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight, shape,
                              activation, dt_limit, norm_group_size, eps, seq_idx)
    if gradient_through_cached_state((zxbcdt, shape, conv_weight, conv_bias, activation, dt_bias, A_log, D, dt_limit,
                                      norm_weight, norm_group_size, eps, chunk_size, seq_idx, conv_past,
                                      initial_state, return_final_state)):
        raise NotImplementedError("the fused conv + SSD + norm op has no backward through a cached state; "
                                  "kernels.conv_ssd_norm runs the three ops one by one where a gradient is needed")
    batch = zxbcdt.shape[0]
    width = conv_weight.shape[-1]
    if conv_past is not None and (conv_past.dim() != 3 or tuple(conv_past.shape[:2]) != (batch, shape.conv_dim)
                                  or conv_past.shape[-1] < width - 1):
        raise ValueError(f"conv_past has shape {tuple(conv_past.shape)}; a width-{width} conv of {shape} needs "
                         f"({batch}, {shape.conv_dim}, k >= {width - 1})")
    state_shape = (batch, shape.heads, shape.head_dim, shape.d_state)
    if initial_state is not None and tuple(initial_state.shape) != state_shape:
        raise ValueError(f"initial_state has shape {tuple(initial_state.shape)}; {shape} needs {state_shape}")
    # the copies a plan cannot stand for run here (none for a cache's float32 state and contiguous conv inputs)
    conv_past = conv_past.contiguous() if conv_past is not None else None
    initial_state = initial_state.float().contiguous() if initial_state is not None else None
    out, final, *_ = _FORWARD((zxbcdt, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight, seq_idx, conv_past,
                               initial_state), (shape, activation, dt_limit, norm_group_size, eps))
    return (out, final) if return_final_state else out


# the forward and backward replayed per input signature (on CUDA), reading these modules' globals
_WATCHED = (sys.modules[__name__], ssd_triton, causal_conv1d_triton, norm_triton, sums_triton)
_FORWARD = Planned(_forward_launches, _WATCHED)
_BACKWARD = Planned(_backward_launches, _WATCHED)
