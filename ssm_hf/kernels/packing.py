"""Packed sequences: several sequences laid end to end in one row, told apart by `seq_idx`.

`seq_idx` is an integer tensor (batch, seqlen), or (1, seqlen) shared by every row; a token whose seq_idx differs
from the previous token's starts a new sequence. Only those changes count, not the ids themselves (the models ask
for non-decreasing ids, as transformers' collators give; the kernels accept any). The scans reset their state to
zero before such a token (its decay is 0) and the causal conv never reads across it; an initial state or a conv
cache only reaches the row's first sequence.
"""

from __future__ import annotations

import torch


def rows(seq_idx: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """seq_idx as (batch, seqlen) (a view: a (1, seqlen) tensor is shared by every row); ValueError for any other
    shape, which a kernel would otherwise read out of bounds."""
    if seq_idx.dim() != 2 or seq_idx.shape[1] != seqlen or seq_idx.shape[0] not in (1, batch):
        raise ValueError(f"seq_idx must have shape (batch={batch}, seqlen={seqlen}) or (1, {seqlen}); got "
                         f"{tuple(seq_idx.shape)}.")
    return seq_idx.expand(batch, seqlen)


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


def kernel_segment_ids(seq_idx: torch.Tensor, batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
    """`segment_ids` as the Triton kernels read them: (batch, seqlen) int32, contiguous, on `device`. The kernels
    compare ids for equality, so they get ids that change exactly where a sequence starts (any input ids, also
    ones that repeat an earlier sequence's or do not fit in int32) and a full row each."""
    return segment_ids(rows(seq_idx, batch, seqlen).to(device)).to(torch.int32)


def positions_in_sequence(seq_idx: torch.Tensor) -> torch.Tensor:
    """(batch, seqlen) int64: each token's position inside its own sequence (0 at every sequence start)."""
    index = torch.arange(seq_idx.shape[1], device=seq_idx.device).expand(seq_idx.shape)
    first = torch.where(sequence_starts(seq_idx), index, 0).cummax(dim=1).values  # where the token's sequence began
    return index - first
