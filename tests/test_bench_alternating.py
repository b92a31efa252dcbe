"""`bench.kernel.bench_alternating`: every round times each fn once, in turn, and the result is each fn's
median over the rounds (the CUDA timer replaced by a recorder, so the test runs on the CPU)."""

from __future__ import annotations

import random

from stem_boost.bench import kernel as bench_kernel


def test_alternating_rounds_and_medians(monkeypatch, seed):
    rng = random.Random(seed)
    order, values = [], {"a": [], "b": [], "c": []}

    def fake_bench(fn, rep_ms):
        name = fn()
        order.append(name)
        t = rng.uniform(1.0, 2.0)
        values[name].append(t)
        return t

    monkeypatch.setattr(bench_kernel, "bench", fake_bench)
    got = bench_kernel.bench_alternating({n: (lambda n=n: n) for n in values}, rounds=5, rep_ms=1)
    assert order == ["a", "b", "c"] * 5  # one of each a round, in turn, not each fn's rounds in a row
    for name, ts in values.items():
        assert got[name] == sorted(ts)[2]  # the median of five
