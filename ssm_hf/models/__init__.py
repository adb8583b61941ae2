"""PreTrainedModel classes and heads."""

from .mamba import MambaForCausalLM, MambaForSequenceClassification, MambaModel, MambaPreTrainedModel
from .mamba2 import Mamba2ForCausalLM, Mamba2ForSequenceClassification, Mamba2Model, Mamba2PreTrainedModel
from .outputs import SSMCausalLMOutput, SSMModelOutput

__all__ = [
    "Mamba2ForCausalLM",
    "Mamba2ForSequenceClassification",
    "Mamba2Model",
    "Mamba2PreTrainedModel",
    "MambaForCausalLM",
    "MambaForSequenceClassification",
    "MambaModel",
    "MambaPreTrainedModel",
    "SSMCausalLMOutput",
    "SSMModelOutput",
]
