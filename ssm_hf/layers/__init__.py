"""Mixers and norms, built on `ssm_hf.kernels`."""

from .mamba2_mixer import Mamba2Mixer
from .mamba_mixer import MambaMixer
from .norm import RMSNorm, RMSNormGated
from .s4_mixer import S4Mixer

__all__ = ["Mamba2Mixer", "MambaMixer", "RMSNorm", "RMSNormGated", "S4Mixer"]
