"""Mamba-2's SSD scan forward as a Triton kernel; the backward recomputes through the PyTorch chunked form.

Same function and signature as `ssd_torch.ssd_scan_chunked`. One program owns one (batch row, head, block of
head_dim) and walks the sequence in chunks of CHUNK tokens, keeping its (head_dim block x d_state) state in
registers: inside a chunk the output is the masked product (C Bᵀ ∘ decay) (Δ x) plus C · state, both as `tl.dot`;
the state then moves to the chunk's end. Segment sums of the log-decays are summed directly (never as differences
of prefix sums), as in the PyTorch form.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import on_device_of
from .ssd_torch import ssd_prepare_dt, ssd_scan_chunked

CHUNK = 64


@triton.jit
def _ssd_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, h0_ptr, y_ptr, hT_ptr,
    L, H, P, G, N,
    HAS_D: tl.constexpr, HAS_H0: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    head = bh % H
    group = head // (H // G)
    p_offs = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    n_offs = tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_Q)
    p_mask, n_mask = p_offs < P, n_offs < N
    pn_mask = p_mask[:, None] & n_mask[None, :]
    A = tl.load(A_ptr + head).to(tl.float32)
    Dh = 0.0
    if HAS_D:
        Dh = tl.load(D_ptr + head).to(tl.float32)
    state_offs = ((b * H + head) * P + p_offs[:, None]) * N + n_offs[None, :]
    if HAS_H0:
        state = tl.load(h0_ptr + state_offs, mask=pn_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    causal = rows[:, None] >= rows[None, :]
    after = rows[:, None] > rows[None, :]
    is_last = (rows == BLOCK_Q - 1)[:, None]
    for start in range(0, L, BLOCK_Q):
        t = start + rows
        t_mask = t < L
        dt = tl.load(dt_ptr + (b * L + t) * H + head, mask=t_mask, other=0.0).to(tl.float32)
        a = dt * A                                                                   # (Q,) log-decays ≤ 0
        x = tl.load(x_ptr + ((b * L + t[:, None]) * H + head) * P + p_offs[None, :],
                    mask=t_mask[:, None] & p_mask[None, :], other=0.0).to(tl.float32)          # (Q, P)
        bc_offs = ((b * L + t[:, None]) * G + group) * N + n_offs[None, :]
        bc_mask = t_mask[:, None] & n_mask[None, :]
        Bq = tl.load(B_ptr + bc_offs, mask=bc_mask, other=0.0).to(tl.float32)            # (Q, N)
        Cq = tl.load(C_ptr + bc_offs, mask=bc_mask, other=0.0).to(tl.float32)
        # seg[t, s] = Σ_{s<j≤t} a_j, summed along t for each s
        seg = tl.cumsum(tl.where(after, a[:, None], 0.0), axis=0)                       # (Q, Q)
        decay = tl.where(causal, tl.exp(seg), 0.0)
        cum = tl.cumsum(a, axis=0)                                                       # Σ_{j≤t} a_j
        xdt = x * dt[:, None]
        if IEEE:
            scores = tl.dot(Cq, tl.trans(Bq), input_precision="ieee")
            y = tl.dot(scores * decay, xdt, input_precision="ieee")
            y += tl.dot(Cq, tl.trans(state), input_precision="ieee") * tl.exp(cum)[:, None]
        else:
            scores = tl.dot(Cq, tl.trans(Bq))
            y = tl.dot(scores * decay, xdt)
            y += tl.dot(Cq, tl.trans(state)) * tl.exp(cum)[:, None]
        if HAS_D:
            y += Dh * x
        tl.store(y_ptr + ((b * L + t[:, None]) * H + head) * P + p_offs[None, :],
                 y.to(y_ptr.dtype.element_ty), mask=t_mask[:, None] & p_mask[None, :])
        # move the state to the chunk's end: decay from each token to the end is the last row of seg
        to_end = tl.exp(tl.sum(tl.where(is_last, seg, 0.0), axis=0))                   # (Q,)
        total = tl.sum(a, axis=0)
        if IEEE:
            state = state * tl.exp(total) + tl.dot(tl.trans(xdt * to_end[:, None]), Bq, input_precision="ieee")
        else:
            state = state * tl.exp(total) + tl.dot(tl.trans(xdt * to_end[:, None]), Bq)
    tl.store(hT_ptr + state_offs, state, mask=pn_mask)


# Shared memory of the forward kernel (compiled for sm_90 and sm_80, bytes): (Q 64, P 64, N 128) ~230 KB, which
# only an H100-class part offers per block; (32, 64, 128) ~128 KB; (32, 32, 256) ~107 KB; (32, 16, 256, float32)
# ~158 KB. Wider states go to the PyTorch path (see `supports`).
_BIG_SHARED_MEMORY = 232_448


def supports(d_state: int) -> bool:
    """Whether the kernel has tiles for this state size."""
    return d_state <= 256


def _tiles(d_state: int, head_dim: int, ieee: bool, device: torch.device) -> tuple[int, int, int]:
    block_n = max(16, triton.next_power_of_2(d_state))
    block_p = max(16, min(64, triton.next_power_of_2(head_dim)))
    if block_n <= 64:
        return CHUNK, block_p, block_n
    shared = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0) \
        if device.type == "cuda" else 0
    if block_n == 128:
        return (CHUNK, block_p, block_n) if shared >= _BIG_SHARED_MEMORY else (32, block_p, block_n)
    return 32, min(block_p, 16 if ieee else 32), block_n


class _SSDScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, initial_state, backward_chunk):
        batch, seqlen, heads, head_dim = x.shape
        groups, d_state = B.shape[-2:]
        block_q, block_p, block_n = _tiles(d_state, head_dim, x.dtype == torch.float32, x.device)
        x_c, dt_c, B_c, C_c = x.contiguous(), dt.float().contiguous(), B.contiguous(), C.contiguous()
        y = torch.empty_like(x_c)
        final = torch.empty(batch, heads, head_dim, d_state, device=x.device, dtype=torch.float32)
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        grid = (batch * heads, triton.cdiv(head_dim, block_p))
        with on_device_of(x_c):
            _ssd_fwd_kernel[grid](
                x_c, dt_c, A.float().contiguous(), B_c, C_c, D if D is not None else final,
                h0 if h0 is not None else final, y, final,
                seqlen, heads, head_dim, groups, d_state,
                HAS_D=D is not None, HAS_H0=h0 is not None, IEEE=x.dtype == torch.float32,
                BLOCK_Q=block_q, BLOCK_P=block_p, BLOCK_N=block_n, num_warps=4,
            )
        ctx.save_for_backward(x, dt, A, B, C, D, initial_state)
        ctx.backward_chunk = backward_chunk
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        saved = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(need) if t is not None else None
                      for t, need in zip(saved, ctx.needs_input_grad[:7])]
            x, dt, A, B, C, D, h0 = leaves
            # already inside the backward pass: no second level of recomputation
            y, final = ssd_scan_chunked(x, dt, A, B, C, ctx.backward_chunk, D, initial_state=h0,
                                        return_final_state=True, recompute_in_backward=False)
            outputs, grads = [y], [dy]
            if dfinal is not None:
                outputs.append(final)
                grads.append(dfinal)
            wanted = [t for t in leaves if t is not None and t.requires_grad]
            found = iter(torch.autograd.grad(outputs, wanted, grads, allow_unused=True))
        return (*(next(found) if t is not None and t.requires_grad else None for t in leaves), None)


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
    """SSD scan with the Triton forward kernel: same arguments and results as `ssd_scan_chunked`. The kernel uses
    chunks of CHUNK tokens; `chunk_size` is the chunk of the PyTorch recomputation in the backward pass, which
    always recomputes (`recompute_in_backward` is accepted for the common signature). Packed sequences
    (`seq_idx`) run the PyTorch chunked form for now."""
    if seq_idx is not None:
        return ssd_scan_chunked(x, dt, A, B, C, chunk_size or CHUNK, D, dt_bias, dt_softplus, dt_limit, initial_state,
                                return_final_state, recompute_in_backward, seq_idx=seq_idx)
    dt = ssd_prepare_dt(dt, dt_bias, dt_softplus, dt_limit)
    if x.shape[1] == 0 or not supports(B.shape[-1]):
        return ssd_scan_chunked(x, dt, A, B, C, CHUNK, D, initial_state=initial_state,
                                return_final_state=return_final_state)
    y, final = _SSDScan.apply(x, dt, A, B, C, D, initial_state, chunk_size or CHUNK)
    return (y, final) if return_final_state else y
