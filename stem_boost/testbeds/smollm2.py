"""The `smollm2` testbed of the configs: SmolLM2-135M-Instruct (real weights, `smollm2_gguf`) as a
DSA model with the shipped distilled lightning indexers (`smollm2_dsa.build_testbed`).
"""

from __future__ import annotations

from .smollm2_dsa import build_testbed

__all__ = ["build_testbed"]
