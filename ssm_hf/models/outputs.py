"""Output classes of the SSM models. The recurrent state travels as `cache` (transformers >= 5.24's name; before
5.24 the field is `cache_params`, as in transformers' Mamba, and `cache` reads it: see `cache_names`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput

from .cache_names import with_installed_cache_name


@with_installed_cache_name
@dataclass
class SSMModelOutput(ModelOutput):
    """last_hidden_state: (batch, seqlen, hidden_size); cache: the state after the last token (with
    `use_cache`); hidden_states: the input of each layer and the final normed output (with
    `output_hidden_states`)."""

    last_hidden_state: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@with_installed_cache_name
@dataclass
class SSMCausalLMOutput(ModelOutput):
    """loss: next-token cross-entropy (with `labels`); logits: (batch, seqlen, vocab_size) in lm_head's dtype;
    cache: as in `SSMModelOutput`."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
