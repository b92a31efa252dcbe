"""`scripts/bench_layers.timed_blocks`: each round runs a block of forwards of every config in turn (the
order rotating), each block's first forward (the one after another config) is left out, and the result
is each config's median and mean sampled clock (CUDA events, synchronisation and NVML replaced by
recorders, so the test runs on the CPU)."""

from __future__ import annotations

import random
import statistics

import pytest
import torch

def test_blocks_leave_out_each_blocks_first_forward(bench_layers, monkeypatch, seed):
    rng = random.Random(seed)
    now = [0.0]
    calls = []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = now[0]

        def elapsed_time(self, end):
            return end.t - self.t

    def forward(name, base):
        def run():
            first = not calls or calls[-1][0] != name  # the call after another config's
            ms = base + (50.0 if first else rng.uniform(0.0, 1.0))  # a first call is far slower: it must not count
            calls.append((name, ms))
            now[0] += ms
        return run

    clocks = iter(rng.uniform(1500, 1900) for _ in range(1000))
    sampled = {"native": [], "stem": []}

    def clock():
        mhz = next(clocks)
        sampled[calls[-1][0]].append(mhz)
        return mhz

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(bench_layers, "sm_clock_mhz", clock)
    got = bench_layers.timed_blocks({"native": forward("native", 10.0), "stem": forward("stem", 9.0)}, rounds=3,
                                    block=4)
    names = [n for n, _ in calls]
    assert names == ["native"] * 4 + ["stem"] * 4 + ["stem"] * 4 + ["native"] * 4 + ["native"] * 4 + ["stem"] * 4
    for name in ("native", "stem"):
        blocks = [[ms for _, ms in calls[i:i + 4]] for i in range(0, len(calls), 4) if calls[i][0] == name]
        kept = [ms for block in blocks for ms in block[1:]]
        assert got[name][0] == pytest.approx(statistics.median(kept)), f"seed={seed}"
        assert got[name][1] == pytest.approx(statistics.fmean(sampled[name])), f"seed={seed}"
        assert bench_layers.LAST_BLOCK_TIMES[name] == pytest.approx([statistics.median(b[1:]) for b in blocks])
    assert got["native"][0] > got["stem"][0] and got["native"][0] < 12.0  # no block's first call in a median


def test_pooled_tile_words_parse_to_an_override(bench_layers):
    """`bench_layers.py --pooled-tile STEP=4 NUM_BUF=3`: words become the tile override, flags become bools;
    an unknown key or a value that is not an integer stops the run with what was expected."""
    defaults = dict(BLOCK_B=32, NUM_BUF=4, KEYS_FAST=True, STEP=0)
    assert bench_layers.parse_tile(["STEP=4", "NUM_BUF=3", "KEYS_FAST=0"], defaults) == dict(STEP=4, NUM_BUF=3,
                                                                                            KEYS_FAST=False)
    with pytest.raises(SystemExit, match="KEY one of"):
        bench_layers.parse_tile(["STEPS=4"], defaults)
    with pytest.raises(SystemExit, match="not an integer"):
        bench_layers.parse_tile(["STEP=four"], defaults)


def test_pooled_tile_peer_is_set_inside_and_restored_after(bench_layers):
    """`bench_layers.pooled_tile`: the Gluon pooled tile carries the override inside the block only (the peers
    of the run's tile are timed that way), also when the block raises."""
    from stem_boost.kernels import infllmv2_pooled_sm90

    before = dict(infllmv2_pooled_sm90.SM90_POOLED_TILE)
    for name, tile in bench_layers.POOLED_TILE_PEERS.items():
        assert set(tile) <= set(before), name  # every peer is a valid override
        with pytest.raises(RuntimeError), bench_layers.pooled_tile(tile):
            assert infllmv2_pooled_sm90.SM90_POOLED_TILE == {**before, **tile}
            raise RuntimeError
        assert infllmv2_pooled_sm90.SM90_POOLED_TILE == before


def test_list_overlap_counts_shared_keys_per_row(bench_layers, seed):
    """`bench_layers.list_overlap` against a set computation: rows of distinct keys in any order, -1 = none."""
    g = torch.Generator().manual_seed(seed)
    rows, k, n = 7, 12, 40
    want = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(rows)]).to(torch.int32)
    got = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(rows)]).to(torch.int32)
    want[0, 5:] = -1
    got[1, :3] = -1
    expect = sum(len(set(a.tolist()) & set(b.tolist()) - {-1}) for a, b in zip(got, want)) / int((want >= 0).sum())
    assert abs(bench_layers.list_overlap(got[None], want[None]) - expect) < 1e-12, f"seed={seed}"
    assert bench_layers.list_overlap(want, want) == 1.0


def test_a_peer_that_refuses_its_lists_reads_nan(bench_layers, monkeypatch):
    """`peer_ms`: a kernel asked for by name that refuses the lists (ValueError before it runs) gives NaN
    and the run goes on; anything else is timed as usual."""
    monkeypatch.setattr(bench_layers, "timed", lambda fn: (fn(), 0.0))

    def refuse():
        raise ValueError("kernel='sm90_ws' needs ...")
    assert bench_layers.peer_ms(refuse) != bench_layers.peer_ms(refuse)  # NaN
    assert bench_layers.peer_ms(lambda: 2.5) == 2.5
