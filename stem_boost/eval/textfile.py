"""The user's own text for perplexity, fidelity and the RULER haystack: a local file.

    read_text_file("my.txt")          # plain text (UTF-8), as it is
    read_text_file("corpus.jsonl")    # JSON Lines: the "text" field of every line, joined by blank lines

A file is JSONL when its name ends in ``.jsonl``, or when every non-empty line is a JSON object
with a ``text`` string. Every error names the path and what is needed, so ``--set perplexity.text=my.txt`` fails with a message a user can act on.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

__all__ = ["TextFileError", "check_text_file", "read_text_file", "NEEDED"]

NEEDED = "a UTF-8 plain-text file, or JSON Lines with a 'text' string on every line"


class TextFileError(ValueError):
    """A text file that cannot serve as evaluation text (missing, empty, malformed, too short)."""


def check_text_file(path: str | Path, key: str = "text") -> Path:
    """``path`` as a Path when it names a non-empty regular file; else `TextFileError` naming the
    config ``key``, the path and what is needed."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise TextFileError(f"{key}: {str(path)!r} is not a file (needed: {NEEDED})")
    if p.stat().st_size == 0:
        raise TextFileError(f"{key}: the file {str(path)!r} is empty (needed: {NEEDED})")
    return p


def _is_jsonl(p: Path, lines: list[str]) -> bool:
    if p.suffix.lower() == ".jsonl":
        return True
    rows = [ln for ln in lines if ln.strip()]
    if not rows or not all(ln.lstrip().startswith("{") for ln in rows):
        return False
    try:
        return all(isinstance(json.loads(ln).get("text"), str) for ln in rows)
    except (json.JSONDecodeError, AttributeError):
        return False


@functools.lru_cache(maxsize=8)
def read_text_file(path: str, key: str = "text") -> str:
    """The text of ``path`` (see the module docstring). Raises `TextFileError` for a missing or
    empty file, a JSONL line without a ``text`` string, or a file with no text at all."""
    p = check_text_file(path, key)
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TextFileError(f"{key}: the file {path!r} is not UTF-8 text ({e}; needed: {NEEDED})") from None
    lines = raw.splitlines()
    if _is_jsonl(p, lines):
        texts = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TextFileError(f"{key}: {path!r} line {n} is not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise TextFileError(f"{key}: {path!r} line {n} has no 'text' string field (needed: {NEEDED})")
            texts.append(row["text"])
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise TextFileError(f"{key}: the file {path!r} holds no text (needed: {NEEDED})")
    return raw
