"""Causal depthwise conv1d as Triton kernels (forward and backward), time-major, without activation.

Same function as `causal_conv1d_torch.causal_conv1d`: out[t, c] = bias[c] + Σ_k w[c, k] · in[t - (W-1) + k, c], where
`in` is x preceded by the `past` inputs (zeros without them). It reads x in place ((batch, seqlen, channels),
channels contiguous, any batch and row strides: a column slice of in_proj's output needs no copy) instead of
transposing, padding and slicing as the PyTorch form does. With `seq_idx` (packed sequences) a tap whose input has
another seq_idx than the output token reads zero; positions before x (`past`) count as the row's first sequence.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import check_grid_axis, on_device_of
from .packing import kernel_segment_ids


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
def _fwd_kernel(x_ptr, past_ptr, w_ptr, bias_ptr, seq_ptr, out_ptr, L, C, S, stride_xb, stride_xl,
                W: tl.constexpr, HAS_PAST: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
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
    tl.store(out_ptr + (b * L + t.to(tl.int64))[:, None] * C + c[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(t < L)[:, None] & c_mask[None, :])


@triton.jit
def _bwd_kernel(x_ptr, past_ptr, w_ptr, seq_ptr, dout_ptr, dx_ptr, dw_ptr, dbias_ptr, L, C, S, n_tblocks,
                stride_xb, stride_xl,
                W: tl.constexpr, HAS_PAST: tl.constexpr, HAS_SEQ: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    # dx[s] = Σ_k w[k] dout[s + (W-1) - k]; this block's share of dw and dbias goes to a partial-sum row. dout and
    # dx are contiguous; x is read through its strides as in the forward
    b = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    t_mask = t < L
    dout = tl.load(dout_ptr + (b * L + t.to(tl.int64))[:, None] * C + c[None, :],
                   mask=t_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
    dx = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    part = (b * n_tblocks + pid_t) * C + c
    if HAS_SEQ:
        seq_t = _seq_at(seq_ptr, b, t, L)
    for k in tl.static_range(W):
        w = tl.load(w_ptr + c * W + k, mask=c_mask, other=0.0).to(tl.float32)
        later = t + (W - 1) - k
        d_later = tl.load(dout_ptr + (b * L + tl.minimum(later, L - 1).to(tl.int64))[:, None] * C + c[None, :],
                          mask=(later < L)[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
        inputs = _inputs_at(x_ptr, past_ptr, b, t - (W - 1) + k, c, c_mask, L, C, S, stride_xb, stride_xl,
                            HAS_PAST)
        if HAS_SEQ:  # the taps the forward masked carry no gradient
            d_later = tl.where((_seq_at(seq_ptr, b, later, L) == seq_t)[:, None], d_later, 0.0)
            inputs = tl.where((_seq_at(seq_ptr, b, t - (W - 1) + k, L) == seq_t)[:, None], inputs, 0.0)
        dx += w[None, :] * d_later
        tl.store(dw_ptr + part * W + k, tl.sum(dout * inputs, axis=0), mask=c_mask)
    tl.store(dbias_ptr + part, tl.sum(dout, axis=0), mask=c_mask)
    tl.store(dx_ptr + (b * L + t.to(tl.int64))[:, None] * C + c[None, :], dx, mask=t_mask[:, None] & c_mask[None, :])


BLOCK_T, BLOCK_C = 32, 64


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, past, seq_idx):
        batch, seqlen, channels = x.shape
        width = weight.shape[-1]
        # x is usually a column slice of in_proj's output (Mamba's x half, Mamba-2's xBC): the kernels take its
        # batch and row strides, so it is neither copied nor saved as a copy, unless its channels are strided
        if x.stride(-1) != 1:
            x = x.contiguous()
        weight = weight.contiguous()
        bias = bias.contiguous() if bias is not None else None  # indexed as bias_ptr + channel
        past = past.contiguous() if past is not None else None
        seq_idx = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous whatever x's strides
        grid = (batch, triton.cdiv(seqlen, BLOCK_T), triton.cdiv(channels, BLOCK_C))
        with on_device_of(x):
            _fwd_kernel[grid](x, past if past is not None else x, weight, bias if bias is not None else weight,
                              seq_idx if seq_idx is not None else x, out,
                              seqlen, channels, past.shape[-1] if past is not None else 0, x.stride(0), x.stride(1),
                              W=width, HAS_PAST=past is not None, HAS_BIAS=bias is not None,
                              HAS_SEQ=seq_idx is not None, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C)
        ctx.save_for_backward(x, weight, past, seq_idx)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, past, seq_idx = ctx.saved_tensors
        batch, seqlen, channels = x.shape
        width = weight.shape[-1]
        n_tblocks = triton.cdiv(seqlen, BLOCK_T)
        dx = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        dw = torch.empty(batch * n_tblocks, channels, width, dtype=torch.float32, device=x.device)
        dbias = torch.empty(batch * n_tblocks, channels, dtype=torch.float32, device=x.device)
        with on_device_of(x):
            _bwd_kernel[(batch, n_tblocks, triton.cdiv(channels, BLOCK_C))](
                x, past if past is not None else x, weight, seq_idx if seq_idx is not None else x, dout.contiguous(),
                dx, dw, dbias, seqlen, channels, past.shape[-1] if past is not None else 0, n_tblocks,
                x.stride(0), x.stride(1),
                W=width, HAS_PAST=past is not None, HAS_SEQ=seq_idx is not None, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C)
        return (dx.to(x.dtype), dw.sum(0).to(weight.dtype), dbias.sum(0).to(weight.dtype) if ctx.has_bias else None,
                None, None)


def causal_conv1d_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         past: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """As `causal_conv1d_torch.causal_conv1d`: x (batch, seqlen, channels), read in place when its channels are
    contiguous (any batch and row strides), weight (channels, width), past (batch, channels, k ≥ width - 1) the
    inputs before x or None, seq_idx (batch or 1, seqlen) packed sequences or None.
    Returns (batch, seqlen, channels) in x's dtype. No gradient flows into `past` (a cache's state)."""
    if seq_idx is not None:  # the kernels compare ids for equality: give them ids that change where a sequence starts
        seq_idx = kernel_segment_ids(seq_idx, x.shape[0], x.shape[1], x.device)
    if x.shape[1] == 0:
        return x.new_empty(x.shape)
    check_grid_axis(triton.cdiv(x.shape[1], BLOCK_T), f"A causal conv over {x.shape[1]} tokens")
    check_grid_axis(triton.cdiv(x.shape[2], BLOCK_C), f"A causal conv over {x.shape[2]} channels")
    if past is not None and past.shape[-1] < weight.shape[-1] - 1:
        raise ValueError(f"past holds {past.shape[-1]} inputs; a width-{weight.shape[-1]} conv needs at least "
                         f"{weight.shape[-1] - 1}")
    return _CausalConv1d.apply(x, weight, bias, past.detach() if past is not None else None, seq_idx)
