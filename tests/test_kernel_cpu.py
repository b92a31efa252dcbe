"""The CPU executors of the sparse-attention contract against the gather reference (the oracle)."""

from __future__ import annotations

import pytest
import torch

from stem_boost.kernels import sparse_attention_cpu, sparse_attention_masked, sparse_attention_reference
from stem_boost.kernels.masked import selection_mask

from .kernel_inputs import random_qkv, random_selection

CASES = [  # B, S, T, Hq, Hkv, Hsel, D, Dv, block_size, query_block, kmax
    (1, 37, 37, 4, 2, 1, 16, 16, 1, 1, 12),      # DSA token lists, one selection for all heads
    (2, 20, 53, 6, 3, 3, 16, 8, 1, 1, 9),        # GQA token lists per kv head, queries at the end (cache)
    (1, 70, 70, 8, 2, 2, 16, 16, 16, 16, 3),     # InfLLMv2-style block lists per query block
    (2, 45, 90, 4, 1, 1, 32, 16, 16, 4, 5),      # blocks, query_block 4, T not a multiple of 16
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_sinks", [False, True])
def test_masked_matches_reference(case, with_sinks):
    B, S, T, Hq, Hkv, Hsel, D, Dv, bs, qb, kmax = case
    q, k, v = random_qkv(B, S, T, Hq, Hkv, D, Dv, torch.float64)
    idx, counts = random_selection(B, Hsel, S, T, block_size=bs, query_block=qb, kmax=kmax)
    sinks = torch.randn(Hq, dtype=torch.float64) if with_sinks else None
    want, want_lse = sparse_attention_reference(q, k, v, idx, counts, block_size=bs, query_block=qb,
                                                return_lse=True, sinks=sinks)
    got, got_lse = sparse_attention_masked(q, k, v, idx, counts, block_size=bs, query_block=qb, return_lse=True,
                                           sinks=sinks, max_chunk_bytes=4096)  # several chunks
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got_lse, want_lse, rtol=1e-9, atol=1e-9)
    got_fused = sparse_attention_masked(q, k, v, idx, counts, block_size=bs, query_block=qb, sinks=sinks,
                                        max_chunk_bytes=4096)  # no lse, no sinks: torch's fused SDPA
    torch.testing.assert_close(got_fused, want, rtol=1e-9, atol=1e-9)
    empty = counts == 0
    if bool(empty.any()) and not with_sinks:  # rows with nothing selected: zeros and -inf
        b, h, r = empty.nonzero()[0].tolist()
        assert torch.isneginf(got_lse[b, :, r * qb]).any()


def test_masked_non_causal_and_offset():
    q, k, v = random_qkv(1, 10, 40, 2, 1, 16, 16, torch.float64)
    idx, counts = random_selection(1, 1, 40, 40, block_size=1, query_block=1, kmax=15)
    idx, counts = idx[:, :, :10], counts[:, :, :10]  # rows for the first 10 positions, placed at q_offset 0
    for causal in (True, False):
        want = sparse_attention_reference(q, k, v, idx, counts, block_size=1, causal=causal, q_offset=0)
        got = sparse_attention_masked(q, k, v, idx, counts, block_size=1, causal=causal, q_offset=0)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_selection_mask_marks_exactly_the_listed_units():
    idx = torch.tensor([[[[2, 0, -1], [1, -1, -1]]]])  # B=1, Hsel=1, 2 rows
    counts = torch.tensor([[[2, 1]]])
    m = selection_mask(idx, counts, block_size=4, seq_k=11)
    want = torch.zeros(1, 1, 2, 11, dtype=torch.bool)
    want[0, 0, 0, 0:4] = want[0, 0, 0, 8:11] = True
    want[0, 0, 1, 4:8] = True
    assert torch.equal(m, want)


def test_cpu_dispatch_picks_the_gather_only_for_very_sparse_rows(monkeypatch):
    """< 1/64 of the keys selectable -> the gather reference; otherwise the masked path; same result."""
    from stem_boost.kernels import dispatch

    calls = []
    for name in ("sparse_attention_masked", "sparse_attention_reference"):
        fn = getattr(dispatch, name)
        monkeypatch.setattr(dispatch, name, lambda *a, _fn=fn, _n=name, **kw: calls.append(_n) or _fn(*a, **kw))
    q, k, v = random_qkv(1, 8, 300, 2, 1, 16, 16, torch.float32)
    idx, counts = random_selection(1, 1, 8, 300, block_size=1, query_block=1, kmax=4)
    sparse_out = dispatch.sparse_attention_cpu(q, k, v, idx, counts, block_size=1)  # 300 > 64 * 4
    bidx, bcounts = random_selection(1, 1, 8, 300, block_size=16, query_block=1, kmax=4)
    dense_out = dispatch.sparse_attention_cpu(q, k, v, bidx, bcounts, block_size=16)  # 300 <= 64 * 64
    assert calls == ["sparse_attention_reference", "sparse_attention_masked"]
    torch.testing.assert_close(sparse_out, sparse_attention_masked(q, k, v, idx, counts, block_size=1))
    torch.testing.assert_close(dense_out, sparse_attention_reference(q, k, v, bidx, bcounts, block_size=16))
