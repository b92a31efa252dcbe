#!/usr/bin/env python
"""Train the lightning indexers of the SmolLM2-135M DSA testbed: `stem_boost.testbeds.smollm2_indexer_training`
(the recipe, the data and the defaults that produced the shipped weights are described there).

    python scripts/train_smollm2_indexer.py --device cuda --max-seconds 420   # the shipped weights (one H100)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stem_boost.testbeds.smollm2_indexer_training import main  # noqa: E402

if __name__ == "__main__":
    main()
