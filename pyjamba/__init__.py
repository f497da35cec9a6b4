"""pyjamba: the Jamba family of hybrid Mamba / attention / Mixture-of-Experts language models in PyTorch."""

from .config import PRESETS, ConfigError, JambaConfig

__all__ = ["PRESETS", "ConfigError", "JambaConfig"]
__version__ = "0.1.0"
