"""ssm-hf: state space models for transformers.

Importing this package registers every architecture with transformers' Auto classes, so that
`AutoModelForCausalLM.from_pretrained(path)` loads an ssm-hf checkpoint like any other model.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from . import hub
from .configs import (
    HybridConfig,
    Mamba2Config,
    MambaConfig,
    S4Config,
    list_presets,
    preset_config,
)
from .models import (
    HybridForCausalLM,
    HybridForSequenceClassification,
    HybridModel,
    HybridPreTrainedModel,
    Mamba2ForCausalLM,
    Mamba2ForSequenceClassification,
    Mamba2Model,
    Mamba2PreTrainedModel,
    MambaForCausalLM,
    MambaForSequenceClassification,
    MambaModel,
    MambaPreTrainedModel,
    S4ForCausalLM,
    S4ForSequenceClassification,
    S4Model,
    S4PreTrainedModel,
    StateCache,
    StateSnapshot,
    load_snapshot,
    snapshot,
    stream,
)

__version__ = "0.1.0"


# config class -> (base model, causal LM, sequence classifier)
_ARCHITECTURES = {
    MambaConfig: (MambaModel, MambaForCausalLM, MambaForSequenceClassification),
    Mamba2Config: (Mamba2Model, Mamba2ForCausalLM, Mamba2ForSequenceClassification),
    HybridConfig: (HybridModel, HybridForCausalLM, HybridForSequenceClassification),
    S4Config: (S4Model, S4ForCausalLM, S4ForSequenceClassification),
}


def _register() -> None:
    # Our config classes share names with in-tree ones (MambaConfig, ...); transformers keys its Auto mappings by
    # class name for in-tree names, so exist_ok=True is needed. Lookups go by class identity first, so
    # transformers' own models keep resolving to their classes.
    for config_class, (base, causal_lm, classifier) in _ARCHITECTURES.items():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, base, exist_ok=True)
        AutoModelForCausalLM.register(config_class, causal_lm, exist_ok=True)
        AutoModelForSequenceClassification.register(config_class, classifier, exist_ok=True)
        for model_class in (base, causal_lm, classifier):
            # model.push_to_hub uploads what `ssm-hf push` uploads (model card, optional remote code); it is set here
            # because the models themselves must not import hub.py, which sits above them
            model_class.push_to_hub = hub.model_push_to_hub


_register()

__all__ = [
    "HybridConfig",
    "HybridForCausalLM",
    "HybridForSequenceClassification",
    "HybridModel",
    "HybridPreTrainedModel",
    "Mamba2Config",
    "Mamba2ForCausalLM",
    "Mamba2ForSequenceClassification",
    "Mamba2Model",
    "Mamba2PreTrainedModel",
    "MambaConfig",
    "MambaForCausalLM",
    "MambaForSequenceClassification",
    "MambaModel",
    "MambaPreTrainedModel",
    "S4Config",
    "S4ForCausalLM",
    "S4ForSequenceClassification",
    "S4Model",
    "S4PreTrainedModel",
    "StateCache",
    "StateSnapshot",
    "list_presets",
    "load_snapshot",
    "preset_config",
    "snapshot",
    "stream",
]
