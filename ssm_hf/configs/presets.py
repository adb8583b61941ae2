"""The zoo's named presets: JSON files shipped in `ssm_hf/configs/presets/`, one per family."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

from transformers import PreTrainedConfig

from .hybrid import HybridConfig
from .mamba import MambaConfig
from .mamba2 import Mamba2Config
from .s4 import S4Config

# family file name -> config class; a new family adds its JSON file and a line here.
_FAMILIES: dict[str, type[PreTrainedConfig]] = {"mamba": MambaConfig, "mamba2": Mamba2Config,
                                                "hybrid": HybridConfig, "s4": S4Config}


@lru_cache(maxsize=None)
def _load_presets() -> dict[str, tuple[type[PreTrainedConfig], dict]]:
    presets: dict[str, tuple[type[PreTrainedConfig], dict]] = {}
    folder = resources.files(__package__) / "presets"
    for family, config_class in _FAMILIES.items():
        entries = json.loads((folder / f"{family}.json").read_text(encoding="utf-8"))
        for name, fields in entries.items():
            if name.startswith("_"):
                continue
            if name in presets:
                raise RuntimeError(f"preset {name!r} is defined twice (second time in {family}.json)")
            presets[name] = (config_class, fields)
    return presets


def list_presets() -> list[str]:
    """Names of all presets in the zoo, sorted."""
    return sorted(_load_presets())


def preset_config(name: str, **overrides) -> PreTrainedConfig:
    """Build the config of the zoo preset `name`, with `overrides` applied to its fields.

    >>> cfg = preset_config("mamba-tiny", num_hidden_layers=3)
    """
    presets = _load_presets()
    if name not in presets:
        raise KeyError(f"unknown preset {name!r}; available presets: {', '.join(sorted(presets))}")
    config_class, fields = presets[name]
    return config_class(**{**fields, **overrides})


__all__ = ["list_presets", "preset_config"]
