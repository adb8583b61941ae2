"""Mixers and norms, built on `ssm_hf.kernels`."""

from .mamba2_mixer import Mamba2Mixer
from .mamba_mixer import MambaMixer
from .norm import RMSNorm, RMSNormGated

__all__ = ["Mamba2Mixer", "MambaMixer", "RMSNorm", "RMSNormGated"]
