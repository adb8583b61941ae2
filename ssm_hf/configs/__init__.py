"""Configuration classes and the zoo's named presets."""

from .hybrid import HybridConfig
from .mamba import MambaConfig
from .mamba2 import Mamba2Config
from .presets import list_presets, preset_config
from .s4 import S4Config

__all__ = ["HybridConfig", "Mamba2Config", "MambaConfig", "S4Config", "list_presets", "preset_config"]
