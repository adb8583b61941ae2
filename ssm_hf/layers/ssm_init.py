"""Initialisation shared by the SSM mixers."""

from __future__ import annotations

import math

import torch


def inverse_softplus_dt(size: int, dt_init: dict, device: torch.device) -> torch.Tensor:
    """A bias b with softplus(b) log-uniform in [dt_init["low"], dt_init["high"]], clamped below at
    dt_init["floor"]: the Mamba initialisation of Δ. Returns (size,) float32."""
    log_low, log_high = math.log(dt_init["low"]), math.log(dt_init["high"])
    dt = torch.exp(torch.rand(size, device=device) * (log_high - log_low) + log_low).clamp(min=dt_init["floor"])
    return dt + torch.log(-torch.expm1(-dt))
