"""stem_boost: Stem (Output-Aware Metric + Token Position-Decay) on trained sparse attention.

    import stem_boost
    model = stem_boost.wrap(model, reduce=0.15)   # DeepSeek-V3.2 DSA or MiniCPM-4.1 InfLLMv2
"""

from .api import is_wrapped, last_selections, layer_stats, stats, unwrap, wrap
from .calibrate import Calibration, calibrate
from .config import StemConfig
from .kernels import sparse_attention, sparse_attention_reference
from .selection import Selection

__version__ = "0.1.0"
__all__ = ["wrap", "unwrap", "stats", "layer_stats", "last_selections", "is_wrapped", "calibrate", "Calibration", "StemConfig", "Selection",
           "sparse_attention", "sparse_attention_reference", "__version__"]
