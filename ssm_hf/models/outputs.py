"""Output classes of the SSM models. The recurrent state travels as `cache_params`, as in transformers' Mamba."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput


@dataclass
class SSMModelOutput(ModelOutput):
    """last_hidden_state: (batch, seqlen, hidden_size); cache_params: the state after the last token (with
    `use_cache`); hidden_states: the input of each layer and the final normed output (with
    `output_hidden_states`)."""

    last_hidden_state: torch.Tensor | None = None
    cache_params: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None

    @property
    def past_key_values(self) -> Cache | None:
        """The same cache, under the name transformers' generic code (e.g. chunked prefill) reads."""
        return self.cache_params


@dataclass
class SSMCausalLMOutput(ModelOutput):
    """loss: next-token cross-entropy (with `labels`); logits: (batch, seqlen, vocab_size) in float32."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache_params: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None

    @property
    def past_key_values(self) -> Cache | None:
        """The same cache, under the name transformers' generic code (e.g. chunked prefill) reads."""
        return self.cache_params
