"""The causal depthwise convolution of the Mamba mixers, continued from and saved to a transformers `Cache`."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache

from .. import kernels
from .offload import loaded_weights


def decoding_state(cache_params: Cache | None, layer_idx: int, seqlen: int) -> tuple[torch.Tensor | None, bool]:
    """The layer's recurrent state from the cache (None without one), and whether a step may update it in place.

    A single-token step outside autograd writes the new state straight into the cache's tensor, so the tensor
    keeps its address from token to token (what a captured CUDA graph replays on); under autograd the state is a
    copy, since the old values may be needed for the backward pass and the cache is then updated by copying."""
    state = cache_params.get_recurrent_state(layer_idx) if cache_params is not None else None
    if state is None:
        return None, False
    if torch.is_grad_enabled():
        return state.clone(), False
    return state, seqlen == 1


def nothing_cached(cache_params: Cache | None, layer_idx: int) -> bool:
    """Whether the layer starts from nothing: no cache, or one that holds no conv inputs and no state for it yet
    (a first prompt)."""
    return cache_params is None or (cache_params.get_conv_state(layer_idx) is None
                                    and cache_params.get_recurrent_state(layer_idx) is None)


def cached_causal_conv(
    conv1d: nn.Conv1d, x: torch.Tensor, cache_params: Cache | None, layer_idx: int,
    mask: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None, hidden_act: str | None = None,
) -> torch.Tensor:
    """Depthwise causal conv of x: (batch, seqlen, channels), then the activation ACT2FN[hidden_act] (none if
    None). SiLU ("silu"/"swish") runs inside the conv ops, fused with the conv; any other activation after them.

    With a cache, the sequence continues from the layer's conv state (zeros before the first call), and the state
    is then replaced by the last `kernel_size` real inputs. With a padding `mask` (batch, seqlen), 1 for real
    tokens, the padded positions are skipped wherever they are (left, right or inside): each real token sees the
    real tokens before it, as if the padding were not there. Outputs at padded positions are meaningless.
    With `seq_idx` (batch, seqlen) (packed sequences, no cache), each token sees only earlier tokens of its own
    sequence.
    """
    fused = "silu" if hidden_act in ("silu", "swish") else None
    with loaded_weights(conv1d):
        out = _cached_causal_conv(conv1d, x, cache_params, layer_idx, mask, seq_idx, fused)
    return out if fused is not None or hidden_act is None else ACT2FN[hidden_act](out)


def keep_conv_inputs(cache_params: Cache, layer_idx: int, x: torch.Tensor, width: int) -> None:
    """Make the last `width` tokens of x: (batch, seqlen, channels) the layer's cached conv inputs. Call it only
    after the conv has read the cached ones: the cache overwrites its conv state in place."""
    cache_params.update_conv_state(x.transpose(1, 2), layer_idx, conv_kernel_size=width)


def _cached_causal_conv(
    conv1d: nn.Conv1d, x: torch.Tensor, cache_params: Cache | None, layer_idx: int, mask: torch.Tensor | None,
    seq_idx: torch.Tensor | None, activation: str | None,
) -> torch.Tensor:
    weight, bias, width = conv1d.weight.squeeze(1), conv1d.bias, conv1d.kernel_size[0]
    past = cache_params.get_conv_state(layer_idx) if cache_params is not None else None
    if past is not None and x.shape[1] == 1:
        # a decoding step: one fused op that also shifts the cached inputs in place; a padded step (mask 0) puts
        # the previous inputs back, without a host synchronisation
        before = past.clone() if mask is not None else None
        out = kernels.causal_conv1d_update(x[:, 0], past, weight, bias, activation).unsqueeze(1)
        if before is not None:
            past.copy_(torch.where(mask.bool()[:, :1, None], past, before))
        return out
    if mask is None or bool(mask.all()):
        out = kernels.causal_conv1d(x, weight, bias, past=past, seq_idx=seq_idx, activation=activation)
        if cache_params is not None:
            keep_conv_inputs(cache_params, layer_idx, x, width)
        return out

    # Pack each row's real tokens to the front (stable: order kept), convolve, and put the outputs back.
    real = mask.bool()
    order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)          # (batch, seqlen)
    index = order.unsqueeze(-1).expand_as(x)
    packed = x.gather(1, index)
    # packed sequences keep their ids through the reordering (a padded position's id only affects its own output)
    packed_seq_idx = seq_idx.gather(1, order) if seq_idx is not None else None
    out = torch.empty_like(x).scatter_(1, index, kernels.causal_conv1d(packed, weight, bias, past=past,
                                                                       seq_idx=packed_seq_idx,
                                                                       activation=activation))
    if cache_params is not None:
        before = (packed.new_zeros(x.shape[0], width, x.shape[2]) if past is None
                  else past[..., -width:].transpose(1, 2).to(x.dtype))
        history = torch.cat([before, packed], dim=1)
        ends = real.sum(1, keepdim=True) + torch.arange(width, device=x.device)    # window of the last `width`
        window = history.gather(1, ends.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        cache_params.update_conv_state(window.transpose(1, 2), layer_idx, conv_kernel_size=width)
    return out
