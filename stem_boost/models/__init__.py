"""Native model implementations shipped with stem_boost (registered with the transformers Auto classes)."""

from .minicpm4 import (
    MiniCPM4Config,
    MiniCPM4ForCausalLM,
    MiniCPM4Model,
    load_minicpm4,
    register_minicpm4,
)

__all__ = ["MiniCPM4Config", "MiniCPM4ForCausalLM", "MiniCPM4Model", "load_minicpm4", "register_minicpm4"]
