"""The fused InfLLMv2 stage-1 kernel against the PyTorch definition (Triton interpreter on CPU)."""

from __future__ import annotations

import os
import re

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from stem_boost.kernels import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")


@pytest.mark.parametrize("B,Hk,G,C,K1,K2,D", [(1, 2, 2, 20, 37, 9, 16), (2, 1, 4, 33, 70, 17, 32)])
def test_fused_stage1_matches_definition(B, Hk, G, C, K1, K2, D):
    from stem_boost.kernels.infllmv2_scores import fused_stage1_scores
    from stem_boost.native.infllmv2 import _group_compressed_scores

    device = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(B, Hk * G, C, D, device=device)
    k1 = torch.randn(B, Hk, K1, D, device=device)
    k2 = torch.randn(B, Hk, K2, D, device=device)
    vis1 = torch.randint(0, K1 + 1, (C,), device=device).sort().values
    vis2 = torch.randint(0, K2 + 1, (C,), device=device).sort().values
    vis2[: C // 4] = 0  # rows that see no coarse key score 0
    scale = D ** -0.5
    ref = _group_compressed_scores(q.double().view(B, Hk, G, C, D), k1.double(), k2.double(), vis1, vis2, scale)
    out = fused_stage1_scores(q, k1, k2, vis1, vis2, scale, block_s=16, block_c=16, block_n=16)
    assert out.shape == ref.shape
    assert torch.all(out[..., : C // 4, :] == 0)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-4


# ---------------------------------------------------------------------------- union tiles (stage 2)
def _sorted_lists(B, H, S, T, block_size, kmax, q_offset, causal, gen):
    """Random per-token block lists, ascending, -1 padded; some rows empty; shared runs of tokens."""
    nb = -(-T // block_size)
    idx = torch.full((B, H, S, kmax), -1, dtype=torch.int32)
    counts = torch.zeros(B, H, S, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            prev = None
            for s in range(S):
                n_valid = min(nb, (s + q_offset) // block_size + 1) if causal else nb
                if prev is not None and int(torch.randint(0, 3, (1,), generator=gen)) == 0:
                    blocks = prev[prev < n_valid]  # the neighbour's list (unions stay small)
                else:
                    n = int(torch.randint(0, min(kmax, n_valid) + 1, (1,), generator=gen))
                    blocks = torch.randperm(n_valid, generator=gen)[:n].sort().values
                if s % 11 == 5:
                    blocks = blocks[:0]
                prev = blocks
                idx[b, h, s, : blocks.numel()] = blocks.to(torch.int32)
                counts[b, h, s] = blocks.numel()
    return idx, counts


def _reference(q, k, v, idx, counts, block_size, q_offset, causal):
    import inspect

    from stem_boost.kernels import sparse_attention_reference

    kw = dict(causal=causal, return_lse=True)
    if "selection" in inspect.signature(sparse_attention_reference).parameters:
        from stem_boost.selection import Selection

        sel = Selection(idx=idx, counts=counts, block_size=block_size, query_block=1, q_offset=q_offset)
        return sparse_attention_reference(q, k, v, sel, **kw)
    return sparse_attention_reference(q, k, v, idx, counts, block_size=block_size, q_offset=q_offset, **kw)


@pytest.mark.parametrize("qt", [1, 3, 8])
def test_union_lists_match_definition(qt):
    from stem_boost.kernels.block_union import union_block_lists, union_block_lists_torch

    seed = 1500 + qt
    gen = torch.Generator().manual_seed(seed)
    idx, counts = _sorted_lists(2, 2, 23, 200, 16, 6, 177, True, gen)
    uidx, umask, ucount = union_block_lists(idx, counts, qt)
    ridx, rmask, rcount = union_block_lists_torch(idx, counts, qt)
    assert torch.equal(ucount, rcount), f"seed {seed}"
    live = torch.arange(uidx.shape[-1]) < ucount.unsqueeze(-1)
    assert torch.equal(torch.where(live, uidx, -1), ridx[..., : uidx.shape[-1]]), f"seed {seed}"
    assert torch.equal(torch.where(live, umask, 0), rmask[..., : uidx.shape[-1]]), f"seed {seed}"


@pytest.mark.parametrize(
    "B,S,T,Hkv,G,Hsel,D,block_size,qt,dtype,causal",
    [
        (1, 37, 37, 2, 16, 2, 32, 16, 4, torch.float32, True),    # MiniCPM-like group, fresh prefill
        (2, 29, 180, 2, 6, 2, 32, 16, None, torch.float32, True),  # G = 6: 10 tokens x 6 heads = 60 rows
        (1, 33, 100, 3, 3, 1, 16, 32, 5, torch.float32, True),    # shared selection head, q_offset > 0
        (1, 26, 90, 1, 1, 1, 32, 16, 8, torch.bfloat16, True),    # G = 1, bf16
        (1, 21, 70, 2, 4, 2, 32, 16, 3, torch.float32, False),    # not causal
        (1, 40, 200, 1, 2, 1, 32, 64, 4, torch.float32, True),    # blocks of 64 (SUB steps)
    ],
)
def test_block_union_attention_matches_reference(B, S, T, Hkv, G, Hsel, D, block_size, qt, dtype, causal):
    from stem_boost.kernels.block_union import block_union_attention

    seed = 2026 + S * 7 + G
    gen = torch.Generator().manual_seed(seed)
    q_offset = T - S
    idx, counts = _sorted_lists(B, Hsel, S, T, block_size, 5, q_offset, causal, gen)
    q = torch.randn(B, S, Hkv * G, D, generator=gen).to(dtype)
    k = torch.randn(B, T, Hkv, D, generator=gen).to(dtype)
    v = torch.randn(B, T, Hkv, D, generator=gen).to(dtype)
    out, lse = block_union_attention(q, k, v, idx, counts, block_size=block_size, q_offset=q_offset, causal=causal,
                                     return_lse=True, tokens_per_tile=qt)
    ref, ref_lse = _reference(q.double(), k.double(), v.double(), idx, counts, block_size, q_offset, causal)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert float((out.double() - ref).norm() / ref.norm()) < tol, f"seed {seed}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse)), f"seed {seed}: rows with no keys must give lse = -inf"
    assert float((lse.double() - ref_lse)[finite].abs().max()) < (1e-4 if dtype == torch.float32 else 2e-2), f"seed {seed}"
    empty = ~finite  # [B, Hq, S]
    assert torch.all(out.permute(0, 2, 1, 3)[empty] == 0), f"seed {seed}: empty rows give zeros"


# ---------------------------------------------------------------------------- fused selection
def _small_params(**kw):
    from stem_boost.native.infllmv2 import InfLLMv2Params

    base = dict(kernel_size=16, kernel_stride=8, init_blocks=1, block_size=32, window_size=64, topk=5, dense_len=0)
    base.update(kw)
    return InfLLMv2Params(**base)


@pytest.mark.parametrize("stem,fuse_topk", [(False, False), (True, False), (False, True), (True, True)])
def test_fused_selection_equals_pytorch_selection(stem, fuse_topk, seed):
    """Native and Stem (OAM bias + per-row budgets) selections, two chunks, fp32: exact (three
    launches per chunk, the default, and two)."""
    from stem_boost.kernels.infllmv2_select import infllmv2_select_fused
    from stem_boost.native.infllmv2 import infllmv2_select

    gen = torch.Generator().manual_seed(seed)
    p = _small_params()
    B, Hk, G, D, T = 1, 2, 2, 16, 160  # two chunks of 128 and 32
    q = torch.randn(B, Hk * G, T, D, generator=gen)
    k = torch.randn(B, Hk, T, D, generator=gen)
    kw, ref_kw = {}, {}
    if stem:
        bias = 0.3 * torch.randn(B, Hk, -(-T // 32), generator=gen)
        budgets = torch.randint(0, 5, (B, T), generator=gen)
        kw = dict(key_bias=bias, budgets=budgets)
        ref_kw = dict(key_bias=bias, k_free=budgets.unsqueeze(1).expand(B, Hk, T))
    idx, counts, n_forced = infllmv2_select_fused(q, k, p, chunk_size=128, fuse_topk=fuse_topk, **kw)
    ref = infllmv2_select(q, k, p, chunk_size=128, **ref_kw)
    assert torch.equal(counts, ref.counts), f"seed {seed}"
    km = max(idx.shape[-1], ref.idx.shape[-1])
    pad = lambda t: torch.nn.functional.pad(t, (0, km - t.shape[-1]), value=-1)  # noqa: E731
    assert torch.equal(pad(idx), pad(ref.idx)), f"seed {seed}"
    assert torch.equal(n_forced, ref.forced.sum(-1).to(torch.int32)), f"seed {seed}"


def test_fused_selection_left_padding_equals_unpadded_row():
    """seq_start a multiple of the coarse stride: the padded row selects what the row alone selects
    (no offset quirk), shifted by seq_start / block_size blocks; padding keys never matter."""
    from stem_boost.kernels.infllmv2_select import infllmv2_select_fused
    from stem_boost.native.infllmv2 import infllmv2_select

    seed = 47
    gen = torch.Generator().manual_seed(seed)
    p = _small_params()
    B, Hk, G, D, T, pad = 2, 1, 3, 16, 160, 64  # G = 3: the per-head coarse kernel; chunks of 96 and 64
    q = torch.randn(B, Hk * G, T, D, generator=gen)
    k = torch.randn(B, Hk, T, D, generator=gen)
    k[1, :, :pad] = 100.0 * torch.randn(Hk, pad, D, generator=gen)  # padding keys: never visible
    seq_start = torch.tensor([0, pad], dtype=torch.int32)
    idx, counts, _ = infllmv2_select_fused(q, k, p, chunk_size=96, seq_start=seq_start, emulate_kernel_offset=False)
    alone = infllmv2_select(q[1:, :, pad:], k[1:, :, pad:], p, chunk_size=96, emulate_kernel_offset=False)
    shifted = torch.where(alone.idx[0] >= 0, alone.idx[0] + pad // 32, -1)
    km = min(shifted.shape[-1], idx.shape[-1])
    assert torch.equal(counts[1, :, pad:], alone.counts[0]), f"seed {seed}"
    assert torch.equal(idx[1, :, pad:, :km], shifted[..., :km]), f"seed {seed}"
    row0 = infllmv2_select(q[:1], k[:1], p, chunk_size=96, emulate_kernel_offset=False)
    assert torch.equal(counts[0], row0.counts[0]), f"seed {seed}"


@pytest.mark.parametrize("method", ["program", "warp"])
def test_block_topk_ties_and_budgets(method):
    """The top-k kernel alone on scores with many exact ties, -inf and NaN: the `topk_blocks` rule
    (one row a program, and one row a warp)."""
    from stem_boost.kernels.infllmv2_select import block_topk
    from stem_boost.native.infllmv2 import topk_blocks

    seed = 5
    gen = torch.Generator().manual_seed(seed)
    B, Hk, C, NB, bs = 2, 2, 40, 37, 16
    q_pos0 = NB * bs - C - 3
    scores = torch.randint(0, 4, (B, Hk, C, NB), generator=gen).float() / 4  # many ties
    scores[scores == 0.75] = float("-inf")
    scores[..., 5] = float("nan")
    budgets = torch.randint(0, 9, (B, Hk, C), generator=gen)
    qb = (torch.arange(C) + q_pos0) // bs
    blk = torch.arange(NB)
    cand = blk[None] <= qb[:, None]
    forced = cand & ((blk[None] < 2) | (blk[None] >= qb[:, None] - 3))
    idx, counts, n_forced = block_topk(scores, q_pos0=q_pos0, block_size=bs, init_blocks=2, local_blocks=3,
                                       k_total=12, budgets=budgets, kmax=NB, method=method)
    ref_idx, _, _, ref_counts = topk_blocks(scores, forced, cand, k_free=budgets)
    assert torch.equal(n_forced, forced.sum(-1).to(torch.int32).expand(B, Hk, C)), f"seed {seed}"
    assert torch.equal(counts, ref_counts), f"seed {seed}"
    assert torch.equal(idx[..., : ref_idx.shape[-1]], ref_idx), f"seed {seed}"
    assert torch.all(idx[..., ref_idx.shape[-1]:] == -1), f"seed {seed}"


def _row_lists(B: int, Hsel: int, S: int, T: int, query_block: int, bs: int, kmax: int, gen: torch.Generator):
    """Random causal block lists, one per query_block tokens (query s at key T - S + s):
    idx [B, Hsel, R, kmax] ascending, -1 padded, counts [B, Hsel, R] in 0..kmax; the last row of
    each (batch, head) is never empty, so that no selection is empty as a whole (a reference of
    zeros has no relative error)."""
    R = -(-S // query_block)
    idx = torch.full((B, Hsel, R, kmax), -1, dtype=torch.int32)
    counts = torch.zeros(B, Hsel, R, dtype=torch.int32)
    for b in range(B):
        for h in range(Hsel):
            for r in range(R):
                last = min(S - 1, r * query_block + query_block - 1) + T - S
                n_valid = last // bs + 1
                n = int(torch.randint(int(r == R - 1), min(kmax, n_valid) + 1, (1,), generator=gen))
                idx[b, h, r, :n] = torch.randperm(n_valid, generator=gen)[:n].sort().values.to(torch.int32)
                counts[b, h, r] = n
    return idx, counts


def _row_reference(q, k, v, idx, counts, query_block: int, bs: int, offset: int) -> torch.Tensor:
    """fp64 causal attention of each token over its row's blocks -> [B, S, Hq, Dv]."""
    rows = torch.arange(q.shape[1]) // query_block
    ref, _ = _reference(q.double(), k.double(), v.double(), idx[:, :, rows].contiguous(),
                        counts[:, :, rows].contiguous(), bs, offset, True)
    return ref


@pytest.mark.parametrize(
    "G,Hsel,query_block,block_m,S,dtype",
    [
        (6, 2, 16, 32, 45, torch.float32),   # a 32-row tile splits tokens 5 | 6 (6 heads each)
        (3, 1, 32, 32, 70, torch.float32),   # a shared selection head, a partial last tile
        (16, 2, 8, 128, 40, torch.bfloat16),  # 8 tokens x 16 heads a tile, bf16
        (1, 2, 64, 64, 100, torch.float32),  # G = 1: 64 tokens a tile
    ],
)
def test_block_union_flat_row_tiles(G, Hsel, query_block, block_m, S, dtype, seed):
    """Tiles of block_m consecutive (token, head) rows over row lists equal the reference for any G,
    also where a tile splits a token's heads, and equal the token tiles' output."""
    from stem_boost.kernels.block_union import block_union_attention

    gen = torch.Generator().manual_seed(seed)
    B, Hkv, D, bs = 2, 2, 16, 16
    T = S + 23
    idx, counts = _row_lists(B, Hsel, S, T, query_block, bs, 4, gen)
    q = torch.randn(B, S, Hkv * G, D, generator=gen).to(dtype)
    k = torch.randn(B, T, Hkv, D, generator=gen).to(dtype)
    v = torch.randn(B, T, Hkv, D, generator=gen).to(dtype)
    out, lse = block_union_attention(q, k, v, idx, counts, block_size=bs, query_block=query_block, block_m=block_m,
                                     flat_rows=True, return_lse=True)
    ref = _row_reference(q, k, v, idx, counts, query_block, bs, T - S)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert float((out.double() - ref).norm() / ref.norm()) < tol, f"seed {seed}"
    tokens = block_union_attention(q, k, v, idx, counts, block_size=bs, query_block=query_block, flat_rows=False,
                                   return_lse=True)
    assert float((out.double() - tokens[0].double()).norm() / ref.norm()) < tol, f"seed {seed}"
    finite = torch.isfinite(tokens[1])
    assert torch.equal(finite, torch.isfinite(lse)), f"seed {seed}: the same rows see no key"
    assert float((lse - tokens[1])[finite].abs().max()) < (1e-4 if dtype == torch.float32 else 2e-2), f"seed {seed}"


def test_block_union_flat_rows_default_and_refusal(seed):
    """Flat tiles are the default where they fit (the same output as token tiles), and asking for
    them where a tile would cross a selection row names the values."""
    from stem_boost.kernels import block_union
    from stem_boost.kernels.block_union import block_union_attention

    gen = torch.Generator().manual_seed(seed)
    B, S, T, Hkv, G, D, bs, qb = 1, 40, 40, 1, 4, 16, 16, 32  # 32 x 4 = 128 rows: a multiple of FLAT_BLOCK_M
    assert (qb * G) % block_union.FLAT_BLOCK_M == 0
    idx, counts = _row_lists(B, Hkv, S, T, qb, bs, 3, gen)
    q, k, v = (torch.randn(B, n, h, D, generator=gen) for n, h in ((S, Hkv * G), (T, Hkv), (T, Hkv)))
    ref = _row_reference(q, k, v, idx, counts, qb, bs, 0)
    out = block_union_attention(q, k, v, idx, counts, block_size=bs, query_block=qb)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-5, f"seed {seed}"
    with pytest.raises(ValueError, match=r"query_block \* G \(8 \* 4\).*block_m \(64\)"):
        block_union_attention(q, k, v, idx[:, :, :1].expand(-1, -1, 5, -1).contiguous(),
                              counts[:, :, :1].expand(-1, -1, 5).contiguous(), block_size=bs, query_block=8,
                              block_m=64, flat_rows=True)
    with pytest.raises(ValueError, match="block_m=48 with flat_rows; allowed: a power of two >= 16"):
        block_union_attention(q, k, v, idx, counts, block_size=bs, query_block=qb, block_m=48, flat_rows=True)
    out48 = block_union_attention(q, k, v, idx, counts, block_size=bs, query_block=qb, block_m=48)  # token tiles
    assert float((out48.double() - ref).norm() / ref.norm()) < 1e-5, f"seed {seed}"


@pytest.mark.parametrize("query_block,qt", [(8, 4), (8, 3), (16, 16)])
def test_block_union_rows_of_several_tokens(query_block, qt):
    """Selections with one row per query_block tokens: the row walk (QT | query_block) and the union
    over rows (otherwise) both equal the reference."""
    from stem_boost.kernels.block_union import block_union_attention, union_block_lists, union_block_lists_torch

    seed = 600 + query_block + qt
    gen = torch.Generator().manual_seed(seed)
    B, S, T, Hkv, G, D, bs = 1, 45, 120, 2, 4, 16, 16
    idx, counts = _row_lists(B, Hkv, S, T, query_block, bs, 5, gen)
    q = torch.randn(B, S, Hkv * G, D, generator=gen)
    k = torch.randn(B, T, Hkv, D, generator=gen)
    v = torch.randn(B, T, Hkv, D, generator=gen)
    out = block_union_attention(q, k, v, idx, counts, block_size=bs, query_block=query_block, tokens_per_tile=qt)
    ref = _row_reference(q, k, v, idx, counts, query_block, bs, T - S)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-5, f"seed {seed}"
    u = union_block_lists(idx, counts, qt, query_block=query_block, seq_q=S)
    r_ = union_block_lists_torch(idx, counts, qt, query_block=query_block, seq_q=S)
    assert torch.equal(u[2], r_[2]), f"seed {seed}"


@pytest.mark.parametrize("n_queries", [1, 40])
def test_fused_selection_with_a_cache_equals_pytorch(n_queries):
    """Decode (one query) and a prefill chunk after a cache: the fused selection (interpreter) keeps
    the blocks of the PyTorch definition."""
    from stem_boost.native.infllmv2 import InfLLMv2Params, infllmv2_select

    p = InfLLMv2Params.from_sparse_config(dict(kernel_size=16, kernel_stride=8, init_blocks=1, block_size=32,
                                               window_size=128, topk=16, use_nope=False, dense_len=512))
    T = int(torch.randint(600, 1100, (1,)))
    q, k = torch.randn(1, 8, n_queries, 16), torch.randn(1, 2, T, 16)
    want = infllmv2_select(q, k, p, q_offset=T - n_queries, use_fused=False, score_dtype=None)
    got = infllmv2_select(q, k, p, q_offset=T - n_queries, use_fused=True)
    assert torch.equal(got.counts, want.counts)
    for h in range(2):
        for s in range(n_queries):
            assert set(got.idx[0, h, s].tolist()) - {-1} == set(want.idx[0, h, s].tolist()) - {-1}, (h, s, T)


def test_mass_schedule_in_the_fused_selection_equals_pytorch(seed):
    """Stem's mass schedule (budgets from each chunk's pooled scores) through the fused selection
    (`chunk_budgets`: three launches per chunk) selects the blocks of the PyTorch path, fp32, with
    the OAM bias (the native ranking is the bias-free case of the same kernel code)."""
    from stem_boost.adapters.infllmv2 import mass_free_budgets
    from stem_boost.native.infllmv2 import infllmv2_select

    gen = torch.Generator().manual_seed(seed)
    p = _small_params()
    B, Hk, G, D, T = 2, 1, 2, 16, 200
    q = torch.randn(B, Hk * G, T, D, generator=gen)
    k = torch.randn(B, Hk, T, D, generator=gen)
    q_block = torch.arange(T) // p.block_size
    n_forced = p.init_blocks + p.local_blocks + 1
    native_free = torch.clamp(q_block + 1 - n_forced, min=0).clamp(max=p.k_total(T) - n_forced)
    bias = 0.3 * torch.randn(B, Hk, -(-T // p.block_size), generator=gen)
    kw = dict(chunk_size=112, key_bias=bias, free_budget_fn=mass_free_budgets(native_free, 0.3))
    fused = infllmv2_select(q, k, p, use_fused=True, **kw)
    ref = infllmv2_select(q, k, p, use_fused=False, **kw)
    assert torch.equal(fused.counts, ref.counts)
    km = max(fused.idx.shape[-1], ref.idx.shape[-1])
    pad = lambda t: torch.nn.functional.pad(t, (0, km - t.shape[-1]), value=-1)  # noqa: E731
    assert torch.equal(pad(fused.idx), pad(ref.idx))
    # the cut happened: fewer free blocks than the native selection, at most the native count per row
    native = infllmv2_select(q, k, p, use_fused=False, chunk_size=112)
    assert 0 < int(fused.counts.sum()) < int(native.counts.sum())
    assert bool((fused.counts <= native.counts).all())


def test_stem_schedule_cached_per_length_and_no_device_read_for_the_list_width(seed):
    """A layer plans each (keys, queries) length once (`token_plan` with the layer's cache) and hands
    the selector its list width from the host: the fused selection (Triton interpreter) then gives
    the same blocks as when it reads max(budgets) from the device."""
    from stem_boost.adapters.infllmv2 import token_plan
    from stem_boost.config import StemConfig
    from stem_boost.native.infllmv2 import InfLLMv2Params, infllmv2_select

    params = InfLLMv2Params.from_sparse_config(dict(kernel_size=8, kernel_stride=4, init_blocks=1, block_size=16,
                                                    window_size=32, topk=12, use_nope=False, dense_len=64))
    cfg = StemConfig(reduce=0.3)
    cache: dict = {}
    S = 160
    a = token_plan(params, S, S, cfg, torch.device("cpu"), cache)
    assert token_plan(params, S, S, cfg, torch.device("cpu"), cache) is a  # planned once per length
    assert token_plan(params, S + 16, S + 16, cfg, torch.device("cpu"), cache) is not a
    assert a.k_free.shape == (S,) and a.k_free_max == int(a.k_free.max())
    assert torch.equal(a.k_free, a.plan.budgets[torch.arange(S) // params.block_size])

    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 4, S, 16, generator=gen), torch.randn(1, 2, S, 16, generator=gen)
    bias = torch.randn(1, 2, S // params.block_size, generator=gen)
    kw = dict(key_bias=bias, k_free=a.k_free, use_fused=True, chunk_size=64)
    read = infllmv2_select(q, k, params, **kw)
    given = infllmv2_select(q, k, params, k_free_max=a.k_free_max, **kw)
    assert torch.equal(read.idx, given.idx) and torch.equal(read.counts, given.counts), f"seed {seed}"
    assert int(read.counts.min()) < int(read.counts.max())  # the budgets vary along the rows


@pytest.mark.parametrize("NB,C,rows", [(37, 13, 4), (300, 11, 8), (12, 7, 2)])
def test_block_topk_one_row_a_warp_equals_one_row_a_program(NB, C, rows, seed):
    """`block_topk(method="warp")` writes the lists, counts and forced counts of the measured
    default on random scores: natively, with Stem's bias and budgets, and with left padding; chunk
    rows not a multiple of the rows a program, rows of one to ten 32-block chunks."""
    from stem_boost.kernels.infllmv2_select import block_topk

    gen = torch.Generator().manual_seed(seed)
    B, Hk, bs = 2, 2, 16
    q_pos0 = NB * bs - C
    scores = torch.randn(B, Hk, C, NB, generator=gen)
    scores[torch.rand(B, Hk, C, NB, generator=gen) < 0.05] = float("-inf")
    bias = torch.randn(B, Hk, NB, generator=gen)
    budgets = torch.randint(0, 14, (B, Hk, C), generator=gen)
    seq_start = torch.tensor([0, 3 * bs + 5], dtype=torch.int32)
    for kw in (dict(), dict(key_bias=bias, budgets=budgets), dict(seq_start=seq_start, budgets=budgets)):
        common = dict(q_pos0=q_pos0, block_size=bs, init_blocks=1, local_blocks=2, k_total=10, kmax=min(NB, 17), **kw)
        ref = block_topk(scores, method="program", **common)
        got = block_topk(scores, method="warp", rows_per_program=rows, **common)
        for name, a, r in zip(("idx", "counts", "n_forced"), got, ref):
            assert torch.equal(a, r), f"seed {seed}: {name} differs with {sorted(kw)}"


@pytest.mark.parametrize("method", ["program", "warp"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_block_topk_on_rounded_scores_ranks_the_short_keys_alike(method, dtype, seed):
    """`score_dtype`: scores that are bf16 / fp16 values rank on their 16 / 19 meaningful key bits
    (fewer bisection steps) with the lists of the 32-bit ranking and of `topk_blocks`: rounding makes
    many exact ties, and -inf, NaN, zeros and negatives are among them; with Stem's bias the keys
    are fp32 and the argument changes nothing."""
    from stem_boost.kernels.infllmv2_select import block_topk
    from stem_boost.native.infllmv2 import topk_blocks

    gen = torch.Generator().manual_seed(seed)
    B, Hk, C, NB, bs = 2, 2, 13, 300, 16
    q_pos0 = NB * bs - C
    scores = (torch.rand(B, Hk, C, NB, generator=gen) * 2 - 0.2).to(dtype).float()  # 13 % negatives
    scores[torch.rand(B, Hk, C, NB, generator=gen) < 0.05] = float("-inf")
    scores[torch.rand(B, Hk, C, NB, generator=gen) < 0.02] = 0.0
    scores[..., 7] = float("nan")
    budgets = torch.randint(0, 120, (B, Hk, C), generator=gen)
    budgets[0, 0, :3] = NB  # rows that want more than they have: every candidate, -inf ones included
    common = dict(q_pos0=q_pos0, block_size=bs, init_blocks=1, local_blocks=2, k_total=40, kmax=NB, method=method)
    full = block_topk(scores, budgets=budgets, **common)
    short = block_topk(scores, budgets=budgets, score_dtype=dtype, **common,
                       **(dict(num_warps=2) if method == "program" else {}))  # 2 warps: several keys a thread
    for name, a, r in zip(("idx", "counts", "n_forced"), short, full):
        assert torch.equal(a, r), f"seed {seed}: {name} differs with score_dtype={dtype}"
    qb = (torch.arange(C) + q_pos0) // bs
    blk = torch.arange(NB)
    cand = blk[None] <= qb[:, None]
    forced = cand & ((blk[None] < 1) | (blk[None] >= qb[:, None] - 2))
    ref_idx, _, _, ref_counts = topk_blocks(scores, forced, cand, k_free=budgets)
    assert torch.equal(short[1], ref_counts), f"seed {seed}"
    assert torch.equal(short[0][..., : ref_idx.shape[-1]], ref_idx), f"seed {seed}"
    bias = torch.randn(B, Hk, NB, generator=gen)
    with_bias = [block_topk(scores, budgets=budgets, key_bias=bias, score_dtype=d, **common) for d in (None, dtype)]
    for name, a, r in zip(("idx", "counts", "n_forced"), *with_bias):
        assert torch.equal(a, r), f"seed {seed}: {name} differs with the bias"


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_block_topk_interpolation_search_keeps_the_same_lists(dtype, seed):
    """`search="interpolate"` (and "auto", the default: the interpolation on rounded keys) writes the
    lists, counts and forced counts of the bisection: 32-, 16- and 19-bit keys, ties from rounding,
    -inf, NaN, budgets past the candidates; and with Stem's bias."""
    from stem_boost.kernels.infllmv2_select import block_topk

    gen = torch.Generator().manual_seed(seed)
    B, Hk, C, NB, bs = 1, 1, 6, 140, 16
    scores = torch.rand(B, Hk, C, NB, generator=gen) * 2 - 0.3
    scores = scores.to(dtype).float() if dtype is not None else torch.round(scores * 64) / 64
    scores[torch.rand(B, Hk, C, NB, generator=gen) < 0.05] = float("-inf")
    scores[..., 3] = float("nan")
    budgets = torch.randint(0, 60, (B, Hk, C), generator=gen)
    budgets[0, 0, :2] = NB
    common = dict(q_pos0=NB * bs - C, block_size=bs, init_blocks=1, local_blocks=2, k_total=30, kmax=NB,
                  budgets=budgets, score_dtype=dtype, num_warps=2)
    for bias in (None, torch.randn(B, Hk, NB, generator=gen)):
        bisect = block_topk(scores, key_bias=bias, search="bisect", **common)
        for search in ("interpolate", "auto"):
            got = block_topk(scores, key_bias=bias, search=search, **common)
            for name, a, r in zip(("idx", "counts", "n_forced"), got, bisect):
                assert torch.equal(a, r), f"seed {seed}: {name} differs with {search} (bias: {bias is not None})"


def test_block_topk_refuses_unknown_method_and_rows():
    from stem_boost.kernels.infllmv2_select import block_topk

    scores = torch.randn(1, 1, 4, 8)
    common = dict(q_pos0=60, block_size=16, init_blocks=1, local_blocks=1, k_total=4, kmax=8)
    with pytest.raises(ValueError, match="method='radix'; allowed: program, warp"):
        block_topk(scores, method="radix", **common)
    with pytest.raises(ValueError, match="rows_per_program=3; allowed"):
        block_topk(scores, method="warp", rows_per_program=3, **common)
    with pytest.raises(ValueError, match="num_warps=3"):
        block_topk(scores, num_warps=3, **common)
    with pytest.raises(ValueError, match="search='radix'; allowed: 'auto', 'bisect', 'interpolate'"):
        block_topk(scores, search="radix", **common)


def test_sm90_pooled_kernel_names_what_it_refuses():
    """The Gluon pooled stage-1 kernel (Hopper only) checks its arguments before any launch, on any machine."""
    from stem_boost.kernels.infllmv2_pooled_sm90 import pooled_block_scores_sm90

    def call(q, pool=4, tile=None):
        k1 = torch.randn(1, 2, 8, q.shape[-1]).to(q.dtype)
        return pooled_block_scores_sm90(q, k1, torch.randn(1, 4, 5), torch.full((5,), 8, dtype=torch.int32), 2,
                                        pool, 0.1, q_pos0=0, block_size=64, tile=tile)

    q = torch.randn(1, 4, 5, 128).to(torch.bfloat16)
    with pytest.raises(ValueError, match="head dim 32"):
        call(torch.randn(1, 4, 5, 32).to(torch.bfloat16))
    with pytest.raises(ValueError, match="torch.float32"):
        call(torch.randn(1, 4, 5, 128))
    with pytest.raises(ValueError, match=r"pool \(3\)"):
        call(q, pool=3)
    with pytest.raises(ValueError, match="unknown tile options"):
        call(q, tile=dict(BLOCK_M=64))
    with pytest.raises(ValueError, match="BLOCK_B <= 256 / pool"):
        call(q, tile=dict(BLOCK_B=128))
    with pytest.raises(ValueError, match="WARPS 4 or 8"):
        call(q, tile=dict(WARPS=16))
    with pytest.raises(ValueError, match="a multiple of 8"):
        call(q, tile=dict(BLOCK_B=3, WARPS=8))
    with pytest.raises(ValueError, match="STEP=1; allowed: 0"):
        call(q, tile=dict(STEP=1))


def test_pooled_scores_kernel_choice_is_checked():
    """`pooled_block_scores(kernel=...)`: an unknown name, or the Gluon kernel where it cannot run (here:
    a CPU tensor), is refused with what is allowed; None picks the Triton kernel here."""
    from stem_boost.kernels.infllmv2_pooled_sm90 import supports_pooled_sm90
    from stem_boost.kernels.infllmv2_select import pooled_block_scores

    q = torch.randn(1, 4, 5, 64).to(torch.bfloat16)
    args = (q, torch.randn(1, 2, 8, 64), torch.randn(1, 4, 5), torch.full((5,), 8, dtype=torch.int32), 2, 4, 0.1)
    with pytest.raises(ValueError, match="kernel='cuda'; allowed: None"):
        pooled_block_scores(*args, q_pos0=0, block_size=16, kernel="cuda")
    with pytest.raises(ValueError, match="needs CUDA compute capability 9.x"):
        pooled_block_scores(*args, q_pos0=0, block_size=16, kernel="gluon")
    assert not supports_pooled_sm90(q, 4)
    assert torch.equal(pooled_block_scores(*args, q_pos0=0, block_size=16)[..., :1],
                       pooled_block_scores(*args, q_pos0=0, block_size=16, kernel="triton")[..., :1])  # block 1 is unwritten


def test_pooled_scores_same_in_either_launch_order(seed):
    """The pooled stage-1 kernel with key tiles on the grid's fast axis (`keys_fast`) writes the same
    bits as with query tiles there: launch order changes which programs share L2, not their sums."""
    from stem_boost.kernels.infllmv2_geometry import compress_keys, num_compressed, visible_compressed
    from stem_boost.kernels.infllmv2_scores import coarse_lse
    from stem_boost.kernels.infllmv2_select import pooled_block_scores

    Hk, G, C, T, D, block, stride, size, pool = 2, 3, 40, 160, 16, 16, 4, 8, 4
    q, k = torch.randn(1, Hk * G, C, D), torch.randn(1, Hk, T, D)
    k1, k2 = compress_keys(k, size, stride), compress_keys(k, 2 * size, 2 * stride)
    K1, K2 = num_compressed(T, size, stride), num_compressed(T, 2 * size, 2 * stride)
    q_pos = torch.arange(T - C, T)
    vis1 = visible_compressed(q_pos, K1, size, stride, 0).to(torch.int32)
    lse = coarse_lse(q, k2, visible_compressed(q_pos, K2, 2 * size, 2 * stride, 0).to(torch.int32), D ** -0.5)
    nbc = (T - 1) // block + 1
    kw = dict(q_pos0=T - C, block_size=block, n_existing=K1, block_s=16, block_b=4,
              key_bias=torch.randn(1, Hk, nbc) * 0.3)
    want = pooled_block_scores(q, k1, lse, vis1, nbc, pool, D ** -0.5, keys_fast=False, **kw)
    got = pooled_block_scores(q, k1, lse, vis1, nbc, pool, D ** -0.5, keys_fast=True, **kw)
    seen = torch.arange(nbc)[None, :] <= (q_pos // block)[:, None]  # the rest is unwritten by both
    assert torch.equal(got[:, :, seen], want[:, :, seen]), f"seed={seed}"


@pytest.mark.parametrize("G,rows,block_n", [(4, 16, 16), (4, 64, 32), (3, 128, 16)])
def test_coarse_lse_same_for_any_tile(seed, G, rows, block_n):
    """The coarse lse's tile knobs (rows a program, keys a step) change the order of its sums only:
    equal to the default tile within fp32 rounding, -inf where a row sees no coarse key; a row count
    that is not a power of two is refused by name."""
    from stem_boost.kernels.infllmv2_scores import coarse_lse

    Hk, C, K2, D = 2, 37, 29, 16
    q, k2 = torch.randn(1, Hk * G, C, D), torch.randn(1, Hk, K2, D)
    vis2 = torch.randint(0, K2 + 1, (C,)).sort().values.to(torch.int32)
    vis2[:3] = 0
    want = coarse_lse(q, k2, vis2, D ** -0.5)
    got = coarse_lse(q, k2, vis2, D ** -0.5, rows=rows, block_n=block_n)
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and bool(torch.isinf(want[..., :3]).all()), f"seed={seed}"
    fin = torch.isfinite(want)
    assert torch.allclose(got[fin], want[fin], rtol=1e-5, atol=1e-5), f"seed={seed}"
    with pytest.raises(ValueError, match="rows=48: a power of two"):
        coarse_lse(q, k2, vis2, D ** -0.5, rows=48)


def test_block_union_kernel_choice(seed):
    """kernel="triton" is the CPU path (the same output as the default); the Gluon kernel where it cannot
    run, or an unknown executor, is refused naming the values."""
    from stem_boost.kernels.block_union import block_union_attention

    gen = torch.Generator().manual_seed(seed)
    B, S, T, Hkv, G, D, bs = 1, 20, 20, 1, 4, 16, 16
    idx, counts = _sorted_lists(B, Hkv, S, T, bs, 3, 0, True, gen)
    q = torch.randn(B, S, Hkv * G, D, generator=gen)
    k, v = torch.randn(B, T, Hkv, D, generator=gen), torch.randn(B, T, Hkv, D, generator=gen)
    out = block_union_attention(q, k, v, idx, counts, block_size=bs)
    assert torch.equal(out, block_union_attention(q, k, v, idx, counts, block_size=bs, kernel="triton")), f"seed {seed}"
    with pytest.raises(ValueError, match=r"kernel='sm90' needs CUDA.*torch.float32, D 16, Dv 16, block_size 16"):
        block_union_attention(q, k, v, idx, counts, block_size=bs, kernel="sm90")
    with pytest.raises(ValueError, match=r"kernel='cuda'; allowed: None, 'triton', 'sm90'"):
        block_union_attention(q, k, v, idx, counts, block_size=bs, kernel="cuda")


def test_block_union_triton_knobs_select_triton(seed, monkeypatch):
    """The Triton kernel's knobs (num_warps, num_stages, use_tma, warp_specialize) select it when no
    kernel is named (its output, bit for bit), and are refused with kernel="sm90", naming them. The
    route is checked on the CPU with the Gluon kernel made to look runnable (and to fail if called)."""
    from stem_boost.kernels import block_union, block_union_sm90
    from stem_boost.kernels.block_union import block_union_attention

    class GluonCalled(Exception):
        pass

    def gluon_kernel(*args, **kwargs):
        raise GluonCalled
    monkeypatch.setattr(block_union, "UNION_KERNEL", "sm90")
    monkeypatch.setattr(block_union_sm90, "supports_block_union_sm90", lambda *args: True)
    monkeypatch.setattr(block_union_sm90, "block_union_sm90", gluon_kernel)

    gen = torch.Generator().manual_seed(seed)
    B, S, T, Hkv, G, D, bs = 1, 20, 20, 1, 4, 16, 16
    idx, counts = _sorted_lists(B, Hkv, S, T, bs, 3, 0, True, gen)
    q = torch.randn(B, S, Hkv * G, D, generator=gen)
    k, v = torch.randn(B, T, Hkv, D, generator=gen), torch.randn(B, T, Hkv, D, generator=gen)
    with pytest.raises(GluonCalled):  # no knob: the default executor, here the (stand-in) Gluon kernel
        block_union_attention(q, k, v, idx, counts, block_size=bs)
    ref = block_union_attention(q, k, v, idx, counts, block_size=bs, kernel="triton", num_stages=2)
    for knob in (dict(num_stages=2), dict(num_warps=4), dict(use_tma=False), dict(warp_specialize=True)):
        out = block_union_attention(q, k, v, idx, counts, block_size=bs, **({"num_stages": 2} | knob))
        assert torch.equal(out, ref), f"seed {seed}, {knob}"
    with pytest.raises(ValueError, match=r"\{'num_stages': 2\} tune the Triton kernel; kernel='sm90' takes none"):
        block_union_attention(q, k, v, idx, counts, block_size=bs, kernel="sm90", num_stages=2)


def test_block_union_routes_row_lists_to_the_warp_specialised_kernel(seed, monkeypatch):
    """By default on Hopper, row lists whose 128-row flat tiles each lie in one selection row (query_block * G a
    multiple of 128) run the warp-specialised kernel with the caller's tile; per-token lists and row lists that
    do not fit keep the 64-row Gluon kernel; with `UNION_KERNEL = "sm90_ws"` per-token lists take it too, on the
    union of 2 QT tokens. Checked on the CPU with both kernels made to look runnable and recorded instead of run."""
    from stem_boost.kernels import block_union, block_union_sm90
    from stem_boost.kernels.block_union import block_union_attention

    calls = []
    assert block_union.ROWS_KERNEL == "sm90_ws" and block_union.UNION_KERNEL == "sm90"  # the shipped defaults
    monkeypatch.setattr(block_union_sm90, "supports_block_union_sm90", lambda *args: True)
    monkeypatch.setattr(block_union_sm90, "block_sm90_ws", lambda *a, **kw: calls.append(("ws", kw["tile"])))
    monkeypatch.setattr(block_union_sm90, "block_union_sm90", lambda *a, **kw: calls.append(("m64", kw["tile"])))
    gen = torch.Generator().manual_seed(seed)
    Hkv, D, bs = 2, 16, 64
    for G, query_block, want in ((16, 64, "ws"), (6, 64, "ws"), (8, 16, "ws"), (5, 64, "m64"), (16, 1, "m64")):
        S = 2 * query_block if query_block > 1 else 40
        R = -(-S // query_block)
        idx = torch.zeros(1, Hkv, R, 1, dtype=torch.int32)
        counts = torch.ones(1, Hkv, R, dtype=torch.int32)
        q = torch.randn(1, S, Hkv * G, D, generator=gen)
        k, v = torch.randn(1, S, Hkv, D, generator=gen), torch.randn(1, S, Hkv, D, generator=gen)
        calls.clear()
        block_union_attention(q, k, v, idx, counts, block_size=bs, query_block=query_block, tile={"NUM_BUF": 4})
        assert calls == [(want, {"NUM_BUF": 4})], f"seed {seed}: G {G}, query_block {query_block}: {calls}"
    # per-token lists with UNION_KERNEL = "sm90_ws": the union of 2 QT = 8 tokens' lists a program (G = 16)
    monkeypatch.setattr(block_union, "UNION_KERNEL", "sm90_ws")
    monkeypatch.setattr(block_union_sm90, "block_sm90_ws", lambda *a, **kw: calls.append(("ws", a[3].shape, kw["qt"])))
    S, G = 40, 16
    idx, counts = _sorted_lists(1, Hkv, S, S, bs, 3, 0, True, gen)
    q = torch.randn(1, S, Hkv * G, D, generator=gen)
    k, v = torch.randn(1, S, Hkv, D, generator=gen), torch.randn(1, S, Hkv, D, generator=gen)
    calls.clear()
    block_union_attention(q, k, v, idx, counts, block_size=bs)
    assert len(calls) == 1 and calls[0][0] == "ws" and calls[0][1][2] == S // 8 and calls[0][2] == 4, f"seed {seed}: {calls}"
    calls.clear()  # asked for by name where it does not fit (G = 1: 32 tokens a half): refused, naming why
    q1 = torch.randn(1, S, Hkv, D, generator=gen)
    with pytest.raises(ValueError, match=r"kernel='sm90_ws' needs .*per-token lists of tiles of at most 16 tokens.*ws_fits=False"):
        block_union_attention(q1, k, v, idx, counts, block_size=bs, kernel="sm90_ws")
    assert calls == []


def test_block_union_ws_kernel_refusals(seed):
    """kernel="sm90_ws" off Hopper, a Gluon tile on the Triton route, an unknown tile option and row lists
    whose 128-row tiles would straddle two selection rows are refused, naming the values."""
    from stem_boost.kernels.block_union import block_union_attention
    from stem_boost.kernels.block_union_sm90 import SM90_WS_TILE, block_sm90_ws

    gen = torch.Generator().manual_seed(seed)
    S, Hkv, G, D = 128, 2, 16, 16
    q = torch.randn(1, S, Hkv * G, D, generator=gen)
    k, v = torch.randn(1, S, Hkv, D, generator=gen), torch.randn(1, S, Hkv, D, generator=gen)
    idx, counts = torch.zeros(1, Hkv, 2, 1, dtype=torch.int32), torch.ones(1, Hkv, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"kernel='sm90_ws' needs CUDA.*torch.float32, D 16, Dv 16, block_size 64"):
        block_union_attention(q, k, v, idx, counts, block_size=64, query_block=64, kernel="sm90_ws")
    with pytest.raises(ValueError, match=r"tile=\{'NUM_BUF': 4\} sets a Gluon kernel's tile; this call runs the Triton"):
        block_union_attention(q, k, v, idx, counts, block_size=64, query_block=64, tile={"NUM_BUF": 4})
    out = torch.empty_like(q)
    with pytest.raises(ValueError, match=r"unknown tile options \['STAGES'\]; allowed: " + re.escape(str(sorted(SM90_WS_TILE)))):
        block_sm90_ws(q, k, v, idx, None, counts, out, None, scale_log2=1.0, q_offset=0, causal=True, row_lists=True,
                      query_block=64, tile={"STAGES": 2})
    with pytest.raises(ValueError, match=r"query_block \* G = 4 \* 16 must be a multiple of 128 rows"):
        block_sm90_ws(q, k, v, idx, None, counts, out, None, scale_log2=1.0, q_offset=0, causal=True, row_lists=True,
                      query_block=4)
    with pytest.raises(ValueError, match=r"union tiles need 1 <= qt <= 16 tokens of G heads in 64 rows; got qt 32, G 16"):
        block_sm90_ws(q, k, v, idx, idx, counts, out, None, scale_log2=1.0, q_offset=0, causal=True, row_lists=False,
                      query_block=1, qt=32)
    with pytest.raises(ValueError, match=r"PINGPONG needs row lists"):
        block_sm90_ws(q, k, v, idx, idx, counts, out, None, scale_log2=1.0, q_offset=0, causal=True, row_lists=False,
                      query_block=1, qt=4, tile={"PINGPONG": True})
    with pytest.raises(ValueError, match=r"NUM_BUF must be >= 2"):
        block_sm90_ws(q, k, v, idx, None, counts, out, None, scale_log2=1.0, q_offset=0, causal=True, row_lists=True,
                      query_block=64, tile={"NUM_BUF": 1})
