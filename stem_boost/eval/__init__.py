"""Evaluation suite: RULER-style synthetic tasks, LongBench files, perplexity, fidelity signals,
and the side-by-side runner behind `stem-boost compare`.

    from stem_boost.eval import load_config, run, write_report
    cfg = load_config()                 # the packaged default, smollm2_cpu (load_config("tiny_dsa"): the toy)
    res = run(cfg)                      # dense / native / Stem / ablations / mass / calibrated modes
    write_report(res, "stem_boost_report")
"""

from .config import ConfigError, load_config
from .report import write_report
from .runner import build_modes, load_model, run

__all__ = ["ConfigError", "build_modes", "load_config", "load_model", "run", "write_report"]
