"""`python -m stem_boost` (`cli.entry`, as the `stem-boost` command) as a launched worker (WORLD_SIZE > 1)
leaves through `os._exit` after a clean run: its output must still arrive whole and its exit code must be
the command's; a failing command still fails with its own code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, WORLD_SIZE="2", RANK="1", LOCAL_RANK="1")
    return subprocess.run([sys.executable, "-m", "stem_boost", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_worker_output_arrives_and_code_is_kept():
    proc = _run("configs")
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = proc.stdout.split()
    assert "smollm2_cpu" in proc.stdout and "tiny_dsa" in proc.stdout, proc.stdout  # the whole listing
    assert len(names) >= 7


def test_worker_failure_keeps_its_code():
    proc = _run("no-such-command")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
