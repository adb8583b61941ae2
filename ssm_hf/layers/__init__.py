"""Mixers and norms, built on `ssm_hf.kernels`."""

from .mamba_mixer import MambaMixer
from .norm import RMSNorm

__all__ = ["MambaMixer", "RMSNorm"]
