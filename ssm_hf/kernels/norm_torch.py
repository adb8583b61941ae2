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
