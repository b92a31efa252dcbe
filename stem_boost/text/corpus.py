"""Real English text that every machine has, for the SmolLM2 testbed (no download).

* `pydoc_data.topics` (CPython's stdlib: the language reference topics behind `help()`,
  ~465K characters, ~113K SmolLM2 tokens on Python 3.11). It ships with every CPython, so training
  and evaluation are reproducible on any machine (the GPU box included). Used for training, with
  every 5th topic (sorted by name) held out for evaluation (~20%).
* Debian's /usr/share/common-licenses/* (GPL, LGPL, Apache, MPL, GFDL, ...; ~52K tokens). Only on
  Debian-like systems and much of it near-duplicated (GPL-2 / LGPL-2 / LGPL-2.1 and GFDL-1.2 /
  1.3 share most of their text), so it is never trained on: it is an out-of-domain held-out set
  (legal prose instead of technical documentation) used when present.
"""

from __future__ import annotations

import os
from pathlib import Path

LICENSES_DIR = Path("/usr/share/common-licenses")
HOLDOUT_EVERY = 5


def pydoc_topics() -> list[tuple[str, str]]:
    import pydoc_data.topics as t

    return [(k, t.topics[k]) for k in sorted(t.topics)]


def pydoc_split(holdout_every: int = HOLDOUT_EVERY) -> tuple[str, str]:
    """(train text, held-out text): topic i (sorted by name) is held out when i % holdout_every
    == holdout_every - 1."""
    train, held = [], []
    for i, (_, text) in enumerate(pydoc_topics()):
        (held if i % holdout_every == holdout_every - 1 else train).append(text)
    return "\n\n".join(train), "\n\n".join(held)


def licenses_text() -> str | None:
    """The Debian license texts (each file once, symlinks skipped), or None when absent."""
    if not LICENSES_DIR.is_dir():
        return None
    files = [f for f in sorted(LICENSES_DIR.iterdir()) if f.is_file() and not os.path.islink(f)]
    return "\n\n".join(f.read_text(errors="replace") for f in files) if files else None


def heldout_texts() -> dict[str, str]:
    """name -> held-out text: always "pydoc_heldout", plus "licenses" where present."""
    out = {"pydoc_heldout": pydoc_split()[1]}
    lic = licenses_text()
    if lic:
        out["licenses"] = lic
    return out


def heldout_stream() -> str:
    """Every held-out text, one after the other (the SmolLM2 tables' perplexity text: with the
    licenses, long enough for several 8K-token windows)."""
    return "\n\n".join(heldout_texts().values())
