"""Checking a converted state dict against the model it is meant for, before anything is loaded or written."""

from __future__ import annotations

import torch
from transformers import PreTrainedConfig, PreTrainedModel


def check_state_dict(model_class: type[PreTrainedModel], config: PreTrainedConfig,
                     state_dict: dict[str, torch.Tensor]) -> None:
    """Raise a ValueError naming every missing, unexpected or mis-shaped tensor of `state_dict` for
    `model_class(config)` (built on the meta device, so nothing is allocated)."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in model_class(config).state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = sorted(f"{name} {list(state_dict[name].shape)} (expected {list(shape)})"
                       for name, shape in expected.items()
                       if name in state_dict and tuple(state_dict[name].shape) != shape)
    problems = [f"{label}: {', '.join(items[:20])}{' ...' if len(items) > 20 else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
                if items]
    if problems:
        raise ValueError(f"State dict does not fit {model_class.__name__}: " + "; ".join(problems))
