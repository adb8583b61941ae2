"""The zoo at a glance: each preset with its family and parameter count."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PreTrainedConfig

from .configs import list_presets, preset_config


def parameter_count(config: PreTrainedConfig) -> int:
    """Parameters of the causal LM built from `config` (tied weights counted once), computed on the meta device:
    nothing is allocated, so it is instant even for the largest presets."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def zoo_table() -> list[tuple[str, str, int]]:
    """(preset name, model_type, parameter count) for every preset, sorted by name."""
    rows = []
    for name in list_presets():
        config = preset_config(name)
        rows.append((name, config.model_type, parameter_count(config)))
    return rows


def format_count(n: int) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)
