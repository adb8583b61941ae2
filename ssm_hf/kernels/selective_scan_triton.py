"""Selective scan (Mamba) as Triton kernels: one pass over the sequence forward, one backward, states recomputed.

Same function and signature as `selective_scan_torch.selective_scan_chunked` (time-major tensors). Forward: each
program owns one batch row and BLOCK_D channels, keeps their (d_state, BLOCK_D) state in registers and steps
through the tokens one at a time (UNROLL tokens per loop trip, the next trip's inputs loaded ahead); it stores
the state entering every TILE_CONFIG['block_t']-token tile, (batch, n_tiles, d_state, d_inner), only when a
backward will need it. Backward: the same program shape walks the tiles in reverse; per tile it recomputes the
states after each token from the stored one into a small per-program scratch, then visits the tokens backwards
with the adjoint state in registers, so no (batch, seqlen, d_inner, d_state) tensor is ever stored. With
`seq_idx` (packed sequences), a token that starts a new sequence gets a decay of 0, so no state crosses the
boundary in either direction.
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from . import sums_triton
from .launch import (
    MAX_GRID_YZ,
    apply_function,
    cdiv,
    fast_launch,
    multiprocessors,
    next_power_of_2,
    on_device_of,
)
from .packing import kernel_segment_ids
from .plans import Planned
from .sums_triton import sum_middle, sum_parts

_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _softplus(x):
    # Gives 0 for x below about -17 where softplus is exp(x) < 4e-8 (a negligible Δ); the exact form,
    # `triton_math.softplus`, made this scan 3.5% slower forward and 14% forward+backward (H100, B8 T4096)
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _delta(raw, bias, SOFTPLUS: tl.constexpr):
    """Δ from its stored value: plus the bias, through softplus when asked; float32."""
    dt = raw.to(tl.float32) + bias
    if SOFTPLUS:
        dt = _softplus(dt)
    return dt


@triton.jit
def _starts_sequence(seq_ptr, row, inside):
    """Whether token `row` (a scalar) starts a new sequence: its seq_idx differs from the previous token's; never at
    row 0, nor where `inside` is False."""
    inside = inside & (row >= 1)
    return inside & (tl.load(seq_ptr + row, mask=inside, other=0) != tl.load(seq_ptr + row - 1, mask=inside, other=0))


@triton.jit
def _step_inputs(x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, seq_ptr, t, L, Dm, stride_z, d_in, n_offs, HAS_Z: tl.constexpr,
                 HAS_SEQ: tl.constexpr, BLOCK_N: tl.constexpr):
    """Token t's inputs, as stored: x, Δ before bias/softplus, z (rows stride_z apart), B_t, C_t, starts-a-sequence.
    Past the end they are the last token's (the caller makes such steps identities): clamped rows and channels
    (`d_in`) and B, C padded to BLOCK_N states let every load go unmasked, with no registers to zero first."""
    valid = tl.cast(t, tl.int64) < L
    row = tl.minimum(tl.cast(t, tl.int64), L - 1)
    x = tl.load(x_ptr + row * Dm + d_in)
    dt = tl.load(dt_ptr + row * Dm + d_in)
    z = x
    if HAS_Z:
        z = tl.load(z_ptr + row * stride_z + d_in)
    Bt = tl.load(B_ptr + row * BLOCK_N + n_offs)
    Ct = tl.load(C_ptr + row * BLOCK_N + n_offs)
    starts = row < 0
    if HAS_SEQ:
        starts = _starts_sequence(seq_ptr, row, valid)
    return x, dt, z, Bt, Ct, starts


@triton.jit
def _block_inputs(x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, seq_ptr, t0, L, Dm, stride_z, d_in, n_offs,
                  HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr):
    """The inputs of tokens t0 .. t0 + UNROLL - 1: a tuple of `_step_inputs` tuples."""
    steps = ()
    for i in tl.static_range(UNROLL):
        steps = steps + (_step_inputs(x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, seq_ptr, t0 + i, L, Dm, stride_z, d_in,
                                      n_offs, HAS_Z, HAS_SEQ, BLOCK_N),)
    return steps


@triton.jit
def _load_state(ptr, stride_n, stride_d, n_offs, d_offs, d_mask, N, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """A (BLOCK_N, BLOCK_D) float32 tile, element (n, d) at ptr + n * stride_n + d * stride_d (zeros outside),
    loaded one state row at a time. A single 2-D load would be vectorised along channels, and its layout (a few
    channels and states per thread) would then spread through the kernel; assembled from rows, the tile keeps the
    default layout of the state: one channel per lane, all of its states in that lane's registers, so that the
    sum over the state for y and the per-channel values need no exchange between lanes."""
    tile = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for n in tl.static_range(BLOCK_N):
        inside = d_mask & ((tl.zeros_like(d_offs) + n) < N)  # a block mask: the interpreter takes no scalar one
        row = tl.load(ptr + n * stride_n + d_offs * stride_d, mask=inside, other=0.0).to(tl.float32)
        tile = tl.where(n_offs[:, None] == n, row[None, :], tile)
    return tile


@triton.jit
def _channels(A_ptr, bias_ptr, Dm, N, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
              ROWWISE: tl.constexpr):
    """A program's channel block (program axis 1) with its masks, the channels to read (`d_in`: past d_inner, the
    last one again, so that per-token loads need no mask), A as (BLOCK_N, BLOCK_D) (A comes transposed,
    (d_state, d_inner); ROWWISE: loaded by `_load_state`, so that the kernel keeps whole states per lane) and the
    Δ bias (zeros without one)."""
    d_offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n_offs = tl.arange(0, BLOCK_N)
    d_mask, n_mask = d_offs < Dm, n_offs < N
    nd_mask = n_mask[:, None] & d_mask[None, :]
    d_in = tl.minimum(d_offs, Dm - 1)
    if ROWWISE:
        A = _load_state(A_ptr, Dm, 1, n_offs, d_offs, d_mask, N, BLOCK_N, BLOCK_D)
    else:
        A = tl.load(A_ptr + n_offs[:, None] * Dm + d_offs[None, :], mask=nd_mask, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d_offs, mask=d_mask, other=0.0).to(tl.float32)
    return d_offs, d_in, n_offs, d_mask, n_mask, nd_mask, A, bias


@fast_launch
@triton.jit
def _fwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, seq_ptr, y_ptr, hT_ptr, tile_states_ptr,
    P_ptr, S_ptr, L, Dm, N, n_tiles, chunk_len, n_chunks, stride_zb, stride_zl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, STORE_TILES: tl.constexpr, TILE_T: tl.constexpr,
    UNROLL: tl.constexpr, PREFETCH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    LOCAL: tl.constexpr,
):
    # One program owns one batch row and BLOCK_D channels with their whole (d_state, BLOCK_D) state in registers,
    # and steps through the sequence one token at a time: the cheapest form of the recurrence (one exp2 and two
    # FMAs per state element and token, no scan tree, no reductions across tokens). Tokens go UNROLL at a time
    # so that the compiler can overlap their independent work (loads, Δ, decays) around the one dependent FMA
    # chain, and the next block's loads are issued before this block's arithmetic (PREFETCH). The state is laid out
    # (d_state, channels), channels fastest, as x and y are in memory: lanes then run over channels and the sum over
    # the state for y stays mostly inside each thread. A comes transposed, (d_state, d_inner); `tile_states` too.
    # Long sequences are cut into n_chunks chunks of chunk_len tokens walked in parallel (program axis 2): a first
    # launch with LOCAL walks each chunk but the last from a zero state and keeps only its end state S and the
    # product P of its decays, (batch, n_chunks, d_state, d_inner); the second gives each chunk its true starting
    # state, h0 carried through the earlier chunks' (P, S), and walks it in full. z may be a view with rows
    # (stride_zb, stride_zl) apart, channels contiguous: the half of in_proj's output that a Mamba block passes.
    b = tl.program_id(0).to(tl.int64)  # offsets past 2**31 elements stay exact
    chunk = tl.program_id(2)
    t_begin = chunk * chunk_len
    t_end = tl.minimum(t_begin + chunk_len, L)
    d_offs, d_in, n_offs, d_mask, n_mask, nd_mask, A, bias = _channels(A_ptr, bias_ptr, Dm, N, HAS_BIAS, BLOCK_D,
                                                                       BLOCK_N, LOCAL)
    # whole states per lane only for the chunk pass: H100, ncu, B8 D1536 T4096 bf16, 369 us vs 401 us; the full
    # pass, which also holds C_t and y, took 900 us vs 731 us with them (every lane's copies of B_t and C_t take the
    # registers that let loads run ahead)
    A = A * _LOG2E
    Dv = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d_offs, mask=d_mask, other=0.0).to(tl.float32)
    state_offs = d_offs[None, :] * N + n_offs[:, None]  # (batch, d_inner, d_state) of h0 and hT
    tile_offs = n_offs[:, None] * Dm + d_offs[None, :]
    h = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    if HAS_H0 and not LOCAL:
        h = tl.load(h0_ptr + b * Dm * N + state_offs, mask=nd_mask, other=0.0).to(tl.float32)
    chunk_states = (b * n_chunks + chunk) * N * Dm + tile_offs
    if not LOCAL:
        for earlier in range(0, chunk):
            base = (b * n_chunks + earlier) * N * Dm
            h = (tl.load(P_ptr + base + tile_offs, mask=nd_mask, other=0.0) * h
                 + tl.load(S_ptr + base + tile_offs, mask=nd_mask, other=0.0))
    # LOCAL: the chunk's decays multiply to exp2(A Σ Δ), or 0 once a sequence starts inside it
    dt_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    restarted = t_begin < 0
    x_ptr += b * L * Dm
    dt_ptr += b * L * Dm
    y_ptr += b * L * Dm
    z_ptr += b * stride_zb
    B_ptr += b * L * BLOCK_N
    C_ptr += b * L * BLOCK_N
    seq_ptr += b * L
    cur = _block_inputs(x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, seq_ptr, t_begin, L, Dm, stride_zl, d_in, n_offs, HAS_Z,
                        HAS_SEQ, BLOCK_N, UNROLL)
    for t0 in range(t_begin, t_end, UNROLL):
        if PREFETCH:
            nxt = _block_inputs(x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, seq_ptr, t0 + UNROLL, L, Dm, stride_zl, d_in,
                                n_offs, HAS_Z, HAS_SEQ, BLOCK_N, UNROLL)
        else:
            cur = _block_inputs(x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, seq_ptr, t0, L, Dm, stride_zl, d_in, n_offs, HAS_Z,
                                HAS_SEQ, BLOCK_N, UNROLL)
        if STORE_TILES:  # the state entering every TILE_T-token tile, for the backward's recomputation
            if t0 % TILE_T == 0:
                tl.store(tile_states_ptr + (b * n_tiles + t0 // TILE_T) * Dm * N + tile_offs, h, mask=nd_mask)
        ys = ()
        for i in tl.static_range(UNROLL):
            x, dt_raw, z, Bt, Ct, starts = cur[i]
            x = x.to(tl.float32)
            # steps past the end are identities: no decay, no input
            dt = tl.where(t0 + i < t_end, _delta(dt_raw, bias, SOFTPLUS), 0.0)
            decay = tl.exp2(dt[None, :] * A)
            if HAS_SEQ:  # a new sequence: nothing of the state before it survives
                decay = tl.where(starts, 0.0, decay)
            h = decay * h + Bt.to(tl.float32)[:, None] * (dt * x)[None, :]
            if LOCAL:
                dt_sum += dt
                restarted = restarted | starts
            y = tl.sum(h * Ct.to(tl.float32)[:, None], axis=0)
            if HAS_D:
                y += x * Dv
            if HAS_Z:
                zf = z.to(tl.float32)
                y = y * zf * tl.sigmoid(zf)
            ys = ys + (y,)
        if not LOCAL:
            for i in tl.static_range(UNROLL):
                row = tl.cast(t0 + i, tl.int64)
                tl.store(y_ptr + row * Dm + d_offs, ys[i].to(y_ptr.dtype.element_ty),
                         mask=d_mask & ((row + tl.zeros_like(d_offs)) < t_end))
        if PREFETCH:
            cur = nxt
    if LOCAL:
        decays = tl.where(restarted, 0.0, tl.exp2(dt_sum[None, :] * A))
        tl.store(P_ptr + chunk_states, decays, mask=nd_mask)
        tl.store(S_ptr + chunk_states, h, mask=nd_mask)
    elif chunk == n_chunks - 1:
        tl.store(hT_ptr + b * Dm * N + state_offs, h, mask=nd_mask)


@triton.jit
def _token_inputs(x_ptr, dt_ptr, B_ptr, C_ptr, seq_ptr, bias, t, L, Dm, d_in, n_offs, HAS_SEQ: tl.constexpr,
                  SOFTPLUS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Token t (clamped to the sequence) for the token-by-token backward: x (D,), Δ after bias/softplus (zero past
    the end: an identity step), Δ before softplus (bias added), B_t and C_t (N,), whether t starts a sequence,
    whether t < L, and the clamped row read. Unmasked loads as in `_step_inputs`."""
    valid = tl.cast(t, tl.int64) < L
    row = tl.maximum(tl.minimum(tl.cast(t, tl.int64), L - 1), 0)  # loads ahead may ask for t = -1 or t >= L
    x = tl.load(x_ptr + row * Dm + d_in).to(tl.float32)
    raw = tl.load(dt_ptr + row * Dm + d_in).to(tl.float32) + bias
    dt = tl.where(valid, _delta(raw, 0.0, SOFTPLUS), 0.0)
    Bt = tl.load(B_ptr + row * BLOCK_N + n_offs).to(tl.float32)
    Ct = tl.load(C_ptr + row * BLOCK_N + n_offs).to(tl.float32)
    starts = row < 0
    if HAS_SEQ:
        starts = _starts_sequence(seq_ptr, row, valid)
    return x, dt, raw, Bt, Ct, starts, valid, row


@triton.jit
def _reverse_inputs(x_ptr, dt_ptr, B_ptr, C_ptr, seq_ptr, z_ptr, dy_ptr, scratch_ptr, h_first, bias, start, i, L,
                    Dm, stride_z, d_in, n_offs, d_mask, scratch_offs, HAS_SEQ: tl.constexpr, SOFTPLUS: tl.constexpr,
                    HAS_Z: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """`_token_inputs` of token start + i, then its dy (zero past the end and past d_inner, so that channels read
    twice add nothing to dB and dC), z (rows stride_z apart) and the state before it (the tile's first state for
    i = 0, else the recomputed one in the scratch)."""
    x, dt, raw, Bt, Ct, starts, valid, row = _token_inputs(x_ptr, dt_ptr, B_ptr, C_ptr, seq_ptr, bias, start + i, L,
                                                           Dm, d_in, n_offs, HAS_SEQ, SOFTPLUS, BLOCK_N)
    g = tl.where(d_mask, tl.where(valid, tl.load(dy_ptr + row * Dm + d_in).to(tl.float32), 0.0), 0.0)
    z = g
    if HAS_Z:
        z = tl.load(z_ptr + row * stride_z + d_in).to(tl.float32)
    h_prev = tl.load(scratch_ptr + tl.maximum(i - 1, 0) * BLOCK_N * BLOCK_D + scratch_offs)
    h_prev = tl.where(i == 0, h_first, h_prev)
    return x, dt, raw, Bt, Ct, starts, valid, row, g, z, h_prev


@fast_launch
@triton.jit
def _bwd_local_kernel(
    dt_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, seq_ptr, dy_ptr, P_ptr, U_ptr, L, Dm, N, chunk_len, n_chunks, stride_zb,
    stride_zl, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # For the backward in chunks: each chunk but the first runs the adjoint recurrence over its tokens backwards
    # from zero (it needs no forward state: g_t = dy_t, gated by z) and keeps what leaves its first token,
    # U = exp(Δ A) u, and the product P of its decays, (batch, n_chunks, d_state, d_inner).
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(2) + 1
    d_offs, d_in, n_offs, d_mask, n_mask, nd_mask, A, bias = _channels(A_ptr, bias_ptr, Dm, N, HAS_BIAS, BLOCK_D,
                                                                       BLOCK_N, True)
    A2 = A * _LOG2E
    t_begin = chunk * chunk_len
    t_end = tl.minimum(t_begin + chunk_len, L)
    dt_ptr += b * L * Dm
    z_ptr += b * stride_zb
    dy_ptr += b * L * Dm
    C_ptr += b * L * BLOCK_N
    seq_ptr += b * L
    carry = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    # the chunk's decays multiply to exp2(A Σ Δ), or 0 where a sequence starts inside it
    dt_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    restarted = t_begin < 0
    cur = _adjoint_inputs(dt_ptr, C_ptr, z_ptr, dy_ptr, seq_ptr, bias, t_end - 1, L, Dm, stride_zl, d_in, n_offs,
                          HAS_Z, HAS_SEQ, SOFTPLUS, BLOCK_N)
    for j in range(0, t_end - t_begin):
        nxt = _adjoint_inputs(dt_ptr, C_ptr, z_ptr, dy_ptr, seq_ptr, bias, t_end - 2 - j, L, Dm, stride_zl, d_in,
                              n_offs, HAS_Z, HAS_SEQ, SOFTPLUS, BLOCK_N)
        dt, Ct, g, starts = cur
        decay = tl.exp2(dt[None, :] * A2)
        if HAS_SEQ:
            decay = tl.where(starts, 0.0, decay)
        carry = decay * (carry + Ct[:, None] * g[None, :])
        dt_sum += dt
        restarted = restarted | starts
        cur = nxt
    decays = tl.where(restarted, 0.0, tl.exp2(dt_sum[None, :] * A2))
    chunk_states = (b * n_chunks + chunk) * N * Dm + n_offs[:, None] * Dm + d_offs[None, :]
    tl.store(P_ptr + chunk_states, decays, mask=nd_mask)
    tl.store(U_ptr + chunk_states, carry, mask=nd_mask)


@triton.jit
def _adjoint_inputs(dt_ptr, C_ptr, z_ptr, dy_ptr, seq_ptr, bias, t, L, Dm, stride_z, d_in, n_offs,
                    HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Token t (clamped to the sequence) for `_bwd_local_kernel`: Δ (D,), C_t (N,), g_t = dy_t (times the z
    gate's derivative factor z·σ(z)) (D,), whether t starts a sequence. Unmasked loads as in `_step_inputs`."""
    row = tl.maximum(tl.minimum(tl.cast(t, tl.int64), L - 1), 0)
    dt = _delta(tl.load(dt_ptr + row * Dm + d_in), bias, SOFTPLUS)
    Ct = tl.load(C_ptr + row * BLOCK_N + n_offs).to(tl.float32)
    g = tl.load(dy_ptr + row * Dm + d_in).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + row * stride_z + d_in).to(tl.float32)
        g = g * z * tl.sigmoid(z)
    starts = row < 0
    if HAS_SEQ:
        starts = _starts_sequence(seq_ptr, row, row >= 0)
    return dt, Ct, g, starts


@fast_launch
@triton.jit
def _bwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, tile_states_ptr, scratch_ptr, dy_ptr,
    dhT_ptr, dx_ptr, ddt_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dh0_ptr, P_ptr, U_ptr,
    L, Dm, N, n_tiles, n_dblocks, chunk_len, n_chunks, stride_zb, stride_zl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_SEQ: tl.constexpr, HAS_DHT: tl.constexpr, TILE_T: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # The forward's program shape (one batch row, BLOCK_D channels, (d_state, channels) tensors in registers),
    # walking the tiles of TILE_T tokens backwards. Per tile: the states after each of its tokens are recomputed
    # from the state stored at the tile's start into this program's scratch (TILE_T x d_state x BLOCK_D floats,
    # small enough to stay in cache), then the tokens are visited in reverse with the adjoint
    # u_t = dL/dh_t = C_t g_t + exp(Δ_{t+1} A) u_{t+1} in registers. In chunks (program axis 2), each chunk's
    # adjoint entering from the right is dhT carried back through the later chunks' (P, U) of `_bwd_local_kernel`;
    # dA, dD and Δ bias are summed per (row, chunk), outside over both.
    b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    chunk = tl.program_id(2)
    tile_begin = chunk * (chunk_len // TILE_T)
    tile_end = tl.minimum(tile_begin + chunk_len // TILE_T, n_tiles)
    d_offs, d_in, n_offs, d_mask, n_mask, nd_mask, A, bias = _channels(A_ptr, bias_ptr, Dm, N, HAS_BIAS, BLOCK_D,
                                                                       BLOCK_N, True)
    A2 = A * _LOG2E
    Dv = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d_offs, mask=d_mask, other=0.0).to(tl.float32)
    state_offs = d_offs[None, :] * N + n_offs[:, None]  # (batch, d_inner, d_state) of dhT, dh0, dA
    tile_offs = n_offs[:, None] * Dm + d_offs[None, :]
    # scratch: (TILE_T, BLOCK_N, BLOCK_D) per program
    scratch_ptr += ((b * n_dblocks + pid_d) * n_chunks + chunk) * TILE_T * BLOCK_N * BLOCK_D
    scratch_offs = n_offs[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    carry = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)  # dL/dh_t arriving from later tokens
    if HAS_DHT:
        carry = tl.load(dhT_ptr + b * Dm * N + state_offs, mask=nd_mask, other=0.0).to(tl.float32)
    for k in range(0, n_chunks - 1 - chunk):
        later = ((b * n_chunks + n_chunks - 1 - k) * N + n_offs[:, None]) * Dm + d_offs[None, :]
        carry = (tl.load(U_ptr + later, mask=nd_mask, other=0.0)
                 + tl.load(P_ptr + later, mask=nd_mask, other=0.0) * carry)
    dA = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dD = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    x_ptr += b * L * Dm
    dt_ptr += b * L * Dm
    z_ptr += b * stride_zb
    dy_ptr += b * L * Dm
    dx_ptr += b * L * Dm
    ddt_ptr += b * L * Dm
    dz_ptr += b * L * Dm  # dz is contiguous even where z is a strided view
    B_ptr += b * L * BLOCK_N
    C_ptr += b * L * BLOCK_N
    seq_ptr += b * L
    part = (b * n_dblocks + pid_d) * L  # rows of this program's dB / dC partial sums
    for rev in range(0, tile_end - tile_begin):
        start = (tile_end - 1 - rev) * TILE_T
        tl.debug_barrier()  # the previous tile's reverse walk is done reading the scratch this tile overwrites
        h_first = tl.load(tile_states_ptr + (b * n_tiles + start // TILE_T) * N * Dm + tile_offs, mask=nd_mask,
                          other=0.0)
        h = h_first
        # Both walks load the next token's inputs before this token's stores (which the compiler may not move
        # loads across): the loads' latency hides behind a token's arithmetic.
        cur = _token_inputs(x_ptr, dt_ptr, B_ptr, C_ptr, seq_ptr, bias, start, L, Dm, d_in, n_offs, HAS_SEQ,
                            SOFTPLUS, BLOCK_N)
        for i in range(0, TILE_T):
            nxt = _token_inputs(x_ptr, dt_ptr, B_ptr, C_ptr, seq_ptr, bias, start + i + 1, L, Dm, d_in, n_offs,
                                HAS_SEQ, SOFTPLUS, BLOCK_N)
            x, dt, raw, Bt, Ct, starts, valid, row = cur
            decay = tl.exp2(dt[None, :] * A2)
            if HAS_SEQ:
                decay = tl.where(starts, 0.0, decay)
            h = decay * h + Bt[:, None] * (dt * x)[None, :]
            tl.store(scratch_ptr + i * BLOCK_N * BLOCK_D + scratch_offs, h)
            cur = nxt
        # the reverse walk may read the scratch in another thread-to-element layout than it was written in
        tl.debug_barrier()
        h_t = h
        back = _reverse_inputs(x_ptr, dt_ptr, B_ptr, C_ptr, seq_ptr, z_ptr, dy_ptr, scratch_ptr, h_first, bias,
                              start, TILE_T - 1, L, Dm, stride_zl, d_in, n_offs, d_mask, scratch_offs, HAS_SEQ,
                              SOFTPLUS, HAS_Z, BLOCK_N, BLOCK_D)
        for j in range(0, TILE_T):
            k = TILE_T - 1 - j
            back_next = _reverse_inputs(x_ptr, dt_ptr, B_ptr, C_ptr, seq_ptr, z_ptr, dy_ptr, scratch_ptr, h_first,
                                      bias, start, k - 1, L, Dm, stride_zl, d_in, n_offs, d_mask, scratch_offs,
                                      HAS_SEQ, SOFTPLUS, HAS_Z, BLOCK_N, BLOCK_D)
            x, dt, raw, Bt, Ct, starts, valid, row, g, z, h_prev = back
            t = start + k
            td_mask = d_mask & ((tl.cast(t, tl.int64) + tl.zeros_like(d_offs)) < L)
            decay = tl.exp2(dt[None, :] * A2)
            if HAS_SEQ:  # the zero decay of the forward: no gradient flows through it either
                decay = tl.where(starts, 0.0, decay)
            if HAS_Z:
                sig = tl.sigmoid(z)
                y_pre = tl.sum(h_t * Ct[:, None], axis=0) + Dv * x
                dz = g * y_pre * sig * (1.0 + z * (1.0 - sig))
                tl.store(dz_ptr + row * Dm + d_offs, dz.to(dz_ptr.dtype.element_ty), mask=td_mask)
                g = g * z * sig
            u = carry + Ct[:, None] * g[None, :]
            uB = tl.sum(u * Bt[:, None], axis=0)
            before = decay * h_prev                                               # exp(Δ_t A) h_{t-1}
            ddt = x * uB + tl.sum(u * A * before, axis=0)
            dA += u * dt[None, :] * before
            if SOFTPLUS:
                ddt = ddt * tl.sigmoid(raw)
            ddt = tl.where(valid, ddt, 0.0)
            if HAS_BIAS:
                dbias += ddt
            if HAS_D:
                dD += g * x
            # dx, dΔ (and dz above) in their inputs' dtypes: rounded once at the store, as a cast afterwards would
            tl.store(dx_ptr + row * Dm + d_offs, (dt * uB + Dv * g).to(dx_ptr.dtype.element_ty), mask=td_mask)
            tl.store(ddt_ptr + row * Dm + d_offs, ddt.to(ddt_ptr.dtype.element_ty), mask=td_mask)
            tn_mask = n_mask & ((tl.cast(t, tl.int64) + tl.zeros_like(n_offs)) < L)
            tl.store(dB_ptr + (part + row) * N + n_offs, tl.sum(u * (dt * x)[None, :], axis=1), mask=tn_mask)
            tl.store(dC_ptr + (part + row) * N + n_offs, tl.sum(h_t * g[None, :], axis=1), mask=tn_mask)
            carry = decay * u
            h_t = h_prev
            back = back_next
    if chunk == 0:
        tl.store(dh0_ptr + b * Dm * N + state_offs, carry, mask=nd_mask)
    part_rows = b * n_chunks + chunk
    tl.store(dA_ptr + part_rows * Dm * N + state_offs, dA, mask=nd_mask)
    if HAS_D:
        tl.store(dD_ptr + part_rows * Dm + d_offs, dD, mask=d_mask)
    if HAS_BIAS:
        tl.store(dbias_ptr + part_rows * Dm + d_offs, dbias, mask=d_mask)


# A few fixed choices rather than an autotuning sweep, so that the first call compiles once per shape class
# (seconds), not once per candidate. block_t: the tokens between two states the forward stores for the backward
# (the backward recomputes each such tile). The forward: channels per program (for d_state 16; proportionally
# fewer for larger states), tokens per unrolled loop trip, and whether the next trip's inputs are loaded ahead.
TILE_CONFIG = {"block_t": 16}
FORWARD_CONFIG = {"block_d": 32, "unroll": 4, "num_warps": 1, "prefetch": True, "programs_per_sm": 16,
                  "min_programs": None}
BACKWARD_CONFIG = {"block_d": 32, "num_warps": 1, "programs_per_sm": 16, "min_programs": None}


def _channel_block(block_d: int, block_n: int) -> int:
    """Channels per program: block_d for d_state <= 16, fewer for larger states (about block_d x 16 elements)."""
    return block_d if block_n <= 16 else max(block_d * 16 // block_n, 2)


def _time_chunks(config: dict, x: torch.Tensor, programs: int, n_tiles: int, tile_t: int) -> tuple[int, int]:
    """(tokens per chunk, chunks): the sequence is cut into chunks walked in parallel when batch rows x channel
    blocks alone would leave the GPU short of programs (config['min_programs'], by default programs_per_sm per
    multiprocessor; none on the CPU interpreter)."""
    wanted = config["min_programs"]
    if wanted is None:
        wanted = config["programs_per_sm"] * multiprocessors(x) if x.is_cuda else 1
    # no programs: an empty batch or d_inner; chunks are launch-grid axis 2, which CUDA caps at 65,535
    n_chunks = min(n_tiles, MAX_GRID_YZ, max(1, cdiv(wanted, max(programs, 1))))
    tiles_per_chunk = cdiv(n_tiles, n_chunks)
    return tiles_per_chunk * tile_t, cdiv(n_tiles, tiles_per_chunk)


def _padded_states(v: torch.Tensor, block_n: int) -> torch.Tensor:
    """v: (batch, seqlen, d_state) -> (batch, seqlen, block_n) contiguous, in v's dtype, zeros past d_state (a copy
    unless v already is that): the kernels then read B_t and C_t unmasked."""
    if v.shape[-1] == block_n:
        return v.contiguous()
    out = v.new_zeros((*v.shape[:-1], block_n))
    out[..., : v.shape[-1]] = v
    return out


def _forward_blocks(block_n: int, tile_t: int) -> tuple[int, int, int]:
    """(channels per program, unroll, warps) of the forward kernel."""
    unroll = FORWARD_CONFIG["unroll"]
    if tile_t % unroll:
        raise ValueError(f"FORWARD_CONFIG['unroll'] ({unroll}) must divide TILE_CONFIG['block_t'] ({tile_t})")
    return _channel_block(FORWARD_CONFIG["block_d"], block_n), unroll, FORWARD_CONFIG["num_warps"]


def _forward_launches(x, delta, A_t, B, C, D, z, delta_bias, h0, seq_idx, delta_softplus, store_tiles, block_t):
    """`_SelectiveScan`'s forward allocations, views and launches (`plans.Planned` replays them) on prepared inputs
    (`_SelectiveScan.forward`): (y, the final state, the tile states for the backward, x and Δ as the kernels read
    them)."""
    batch, seqlen, d_inner = x.shape
    d_state = A_t.shape[0]
    block_n = next_power_of_2(d_state)
    n_tiles = cdiv(seqlen, block_t)
    x, delta = x.contiguous(), delta.contiguous()
    z_strides = (z.stride(0), z.stride(1)) if z is not None else (0, 0)
    y = torch.empty_like(x)
    final = torch.empty(batch, d_inner, d_state, device=x.device, dtype=torch.float32)
    # the states at tile starts are kept only for a backward pass (prefill without grad needs none)
    tiles = torch.empty((batch, n_tiles, d_state, d_inner) if store_tiles else (1,), device=x.device,
                        dtype=torch.float32)
    dummy = final
    fwd_block_d, unroll, fwd_warps = _forward_blocks(block_n, block_t)
    n_dblocks = cdiv(d_inner, fwd_block_d)
    chunk_len, n_chunks = _time_chunks(FORWARD_CONFIG, x, batch * n_dblocks, n_tiles, block_t)
    chunk_P = chunk_S = dummy
    if n_chunks > 1:
        chunk_P = torch.empty(batch, n_chunks, d_state, d_inner, device=x.device, dtype=torch.float32)
        chunk_S = torch.empty_like(chunk_P)
    args = (x, delta, A_t, B, C, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy, h0 if h0 is not None else dummy,
            seq_idx if seq_idx is not None else dummy, y, final, tiles, chunk_P, chunk_S,
            seqlen, d_inner, d_state, n_tiles, chunk_len, n_chunks, *z_strides)
    options = dict(HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, HAS_H0=h0 is not None,
                   HAS_SEQ=seq_idx is not None, TILE_T=block_t, UNROLL=unroll,
                   PREFETCH=FORWARD_CONFIG["prefetch"], BLOCK_D=fwd_block_d, BLOCK_N=block_n,
                   num_warps=fwd_warps)
    with on_device_of(x):
        if n_chunks > 1:  # every chunk but the last: its end state from zero and its decays' product
            _fwd_kernel[(batch, n_dblocks, n_chunks - 1)](*args, HAS_D=False, HAS_Z=False, STORE_TILES=False,
                                                          LOCAL=True, **options)
        _fwd_kernel[(batch, n_dblocks, n_chunks)](*args, HAS_D=D is not None, HAS_Z=z is not None,
                                                  STORE_TILES=store_tiles, LOCAL=False, **options)
    return y, final, tiles, x, delta


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx):
        ctx.set_materialize_grads(False)  # an unused final state's gradient stays None, not a tensor of zeros
        block_t, block_n = TILE_CONFIG["block_t"], next_power_of_2(A.shape[-1])
        # B and C in their own dtype, contiguous and padded with zeros to BLOCK_N states, so that the kernels read
        # each token's B_t and C_t unmasked; they are small ((batch, seqlen, d_state)) and usually column slices of
        # x_proj's output that need a copy anyway. These copies and Aᵀ's are ops a plan cannot stand for: they run
        # here, the launches in `_forward_launches`
        B, C = _padded_states(B, block_n), _padded_states(C, block_n)
        # z is usually half of in_proj's output, rows 2 d_inner apart: the kernels take its row strides, so no copy
        # unless its channels are strided too
        if z is not None and z.stride(-1) != 1:
            z = z.contiguous()
        # per-channel vectors too: the kernels index them as ptr + channel
        D = D.contiguous() if D is not None else None
        delta_bias = delta_bias.contiguous() if delta_bias is not None else None
        A_t = A.float().t().contiguous()  # (d_state, d_inner): the forward's state layout
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        seq_idx = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
        y, final, tiles, x, delta = _FORWARD((x, delta, A_t, B, C, D, z, delta_bias, h0, seq_idx),
                                             (delta_softplus, any(ctx.needs_input_grad), block_t))
        ctx.save_for_backward(x, delta, A_t, B, C, D, z, delta_bias, seq_idx, tiles)
        ctx.delta_softplus = delta_softplus
        ctx.block_t = block_t  # the tiles' length: TILE_CONFIG may change before the backward
        ctx.has_initial_state = initial_state is not None
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, delta, A_t, B, C, D, z, delta_bias, seq_idx, tiles = ctx.saved_tensors
        if dy is None:  # only the final state was used
            dy = torch.zeros_like(x)
        dx, ddt, dA, dB, dC, dD, dz, dbias, dh0 = _BACKWARD(
            (x, delta, A_t, B, C, D, z, delta_bias, seq_idx, tiles, dy, dfinal), (ctx.delta_softplus, ctx.block_t))
        return dx, ddt, dA, dB, dC, dD, dz, dbias, None, dh0 if ctx.has_initial_state else None, None


def _backward_launches(x, delta, A_t, B, C, D, z, delta_bias, seq_idx, tiles, dy, dfinal, delta_softplus, block_t):
    """`_SelectiveScan`'s backward: its allocations, views and launches (`plans.Planned` replays them), from what
    the forward kept, dy and dfinal (or None). Returns the gradients of x, Δ, A (float32), B, C, D, z, the Δ bias
    (None for an input that is None; each other in its input's dtype: B and C were kept as padded copies of the
    same dtype) and the initial state (float32)."""
    batch, seqlen, d_inner = x.shape
    dy = dy.contiguous()
    d_state = A_t.shape[0]
    block_n = next_power_of_2(d_state)
    block_d = _channel_block(BACKWARD_CONFIG["block_d"], block_n)
    n_tiles = tiles.shape[1]
    n_dblocks = cdiv(d_inner, block_d)
    chunk_len, n_chunks = _time_chunks(BACKWARD_CONFIG, x, batch * n_dblocks, n_tiles, block_t)
    f32 = dict(device=x.device, dtype=torch.float32)
    # dx, dΔ, dz: contiguous, stored by the kernel in their inputs' dtypes (no float32 copy to cast afterwards)
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    ddt = torch.empty(x.shape, device=x.device, dtype=delta.dtype)
    dz = torch.empty(x.shape, device=x.device, dtype=z.dtype) if z is not None else None
    z_strides = (z.stride(0), z.stride(1)) if z is not None else (0, 0)
    # per (row, chunk) for dA, dD, Δ bias and per channel block for dB, dC: summed by `sums_triton` below
    dA = torch.empty(batch, n_chunks, d_inner, d_state, **f32)
    dB = torch.empty(batch, n_dblocks, seqlen, d_state, **f32)
    dC = torch.empty(batch, n_dblocks, seqlen, d_state, **f32)
    dD = torch.empty(batch, n_chunks, d_inner, **f32) if D is not None else None
    dbias = torch.empty(batch, n_chunks, d_inner, **f32) if delta_bias is not None else None
    dh0 = torch.empty(batch, d_inner, d_state, **f32)
    # each program's recomputed states of one tile
    scratch = torch.empty(batch * n_dblocks * n_chunks * block_t * block_n * block_d, **f32)
    dummy = dh0
    chunk_P = chunk_U = dummy
    if n_chunks > 1:
        chunk_P = torch.empty(batch, n_chunks, d_state, d_inner, **f32)
        chunk_U = torch.empty_like(chunk_P)
    with on_device_of(x):
        if n_chunks > 1:  # every chunk but the first: its adjoint leaving from the left, from zero
            _bwd_local_kernel[(batch, n_dblocks, n_chunks - 1)](
                delta, A_t, C, z if z is not None else dummy, delta_bias if delta_bias is not None else dummy,
                seq_idx if seq_idx is not None else dummy, dy, chunk_P, chunk_U,
                seqlen, d_inner, d_state, chunk_len, n_chunks, *z_strides,
                HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
                HAS_SEQ=seq_idx is not None, BLOCK_D=block_d, BLOCK_N=block_n,
                num_warps=BACKWARD_CONFIG["num_warps"],
            )
        _bwd_kernel[(batch, n_dblocks, n_chunks)](
            x, delta, A_t, B, C, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy, seq_idx if seq_idx is not None else dummy, tiles,
            scratch, dy, dfinal.contiguous() if dfinal is not None else dummy,
            dx, ddt, dz if dz is not None else dummy, dA, dB, dC, dD if dD is not None else dummy,
            dbias if dbias is not None else dummy, dh0, chunk_P, chunk_U,
            seqlen, d_inner, d_state, n_tiles, n_dblocks, chunk_len, n_chunks, *z_strides,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=delta_softplus, HAS_SEQ=seq_idx is not None, HAS_DHT=dfinal is not None,
            TILE_T=block_t, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=BACKWARD_CONFIG["num_warps"],
        )
    dB_sum, dC_sum = sum_middle([(dB, B.dtype), (dC, C.dtype)])
    rows = batch * n_chunks
    dA_sum, = sum_parts([(dA, d_inner * d_state, torch.float32)], 1, rows, kept_stride=1)
    vectors = [(parts, d_inner, like.dtype) for parts, like in ((dD, D), (dbias, delta_bias)) if parts is not None]
    sums = sum_parts(vectors, 1, rows, kept_stride=1) if vectors else []
    dD_sum = sums[0] if D is not None else None
    dbias_sum = sums[-1] if delta_bias is not None else None
    return dx, ddt, dA_sum.view(d_inner, d_state), dB_sum, dC_sum, dD_sum, dz, dbias_sum, dh0


# the forward's launches and the backward replayed per input signature (on CUDA), reading these modules' globals
_FORWARD = Planned(_forward_launches, (sys.modules[__name__],))
_BACKWARD = Planned(_backward_launches, (sys.modules[__name__], sums_triton))


def selective_scan_triton(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    chunk_size: int | None = None,
    seq_idx: torch.Tensor | None = None,
):
    """Selective scan with the Triton kernels: same arguments and results as `selective_scan_chunked`
    (`chunk_size` is accepted and ignored: the kernels pick their own tiles)."""
    if seq_idx is not None:  # full rows of int32 ids that change exactly where a sequence starts
        seq_idx = kernel_segment_ids(seq_idx, x.shape[0], x.shape[1], x.device)
    if x.shape[1] == 0:  # nothing to launch: the state passes through unchanged
        from .selective_scan_torch import selective_scan_chunked

        return selective_scan_chunked(x, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                      return_final_state, seq_idx=seq_idx)
    y, final = apply_function(_SelectiveScan, x, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                              seq_idx)
    return (y, final) if return_final_state else y
