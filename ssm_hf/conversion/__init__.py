"""Checkpoint converters between ssm-hf and other formats.

Folder to folder (what `ssm-hf convert` runs): `convert_checkpoint(src, out, from_format=... | to_format=...)`.
State dicts in memory: `mamba_ssm_to_ssm_hf` / `ssm_hf_to_mamba_ssm` (state-spaces mamba_ssm),
`transformers_to_ssm_hf` / `ssm_hf_to_transformers` (transformers' Mamba, FalconMamba, Mamba2, Jamba),
`jamba_to_hybrid` / `hybrid_to_jamba`, `s4_to_ssm_hf` (state-spaces S4 / S4D, into ssm-hf only).
"""

from .checkpoint_io import atomic_output, read_checkpoint, read_state_dict
from .folders import FROM_FORMATS, TO_FORMATS, convert_checkpoint
from .jamba import hybrid_to_jamba, jamba_to_hybrid
from .mamba_ssm import mamba_ssm_config_to_ssm_hf, mamba_ssm_to_ssm_hf, ssm_hf_config_to_mamba_ssm, ssm_hf_to_mamba_ssm
from .state_spaces_s4 import s4_config_to_ssm_hf, s4_to_ssm_hf
from .transformers_intree import ssm_hf_to_transformers, transformers_to_ssm_hf
from .validation import ConversionError, check_state_dict

__all__ = [
    "FROM_FORMATS",
    "TO_FORMATS",
    "ConversionError",
    "atomic_output",
    "check_state_dict",
    "convert_checkpoint",
    "hybrid_to_jamba",
    "jamba_to_hybrid",
    "mamba_ssm_config_to_ssm_hf",
    "mamba_ssm_to_ssm_hf",
    "read_checkpoint",
    "read_state_dict",
    "s4_config_to_ssm_hf",
    "s4_to_ssm_hf",
    "ssm_hf_config_to_mamba_ssm",
    "ssm_hf_to_mamba_ssm",
    "ssm_hf_to_transformers",
    "transformers_to_ssm_hf",
]
