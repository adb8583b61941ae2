"""Language models made of one SSM mixer per layer (Mamba, Mamba-2): the block, backbone and heads, written once.

A family supplies its config class and mixer class (see `mamba.py`, `mamba2.py`); parameter names follow
transformers' in-tree Mamba models: `backbone.embeddings`, `backbone.layers.N.{norm,mixer}`, `backbone.norm_f`,
`lm_head`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import slice_logits_to_keep

from ..layers import RMSNorm
from .cache_names import pick_cache
from .heads import LastTokenClassifierMixin
from .modeling_utils import (
    StrictLoadingMixin,
    cu_seq_lens_of,
    init_module_weights,
    mask_sequence_starts,
    mixer_padding,
    packed_seq_idx,
    start_backbone,
)
from .outputs import SSMCausalLMOutput, SSMModelOutput
from .state import StateCache, StateGenerationMixin


class SSMBlock(GradientCheckpointingLayer):
    """Pre-norm residual block: x + mixer(norm(x)), the residual kept in float32 if configured."""

    def __init__(self, config: PreTrainedConfig, mixer: nn.Module):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = mixer

    def forward(
        self, hidden_states: torch.Tensor, cache_params: Cache | None = None,
        attention_mask: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None,
        padding_leads: bool = False,
    ) -> torch.Tensor:
        residual = hidden_states
        # the norm of the stream cast to its weight's dtype (as transformers' Mamba), the cast inside its kernel
        hidden_states = self.norm(hidden_states, norm_dtype=self.norm.weight.dtype)
        if self.residual_in_fp32:
            residual = residual.to(torch.float32)
        return residual + self.mixer(hidden_states, cache_params=cache_params, attention_mask=attention_mask,
                                     seq_idx=seq_idx, padding_leads=padding_leads)

    @staticmethod
    def final_norm(config: PreTrainedConfig) -> nn.Module:
        """The norm after the last block (`backbone.norm_f`)."""
        return RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)


class SSMPreTrainedModel(StrictLoadingMixin, PreTrainedModel):
    """Shared by the families; each sets `config_class` and `mixer_class` (and `block_class` if its residual block
    differs from `SSMBlock`: it takes (config, mixer) and provides `final_norm(config)`)."""

    mixer_class: type[nn.Module]
    block_class: type[nn.Module] = SSMBlock
    base_model_prefix = "backbone"
    _no_split_modules = ["SSMBlock"]
    supports_gradient_checkpointing = True
    # transformers reads this flag only to refuse assisted decoding; our StateCache rolls back (`crop`)
    _is_stateful = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        config = self.config
        init_module_weights(module, config.initializer_range,
                            config.num_hidden_layers if config.rescale_prenorm_residual else None)


class SSMModel(SSMPreTrainedModel):
    """Embeddings → `num_hidden_layers` blocks of the family's mixer → final norm (RMSNorm for `SSMBlock`)."""

    def __init__(self, config: PreTrainedConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([self.block_class(config, self.mixer_class(config, layer_idx=i))
                                     for i in range(config.num_hidden_layers)])
        self.norm_f = self.block_class.final_norm(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.embeddings = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache_params: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        seq_idx: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple | SSMModelOutput:
        """input_ids: (batch, seqlen). `cache` (or `cache_params`, or `past_key_values`) continues from a previous
        state; with `use_cache`, the returned `cache` holds the state after the last token. Packed sequences
        (several per row, no cache): `position_ids` restarting at each one, as `DataCollatorWithFlattening` gives,
        or `seq_idx` (batch, seqlen), or flash attention's `cu_seq_lens_q` (the collator's
        `return_flash_attn_kwargs`); each sequence is then computed as if it were alone."""
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        # position_ids stays out of the signature: generate() would otherwise build them from a left-padding mask
        inputs_embeds, cache, seq_idx = start_backbone(
            self, input_ids, inputs_embeds, attention_mask, pick_cache(cache, cache_params, past_key_values),
            use_cache, kwargs.get("position_ids"), seq_idx, cu_seq_lens_of(kwargs))

        attention_mask, padding_leads = mixer_padding(attention_mask, inputs_embeds.shape[1], stateless=cache is None)
        hidden_states = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        for block in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = block(hidden_states, cache_params=cache, attention_mask=attention_mask, seq_idx=seq_idx,
                                  padding_leads=padding_leads)
        hidden_states = self.norm_f(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if isinstance(cache, StateCache):
            cache.advance(inputs_embeds.shape[1])

        if not return_dict:
            return tuple(v for v in (hidden_states, cache, all_hidden_states) if v is not None)
        return SSMModelOutput(last_hidden_state=hidden_states, cache=cache, hidden_states=all_hidden_states)


class SSMForCausalLM(SSMPreTrainedModel, StateGenerationMixin):
    """The backbone (`backbone_class`) with a language-modelling head, tied to the embeddings if configured.
    `generate()` can start from a given state (see `StateGenerationMixin`)."""

    backbone_class: type[SSMModel]
    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}
    _supports_graphed_decoding = True  # decoding steps replay a CUDA graph (ssm_hf.models.graphs)
    # PreTrainedModel comes first in the bases and has its own (torch.compile): take the mixin's
    get_compiled_call = StateGenerationMixin.get_compiled_call

    def __init__(self, config: PreTrainedConfig):
        super().__init__(config)
        self.backbone = self.backbone_class(config)
        # a config may ask for a bias (S4's `head_bias`, for checkpoints converted from state-spaces)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=getattr(config, "head_bias", False))
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.backbone.set_input_embeddings(new_embeddings)

    def prepare_inputs_for_generation(
        self, input_ids, inputs_embeds=None, use_cache=None, attention_mask=None,
        is_first_iteration: bool | None = False, **kwargs,
    ):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, inputs_embeds=inputs_embeds, use_cache=use_cache, attention_mask=attention_mask,
            is_first_iteration=is_first_iteration, **kwargs,
        )
        if use_cache and not is_first_iteration:
            # Once the prompt is in the state only the new (real) token is fed; its mask column is all ones.
            model_inputs["attention_mask"] = None
        return model_inputs

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache_params: Cache | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        seq_idx: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple | SSMCausalLMOutput:
        """labels: (batch, seqlen), shifted inside (pass labels = input_ids); -100 is ignored. Packed sequences:
        `position_ids`, `seq_idx` or `cu_seq_lens_q`, as for the backbone; the first token of each packed sequence
        is then never a target (see `mask_sequence_starts`)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if (input_ids is None) != (inputs_embeds is None):  # else the backbone says what is wrong
            inputs = input_ids if input_ids is not None else inputs_embeds
            seq_idx = packed_seq_idx(kwargs.get("position_ids"), seq_idx, *inputs.shape[:2], cu_seq_lens_of(kwargs))
        outputs = self.backbone(
            input_ids, inputs_embeds=inputs_embeds, cache=pick_cache(cache, cache_params, past_key_values),
            use_cache=use_cache, output_hidden_states=output_hidden_states, return_dict=True,
            attention_mask=attention_mask, seq_idx=seq_idx,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        # in lm_head's dtype, as transformers' Llama and Jamba give them: the loss and generate() cast to
        # float32 themselves; a float32 copy here took 10-12% of a prefill's GPU time (BENCHMARKS.md, 11th session)
        logits = self.lm_head(hidden_states.to(self.lm_head.weight.dtype))
        loss = None
        if labels is not None:
            labels, kwargs = mask_sequence_starts(labels, seq_idx, kwargs)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        if not return_dict:
            output = tuple(v for v in (logits, outputs.cache, outputs.hidden_states) if v is not None)
            return (loss,) + output if loss is not None else output
        return SSMCausalLMOutput(loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states)


class SSMForSequenceClassification(LastTokenClassifierMixin, SSMPreTrainedModel):
    """The backbone (`backbone_class`) with a linear `score` head on the last real token of each sequence (or the
    mean over its real tokens: `config.classifier_pooling`)."""

    backbone_class: type[SSMModel]
