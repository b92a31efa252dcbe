"""Test-wide fixtures: one random seed per test, reported when the test fails and replayable.

Every test runs with `torch.manual_seed(seed)` (and Python's `random`), the seed fresh per test;
a failing test's report ends with the line to replay it:

    STEM_BOOST_SEED=<seed> python -m pytest 'tests/test_x.py::test_y'
"""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path

import pytest
import torch

SEED_ENV = "STEM_BOOST_SEED"


@pytest.fixture(autouse=True)
def seed(request) -> int:
    """The seed of this test: $STEM_BOOST_SEED when set (replay), else a fresh one."""
    value = int(os.environ[SEED_ENV]) if os.environ.get(SEED_ENV) else random.SystemRandom().randrange(2**31)
    request.node.stem_seed = value
    torch.manual_seed(value)
    random.seed(value)
    return value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    value = getattr(item, "stem_seed", None)
    if report.failed and value is not None:
        report.sections.append(("seed", f"replay: {SEED_ENV}={value} python -m pytest '{item.nodeid}'"))


def load_script(name: str):
    """`scripts/<name>.py` loaded as a module (a script, not a package module)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def bench_layers():
    """`scripts/bench_layers.py` as a module, once per run."""
    return load_script("bench_layers")


@pytest.fixture(scope="session")
def tile_tokens_eval():
    """`scripts/tile_tokens_eval.py` as a module, once per run."""
    return load_script("tile_tokens_eval")
