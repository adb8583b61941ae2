"""Mamba (selective SSM) models: `MambaModel`, `MambaForCausalLM`, `MambaForSequenceClassification`."""

from __future__ import annotations

from ..configs.mamba import MambaConfig
from ..layers import MambaMixer
from .ssm_lm import (
    SSMForCausalLM,
    SSMForSequenceClassification,
    SSMModel,
    SSMPreTrainedModel,
)


class MambaPreTrainedModel(SSMPreTrainedModel):
    config_class = MambaConfig
    config: MambaConfig
    mixer_class = MambaMixer


class MambaModel(SSMModel, MambaPreTrainedModel):
    """Embeddings → Mamba blocks → final RMSNorm. Input (batch, seqlen) ids, output (batch, seqlen, hidden_size)."""


class MambaForCausalLM(SSMForCausalLM, MambaPreTrainedModel):
    """Mamba with a language-modelling head; state dicts match transformers' `MambaForCausalLM`."""

    backbone_class = MambaModel


class MambaForSequenceClassification(SSMForSequenceClassification, MambaPreTrainedModel):
    """Mamba with a classification head on the last real token."""

    backbone_class = MambaModel


__all__ = ["MambaForCausalLM", "MambaForSequenceClassification", "MambaModel", "MambaPreTrainedModel"]
