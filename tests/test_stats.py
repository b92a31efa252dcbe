"""`stats.LayerStats`: a forward's accounting is deferred (device tensors, no host synchronisation) and
applied, in order, at the first read of any field."""

from __future__ import annotations

import pytest
import torch

from stem_boost.stats import LayerStats, summarize


def _row_update(slot: int, pairs: torch.Tensor, n_rows: int, fresh: bool):
    """An update like the adapters': a fresh one resets the per-row lists, every one fills its slot."""
    def update(s: LayerStats) -> None:
        if fresh:
            s.row_native_pairs, s.row_stem_pairs = [0] * n_rows, [0] * n_rows
        s.row_stem_pairs[slot] = int(pairs.sum())
        s.row_native_pairs[slot] = 2 * int(pairs.sum())
        s.native_pairs, s.stem_pairs = sum(s.row_native_pairs), sum(s.row_stem_pairs)
    return update


def test_deferred_updates_apply_in_order_at_the_first_read(seed):
    gen = torch.Generator().manual_seed(seed)
    s = LayerStats(layer=0, family="infllmv2")
    rows = [torch.randint(0, 100, (7,), generator=gen) for _ in range(3)]
    for i, r in enumerate(rows):  # a padded batch arriving row by row
        s.defer(_row_update(i, r, 3, fresh=i == 0), fresh=i == 0)
    assert len(s._pending) == 3  # nothing applied yet: no field was read
    want = [int(r.sum()) for r in rows]
    assert s.row_stem_pairs == want, f"seed {seed}"
    assert s._pending == []
    assert s.stem_pairs == sum(want) and s.native_pairs == 2 * sum(want), f"seed {seed}"
    assert abs(s.reduce_achieved - 0.5) < 1e-12 and summarize([s])["stem_pairs"] == sum(want)


def test_a_fresh_update_drops_the_pending_ones(seed):
    """A model never asked for its stats keeps one forward's updates, not every forward's."""
    gen = torch.Generator().manual_seed(seed)
    s = LayerStats(layer=3, family="dsa")
    for _ in range(5):  # five forwards, nobody reads
        s.defer(_row_update(0, torch.randint(0, 100, (4,), generator=gen), 1, fresh=True), fresh=True)
    assert len(s._pending) == 1
    last = torch.randint(1, 100, (4,), generator=gen)
    s.defer(_row_update(0, last, 1, fresh=True), fresh=True)
    assert s.to_dict()["stem_pairs"] == int(last.sum()), f"seed {seed}"


def test_a_failing_update_leaves_the_stats_readable():
    s = LayerStats(layer=1, family="dsa")

    def broken(_: LayerStats) -> None:
        raise RuntimeError("device tensor gone")

    s.defer(broken, fresh=True)
    with pytest.raises(RuntimeError, match="device tensor gone"):
        _ = s.native_pairs
    assert s.native_pairs == 0 and s._pending == []  # the broken update is dropped, reads work again
