"""Calibrated per-layer allocations read from files instead of measured (config key
``calibration.allocations: {stem_cal: FILE, mass_cal: FILE}``).

A file is a `stem_boost.Calibration` JSON: a path, or the name of one that ships in
``stem_boost/data/calibration/`` (the SmolLM2 testbeds' allocations, e.g.
``smollm2_dsa_top1024_mass_r0.15.json``). It must be for the mode's reduce and the model's
number of sparse layers; anything else is an error naming the file and what differs.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..calibrate import Calibration

__all__ = ["SHIPPED_DIR", "shipped_allocations", "allocation_path", "load_allocation"]

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "data" / "calibration"
CALIBRATED_KINDS = ("stem_cal", "mass_cal")


def shipped_allocations() -> list[str]:
    """The file names of the allocations that ship with the package."""
    return sorted(p.name for p in SHIPPED_DIR.glob("*.json"))


def allocation_path(name: str) -> Path:
    """``name`` as a file: a path, else a shipped allocation's name."""
    path = Path(name)
    if path.is_file():
        return path
    if (SHIPPED_DIR / path.name).is_file() and path.parent == Path("."):
        return SHIPPED_DIR / path.name
    raise ValueError(f"calibration.allocations: {name!r} is neither a file nor a shipped allocation "
                     f"(shipped: {', '.join(shipped_allocations())})")


def load_allocation(name: str, mode: str, reduce: float, n_layers: int | None = None) -> tuple[Calibration, dict]:
    """(Calibration, its dict with ``file``) of mode ``mode`` from ``name``, checked against the
    mode's ``reduce`` and, when given, the model's ``n_layers`` sparse layers."""
    path = allocation_path(name)
    data = json.loads(path.read_text(encoding="utf-8"))
    cal = Calibration.from_dict(data)
    if abs(cal.reduce - reduce) > 1e-9:
        raise ValueError(f"calibration.allocations.{mode}: {path} is for reduce {cal.reduce:g}, the mode runs at "
                         f"{reduce:g}")
    if n_layers is not None and len(cal.layer_reduce) != n_layers:
        raise ValueError(f"calibration.allocations.{mode}: {path} has {len(cal.layer_reduce)} layers, the model "
                         f"{n_layers}")
    # files written before calibrations recorded their objective (the shipped ones) measured "layer"
    return cal, dict(data, objective=cal.objective, file=str(path))
