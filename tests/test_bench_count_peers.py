"""`scripts/bench_layers.stem_count_peers`: Stem's pair count laid out on native's token lists (the DSA
kernel diagnostic: row lengths against key positions)."""

from __future__ import annotations

import torch

from stem_boost.selection import Selection


def test_count_peers_keep_native_lists_and_stem_pairs(bench_layers, seed):
    gen = torch.Generator().manual_seed(seed)
    print(f"seed {seed}")
    R, K = 300, 256
    native_counts = torch.full((1, 1, R), K, dtype=torch.int32)
    native_counts[..., :40] = torch.arange(40, dtype=torch.int32) * 5  # early rows: fewer candidates, one empty
    idx = torch.sort(torch.randint(0, 10_000, (1, 1, R, K), generator=gen), dim=-1).values.to(torch.int32)
    idx = torch.where(torch.arange(K) < native_counts[..., None], idx, -1)
    native = Selection(idx=idx, counts=native_counts, q_offset=10_000 - R)
    stem_counts = (native_counts.float() * (0.6 + 0.4 * torch.rand(1, 1, R, generator=gen))).to(torch.int32)
    stem = Selection(idx=torch.randint(0, 10_000, (1, 1, R, K), generator=gen, dtype=torch.int32), counts=stem_counts,
                     q_offset=10_000 - R)

    peers = bench_layers.stem_count_peers(native, stem, step=32)
    same, uniform = peers["native lists, Stem counts"], peers["native lists, uniform length"]
    for peer in (same, uniform):
        assert peer.idx is native.idx and peer.q_offset == native.q_offset  # native's lists, native's rows
        assert bool((peer.counts <= native.counts).all()) and peer.counts.dtype == native.counts.dtype
    assert torch.equal(same.counts, stem_counts)  # Stem's lengths, row by row
    live = native_counts > 0
    mean = float(stem_counts[live].float().mean())
    want = max(32, round(mean / 32) * 32)
    assert torch.equal(uniform.counts[live], native_counts[live].clamp(max=want))  # one length where it fits
    assert int(uniform.counts[~live].sum()) == 0
    assert abs(int(uniform.counts.sum()) - int(stem_counts.sum())) <= 16 * R + int((native_counts < want).sum()) * want
