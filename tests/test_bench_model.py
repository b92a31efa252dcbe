"""`scripts/bench_layers.py --family minicpm4-model`: the whole MiniCPM-4.1-8B-shaped model's prefill,
dense / native / Stem. On the CPU with a narrow config and the CUDA timers replaced by wall-clock
recorders: the three forwards run through the wrapped model and Stem reaches its `reduce` over the
model's layers; the full config has MiniCPM-4.1-8B's size; a bad layer count is refused by name."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_full_config_is_minicpm41_8b(bench_layers):
    cfg = bench_layers.minicpm41_8b_config(32)
    h, inter, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = h * cfg.num_attention_heads * hd * 2 + h * cfg.num_key_value_heads * hd * 2  # q, o; k, v
    per_layer = attn + 3 * h * inter + 2 * h  # + gate / up / down, two norms
    params = cfg.num_hidden_layers * per_layer + 2 * cfg.vocab_size * h + h  # untied embedding and head, final norm
    assert 8.1e9 < params < 8.3e9  # "8B": 8.19e9
    assert (cfg.num_attention_heads // cfg.num_key_value_heads, cfg.infllmv2.topk, cfg.infllmv2.block_size) == (16, 64, 64)


def test_model_prefill_runs_dense_native_and_stem(bench_layers, monkeypatch, seed):
    class WallEvent:  # CUDA events replaced by the host clock
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    import triton.testing

    for name, fake in (("Event", WallEvent), ("synchronize", lambda *a: None), ("empty_cache", lambda: None),
                       ("reset_peak_memory_stats", lambda *a: None), ("memory_allocated", lambda *a: 0),
                       ("max_memory_allocated", lambda *a: 0)):
        monkeypatch.setattr(torch.cuda, name, fake)
    dense_calls = []

    def do_bench(fn, warmup, rep, return_mode):
        t0 = time.perf_counter()
        fn()
        dense_calls.append(1)
        return (time.perf_counter() - t0) * 1e3

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    full = bench_layers.minicpm41_8b_config

    def narrow(layers):  # the same structure, small enough for a CPU: sparse from the first block
        c = full(layers)
        c.hidden_size, c.intermediate_size, c.vocab_size = 128, 256, 512
        c.num_attention_heads, c.num_key_value_heads, c.head_dim = 4, 2, 32
        c.sparse_config = dict(c.sparse_config, dense_len=-1, window_size=128, topk=4)
        return c

    monkeypatch.setattr(bench_layers, "minicpm41_8b_config", narrow)
    monkeypatch.setattr(bench_layers, "MIN_REPS", 2)
    rows = bench_layers.bench_minicpm4_model([1024], "cpu", 16, 2)
    assert len(rows) == 1 and dense_calls, f"seed={seed}"
    row = rows[0]
    assert row["S"] == 1024 and "2 layers" in row["family"]
    for key in ("dense_ms", "native_kernel_ms", "stem_ms"):
        assert 0 < row[key] < float("inf"), (key, row[key])
    assert row["reduce_achieved"] == pytest.approx(0.18, abs=0.02), f"seed={seed}"
    assert row["stem_over_native"] == pytest.approx(row["stem_ms"] / row["native_kernel_ms"])


def test_model_layers_must_be_positive():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_layers.py"), "--family", "minicpm4-model",
                        "--model-layers", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--model-layers must be at least 1, got 0" in r.stderr
