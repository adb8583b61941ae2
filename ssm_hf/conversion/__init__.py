"""Checkpoint converters between ssm-hf and other formats."""

from .jamba import hybrid_to_jamba, jamba_to_hybrid
from .validation import check_state_dict

__all__ = ["check_state_dict", "hybrid_to_jamba", "jamba_to_hybrid"]
