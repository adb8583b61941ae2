"""PreTrainedModel classes and heads."""

from .hybrid import (
    HybridForCausalLM,
    HybridForSequenceClassification,
    HybridModel,
    HybridPreTrainedModel,
)
from .mamba import (
    MambaForCausalLM,
    MambaForSequenceClassification,
    MambaModel,
    MambaPreTrainedModel,
)
from .mamba2 import (
    Mamba2ForCausalLM,
    Mamba2ForSequenceClassification,
    Mamba2Model,
    Mamba2PreTrainedModel,
)
from .outputs import SSMCausalLMOutput, SSMModelOutput

__all__ = [
    "HybridForCausalLM",
    "HybridForSequenceClassification",
    "HybridModel",
    "HybridPreTrainedModel",
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
