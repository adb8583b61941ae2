"""Causal depthwise conv1d as Triton kernels (forward and backward), time-major, optionally followed by SiLU.

Same function as `causal_conv1d_torch.causal_conv1d`: out[t, c] = act(bias[c] + Σ_k w[c, k] · in[t - (W-1) + k, c]),
where `in` is x preceded by the `past` inputs (zeros without them) and act is SiLU or nothing. It reads x in place
((batch, seqlen, channels), channels contiguous, any batch and row strides: a column slice of in_proj's output needs
no copy) instead of transposing, padding and slicing as the PyTorch form does. With SiLU, the backward recomputes
the pre-activation from x (nothing but x is kept), so the conv and its activation are one pass each way. With
`seq_idx` (packed sequences) a tap whose input has another seq_idx than the output token reads zero; positions
before x (`past`) count as the row's first sequence.
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from . import sums_triton
from .causal_conv1d_torch import check_activation
from .launch import apply_function, cdiv, check_grid_axis, fast_launch, on_device_of, row_alignment
from .packing import kernel_segment_ids
from .plans import Planned
from .sums_triton import sum_parts
from .triton_math import aligned


@triton.jit
def _inputs_at(x_ptr, past_ptr, b, s, c, c_mask, L, C, S, stride_xb, stride_xl, HAS_PAST: tl.constexpr):
    # in[s, c] for s in [-(W-1), L): x where s >= 0 (rows stride_xl apart, batch rows stride_xb), else the cached
    # inputs (zeros without them)
    value = tl.load(x_ptr + (b * stride_xb + tl.maximum(s, 0).to(tl.int64) * stride_xl)[:, None] + c[None, :],
                    mask=((s >= 0) & (s < L))[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
    if HAS_PAST:
        from_past = tl.load(past_ptr + (b * C + c[None, :]) * S + (S + tl.minimum(s, 0))[:, None],
                            mask=(s < 0)[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
        value += from_past
    return value


@triton.jit
def _seq_at(seq_ptr, b, s, L):
    # seq_idx of position s in [-(W-1), L + W - 1), clamped into the row: before x it is the first token's (a
    # cache feeds the first sequence), past the end the last token's (never read: outputs there are not stored)
    return tl.load(seq_ptr + b * L + tl.minimum(tl.maximum(s, 0), L - 1).to(tl.int64))


@triton.jit
def _row_strides(stride_xb, stride_xl, X_ALIGN: tl.constexpr):
    # x's strides, multiples of X_ALIGN elements (see `triton_math.aligned`)
    return aligned(stride_xb, X_ALIGN), aligned(stride_xl, X_ALIGN)


@fast_launch
@triton.jit
def _conv_fwd_kernel(x_ptr, past_ptr, w_ptr, bias_ptr, seq_ptr, out_ptr, L, C, S, n_tblocks, stride_xb, stride_xl,
                     W: tl.constexpr, HAS_PAST: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr,
                     SILU: tl.constexpr, X_ALIGN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    # (batch row, time block) pairs on grid axis 0, the only one that CUDA lets exceed 65,535 programs
    pid = tl.program_id(0)
    t = (pid % n_tblocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    b = (pid // n_tblocks).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    stride_xb, stride_xl = _row_strides(stride_xb, stride_xl, X_ALIGN)
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    if HAS_SEQ:
        seq_t = _seq_at(seq_ptr, b, t, L)
    for k in tl.static_range(W):
        w = tl.load(w_ptr + c * W + k, mask=c_mask, other=0.0).to(tl.float32)
        inputs = _inputs_at(x_ptr, past_ptr, b, t - (W - 1) + k, c, c_mask, L, C, S, stride_xb, stride_xl,
                            HAS_PAST)
        if HAS_SEQ:  # a tap into another sequence reads zero
            inputs = tl.where((_seq_at(seq_ptr, b, t - (W - 1) + k, L) == seq_t)[:, None], inputs, 0.0)
        acc += w[None, :] * inputs
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(out_ptr + (b * L + t.to(tl.int64))[:, None] * C + c[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(t < L)[:, None] & c_mask[None, :])


@triton.jit
def _conv_bwd_block(x_ptr, past_ptr, seq_ptr, dout_ptr, dx_ptr, weights, bias, b, t, c, c_mask, L, C, S,
                    stride_xb, stride_xl, stride_dxb, stride_dxl, W: tl.constexpr, HAS_PAST: tl.constexpr,
                    HAS_SEQ: tl.constexpr, SILU: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """One (BLOCK_T, BLOCK_C) block of the backward: stores dx[t] = Σ_k w[k] g[t + (W-1) - k], with g[p] the
    gradient reaching output p before the activation (dout, or dout · silu'(pre[p]), the pre-activation recomputed
    from x); returns g[t] and the W taps of t (zero where the forward masked them), whose products make dw."""
    # the inputs at t - (W-1) + i (and their seq_idx): i < W for the taps of t, up to 2W - 2 for the
    # pre-activations of the later outputs t + j that SiLU's gradient needs
    inputs = ()
    seqs = ()
    for i in tl.static_range(2 * W - 1 if SILU else W):
        inputs = inputs + (_inputs_at(x_ptr, past_ptr, b, t - (W - 1) + i, c, c_mask, L, C, S, stride_xb, stride_xl,
                                      HAS_PAST),)
        if HAS_SEQ:
            seqs = seqs + (_seq_at(seq_ptr, b, t - (W - 1) + i, L),)
    dx = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    g_t = dx
    for j in tl.static_range(W):  # the output t + j, reached from t through tap W-1-j
        later = t + j
        g = tl.load(dout_ptr + (b * L + tl.minimum(later, L - 1).to(tl.int64))[:, None] * C + c[None, :],
                    mask=(later < L)[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
        if SILU:
            pre = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32) + bias[None, :]
            for k in tl.static_range(W):
                tap = inputs[j + k]
                if HAS_SEQ:  # as in the forward: only taps of the output's own sequence
                    tap = tl.where((seqs[j + k] == seqs[j + W - 1])[:, None], tap, 0.0)
                pre += weights[k][None, :] * tap
            sig = tl.sigmoid(pre)
            g = g * sig * (1.0 + pre * (1.0 - sig))
        if j == 0:
            g_t = g
        if HAS_SEQ:  # the taps the forward masked carry no gradient
            g = tl.where((_seq_at(seq_ptr, b, later, L) == seqs[W - 1])[:, None], g, 0.0)
        dx += weights[W - 1 - j][None, :] * g
    tl.store(dx_ptr + (b * stride_dxb + t.to(tl.int64) * stride_dxl)[:, None] + c[None, :],
             dx.to(dx_ptr.dtype.element_ty), mask=(t < L)[:, None] & c_mask[None, :])
    taps = ()
    for k in tl.static_range(W):
        tap = inputs[k]
        if HAS_SEQ:
            tap = tl.where((seqs[k] == seqs[W - 1])[:, None], tap, 0.0)
        taps = taps + (tap,)
    return g_t, taps


@fast_launch
@triton.jit
def _conv_bwd_kernel(x_ptr, past_ptr, w_ptr, bias_ptr, seq_ptr, dout_ptr, dx_ptr, dw_ptr, dbias_ptr, L, C, S,
                     n_tblocks, blocks_per_program, n_parts, stride_xb, stride_xl, stride_dxb, stride_dxl,
                     W: tl.constexpr, HAS_PAST: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr,
                     SILU: tl.constexpr, X_ALIGN: tl.constexpr, DX_ALIGN: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    # One program walks blocks_per_program time blocks of BLOCK_C channels (`_conv_bwd_block` each), summing the
    # blocks' dw and dbias terms elementwise and over time only once at the end, into this program's partial-sum
    # row (a sum over time per block, with its barriers, and more programs in flight made the backward
    # latency-bound: H100, 4 x 2048 x 1792 bf16, 160-207 us against 35 us for the forward). dout is contiguous;
    # x is read and dx written through their own strides (dx may be a column slice of a wider gradient).
    b = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    stride_xb, stride_xl = _row_strides(stride_xb, stride_xl, X_ALIGN)
    stride_dxb, stride_dxl = _row_strides(stride_dxb, stride_dxl, DX_ALIGN)
    weights = ()
    for k in tl.static_range(W):
        weights = weights + (tl.load(w_ptr + c * W + k, mask=c_mask, other=0.0).to(tl.float32),)
    bias = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    dws = ()
    for k in tl.static_range(W):
        dws = dws + (tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32),)
    dbias = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    first = part * blocks_per_program
    for block in range(first, tl.minimum(first + blocks_per_program, n_tblocks)):
        t = block * BLOCK_T + tl.arange(0, BLOCK_T)
        g_t, taps = _conv_bwd_block(x_ptr, past_ptr, seq_ptr, dout_ptr, dx_ptr, weights, bias, b, t, c, c_mask, L,
                                    C, S, stride_xb, stride_xl, stride_dxb, stride_dxl, W, HAS_PAST, HAS_SEQ, SILU,
                                    BLOCK_T, BLOCK_C)
        summed = ()
        for k in tl.static_range(W):
            summed = summed + (dws[k] + g_t * taps[k],)
        dws = summed
        dbias += g_t
    row = (b * n_parts + part) * C + c
    for k in tl.static_range(W):
        tl.store(dw_ptr + row * W + k, tl.sum(dws[k], axis=0), mask=c_mask)
    tl.store(dbias_ptr + row, tl.sum(dbias, axis=0), mask=c_mask)


# (tokens, channels) per block, warps per program, and the time blocks one backward program walks (its dw and dbias
# sums stay in registers). H100, 4 x 2048 x 1792 bf16 with SiLU, profiler kernel times (BENCHMARKS.md, seventh
# session): backward 97.6 us here, 109-176 us in 9 other settings, 207 us with one block per program (a sum over
# time per block); the forward takes 35-42 us in every setting.
BLOCK_T, BLOCK_C = 16, 32
WARPS = {"forward": 4, "backward": 4}
BACKWARD_BLOCKS_PER_PROGRAM = 16


def conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, past: torch.Tensor | None,
                 seq_idx: torch.Tensor | None, activation: str | None) -> torch.Tensor:
    """The forward kernel, outside autograd. x: (batch, seqlen, channels) with contiguous channels (any batch and
    row strides); weight: (channels, width), contiguous; bias: (channels,) contiguous or None; past: (batch,
    channels, k) contiguous or None; seq_idx: (batch, seqlen) int32 kernel ids or None. Returns a new contiguous
    (batch, seqlen, channels) tensor in x's dtype."""
    batch, seqlen, channels = x.shape
    width = weight.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous whatever x's strides
    n_tblocks = cdiv(seqlen, BLOCK_T)
    grid = (batch * n_tblocks, cdiv(channels, BLOCK_C))
    with on_device_of(x):
        _conv_fwd_kernel[grid](
            x, past if past is not None else x, weight, bias if bias is not None else weight,
            seq_idx if seq_idx is not None else x, out,
            seqlen, channels, past.shape[-1] if past is not None else 0, n_tblocks, x.stride(0), x.stride(1),
            W=width, HAS_PAST=past is not None, HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None,
            SILU=activation == "silu", X_ALIGN=row_alignment(x.stride(0), x.stride(1)), BLOCK_T=BLOCK_T,
            BLOCK_C=BLOCK_C, num_warps=WARPS["forward"])
    return out


def conv_backward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, past: torch.Tensor | None,
                  seq_idx: torch.Tensor | None, activation: str | None, dout: torch.Tensor,
                  dx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The backward kernel, outside autograd, for `conv_forward`'s arguments and dout (batch, seqlen, channels),
    contiguous. dx: where to write x's gradient ((batch, seqlen, channels) in x's dtype, contiguous channels, any
    batch and row strides: a column slice of a wider gradient), or None for a new contiguous tensor. Returns (dx,
    dweight in weight's dtype, dbias in bias's dtype or None)."""
    batch, seqlen, channels = x.shape
    width = weight.shape[-1]
    n_tblocks = cdiv(seqlen, BLOCK_T)
    n_parts = cdiv(n_tblocks, BACKWARD_BLOCKS_PER_PROGRAM)
    if dx is None:
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # stored in x's dtype by the kernel
    elif dx.shape != x.shape or dx.stride(-1) != 1:
        raise ValueError(f"dx must have x's shape {tuple(x.shape)} with contiguous channels; got shape "
                         f"{tuple(dx.shape)}, strides {dx.stride()}")
    dw = torch.empty(batch * n_parts, channels, width, dtype=torch.float32, device=x.device)
    dbias = torch.empty(batch * n_parts, channels, dtype=torch.float32, device=x.device)
    with on_device_of(x):
        _conv_bwd_kernel[(batch, n_parts, cdiv(channels, BLOCK_C))](
            x, past if past is not None else x, weight, bias if bias is not None else weight,
            seq_idx if seq_idx is not None else x, dout, dx, dw, dbias, seqlen, channels,
            past.shape[-1] if past is not None else 0, n_tblocks, BACKWARD_BLOCKS_PER_PROGRAM, n_parts,
            x.stride(0), x.stride(1), dx.stride(0), dx.stride(1),
            W=width, HAS_PAST=past is not None, HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None,
            SILU=activation == "silu", X_ALIGN=row_alignment(x.stride(0), x.stride(1)),
            DX_ALIGN=row_alignment(dx.stride(0), dx.stride(1)), BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C,
            num_warps=WARPS["backward"])
    rows = batch * n_parts  # float32 partials, one row per program (sums_triton: launches, no torch ops)
    pairs = [(dw, channels * width, weight.dtype)] + ([(dbias, channels, bias.dtype)] if bias is not None else [])
    sums = sum_parts(pairs, 1, rows, kept_stride=1)
    return dx, sums[0].view(weight.shape), sums[1] if bias is not None else None


def _conv_launches(x, weight, bias, past, seq_idx, activation):
    """`_CausalConv1d`'s forward allocations, views and launch (`plans.Planned` replays them): (out, then x, the
    weight, bias, past and seq_idx as the kernels read them, for the backward)."""
    # x is usually a column slice of in_proj's output (Mamba's x half, Mamba-2's xBC): the kernels take its batch
    # and row strides, so it is neither copied nor saved as a copy, unless its channels are strided
    if x.stride(-1) != 1:
        x = x.contiguous()
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None  # indexed as bias_ptr + channel
    past = past.contiguous() if past is not None else None
    seq_idx = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
    return conv_forward(x, weight, bias, past, seq_idx, activation), x, weight, bias, past, seq_idx


def _conv_backward_launches(x, weight, bias, past, seq_idx, dout, activation):
    """`_CausalConv1d`'s backward allocations, views and launches (`plans.Planned` replays them): (dx, dweight,
    dbias or None)."""
    return conv_backward(x, weight, bias, past, seq_idx, activation, dout.contiguous())


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, past, seq_idx, activation):
        out, *kept = _CONV_FORWARD((x, weight, bias, past, seq_idx), (activation,))
        ctx.save_for_backward(*kept)
        ctx.activation = activation
        return out

    @staticmethod
    def backward(ctx, dout):
        dx, dw, dbias = _CONV_BACKWARD((*ctx.saved_tensors, dout), (ctx.activation,))
        return dx, dw, dbias, None, None, None


def causal_conv1d_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         past: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None,
                         activation: str | None = None) -> torch.Tensor:
    """As `causal_conv1d_torch.causal_conv1d`: x (batch, seqlen, channels), read in place when its channels are
    contiguous (any batch and row strides), weight (channels, width), past (batch, channels, k ≥ width - 1) the
    inputs before x or None, seq_idx (batch or 1, seqlen) packed sequences or None, activation None or "silu".
    Returns (batch, seqlen, channels) in x's dtype. No gradient flows into `past` (a cache's state)."""
    check_activation(activation)
    if seq_idx is not None:  # the kernels compare ids for equality: give them ids that change where a sequence starts
        seq_idx = kernel_segment_ids(seq_idx, x.shape[0], x.shape[1], x.device)
    if x.shape[1] == 0:
        return x.new_empty(x.shape)
    # the forward's (row, time block) pairs go on the grid's uncapped axis; the backward's programs per row do not
    check_grid_axis(cdiv(cdiv(x.shape[1], BLOCK_T), BACKWARD_BLOCKS_PER_PROGRAM),
                    f"A causal conv over {x.shape[1]} tokens")
    check_grid_axis(cdiv(x.shape[2], BLOCK_C), f"A causal conv over {x.shape[2]} channels")
    if past is not None and past.shape[-1] < weight.shape[-1] - 1:
        raise ValueError(f"past holds {past.shape[-1]} inputs; a width-{weight.shape[-1]} conv needs at least "
                         f"{weight.shape[-1] - 1}")
    return apply_function(_CausalConv1d, x, weight, bias, past.detach() if past is not None else None, seq_idx,
                          activation)


# the op's forward and backward replayed per input signature (on CUDA), reading these modules' globals
_CONV_FORWARD = Planned(_conv_launches, (sys.modules[__name__], sums_triton))
_CONV_BACKWARD = Planned(_conv_backward_launches, (sys.modules[__name__], sums_triton))
