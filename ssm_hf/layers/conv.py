"""The causal depthwise convolution of the Mamba mixers, continued from and saved to a transformers `Cache`."""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache

from .. import kernels


def cached_causal_conv(conv1d: nn.Conv1d, x: torch.Tensor, cache_params: Cache | None, layer_idx: int) -> torch.Tensor:
    """Depthwise causal conv of x: (batch, seqlen, channels), without activation.

    With a cache, the sequence continues from the layer's conv state (zeros before the first call), and the state
    is then replaced by the last `kernel_size` inputs.
    """
    past = cache_params.get_conv_state(layer_idx) if cache_params is not None else None
    out = kernels.causal_conv1d(x, conv1d.weight.squeeze(1), conv1d.bias, past=past)
    if cache_params is not None:
        # only after the conv: the cache overwrites its conv state in place
        cache_params.update_conv_state(x.transpose(1, 2), layer_idx, conv_kernel_size=conv1d.kernel_size[0])
    return out
