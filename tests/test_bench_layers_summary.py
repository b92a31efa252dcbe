"""`scripts/bench_layers.py`'s closing tables for the DeepSeek-V3.2 layer: a run's rows (the twenty-fifth
session's recorded ones, with the kernel peers of later sessions filled in from fresh random times) go
through `main` with the GPU work replaced (once as i.i.d. rows, once labelled as a `--smooth 128` run), and
every peer's time comes out in its table, on the line of its row."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

ROWS = Path(__file__).resolve().parents[1] / "benchmarks" / "layers_dsa_session25_call4_2026-12-05.json"


def label(row: dict) -> str:
    return f"{row['S']} smooth {row['smooth_window']}" if row.get("smooth_window") else f"{row['S']}"


def test_dsa_tables_print_every_peer(bench_layers, monkeypatch, capsys, seed):
    rng = random.Random(seed)
    rows = json.loads(ROWS.read_text())["rows"]
    rows += [dict(r, smooth_window=128) for r in rows]  # the same rows again as a `--smooth 128` run
    want = {}
    for r in rows:
        for m in bench_layers.COUNT_PEERS:
            r[f"kernel_last_chunk_{m}_ms"] = want[label(r), m] = rng.uniform(10, 30)
            r[f"last_chunk_pairs_{m}"] = r["last_chunk_pairs_stem"]
        for n in bench_layers.SWEEP_PEERS:
            for name in ("native", "stem"):
                r[f"kernel_last_chunk_{name}_sweep{n}_ms"] = want[label(r), name, n] = rng.uniform(10, 30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a recorded run")
    monkeypatch.setattr(bench_layers, "bench_dsa", lambda *a: rows)
    monkeypatch.setattr(sys, "argv", ["bench_layers.py", "--family", "dsa", "--seqs", "65536", "131072"])
    bench_layers.main()
    out = capsys.readouterr().out
    for r in rows:
        lab = label(r)
        peer_line = next(line for line in out.splitlines()
                         if line.startswith(f"| {lab} | {r['kernel_native_last_chunk_ms']:.2f} | ")
                         and f"{want[lab, bench_layers.COUNT_PEERS[0]]:.2f}" in line)
        for m in bench_layers.COUNT_PEERS:
            assert f"| {want[lab, m]:.2f} |" in peer_line
        sweep_line = next(line for line in out.splitlines()
                          if line.startswith(f"| {lab} | ") and f"{want[lab, 'native', bench_layers.SWEEP_PEERS[0]]:.2f}" in line)
        for n in bench_layers.SWEEP_PEERS:
            assert f"| {want[lab, 'native', n]:.2f} | {want[lab, 'stem', n]:.2f} |" in sweep_line
