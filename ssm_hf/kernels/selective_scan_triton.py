"""Selective scan (Mamba) as Triton kernels: one pass over the sequence forward, one backward, states recomputed.

Same function and signature as `selective_scan_torch.selective_scan_chunked` (time-major tensors). Forward: each
program owns one batch row and BLOCK_D channels, keeps their (d_state, BLOCK_D) state in registers and steps
through the tokens one at a time (UNROLL tokens per loop trip, the next trip's inputs loaded ahead); it stores
the state entering every TILE_CONFIG['block_t']-token tile, (batch, n_tiles, d_state, d_inner), only when a
backward will need it. Backward: per tile, in reverse, the tile's states are recomputed from the stored one with
an associative scan over (decay, input) pairs and the adjoint recurrence runs backwards the same way, so no
(batch, seqlen, d_inner, d_state) tensor is ever stored. With `seq_idx` (packed sequences), a token that starts
a new sequence gets a decay of 0, so no state crosses the boundary in either direction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import on_device_of
from .packing import kernel_segment_ids

_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _combine(a_left, b_left, a_right, b_right):
    # (a, b) pairs of h -> a * h + b, composed: the left map first
    return a_left * a_right, a_right * b_left + b_right


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _load_tile(ptr, t_offs, d_offs, L, Dm, t_mask, d_mask):
    # int64: seqlen * width passes 2**31 for long sequences of the large models
    return tl.load(ptr + t_offs.to(tl.int64)[:, None] * Dm + d_offs[None, :], mask=t_mask[:, None] & d_mask[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _delta(dt_ptr, bias, t_offs, d_offs, L, Dm, t_mask, d_mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    raw = _load_tile(dt_ptr, t_offs, d_offs, L, Dm, t_mask, d_mask)
    if HAS_BIAS:
        raw = raw + bias[None, :]
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    # positions past the end behave as identity steps: no decay, no input
    return tl.where(t_mask[:, None] & d_mask[None, :], dt, 0.0), raw


@triton.jit
def _starts_at(seq_ptr, t_offs, L):
    # (T,) True where token t starts a new sequence (seq_idx differs from token t-1's); never at t = 0
    inside = (t_offs >= 1) & (t_offs < L)
    now = tl.load(seq_ptr + tl.minimum(t_offs, L - 1).to(tl.int64), mask=inside, other=0)
    before = tl.load(seq_ptr + tl.maximum(t_offs - 1, 0).to(tl.int64), mask=inside, other=0)
    return inside & (now != before)


@triton.jit
def _step_inputs(x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, seq_ptr, t, L, Dm, N, d_offs, n_offs, d_mask, n_mask,
                 HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr):
    """Token t's inputs, as stored (zeros past the end): x, Δ before bias/softplus, z, B_t, C_t, starts-a-sequence."""
    row = tl.cast(t, tl.int64)  # also makes a tensor of a literal 0
    valid = row < L
    # masks built as blocks (the interpreter rejects a block mask combined with a scalar one)
    td_mask = d_mask & ((row + tl.zeros_like(d_offs)) < L)
    tn_mask = n_mask & ((row + tl.zeros_like(n_offs)) < L)
    x = tl.load(x_ptr + row * Dm + d_offs, mask=td_mask, other=0.0)
    dt = tl.load(dt_ptr + row * Dm + d_offs, mask=td_mask, other=0.0)
    z = x
    if HAS_Z:
        z = tl.load(z_ptr + row * Dm + d_offs, mask=td_mask, other=0.0)
    Bt = tl.load(B_ptr + row * N + n_offs, mask=tn_mask, other=0.0)
    Ct = tl.load(C_ptr + row * N + n_offs, mask=tn_mask, other=0.0)
    starts = row < 0
    if HAS_SEQ:
        inside = valid & (row >= 1)
        starts = inside & (tl.load(seq_ptr + row, mask=inside, other=0)
                           != tl.load(seq_ptr + row - 1, mask=inside, other=0))
    return x, dt, z, Bt, Ct, starts


@triton.jit
def _block_inputs(x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, seq_ptr, t0, L, Dm, N, d_offs, n_offs, d_mask, n_mask,
                  HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, UNROLL: tl.constexpr):
    """The inputs of tokens t0 .. t0 + UNROLL - 1: a tuple of `_step_inputs` tuples."""
    steps = ()
    for i in tl.static_range(UNROLL):
        steps = steps + (_step_inputs(x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, seq_ptr, t0 + i, L, Dm, N, d_offs, n_offs,
                                      d_mask, n_mask, HAS_Z, HAS_SEQ),)
    return steps


@triton.jit
def _fwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, seq_ptr, y_ptr, hT_ptr, tile_states_ptr,
    L, Dm, N, n_tiles,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, STORE_TILES: tl.constexpr, TILE_T: tl.constexpr,
    UNROLL: tl.constexpr, PREFETCH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program owns one batch row and BLOCK_D channels with their whole (d_state, BLOCK_D) state in registers,
    # and steps through the sequence one token at a time: the cheapest form of the recurrence (one exp2 and two
    # FMAs per state element and token, no scan tree, no reductions across tokens). Tokens go UNROLL at a time
    # so that the compiler can overlap their independent work (loads, Δ, decays) around the one dependent FMA
    # chain, and the next block's loads are issued before this block's arithmetic (PREFETCH). The state is laid out
    # (d_state, channels), channels fastest, as x and y are in memory: lanes then run over channels and the sum over
    # the state for y stays mostly inside each thread. A comes transposed, (d_state, d_inner); `tile_states` too.
    b = tl.program_id(0).to(tl.int64)  # offsets past 2**31 elements stay exact
    d_offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n_offs = tl.arange(0, BLOCK_N)
    d_mask, n_mask = d_offs < Dm, n_offs < N
    nd_mask = n_mask[:, None] & d_mask[None, :]
    A = tl.load(A_ptr + n_offs[:, None] * Dm + d_offs[None, :], mask=nd_mask, other=0.0).to(tl.float32) * _LOG2E
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d_offs, mask=d_mask, other=0.0).to(tl.float32)
    Dv = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d_offs, mask=d_mask, other=0.0).to(tl.float32)
    state_offs = d_offs[None, :] * N + n_offs[:, None]  # (batch, d_inner, d_state) of h0 and hT
    tile_offs = n_offs[:, None] * Dm + d_offs[None, :]
    if HAS_H0:
        h = tl.load(h0_ptr + b * Dm * N + state_offs, mask=nd_mask, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    x_ptr += b * L * Dm
    dt_ptr += b * L * Dm
    y_ptr += b * L * Dm
    z_ptr += b * L * Dm
    B_ptr += b * L * N
    C_ptr += b * L * N
    seq_ptr += b * L
    cur = _block_inputs(x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, seq_ptr, 0, L, Dm, N, d_offs, n_offs, d_mask, n_mask,
                        HAS_Z, HAS_SEQ, UNROLL)
    for t0 in range(0, L, UNROLL):
        if PREFETCH:
            nxt = _block_inputs(x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, seq_ptr, t0 + UNROLL, L, Dm, N, d_offs, n_offs,
                                d_mask, n_mask, HAS_Z, HAS_SEQ, UNROLL)
        else:
            cur = _block_inputs(x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, seq_ptr, t0, L, Dm, N, d_offs, n_offs, d_mask,
                                n_mask, HAS_Z, HAS_SEQ, UNROLL)
        if STORE_TILES:  # the state entering every TILE_T-token tile, for the backward's recomputation
            if t0 % TILE_T == 0:
                tl.store(tile_states_ptr + (b * n_tiles + t0 // TILE_T) * Dm * N + tile_offs, h, mask=nd_mask)
        ys = ()
        for i in tl.static_range(UNROLL):
            x, dt_raw, z, Bt, Ct, starts = cur[i]
            x = x.to(tl.float32)
            dt = dt_raw.to(tl.float32) + bias
            if SOFTPLUS:
                dt = _softplus(dt)
            dt = tl.where(t0 + i < L, dt, 0.0)  # steps past the end are identities: no decay, no input
            decay = tl.exp2(dt[None, :] * A)
            if HAS_SEQ:  # a new sequence: nothing of the state before it survives
                decay = tl.where(starts, 0.0, decay)
            h = decay * h + Bt.to(tl.float32)[:, None] * (dt * x)[None, :]
            y = tl.sum(h * Ct.to(tl.float32)[:, None], axis=0)
            if HAS_D:
                y += x * Dv
            if HAS_Z:
                zf = z.to(tl.float32)
                y = y * zf * tl.sigmoid(zf)
            ys = ys + (y,)
        for i in tl.static_range(UNROLL):
            row = tl.cast(t0 + i, tl.int64)
            tl.store(y_ptr + row * Dm + d_offs, ys[i].to(y_ptr.dtype.element_ty),
                     mask=d_mask & ((row + tl.zeros_like(d_offs)) < L))
        if PREFETCH:
            cur = nxt
    tl.store(hT_ptr + b * Dm * N + state_offs, h, mask=nd_mask)


@triton.jit
def _bwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, tile_states_ptr, dy_ptr, dhT_ptr,
    dx_ptr, ddt_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    L, Dm, N, n_tiles, n_dblocks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_SEQ: tl.constexpr, HAS_DHT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    d_offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n_offs = tl.arange(0, BLOCK_N)
    d_mask, n_mask = d_offs < Dm, n_offs < N
    dn_mask = d_mask[:, None] & n_mask[None, :]
    A = tl.load(A_ptr + d_offs[:, None] * N + n_offs[None, :], mask=dn_mask, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d_offs, mask=d_mask, other=0.0).to(tl.float32)
    Dv = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d_offs, mask=d_mask, other=0.0).to(tl.float32)
    state_offs = d_offs[:, None] * N + n_offs[None, :]
    if HAS_DHT:
        carry = tl.load(dhT_ptr + b * Dm * N + state_offs, mask=dn_mask, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dA = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dD = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    first_decay = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    row = tl.arange(0, BLOCK_T)
    for rev in range(0, n_tiles):
        tile = n_tiles - 1 - rev
        t_offs = tile * BLOCK_T + row
        t_mask = t_offs < L
        td_mask = t_mask[:, None] & d_mask[None, :]
        tn_mask = t_mask[:, None] & n_mask[None, :]
        base = b * L * Dm
        x = _load_tile(x_ptr + base, t_offs, d_offs, L, Dm, t_mask, d_mask)
        dt, raw = _delta(dt_ptr + base, bias, t_offs, d_offs, L, Dm, t_mask, d_mask, HAS_BIAS, SOFTPLUS)
        next_mask = (t_offs + 1) < L
        dt_next, _ = _delta(dt_ptr + base, bias, t_offs + 1, d_offs, L, Dm, next_mask, d_mask, HAS_BIAS, SOFTPLUS)
        Bt = _load_tile(B_ptr + b * L * N, t_offs, n_offs, L, N, t_mask, n_mask)
        Ct = _load_tile(C_ptr + b * L * N, t_offs, n_offs, L, N, t_mask, n_mask)
        dy = _load_tile(dy_ptr + base, t_offs, d_offs, L, Dm, t_mask, d_mask)
        # recompute the tile's states from the state stored at its start
        h_start = tl.load(tile_states_ptr + (b * n_tiles + tile) * Dm * N + n_offs[None, :] * Dm + d_offs[:, None],
                          mask=dn_mask, other=0.0)
        decay = tl.exp(dt[:, :, None] * A[None, :, :])
        alpha = tl.exp(dt_next[:, :, None] * A[None, :, :])                  # exp(Δ_{t+1} A)
        if HAS_SEQ:  # the zero decays of the forward: no gradient flows through them either
            decay = tl.where(_starts_at(seq_ptr + b * L, t_offs, L)[:, None, None], 0.0, decay)
            alpha = tl.where(_starts_at(seq_ptr + b * L, t_offs + 1, L)[:, None, None], 0.0, alpha)
        inp = (dt * x)[:, :, None] * Bt[:, None, :]
        decay_cum, inp_cum = tl.associative_scan((decay, inp), 0, _combine)
        hs = decay_cum * h_start[None, :, :] + inp_cum
        g = dy
        if HAS_Z:
            z = _load_tile(z_ptr + base, t_offs, d_offs, L, Dm, t_mask, d_mask)
            sig = tl.sigmoid(z)
            y_pre = tl.sum(hs * Ct[:, None, :], axis=2)
            if HAS_D:
                y_pre += x * Dv[None, :]
            g = dy * z * sig
            dz = dy * y_pre * sig * (1.0 + z * (1.0 - sig))
            tl.store(dz_ptr + base + t_offs.to(tl.int64)[:, None] * Dm + d_offs[None, :], dz, mask=td_mask)
        # adjoint: u_t = dL/dh_t = C_t g_t + exp(Δ_{t+1} A) u_{t+1}, run backwards through the tile
        src = Ct[:, None, :] * g[:, :, None]
        p_cum, q_cum = tl.associative_scan((alpha, src), 0, _combine, reverse=True)
        u = p_cum * carry[None, :, :] + q_cum
        u = tl.where(t_mask[:, None, None], u, 0.0)
        uB = tl.sum(u * Bt[:, None, :], axis=2)                               # (T, D)
        dx = dt * uB
        if HAS_D:
            dx += Dv[None, :] * g
            dD += tl.sum(g * x, axis=0)
        before = hs - inp                                                      # exp(Δ_t A) h_{t-1}
        ddt = x * uB + tl.sum(u * A[None, :, :] * before, axis=2)
        dA += tl.sum(u * dt[:, :, None] * before, axis=0)
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(raw)
        ddt = tl.where(td_mask, ddt, 0.0)
        if HAS_BIAS:
            dbias += tl.sum(ddt, axis=0)
        rows = t_offs.to(tl.int64)[:, None] * Dm + d_offs[None, :]
        tl.store(dx_ptr + base + rows, dx, mask=td_mask)
        tl.store(ddt_ptr + base + rows, ddt, mask=td_mask)
        # per-channel-block partial sums over this block's channels; summed over blocks outside
        part = ((b * n_dblocks + pid_d) * L + t_offs.to(tl.int64)[:, None]) * N + n_offs[None, :]
        tl.store(dC_ptr + part, tl.sum(hs * g[:, :, None], axis=1), mask=tn_mask)
        tl.store(dB_ptr + part, tl.sum(u * (dt * x)[:, :, None], axis=1), mask=tn_mask)
        first = (row == 0)[:, None, None]
        carry = tl.sum(tl.where(first, u, 0.0), axis=0)
        first_decay = tl.sum(tl.where(first, decay, 0.0), axis=0)
    tl.store(dh0_ptr + b * Dm * N + state_offs, first_decay * carry, mask=dn_mask)
    tl.store(dA_ptr + b * Dm * N + state_offs, dA, mask=dn_mask)
    if HAS_D:
        tl.store(dD_ptr + b * Dm + d_offs, dD, mask=d_mask)
    if HAS_BIAS:
        tl.store(dbias_ptr + b * Dm + d_offs, dbias, mask=d_mask)


# Tile shape and warps per program; a handful of fixed choices rather than an autotuning sweep, so that the
# first call compiles once per shape class (seconds), not once per candidate.
TILE_CONFIG = {"block_t": 16, "block_d": 16, "num_warps": 4}
# The forward: channels per program (for d_state 16; fewer for larger states), tokens per unrolled block, and
# whether the next block's loads are issued before this block's arithmetic. block_t above is also the interval
# at which the forward stores states for the backward.
FORWARD_CONFIG = {"block_d": 32, "unroll": 4, "num_warps": 1, "prefetch": True}


def _blocks(d_state: int) -> tuple[int, int, int, int]:
    block_n = triton.next_power_of_2(d_state)
    block_d = TILE_CONFIG["block_d"] if block_n <= 16 else max(TILE_CONFIG["block_d"] * 16 // block_n, 4)
    return TILE_CONFIG["block_t"], block_d, block_n, TILE_CONFIG["num_warps"]


def _forward_blocks(d_state: int, tile_t: int) -> tuple[int, int, int]:
    """(channels per program, unroll, warps) of the forward kernel: about BLOCK_D x 16 state elements a program."""
    block_n = triton.next_power_of_2(d_state)
    block_d = max(FORWARD_CONFIG["block_d"] * 16 // block_n, 2) if block_n > 16 else FORWARD_CONFIG["block_d"]
    unroll = FORWARD_CONFIG["unroll"]
    if tile_t % unroll:
        raise ValueError(f"FORWARD_CONFIG['unroll'] ({unroll}) must divide TILE_CONFIG['block_t'] ({tile_t})")
    return block_d, unroll, FORWARD_CONFIG["num_warps"]


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx):
        batch, seqlen, d_inner = x.shape
        d_state = A.shape[-1]
        block_t, block_d, block_n, num_warps = _blocks(d_state)
        n_tiles = triton.cdiv(seqlen, block_t)
        x, delta, B, C = x.contiguous(), delta.contiguous(), B.contiguous(), C.contiguous()
        z = z.contiguous() if z is not None else None
        # per-channel vectors too: the kernels index them as ptr + channel
        D = D.contiguous() if D is not None else None
        delta_bias = delta_bias.contiguous() if delta_bias is not None else None
        A = A.float().contiguous()
        A_t = A.t().contiguous()  # (d_state, d_inner): the forward's state layout
        y = torch.empty_like(x)
        final = torch.empty(batch, d_inner, d_state, device=x.device, dtype=torch.float32)
        # the states at tile starts are kept only for a backward pass (prefill without grad needs none)
        store_tiles = any(ctx.needs_input_grad)
        tiles = torch.empty((batch, n_tiles, d_state, d_inner) if store_tiles else (1,), device=x.device,
                            dtype=torch.float32)
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        seq_idx = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
        dummy = final
        fwd_block_d, unroll, fwd_warps = _forward_blocks(d_state, block_t)
        with on_device_of(x):
            _fwd_kernel[(batch, triton.cdiv(d_inner, fwd_block_d))](
                x, delta, A_t, B, C, D if D is not None else dummy, z if z is not None else dummy,
                delta_bias if delta_bias is not None else dummy, h0 if h0 is not None else dummy,
                seq_idx if seq_idx is not None else dummy, y, final, tiles,
                seqlen, d_inner, d_state, n_tiles,
                HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
                HAS_H0=h0 is not None, HAS_SEQ=seq_idx is not None, STORE_TILES=store_tiles, TILE_T=block_t,
                UNROLL=unroll, PREFETCH=FORWARD_CONFIG["prefetch"], BLOCK_D=fwd_block_d, BLOCK_N=block_n,
                num_warps=fwd_warps,
            )
        ctx.save_for_backward(x, delta, A, B, C, D, z, delta_bias, seq_idx, tiles)
        ctx.delta_softplus = delta_softplus
        ctx.has_initial_state = initial_state is not None
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, delta, A, B, C, D, z, delta_bias, seq_idx, tiles = ctx.saved_tensors
        batch, seqlen, d_inner = x.shape
        d_state = A.shape[-1]
        block_t, block_d, block_n, num_warps = _blocks(d_state)
        n_tiles = tiles.shape[1]
        n_dblocks = triton.cdiv(d_inner, block_d)
        f32 = dict(device=x.device, dtype=torch.float32)
        dx, ddt = torch.empty(x.shape, **f32), torch.empty(x.shape, **f32)
        dz = torch.empty(x.shape, **f32) if z is not None else None
        dA = torch.empty(batch, d_inner, d_state, **f32)
        dB = torch.empty(batch, n_dblocks, seqlen, d_state, **f32)
        dC = torch.empty(batch, n_dblocks, seqlen, d_state, **f32)
        dD = torch.empty(batch, d_inner, **f32) if D is not None else None
        dbias = torch.empty(batch, d_inner, **f32) if delta_bias is not None else None
        dh0 = torch.empty(batch, d_inner, d_state, **f32)
        dummy = dh0
        with on_device_of(x):
            _bwd_kernel[(batch, n_dblocks)](
                x, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
                delta_bias if delta_bias is not None else dummy, seq_idx if seq_idx is not None else dummy, tiles,
                dy.contiguous(),
                dfinal.contiguous() if dfinal is not None else dummy,
                dx, ddt, dz if dz is not None else dummy, dA, dB, dC, dD if dD is not None else dummy,
                dbias if dbias is not None else dummy, dh0,
                seqlen, d_inner, d_state, n_tiles, n_dblocks,
                HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                SOFTPLUS=ctx.delta_softplus, HAS_SEQ=seq_idx is not None, HAS_DHT=dfinal is not None,
                BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=num_warps,
            )
        return (dx.to(x.dtype), ddt.to(delta.dtype), dA.sum(0), dB.sum(1).to(B.dtype), dC.sum(1).to(C.dtype),
                dD.sum(0).to(D.dtype) if D is not None else None, dz.to(z.dtype) if z is not None else None,
                dbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else None, None,
                dh0 if ctx.has_initial_state else None, None)


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
    y, final = _SelectiveScan.apply(x, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx)
    return (y, final) if return_final_state else y
