"""The Mamba (selective SSM) mixer, with its recurrent state kept in a transformers `Cache`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache

from .. import kernels
from ..configs.mamba import MambaConfig
from .conv import cached_causal_conv, decoding_state, nothing_cached
from .norm import RMSNorm
from .offload import loaded_weights
from .ssm_init import inverse_softplus_dt


class MambaMixer(nn.Module):
    """in_proj → causal depthwise conv → selective scan (input-dependent Δ, B, C) gated by z → out_proj.

    Parameter names and shapes are those of transformers' `MambaMixer`, so state dicts move between the two.
    With a cache, the layer reads and writes its conv state (the last `conv_kernel` inputs of the conv) and its
    recurrent state (batch, intermediate_size, state_size) at `layer_idx`; a call with one token is one O(1)
    update, a longer call continues the sequence from the cached state.
    """

    def __init__(self, config: MambaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.ssm_state_size = config.state_size
        self.time_step_rank = int(config.time_step_rank)
        self.scan_chunk_size = config.scan_chunk_size
        self.hidden_act = config.hidden_act  # the conv's activation (SiLU fused into the conv ops)

        self.in_proj = nn.Linear(self.hidden_size, 2 * self.intermediate_size, bias=config.use_bias)
        self.conv1d = nn.Conv1d(
            self.intermediate_size, self.intermediate_size, kernel_size=config.conv_kernel,
            groups=self.intermediate_size, padding=config.conv_kernel - 1, bias=config.use_conv_bias,
        )
        self.x_proj = nn.Linear(self.intermediate_size, self.time_step_rank + 2 * self.ssm_state_size, bias=False)
        self.dt_proj = nn.Linear(self.time_step_rank, self.intermediate_size, bias=True)
        # A = -exp(A_log) is kept in log form so that it stays negative under training.
        self.A_log = nn.Parameter(torch.empty(self.intermediate_size, self.ssm_state_size))
        self.D = nn.Parameter(torch.empty(self.intermediate_size))
        self.out_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=config.use_bias)
        self.dt_init = dict(scale=config.time_step_scale, scheme=config.time_step_init_scheme,
                            low=config.time_step_min, high=config.time_step_max, floor=config.time_step_floor)
        if config.inner_layernorms:  # Jamba's variant; names as in transformers' JambaMambaMixer
            eps = config.layer_norm_epsilon if config.mixer_rms_eps is None else config.mixer_rms_eps
            self.dt_layernorm = RMSNorm(self.time_step_rank, eps=eps)
            self.b_layernorm = RMSNorm(self.ssm_state_size, eps=eps)
            self.c_layernorm = RMSNorm(self.ssm_state_size, eps=eps)
        self.inner_layernorms = config.inner_layernorms

    @torch.no_grad()
    def init_ssm_weights(self) -> None:
        """S4D-real init of A, D = 1, and Δ's bias so that softplus(bias) is log-uniform in [dt_min, dt_max]."""
        A = torch.arange(1, self.ssm_state_size + 1, dtype=torch.float32, device=self.A_log.device)
        init.copy_(self.A_log, torch.log(A).expand(self.intermediate_size, -1))
        init.ones_(self.D)
        dt_init_std = self.time_step_rank**-0.5 * self.dt_init["scale"]
        if self.dt_init["scheme"] == "constant":
            init.constant_(self.dt_proj.weight, dt_init_std)
        else:
            init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        init.copy_(self.dt_proj.bias,
                   inverse_softplus_dt(self.intermediate_size, self.dt_init, self.dt_proj.bias.device))

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache_params: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
        padding_leads: bool = False,
    ) -> torch.Tensor:
        """hidden_states: (batch, seqlen, hidden_size); attention_mask: (batch, ≥ seqlen), 1 for real tokens, its
        last `seqlen` columns apply. Padded positions contribute nothing: their inputs are zeroed and their Δ is
        0, so the state passes through them unchanged. padding_leads: every row's padding comes before its real
        tokens (`models.modeling_utils.mixer_padding`); with no state cached yet the conv then reads the zeroed
        padding as it is, which equals skipping it. seq_idx: (batch, seqlen) packed sequences (see
        `kernels.packing`): conv and scan restart at each new sequence. Returns (batch, seqlen, hidden_size)."""
        seqlen = hidden_states.shape[1]
        padding = attention_mask[:, -seqlen:] if attention_mask is not None else None    # (batch, seqlen)
        mask = padding.unsqueeze(-1).to(hidden_states.dtype) if padding is not None else None
        state, in_place = decoding_state(cache_params, self.layer_idx, seqlen)
        leading = mask is not None and padding_leads and nothing_cached(cache_params, self.layer_idx)

        # two views of one tensor, not copies: the Triton conv and scan read them in place, so their backward keeps
        # in_proj's output once
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)
        if mask is not None:
            x = x * mask
            if z.requires_grad:  # x is a new tensor now: a view of z alone would keep all of in_proj's output
                z = z.contiguous()

        # leading padding: zeros before the real tokens, as an empty cache's conv inputs are
        x = cached_causal_conv(self.conv1d, x, cache_params, self.layer_idx, None if leading else padding, seq_idx,
                               self.hidden_act)
        if mask is not None and not leading:
            x = x * mask

        dt, B, C = torch.split(self.x_proj(x), [self.time_step_rank, self.ssm_state_size, self.ssm_state_size], -1)
        if self.inner_layernorms:
            dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        with loaded_weights(self.dt_proj):  # read, not called: offloaded weights are loaded here
            dt = F.linear(dt, self.dt_proj.weight)
            dt_bias = self.dt_proj.bias  # the scan ops add it in float32 themselves (no cast op here)
        dt_softplus = True
        if leading:  # softplus(-inf) = 0: Δ = 0 on the padding, inside the scan
            dt = dt.masked_fill(mask == 0, float("-inf"))
        elif mask is not None:
            dt = F.softplus(dt.float() + dt_bias.float()) * mask.float()
            dt_bias, dt_softplus = None, False
        A = -torch.exp(self.A_log.float())

        if state is not None and seqlen == 1:
            y, new_state = kernels.selective_state_update(
                state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], self.D, z[:, 0],
                delta_bias=dt_bias, delta_softplus=dt_softplus, state_out=state if in_place else None,
            )
            y = y.unsqueeze(1)
        else:
            y, new_state = kernels.selective_scan(
                x, dt, A, B, C, self.D, z, delta_bias=dt_bias, delta_softplus=dt_softplus,
                initial_state=state, return_final_state=True, chunk_size=self.scan_chunk_size, seq_idx=seq_idx,
            )
        if cache_params is not None and not in_place:
            cache_params.update_recurrent_state(new_state, self.layer_idx)
        return self.out_proj(y)
