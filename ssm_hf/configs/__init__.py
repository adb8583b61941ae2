"""Configuration classes and the zoo's named presets."""

from .mamba import MambaConfig
from .presets import list_presets, preset_config

__all__ = ["MambaConfig", "list_presets", "preset_config"]
