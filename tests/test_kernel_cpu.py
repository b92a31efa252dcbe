"""The CPU executors of the sparse-attention contract against the gather reference (the oracle)."""

from __future__ import annotations

import pytest
import torch

from stem_boost.kernels import choose_executor, sparse_attention, sparse_attention_masked, sparse_attention_reference
from stem_boost.kernels.masked import selection_mask
from stem_boost.selection import Selection

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
    sel = Selection(idx, counts, block_size=bs, query_block=qb)
    want, want_lse = sparse_attention_reference(q, k, v, sel, return_lse=True, sinks=sinks)
    got, got_lse = sparse_attention_masked(q, k, v, sel, return_lse=True, sinks=sinks,
                                           max_chunk_bytes=4096)  # several chunks
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got_lse, want_lse, rtol=1e-9, atol=1e-9)
    got_fused = sparse_attention_masked(q, k, v, sel, sinks=sinks, max_chunk_bytes=4096)  # no lse, no sinks: torch's fused SDPA
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
        sel = Selection(idx, counts, q_offset=0)
        want = sparse_attention_reference(q, k, v, sel, causal=causal)
        got = sparse_attention_masked(q, k, v, sel, causal=causal)
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
    """auto on the CPU: < 1/64 of the keys selectable -> the gather reference; otherwise the masked
    path; the same result either way, and the one executor choice is `choose_executor`."""
    from stem_boost.kernels import dispatch

    calls = []
    for name in ("sparse_attention_masked", "sparse_attention_reference"):
        fn = getattr(dispatch, name)
        monkeypatch.setattr(dispatch, name, lambda *a, _fn=fn, _n=name, **kw: calls.append(_n) or _fn(*a, **kw))
    q, k, v = random_qkv(1, 8, 300, 2, 1, 16, 16, torch.float32)
    sparse = Selection(*random_selection(1, 1, 8, 300, block_size=1, query_block=1, kmax=4))
    dense = Selection(*random_selection(1, 1, 8, 300, block_size=16, query_block=1, kmax=4), block_size=16)
    assert choose_executor(q, k, sparse) == "reference" and choose_executor(q, k, dense) == "masked"
    sparse_out = sparse_attention(q, k, v, sparse)  # 300 > 64 * 4
    dense_out = sparse_attention(q, k, v, dense)  # 300 <= 64 * 64
    assert calls == ["sparse_attention_reference", "sparse_attention_masked"]
    torch.testing.assert_close(sparse_out, sparse_attention_masked(q, k, v, sparse))
    torch.testing.assert_close(dense_out, sparse_attention_reference(q, k, v, dense))


@pytest.mark.parametrize("backend", ["masked", "reference"])
def test_explicit_backend_is_honoured_and_bad_names_are_rejected(backend):
    q, k, v = random_qkv(1, 8, 8, 2, 1, 16, 16, torch.float32)
    sel = Selection(*random_selection(1, 1, 8, 8, block_size=1, query_block=1, kmax=4))
    assert choose_executor(q, k, sel, backend) == backend
    with pytest.raises(ValueError, match="backend='fast'"):
        sparse_attention(q, k, v, sel, backend="fast")


def test_selection_views_and_masks():
    """Selection.rows keeps the pairs of its rows (offset moved), to_dense_mask matches the executor's
    mask, and to_block_mask gives FlexAttention the same pairs (block lists)."""
    B, S, T, bs = 1, 64, 64, 16
    idx, counts = random_selection(B, 2, S, T, block_size=bs, query_block=16, kmax=4)
    sel = Selection(idx, counts, block_size=bs, query_block=16, q_offset=0)
    dense = sel.to_dense_mask(S, T)
    part = sel.rows(2, 4)
    assert part.q_offset == 32 and torch.equal(part.to_dense_mask(32, T), dense[:, :, 32:])
    bm = sel.to_block_mask(S, T, n_heads=4)
    flex_dense = bm.to_dense()  # [B, H, S / 16, T / 16] block occupancy
    occupied = dense.view(B, 2, S // 16, 16, T // 16, 16).any(-1).any(-2).repeat_interleave(2, dim=1)
    assert torch.equal(flex_dense.bool(), occupied)


def test_flex_attention_with_to_block_mask_equals_the_reference():
    """FlexAttention over `Selection.to_block_mask` computes the same attention as the reference
    (FlexAttention is the benchmark's peer: it must attend to the same pairs)."""
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    B, S, Hq, Hkv, D = 2, 128, 4, 2, 16
    q, k, v = random_qkv(B, S, S, Hq, Hkv, D, D, torch.float32)
    sel = Selection(*random_selection(B, Hkv, S, S, block_size=16, query_block=16, kmax=5), block_size=16,
                    query_block=16, q_offset=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention warns that it runs uncompiled
        out = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                             block_mask=sel.to_block_mask(S, S, n_heads=Hq), enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, sparse_attention_reference(q, k, v, sel), rtol=1e-5, atol=1e-5)
