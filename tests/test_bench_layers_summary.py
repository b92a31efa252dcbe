"""`scripts/bench_layers.py`'s closing tables for the DeepSeek-V3.2 layer: a run's rows (the twenty-fifth
session's recorded ones, with the kernel peers of later sessions filled in from fresh random times) go
through `main` with the GPU work replaced (once as i.i.d. rows, once labelled as a `--smooth 128` run), and
every peer's time comes out in its table, on the line of its row."""

from __future__ import annotations

import json
import random
import statistics
import sys
from pathlib import Path

import pytest
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
        r["stem_cut_chunks_ms"] = want[label(r), "chunks"] = rng.uniform(400, 500)
        r["indexer_topk_ms"], r["indexer_topk_with_cut_ms"] = rng.uniform(100, 200), rng.uniform(200, 300)
        want[label(r), "paired"] = rng.uniform(0.6, 0.9)
        r["kernel_last_chunk_paired"] = {"stem": want[label(r), "paired"], "shared lists": 0.5}
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
        assert f"| {lab} | {want[lab, 'paired']:.3f} | 0.500 |" in out
        cut_line = next(line for line in out.splitlines() if f" | {want[lab, 'chunks']:.1f} | " in line)
        cut_ms = r["indexer_topk_with_cut_ms"] - r["indexer_topk_ms"]
        assert cut_line.startswith(f"| {lab} | {r['native_kernel_ms']:.1f} | {r['stem_ms']:.1f} | ")
        assert f"| {cut_ms:.2f} |" in cut_line


def test_last_chunk_kernels_are_timed_in_one_alternation(bench_layers, monkeypatch, seed):
    """`last_chunk_kernel_times` hands native, Stem, the exact line, every count peer and (on Hopper) the
    SWEEP peers to one `timed_interleaved` call, each a callable that runs the kernel on its own lists, and
    maps the medians and per-round ratios to the row's keys."""
    from stem_boost.selection import Selection

    g = torch.Generator().manual_seed(seed)
    R, T, H = 6, 40, 2
    q = torch.randn(1, R, H, 576, generator=g)
    kv = torch.randn(1, T, 1, 576, generator=g)

    def lists(k: int) -> Selection:
        idx = torch.stack([torch.randperm(T - R + r + 1, generator=g)[:k].sort().values for r in range(R)])
        return Selection(idx=idx.to(torch.int32)[None, None], counts=torch.full((1, 1, R), k, dtype=torch.int32),
                         q_offset=T - R)

    native, stem, step1 = lists(16), lists(11), lists(12)
    ran = {}

    def fake_interleaved(fns, rep_ms=1500, min_reps=None):
        rng = random.Random(seed)
        times = {}
        for name, fn in fns.items():
            out = fn()
            ran[name] = out.shape
            times[name] = [rng.uniform(1, 2) for _ in range(3)]
        bench_layers.LAST_TIMES.clear()
        bench_layers.LAST_TIMES.update(times)
        return {n: (sorted(t)[1], 0.0, 0.0) for n, t in times.items()}

    monkeypatch.setattr(bench_layers, "timed_interleaved", fake_interleaved)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    bench_layers.last_chunk_kernel_times(q, kv, native, stem, step1, "test")  # without --sweep-peers
    assert set(ran) == {"native", "stem", "stem_step1", *bench_layers.COUNT_PEERS}
    ran.clear()
    monkeypatch.setattr(bench_layers, "SWEEP_TIMED", True)
    got = bench_layers.last_chunk_kernel_times(q, kv, native, stem, step1, "test")
    want_names = {"native", "stem", "stem_step1", *bench_layers.COUNT_PEERS,
                  *(f"{n}_sweep{s}" for s in bench_layers.SWEEP_PEERS for n in ("native", "stem"))}
    assert set(ran) == want_names and all(shape == (1, R, H, 512) for shape in ran.values())
    times = bench_layers.LAST_TIMES
    assert got["kernel_native_last_chunk_ms"] == sorted(times["native"])[1]
    assert got["kernel_stem_step1_last_chunk_ms"] == sorted(times["stem_step1"])[1]
    for m in bench_layers.COUNT_PEERS:
        assert got[f"kernel_last_chunk_{m}_ms"] == sorted(times[m])[1] and got[f"last_chunk_pairs_{m}"] > 0
    for s in bench_layers.SWEEP_PEERS:
        assert got[f"kernel_last_chunk_stem_sweep{s}_ms"] == sorted(times[f"stem_sweep{s}"])[1]
    ratio = statistics.median(a / b for a, b in zip(times["stem"], times["native"]))
    assert got["kernel_last_chunk_paired"]["stem"] == pytest.approx(ratio)


def test_ops_that_differ_orders_by_difference(bench_layers, seed):
    """The profile's operator table: the keys whose times differ most come first, a key missing on one
    side counting 0 there, and only `rows` of them."""
    rng = random.Random(seed)
    keys = [f"aten::mm [[{n}, 7168], [7168, {n}]]" for n in range(12)]
    ref = {k: rng.uniform(0, 5) for k in keys[:10]}
    other = {k: rng.uniform(0, 5) for k in keys[2:]}
    got = bench_layers.ops_that_differ(ref, other, 5)
    diffs = sorted((abs(other.get(k, 0.0) - ref.get(k, 0.0)), k) for k in keys)[::-1][:5]
    assert [k for k, _, _ in got] == [k for _, k in diffs]
    for k, a, b in got:
        assert (a, b) == (ref.get(k, 0.0), other.get(k, 0.0))
