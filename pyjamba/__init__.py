"""pyjamba: the Jamba family of hybrid Mamba / attention / Mixture-of-Experts language models in PyTorch."""

from .cache import HybridCache
from .checkpoint import CheckpointError, from_pretrained, save_pretrained
from .config import PRESETS, ConfigError, JambaConfig
from .kernels import Kernels, resolve_kernels
from .model import CausalLMOutput, JambaForCausalLM
from .pipeline import TextGenerator
from .runtime import load

__all__ = [
    "PRESETS",
    "CausalLMOutput",
    "CheckpointError",
    "ConfigError",
    "HybridCache",
    "JambaConfig",
    "JambaForCausalLM",
    "Kernels",
    "TextGenerator",
    "from_pretrained",
    "load",
    "resolve_kernels",
    "save_pretrained",
]
__version__ = "0.1.0"
