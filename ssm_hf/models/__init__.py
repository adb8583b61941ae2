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
from .s4 import (
    S4ForCausalLM,
    S4ForSequenceClassification,
    S4Model,
    S4PreTrainedModel,
)
from .state import StateCache, StateSnapshot, load_snapshot, snapshot, stream

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
    "S4ForCausalLM",
    "S4ForSequenceClassification",
    "S4Model",
    "S4PreTrainedModel",
    "SSMCausalLMOutput",
    "SSMModelOutput",
    "StateCache",
    "StateSnapshot",
    "load_snapshot",
    "snapshot",
    "stream",
]
