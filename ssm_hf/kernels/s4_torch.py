"""S4 and S4D in plain PyTorch: HiPPO-LegS and its normal-plus-low-rank form, the S4D initialisations,
discretisation, the convolution kernel (Vandermonde product for a diagonal A, Cauchy kernel with a Woodbury
correction for a diagonal-plus-low-rank A), FFT convolution, the single-step recurrence and the state after a chunk.

Conventions. There are S independent single-input single-output SSMs (one per channel and copy). A state of size N
is kept as M = N/2 complex modes: the full system is the conjugate-symmetric pair [x, conj(x)] (A, B, C, P and the
state all come in conjugate pairs), so it maps real inputs to real outputs, and every output is 2 Re(...) of the
half system. Shapes use S (SSMs), M (modes), R (low rank), L (length), b (batch).

The state evolves as h_{k+1} = Ā h_k + B̄ u_k and the output is y_k = C h_{k+1}, so the convolution kernel is
K_k = C Ā^k B̄ and y = K * u (the D skip term is added by the layer).

- Diagonal A (S4D): Ā = exp(ΔA) with B̄ = (exp(ΔA) - 1)/A B (zero-order hold), or Ā = (1 + ΔA/2)/(1 - ΔA/2) with
  B̄ = Δ B/(1 - ΔA/2) (bilinear). K_k = 2 Re Σ_m C_m B̄_m Ā_m^k: a Vandermonde product, factored as
  Ā^(bT + t) = Ā^(bT) Ā^t with T ≈ sqrt(L) (the (S, M, L) matrix of powers is never built).
- DPLR A = Λ - P P* (S4, bilinear): the generating function Σ_{k<L} K_k ω^k at the L-th roots of unity equals
  C̃ (I - Āω)^{-1} B̄ with C̃ = C (I - Ā^L). As in the S4 paper, C̃ is the trained parameter ("attuned" to a
  length L); (I - Āω)^{-1} B̄ reduces to a resolvent of A, a diagonal resolvent (Cauchy sums) corrected by
  Woodbury's identity; an inverse real FFT gives the kernel. The true C, needed only by the recurrent view, is
  C̃ (I - Ā^L)^{-1}.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

# Elements of the largest complex intermediate a kernel builds at once (32 MiB in complex64); longer kernels are
# computed in blocks of positions or frequencies, and under autograd each block is recomputed in the backward pass
# instead of being stored.
_BLOCK_ELEMENTS = 1 << 22


def conj_full(x: torch.Tensor) -> torch.Tensor:
    """The full conjugate-symmetric vector [x, conj(x)] of a half one: (..., M) -> (..., 2M)."""
    return torch.cat([x, x.conj()], dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# Initialisations
# ---------------------------------------------------------------------------------------------------------------


def hippo_legs(state_size: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """The HiPPO-LegS matrices: A (N, N) with A_nk = -sqrt((2n+1)(2k+1)) below the diagonal, -(n+1) on it and 0
    above, and B (N,) with B_n = sqrt(2n+1)."""
    n = torch.arange(state_size, dtype=dtype)
    root = torch.sqrt(2 * n + 1)
    A = -torch.tril(root[:, None] * root[None, :], diagonal=-1) - torch.diag(n + 1)
    return A, root.clone()


class NPLR(NamedTuple):
    """HiPPO-LegS in normal-plus-low-rank form, A = V (diag(Λ) - P̃ P̃*) V*, kept for the M = N/2 eigenvalues with
    positive imaginary part (the others are their conjugates). Lambda, P, B: (M,); V: (N, M), orthonormal columns.
    The full basis is [V, conj(V)], and P̃ = V* p, B̃ = V* b for LegS's real p_n = sqrt(n + 1/2) and b."""

    Lambda: torch.Tensor
    P: torch.Tensor
    B: torch.Tensor
    V: torch.Tensor


@lru_cache(maxsize=16)
def _legs_nplr(state_size: int) -> NPLR:
    A, B = hippo_legs(state_size)
    p = torch.sqrt(torch.arange(state_size, dtype=torch.float64) + 0.5)
    normal = A + p[:, None] * p[None, :]           # = -I/2 + a skew-symmetric matrix
    skew = normal + 0.5 * torch.eye(state_size, dtype=torch.float64)
    # skew = i H with H = -i skew Hermitian: its eigenvectors are those of `normal`, its eigenvalues i mu.
    mu, V = torch.linalg.eigh(-1j * skew.to(torch.complex128))
    half = state_size // 2
    if mu[half:].min() <= 1e-9:
        raise RuntimeError(f"HiPPO-LegS of size {state_size} has a zero eigenvalue pair; cannot split it in halves")
    mu, V = mu[half:], V[:, half:]                    # eigh sorts ascending: the positive half
    Lambda = torch.complex(torch.full_like(mu, -0.5), mu)
    return NPLR(Lambda, V.conj().T @ p.to(V.dtype), V.conj().T @ B.to(V.dtype), V)


def hippo_legs_nplr(state_size: int) -> NPLR:
    """HiPPO-LegS's normal-plus-low-rank decomposition (complex128); state_size must be even."""
    if state_size % 2:
        raise ValueError(f"The conjugate-pair form needs an even state size, got {state_size}.")
    return NPLR(*(t.clone() for t in _legs_nplr(state_size)))


INITS = ("legs", "s4d_lin", "s4d_inv")


def ssm_init(init: str, state_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Λ, B, P), each (M,) complex128, for an initialisation:

    - "legs": HiPPO-LegS's normal part Λ, with B̃ and the low-rank P̃ (S4; a diagonal kernel drops P: S4D-LegS);
    - "s4d_lin": Λ_n = -1/2 + iπn (S4D-Lin), B = 1, P = 0;
    - "s4d_inv": Λ_n = -1/2 + i (N/π)(N/(2n+1) - 1) (S4D-Inv), B = 1, P = 0.
    """
    if state_size % 2:
        raise ValueError(f"The conjugate-pair form needs an even state size, got {state_size}.")
    if init == "legs":
        nplr = hippo_legs_nplr(state_size)
        return nplr.Lambda, nplr.B, nplr.P
    n = torch.arange(state_size // 2, dtype=torch.float64)
    if init == "s4d_lin":
        imag = math.pi * n
    elif init == "s4d_inv":
        imag = state_size / math.pi * (state_size / (2 * n + 1) - 1)
    else:
        raise ValueError(f"Unknown S4 init {init!r}; choose one of {INITS}.")
    Lambda = torch.complex(torch.full_like(n, -0.5), imag)
    return Lambda, torch.ones_like(Lambda), torch.zeros_like(Lambda)


# ---------------------------------------------------------------------------------------------------------------
# Diagonal kernels (S4D)
# ---------------------------------------------------------------------------------------------------------------


def discretize_diag(dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, method: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """dt: (S,) steps, A: (S, M) diagonal, B: (S, M). Returns (log Ā, B̄), both (S, M): Ā = exp(log Ā) (the
    log is what the Vandermonde product raises to integer powers)."""
    dtA = dt[:, None] * A
    if method == "zoh":
        return dtA, B * torch.expm1(dtA) / A
    if method == "bilinear":
        half = dtA / 2
        return torch.log((1 + half) / (1 - half)), B * dt[:, None] / (1 - half)
    raise ValueError(f"Unknown discretization {method!r}; choose 'zoh' or 'bilinear'.")


def _blocks(total: int, per_step: int) -> list[tuple[int, int]]:
    size = max(16, _BLOCK_ELEMENTS // max(per_step, 1))
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def _maybe_checkpoint(fn, *args):
    """fn(*args), recomputed in the backward pass when autograd records it (the block's intermediates are the
    large ones)."""
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _two_level(length: int) -> tuple[int, int]:
    """Positions k = b·T + t with T ≈ sqrt(L): (T, number of blocks)."""
    inner = max(1, math.isqrt(max(length - 1, 0)) + 1)
    return inner, -(-length // inner)


def vandermonde_kernel(W: torch.Tensor, log_z: torch.Tensor, length: int) -> torch.Tensor:
    """K[..., s, k] = 2 Re Σ_m W[..., s, m] z[s, m]^k for 0 ≤ k < length, with z = exp(log_z).

    W: (..., S, M) complex (C B̄ for the kernel; C Ā h for an initial state's output), log_z: (S, M).
    Returns (..., S, length) real. With k = bT + t and T ≈ sqrt(L), z^k = z^(bT) z^t: each block's W z^(bT) times
    the shared powers z^t is one batched matrix product, and nothing larger than O(S M sqrt(L)) is built besides the
    output (so autograd stores little too)."""
    inner, blocks = _two_level(length)
    real = log_z.real.dtype
    small = torch.exp(log_z.unsqueeze(-1) * torch.arange(inner, device=log_z.device, dtype=real))      # (S, M, T)
    large = torch.exp(log_z.unsqueeze(-1) * (inner * torch.arange(blocks, device=log_z.device, dtype=real)))
    per_block = (W.unsqueeze(-1) * large).transpose(-1, -2)                                            # (..., S, nb, M)
    return 2 * torch.matmul(per_block, small).real.flatten(-2)[..., :length]


def diag_final_state(u: torch.Tensor, log_z: torch.Tensor, dB: torch.Tensor, h0: torch.Tensor | None = None,
                     steps: torch.Tensor | None = None) -> torch.Tensor:
    """The state after a chunk, h = Ā^n h0 + Σ_k Ā^(L-1-k) B̄ u_k, in O(L·M) per SSM without a loop over tokens.

    u: (b, S, L) real, its real tokens at the end (padding before them zeroed); log_z = log Ā, dB = B̄: (S, M);
    h0: (b, S, M) or None (zeros); steps: (b,) the number n of real tokens per row (default L). Returns (b, S, M).
    Same two-level powers as `vandermonde_kernel`, reversed: Ā^(L-1-k) = Ā^((nb-1-b)T) Ā^(T-1-t)."""
    length = u.shape[-1]
    inner, blocks = _two_level(length)
    real = log_z.real.dtype
    t = torch.arange(inner - 1, -1, -1, device=log_z.device, dtype=real)
    b = inner * torch.arange(blocks - 1, -1, -1, device=log_z.device, dtype=real)
    small = torch.exp(log_z.unsqueeze(-1) * t)                                       # (S, M, T)
    large = torch.exp(log_z.unsqueeze(-1) * b)                                       # (S, M, nb)
    padded = torch.nn.functional.pad(u, (blocks * inner - length, 0)).to(log_z.dtype)  # zeros first: same sums
    per_block = torch.matmul(padded.unflatten(-1, (blocks, inner)), small.transpose(-1, -2))  # (b, S, nb, M)
    h = dB * torch.einsum("bsnm,smn->bsm", per_block, large)
    if h0 is not None:
        n = torch.full((u.shape[0],), length, device=u.device) if steps is None else steps
        h = h + torch.exp(log_z * n.to(real)[:, None, None]) * h0
    return h


def diag_step(h: torch.Tensor, u: torch.Tensor, dA: torch.Tensor, dB: torch.Tensor, C: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrent step: h' = Ā h + B̄ u, y = 2 Re(C h'). h: (b, S, M), u: (b, S) real. Returns (y (b, S), h')."""
    h = dA * h + dB * u.unsqueeze(-1).to(dB.dtype)
    return 2 * (C * h).sum(-1).real, h


# ---------------------------------------------------------------------------------------------------------------
# DPLR kernels (S4)
# ---------------------------------------------------------------------------------------------------------------


def _cauchy_block(dt: torch.Tensor, A: torch.Tensor, P: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  omega: torch.Tensor) -> torch.Tensor:
    """Generating function at the frequencies `omega` (F,): (..., S, F)."""
    onep, onem = 1 + omega, 1 - omega
    dt3 = dt[:, None, None]
    # 2 dt / (2 (1-ω) - dt λ (1+ω)) = (2/(1+ω)) (g(ω) - λ)^{-1} with g(ω) = (2/dt)(1-ω)/(1+ω): the bilinear map
    # of the frequency. Written this way it stays finite at ω = -1. One array per half of the conjugate pairs.
    c1 = 2 * dt3 / (2 * onem - dt3 * A.unsqueeze(-1) * onep)           # (S, M, F)
    c2 = 2 * dt3 / (2 * onem - dt3 * A.conj().unsqueeze(-1) * onep)

    # The four Cauchy sums k_ab = Σ_n a_n b_n / (g - λ_n) over the full conjugate-symmetric modes, for all pairs
    # at once (one batched product per half): (C̃, B), (C̃, P), (Q, B), (Q, P) with Q = conj(P).
    Q, lead, rank = P.conj(), B.shape[:-2], P.shape[0]
    S, M = A.shape
    pairs = [C * B, C * P, Q * B.unsqueeze(-3), Q.unsqueeze(1) * P.unsqueeze(0)]
    sizes = [pair.numel() // (S * M) for pair in pairs]
    v = torch.cat([pair.reshape(-1, S, M) for pair in pairs])
    sums = (torch.einsum("ksm,smf->ksf", v, c1) + torch.einsum("ksm,smf->ksf", v.conj(), c2)).split(sizes)
    F = omega.shape[0]
    k00 = sums[0].reshape(*lead, S, F)
    k01 = sums[1]                                                       # (R, S, F)
    k10 = sums[2].reshape(*lead, rank, S, F)
    k11 = sums[3].reshape(rank, rank, S, F)
    # Woodbury: C̃ (g - Λ + P Q*)^{-1} B = k00 - k01 (I + k11)^{-1} k10, with the factor 2/(1+ω) moved inside.
    if rank == 1:
        correction = k01[0] * k10[..., 0, :, :] / (2 + onep * k11[0, 0])
    else:
        system = 2 * torch.eye(rank, dtype=k11.dtype, device=k11.device) + onep[:, None, None] * k11.permute(2, 3, 0, 1)
        solved = torch.linalg.solve(system, k10.movedim((-3, -2, -1), (-1, -3, -2)).unsqueeze(-1)).squeeze(-1)
        correction = torch.einsum("rsf,...sfr->...sf", k01, solved)
    return k00 - onep * correction


def dplr_kernel(dt: torch.Tensor, A: torch.Tensor, P: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                length: int) -> torch.Tensor:
    """The length-L convolution kernel of a DPLR SSM, bilinear discretisation, by the Cauchy kernel.

    dt: (S,); A: (S, M) the diagonal Λ; P: (R, S, M) the low-rank part (A = Λ - P P*); B: (..., S, M); C: (S, M)
    the generating-function output vector C̃ = C (I - Ā^L) for this length L. Returns (..., S, L) real:
    K_k = C Ā^k B̄ for k < L. With B replaced by (I + ΔA/2) h / Δ it gives C Ā^(k+1) h, an initial state's output.
    """
    S, M = A.shape
    freqs = length // 2 + 1
    j = torch.arange(freqs, dtype=torch.float64, device=A.device)
    omega = torch.exp(-2j * math.pi * j / length).to(A.dtype)            # the first half of the L-th roots of unity
    parts = [_maybe_checkpoint(_cauchy_block, dt, A, P, B, C, omega[start:stop])
             for start, stop in _blocks(freqs, 2 * S * M * max(1, B[..., 0, 0].numel()))]
    return torch.fft.irfft(torch.cat(parts, dim=-1), n=length)


def dplr_state_input(h: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """(I + ΔA/2) h / Δ for a half state h (b, S, M): the `B` that makes `dplr_kernel` give C Ā^(k+1) h."""
    return (h + dt[:, None] / 2 * _apply_A(h, A, P)) / dt[:, None]


def _apply_A(h: torch.Tensor, A: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """(Λ - P P*) h on the full system, kept as its first half: P* h = 2 Re Σ_m conj(P_m) h_m is real."""
    q = 2 * torch.einsum("rsm,...sm->...rs", P.conj(), h).real
    return A * h - torch.einsum("rsm,...rs->...sm", P, q.to(P.dtype))


def dplr_dense(dt: torch.Tensor, A: torch.Tensor, P: torch.Tensor, B: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The full (N = 2M) bilinear-discretised matrices Ā (S, N, N) and B̄ (S, N) of a DPLR SSM, for the few
    places that need powers of Ā (the state after a chunk, C from C̃). O(S N^3); run them in complex128."""
    Pf = conj_full(P)                                                   # (R, S, N)
    A_full = torch.diag_embed(conj_full(A)) - torch.einsum("rsn,rsm->snm", Pf, Pf.conj())
    eye = torch.eye(A_full.shape[-1], dtype=A_full.dtype, device=A_full.device)
    half = dt[:, None, None].to(A_full.dtype) / 2 * A_full
    Abar = torch.linalg.solve(eye - half, eye + half)
    Bbar = dt[:, None] * torch.linalg.solve(eye - half, conj_full(B).unsqueeze(-1)).squeeze(-1)
    return Abar, Bbar


def extend_generating_c(C: torch.Tensor, Abar: torch.Tensor, length: int, target: int) -> torch.Tensor:
    """C̃ for length `length` -> C̃ for `target` = length·2^k, by C̃_2l = C̃_l (I + Ā^l). C: (S, M) half, Abar:
    (S, N, N) full. Returns (S, M)."""
    M = C.shape[-1]
    row = conj_full(C).unsqueeze(-2)                                    # (S, 1, N)
    power = torch.linalg.matrix_power(Abar, length)
    while length < target:
        row = row + row @ power
        power = power @ power
        length *= 2
    if length != target:
        raise ValueError(f"target length {target} is not the kernel length times a power of two")
    return row.squeeze(-2)[..., :M]


def c_from_generating_c(C: torch.Tensor, Abar: torch.Tensor, length: int) -> torch.Tensor:
    """The output vector C = C̃ (I - Ā^L)^{-1} of the recurrent view, from C̃ attuned to length L. (S, M)."""
    M = C.shape[-1]
    eye = torch.eye(Abar.shape[-1], dtype=Abar.dtype, device=Abar.device)
    system = (eye - torch.linalg.matrix_power(Abar, length)).transpose(-1, -2)
    return torch.linalg.solve(system, conj_full(C).unsqueeze(-1)).squeeze(-1)[..., :M]


def generating_c_from_c(C: torch.Tensor, Abar: torch.Tensor, length: int) -> torch.Tensor:
    """The inverse of `c_from_generating_c`: C̃ = C (I - Ā^L) attuned to length L, from the output vector C. C: (S, M)
    half, Abar: (S, N, N) full. Returns (S, M)."""
    M = C.shape[-1]
    row = conj_full(C).unsqueeze(-2)                                    # (S, 1, N)
    return (row - row @ torch.linalg.matrix_power(Abar, length)).squeeze(-2)[..., :M]


class DPLRStep(NamedTuple):
    """Precomputed quantities of the O(N) bilinear step of a DPLR SSM (see `dplr_step_setup`)."""

    half_dt: torch.Tensor       # (S, 1)
    dp: torch.Tensor            # 1 + ΔΛ/2: (S, M)
    dm_inv: torch.Tensor        # 1 / (1 - ΔΛ/2): (S, M)
    P: torch.Tensor             # (R, S, M)
    woodbury: torch.Tensor      # (I + Δ/2 P* diag(dm_inv) P)^{-1}: (S, R, R) real
    dt_B: torch.Tensor          # Δ B: (S, M)
    C: torch.Tensor             # the true C (not C̃): (S, M)


def dplr_step_setup(dt: torch.Tensor, A: torch.Tensor, P: torch.Tensor, B: torch.Tensor, C: torch.Tensor
                    ) -> DPLRStep:
    """Quantities for `dplr_step`; C is the true output vector (`c_from_generating_c`)."""
    half_dt = dt[:, None] / 2
    dm_inv = 1 / (1 - half_dt * A)
    gram = 2 * torch.einsum("rsm,qsm->srq", P.conj(), P * dm_inv).real  # P* diag(dm_inv) P over the full modes
    eye = torch.eye(P.shape[0], dtype=gram.dtype, device=gram.device)
    woodbury = torch.linalg.inv(eye + half_dt[..., None] * gram)
    return DPLRStep(half_dt, 1 + half_dt * A, dm_inv, P, woodbury, dt[:, None] * B, C)


def dplr_step(h: torch.Tensor, u: torch.Tensor, p: DPLRStep) -> tuple[torch.Tensor, torch.Tensor]:
    """One bilinear step h' = (I - ΔA/2)^{-1} ((I + ΔA/2) h + Δ B u) in O(M R), with A = Λ - P P*: the inverse by
    Woodbury's identity. h: (b, S, M), u: (b, S) real. Returns (y = 2 Re(C h') (b, S), h')."""
    q = 2 * torch.einsum("rsm,bsm->bsr", p.P.conj(), h).real
    v = p.dp * h - p.half_dt * torch.einsum("rsm,bsr->bsm", p.P, q.to(h.dtype)) + p.dt_B * u.unsqueeze(-1).to(h.dtype)
    w = v * p.dm_inv
    q = torch.einsum("srq,bsq->bsr", p.woodbury, 2 * torch.einsum("rsm,bsm->bsr", p.P.conj(), w).real)
    h = w - p.half_dt * p.dm_inv * torch.einsum("rsm,bsr->bsm", p.P, q.to(h.dtype))
    return 2 * (p.C * h).sum(-1).real, h


def dense_final_state(u: torch.Tensor, Abar: torch.Tensor, Bbar: torch.Tensor, h0: torch.Tensor | None = None,
                      steps: torch.Tensor | None = None, block: int | None = None) -> torch.Tensor:
    """The state after a chunk for a dense Ā: h = Ā^n h0 + Σ_k Ā^(L-1-k) B̄ u_k.

    u: (b, S, L) real, its real tokens at the end; Abar: (S, N, N); Bbar: (S, N); h0: (b, S, N) or None; steps:
    (b,) real tokens per row (default L). Blocks of T ≈ sqrt(L) tokens: each block's input enters through the
    Krylov vectors Ā^t B̄ (t < T) in one product, and blocks are chained by Ā^T, so the loop runs over L/T blocks
    and the work is O(L N) per SSM plus O(N^2 L/T). Returns (b, S, N)."""
    batch, _, length = u.shape
    dtype = Abar.dtype
    h = Bbar.new_zeros(batch, *Bbar.shape)
    if length:
        block = block or min(length, 1 << max(2, math.ceil(math.log2(length) / 2)))
        krylov, power = Bbar.unsqueeze(-1), Abar                         # columns Ā^t B̄, t = 0, 1, ...
        while krylov.shape[-1] < block:
            krylov = torch.cat([krylov, power @ krylov], dim=-1)
            power = power @ power
        weights = krylov[..., :block].flip(-1)                          # weights[..., t] = Ā^(T-1-t) B̄
        padded = torch.nn.functional.pad(u, ((-length) % block, 0)).to(dtype)
        blocks = padded.unflatten(-1, (-1, block))                      # (b, S, n_blocks, T)
        inputs = torch.einsum("snt,bsct->cbsn", weights, blocks)
        step = torch.linalg.matrix_power(Abar, block)
        for contribution in inputs:
            h = torch.einsum("snm,bsm->bsn", step, h) + contribution
    if h0 is not None:
        n = torch.full((batch,), length, device=u.device) if steps is None else steps
        h = h + _power_rows(h0.to(dtype), Abar, n)
    return h


def _power_rows(h: torch.Tensor, M: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Ā^(n_b) h_b for each row b, by binary powers of M: h (b, S, N), M (S, N, N), n (b,)."""
    base, bits = M, int(n.max()).bit_length() if n.numel() else 0
    for bit in range(bits):
        take = ((n >> bit) & 1).bool()[:, None, None]
        h = torch.where(take, torch.einsum("snm,bsm->bsn", base, h), h)
        base = base @ base
    return h


# ---------------------------------------------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------------------------------------------


def fft_conv(u: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Causal convolution y_k = Σ_{j≤k} K_{k-j} u_j by FFT of length 2L (no wrap-around), O(L log L).

    u: (b, S, L) real, kernel: (S, L) real. Returns (b, S, L)."""
    length = u.shape[-1]
    n = 2 * length
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(kernel, n=n), n=n)[..., :length]


__all__ = [
    "DPLRStep",
    "INITS",
    "NPLR",
    "c_from_generating_c",
    "conj_full",
    "dense_final_state",
    "diag_final_state",
    "diag_step",
    "discretize_diag",
    "dplr_dense",
    "dplr_kernel",
    "dplr_state_input",
    "dplr_step",
    "dplr_step_setup",
    "extend_generating_c",
    "fft_conv",
    "generating_c_from_c",
    "hippo_legs",
    "hippo_legs_nplr",
    "ssm_init",
    "vandermonde_kernel",
]
