"""Stem on InfLLMv2 (MiniCPM-4 / MiniCPM-4.1). Placeholder until the native model lands."""

from __future__ import annotations

import torch


def is_infllmv2_attention(module: torch.nn.Module) -> bool:
    return hasattr(module, "sparse_config") and all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj"))


def wrap_modules(modules, cfg):
    raise NotImplementedError("InfLLMv2 wrapping is not available yet")
