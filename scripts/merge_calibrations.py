#!/usr/bin/env python
"""Merge calibrations measured on slices of the grid (or of the inputs) into one allocation.

    python scripts/merge_calibrations.py OUT.json SLICE1.json SLICE2.json ... [--reduce 0.15]

Each input is a `stem_boost.Calibration` JSON, e.g. measured on a slice of the grid in one process
per slice (`stem_boost.calibrate(model, inputs, reduce, grid=(0, 0.2), solve=False)`) to spread the
measurement over processes; the output has the merged errors and the allocation solved again
(`stem_boost.calibrate.merge`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stem_boost.calibrate import Calibration, merge  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--reduce", type=float, default=None)
    a = ap.parse_args(argv)
    raw = [json.loads(Path(p).read_text()) for p in a.inputs]
    cal = merge([Calibration.from_dict(d) for d in raw], a.reduce)
    extra = {k: raw[0][k] for k in ("windows", "lengths", "text") if k in raw[0]}
    Path(a.out).write_text(json.dumps(dict(cal.to_dict(), **extra, merged_from=[Path(p).name for p in a.inputs]),
                                      indent=1))
    print(f"{a.out}: layer_reduce {[round(x, 3) for x in cal.layer_reduce]}")


if __name__ == "__main__":
    main()
