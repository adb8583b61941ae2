"""Mamba-2's state space dual (SSD) scan in plain PyTorch, time-major.

Per head h (with a scalar decay A_h < 0) and its group's B, C:

    H_t = exp(Δ_t A) H_{t-1} + Δ_t x_t B_tᵀ        (H: head_dim x d_state)
    y_t = H_t C_t + D x_t

`ssd_scan_chunked` cuts the sequence into chunks of Q tokens: inside a chunk the output is a masked,
attention-like product (the quadratic form, Q x Q per head); between chunks only the (head_dim x d_state) state
is passed on, sequentially, one step per chunk. `ssd_scan_sequential` is the literal recurrence, the reference;
`ssd_state_update` is one decoding step. With `seq_idx` (packed sequences, see `packing`), the state is reset to
zero before each token that starts a new sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .packing import rows, segment_ids, sequence_starts
from .selective_scan_torch import write_state


def ssd_prepare_dt(dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool,
                   dt_limit: tuple[float, float] | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Δ as the scan sees it: bias added, softplus, clamped to `dt_limit`, in `dtype`. dt: (..., heads)."""
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    bounds = dt_limit_bounds(dt_limit)
    if bounds is not None:
        dt = dt.clamp(min=bounds[0], max=bounds[1])
    return dt


def dt_limit_bounds(dt_limit: tuple[float, float] | None) -> tuple[float, float] | None:
    """(lo, hi) of Δ's clamp as floats, or None where `dt_limit` clamps nothing: none given, or lo ≤ 0 and hi
    infinite (Mamba-2's default (0, inf))."""
    if dt_limit is None or (dt_limit[0] <= 0.0 and dt_limit[1] == float("inf")):
        return None
    return float(dt_limit[0]), float(dt_limit[1])


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _by_group(t: torch.Tensor, n_groups: int, dim: int) -> torch.Tensor:
    """Split the heads dimension `dim` into (groups, heads_per_group): the heads of a group share B and C."""
    return t.unflatten(dim, (n_groups, -1))


def _ssd_chunks(x, dt, A, B, C, h0, chunk_size, segments=None):
    """x: (b, seqlen, h, p), dt: (b, seqlen, h), A: (h,), B, C: (b, seqlen, g, n), h0: (b, h, p, n); all in the
    compute dtype, seqlen a multiple of chunk_size; segments: None or (b, seqlen) `packing.segment_ids`. Returns y
    without the D term, (b, seqlen, h, p), and the final state."""
    b, seqlen, h, p = x.shape
    g, n = B.shape[-2:]
    q = chunk_size
    c = seqlen // q
    x = _by_group(x.reshape(b, c, q, h, p), g, -2)                   # (b, c, q, g, r, p)
    dt = dt.reshape(b, c, q, g, h // g)                           # (b, c, q, g, r)
    Bc, Cc = B.reshape(b, c, q, g, n), C.reshape(b, c, q, g, n)
    log_decay = dt * A.reshape(g, h // g)                         # (b, c, q, g, r): Δ_t A_h ≤ 0
    cum = log_decay.cumsum(2)
    # decay from token s to token t of a chunk (t ≥ s): exp(Σ_{s<j≤t} Δ_j A), summed directly rather than as
    # cum_t − cum_s, which would round small steps away after a large one; masked before exp (no overflow)
    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
    after = torch.ones(q, q, dtype=torch.bool, device=x.device).tril(-1)        # (j, s): j > s
    steps = log_decay.unsqueeze(3).expand(-1, -1, -1, q, -1, -1)                  # (b, c, j, s, g, r)
    seg = steps.masked_fill(~after[:, :, None, None], 0.0).cumsum(2)              # (b, c, t, s, g, r)
    # packed sequences: every decay that spans a sequence start is 0. It is masked (log-decay -inf before exp)
    # rather than folded into Δ A as a large negative step, which would make the differences of prefix sums
    # below lose all precision; masked entries get zero gradient.
    if segments is not None:
        doc = segments.reshape(b, c, q)
        entering = F.pad(doc[:, :-1, -1], (1, 0))                 # (b, c): sequence of the state entering a chunk
        keep = causal & (doc[:, :, :, None] == doc[:, :, None, :])  # (b, c, t, s)
        decay = torch.exp(seg.masked_fill(~keep[..., None, None], float("-inf")))
    else:
        decay = torch.exp(seg.masked_fill(~causal[:, :, None, None], float("-inf")))
    scores = torch.einsum("bctgn,bcsgn->bctsg", Cc, Bc)           # C_t · B_s per group
    xdt = x * dt.unsqueeze(-1)                                    # Δ_s x_s
    y = torch.einsum("bctsg,bctsgr,bcsgrp->bctgrp", scores, decay, xdt)
    # each chunk's own contribution to the state at its end
    to_end = cum[:, :, -1:] - cum                                 # (b, c, q, g, r)
    chunk_decay = cum[:, :, -1]                                   # (b, c, g, r)
    from_start = cum
    if segments is not None:  # only tokens of the chunk's last sequence reach its end; only the entering state's
        # own sequence (none, if the chunk starts a new one) sees it decay
        to_end = to_end.masked_fill((doc != doc[:, :, -1:])[..., None, None], float("-inf"))
        chunk_decay = chunk_decay.masked_fill((doc[:, :, -1] != entering)[..., None, None], float("-inf"))
        from_start = cum.masked_fill((doc != entering[:, :, None])[..., None, None], float("-inf"))
    to_end, chunk_decay = torch.exp(to_end), torch.exp(chunk_decay)
    chunk_states = torch.einsum("bcsgn,bcsgr,bcsgrp->bcgrpn", Bc, to_end, xdt)
    # pass the state from chunk to chunk (one small step per chunk)
    state = _by_group(h0, g, 1)                                   # (b, g, r, p, n)
    starts = []
    for k in range(c):
        starts.append(state)
        state = chunk_decay[:, k, ..., None, None] * state + chunk_states[:, k]
    starts = torch.stack(starts, dim=1)                           # (b, c, g, r, p, n): state before each chunk
    y = y + torch.einsum("bctgn,bctgr,bcgrpn->bctgrp", Cc, torch.exp(from_start), starts)
    return y.reshape(b, seqlen, h, p), state.reshape(b, h, p, n)


def ssd_scan_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 64,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    recompute_in_backward: bool = True,
    seq_idx: torch.Tensor | None = None,
):
    """SSD scan over a sequence in chunks of `chunk_size` tokens.

    x: (batch, seqlen, heads, head_dim); dt: (batch, seqlen, heads); A, D, dt_bias: (heads,), A < 0;
    B, C: (batch, seqlen, groups, d_state), heads divisible by groups; initial_state: (batch, heads, head_dim,
    d_state); seq_idx: None or (batch or 1, seqlen) integers: packed sequences, a new one wherever the id changes
    along a row (see `packing`); the state is reset to zero before each token that starts one (the initial state
    only reaches the first). Returns y: (batch, seqlen, heads, head_dim) in x's dtype, and with
    `return_final_state` the final state (of the row's last sequence) in float32 (float64 for float64 inputs).
    Under autograd the chunk internals (the Q x Q decay and score tensors) are recomputed in the backward pass
    instead of being stored (`recompute_in_backward`).
    """
    b, seqlen, h, p = x.shape
    dtype = _compute_dtype(x)
    dt = ssd_prepare_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)
    xs, A_, B_, C_ = x.to(dtype), A.to(dtype), B.to(dtype), C.to(dtype)
    h0 = (torch.zeros(b, h, p, B.shape[-1], dtype=dtype, device=x.device) if initial_state is None
          else initial_state.to(dtype))
    if seqlen == 0:
        y = x.new_zeros(b, 0, h, p)
        return (y, h0) if return_final_state else y
    pad = (-seqlen) % chunk_size
    segments = segment_ids(rows(seq_idx, b, seqlen)) if seq_idx is not None else None
    if pad:  # padded tokens have Δ = 0 and x = 0: they leave the state unchanged
        xs, dt, B_, C_ = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (xs, dt, B_, C_))
        if segments is not None:  # and belong to the last sequence
            segments = torch.cat([segments, segments[:, -1:].expand(-1, pad)], dim=1)
    inputs = (xs, dt, A_, B_, C_, h0)
    if recompute_in_backward and torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        y, state = checkpoint(_ssd_chunks, *inputs, chunk_size, segments, use_reentrant=False)
    else:
        y, state = _ssd_chunks(*inputs, chunk_size, segments)
    y = y[:, :seqlen]
    if D is not None:
        y = y + x.to(dtype) * D.to(dtype)[:, None]
    y = y.to(x.dtype)
    return (y, state) if return_final_state else y


def ssd_scan_sequential(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    seq_idx: torch.Tensor | None = None,
):
    """The SSD recurrence token by token: the reference. Same arguments and results as `ssd_scan_chunked`."""
    b, seqlen, h, p = x.shape
    dtype = _compute_dtype(x)
    state = (torch.zeros(b, h, p, B.shape[-1], dtype=dtype, device=x.device) if initial_state is None
             else initial_state.to(dtype))
    starts = sequence_starts(rows(seq_idx, b, seqlen)) if seq_idx is not None else None
    ys = []
    for t in range(seqlen):
        if starts is not None:  # a new sequence starts from a zero state
            state = torch.where(starts[:, t, None, None, None], 0.0, state)
        y_t, state = ssd_state_update(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D, dt_bias, dt_softplus,
                                      dt_limit)
        ys.append(y_t.to(dtype))
    y = torch.stack(ys, dim=1).to(x.dtype) if ys else x.new_zeros(b, 0, h, p)
    return (y, state) if return_final_state else y


def ssd_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] | None = None,
    state_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step. state: (batch, heads, head_dim, d_state); x: (batch, heads, head_dim); dt: (batch, heads);
    B, C: (batch, groups, d_state). Returns (y: (batch, heads, head_dim) in x's dtype, new state in the state's
    dtype): a new tensor, or `state_out` if given, written (it may be `state` itself: an update in place)."""
    dtype = torch.float64 if state.dtype == torch.float64 else torch.float32
    g = B.shape[1]
    dt = ssd_prepare_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)
    xs = _by_group(x.to(dtype), g, 1)                             # (b, g, r, p)
    dt = dt.unflatten(-1, (g, -1))                                # (b, g, r)
    decay = torch.exp(dt * A.to(dtype).reshape(g, -1))
    new = (decay[..., None, None] * _by_group(state.to(dtype), g, 1)
           + (dt.unsqueeze(-1) * xs).unsqueeze(-1) * B.to(dtype)[:, :, None, None, :])
    y = torch.einsum("bgrpn,bgn->bgrp", new, C.to(dtype)).flatten(1, 2)
    if D is not None:
        y = y + x.to(dtype) * D.to(dtype)[:, None]
    return y.to(x.dtype), write_state(new.flatten(1, 2), state, state_out)
