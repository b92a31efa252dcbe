"""`stem_boost.bench.lists`: the L2 replay of the MLA kernel's gathers against an LRU oracle written from
its definition (a reuse is a hit iff fewer than `capacity` distinct keys were read since that key's last
read), and Stem's pair count laid out on native's lists."""

from __future__ import annotations

import pytest
import torch

from stem_boost.bench.lists import replay_gathers, replay_gathers_timed, stem_count_peers
from stem_boost.selection import Selection


def random_lists(g: torch.Generator, R: int, T: int, kmax: int) -> Selection:
    counts = torch.randint(0, kmax + 1, (1, 1, R), generator=g)
    idx = torch.full((1, 1, R, kmax), -1, dtype=torch.int32)
    for r in range(R):
        keys = torch.randperm(T, generator=g)[: int(counts[0, 0, r])].sort().values
        idx[0, 0, r, : keys.numel()] = keys.to(torch.int32)
    return Selection(idx=idx, counts=counts.to(torch.int32), q_offset=0)


def stream_in_kernel_order(sel: Selection, wave: int, step: int, sweep: int = 0) -> list[list[int]]:
    """The accesses wave by wave: latest query first, the wave's queries a step of keys each in turn;
    sweep > 0: the j-th latest query walks its list backward when j // sweep is odd."""
    idx, counts = sel.idx[0, 0], sel.counts[0, 0]
    order = list(range(idx.shape[0] - 1, -1, -1))
    out = []
    for w in range(0, len(order), wave):
        lists = []
        for j in range(w, min(w + wave, len(order))):
            keys = idx[order[j], : int(counts[order[j]])].tolist()
            lists.append(list(reversed(keys)) if sweep and (j // sweep) % 2 == 1 else keys)
        n_steps = max((-(-len(x) // step) for x in lists), default=0)
        out.append([k for s in range(n_steps) for x in lists for k in x[s * step:(s + 1) * step]])
    return out


def lru_misses_by_reuse_distance(stream: list[tuple[bool, int]], capacity: int) -> tuple[int, int]:
    """(accesses, misses) among the counted of a stream of (counted, key): a read misses when the key is
    new or at least `capacity` distinct keys were read since its last read."""
    last_seen: dict[int, int] = {}
    misses = accesses = 0
    for i, (counted, k) in enumerate(stream):
        j = last_seen.get(k)
        miss = j is None or len({key for _, key in stream[j + 1:i]}) >= capacity
        last_seen[k] = i
        if counted:
            accesses += 1
            misses += miss
    return accesses, misses


@pytest.mark.parametrize("capacity,sweep", [(1, 0), (7, 0), (40, 0), (1000, 0), (7, 3), (40, 2)])
def test_replay_matches_an_lru_oracle(seed, capacity, sweep):
    g = torch.Generator().manual_seed(seed)
    sel = random_lists(g, R=23, T=60, kmax=17)
    got = replay_gathers(sel, capacity, wave_queries=4, step_keys=5, warmup=0.3, sweep=sweep)
    waves = stream_in_kernel_order(sel, 4, 5, sweep)
    first = int(len(waves) * 0.3)
    accesses, misses = lru_misses_by_reuse_distance([(w >= first, k) for w, keys in enumerate(waves) for k in keys],
                                                    capacity)
    assert (got.accesses, got.misses) == (accesses, misses)
    counted = [k for w in waves[int(len(waves) * 0.3):] for k in w]
    # distinct keys of each counted wave, summed, per counted access
    distinct = sum(len(set(w)) for w in waves[int(len(waves) * 0.3):])
    assert got.wave_unique == pytest.approx(distinct / max(len(counted), 1))


def test_replay_refuses_a_batch_and_bad_sizes():
    sel = Selection(idx=torch.zeros(2, 1, 3, 4, dtype=torch.int32), counts=torch.ones(2, 1, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="one batch row"):
        replay_gathers(sel, 10)
    with pytest.raises(ValueError, match="capacity_rows=0"):
        replay_gathers(Selection(idx=sel.idx[:1], counts=sel.counts[:1]), 0)


def test_count_peers_keep_native_keys_with_stem_lengths(seed):
    g = torch.Generator().manual_seed(seed)
    native = random_lists(g, R=31, T=500, kmax=300)
    stem = Selection(idx=native.idx.clone(), counts=(native.counts * 0.7).to(torch.int32), q_offset=0)
    peers = stem_count_peers(native, stem, step=16)
    same_len = peers["native lists, Stem counts"]
    assert torch.equal(same_len.idx, native.idx) and torch.equal(same_len.counts, torch.minimum(stem.counts, native.counts))
    uniform = peers["native lists, uniform length"]
    live = native.counts > 0
    target = max(16, round(float(stem.counts[live].float().mean()) / 16) * 16)
    assert torch.equal(uniform.counts[live], native.counts[live].clamp(max=target))
    assert bool((uniform.counts[~live] == 0).all())


def test_random_subset_and_shared_peers(seed):
    g = torch.Generator().manual_seed(seed)
    native = random_lists(g, R=29, T=400, kmax=200)
    stem_counts = (native.counts.float() * torch.rand(native.counts.shape, generator=g)).to(torch.int32)
    stem = Selection(idx=native.idx.clone(), counts=stem_counts, q_offset=0)
    peers = stem_count_peers(native, stem, wave_queries=4, seed=seed)
    sub = peers["native lists, random subset"]
    assert torch.equal(sub.counts, torch.minimum(stem_counts, native.counts))
    for r in range(29):
        n, c = int(native.counts[0, 0, r]), int(sub.counts[0, 0, r])
        row = sub.idx[0, 0, r]
        assert bool((row[c:] == -1).all()) and bool((row[:c].diff() > 0).all())  # ascending, -1 tail
        assert set(row[:c].tolist()) <= set(native.idx[0, 0, r, :n].tolist())
    shared = peers["shared lists"]
    for r in range(29):
        first = max(0, 29 - ((28 - r) // 4 + 1) * 4)  # the earliest row of r's wave, latest rows first
        c = int(shared.counts[0, 0, r])
        assert c == min(int(stem_counts[0, 0, r]), int(native.counts[0, 0, r]), int(native.counts[0, 0, first]))
        assert torch.equal(shared.idx[0, 0, r, :c], native.idx[0, 0, first, :c])


def equal_length_lists(g: torch.Generator, R: int, T: int, k: int) -> Selection:
    idx = torch.stack([torch.randperm(T, generator=g)[:k].sort().values for _ in range(R)]).to(torch.int32)
    return Selection(idx=idx[None, None], counts=torch.full((1, 1, R), k, dtype=torch.int32), q_offset=0)


@pytest.mark.parametrize("capacity,sweep", [(5, 0), (30, 0), (30, 2)])
def test_timed_replay_in_lockstep_interleaves_keys_by_offset(seed, capacity, sweep):
    """Without jitter, equal rows run in lockstep waves of `slots` tokens and the j-th keys of a wave's
    tokens are gathered together: the stream is wave by wave, offset by offset, token by token."""
    g = torch.Generator().manual_seed(seed)
    sel = equal_length_lists(g, R=22, T=50, k=9)
    got = replay_gathers_timed(sel, capacity, slots=4, step_keys=4, warmup=0.25, sweep=sweep, jitter=0.0)
    idx = sel.idx[0, 0]
    lists = [idx[r].tolist() for r in range(21, -1, -1)]  # latest first
    lists = [lst[::-1] if sweep and (j // sweep) % 2 else lst for j, lst in enumerate(lists)]
    first = int(-(-22 // 4) * 0.25) * 4  # the tokens of the first waves (latest first) are not counted
    stream = [(j >= first, lists[j][i]) for w in range(0, 22, 4) for i in range(9) for j in range(w, min(w + 4, 22))]
    assert (got.accesses, got.misses) == lru_misses_by_reuse_distance(stream, capacity)


def test_timed_replay_with_jitter_keeps_its_counts(seed):
    """With jitter the order is the scheduler's, but every counted pair is one access, and a cache that
    holds every key misses exactly the counted first reads."""
    g = torch.Generator().manual_seed(seed)
    sel = random_lists(g, R=40, T=70, kmax=20)
    first = int(-(-40 // 3) * 0.3) * 3  # whole waves of 3 tokens
    counted = [r for j, r in enumerate(range(39, -1, -1)) if j >= first]
    want_accesses = sum(int(sel.counts[0, 0, r]) for r in counted)
    big = replay_gathers_timed(sel, 10_000, slots=3, step_keys=4, warmup=0.3, jitter=0.3, seed=seed)
    assert big.accesses == want_accesses
    earlier = {k for j, r in enumerate(range(39, -1, -1)) if j < first for k in sel.idx[0, 0, r, :int(sel.counts[0, 0, r])].tolist()}
    later = {k for r in counted for k in sel.idx[0, 0, r, :int(sel.counts[0, 0, r])].tolist()}
    # the warm-up tokens start first, but a slow one may still be gathering when counted tokens begin:
    # the first reads of keys that only counted tokens hold are misses whatever the order
    assert big.misses >= len(later - earlier) and big.misses <= len(later)
    small = replay_gathers_timed(sel, 3, slots=3, step_keys=4, warmup=0.3, jitter=0.3, seed=seed)
    assert small.accesses == want_accesses and small.misses >= big.misses


@pytest.mark.parametrize("R,slots,warmup", [(40, 3, 0.3), (29, 4, 0.25), (66, 66, 0.0)])
def test_both_replays_count_the_same_pairs_and_wave_keys(seed, R, slots, warmup):
    """The timed replay counts the tokens of the lockstep replay's counted waves (whole waves of `slots`
    tokens, latest first), so their accesses and distinct keys a wave agree exactly, jitter or not."""
    g = torch.Generator().manual_seed(seed)
    sel = random_lists(g, R=R, T=90, kmax=25)
    lockstep = replay_gathers(sel, 17, wave_queries=slots, step_keys=4, warmup=warmup)
    for jitter in (0.0, 0.3):
        timed = replay_gathers_timed(sel, 17, slots=slots, step_keys=4, warmup=warmup, jitter=jitter, seed=seed)
        assert timed.accesses == lockstep.accesses and timed.wave_unique == pytest.approx(lockstep.wave_unique)
