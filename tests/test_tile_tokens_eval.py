"""`scripts/tile_tokens_eval.py`'s helpers: the mode names it takes and the kernel-tile work it counts."""

from __future__ import annotations

import pytest
import torch

from stem_boost.selection import Selection


def test_modes_parse_and_bad_ones_name_what_is_allowed(tile_tokens_eval):
    script = tile_tokens_eval
    assert script.wrap_kwargs("native", 0.18) == dict(reduce=0.0, beta=0.0)
    assert script.wrap_kwargs("mass:4", 0.18) == dict(reduce=0.18, schedule="mass", tile_tokens=4)
    for bad in ("tpd", "tpd:0", "fast:4", "tpd:x"):
        with pytest.raises(SystemExit, match="allowed 'native' or SCHEDULE:TILE_TOKENS"):
            script.wrap_kwargs(bad, 0.18)


def test_tile_work_counts_a_row_of_four_tokens_once(tile_tokens_eval, seed):
    script = tile_tokens_eval
    gen = torch.Generator().manual_seed(seed)
    S, K = 37, 6
    idx = torch.sort(torch.randint(0, 40, (1, 2, S, K), generator=gen), dim=-1).values.to(torch.int32)
    counts = torch.randint(1, K + 1, (1, 2, S), generator=gen).to(torch.int32)
    idx = torch.where(torch.arange(K) < counts[..., None], idx, -1)
    per_token = Selection(idx=idx, counts=counts, block_size=64)
    want = sum(len({int(b) for t in range(t0, min(S, t0 + 4)) for b in idx[0, h, t, :int(counts[0, h, t])]})
               for h in range(2) for t0 in range(0, S, 4))  # each 4-token tile walks the union of its lists
    assert script.tile_work(per_token) == want, f"seed {seed}"
    rows = Selection(idx=idx[:, :, ::4], counts=counts[:, :, ::4], block_size=64, query_block=4)
    assert script.tile_work(rows) == int(counts[:, :, ::4].sum()), f"seed {seed}"
