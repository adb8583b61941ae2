"""Task heads shared by the model families."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedConfig
from transformers.modeling_outputs import SequenceClassifierOutput

from .modeling_utils import cu_seq_lens_of, last_token_indices, packed_seq_idx, real_token_mask

POOLINGS = ("last", "mean")


class LastTokenClassifierMixin:
    """Sequence classification shared by every family: the family's backbone (`backbone_class`) and a linear
    `score` head on a pooled hidden state. `config.classifier_pooling` (any family's config accepts it; default
    "last") chooses the last real token of each sequence or the mean over its real tokens; real tokens are found
    from the attention mask, else the pad id."""

    backbone_class: type
    _new_head_prefixes = ("score.",)

    def __init__(self, config: PreTrainedConfig):
        pooling = getattr(config, "classifier_pooling", "last")
        if pooling not in POOLINGS:
            raise ValueError(f"classifier_pooling={pooling!r} is not supported; choose one of {POOLINGS}.")
        super().__init__(config)
        self.num_labels = config.num_labels
        self.backbone = self.backbone_class(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=getattr(config, "head_bias", False))
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
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> tuple | SequenceClassifierOutput:
        """labels: (batch,) class ids, or floats for regression (`num_labels == 1`)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        inputs = input_ids if input_ids is not None else inputs_embeds
        if inputs is not None and packed_seq_idx(kwargs.get("position_ids"), kwargs.get("seq_idx"),
                                                 *inputs.shape[:2], cu_seq_lens_of(kwargs)) is not None:
            raise NotImplementedError("Sequence classification takes one sequence per row (one label each): packed "
                                      "sequences (position_ids restarting inside a row, seq_idx or cu_seq_lens_q) "
                                      "are not supported.")
        outputs = self.backbone(
            input_ids, inputs_embeds=inputs_embeds, use_cache=False, output_hidden_states=output_hidden_states,
            return_dict=True, attention_mask=attention_mask, position_ids=kwargs.get("position_ids"),
        )
        pooled = self.pool(outputs.last_hidden_state, input_ids, attention_mask)
        pooled_logits = self.score(pooled.to(self.score.weight.dtype)).float()
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=pooled_logits, labels=labels, pooled_logits=pooled_logits,
                                      config=self.config)
        if not return_dict:
            output = (pooled_logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return (loss,) + output if loss is not None else output
        return SequenceClassifierOutput(loss=loss, logits=pooled_logits, hidden_states=outputs.hidden_states)

    def pool(self, hidden_states: torch.Tensor, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None
             ) -> torch.Tensor:
        """(batch, seqlen, hidden) -> (batch, hidden): the last real token, or the mean over the real tokens."""
        batch_size, seqlen = hidden_states.shape[:2]
        args = (input_ids, attention_mask, self.config.pad_token_id, batch_size, seqlen, hidden_states.device)
        if getattr(self.config, "classifier_pooling", "last") == "mean":
            real = real_token_mask(*args).unsqueeze(-1)
            # where(), not a product: outputs at padded positions are arbitrary and may not even be finite
            total = torch.where(real, hidden_states, 0).sum(1, dtype=torch.float32)
            return (total / real.sum(1).clamp(min=1)).to(hidden_states.dtype)
        last = last_token_indices(*args)
        return hidden_states[torch.arange(batch_size, device=hidden_states.device), last]


