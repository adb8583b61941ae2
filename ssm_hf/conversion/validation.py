"""Checking a converted state dict against the model it is meant for, before anything is loaded or written."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import PreTrainedConfig, PreTrainedModel


class ConversionError(ValueError):
    """Bad input to a conversion: missing, extra or mis-shaped tensors, a config value that does not map, a
    checkpoint folder that cannot be read, an output folder that is in the way. The message names the problem."""


def expected_shapes(model_class: type[PreTrainedModel], config: PreTrainedConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in `model_class(config).state_dict()`, built on the meta device (nothing is
    allocated)."""
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in model_class(config).state_dict().items()}


def compare_shapes(expected: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, torch.Tensor],
                   what: str, optional: tuple[str, ...] = ()) -> None:
    """Raise a ConversionError naming every missing, unexpected or mis-shaped tensor of `state_dict` against
    `expected` (name -> shape); `what` names the format or model in the message. Names in `optional` may be
    absent (a tied lm_head, for instance)."""
    missing = sorted(set(expected) - set(state_dict) - set(optional))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = sorted(f"{name} {list(state_dict[name].shape)} (expected {list(shape)})"
                       for name, shape in expected.items()
                       if name in state_dict and tuple(state_dict[name].shape) != tuple(shape))
    problems = [f"{label}: {', '.join(items[:20])}{' ...' if len(items) > 20 else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
                if items]
    if problems:
        raise ConversionError(f"State dict does not fit {what}: " + "; ".join(problems))


def check_state_dict(model_class: type[PreTrainedModel], config: PreTrainedConfig,
                     state_dict: Mapping[str, torch.Tensor], optional: tuple[str, ...] = ()) -> None:
    """Raise a ConversionError (a ValueError) naming every missing, unexpected or mis-shaped tensor of `state_dict`
    for `model_class(config)`."""
    compare_shapes(expected_shapes(model_class, config), state_dict, model_class.__name__, optional)
