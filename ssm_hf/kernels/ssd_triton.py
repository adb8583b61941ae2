"""Mamba-2's SSD scan in Triton, forward and backward, in chunks of Q tokens.

Same function and signature as `ssd_torch.ssd_scan_chunked`. Per (batch row, head), with a_t = Δ_t A ≤ 0, the
state entering chunk k is H_k (head_dim x d_state) and, inside the chunk,

    y_t = Σ_{s≤t} (C_t·B_s) exp(Σ_{s<j≤t} a_j) Δ_s x_s + exp(Σ_{j≤t} a_j) C_t H_kᵀ + D x_t
    H_{k+1} = exp(Σ_j a_j) H_k + Σ_s exp(Σ_{j>s} a_j) Δ_s x_s B_sᵀ

Forward: `_chunk_walk_kernel` walks the chunks of one (row, head, state tile) in order and writes every H_k
(one small matmul per chunk: the only sequential part); `_chunk_output_kernel` then computes each chunk's output
independently, in row blocks, the intra-chunk part as `tl.dot`s (with a few long rows the forward's chunks are
longer than a row block: fewer sequential steps). Backward: the forward states are recomputed (nothing of size
(chunks, head_dim, d_state) is kept between passes), the same walker, mirrored (REVERSE), walks the chunks
backwards for the gradient dH_{k+1} reaching each chunk's end, and `_chunk_grads_kernel` computes every input's
gradient chunk by chunk, a few heads of a group per program, which sum their dB and dC (GRADS_HEADS_PER_PROGRAM).
Segment sums of log-decays are always summed directly, never as differences of prefix sums, so small steps after a
large one survive and a sequence start (`seq_idx`: a = -inf there) gives exact zeros, not NaNs.

Inputs are read where they are: x, B and C with any batch and token strides (the mixer passes column views of the
conv's output; only a token's (heads, head_dim) and (groups, d_state) must be packed), Δ as stored (a column view of
in_proj's output, any float dtype), its bias, softplus and limit applied in `_chunk_decays` as `ssd_prepare_dt`
applies them, and the backward returns the gradient of Δ as stored (and of the bias). No copies, no Δ-preparation
ops around the kernels.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch import (
    apply_function,
    cdiv,
    check_grid_axis,
    fast_launch,
    multiprocessors,
    next_power_of_2,
    on_device_of,
)
from .packing import kernel_segment_ids
from .ssd_torch import dt_limit_bounds, ssd_scan_chunked
from .sums_triton import sum_parts, sum_splits_into
from .triton_math import log1p_small

CHUNK = 32
# The forward stores the state entering every chunk of its own chunk size, and its output kernel cuts each chunk
# into row blocks of OUTPUT_ROWS tokens (the earlier blocks of a chunk enter a row block through their tokens, not
# through a state). FORWARD_CHUNK None: CHUNK tokens, unless the inputs are 16-bit and the walker's programs would be
# fewer than the multiprocessors (a few long rows): then LONG_CHUNK tokens with walker tiles of LONG_CHUNK_TILE, since
# the walk's latency per chunk sets the time there (H100, B1 T16384: 706 -> 475 us), while with many rows longer
# chunks were slower (B8 T4096: 518 -> 682 us; BENCHMARKS.md, sixth session). float32 walker tiles of LONG_CHUNK
# tokens spill (H100, B1 T16384 float32: 3.8 -> 17.1 ms). An int forces that chunk.
FORWARD_CHUNK: int | None = None
OUTPUT_ROWS = 32
LONG_CHUNK = 128
LONG_CHUNK_TILE = (64, 32)
# warps per kernel, and whether 16-bit inputs keep their chunk-boundary states in 16 bits between kernels (less
# traffic, one rounding per chunk); module-level so that bench/gpu_kernels.py can sweep them
WARPS = {"states": 4, "output": 4, "state_grads": 4, "grads": 4}
STATES_16BIT = True
# d_state block of the chunk kernels (they loop over d_state); (head_dim, d_state) tile of the sequential walker
N_BLOCK = 64
STATE_TILE = (64, 64)
# whether the walker loads each chunk's inputs one chunk ahead
WALK_PREFETCH = True
# The backward's two walks (the forward states again, and their gradients) share one launch while one walk has
# fewer programs than this many per multiprocessor: both are chains bound by their latency per chunk, and side by
# side they overlap (H100, bf16, 24 heads of 64, state 128: forward+backward B1 T8192 1,176 -> 1,010 us, B4 T2048
# 791 -> 753 us), while with programs enough for the GPU the shared launch was slower (B8 T4096 2,668 -> 2,765 us;
# BENCHMARKS.md, sixteenth session). Always without a GPU, so that the CPU tests run the shared launch.
WALK_PAIR_BELOW_PROGRAMS_PER_SM = 2
# Heads of one group per program of the gradient kernel, which sums their dB and dC in its own float32 partial: one
# head per program writes (and torch reads back) a (batch, seqlen, heads, d_state) float32 tensor twice, 400 MB each
# at B8 T4096 H24 N128, while a whole group per program leaves too few programs (24 heads: 3,145 vs 2,575 us
# forward+backward on an H100). None: the most of GRADS_HEADS_PER_PROGRAM_CHOICES that divides the heads of a group
# and leaves at least GRADS_MIN_PROGRAMS_PER_SM programs per multiprocessor, one for float32 inputs (no GPU: the most
# that divides, so that tests run the sums). An int forces it; it must divide heads // groups.
GRADS_HEADS_PER_PROGRAM: int | None = None
GRADS_HEADS_PER_PROGRAM_CHOICES = (8, 4, 2, 1)
GRADS_MIN_PROGRAMS_PER_SM = 8


@triton.jit
def _mm(a, b, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr):
    """a @ b accumulated in float32: full float32 for float32 inputs, else in the inputs' 16-bit type."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE))


@triton.jit
def _dt_transform(raw, bias, lo, hi, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr):
    """Δ from its stored value as `ssd_prepare_dt` makes it (float32: + bias, softplus as torch's with threshold 20,
    clamped to [lo, hi]) and dΔ/d(stored value): sigmoid below the threshold, 1 above, 0 where the clamp holds
    (torch.clamp passes the gradient where lo ≤ v ≤ hi)."""
    v = raw.to(tl.float32)
    if HAS_BIAS:
        v += bias
    dt = v
    deriv = tl.full(v.shape, 1.0, tl.float32)
    if SOFTPLUS:
        e = tl.exp(-tl.abs(v))  # ≤ 1: max(v, 0) + log(1 + e) keeps softplus's tiny values for very negative v
        dt = tl.where(v > 20.0, v, tl.maximum(v, 0.0) + log1p_small(e))
        deriv = tl.where(v > 20.0, 1.0, tl.where(v >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e)))
    if HAS_LIMIT:
        deriv = tl.where((dt >= lo) & (dt <= hi), deriv, 0.0)
        dt = tl.minimum(tl.maximum(dt, lo), hi)
    return dt, deriv


@triton.jit
def _token_offsets(row, t, stride_b, stride_t):
    """Offsets of tokens t of batch row `row` (int64) in a tensor with these batch and token strides; in int64, as
    one row of a wide tensor (in_proj's output) may hold more than 2^31 elements."""
    return row * stride_b + t.to(tl.int64) * stride_t


@triton.jit
def _chunk_decays(dt_ptr, bias_ptr, seq_ptr, row, head, start, L, stride_dt_b, stride_dt_t, dt_lo, dt_hi, A,
                  HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, HAS_SEQ: tl.constexpr,
                  BLOCK_Q: tl.constexpr):
    """Tokens of the chunk at `start`: (t, valid, Δ, a = ΔA with -inf where a sequence starts, is_start,
    dΔ/d(stored Δ)). Δ is read as stored (any float dtype, token rows stride_dt_t apart, heads packed) and made
    here: + bias, softplus, clamp to [dt_lo, dt_hi] (see `_dt_transform`); 0 outside the sequence."""
    t = start + tl.arange(0, BLOCK_Q)
    valid = (t >= 0) & (t < L)  # a walker's look-ahead may ask for the chunk before the first
    raw = tl.load(dt_ptr + _token_offsets(row, t, stride_dt_b, stride_dt_t) + head, mask=valid, other=0.0)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + head).to(tl.float32)
    dt, deriv = _dt_transform(raw, bias, dt_lo, dt_hi, HAS_BIAS, SOFTPLUS, HAS_LIMIT)
    dt = tl.where(valid, dt, 0.0)  # bias and softplus would make the padding's Δ nonzero: a decay past the end
    a = dt * A
    is_start = t < 0
    if HAS_SEQ:
        current = tl.load(seq_ptr + row * L + t, mask=valid, other=0)
        previous = tl.load(seq_ptr + row * L + t - 1, mask=valid & (t > 0), other=0)
        is_start = valid & (t > 0) & (current != previous)
        a = tl.where(is_start, float("-inf"), a)
    return t, valid, dt, a, is_start, deriv


@triton.jit
def _decay_to_end(a, BLOCK_Q: tl.constexpr):
    """Σ_{j>s} a_j for each s of the chunk: (Q,)."""
    j = tl.arange(0, BLOCK_Q)[:, None]
    s = tl.arange(0, BLOCK_Q)[None, :]
    return tl.sum(tl.where(j > s, a[:, None], 0.0), axis=0)


@triton.jit
def _decay_matrix(a, BLOCK_Q: tl.constexpr):
    """exp(Σ_{s<j≤t} a_j) for t ≥ s, else 0: (Q, Q), rows t."""
    t = tl.arange(0, BLOCK_Q)[:, None]
    s = tl.arange(0, BLOCK_Q)[None, :]
    seg = tl.cumsum(tl.where(t > s, a[:, None], 0.0), axis=0)
    return tl.where(t >= s, tl.exp(seg), 0.0)


@triton.jit
def _program_head(H, G):
    """(program's batch*heads index, batch row as int64, head, group) of a program on grid axis 0."""
    return _row_head(tl.program_id(0), H, G)


@triton.jit
def _row_head(bh, H, G):
    """(bh, batch row as int64, head, group) of the batch*heads index bh."""
    head = bh % H
    return bh, (bh // H).to(tl.int64), head, head // (H // G)


@triton.jit
def _state_tile(P, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """The (head_dim, d_state) tile of grid axes 1 and 2: its head_dim and d_state offsets and masks, and its
    offsets and mask inside one state."""
    p_offs = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    n_offs = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    p_mask, n_mask = p_offs < P, n_offs < N
    return p_offs, n_offs, p_mask, n_mask, p_offs[:, None] * N + n_offs[None, :], p_mask[:, None] & n_mask[None, :]


@triton.jit
def _walk_inputs(v_ptr, w_ptr, dt_ptr, bias_ptr, seq_ptr, row, head, group, k, L, P, N, stride_v_b, stride_v_t,
                 stride_w_b, stride_w_t, stride_dt_b, stride_dt_t, dt_lo, dt_hi, A, p_offs, n_offs, p_mask, n_mask,
                 HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, HAS_SEQ: tl.constexpr,
                 BLOCK_Q: tl.constexpr):
    """Chunk k's Δ and a (Q,), v (Q, BLOCK_P) and w (Q, BLOCK_N) for `_chunk_walk_kernel`; a chunk outside the
    sequence (asked for one step ahead of the last) reads as empty."""
    t, valid, dt, a, _, _ = _chunk_decays(dt_ptr, bias_ptr, seq_ptr, row, head, k * BLOCK_Q, L, stride_dt_b,
                                          stride_dt_t, dt_lo, dt_hi, A, HAS_BIAS, SOFTPLUS, HAS_LIMIT, HAS_SEQ,
                                          BLOCK_Q)
    v = tl.load(v_ptr + _token_offsets(row, t, stride_v_b, stride_v_t)[:, None] + head * P + p_offs[None, :],
                mask=valid[:, None] & p_mask[None, :], other=0.0)
    w = tl.load(w_ptr + _token_offsets(row, t, stride_w_b, stride_w_t)[:, None] + group * N + n_offs[None, :],
                mask=valid[:, None] & n_mask[None, :], other=0.0)
    return dt, a, v, w


@triton.jit
def _load_A(A_ptr, head, A_LOG: tl.constexpr):
    """One head's A in float32: A_ptr holds A, or with A_LOG its stored log (A = -exp(A_log), made here so that the
    mixer runs no cast, exp and negation ops of its own)."""
    a = tl.load(A_ptr + head).to(tl.float32)
    if A_LOG:
        a = -tl.exp(a)
    return a


@triton.jit
def _walk(
    bh, v_ptr, dt_ptr, bias_ptr, A_ptr, w_ptr, seq_ptr, init_ptr, walk_ptr, last_ptr,
    L, H, P, G, N, n_chunks, stride_v_b, stride_v_t, stride_w_b, stride_w_t, stride_dt_b, stride_dt_t, dt_lo, dt_hi,
    HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_LIMIT: tl.constexpr, REVERSE: tl.constexpr, IEEE: tl.constexpr,
    PREFETCH: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    A_LOG: tl.constexpr = False,
):
    """The one sequential part, in either direction: S ← exp(Σ_chunk a) S + Σ_t (c_t v_t) w_tᵀ over the chunks.
    Forward (REVERSE off): v = x, w = B, c_s = Δ_s exp(Σ_{j>s} a_j) (decay to the chunk's end), chunks in order,
    init = the initial state; walk[row, k, head] = H_k entering chunk k, last = the final state. Backward
    (REVERSE on): v = dy, w = C, c_t = exp(Σ_{j≤t} a_j) (decay from the chunk's start), chunks in reverse, init =
    the final state's gradient; walk[row, k, head] = dH_{k+1} reaching chunk k's end, last = the initial state's
    gradient. v and w are read in place (token rows stride_*_t apart, (heads, head_dim) and (groups, d_state)
    packed within a token), Δ as stored (see `_chunk_decays`). bh: the program's (batch row, head) index; grid axes
    1 and 2 pick its (head_dim, d_state) tile."""
    bh, row, head, group = _row_head(bh, H, G)
    p_offs, n_offs, p_mask, n_mask, pn_offs, pn_mask = _state_tile(P, N, BLOCK_P, BLOCK_N)
    A = _load_A(A_ptr, head, A_LOG)
    if HAS_INIT:
        state = tl.load(init_ptr + (row * H + head) * P * N + pn_offs, mask=pn_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    # each chunk's inputs are loaded one chunk ahead (PREFETCH): the walk is a chain of small dependent matmuls,
    # and without this every chunk would wait for its loads
    cur = _walk_inputs(v_ptr, w_ptr, dt_ptr, bias_ptr, seq_ptr, row, head, group, n_chunks - 1 if REVERSE else 0, L,
                       P, N, stride_v_b, stride_v_t, stride_w_b, stride_w_t, stride_dt_b, stride_dt_t, dt_lo, dt_hi,
                       A, p_offs, n_offs, p_mask, n_mask, HAS_BIAS, SOFTPLUS, HAS_LIMIT, HAS_SEQ, BLOCK_Q)
    for i in range(0, n_chunks):
        k = n_chunks - 1 - i if REVERSE else i
        if PREFETCH:
            nxt = _walk_inputs(v_ptr, w_ptr, dt_ptr, bias_ptr, seq_ptr, row, head, group, k - 1 if REVERSE else k + 1,
                               L, P, N, stride_v_b, stride_v_t, stride_w_b, stride_w_t, stride_dt_b, stride_dt_t,
                               dt_lo, dt_hi, A, p_offs, n_offs, p_mask, n_mask, HAS_BIAS, SOFTPLUS, HAS_LIMIT,
                               HAS_SEQ, BLOCK_Q)
        else:
            cur = _walk_inputs(v_ptr, w_ptr, dt_ptr, bias_ptr, seq_ptr, row, head, group, k, L, P, N, stride_v_b,
                               stride_v_t, stride_w_b, stride_w_t, stride_dt_b, stride_dt_t, dt_lo, dt_hi, A, p_offs,
                               n_offs, p_mask, n_mask, HAS_BIAS, SOFTPLUS, HAS_LIMIT, HAS_SEQ, BLOCK_Q)
        tl.store(walk_ptr + ((row * n_chunks + k) * H + head) * P * N + pn_offs,
                 state.to(walk_ptr.dtype.element_ty), mask=pn_mask)
        dt, a, v, w = cur
        if REVERSE:
            weight = tl.exp(tl.cumsum(a, axis=0))
        else:
            weight = dt * tl.exp(_decay_to_end(a, BLOCK_Q))
        # products in x's 16-bit type going forward and in C's going backward (as two kernels did before)
        dot_dtype: tl.constexpr = w_ptr.dtype.element_ty if REVERSE else v_ptr.dtype.element_ty
        state = state * tl.exp(tl.sum(a, axis=0)) + _mm(tl.trans(v.to(tl.float32) * weight[:, None]), w, dot_dtype,
                                                         IEEE)
        if PREFETCH:
            cur = nxt
    tl.store(last_ptr + (row * H + head) * P * N + pn_offs, state, mask=pn_mask)


@fast_launch
@triton.jit
def _chunk_walk_kernel(
    v_ptr, dt_ptr, bias_ptr, A_ptr, w_ptr, seq_ptr, init_ptr, walk_ptr, last_ptr,
    L, H, P, G, N, n_chunks, stride_v_b, stride_v_t, stride_w_b, stride_w_t, stride_dt_b, stride_dt_t, dt_lo, dt_hi,
    HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_LIMIT: tl.constexpr, REVERSE: tl.constexpr, IEEE: tl.constexpr,
    PREFETCH: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    A_LOG: tl.constexpr = False,
):
    """`_walk` in one direction. Grid: (batch * heads, head_dim blocks, d_state blocks)."""
    _walk(tl.program_id(0), v_ptr, dt_ptr, bias_ptr, A_ptr, w_ptr, seq_ptr, init_ptr, walk_ptr, last_ptr,
          L, H, P, G, N, n_chunks, stride_v_b, stride_v_t, stride_w_b, stride_w_t, stride_dt_b, stride_dt_t, dt_lo,
          dt_hi, HAS_INIT, HAS_SEQ, HAS_BIAS, SOFTPLUS, HAS_LIMIT, REVERSE, IEEE, PREFETCH, BLOCK_Q, BLOCK_P, BLOCK_N,
          A_LOG)


@fast_launch
@triton.jit
def _chunk_walk_pair_kernel(
    x_ptr, dt_ptr, bias_ptr, A_ptr, B_ptr, seq_ptr, h0_ptr, states_ptr, final_ptr,
    dy_ptr, C_ptr, dfinal_ptr, dstates_ptr, dh0_ptr,
    L, H, P, G, N, n_chunks, stride_x_b, stride_x_t, stride_B_b, stride_B_t, stride_dy_b, stride_dy_t, stride_C_b,
    stride_C_t, stride_dt_b, stride_dt_t, dt_lo, dt_hi,
    HAS_H0: tl.constexpr, HAS_DFINAL: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, IEEE: tl.constexpr,
    PREFETCH: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    A_LOG: tl.constexpr = False,
):
    """The backward's two walks in one launch: the forward states (x, B, h0 -> states, final) on the first
    batch * heads programs of axis 0, the states' gradients (dy, C, dfinal -> dstates, dh0) on the next ones. The
    two are independent chains of small dependent steps, each bound by its latency per chunk: side by side they
    overlap, where two launches ran one after the other, and with a few long rows each alone left most
    multiprocessors idle. Grid: (2 * batch * heads, head_dim blocks, d_state blocks)."""
    rows = tl.num_programs(0) // 2
    bh = tl.program_id(0)
    if bh < rows:
        _walk(bh, x_ptr, dt_ptr, bias_ptr, A_ptr, B_ptr, seq_ptr, h0_ptr, states_ptr, final_ptr,
              L, H, P, G, N, n_chunks, stride_x_b, stride_x_t, stride_B_b, stride_B_t, stride_dt_b, stride_dt_t,
              dt_lo, dt_hi, HAS_H0, HAS_SEQ, HAS_BIAS, SOFTPLUS, HAS_LIMIT, False, IEEE, PREFETCH, BLOCK_Q,
              BLOCK_P, BLOCK_N, A_LOG)
    else:
        _walk(bh - rows, dy_ptr, dt_ptr, bias_ptr, A_ptr, C_ptr, seq_ptr, dfinal_ptr, dstates_ptr, dh0_ptr,
              L, H, P, G, N, n_chunks, stride_dy_b, stride_dy_t, stride_C_b, stride_C_t, stride_dt_b, stride_dt_t,
              dt_lo, dt_hi, HAS_DFINAL, HAS_SEQ, HAS_BIAS, SOFTPLUS, HAS_LIMIT, True, IEEE, PREFETCH, BLOCK_Q,
              BLOCK_P, BLOCK_N, A_LOG)


@fast_launch
@triton.jit
def _chunk_output_kernel(
    x_ptr, dt_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, seq_ptr, states_ptr, y_ptr,
    L, H, P, G, N, n_chunks, stride_x_b, stride_x_t, stride_B_b, stride_B_t, stride_C_b, stride_C_t, stride_dt_b,
    stride_dt_t, dt_lo, dt_hi,
    HAS_D: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_LIMIT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    A_LOG: tl.constexpr = False,
):
    """y of BLOCK_M tokens (a row block of one chunk of BLOCK_Q tokens) from the state entering the chunk and the
    chunk's tokens up to them; d_state is walked in blocks of BLOCK_N. A chunk longer than a row block stores half
    (or fewer) chunk states: the row blocks before this one enter through their tokens, not through a state.
    x, B and C are read in place (token rows stride_*_t apart, heads and groups packed within a token), Δ as stored
    (see `_chunk_decays`); y is contiguous. Grid: (batch * heads, row blocks up to the sequence's end (block i
    starts at token i * BLOCK_M), head_dim blocks)."""
    bh, row, head, group = _program_head(H, G)
    blocks: tl.constexpr = BLOCK_Q // BLOCK_M
    k = tl.program_id(1) // blocks
    m = tl.program_id(1) % blocks
    p_offs = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p_offs < P
    A = _load_A(A_ptr, head, A_LOG)
    start = k * BLOCK_Q + m * BLOCK_M
    t, valid, dt, a, _, _ = _chunk_decays(dt_ptr, bias_ptr, seq_ptr, row, head, start, L, stride_dt_b, stride_dt_t,
                                          dt_lo, dt_hi, A, HAS_BIAS, SOFTPLUS, HAS_LIMIT, HAS_SEQ, BLOCK_M)
    x_offs = _token_offsets(row, t, stride_x_b, stride_x_t)[:, None] + head * P + p_offs[None, :]
    B_rows = _token_offsets(row, t, stride_B_b, stride_B_t)[:, None] + group * N
    C_rows = _token_offsets(row, t, stride_C_b, stride_C_t)[:, None] + group * N
    tp_mask = valid[:, None] & p_mask[None, :]
    dot_dtype = x_ptr.dtype.element_ty
    scores = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    from_state = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n_offs = n0 + tl.arange(0, BLOCK_N)
        n_mask = n_offs < N
        tn_mask = valid[:, None] & n_mask[None, :]
        Cq = tl.load(C_ptr + C_rows + n_offs[None, :], mask=tn_mask, other=0.0)
        Bq = tl.load(B_ptr + B_rows + n_offs[None, :], mask=tn_mask, other=0.0)
        state = tl.load(states_ptr + ((row * n_chunks + k) * H + head) * P * N + p_offs[:, None] * N
                        + n_offs[None, :], mask=p_mask[:, None] & n_mask[None, :], other=0.0)
        scores += _mm(Cq, tl.trans(Bq), dot_dtype, IEEE)
        from_state += _mm(Cq, tl.trans(state), dot_dtype, IEEE)
    x = tl.load(x_ptr + x_offs, mask=tp_mask, other=0.0)
    y = _mm(scores * _decay_matrix(a, BLOCK_M), x.to(tl.float32) * dt[:, None], dot_dtype, IEEE)
    # the chunk's earlier row blocks, nearest first: token s of one reaches t with exp(Σ_{start≤j≤t} a_j + the
    # blocks in between + Σ_{j>s in its block} a_j), each a direct sum of terms ≤ 0 (no differences of prefix sums)
    cum = tl.cumsum(a, axis=0)
    between = tl.sum(tl.zeros_like(a), axis=0)  # a float32 zero of the loop's type (a literal would be a constant)
    for back in range(1, m + 1):
        # (all inside the sequence: they come before this block, which holds a token of it)
        ts, valid_s, dts, as_, _, _ = _chunk_decays(dt_ptr, bias_ptr, seq_ptr, row, head, start - back * BLOCK_M, L,
                                                    stride_dt_b, stride_dt_t, dt_lo, dt_hi, A, HAS_BIAS, SOFTPLUS,
                                                    HAS_LIMIT, HAS_SEQ, BLOCK_M)
        Bs_rows = _token_offsets(row, ts, stride_B_b, stride_B_t)[:, None] + group * N
        scores = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n_offs = n0 + tl.arange(0, BLOCK_N)
            n_mask = n_offs < N
            Cq = tl.load(C_ptr + C_rows + n_offs[None, :], mask=valid[:, None] & n_mask[None, :], other=0.0)
            Bs = tl.load(B_ptr + Bs_rows + n_offs[None, :], mask=valid_s[:, None] & n_mask[None, :], other=0.0)
            scores += _mm(Cq, tl.trans(Bs), dot_dtype, IEEE)
        xs = tl.load(x_ptr + _token_offsets(row, ts, stride_x_b, stride_x_t)[:, None] + head * P + p_offs[None, :],
                     mask=valid_s[:, None] & p_mask[None, :], other=0.0)
        decay = tl.exp(cum[:, None] + between + _decay_to_end(as_, BLOCK_M)[None, :])
        y += _mm(scores * decay, xs.to(tl.float32) * dts[:, None], dot_dtype, IEEE)
        between += tl.sum(as_, axis=0)
    y += from_state * tl.exp(cum + between)[:, None]
    if HAS_D:
        y += tl.load(D_ptr + head).to(tl.float32) * x.to(tl.float32)
    tl.store(y_ptr + ((row * L + t[:, None]) * H + head) * P + p_offs[None, :], y.to(y_ptr.dtype.element_ty),
             mask=tp_mask)


@triton.jit
def _grad_inputs_block(B_ptr, C_ptr, states_ptr, dstates_ptr, B_rows, C_rows, valid, state_base, p_mask, n0, N,
                       BLOCK_N: tl.constexpr):
    """B and C of the chunk's tokens (B_rows, C_rows: (Q, 1) offsets of their group's d_state), H_k and dH_{k+1}
    for d_state block n0 (with its offsets and token mask)."""
    n_offs = n0 + tl.arange(0, BLOCK_N)
    n_mask = n_offs < N
    tn_mask = valid[:, None] & n_mask[None, :]
    pn_mask = p_mask[:, None] & n_mask[None, :]
    return (tl.load(B_ptr + B_rows + n_offs[None, :], mask=tn_mask, other=0.0),
            tl.load(C_ptr + C_rows + n_offs[None, :], mask=tn_mask, other=0.0),
            tl.load(states_ptr + state_base + n_offs[None, :], mask=pn_mask, other=0.0),
            tl.load(dstates_ptr + state_base + n_offs[None, :], mask=pn_mask, other=0.0), n_offs, tn_mask)


@fast_launch
@triton.jit
def _chunk_grads_kernel(
    x_ptr, dt_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, seq_ptr, states_ptr, dstates_ptr, dy_ptr,
    dx_ptr, ddt_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, deriv_ptr, d_bias_ptr,
    L, H, P, G, N, n_chunks, stride_x_b, stride_x_t, stride_B_b, stride_B_t, stride_C_b, stride_C_t, stride_dt_b,
    stride_dt_t, dt_lo, dt_hi, stride_dx_b, stride_dx_t, stride_ddt_b, stride_ddt_t,
    HAS_D: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_LIMIT: tl.constexpr, IEEE: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, A_LOG: tl.constexpr = False,
    HAS_DERIV: tl.constexpr = False, BIAS_PARTS: tl.constexpr = False,
):
    """Gradients of one chunk for HEADS_PER_PROGRAM consecutive heads of one group: dx, the gradient of Δ as stored
    (through the Δ·A product and Δ x, then back through the clamp, softplus and bias, and with HAS_DERIV times the
    derivative of Δ as `_dt_make_kernel` made it (float32 contiguous (batch, seqlen, heads)); stored in ddt's dtype
    through its batch and token strides, heads packed) and this chunk's share of dA and dD per head (and with
    BIAS_PARTS of the Δ bias's gradient: Σ over the chunk's tokens of that gradient), one head after the other; dB
    and dC summed over the program's heads into its own float32 partial, dB[row, t, split] and dC[row, t, split] of
    shape (batch, seqlen, heads / HEADS_PER_PROGRAM, d_state) (summed over the splits of a group afterwards). Per
    head, d_state is walked in blocks of BLOCK_N for the products that contract it; then, for dB and dC, once more
    per head (one head per program) or once for all of them (`_group_grads_BC`). x, B, C and Δ are read in place as
    in `_chunk_output_kernel`; dy is contiguous, dx written through its strides. Grid: (batch * heads /
    HEADS_PER_PROGRAM, chunks)."""
    splits = H // HEADS_PER_PROGRAM
    row = (tl.program_id(0) // splits).to(tl.int64)
    split = tl.program_id(0) % splits
    group = split * HEADS_PER_PROGRAM // (H // G)  # the program's heads all lie in this group
    k = tl.program_id(1)
    p_offs = tl.arange(0, BLOCK_P)
    p_mask = p_offs < P
    dot_dtype = x_ptr.dtype.element_ty
    rows_t = tl.arange(0, BLOCK_Q)[:, None]
    cols_s = tl.arange(0, BLOCK_Q)[None, :]
    d_scores_sum = tl.zeros((BLOCK_Q, BLOCK_Q), dtype=tl.float32)  # Σ over the program's heads of dL/d(C_t·B_s)
    for i in range(0, HEADS_PER_PROGRAM):
        bh = tl.program_id(0) * HEADS_PER_PROGRAM + i  # row * H + head, in 32 bits
        head = split * HEADS_PER_PROGRAM + i
        A = _load_A(A_ptr, head, A_LOG)
        t, valid, dt, a, is_start, dt_deriv = _chunk_decays(dt_ptr, bias_ptr, seq_ptr, row, head, k * BLOCK_Q, L,
                                                            stride_dt_b, stride_dt_t, dt_lo, dt_hi, A, HAS_BIAS,
                                                            SOFTPLUS, HAS_LIMIT, HAS_SEQ, BLOCK_Q)
        tp_offs = ((row * L + t[:, None]) * H + head) * P + p_offs[None, :]  # dy (contiguous)
        tp_mask = valid[:, None] & p_mask[None, :]
        B_rows = _token_offsets(row, t, stride_B_b, stride_B_t)[:, None] + group * N
        C_rows = _token_offsets(row, t, stride_C_b, stride_C_t)[:, None] + group * N
        x = tl.load(x_ptr + _token_offsets(row, t, stride_x_b, stride_x_t)[:, None] + head * P + p_offs[None, :],
                    mask=tp_mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + tp_offs, mask=tp_mask, other=0.0).to(tl.float32)
        xdt = x * dt[:, None]
        state_base = ((row * n_chunks + k) * H + head) * P * N + p_offs[:, None] * N

        scores = tl.zeros((BLOCK_Q, BLOCK_Q), dtype=tl.float32)      # C_t·B_s
        C_state = tl.zeros((BLOCK_Q, BLOCK_P), dtype=tl.float32)     # C_t H_kᵀ
        B_dnext = tl.zeros((BLOCK_Q, BLOCK_P), dtype=tl.float32)     # B_s dH_{k+1}ᵀ
        state_dnext = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            Bq, Cq, state, dnext, n_offs, tn_mask = _grad_inputs_block(
                B_ptr, C_ptr, states_ptr, dstates_ptr, B_rows, C_rows, valid, state_base, p_mask, n0, N, BLOCK_N)
            scores += _mm(Cq, tl.trans(Bq), dot_dtype, IEEE)
            C_state += _mm(Cq, tl.trans(state), dot_dtype, IEEE)
            B_dnext += _mm(Bq, tl.trans(dnext), dot_dtype, IEEE)
            state_dnext += tl.sum(state.to(tl.float32) * dnext.to(tl.float32), axis=1)

        decay = _decay_matrix(a, BLOCK_Q)                         # (t, s)
        to_end = tl.exp(_decay_to_end(a, BLOCK_Q))                # (s,)
        from_start = tl.exp(tl.cumsum(a, axis=0))                 # (t,)
        d_mixed = tl.where(rows_t >= cols_s, _mm(dy, tl.trans(xdt), dot_dtype, IEEE), 0.0)  # dL/d(scores ∘ decay)
        # dL/dxdt_s: through the chunk's outputs and, weighted by w_s = to_end, through the state it leaves
        dxdt = _mm(tl.trans(scores * decay), dy, dot_dtype, IEEE) + to_end[:, None] * B_dnext

        # gradient of each log-decay a_j, through the three sums it enters (inside the chunk, from the chunk's
        # start, to the chunk's end) and the chunk's total
        d_seg = d_mixed * scores * decay                                                  # (t, s)
        before = tl.cumsum(d_seg, axis=1) - d_seg                                         # Σ_{s<j} d_seg[t, s]
        da = tl.sum(tl.where(rows_t >= cols_s, before, 0.0), axis=0)
        d_from_start = from_start * tl.sum(dy * C_state, axis=1)                         # (t,)
        da += tl.sum(tl.where(rows_t >= cols_s, d_from_start[:, None], 0.0), axis=0)     # Σ_{t≥j}
        d_to_end = to_end * tl.sum(B_dnext * xdt, axis=1)                               # (s,)
        da += tl.sum(tl.where(rows_t < cols_s, d_to_end[:, None], 0.0), axis=0)         # Σ_{s<j}
        da += tl.exp(tl.sum(a, axis=0)) * tl.sum(state_dnext, axis=0)
        da = tl.where(is_start | (t >= L), 0.0, da)      # a sequence start's decay is the constant -inf

        dx = dxdt * dt[:, None]
        if HAS_D:
            Dh = tl.load(D_ptr + head).to(tl.float32)
            dx += Dh * dy
            tl.store(dD_ptr + bh * n_chunks + k, tl.sum(tl.sum(dy * x, axis=1), axis=0))
        # dx through its own strides (it may be a column slice of the gradient of the conv's output)
        tl.store(dx_ptr + _token_offsets(row, t, stride_dx_b, stride_dx_t)[:, None] + head * P + p_offs[None, :],
                 dx.to(dx_ptr.dtype.element_ty), mask=tp_mask)
        # dL/dΔ, then back through the clamp, softplus and bias to Δ as stored
        ddt = (tl.sum(dxdt * x, axis=1) + A * da) * dt_deriv
        if HAS_DERIV:  # Δ was made by `_dt_make_kernel`: back through its making
            ddt *= tl.load(deriv_ptr + (row * L + t) * H + head, mask=valid, other=0.0)
        tl.store(ddt_ptr + row * stride_ddt_b + t * stride_ddt_t + head, ddt.to(ddt_ptr.dtype.element_ty),
                 mask=valid)
        if BIAS_PARTS:  # the bias enters every token's Δ
            tl.store(d_bias_ptr + bh * n_chunks + k, tl.sum(tl.where(valid, ddt, 0.0), axis=0))
        dA = tl.sum(da * dt, axis=0)
        if A_LOG:  # the gradient of A_log: dA/dA_log = -exp(A_log) = A
            dA = dA * A
        tl.store(dA_ptr + bh * n_chunks + k, dA)

        d_scores = d_mixed * decay
        if HEADS_PER_PROGRAM == 1:  # this head's dB and dC from the tiles at hand
            for n0 in range(0, N, BLOCK_N):
                Bq, Cq, state, dnext, n_offs, tn_mask = _grad_inputs_block(
                    B_ptr, C_ptr, states_ptr, dstates_ptr, B_rows, C_rows, valid, state_base, p_mask, n0, N,
                    BLOCK_N)
                dC = _mm(d_scores, Bq, dot_dtype, IEEE) + from_start[:, None] * _mm(dy, state, dot_dtype, IEEE)
                dB = _mm(tl.trans(d_scores), Cq, dot_dtype, IEEE) + to_end[:, None] * _mm(xdt, dnext, dot_dtype,
                                                                                          IEEE)
                dbc_offs = ((row * L + t[:, None]) * H + head) * N + n_offs[None, :]
                tl.store(dB_ptr + dbc_offs, dB, mask=tn_mask)
                tl.store(dC_ptr + dbc_offs, dC, mask=tn_mask)
        else:
            d_scores_sum += d_scores

    if HEADS_PER_PROGRAM > 1:
        _group_grads_BC(x_ptr, dt_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, seq_ptr, states_ptr, dstates_ptr, dy_ptr,
                        dB_ptr, dC_ptr, d_scores_sum, row, split, splits, group, k, L, H, P, N, n_chunks, stride_x_b,
                        stride_x_t, stride_B_b, stride_B_t, stride_C_b, stride_C_t, stride_dt_b, stride_dt_t, dt_lo,
                        dt_hi, HAS_SEQ, HAS_BIAS, SOFTPLUS, HAS_LIMIT, IEEE, HEADS_PER_PROGRAM, BLOCK_Q, BLOCK_P,
                        BLOCK_N, A_LOG)


@triton.jit
def _group_grads_BC(x_ptr, dt_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, seq_ptr, states_ptr, dstates_ptr, dy_ptr, dB_ptr,
                    dC_ptr, d_scores_sum, row, split, splits, group, k, L, H, P, N, n_chunks, stride_x_b, stride_x_t,
                    stride_B_b, stride_B_t, stride_C_b, stride_C_t, stride_dt_b, stride_dt_t, dt_lo, dt_hi,
                    HAS_SEQ: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
                    IEEE: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr, BLOCK_Q: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, A_LOG: tl.constexpr):
    """dB and dC of one chunk summed over the HEADS_PER_PROGRAM heads of `_chunk_grads_kernel`'s program, stored
    once into its partial. d_scores_sum (chunk, chunk): Σ over those heads of dL/d(C_t·B_s).
    d_state is walked outside, the heads inside, so that each block's sums stay in registers and are stored once
    (a read-modify-write of the partial per head, or sums of the whole d_state held across the heads, spill). C_t·B_s
    is the same for the heads of a group, so dC_t = Σ_s (Σ_heads d_scores[t, s]) B_s + Σ_heads from_start_t dy_t H_kᵀ
    (dB likewise): one product with the summed d_scores, and one per head with its state."""
    p_offs = tl.arange(0, BLOCK_P)
    p_mask = p_offs < P
    dot_dtype = x_ptr.dtype.element_ty
    t = k * BLOCK_Q + tl.arange(0, BLOCK_Q)
    valid = t < L
    x_rows = _token_offsets(row, t, stride_x_b, stride_x_t)[:, None]
    for n0 in range(0, N, BLOCK_N):
        n_offs = n0 + tl.arange(0, BLOCK_N)
        n_mask = n_offs < N
        tn_mask = valid[:, None] & n_mask[None, :]
        Bq = tl.load(B_ptr + _token_offsets(row, t, stride_B_b, stride_B_t)[:, None] + group * N + n_offs[None, :],
                     mask=tn_mask, other=0.0)
        Cq = tl.load(C_ptr + _token_offsets(row, t, stride_C_b, stride_C_t)[:, None] + group * N + n_offs[None, :],
                     mask=tn_mask, other=0.0)
        dC = _mm(d_scores_sum, Bq, dot_dtype, IEEE)
        dB = _mm(tl.trans(d_scores_sum), Cq, dot_dtype, IEEE)
        for i in range(0, HEADS_PER_PROGRAM):
            # this head's tokens again (cheaper than holding every head's (chunk, head_dim) tiles)
            head = split * HEADS_PER_PROGRAM + i
            A = _load_A(A_ptr, head, A_LOG)
            _, _, dt, a, _, _ = _chunk_decays(dt_ptr, bias_ptr, seq_ptr, row, head, k * BLOCK_Q, L, stride_dt_b,
                                              stride_dt_t, dt_lo, dt_hi, A, HAS_BIAS, SOFTPLUS, HAS_LIMIT, HAS_SEQ,
                                              BLOCK_Q)
            tp_mask = valid[:, None] & p_mask[None, :]
            xdt = tl.load(x_ptr + x_rows + head * P + p_offs[None, :], mask=tp_mask, other=0.0).to(tl.float32) \
                * dt[:, None]
            dy = tl.load(dy_ptr + ((row * L + t[:, None]) * H + head) * P + p_offs[None, :], mask=tp_mask, other=0.0)
            pn_offs = ((row * n_chunks + k) * H + head) * P * N + p_offs[:, None] * N + n_offs[None, :]
            pn_mask = p_mask[:, None] & n_mask[None, :]
            state = tl.load(states_ptr + pn_offs, mask=pn_mask, other=0.0)
            dnext = tl.load(dstates_ptr + pn_offs, mask=pn_mask, other=0.0)
            dC += tl.exp(tl.cumsum(a, axis=0))[:, None] * _mm(dy, state, dot_dtype, IEEE)
            dB += tl.exp(_decay_to_end(a, BLOCK_Q))[:, None] * _mm(xdt, dnext, dot_dtype, IEEE)
        dbc_offs = ((row * L + t[:, None]) * splits + split) * N + n_offs[None, :]
        tl.store(dB_ptr + dbc_offs, dB, mask=tn_mask)
        tl.store(dC_ptr + dbc_offs, dC, mask=tn_mask)


# Tiles. The chunk is the same in every kernel (states sit at chunk boundaries); the walker splits
# (head_dim, d_state) into tiles for parallelism, the chunk kernels hold a whole d_state (and, for gradients, a
# whole head_dim) in one program.
MAX_D_STATE = 256
MAX_HEAD_DIM = 128


def supports(d_state: int, head_dim: int = 64) -> bool:
    """Whether the kernels have tiles for this state size and head dimension."""
    return d_state <= MAX_D_STATE and head_dim <= MAX_HEAD_DIM


def _chunk(head_dim: int) -> int:
    # the chunk kernels hold (chunk x head_dim) tiles whole; d_state they walk in blocks
    return CHUNK if head_dim <= 64 else min(CHUNK, 32)


def _forward_plan(x: torch.Tensor, d_state: int) -> tuple[int, int, tuple[int, int]]:
    """(tokens per stored chunk state, the output kernel's row block, walker tile) of the forward of x: (batch,
    seqlen, heads, head_dim); see FORWARD_CHUNK."""
    batch, _, heads, head_dim = x.shape
    chunk, tile = FORWARD_CHUNK, STATE_TILE
    if chunk is None:
        chunk = _chunk(head_dim)
        grid = _state_walk_grid(batch, heads, head_dim, d_state)[0]
        sms = multiprocessors(x)
        if sms is not None and x.dtype != torch.float32 and grid[0] * grid[1] * grid[2] < sms:
            chunk, tile = LONG_CHUNK, LONG_CHUNK_TILE
    # the output kernel's row blocks are tl.dot operands (16 rows at least) and cut the chunk exactly: both powers
    # of two then suffice
    if not isinstance(OUTPUT_ROWS, int) or OUTPUT_ROWS < 16 or OUTPUT_ROWS & (OUTPUT_ROWS - 1):
        raise ValueError(f"ssd_triton.OUTPUT_ROWS must be a power of two >= 16; got {OUTPUT_ROWS!r}.")
    if not isinstance(chunk, int) or chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"The SSD forward's chunk (ssd_triton.FORWARD_CHUNK or LONG_CHUNK) must be a power of two "
                         f">= 16; got {chunk!r}.")
    return chunk, min(OUTPUT_ROWS, chunk), tile


def _grads_heads_per_program(x: torch.Tensor, groups: int) -> int:
    """Heads per program of `_chunk_grads_kernel` for x: (batch, seqlen, heads, head_dim) with `groups` groups of B
    and C; see GRADS_HEADS_PER_PROGRAM."""
    batch, seqlen, heads, head_dim = x.shape
    per_group = heads // groups
    if GRADS_HEADS_PER_PROGRAM is not None:
        hpp = GRADS_HEADS_PER_PROGRAM
        if not isinstance(hpp, int) or hpp < 1 or per_group % hpp:
            # a program would sum heads of two groups into one group's partial
            raise ValueError(f"ssd_triton.GRADS_HEADS_PER_PROGRAM must be a positive divisor of the heads per group "
                             f"({heads} heads, {groups} groups: {per_group}); got {hpp!r}.")
        return hpp
    sms = multiprocessors(x)
    if sms is not None and x.dtype == torch.float32:
        # float32 tiles already spill at one head (sm_90, head_dim 64: 840 bytes of stack; 2 heads: 1,240)
        return 1
    programs = batch * heads * cdiv(seqlen, _chunk(head_dim))
    for hpp in GRADS_HEADS_PER_PROGRAM_CHOICES:
        if per_group % hpp == 0 and (sms is None or programs // hpp >= GRADS_MIN_PROGRAMS_PER_SM * sms):
            return hpp
    return 1


def _block(size: int, cap: int) -> int:
    return max(16, min(cap, next_power_of_2(size)))


def _grads_n_block(x: torch.Tensor) -> int:
    # float32 tiles with head_dim 128 need 204,800 bytes of shared memory at N_BLOCK 64: more than an A100 gives a
    # program (166,912); half the d_state block needs 122,880
    return N_BLOCK // 2 if x.dtype == torch.float32 and x.shape[-1] > 64 else N_BLOCK


def _full_precision(x: torch.Tensor) -> bool:
    # Triton's interpreter multiplies 16-bit tiles wrongly (Triton 3.9): there every product runs in float32
    return x.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _states_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if STATES_16BIT and x.dtype in (torch.bfloat16, torch.float16) else torch.float32


def _state_walk_grid(batch: int, heads: int, head_dim: int, d_state: int,
                     tile: tuple[int, int] | None = None) -> tuple[tuple[int, int, int], int, int]:
    """Grid and (head_dim, d_state) tile of the chunk walker (both directions), one program per tile (by default
    STATE_TILE)."""
    tile = tile or STATE_TILE
    block_p, block_n = _block(head_dim, tile[0]), _block(d_state, tile[1])
    return (batch * heads, cdiv(head_dim, block_p), cdiv(d_state, block_n)), block_p, block_n


@fast_launch
@triton.jit
def _dt_make_kernel(raw_ptr, bias_ptr, out_ptr, deriv_ptr, n, L, H, stride_b, stride_t, dt_lo, dt_hi,
                    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
                    STORE_DERIV: tl.constexpr, BLOCK: tl.constexpr):
    """Δ (float32, contiguous (batch, seqlen, heads)) from its stored values (read in place through their batch and
    token strides) by `_dt_transform`, and, with STORE_DERIV, dΔ/d(stored value) beside it."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    head = i % H
    t = (i // H) % L
    row = i // (H * L)
    raw = tl.load(raw_ptr + row * stride_b + t * stride_t + head, mask=mask, other=0.0)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + head, mask=mask, other=0.0).to(tl.float32)
    dt, deriv = _dt_transform(raw, bias, dt_lo, dt_hi, HAS_BIAS, SOFTPLUS, HAS_LIMIT)
    tl.store(out_ptr + i, dt, mask=mask)
    if STORE_DERIV:
        tl.store(deriv_ptr + i, deriv, mask=mask)


# Whether the chunk kernels make Δ from its stored values themselves (bias, softplus, clamp in `_chunk_decays`, per
# chunk and head wherever Δ is read) instead of reading Δ made once per token by `_dt_make_kernel`. Inside, the
# sequential walker's loop grew from 423 to 817 SASS instructions (sm_90) and the walk took 1.66x as long on an
# H100 (BENCHMARKS.md, eighth session); module-level so that tests and bench/gpu_kernels.py can run both.
MAKE_DT_IN_KERNELS = False


class _Delta(NamedTuple):
    """Δ as the kernels take it: the stored values (batch, seqlen, heads), any float dtype, read in place (heads
    packed within a token), and what makes Δ of them (`ssd_prepare_dt`'s steps, run by `_dt_make_kernel` or, with
    MAKE_DT_IN_KERNELS, in `_chunk_decays`): a bias (heads,) or None, softplus, a clamp to (lo, hi) or None."""
    raw: torch.Tensor
    bias: torch.Tensor | None
    softplus: bool
    limit: tuple[float, float] | None

    def pointers(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.raw, self.bias if self.bias is not None else self.raw

    def scalars(self) -> tuple:
        """Batch and token strides, then the limit's bounds."""
        return (*self.raw.stride()[:2], *(self.limit or (0.0, 0.0)))

    def flags(self) -> dict:
        return dict(HAS_BIAS=self.bias is not None, SOFTPLUS=self.softplus, HAS_LIMIT=self.limit is not None)

    def made(self, derivative: bool = False) -> tuple[_Delta, torch.Tensor | None]:
        """Δ for the chunk kernels: made once per token by `_dt_make_kernel` (float32, contiguous, nothing left to
        make), with dΔ/d(stored value) (float32, same shape) if `derivative`, else None; or, with
        MAKE_DT_IN_KERNELS or nothing to make, this Δ as it is (derivative None: the kernels apply it)."""
        if MAKE_DT_IN_KERNELS or (self.bias is None and not self.softplus and self.limit is None
                                  and self.raw.dtype == torch.float32):
            return self, None
        batch, seqlen, heads = self.raw.shape
        made = torch.empty(batch, seqlen, heads, device=self.raw.device, dtype=torch.float32)
        deriv = torch.empty_like(made) if derivative else None
        raw, bias = self.pointers()
        n, block = made.numel(), 1024
        with on_device_of(raw):
            _dt_make_kernel[(cdiv(n, block),)](raw, bias, made, deriv if deriv is not None else made, n,
                                               seqlen, heads, *self.scalars(), **self.flags(),
                                               STORE_DERIV=derivative, BLOCK=block, num_warps=4)
        return _Delta(made, None, False, None), deriv


def _rows(t: torch.Tensor) -> tuple[int, int]:
    """Batch and token strides of a (batch, seqlen, ...) tensor."""
    return t.stride(0), t.stride(1)


def _is_packed_within_token(t: torch.Tensor, inner_dims: int) -> bool:
    """Whether t's last `inner_dims` dimensions are packed, as the kernels index them: one run of elements per
    token, any batch and token strides (column views of the conv's or in_proj's output are)."""
    expected = 1
    for size, stride in zip(reversed(t.shape[-inner_dims:]), reversed(t.stride()[-inner_dims:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _packed_within_token(t: torch.Tensor, inner_dims: int) -> torch.Tensor:
    """t itself if `_is_packed_within_token` (read in place), else a contiguous copy (the kernels read the copy)."""
    return t if _is_packed_within_token(t, inner_dims) else t.contiguous()


def _walk_outputs(v: torch.Tensor, n_chunks: int, d_state: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A walk's outputs for v: (batch, seqlen, heads, head_dim): the state at every chunk (batch, n_chunks, heads,
    head_dim, d_state) in `_states_dtype(v)`, and the last one (batch, heads, head_dim, d_state) in float32."""
    batch, _, heads, head_dim = v.shape
    walk = torch.empty(batch, n_chunks, heads, head_dim, d_state, device=v.device, dtype=_states_dtype(v))
    last = torch.empty(batch, heads, head_dim, d_state, device=v.device, dtype=torch.float32)
    return walk, last


def _walk_chunks(v, delta, A, w, seq_idx, init, block_q, reverse, tile=None, a_log=False):
    """`_chunk_walk_kernel` over every (row, head): forward (v = x, w = B, init = h0) the states entering every chunk
    (batch, chunks, heads, head_dim, d_state) and the final state (batch, heads, head_dim, d_state); reverse (v = dy,
    w = C, init = dfinal) the gradients reaching every chunk's end and the initial state's gradient, same shapes.
    v and w are read in place (inner dimensions packed: `_packed_within_token`), Δ as `delta` says, A as is or, with
    `a_log`, as its stored log."""
    batch, seqlen, heads, head_dim = v.shape
    groups, d_state = w.shape[-2:]
    n_chunks = cdiv(seqlen, block_q)
    walk, last = _walk_outputs(v, n_chunks, d_state)
    grid, block_p, block_n = _state_walk_grid(batch, heads, head_dim, d_state, tile)
    dt, bias = delta.pointers()
    _chunk_walk_kernel[grid](
        v, dt, bias, A, w, seq_idx if seq_idx is not None else dt, init if init is not None else last, walk, last,
        seqlen, heads, head_dim, groups, d_state, n_chunks, *_rows(v), *_rows(w), *delta.scalars(),
        HAS_INIT=init is not None, HAS_SEQ=seq_idx is not None, **delta.flags(), REVERSE=reverse,
        IEEE=_full_precision(v), PREFETCH=WALK_PREFETCH, BLOCK_Q=block_q, BLOCK_P=block_p, BLOCK_N=block_n,
        num_warps=WARPS["state_grads" if reverse else "states"], A_LOG=a_log,
    )
    return walk, last


def _walks_share_a_launch(x: torch.Tensor, d_state: int) -> bool:
    """Whether the backward of x: (batch, seqlen, heads, head_dim) runs its two walks in one launch; see
    WALK_PAIR_BELOW_PROGRAMS_PER_SM. The shared launch has one warp count: not where WARPS gives the walks two."""
    if WARPS["states"] != WARPS["state_grads"]:
        return False
    batch, _, heads, head_dim = x.shape
    grid = _state_walk_grid(batch, heads, head_dim, d_state)[0]
    sms = multiprocessors(x)
    return sms is None or grid[0] * grid[1] * grid[2] < WALK_PAIR_BELOW_PROGRAMS_PER_SM * sms


def _walk_both(x, dy, delta, A, B, C, seq_idx, h0, dfinal, block_q, a_log):
    """The backward's two walks in one launch (`_chunk_walk_pair_kernel`): what `_walk_chunks` gives forward (x, B,
    h0) and in reverse (dy, C, dfinal), with the default walker tile: (states, dstates, dh0)."""
    batch, seqlen, heads, head_dim = x.shape
    groups, d_state = B.shape[-2:]
    n_chunks = cdiv(seqlen, block_q)
    states, final = _walk_outputs(x, n_chunks, d_state)
    dstates, dh0 = _walk_outputs(dy, n_chunks, d_state)
    (programs, *tiles), block_p, block_n = _state_walk_grid(batch, heads, head_dim, d_state)
    dt, bias = delta.pointers()
    _chunk_walk_pair_kernel[(2 * programs, *tiles)](
        x, dt, bias, A, B, seq_idx if seq_idx is not None else dt, h0 if h0 is not None else final, states, final,
        dy, C, dfinal if dfinal is not None else dh0, dstates, dh0,
        seqlen, heads, head_dim, groups, d_state, n_chunks, *_rows(x), *_rows(B), *_rows(dy), *_rows(C),
        *delta.scalars(),
        HAS_H0=h0 is not None, HAS_DFINAL=dfinal is not None, HAS_SEQ=seq_idx is not None, **delta.flags(),
        IEEE=_full_precision(x) or _full_precision(dy),  # dy has x's dtype in both callers
        PREFETCH=WALK_PREFETCH, BLOCK_Q=block_q, BLOCK_P=block_p,
        BLOCK_N=block_n, num_warps=WARPS["state_grads"], A_LOG=a_log,
    )
    return states, dstates, dh0


def _forward(x, delta, A, B, C, D, h0, seq, plan, a_log=False):
    """The forward kernels on prepared inputs (`_SSDScan.forward` says which; A as its stored log with `a_log`):
    (y contiguous in x's dtype, final state float32)."""
    batch, seqlen, heads, head_dim = x.shape
    groups, d_state = B.shape[-2:]
    forward_q, rows, walk_tile = plan
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)  # contiguous, whatever x's strides
    delta, _ = delta.made()
    with on_device_of(x):
        states, final = _walk_chunks(x, delta, A, B, seq, h0, forward_q, reverse=False, tile=walk_tile, a_log=a_log)
        block_p = _block(head_dim, 64)
        # row blocks up to the one holding the last token: a chunk's blocks are consecutive, so program i of
        # axis 1 starts at token i * rows (none wholly past the end, where the last chunk is short)
        grid = (batch * heads, cdiv(seqlen, rows), cdiv(head_dim, block_p))
        dt_ptr, bias_ptr = delta.pointers()
        _chunk_output_kernel[grid](
            x, dt_ptr, bias_ptr, A, B, C, D if D is not None else A, seq if seq is not None else A, states, y,
            seqlen, heads, head_dim, groups, d_state, states.shape[1], *_rows(x), *_rows(B), *_rows(C),
            *delta.scalars(),
            HAS_D=D is not None, HAS_SEQ=seq is not None, **delta.flags(), IEEE=_full_precision(x),
            BLOCK_Q=forward_q, BLOCK_M=rows, BLOCK_P=block_p, BLOCK_N=_block(d_state, N_BLOCK),
            num_warps=WARPS["output"], A_LOG=a_log,
        )
    return y, final


def _backward_kernels(x, delta, A, B, C, D, h0, seq, dy, dfinal, hpp, dx, ddt, a_log, bias_parts):
    """The backward's launches on `_forward`'s inputs; dy contiguous (batch, seqlen, heads, head_dim), dfinal float32
    contiguous or None. dx, ddt: where to write the gradients of x and of Δ as stored (their shapes, any dtype,
    inner dimensions packed, any batch and token strides). Returns float32 partials: (dA_parts (batch, heads,
    chunks), dD_parts (same) or None, the Δ bias's parts (same) with `bias_parts` else None, dB_parts, dC_parts
    (batch, seqlen, heads / hpp, d_state)), and dh0 (float32); with `a_log`, A is its stored log and dA's parts
    are of that log's gradient."""
    batch, seqlen, heads, head_dim = x.shape
    groups, d_state = B.shape[-2:]
    block_q = _chunk(head_dim)
    delta, deriv = delta.made(derivative=True)
    with on_device_of(x):
        if _walks_share_a_launch(x, d_state):
            states, dstates, dh0 = _walk_both(x, dy, delta, A, B, C, seq, h0, dfinal, block_q, a_log)
        else:
            states, _ = _walk_chunks(x, delta, A, B, seq, h0, block_q, reverse=False, a_log=a_log)
            dstates, dh0 = _walk_chunks(dy, delta, A, C, seq, dfinal, block_q, reverse=True, a_log=a_log)
        n_chunks = states.shape[1]
        splits = heads // hpp
        dB_parts = torch.empty(batch, seqlen, splits, d_state, device=x.device, dtype=torch.float32)
        dC_parts = torch.empty_like(dB_parts)
        dA_parts = torch.empty(batch, heads, n_chunks, device=x.device, dtype=torch.float32)
        dD_parts = torch.empty_like(dA_parts) if D is not None else None
        d_bias_parts = torch.empty_like(dA_parts) if bias_parts else None
        dt_ptr, bias_ptr = delta.pointers()
        _chunk_grads_kernel[(batch * splits, n_chunks)](
            x, dt_ptr, bias_ptr, A, B, C, D if D is not None else A, seq if seq is not None else A, states,
            dstates, dy, dx, ddt, dB_parts, dC_parts, dA_parts, dD_parts if D is not None else dA_parts,
            deriv if deriv is not None else dA_parts, d_bias_parts if bias_parts else dA_parts,
            seqlen, heads, head_dim, groups, d_state, n_chunks, *_rows(x), *_rows(B), *_rows(C),
            *delta.scalars(), *_rows(dx), *_rows(ddt),
            HAS_D=D is not None, HAS_SEQ=seq is not None, **delta.flags(), IEEE=_full_precision(x),
            HEADS_PER_PROGRAM=hpp, BLOCK_Q=block_q, BLOCK_P=_block(head_dim, 128),
            BLOCK_N=_block(d_state, _grads_n_block(x)), num_warps=WARPS["grads"], A_LOG=a_log,
            HAS_DERIV=deriv is not None, BIAS_PARTS=bias_parts,
        )
    return dA_parts, dD_parts, d_bias_parts, dB_parts, dC_parts, dh0


def _backward(x, delta, A, B, C, D, h0, seq, dy, dfinal, hpp):
    """`_backward_kernels` with the partials summed by torch (the standalone op's backward): (dx contiguous, the
    gradient of Δ as stored (float32, contiguous), dA, dB and dC summed over the heads of each group (float32), dD
    (float32) or None, dh0 (float32))."""
    batch, seqlen, heads, _ = x.shape
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    ddt = torch.empty(batch, seqlen, heads, device=x.device, dtype=torch.float32)
    dA_parts, dD_parts, _, dB_parts, dC_parts, dh0 = _backward_kernels(x, delta, A, B, C, D, h0, seq, dy, dfinal,
                                                                      hpp, dx, ddt, False, False)
    groups = B.shape[-2]
    dD = dD_parts.sum((0, 2)) if D is not None else None
    return dx, ddt, dA_parts.sum((0, 2)), _sum_group_parts(dB_parts, groups), _sum_group_parts(dC_parts, groups), \
        dD, dh0


def _prepared(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, initial_state, seq_idx, a_log=False):
    """The inputs as the kernels take them: x, B, C and Δ where they are (column views of the conv's and in_proj's
    outputs in the mixer) unless a token's (heads, head_dim), (groups, d_state) or heads are not one packed run
    (then a copy), Δ with its bias, softplus and limit (`_Delta`), A, h0 float32 (A's stored log, with `a_log`, in
    its own dtype: the kernels make A), D and seq_idx contiguous."""
    x, B, C = _packed_within_token(x, 2), _packed_within_token(B, 2), _packed_within_token(C, 2)
    delta = _Delta(_packed_within_token(dt, 1), dt_bias.contiguous() if dt_bias is not None else None,
                   dt_softplus, dt_limit)
    A = A.contiguous() if a_log else A.float().contiguous()
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    D = D.contiguous() if D is not None else None  # the kernels index it as D_ptr + head
    seq = seq_idx.contiguous() if seq_idx is not None else None
    return x, delta, A, B, C, D, h0, seq


class _SSDScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, dt_bias, initial_state, seq_idx, dt_softplus, dt_limit, plan,
                grads_heads_per_program):
        x, delta, A, B, C, D, h0, seq = _prepared(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit,
                                                   initial_state, seq_idx)
        y, final = _forward(x, delta, A, B, C, D, h0, seq, plan)
        ctx.save_for_backward(x, delta.raw, delta.bias, A, B, C, D, h0, seq)
        ctx.dt_softplus, ctx.dt_limit = dt_softplus, dt_limit
        ctx.grads_heads_per_program = grads_heads_per_program
        ctx.initial_state_dtype = initial_state.dtype if initial_state is not None else None
        # an output whose gradient is not asked for (often the final state) stays None in the backward, not zeros
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, dt_bias, A, B, C, D, h0, seq = ctx.saved_tensors
        if dy is None and dfinal is None:
            return (None,) * 13
        # dy and the gradient buffers are contiguous: the kernels index them so
        dy = dy.contiguous() if dy is not None else torch.zeros(x.shape, device=x.device, dtype=x.dtype)
        dfinal = dfinal.float().contiguous() if dfinal is not None else None
        dx, ddt, dA, dB, dC, dD, dh0 = _backward(x, _Delta(dt, dt_bias, ctx.dt_softplus, ctx.dt_limit), A, B, C, D,
                                                  h0, seq, dy, dfinal, ctx.grads_heads_per_program)
        # the bias enters every token's Δ: its gradient sums the stored Δ's, in float32
        d_bias = ddt.sum((0, 1)).to(dt_bias.dtype) if dt_bias is not None and ctx.needs_input_grad[6] else None
        dh0_out = dh0.to(ctx.initial_state_dtype) if ctx.initial_state_dtype is not None else None
        return (dx, ddt.to(dt.dtype), dA, dB.to(B.dtype), dC.to(C.dtype), dD.to(D.dtype) if dD is not None else None,
                d_bias, dh0_out, None, None, None, None, None)


def ssd_forward(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                D: torch.Tensor | None, dt_bias: torch.Tensor | None, dt_softplus: bool,
                dt_limit: tuple[float, float] | None, seq_idx: torch.Tensor | None, A_is_log: bool = False,
                initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD forward outside autograd (for an op that runs its own backward, see `conv_ssd_norm_triton`). x:
    (batch, seqlen, heads, head_dim), B, C: (batch, seqlen, groups, d_state), dt: (batch, seqlen, heads) as stored,
    each with packed inner dimensions (any batch and token strides: read in place); seq_idx: kernel ids
    (`packing.kernel_segment_ids`) or None; A: (heads,), or with `A_is_log` its stored log (A = -exp(A_log), made
    in the kernels); initial_state: (batch, heads, head_dim, d_state) float32 contiguous, or None for zeros.
    Returns (y (batch, seqlen, heads, head_dim) contiguous in x's dtype, the final state (batch, heads, head_dim,
    d_state) float32)."""
    plan = _forward_plan(x, B.shape[-1])
    check_ssd_shapes(x, B, C, plan)
    x, delta, A, B, C, D, h0, seq = _prepared(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit_bounds(dt_limit),
                                              initial_state, seq_idx, A_is_log)
    return _forward(x, delta, A, B, C, D, h0, seq, plan, A_is_log)


def ssd_backward(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 D: torch.Tensor | None, dt_bias: torch.Tensor | None, dt_softplus: bool,
                 dt_limit: tuple[float, float] | None, seq_idx: torch.Tensor | None, dy: torch.Tensor,
                 dx: torch.Tensor, dB: torch.Tensor, dC: torch.Tensor, ddt: torch.Tensor, A_is_log: bool = False,
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The backward of `ssd_forward` (same inputs, as given to it) for dy (y's shape): writes the gradients of x, B,
    C and Δ as stored into dx, dB, dC, ddt (the inputs' shapes, packed inner dimensions, any batch and token
    strides: column slices of one gradient tensor). Returns (dA in A's dtype (with `A_is_log`, the gradient of A's
    stored log), dD in D's dtype or None, the Δ bias's gradient in its dtype or None). Launches and allocations
    only (the partial sums end in `sums_triton`'s kernels): `plans.Planned` can replay it."""
    A_dtype = A.dtype
    x, delta, A, B, C, D, _, seq = _prepared(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit_bounds(dt_limit),
                                             None, seq_idx, A_is_log)
    for name, grad, like in (("dx", dx, x), ("dB", dB, B), ("dC", dC, C), ("ddt", ddt, dt)):
        if grad.shape != like.shape or not _is_packed_within_token(grad, grad.dim() - 2):
            raise ValueError(f"{name} must have shape {tuple(like.shape)} with packed inner dimensions; got shape "
                             f"{tuple(grad.shape)}, strides {grad.stride()}")
    has_bias = dt_bias is not None
    dA_parts, dD_parts, d_bias_parts, dB_parts, dC_parts, _ = _backward_kernels(
        x, delta, A, B, C, D, None, seq, dy.contiguous(), None, _grads_heads_per_program(x, B.shape[-2]), dx, ddt,
        A_is_log, has_bias)
    sum_splits_into([(dB_parts, dB), (dC_parts, dC)])
    batch, heads, n_chunks = dA_parts.shape
    pairs = [(dA_parts, heads, A_dtype)]
    if D is not None:
        pairs.append((dD_parts, heads, D.dtype))
    if has_bias:
        pairs.append((d_bias_parts, heads, dt_bias.dtype))
    sums = sum_parts(pairs, batch, n_chunks, kept_stride=n_chunks)
    return sums[0], sums[1] if D is not None else None, sums[-1] if has_bias else None


def _sum_group_parts(parts: torch.Tensor, groups: int) -> torch.Tensor:
    """(batch, seqlen, groups x splits, d_state) partial sums -> (batch, seqlen, groups, d_state)."""
    parts = parts.unflatten(2, (groups, parts.shape[2] // groups))
    return parts.squeeze(3) if parts.shape[3] == 1 else parts.sum(3)


def check_ssd_shapes(x: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                     plan: tuple[int, int, tuple[int, int]] | None) -> None:
    """Refuse, by name, what the kernels cannot run: groups of B and C that do not divide the heads (they would read
    groups that do not exist) and, for the forward `plan` the kernels will run (`_forward_plan`; None where they do
    not run), more chunks or row blocks than a grid axis holds."""
    heads, head_dim, groups = x.shape[2], x.shape[3], B.shape[-2]
    if heads % groups or C.shape[-2] != groups:
        raise ValueError(f"B and C must have a number of groups that divides the {heads} heads; got B "
                         f"{tuple(B.shape)}, C {tuple(C.shape)}.")
    if plan is None:
        return
    # the chunk kernels run one program per chunk or row block on grid axis 1
    check_grid_axis(max(cdiv(x.shape[1], _chunk(head_dim)), cdiv(x.shape[1], plan[1])),
                    f"An SSD scan of {x.shape[1]} tokens")


def ssd_scan_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int | None = None,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    recompute_in_backward: bool = True,
    seq_idx: torch.Tensor | None = None,
):
    """SSD scan with the Triton kernels: same arguments and results as `ssd_scan_chunked`. The kernels use their
    own chunks (CHUNK and FORWARD_CHUNK tokens); the result does not depend on the chunk, so `chunk_size` is only
    used where the PyTorch form runs (d_state > 256 or head_dim > 128). The backward always recomputes the chunk
    states (`recompute_in_backward` is accepted for the common signature). x, B, C and dt are read in place when
    each token's (heads, head_dim), (groups, d_state) and heads are packed (column views of a wider tensor are);
    Δ's bias, softplus and limit are applied by `_dt_make_kernel` (see MAKE_DT_IN_KERNELS)."""
    head_dim, groups, d_state = x.shape[3], B.shape[-2], B.shape[-1]
    supported = supports(d_state, head_dim)
    plan = _forward_plan(x, d_state) if supported else None
    check_ssd_shapes(x, B, C, plan)
    grads_heads_per_program = _grads_heads_per_program(x, groups) if supported else None
    if seq_idx is not None:  # full rows of int32 ids that change exactly where a sequence starts
        seq_idx = kernel_segment_ids(seq_idx, x.shape[0], x.shape[1], x.device)
    if x.shape[1] == 0 or not supported:  # the PyTorch form, Δ through ssd_prepare_dt
        return ssd_scan_chunked(x, dt, A, B, C, chunk_size or CHUNK, D, dt_bias, dt_softplus, dt_limit,
                                initial_state=initial_state, return_final_state=return_final_state, seq_idx=seq_idx)
    y, final = apply_function(_SSDScan, x, dt, A, B, C, D, dt_bias, initial_state, seq_idx, dt_softplus,
                              dt_limit_bounds(dt_limit), plan, grads_heads_per_program)
    return (y, final) if return_final_state else y
