"""Normalisation layers."""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32 (float64 for float64 input), the normalised value rounded to the
    input's dtype before `weight`, the only parameter, multiplies it (as transformers' Llama/Mamba norms).
    x: (..., hidden_size).

    It is the gated norm's op without a gate and with one group: on CUDA one Triton kernel each way instead of
    about eight PyTorch ops forward and ten backward, per norm and step."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor, norm_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The norm of hidden_states cast to `norm_dtype` first (as `hidden_states.to(norm_dtype)`, with the cast
        inside the kernel: a block's float32 residual stream normed in its weight's dtype), or of hidden_states as
        they are."""
        if norm_dtype is None or norm_dtype == hidden_states.dtype:
            return kernels.rms_norm_gated(hidden_states, None, self.weight, hidden_states.shape[-1],
                                          self.variance_epsilon)
        return kernels.add_rms_norm(hidden_states, None, self.weight, self.variance_epsilon, norm_dtype=norm_dtype)[0]

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}"


class RMSNormGated(nn.Module):
    """RMS norm of x * silu(gate), computed per group of `group_size` channels (Mamba-2's output norm).

    x, gate: (..., hidden_size); hidden_size divisible by group_size."""

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.group_size = group_size

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        return kernels.rms_norm_gated(hidden_states, gate, self.weight, self.group_size, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, group_size={self.group_size}, eps={self.variance_epsilon}"
