"""Mamba-2 (SSD) models: `Mamba2Model`, `Mamba2ForCausalLM`, `Mamba2ForSequenceClassification`."""

from __future__ import annotations

from ..configs.mamba2 import Mamba2Config
from ..layers import Mamba2Mixer
from .ssm_lm import (
    SSMForCausalLM,
    SSMForSequenceClassification,
    SSMModel,
    SSMPreTrainedModel,
)


class Mamba2PreTrainedModel(SSMPreTrainedModel):
    config_class = Mamba2Config
    config: Mamba2Config
    mixer_class = Mamba2Mixer


class Mamba2Model(SSMModel, Mamba2PreTrainedModel):
    """Embeddings → Mamba-2 blocks → final RMSNorm. Input (batch, seqlen) ids, output (batch, seqlen, hidden_size)."""


class Mamba2ForCausalLM(SSMForCausalLM, Mamba2PreTrainedModel):
    """Mamba-2 with a language-modelling head; state dicts match transformers' `Mamba2ForCausalLM`."""

    backbone_class = Mamba2Model


class Mamba2ForSequenceClassification(SSMForSequenceClassification, Mamba2PreTrainedModel):
    """Mamba-2 with a classification head on the last real token."""

    backbone_class = Mamba2Model


__all__ = ["Mamba2ForCausalLM", "Mamba2ForSequenceClassification", "Mamba2Model", "Mamba2PreTrainedModel"]
