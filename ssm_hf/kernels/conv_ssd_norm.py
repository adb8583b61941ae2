"""Mamba-2's mixer core as one op: in_proj's output → causal conv (+ SiLU) over (x, B, C) → SSD scan → gated RMS
norm with z. Here as the three ops one after the other (each on its best path); `conv_ssd_norm_triton` computes the
same function as one autograd op on the Triton kernels."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Mamba2Shape(NamedTuple):
    """How in_proj's output (batch, seqlen, d_inner + conv_dim + heads) divides: [z | x B C | Δ], with
    conv_dim = d_inner + 2 groups d_state, x = heads x head_dim = d_inner."""

    heads: int
    head_dim: int
    groups: int
    d_state: int

    @property
    def d_inner(self) -> int:
        return self.heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.groups * self.d_state

    @property
    def width(self) -> int:
        return self.d_inner + self.conv_dim + self.heads

    def split(self, zxbcdt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z, xBC, Δ) column views of zxbcdt: (batch, seqlen, width)."""
        return zxbcdt.split([self.d_inner, self.conv_dim, self.heads], dim=-1)

    def padding_as_identity_steps(self, zxbcdt: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """zxbcdt where padding: (batch, seqlen) is 0 replaced by zeros, except Δ by -inf: the conv reads zero
        inputs there and the scan takes identity steps (softplus(-inf) = 0, so Δ = 0 under a time-step limit whose
        lower end is 0). One op, on in_proj's output (batch, seqlen, width)."""
        fill = zxbcdt.new_zeros(self.width)
        fill[-self.heads:] = float("-inf")
        return torch.where(padding.unsqueeze(-1) == 0, fill, zxbcdt)

    def split_xBC(self, xBC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x (batch, seqlen, heads, head_dim), B, C (batch, seqlen, groups, d_state)) views of xBC."""
        group_state = self.groups * self.d_state
        x, B, C = xBC.split([self.d_inner, group_state, group_state], dim=-1)
        return (x.unflatten(-1, (self.heads, self.head_dim)), B.unflatten(-1, (self.groups, self.d_state)),
                C.unflatten(-1, (self.groups, self.d_state)))


def gradient_through_cached_state(args: tuple) -> bool:
    """Whether a call with `conv_ssd_norm_by_ops`'s positional arguments continues or fills a cache (conv_past,
    initial_state or return_final_state) while a gradient must flow into one of its tensors: the fused Triton op
    has no backward for that, the three ops one by one have."""
    (zxbcdt, _, conv_weight, conv_bias, _, dt_bias, A_log, D, _, norm_weight, _, _, _, _, conv_past, initial_state,
     return_final_state) = args
    if conv_past is None and initial_state is None and not return_final_state:
        return False
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (zxbcdt, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight, conv_past, initial_state))


def conv_ssd_norm_by_ops(
    zxbcdt: torch.Tensor, shape: Mamba2Shape, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
    activation: str | None, dt_bias: torch.Tensor, A_log: torch.Tensor, D: torch.Tensor,
    dt_limit: tuple[float, float] | None, norm_weight: torch.Tensor, norm_group_size: int, eps: float,
    chunk_size: int, seq_idx: torch.Tensor | None = None, conv_past: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None, return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """zxbcdt: (batch, seqlen, shape.width), in_proj's output. conv_weight: (conv_dim, width) or nn.Conv1d's
    (conv_dim, 1, width); activation None or "silu" after the conv; A = -exp(A_log) per head, Δ =
    clamp(softplus(Δ + dt_bias), dt_limit); D (heads,); norm_weight (d_inner,) over groups of norm_group_size
    channels. seq_idx: (batch or 1, seqlen) packed sequences or None. A cached state to continue from: conv_past
    (batch, conv_dim, k >= width - 1), the conv's inputs before zxbcdt's first token (no gradient flows into it),
    and initial_state (batch, heads, head_dim, d_state), the scan's. Returns the normed, gated scan output (batch,
    seqlen, d_inner) in the dtype of `norm_weight * y`, and with `return_final_state` also the scan's final state
    (batch, heads, head_dim, d_state) float32."""
    from . import causal_conv1d, rms_norm_gated, ssd_scan  # (the package's dispatching ops; it imports this module)

    z, xBC, dt = shape.split(zxbcdt)
    xBC = causal_conv1d(xBC, conv_weight.reshape(shape.conv_dim, -1), conv_bias, past=conv_past, seq_idx=seq_idx,
                        activation=activation)
    x, B, C = shape.split_xBC(xBC)
    A = -torch.exp(A_log.float())
    y, final = ssd_scan(x, dt, A, B, C, chunk_size, D, dt_bias, True, dt_limit, initial_state=initial_state,
                        return_final_state=True, seq_idx=seq_idx)
    out = rms_norm_gated(y.flatten(-2), z, norm_weight, norm_group_size, eps)
    return (out, final) if return_final_state else out
