"""Selective scan (Mamba's SSM) in plain PyTorch.

All tensors are time-major: `x: (batch, seqlen, d_inner)`. With Δ = `delta`, the recurrence per channel d and
state index n is

    h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t x_t,        y_t = C_t · h_t + D x_t,        y_t ← y_t · silu(z_t)

`selective_scan_chunked` evaluates it in chunks of T tokens with a handful of whole-tensor operations per chunk
(never a Python loop over tokens); `selective_scan_sequential` is the literal token-by-token recurrence, kept as
the reference for tests; `selective_state_update` is one decoding step. With `seq_idx` (packed sequences, see
`packing`), the state is reset to zero before each token that starts a new sequence: that token's decay is 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .packing import rows, sequence_starts

# Inside a chunk, states are expressed relative to the chunk's middle token m: with S_t = Σ_{s≤t} Δ_s,
#   h_t = E_t ⊙ (exp(A S_m) h_prev + Σ_{s≤t} b_s / E_s),   E_t = exp(A (S_t − S_m)),   b_s = Δ_s B_s x_s.
# E_t spans exp(±|A| · |S_t − S_m|). Keeping that exponent below a bound leaves E and 1/E far from float32
# overflow and underflow; the gradient of b/E scales with 1/E², hence the smaller bound under autograd. Channels
# whose Δ's are too large for it are split off and scanned by recursive doubling instead, which is stable for any
# Δ: exact everywhere, and fast for the usual Δ's.
_MAX_EXPONENT = 30.0
_MAX_EXPONENT_AUTOGRAD = 15.0


def _scan_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _prepare_delta(delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool, dtype) -> torch.Tensor:
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def _prepare(x, delta, A, B, C, delta_bias, delta_softplus, initial_state):
    """Cast to the scan's compute dtype, apply Δ's bias and softplus, and start from zeros without a state."""
    dtype = _scan_dtype(x)
    delta = _prepare_delta(delta, delta_bias, delta_softplus, dtype)
    if initial_state is None:
        h = torch.zeros(x.shape[0], x.shape[2], A.shape[-1], dtype=dtype, device=x.device)
    else:
        h = initial_state.to(dtype)
    return delta * x.to(dtype), delta, A.to(dtype), B.to(dtype), C.to(dtype), h


def _finish(y, x, D, z, out_dtype):
    if D is not None:
        y = y + x.to(y.dtype) * D.to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def _lower_triangular_ones(length: int, dtype, device) -> torch.Tensor:
    return torch.ones(length, length, dtype=dtype, device=device).tril_()


def _scan_chunk(u, delta, A, B, C, h, tril, starts=None):
    """One chunk. u = Δ·x and delta: (batch, t, d_inner); A: (d_inner, d_state); B, C: (batch, t, d_state);
    h: (batch, d_inner, d_state); starts: None or (batch, t) bool, True where a new sequence starts (its decay is
    0). Returns (C·h_t: (batch, t, d_inner), state after the chunk)."""
    d_inner = u.shape[-1]
    m = (u.shape[1] - 1) // 2
    S_m = delta[:, : m + 1].sum(1)                        # (batch, d_inner): decay of the carried-in state to m
    # S_t − S_m summed outward from m, never as a difference of two large prefix sums (that would round small
    # steps away after one large Δ)
    S_rel = torch.cat([-delta[:, 1 : m + 1].flip(1).cumsum(1).flip(1), torch.zeros_like(delta[:, :1]),
                       delta[:, m + 1 :].cumsum(1)], dim=1)
    exponent = S_rel.detach().abs().amax(dim=(0, 1)) * A.detach().abs().amax(dim=-1)  # (d_inner,)
    unsafe = exponent > (_MAX_EXPONENT_AUTOGRAD if _tracks_grad(u, delta, A, B, C, h) else _MAX_EXPONENT)
    n_unsafe = int(unsafe.sum())
    if starts is not None:
        # the relative form's running sum over s ≤ t only takes tokens of t's own sequence, and the carried-in
        # state only reaches the chunk's first sequence
        local = starts.cumsum(1)                                                  # (batch, t)
        tril = tril[: u.shape[1], : u.shape[1]] * (local[:, :, None] == local[:, None, :]).to(tril.dtype)
    if n_unsafe == 0:
        return _scan_chunk_relative(u, S_m, S_rel, A, B, C, h, tril, starts)
    if n_unsafe == d_inner:
        return _scan_chunk_doubling(u, delta, A, B, C, h, starts)
    groups = [(~unsafe).nonzero()[:, 0], unsafe.nonzero()[:, 0]]
    safe, fast = groups
    results = [
        _scan_chunk_relative(u[..., safe], S_m[..., safe], S_rel[..., safe], A[safe], B, C, h[:, safe], tril,
                             starts),
        _scan_chunk_doubling(u[..., fast], delta[..., fast], A[fast], B, C, h[:, fast], starts),
    ]
    order = torch.argsort(torch.cat(groups))
    return (torch.cat([r[0] for r in results], dim=-1)[..., order],
            torch.cat([r[1] for r in results], dim=1)[:, order])


def _tracks_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _scan_chunk_relative(u, S_m, S_rel, A, B, C, h, tril, starts=None):
    """The chunk with states relative to its middle token m: a few whole-chunk products and one small matmul.
    S_m: (batch, d_inner) sum of Δ up to m; S_rel: (batch, t, d_inner) S_t − S_m; tril: the lower-triangular
    ones, or with `starts` (batch, t, t) ones where token s feeds token t (same sequence, s ≤ t)."""
    batch, t, d_inner = u.shape
    carry = (h * torch.exp(A * S_m.unsqueeze(-1))).unsqueeze(1)
    if starts is not None:
        carry = carry * (starts.cumsum(1) == 0)[:, :, None, None].to(carry.dtype)  # (batch, t, d_inner, d_state)
    if _tracks_grad(u, S_m, S_rel, A, B, C, h):
        E = torch.exp(S_rel.unsqueeze(-1) * A)            # (batch, t, d_inner, d_state)
        states = u.unsqueeze(-1) * B.unsqueeze(2) / E
        # cumulative sum over time as a small matmul: much faster on CPU than cumsum over a middle dimension
        states = torch.matmul(tril[..., :t, :t], states.reshape(batch, t, -1)).view(batch, t, d_inner, -1)
        states = (states + carry) * E
        return torch.einsum("btdn,btn->btd", states, C), states[:, -1]
    # Without autograd the same steps run in place, on two buffers of (batch, t, d_inner, d_state).
    E = torch.mul(S_rel.unsqueeze(-1), A).exp_()
    states = torch.mul(u.unsqueeze(-1), B.unsqueeze(2)).div_(E)
    states = torch.matmul(tril[..., :t, :t], states.view(batch, t, -1)).view(batch, t, d_inner, -1)
    states.add_(carry).mul_(E)
    h_next = states[:, -1].clone()
    return torch.sum(states.mul_(C.unsqueeze(2)), dim=-1), h_next


def _scan_chunk_doubling(u, delta, A, B, C, h, starts=None):
    """The chunk by recursive doubling (log2(t) steps) on (decay, input) pairs: only products of decays ≤ 1,
    so it is stable for any Δ, at about twice the cost of the relative form."""
    decay = torch.exp(delta.unsqueeze(-1) * A)           # (batch, t, d_inner, d_state)
    if starts is not None:
        decay = decay.masked_fill(starts[:, :, None, None], 0.0)
    states = u.unsqueeze(-1) * B.unsqueeze(2)
    states = torch.cat([states[:, :1] + decay[:, :1] * h.unsqueeze(1), states[:, 1:]], dim=1)
    step, t = 1, u.shape[1]
    while step < t:
        states = torch.cat([states[:, :step], states[:, step:] + decay[:, step:] * states[:, :-step]], dim=1)
        decay = torch.cat([decay[:, :step], decay[:, step:] * decay[:, :-step]], dim=1)
        step *= 2
    return torch.einsum("btdn,btn->btd", states, C), states[:, -1]


def selective_scan_chunked(
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
    chunk_size: int = 32,
    recompute_in_backward: bool = True,
    seq_idx: torch.Tensor | None = None,
):
    """Selective scan over a whole sequence, chunk by chunk.

    x, delta, z: (batch, seqlen, d_inner); A: (d_inner, d_state), negative real; B, C: (batch, seqlen, d_state);
    D, delta_bias: (d_inner,); initial_state: (batch, d_inner, d_state); seq_idx: None or (batch or 1, seqlen)
    integers: packed sequences, a new one wherever the id changes along a row (see `packing`); the state is reset
    to zero before each token that starts one (the initial state only reaches the first).
    Returns y: (batch, seqlen, d_inner) in x's dtype, and with `return_final_state` the final state
    (batch, d_inner, d_state) in float32 (float64 for float64 inputs). Under autograd the (batch, chunk, d_inner,
    d_state) intermediates are recomputed in the backward pass instead of being stored (`recompute_in_backward`),
    so training memory stays O(seqlen * d_inner) per layer.
    """
    u, delta, A, B, C, h = _prepare(x, delta, A, B, C, delta_bias, delta_softplus, initial_state)
    starts = sequence_starts(rows(seq_idx, *x.shape[:2])) if seq_idx is not None else None
    if recompute_in_backward and _tracks_grad(u, delta, A, B, C, h):
        y, h = checkpoint(_scan_chunks, u, delta, A, B, C, h, chunk_size, starts, use_reentrant=False)
    else:
        y, h = _scan_chunks(u, delta, A, B, C, h, chunk_size, starts)
    y = _finish(y, x, D, z, x.dtype)
    return (y, h) if return_final_state else y


def _scan_chunks(u, delta, A, B, C, h, chunk_size, starts=None):
    """All chunks in order, the state carried from one to the next. Returns (C·h_t for all t, final state)."""
    batch, seqlen, d_inner = u.shape
    tril = _lower_triangular_ones(min(chunk_size, seqlen), u.dtype, u.device)
    # which chunks hold a sequence start, read once: chunks without one take the plain path
    has_start = ([] if starts is None
                 else F.pad(starts.any(0), (0, (-seqlen) % chunk_size)).view(-1, chunk_size).any(1).tolist())
    outputs: list[torch.Tensor] = []
    for k, start in enumerate(range(0, seqlen, chunk_size)):
        end = min(start + chunk_size, seqlen)
        chunk_starts = starts[:, start:end] if starts is not None and has_start[k] else None
        y_chunk, h = _scan_chunk(u[:, start:end], delta[:, start:end], A, B[:, start:end], C[:, start:end], h, tril,
                                 chunk_starts)
        outputs.append(y_chunk)
    return (torch.cat(outputs, dim=1) if outputs else u.new_zeros(batch, 0, d_inner)), h


def selective_scan_sequential(
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
    seq_idx: torch.Tensor | None = None,
):
    """The recurrence token by token (a Python loop): the reference the parallel forms are tested against.

    Same arguments and results as `selective_scan_chunked`; pass float64 tensors for an exact reference.
    """
    batch, seqlen, d_inner = x.shape
    u, delta, A, B, C, h = _prepare(x, delta, A, B, C, delta_bias, delta_softplus, initial_state)
    starts = sequence_starts(rows(seq_idx, batch, seqlen)) if seq_idx is not None else None
    ys = []
    for t in range(seqlen):
        if starts is not None:  # a new sequence starts from a zero state
            h = torch.where(starts[:, t, None, None], 0.0, h)
        h = torch.exp(delta[:, t, :, None] * A) * h + u[:, t, :, None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    y = torch.stack(ys, dim=1) if ys else u.new_zeros(batch, 0, d_inner)
    y = _finish(y, x, D, z, x.dtype)
    return (y, h) if return_final_state else y


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    state_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step. state: (batch, d_inner, d_state); x, delta, z: (batch, d_inner); B, C: (batch, d_state).

    Returns (y: (batch, d_inner) in x's dtype, new state in the state's dtype). The new state is a new tensor, or
    written into `state_out` if given (which may be `state` itself: an update in place) and returned.
    """
    dtype = torch.float64 if state.dtype == torch.float64 else torch.float32
    delta = _prepare_delta(delta, delta_bias, delta_softplus, dtype)
    h = torch.exp(delta.unsqueeze(-1) * A.to(dtype)) * state.to(dtype)
    h = h + (delta * x.to(dtype)).unsqueeze(-1) * B.to(dtype).unsqueeze(1)
    y = torch.einsum("bdn,bn->bd", h, C.to(dtype))
    return _finish(y, x, D, z, x.dtype), write_state(h, state, state_out)


def write_state(new: torch.Tensor, state: torch.Tensor, state_out: torch.Tensor | None) -> torch.Tensor:
    """The new state of a decoding step in the state's dtype: `new` cast, or copied into `state_out` if given."""
    if state_out is None:
        return new.to(state.dtype)
    return state_out.copy_(new)
