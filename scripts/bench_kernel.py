"""Benchmark of the shared sparse-attention kernel against its peers (GPU): `stem_boost.bench.kernel`,
the same as `stem-boost bench`.

    python scripts/bench_kernel.py --seqs 32768 65536 131072 --out bench.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stem_boost.bench.kernel import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
