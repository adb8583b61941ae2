"""The Mamba-2 mixer (SSD), with its recurrent state kept in a transformers `Cache`."""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache

from .. import kernels
from ..configs.mamba2 import Mamba2Config
from .conv import cached_causal_conv, decoding_state, keep_conv_inputs, nothing_cached
from .norm import RMSNormGated
from .offload import loaded_weights
from .ssm_init import inverse_softplus_dt


class Mamba2Mixer(nn.Module):
    """in_proj → [z | x B C | Δ]; causal depthwise conv over (x, B, C); SSD scan per head; gated RMSNorm with z;
    out_proj.

    Parameter names and shapes are those of transformers' `Mamba2Mixer`. The cache holds the conv state (last
    `conv_kernel` inputs of the conv) and the recurrent state (batch, num_heads, head_dim, state_size).
    """

    def __init__(self, config: Mamba2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.n_groups = config.n_groups
        self.ssm_state_size = config.state_size
        self.intermediate_size = config.intermediate_size
        self.chunk_size = config.chunk_size
        self.time_step_limit = tuple(config.time_step_limit)
        self.hidden_act = config.hidden_act  # the conv's activation (SiLU fused into the conv ops)
        self.layout = kernels.Mamba2Shape(self.num_heads, self.head_dim, self.n_groups, self.ssm_state_size)
        self.conv_dim = self.layout.conv_dim

        self.in_proj = nn.Linear(config.hidden_size, self.intermediate_size + self.conv_dim + self.num_heads,
                                 bias=config.use_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel_size=config.conv_kernel, groups=self.conv_dim,
                                padding=config.conv_kernel - 1, bias=config.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm = RMSNormGated(self.intermediate_size, group_size=self.intermediate_size // self.n_groups,
                                 eps=config.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.intermediate_size, config.hidden_size, bias=config.use_bias)
        self.dt_init = dict(low=config.time_step_min, high=config.time_step_max, floor=config.time_step_floor)

    @torch.no_grad()
    def init_ssm_weights(self) -> None:
        """A_h = -h (h = 1..num_heads), D = 1, Δ's bias so that softplus(bias) is log-uniform in [dt_min, dt_max]."""
        init.copy_(self.A_log, torch.log(torch.arange(1, self.num_heads + 1, dtype=torch.float32,
                                                      device=self.A_log.device)))
        init.ones_(self.D)
        init.copy_(self.dt_bias, inverse_softplus_dt(self.num_heads, self.dt_init, self.dt_bias.device))

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache_params: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
        padding_leads: bool = False,
    ) -> torch.Tensor:
        """hidden_states: (batch, seqlen, hidden_size); attention_mask: (batch, ≥ seqlen), its last `seqlen`
        columns apply; padded positions leave the state unchanged. padding_leads: every row's padding comes before
        its real tokens (`models.modeling_utils.mixer_padding`); with no state cached yet the padding is then read
        as zero inputs and identity steps, which equals skipping it, on the unpadded path (the fused op). seq_idx:
        (batch, seqlen) packed sequences (see `kernels.packing`): conv and scan restart at each new sequence.
        Returns (batch, seqlen, hidden_size)."""
        batch, seqlen, _ = hidden_states.shape
        padding = attention_mask[:, -seqlen:] if attention_mask is not None else None    # (batch, seqlen)

        zxbcdt = self.in_proj(hidden_states)
        if (padding is not None and padding_leads and self.time_step_limit[0] <= 0
                and nothing_cached(cache_params, self.layer_idx)):
            zxbcdt, padding = self.layout.padding_as_identity_steps(zxbcdt, padding), None
        mask = padding.unsqueeze(-1).to(hidden_states.dtype) if padding is not None else None
        state, in_place = decoding_state(cache_params, self.layer_idx, seqlen)
        if mask is None and self.hidden_act in ("silu", "swish") and not (state is not None and seqlen == 1):
            # conv, scan and norm as one op: one autograd node on the Triton path without a cache (training, or a
            # forward with use_cache=False), one op without autograd for a prefill that fills or continues a cache
            # (`self.norm` is read, not called: hooks on it do not run here)
            with loaded_weights(self.conv1d, self.norm):
                args = (zxbcdt, self.layout, self.conv1d.weight, self.conv1d.bias, "silu", self.dt_bias, self.A_log,
                        self.D, self.time_step_limit, self.norm.weight, self.norm.group_size,
                        self.norm.variance_epsilon, self.chunk_size, seq_idx)
                if cache_params is None:
                    y = kernels.conv_ssd_norm(*args)
                else:
                    y, new_state = kernels.conv_ssd_norm(*args, conv_past=cache_params.get_conv_state(self.layer_idx),
                                                         initial_state=state, return_final_state=True)
                    keep_conv_inputs(cache_params, self.layer_idx, self.layout.split(zxbcdt)[1],
                                     self.conv1d.kernel_size[0])
                    cache_params.update_recurrent_state(new_state, self.layer_idx)
            return self.out_proj(y.to(hidden_states.dtype))

        # views of one tensor, not copies: the Triton conv reads xBC and the gated norm z in place, so their backward
        # keeps in_proj's output once (Δ's columns with it)
        z, xBC, dt = self.layout.split(zxbcdt)
        if mask is not None:
            xBC = xBC * mask
            if z.requires_grad:  # xBC is a new tensor now: a view of z alone would keep all of in_proj's output
                z = z.contiguous()

        xBC = cached_causal_conv(self.conv1d, xBC, cache_params, self.layer_idx, padding, seq_idx, self.hidden_act)
        if mask is not None:
            xBC = xBC * mask

        # views again: the Triton scan reads x, B, C and the raw Δ in place and applies Δ's bias, softplus and limit
        # itself (no copies, no Δ ops here)
        x, B, C = self.layout.split_xBC(xBC)
        A = -torch.exp(self.A_log.float())
        dt_bias, dt_softplus, dt_limit = self.dt_bias, True, self.time_step_limit
        if mask is not None:
            dt = kernels.ssd_prepare_dt(dt, self.dt_bias, True, self.time_step_limit) * mask.float()
            dt_bias, dt_softplus, dt_limit = None, False, None

        if state is not None and seqlen == 1:
            y, new_state = kernels.ssd_state_update(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], self.D,
                                                    dt_bias, dt_softplus, dt_limit,
                                                    state_out=state if in_place else None)
            y = y.unsqueeze(1)
        else:
            y, new_state = kernels.ssd_scan(x, dt, A, B, C, self.chunk_size, self.D, dt_bias, dt_softplus, dt_limit,
                                            initial_state=state, return_final_state=True, seq_idx=seq_idx)
        if cache_params is not None and not in_place:
            cache_params.update_recurrent_state(new_state, self.layer_idx)
        y = self.norm(y.flatten(-2), z)
        return self.out_proj(y.to(hidden_states.dtype))
