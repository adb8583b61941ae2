"""Causal depthwise 1-D convolution in plain PyTorch, time-major, optionally followed by SiLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .packing import rows, segment_ids

# what may follow the conv inside the op (Mamba's conv is followed by SiLU; a fused kernel applies it in place)
ACTIVATIONS = (None, "silu")


def check_activation(activation: str | None) -> None:
    """ValueError unless `activation` is one the conv ops apply (None or "silu")."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"the causal conv ops apply activation None or 'silu'; got {activation!r}")


def _activate(out: torch.Tensor, activation: str | None) -> torch.Tensor:
    return F.silu(out) if activation == "silu" else out


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    past: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """Depthwise causal convolution of x: (batch, seqlen, channels) with weight: (channels, width), then
    `activation` (None or "silu").

    `past` (batch, channels, k) holds the k ≥ width − 1 inputs before x (the conv state of a cache); without it
    the sequence starts from zeros. `seq_idx` (batch or 1, seqlen) integers mark packed sequences (a new one
    wherever the id changes, see `packing`): a tap whose input belongs to another sequence reads zero, and `past`
    only feeds the row's first sequence.
    Returns (batch, seqlen, channels) in x's dtype.
    """
    check_activation(activation)
    channels, width = weight.shape
    seqlen = x.shape[1]
    inputs = x.transpose(1, 2).to(weight.dtype)
    if past is None:
        inputs = F.pad(inputs, (width - 1, 0))
    else:
        inputs = torch.cat([past[..., past.shape[-1] - (width - 1):].to(weight.dtype), inputs], dim=-1)
    if seq_idx is not None:
        seq_idx = rows(seq_idx, x.shape[0], seqlen)
        out = _masked_taps(inputs, weight, bias, seq_idx)
    else:
        out = F.conv1d(inputs, weight.unsqueeze(1), bias, groups=channels)[..., -seqlen:]
    return _activate(out, activation).transpose(1, 2).to(x.dtype)


def _masked_taps(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 seq_idx: torch.Tensor) -> torch.Tensor:
    """The conv as a sum over its `width` taps, each masked where its input lies in another sequence.
    inputs: (batch, channels, width - 1 + seqlen), the first width - 1 from `past` (or zeros). Returns
    (batch, channels, seqlen)."""
    width = weight.shape[-1]
    seqlen = seq_idx.shape[1]
    segments = segment_ids(seq_idx)
    # the inputs before x count as the first sequence's (segment 0): a cache continues only that one
    source = F.pad(segments, (width - 1, 0))
    out = 0
    for k in range(width):
        same = (source[:, k : k + seqlen] == segments).unsqueeze(1)            # (batch, 1, seqlen)
        out = out + weight[:, k, None] * inputs[..., k : k + seqlen] * same.to(inputs.dtype)
    if bias is not None:
        out = out + bias[:, None]
    return out


def causal_conv1d_update(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None = None, activation: str | None = None) -> torch.Tensor:
    """One decoding step. x: (batch, channels) the new input; conv_state: (batch, channels, S ≥ width - 1) the
    inputs before it, updated in place (shifted by one, x appended); weight: (channels, width).
    Returns the conv output (batch, channels), then `activation` (None or "silu")."""
    check_activation(activation)
    width = weight.shape[-1]
    window = torch.cat([conv_state[..., conv_state.shape[-1] - (width - 1):].to(weight.dtype),
                        x.unsqueeze(-1).to(weight.dtype)], dim=-1)
    out = (window * weight).sum(-1)
    if bias is not None:
        out = out + bias
    conv_state.copy_(torch.cat([conv_state[..., 1:], x.unsqueeze(-1).to(conv_state.dtype)], dim=-1))
    return _activate(out, activation).to(x.dtype)
