"""Packed sequences: several sequences laid end to end in one row, told apart by `seq_idx`.

`seq_idx` is an integer tensor (batch, seqlen), non-decreasing along each row; a token whose seq_idx differs from
the previous token's starts a new sequence. The scans reset their state to zero before such a token (its decay
is 0) and the causal conv never reads across it; an initial state or a conv cache only reaches the row's first
sequence.
"""

from __future__ import annotations

import torch


def sequence_starts(seq_idx: torch.Tensor) -> torch.Tensor:
    """(batch, seqlen) bool, True where a token starts a new sequence; never at t = 0, which continues from the
    initial state."""
    starts = torch.zeros(seq_idx.shape, dtype=torch.bool, device=seq_idx.device)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return starts


def segment_ids(seq_idx: torch.Tensor) -> torch.Tensor:
    """(batch, seqlen) int64: 0 for the row's first sequence (the one an initial state or conv cache feeds), then
    1, 2, ... for each later one; equal ids mean the same sequence."""
    return sequence_starts(seq_idx).cumsum(1)


def positions_in_sequence(seq_idx: torch.Tensor) -> torch.Tensor:
    """(batch, seqlen) int64: each token's position inside its own sequence (0 at every sequence start)."""
    index = torch.arange(seq_idx.shape[1], device=seq_idx.device).expand(seq_idx.shape)
    first = torch.where(sequence_starts(seq_idx), index, 0).cummax(dim=1).values  # where the token's sequence began
    return index - first
