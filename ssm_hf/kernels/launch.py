"""Where a Triton kernel launches: on the device of its tensors, not on the process's current CUDA device."""

from __future__ import annotations

import contextlib

import torch


def on_device_of(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context that makes `tensor`'s CUDA device current while a kernel launches.

    Triton launches on the current device; with a model split over GPUs (`device_map="auto"`), layer k's tensors
    may live on cuda:1 while the current device is cuda:0, so every launch site enters this first. CPU tensors
    (Triton's interpreter, in tests) need no guard."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
