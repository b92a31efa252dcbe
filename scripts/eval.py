"""Evaluate a model in dense / native sparse / Stem / ablation modes and write a report folder.

The same as ``stem-boost compare`` (see README, "Evaluation and reports"):

    python scripts/eval.py                                   # the embedded default (smollm2_cpu)
    python scripts/eval.py --config deepseek_v32 --set model.path=/models/DeepSeek-V3.2
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stem_boost.cli import entry  # noqa: E402

if __name__ == "__main__":
    entry(["compare", *sys.argv[1:]])
