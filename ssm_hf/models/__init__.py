"""PreTrainedModel classes and heads."""

from .mamba import MambaForCausalLM, MambaForSequenceClassification, MambaModel, MambaPreTrainedModel
from .outputs import SSMCausalLMOutput, SSMModelOutput

__all__ = [
    "MambaForCausalLM",
    "MambaForSequenceClassification",
    "MambaModel",
    "MambaPreTrainedModel",
    "SSMCausalLMOutput",
    "SSMModelOutput",
]
