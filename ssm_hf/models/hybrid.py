"""Hybrid models (Jamba-style): per layer a Mamba, Mamba-2 or attention mixer, then a dense or MoE MLP.

Parameter names: `backbone.embeddings`, `backbone.layers.N.{norm, mixer, ffn_norm, ffn}`, `backbone.norm_f`,
`lm_head`; the mixers are the same modules as in the pure Mamba / Mamba-2 models, the attention and MoE weights
are laid out as in transformers' Jamba (see `ssm_hf.conversion.jamba`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
)
from transformers.modeling_utils import slice_logits_to_keep

from ..configs.hybrid import HybridConfig
from ..kernels.packing import positions_in_sequence
from ..layers import Mamba2Mixer, MambaMixer, RMSNorm
from ..layers.attention import Attention, causal_padding_mask
from ..layers.mlp import GatedMLP, MoE, load_balancing_loss
from .cache_names import CACHE_NAME, output_cache, pick_cache
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
from .state import StateCache, StateGenerationMixin


class HybridBlock(GradientCheckpointingLayer):
    """x + mixer(norm(x)), then x + ffn(ffn_norm(x)) (skipped for MLP type "none"). Returns (hidden_states,
    router_logits or None)."""

    def __init__(self, config: HybridConfig, layer_idx: int, mixer: nn.Module):
        super().__init__()
        self.is_attention = isinstance(mixer, Attention)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mixer = mixer
        mlp_type = config.layers_mlp_type[layer_idx]
        self.ffn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if mlp_type != "none" else None
        if mlp_type == "moe":
            self.ffn = MoE(config.hidden_size, config.intermediate_size, config.num_experts,
                           config.num_experts_per_tok, config.hidden_act)
        elif mlp_type == "dense":
            self.ffn = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        else:
            self.ffn = None

    def forward(
        self, hidden_states: torch.Tensor, cache_params: Cache | None = None,
        attention_mask: torch.Tensor | None = None, attention_bias: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None, positions: torch.Tensor | None = None, padding_leads: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """attention_mask: (batch, seqlen) padding mask for SSM mixers, padding_leads whether its padding comes
        before every real token (`modeling_utils.mixer_padding`); attention_bias: the boolean (batch, 1, query, key)
        mask for attention mixers (block-diagonal for packed sequences); seq_idx: (batch, seqlen) packed sequences
        for SSM mixers; positions: rotary positions for attention mixers (None: after the cached keys)."""
        if self.is_attention:
            mixed = self.mixer(self.norm(hidden_states), cache_params=cache_params, attention_mask=attention_bias,
                               positions=positions)
        else:
            mixed = self.mixer(self.norm(hidden_states), cache_params=cache_params, attention_mask=attention_mask,
                               seq_idx=seq_idx, padding_leads=padding_leads)
        hidden_states = hidden_states + mixed
        if self.ffn is None:
            return hidden_states, None
        out = self.ffn(self.ffn_norm(hidden_states))
        router_logits = None
        if isinstance(out, tuple):
            out, router_logits = out
        return hidden_states + out, router_logits


class HybridPreTrainedModel(StrictLoadingMixin, PreTrainedModel):
    config_class = HybridConfig
    config: HybridConfig
    base_model_prefix = "backbone"
    _no_split_modules = ["HybridBlock"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    # transformers reads this flag only to refuse assisted decoding; our StateCache rolls back (`crop`)
    _is_stateful = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        init_module_weights(module, self.config.initializer_range, None)


class HybridModel(HybridPreTrainedModel):
    """Embeddings → hybrid blocks → final RMSNorm."""

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        for name in ("layers_block_type", "layers_mlp_type"):
            if len(getattr(config, name)) != config.num_hidden_layers:
                raise ValueError(f"HybridConfig.{name} lists {len(getattr(config, name))} layers but num_hidden_layers "
                                 f"is {config.num_hidden_layers}: change both together.")
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        sub_configs = {}
        if "mamba" in config.layers_block_type:
            sub_configs["mamba"] = config.mamba_config()
        if "mamba2" in config.layers_block_type:
            sub_configs["mamba2"] = config.mamba2_config()
        mixer_classes = {"mamba": MambaMixer, "mamba2": Mamba2Mixer}
        blocks = []
        for i, kind in enumerate(config.layers_block_type):
            mixer = (Attention(config, i) if kind == "attention"
                     else mixer_classes[kind](sub_configs[kind], layer_idx=i))
            blocks.append(HybridBlock(config, i, mixer))
        self.layers = nn.ModuleList(blocks)
        self.norm_f = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.embeddings = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        cache_params: Cache | None = None,
        seq_idx: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple | MoeModelOutputWithPast:
        """input_ids: (batch, seqlen); attention_mask: (batch, past + seqlen) with 1 for real tokens. The state
        comes in as `cache` (or `past_key_values`, `cache_params`) and goes out under the installed transformers'
        name (`cache` from 5.24, `past_key_values` before).
        router_logits (with `output_router_logits`): one (batch * seqlen, num_experts) tensor per MoE layer.
        Packed sequences (several per row, no cache): `position_ids` restarting at each one, as
        `DataCollatorWithFlattening` gives, or `seq_idx` (batch, seqlen), or flash attention's `cu_seq_lens_q` (the
        collator's `return_flash_attn_kwargs`); SSM layers restart their state and attention layers attend within
        each sequence only."""
        config = self.config
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        output_router_logits = (output_router_logits if output_router_logits is not None
                                else config.output_router_logits)
        return_dict = return_dict if return_dict is not None else config.return_dict
        # position_ids stays out of the signature: generate() would otherwise build them from a left-padding mask
        inputs_embeds, cache, seq_idx = start_backbone(
            self, input_ids, inputs_embeds, attention_mask, pick_cache(cache, cache_params, past_key_values),
            use_cache, kwargs.get("position_ids"), seq_idx, cu_seq_lens_of(kwargs))

        seqlen = inputs_embeds.shape[1]
        attention_bias = None
        if "attention" in config.layers_block_type:
            past = cache.get_seq_length() if cache is not None else 0
            attention_bias = causal_padding_mask(attention_mask, seqlen, past, inputs_embeds.device, seq_idx)
        # packed sequences: rotary positions restart with each sequence, as when it runs alone
        positions = positions_in_sequence(seq_idx) if seq_idx is not None else None
        # (the attention layers take the bias made from the whole mask above; the SSM mixers this)
        attention_mask, padding_leads = mixer_padding(attention_mask, seqlen, stateless=cache is None)

        hidden_states = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        all_router_logits = ()
        for block in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states, router_logits = block(hidden_states, cache_params=cache, attention_mask=attention_mask,
                                                 attention_bias=attention_bias, seq_idx=seq_idx, positions=positions,
                                                 padding_leads=padding_leads)
            if router_logits is not None:
                all_router_logits += (router_logits,)
        hidden_states = self.norm_f(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if isinstance(cache, StateCache):
            cache.advance(seqlen)

        output = MoeModelOutputWithPast(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states,
            router_logits=all_router_logits if (output_router_logits or self.training) else None,
            **{CACHE_NAME: cache},
        )
        return output if return_dict else output.to_tuple()


class HybridForCausalLM(HybridPreTrainedModel, StateGenerationMixin):
    """Hybrid backbone with a language-modelling head; adds `router_aux_loss_coef` x the load-balancing loss to
    the LM loss when training (or when `output_router_logits`), weighted by `aux_loss_share` when Trainer passes
    `num_items_in_batch`. `generate()` can start from a given state (see `StateGenerationMixin`), with or without
    attention layers."""

    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}
    # PreTrainedModel comes first in the bases and has its own (torch.compile); decoding stays eager here
    get_compiled_call = StateGenerationMixin.get_compiled_call

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.backbone = HybridModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.backbone.set_input_embeddings(new_embeddings)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache_params: Cache | None = None,
        seq_idx: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple | MoeCausalLMOutputWithPast:
        """labels: (batch, seqlen), shifted inside (pass labels = input_ids); -100 is ignored. Packed sequences:
        `position_ids`, `seq_idx` or `cu_seq_lens_q`, as for the backbone; the first token of each packed sequence
        is then never a target (see `mask_sequence_starts`)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if (input_ids is None) != (inputs_embeds is None):  # else the backbone says what is wrong
            inputs = input_ids if input_ids is not None else inputs_embeds
            seq_idx = packed_seq_idx(kwargs.get("position_ids"), seq_idx, *inputs.shape[:2], cu_seq_lens_of(kwargs))
        outputs = self.backbone(
            input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            cache=pick_cache(cache, cache_params, past_key_values), use_cache=use_cache,
            output_hidden_states=output_hidden_states, output_router_logits=output_router_logits, return_dict=True,
            seq_idx=seq_idx,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        # in lm_head's dtype, as transformers' Llama and Jamba give them: the loss and generate() cast to
        # float32 themselves; a float32 copy here took 10-12% of a prefill's GPU time (BENCHMARKS.md, 11th session)
        logits = self.lm_head(hidden_states.to(self.lm_head.weight.dtype))
        loss = aux_loss = None
        if outputs.router_logits:
            seqlen = outputs.last_hidden_state.shape[1]
            mask = attention_mask[:, -seqlen:] if attention_mask is not None else None
            aux_loss = load_balancing_loss(outputs.router_logits, self.config.num_experts_per_tok, mask)
        if labels is not None:
            labels, kwargs = mask_sequence_starts(labels, seq_idx, kwargs)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if aux_loss is not None:
                # counted once per optimizer step under Trainer, whatever the processes and accumulation steps
                share = aux_loss_share(labels, kwargs.get("num_items_in_batch"), kwargs.get("shift_labels"),
                                       loss.device)
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device) * share
        output = MoeCausalLMOutputWithPast(
            loss=loss, aux_loss=aux_loss, logits=logits, hidden_states=outputs.hidden_states,
            router_logits=outputs.router_logits, **{CACHE_NAME: output_cache(outputs)},
        )
        return output if return_dict else output.to_tuple()


def aux_loss_share(
    labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None, shift_labels: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor | float:
    """The weight of this forward's load-balancing loss: 1 for a plain call, and this forward's share of the
    optimizer step's label tokens when the caller normalises the LM loss by `num_items_in_batch` (Trainer does).

    Why: with `num_items_in_batch` (the labelled tokens of every micro-batch of the optimizer step, and of every
    process when `average_tokens_across_devices` is on, the default), transformers' Trainer (5.23, `compute_loss`
    and `training_step`) does not divide the loss by the gradient accumulation steps and multiplies it by the
    number of processes, which DDP / FSDP's gradient averaging undoes. That is right for the LM loss (a sum over
    tokens / num_items_in_batch), but a per-forward mean such as the load-balancing loss, added as is, counts
    (accumulation steps x processes) times. Mixtral, Jamba and Qwen3-MoE in transformers 5.23 add it as is
    (huggingface/transformers#48690 reports the DDP half). Weighted by its share of the step's tokens
    (labels / num_items_in_batch, which sum to 1 over the step's micro-batches, over all processes or per process
    as Trainer counts them), it enters each optimizer step once, as the token-weighted mean of the micro-batches'
    load-balancing losses, whatever the number of processes and accumulation steps. The statistics stay those of
    each forward (as in Jamba / Mixtral, not a global-batch balance), so N processes equal one process with N
    accumulation steps over the same micro-batches exactly, and one process over the whole batch in one forward
    up to the difference between the micro-batches' routing statistics and the whole batch's.
    labels: (batch, seqlen) unshifted, or `shift_labels` (batch, seqlen) as Trainer counts them when given; the
    share is returned on `device` (the loss's)."""
    if num_items_in_batch is None:
        return 1.0
    counted = shift_labels if shift_labels is not None else labels[..., 1:]  # the tokens Trainer counts
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(device)
    return counted.ne(-100).sum().to(device) / num_items_in_batch


class HybridForSequenceClassification(LastTokenClassifierMixin, HybridPreTrainedModel):
    """Hybrid backbone with a linear `score` head on the last real token of each sequence."""

    backbone_class = HybridModel


__all__ = ["HybridForCausalLM", "HybridForSequenceClassification", "HybridModel", "HybridPreTrainedModel"]
