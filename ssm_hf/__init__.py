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

from .configs import MambaConfig, list_presets, preset_config
from .models import MambaForCausalLM, MambaForSequenceClassification, MambaModel, MambaPreTrainedModel

__version__ = "0.1.0"


def _register() -> None:
    # Our config classes share names with in-tree ones (MambaConfig); transformers keys its Auto mappings by class
    # name for in-tree names, so exist_ok=True is needed. Lookups go by class identity first, so transformers' own
    # Mamba keeps resolving to its classes.
    AutoConfig.register(MambaConfig.model_type, MambaConfig, exist_ok=True)
    AutoModel.register(MambaConfig, MambaModel, exist_ok=True)
    AutoModelForCausalLM.register(MambaConfig, MambaForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(MambaConfig, MambaForSequenceClassification, exist_ok=True)


_register()

__all__ = [
    "MambaConfig",
    "MambaForCausalLM",
    "MambaForSequenceClassification",
    "MambaModel",
    "MambaPreTrainedModel",
    "list_presets",
    "preset_config",
]
