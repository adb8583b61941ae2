"""Causal self-attention with grouped-query heads and a KV cache, for the attention layers of hybrids."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache


def causal_padding_mask(
    attention_mask: torch.Tensor | None, query_length: int, past_length: int, device: torch.device,
    seq_idx: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean mask (batch or 1, 1, query_length, past_length + query_length), True where a query may attend.

    attention_mask: (batch, past_length + query_length) with 1 for real tokens, or (batch, query_length) to mean
    that the cached keys are all real. seq_idx: (batch, query_length) packed sequences (no past): the mask is then
    block-diagonal, each query attends to the earlier keys of its own sequence. Returns None when plain causal
    attention over all keys is right (no padding and a single query, or no padding and no past, which SDPA's
    `is_causal` covers). A query with no key to attend to (a left-padding position) attends to all keys instead,
    so that its (unused) output stays finite.
    """
    total = past_length + query_length
    if attention_mask is None:
        if seq_idx is None and (query_length == 1 or past_length == 0):
            return None
        key_valid = torch.ones(1, total, dtype=torch.bool, device=device)
    else:
        key_valid = attention_mask.to(device=device, dtype=torch.bool)
        if key_valid.shape[-1] == query_length and past_length:
            key_valid = F.pad(key_valid, (past_length, 0), value=True)
        if key_valid.shape[-1] != total:
            raise ValueError(
                f"attention_mask covers {key_valid.shape[-1]} positions, but the cache holds {past_length} and the "
                f"input {query_length}: pass a mask over all {total} (or only the {query_length} new) positions."
            )
    query_pos = torch.arange(past_length, total, device=device)[:, None]
    causal = torch.arange(total, device=device)[None, :] <= query_pos          # (query, key)
    allowed = causal[None] & key_valid[:, None, :]                               # (batch, query, key)
    if seq_idx is not None:
        if past_length:
            raise ValueError("Packed sequences (seq_idx) cannot continue from a KV cache.")
        allowed = allowed & (seq_idx[:, :, None] == seq_idx[:, None, :]).to(device)
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    return allowed.unsqueeze(1)


def apply_partial_rope(x: torch.Tensor, positions: torch.Tensor, rope_dim: int, theta: float) -> torch.Tensor:
    """Rotary position embedding on the first `rope_dim` channels of each head, the rest passed through.

    x: (batch, heads, seqlen, head_dim); positions: (seqlen,) or (batch, seqlen). Channel i < rope_dim/2 is paired
    with channel i + rope_dim/2 and the pair rotated by the angle position * theta^(-2i/rope_dim) (GPT-NeoX
    layout). Angles are computed in float32 and the result cast back to x's dtype."""
    half = rope_dim // 2
    inv_freq = theta ** -(torch.arange(half, device=x.device, dtype=torch.float32) * 2 / rope_dim)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq                    # (..., seqlen, half)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    if positions.dim() == 2:  # per row: broadcast over the heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    first, second, rest = x[..., :half], x[..., half:rope_dim], x[..., rope_dim:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin, rest], dim=-1)


class Attention(nn.Module):
    """Multi-head attention with `num_key_value_heads` ≤ `num_attention_heads` (grouped-query). No positional
    encoding by default (as in Jamba: the SSM layers carry order); with `attention_rope_dim` > 0, rotary
    embeddings on part of each head (as in mamba_ssm's MHA). Parameter names as in transformers' Jamba
    attention: q_proj, k_proj, v_proj, o_proj."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        self.rope_dim = config.attention_rope_dim
        self.rope_theta = config.attention_rope_theta
        qkv_bias = config.attention_qkv_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_out_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache_params: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states: (batch, seqlen, hidden_size); attention_mask: the boolean mask of `causal_padding_mask`
        (None for plain causal attention); positions: (batch, seqlen) rotary positions, by default those after
        the cached keys (packed sequences pass each token's position in its own sequence). With a cache, keys and
        values are appended to this layer's KV cache."""
        batch, seqlen, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, seqlen, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(batch, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        past = cache_params.get_seq_length(self.layer_idx) if cache_params is not None else 0
        has_past = past > 0
        if self.rope_dim:
            # positions continue after the cached keys; a left-padded row shifts all its real tokens alike,
            # which rotary attention scores do not see (they depend on position differences only)
            if positions is None:
                positions = torch.arange(past, past + seqlen, device=hidden_states.device)
            q = apply_partial_rope(q, positions, self.rope_dim, self.rope_theta)
            k = apply_partial_rope(k, positions, self.rope_dim, self.rope_theta)
        if cache_params is not None:
            k, v = cache_params.update(k, v, self.layer_idx)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=attention_mask is None and seqlen > 1 and not has_past,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seqlen, -1))
