"""Scan and convolution ops used by the mixers. Each op is exposed once here; the layers call these names.

Today every op is the PyTorch implementation (chunked, never a per-token loop over a sequence); Triton kernels for
CUDA will be dispatched from here with the same signatures.
"""

from .causal_conv1d_torch import causal_conv1d
from .selective_scan_torch import (
    selective_scan_chunked,
    selective_scan_sequential,
    selective_state_update,
)
from .ssd_torch import (
    ssd_prepare_dt,
    ssd_scan_chunked,
    ssd_scan_sequential,
    ssd_state_update,
)

selective_scan = selective_scan_chunked
ssd_scan = ssd_scan_chunked

__all__ = [
    "causal_conv1d",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_sequential",
    "selective_state_update",
    "ssd_prepare_dt",
    "ssd_scan",
    "ssd_scan_chunked",
    "ssd_scan_sequential",
    "ssd_state_update",
]
