"""Scan and convolution ops used by the mixers. Each op is exposed once here; the layers call these names and
never branch on the device themselves.

`selective_scan` and `ssd_scan` run Triton kernels for CUDA tensors when Triton is installed, and the
PyTorch chunked forms otherwise; both compute the same function; so do the single-token decoding steps
`selective_state_update`, `ssd_state_update` and `causal_conv1d_update` (Triton only outside autograd), the
prefill conv `causal_conv1d`, Mamba-2's gated norm `rms_norm_gated` and the residual add + cast + RMS norm
`add_rms_norm` (the blocks' norm of their float32 stream). `conv_ssd_norm` is Mamba-2's conv, scan and norm in
one op (one autograd node on the Triton path).
Set the environment variable `SSM_HF_FORCE_REFERENCE=1` to run the PyTorch path everywhere (read at each call, for
debugging); `SSM_HF_TRITON_LAUNCH_CACHE=0` launches the Triton kernels through Triton's own path (see
`launch.FastLaunch`), and so runs the forwards that `plans.Planned` would replay as they are.

`selective_scan`, `ssd_scan` and `causal_conv1d` take `seq_idx` (batch or 1, seqlen) for packed sequences (several
sequences end to end in a row, a new one wherever the id changes, see `packing`): nothing crosses from one
sequence to the next.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import torch

from . import causal_conv1d_torch, norm_torch, selective_scan_torch, ssd_torch
from .conv_ssd_norm import Mamba2Shape, conv_ssd_norm_by_ops, gradient_through_cached_state
from .selective_scan_torch import selective_scan_chunked, selective_scan_sequential
from .ssd_torch import ssd_prepare_dt, ssd_scan_chunked, ssd_scan_sequential


@lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether Triton is installed (the `[gpu]` extra)."""
    return importlib.util.find_spec("triton") is not None


def use_triton(tensor: torch.Tensor) -> bool:
    """The Triton kernels run for CUDA tensors in float32/bf16/fp16, unless SSM_HF_FORCE_REFERENCE is set or Triton
    is missing (float64 keeps the PyTorch path, which computes in float64)."""
    return (tensor.is_cuda and tensor.dtype != torch.float64
            and os.environ.get("SSM_HF_FORCE_REFERENCE", "") in ("", "0") and triton_available())


def selective_scan(x: torch.Tensor, *args, **kwargs):
    """Mamba's selective scan; arguments and results as `selective_scan_chunked`, on the best path for x's device."""
    if use_triton(x):
        from .selective_scan_triton import selective_scan_triton

        return selective_scan_triton(x, *args, **kwargs)
    return selective_scan_chunked(x, *args, **kwargs)


def selective_state_update(state: torch.Tensor, x: torch.Tensor, *args, **kwargs):
    """One Mamba decoding step; arguments and results as `selective_scan_torch.selective_state_update`."""
    if use_triton(x) and not torch.is_grad_enabled():
        from .decode_triton import selective_state_update_triton

        return selective_state_update_triton(state, x, *args, **kwargs)
    return selective_scan_torch.selective_state_update(state, x, *args, **kwargs)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  past: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None,
                  activation: str | None = None) -> torch.Tensor:
    """Depthwise causal conv of x (batch, seqlen, channels), then `activation` (None or "silu"); as
    `causal_conv1d_torch.causal_conv1d`."""
    if use_triton(x):
        from .causal_conv1d_triton import causal_conv1d_triton

        return causal_conv1d_triton(x, weight, bias, past, seq_idx, activation)
    return causal_conv1d_torch.causal_conv1d(x, weight, bias, past, seq_idx, activation)


def causal_conv1d_update(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None = None, activation: str | None = None) -> torch.Tensor:
    """One step of the causal conv, `conv_state` updated in place, then `activation` (None or "silu"); as
    `causal_conv1d_torch.causal_conv1d_update`."""
    if use_triton(x) and not torch.is_grad_enabled():
        from .decode_triton import causal_conv1d_update_triton

        return causal_conv1d_update_triton(x, conv_state, weight, bias, activation)
    return causal_conv1d_torch.causal_conv1d_update(x, conv_state, weight, bias, activation)


def ssd_state_update(state: torch.Tensor, x: torch.Tensor, *args, **kwargs):
    """One Mamba-2 decoding step; arguments and results as `ssd_torch.ssd_state_update`."""
    if use_triton(x) and not torch.is_grad_enabled():
        from .decode_triton import ssd_state_update_triton

        return ssd_state_update_triton(state, x, *args, **kwargs)
    return ssd_torch.ssd_state_update(state, x, *args, **kwargs)


def rms_norm_gated(x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor, group_size: int,
                   eps: float) -> torch.Tensor:
    """weight * RMSNorm(x * silu(gate)) per group of channels; as `norm_torch.rms_norm_gated`."""
    if use_triton(x):
        from .norm_triton import rms_norm_gated_triton

        return rms_norm_gated_triton(x, gate, weight, group_size, eps)
    return norm_torch.rms_norm_gated(x, gate, weight, group_size, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 residual_dtype: torch.dtype | None = None, norm_dtype: torch.dtype | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A residual add, a cast and an RMS norm as one op: (RMSNorm(h cast to norm_dtype), h) for h = residual + x;
    as `norm_torch.add_rms_norm` (one Triton kernel each way on CUDA, for norm_dtype None, h's or the weight's)."""
    if use_triton(x) and norm_dtype in (None, weight.dtype, norm_torch.sum_dtype(x, residual, residual_dtype)):
        from .norm_triton import add_rms_norm_triton

        return add_rms_norm_triton(x, residual, weight, eps, residual_dtype, norm_dtype)
    return norm_torch.add_rms_norm(x, residual, weight, eps, residual_dtype, norm_dtype)


def ssd_scan(x: torch.Tensor, *args, **kwargs):
    """Mamba-2's SSD scan; arguments and results as `ssd_scan_chunked`, on the best path for x's device (Triton
    kernels forward and backward for CUDA tensors, see `ssd_triton`)."""
    if use_triton(x):
        from .ssd_triton import ssd_scan_triton

        return ssd_scan_triton(x, *args, **kwargs)
    return ssd_scan_chunked(x, *args, **kwargs)


def conv_ssd_norm(
    zxbcdt: torch.Tensor, shape: Mamba2Shape, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
    activation: str | None, dt_bias: torch.Tensor, A_log: torch.Tensor, D: torch.Tensor,
    dt_limit: tuple[float, float] | None, norm_weight: torch.Tensor, norm_group_size: int, eps: float,
    chunk_size: int, seq_idx: torch.Tensor | None = None, conv_past: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None, return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2's mixer core, in_proj's output (batch, seqlen, shape.width) → causal conv (+ SiLU) → SSD scan →
    gated RMS norm, optionally continued from a cached state and returning the scan's final state; arguments and
    results as `conv_ssd_norm.conv_ssd_norm_by_ops`. On the Triton path one autograd op (see
    `conv_ssd_norm_triton`), and with a cached state one op without autograd (a prefill that fills a cache);
    elsewhere, where the SSD kernels have no tiles for the shape, or where a gradient must flow with a cached
    state, the three ops one after the other."""
    if zxbcdt.shape[-1] != shape.width:
        raise ValueError(f"in_proj's output has {zxbcdt.shape[-1]} columns; {shape} needs {shape.width}")
    args = (zxbcdt, shape, conv_weight, conv_bias, activation, dt_bias, A_log, D, dt_limit, norm_weight,
            norm_group_size, eps, chunk_size, seq_idx, conv_past, initial_state, return_final_state)
    if gradient_through_cached_state(args):
        return conv_ssd_norm_by_ops(*args)
    if use_triton(zxbcdt) and zxbcdt.shape[1] > 0 and activation in (None, "silu"):
        from .ssd_triton import supports

        if supports(shape.d_state, shape.head_dim):
            from .conv_ssd_norm_triton import conv_ssd_norm_triton

            return conv_ssd_norm_triton(*args)
    return conv_ssd_norm_by_ops(*args)


__all__ = [
    "Mamba2Shape",
    "conv_ssd_norm",
    "causal_conv1d",
    "causal_conv1d_update",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_sequential",
    "selective_state_update",
    "rms_norm_gated",
    "ssd_prepare_dt",
    "ssd_scan",
    "ssd_scan_chunked",
    "ssd_scan_sequential",
    "ssd_state_update",
    "triton_available",
    "use_triton",
]
