"""Mamba-2's gated RMS norm in plain PyTorch: the reference for `norm_triton`."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_gated(x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor, group_size: int,
                   eps: float) -> torch.Tensor:
    """weight * RMSNorm(x * silu(gate)), the norm taken over each group of `group_size` channels.

    x, gate: (..., hidden); weight: (hidden,). Computed in float32 (float64 for float64 input); the normalised
    value is rounded to x's dtype before the weight multiplies it, so the result has the dtype of `weight * x`."""
    input_dtype = x.dtype
    dtype = torch.float64 if input_dtype == torch.float64 else torch.float32
    u = x.to(dtype)
    if gate is not None:
        u = u * F.silu(gate.to(dtype))
    grouped = u.unflatten(-1, (-1, group_size))
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    return weight * grouped.flatten(-2).to(input_dtype)


def sum_dtype(x: torch.Tensor, residual: torch.Tensor | None, residual_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of `add_rms_norm`'s h: `residual_dtype` if given, else x's, or torch's promotion of x's and the
    residual's."""
    return residual_dtype or (x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype))


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 residual_dtype: torch.dtype | None = None, norm_dtype: torch.dtype | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A residual add, a cast and an RMS norm: h = residual + x (x alone without a residual), summed in
    float32 (or wider) and stored in `residual_dtype` if given, else in torch's promotion of the two dtypes; y =
    `rms_norm_gated` of h cast to `norm_dtype` (h's own dtype if None), no gate, one group. x, residual: (...,
    hidden); weight: (hidden,). Returns (y, h)."""
    h_dtype = sum_dtype(x, residual, residual_dtype)
    if residual is None:
        h = x.to(h_dtype)
    else:  # summed in float32 at least (torch's own sum of two bf16 tensors is that, rounded once)
        compute = torch.promote_types(torch.promote_types(x.dtype, residual.dtype), torch.float32)
        h = (residual.to(compute) + x.to(compute)).to(h_dtype)
    normed_input = h if norm_dtype is None else h.to(norm_dtype)
    return rms_norm_gated(normed_input, None, weight, h.shape[-1], eps), h
