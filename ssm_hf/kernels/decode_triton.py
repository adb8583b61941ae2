"""Single-token decoding steps of the Mamba mixer as Triton kernels: one launch each instead of a dozen small ops.

`causal_conv1d_update_triton` and `selective_state_update_triton` compute exactly what their PyTorch twins in
`causal_conv1d_torch` and `selective_scan_torch` compute, with the same signatures.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .causal_conv1d_torch import check_activation
from .launch import cdiv, fast_launch, next_power_of_2, on_device_of
from .ssd_torch import dt_limit_bounds
from .triton_math import softplus


@fast_launch
@triton.jit
def _conv_update_kernel(x_ptr, state_ptr, w_ptr, b_ptr, out_ptr, C, K, S,
                        HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    k = tl.arange(0, BLOCK_K)
    c_mask = c < C
    # the window: the last K - 1 cached inputs, then the new one
    past = tl.load(state_ptr + (b * C + c[:, None]) * S + (S - K + 1 + k[None, :]),
                   mask=c_mask[:, None] & (k[None, :] < K - 1), other=0.0).to(tl.float32)
    x = tl.load(x_ptr + b * C + c, mask=c_mask, other=0.0).to(tl.float32)
    window = tl.where((k == K - 1)[None, :], x[:, None], past)
    w = tl.load(w_ptr + c[:, None] * K + k[None, :], mask=c_mask[:, None] & (k[None, :] < K), other=0.0)
    out = tl.sum(window * w.to(tl.float32), axis=1)
    if HAS_BIAS:
        out += tl.load(b_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    if SILU:
        out = out * tl.sigmoid(out)
    tl.store(out_ptr + b * C + c, out.to(out_ptr.dtype.element_ty), mask=c_mask)
    # shift the cached inputs left by one and append x (all reads above happen before these writes)
    shifted = tl.load(state_ptr + (b * C + c[:, None]) * S + 1 + tl.arange(0, BLOCK_K)[None, :],
                      mask=c_mask[:, None] & (tl.arange(0, BLOCK_K)[None, :] < S - 1), other=0.0)
    tl.debug_barrier()
    tl.store(state_ptr + (b * C + c[:, None]) * S + tl.arange(0, BLOCK_K)[None, :], shifted,
             mask=c_mask[:, None] & (tl.arange(0, BLOCK_K)[None, :] < S - 1))
    tl.store(state_ptr + (b * C + c) * S + S - 1, x.to(state_ptr.dtype.element_ty), mask=c_mask)


def causal_conv1d_update_triton(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                                bias: torch.Tensor | None = None, activation: str | None = None) -> torch.Tensor:
    """x: (batch, channels) one new input; conv_state: (batch, channels, S ≥ width - 1) the inputs before it,
    updated in place (shifted by one, x appended); weight: (channels, width); activation None or "silu".
    Returns (batch, channels)."""
    check_activation(activation)
    batch, channels = x.shape
    width, size = weight.shape[-1], conv_state.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_k = next_power_of_2(max(width, size))
    # the kernel indexes a row-major state; a strided view (e.g. after a cache crop) is updated through a copy
    state = conv_state if conv_state.is_contiguous() else conv_state.contiguous()
    with on_device_of(x):
        _conv_update_kernel[(batch, cdiv(channels, 128))](
            x.contiguous(), state, weight.contiguous(), bias if bias is not None else weight, out,
            channels, width, size, HAS_BIAS=bias is not None, SILU=activation == "silu", BLOCK_C=128,
            BLOCK_K=block_k)
    if state is not conv_state:
        conv_state.copy_(state)
    return out


@fast_launch
@triton.jit
def _state_update_kernel(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, new_ptr,
                         Dm, N, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                         SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    d_mask, n_mask = d < Dm, n < N
    dn_mask = d_mask[:, None] & n_mask[None, :]
    dt = tl.load(dt_ptr + b * Dm + d, mask=d_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = softplus(dt)
    x = tl.load(x_ptr + b * Dm + d, mask=d_mask, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=dn_mask, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + b * N + n, mask=n_mask, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * N + n, mask=n_mask, other=0.0).to(tl.float32)
    offs = (b * Dm + d[:, None]) * N + n[None, :]
    h = tl.load(state_ptr + offs, mask=dn_mask, other=0.0).to(tl.float32)
    h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * Bv[None, :]
    y = tl.sum(h * Cv[None, :], axis=1)
    if HAS_D:
        y += x * tl.load(D_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + b * Dm + d, mask=d_mask, other=0.0).to(tl.float32)
        y = y * z * tl.sigmoid(z)
    tl.store(new_ptr + offs, h.to(new_ptr.dtype.element_ty), mask=dn_mask)
    tl.store(y_ptr + b * Dm + d, y.to(y_ptr.dtype.element_ty), mask=d_mask)


def _new_state_buffer(state: torch.Tensor, state_out: torch.Tensor | None) -> torch.Tensor:
    """Where a step kernel writes the new state: `state_out` itself when row-major (it may be `state`: each program
    reads its tile of the state before writing the same tile), else a new row-major tensor."""
    if state_out is not None and state_out.is_contiguous() and state_out.dtype == state.dtype:
        return state_out
    return torch.empty(state.shape, dtype=state.dtype, device=state.device)


def _finish_state(new: torch.Tensor, state_out: torch.Tensor | None) -> torch.Tensor:
    if state_out is None or new is state_out:
        return new
    return state_out.copy_(new)


def selective_state_update_triton(state, x, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                                  state_out=None):
    """One decoding step, as `selective_scan_torch.selective_state_update`: returns (y, new state), the new state
    written into `state_out` if given (which may be `state`: in place), else a new tensor."""
    batch, d_inner = x.shape
    d_state = A.shape[-1]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)       # row-major, as the kernel writes them
    new = _new_state_buffer(state, state_out)
    block_n = next_power_of_2(d_state)
    block_d = max(16, 2048 // block_n)
    dummy = y
    with on_device_of(x):
        _state_update_kernel[(batch, cdiv(d_inner, block_d))](
            state.contiguous(), x.contiguous(), delta.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(),
            D.contiguous() if D is not None else dummy, z.contiguous() if z is not None else dummy,
            delta_bias.contiguous() if delta_bias is not None else dummy, y, new, d_inner, d_state,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
            BLOCK_D=block_d, BLOCK_N=block_n)
    return y, _finish_state(new, state_out)


@fast_launch
@triton.jit
def _ssd_update_kernel(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, y_ptr, new_ptr,
                       H, P, N, heads_per_group, dt_min, dt_max,
                       HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    # one program: one (batch row, head) and BLOCK_P of its head_dim rows, all states
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    p_mask, n_mask = p < P, n < N
    pn_mask = p_mask[:, None] & n_mask[None, :]
    dt = tl.load(dt_ptr + b * H + head).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + head).to(tl.float32)
    if SOFTPLUS:
        dt = softplus(dt)
    if CLAMP:
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    decay = tl.exp(dt * tl.load(A_ptr + head).to(tl.float32))
    group = head // heads_per_group
    G = H // heads_per_group
    Bv = tl.load(B_ptr + (b * G + group) * N + n, mask=n_mask, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + (b * G + group) * N + n, mask=n_mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + (b * H + head) * P + p, mask=p_mask, other=0.0).to(tl.float32)
    offs = ((b * H + head) * P + p[:, None]) * N + n[None, :]
    h = decay * tl.load(state_ptr + offs, mask=pn_mask, other=0.0).to(tl.float32) + (dt * x)[:, None] * Bv[None, :]
    y = tl.sum(h * Cv[None, :], axis=1)
    if HAS_D:
        y += x * tl.load(D_ptr + head).to(tl.float32)
    tl.store(new_ptr + offs, h.to(new_ptr.dtype.element_ty), mask=pn_mask)
    tl.store(y_ptr + (b * H + head) * P + p, y.to(y_ptr.dtype.element_ty), mask=p_mask)


def ssd_state_update_triton(state, x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, dt_limit=None,
                            state_out=None):
    """One Mamba-2 decoding step, as `ssd_torch.ssd_state_update`: state (batch, heads, head_dim, d_state); x
    (batch, heads, head_dim); dt (batch, heads); B, C (batch, groups, d_state). Returns (y, new state), the new
    state written into `state_out` if given (which may be `state`: in place), else a new tensor."""
    batch, heads, head_dim = x.shape
    groups, d_state = B.shape[1], B.shape[2]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    new = _new_state_buffer(state, state_out)
    block_n = next_power_of_2(d_state)
    block_p = min(next_power_of_2(head_dim), max(4096 // block_n, 1))
    bounds = dt_limit_bounds(dt_limit)
    clamp = bounds is not None
    low, high = bounds if clamp else (0.0, 0.0)
    dummy = y
    with on_device_of(x):
        _ssd_update_kernel[(batch, heads, cdiv(head_dim, block_p))](
            state.contiguous(), x.contiguous(), dt.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(),
            D.contiguous() if D is not None else dummy, dt_bias.contiguous() if dt_bias is not None else dummy, y, new,
            heads, head_dim, d_state, heads // groups, low, high,
            HAS_D=D is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, CLAMP=clamp,
            BLOCK_P=block_p, BLOCK_N=block_n)
    return y, _finish_state(new, state_out)
