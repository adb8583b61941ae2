"""S4 / S4D models: `S4Model`, `S4ForCausalLM`, `S4ForSequenceClassification`.

Parameter names: `backbone.embeddings`, `backbone.layers.N.norm` (LayerNorm), `backbone.layers.N.mixer.kernel.
{log_dt, log_A_real, A_imag, B, C, P}`, `backbone.layers.N.mixer.{D, output_linear}`, `backbone.norm_f` (with
`prenorm`), `lm_head` / `score`.

Relation to state-spaces/s4 checkpoints (for converters): the standalone S4D (`models/s4/s4d.py`: `kernel.log_dt`,
`kernel.log_A_real`, `kernel.A_imag`, `kernel.C`, `D`, `output_linear.0` a width-1 Conv1d) uses our conventions
exactly (A = -exp(log_A_real) + i A_imag; its B is 1, its Conv1d weight (2H, H, 1) is our Linear's (2H, H)). The
v4 kernels (`SSMKernelDiag` / `SSMKernelDPLR` under `layer.kernel`) write A = -exp(A_real) - i A_imag: copy
A_real to log_A_real and A_imag as is, and conjugate B, C and P (negate their [..., 1]), which swaps the two halves
of every conjugate pair; their `inv_dt` is log Δ for dt_transform="exp"; they share Δ, A, B, P across their
`channels` (our `num_ssm_copies`, SSM index copy * H + h as in their (channels, H) layout) and across H/n_ssm
groups, so those are repeated; their DPLR `C` is C̃ for the length in the `l_kernel` buffer (set l_max to it), or
the plain C when that buffer is 0. `ssm_hf/conversion/state_spaces_s4.py` implements this (`ssm-hf convert --from s4`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer

from ..configs.s4 import S4Config
from ..layers import S4Mixer
from .modeling_utils import init_module_weights
from .ssm_lm import (
    SSMForCausalLM,
    SSMForSequenceClassification,
    SSMModel,
    SSMPreTrainedModel,
)


class S4Block(GradientCheckpointingLayer):
    """Residual block of S4: x + dropout(mixer(norm(x))) with `prenorm`, else norm(x + dropout(mixer(x)));
    LayerNorm as in state-spaces."""

    def __init__(self, config: S4Config, mixer: nn.Module):
        super().__init__()
        self.prenorm = config.prenorm
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = mixer
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, hidden_states: torch.Tensor, cache_params: Cache | None = None,
        attention_mask: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None,
        padding_leads: bool = False,
    ) -> torch.Tensor:
        # (padding_leads, from the backbone's `mixer_padding`, is not used: S4 masks its inputs either way)
        if seq_idx is not None:
            raise NotImplementedError(
                "S4 / S4D do not support packed sequences (position_ids restarting inside a row, or seq_idx): the "
                "FFT convolution runs over the whole row and cannot reset at a sequence start. Pad the sequences "
                "instead (attention_mask), one per row."
            )
        residual = hidden_states
        if self.prenorm:
            hidden_states = self.norm(hidden_states)
        hidden_states = residual + self.dropout(
            self.mixer(hidden_states, cache_params=cache_params, attention_mask=attention_mask))
        return hidden_states if self.prenorm else self.norm(hidden_states)

    @staticmethod
    def final_norm(config: S4Config) -> nn.Module:
        """A last LayerNorm after pre-norm blocks; post-norm blocks already end normalised."""
        if config.prenorm:
            return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        return nn.Identity()


class S4PreTrainedModel(SSMPreTrainedModel):
    config_class = S4Config
    config: S4Config
    mixer_class = S4Mixer
    block_class = S4Block
    _no_split_modules = ["S4Block"]
    # loading in bf16/fp16 keeps the SSM parameters in float32 (as S4Kernel does on casting)
    _keep_in_fp32_modules_strict = ["kernel"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, S4Mixer):
            module.reset_ssm_parameters()
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        else:
            init_module_weights(module, self.config.initializer_range, None)


class S4Model(SSMModel, S4PreTrainedModel):
    """Embeddings → S4 blocks → final LayerNorm (pre-norm). Input (batch, seqlen) ids, output (batch, seqlen,
    hidden_size)."""


class S4ForCausalLM(SSMForCausalLM, S4PreTrainedModel):
    """S4 / S4D with a language-modelling head (tied to the embeddings by default)."""

    backbone_class = S4Model


class S4ForSequenceClassification(SSMForSequenceClassification, S4PreTrainedModel):
    """S4 / S4D with a classification head on the last real token or the mean of the real tokens
    (`config.classifier_pooling`)."""

    backbone_class = S4Model


__all__ = ["S4ForCausalLM", "S4ForSequenceClassification", "S4Model", "S4PreTrainedModel"]
