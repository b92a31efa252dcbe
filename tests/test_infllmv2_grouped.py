"""Stem's grouped ranking on InfLLMv2 (`tile_tokens` / `tile_rows`): groups of consecutive query
tokens rank their non-forced blocks by their summed score, so the rows of a group keep the same
blocks and the attention kernel's union tile is one list. Checked against a brute-force definition
(PyTorch path), the fused Triton selection (interpreter) against the PyTorch path, and the wrapped
model's accounting and attention."""

from __future__ import annotations

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import stem_boost
from stem_boost.config import StemConfig
from stem_boost.kernels.infllmv2_geometry import group_budgets
from stem_boost.native.infllmv2 import (InfLLMv2Params, block_masks, group_block_scores, infllmv2_select,
                                        iter_block_scores)


def _params(**kw) -> InfLLMv2Params:
    # blocks of 16 keys: ~19 blocks at 300 keys, 4 forced (init, 2 local, diagonal), 3 free natively
    base = dict(kernel_size=16, kernel_stride=8, init_blocks=1, block_size=16, window_size=32, topk=5, dense_len=0)
    base.update(kw)
    return InfLLMv2Params(**base)


def test_group_block_scores_sums_positive_scores_row_by_row(seed):
    gen = torch.Generator().manual_seed(seed)
    B, H, C, NB, g = 2, 3, 11, 9, 4
    s = torch.randn(B, H, C, NB, generator=gen)
    s[s > 1.5] = float("nan")
    s[s < -1.5] = float("-inf")
    out = group_block_scores(s, g)
    assert out.shape == (B, H, 3, NB)
    for gi in range(3):
        want = torch.zeros(B, H, NB)
        for r in range(gi * g, min(C, gi * g + g)):
            x = s[:, :, r]
            want = want + torch.where(x > 0, x, 0.0)
        assert torch.equal(out[:, :, gi], want), f"seed {seed}: group {gi}"


def _group_budget_oracle(k_free: list[int], tile: int) -> list[int]:
    """Each group's mean budget, rounded on the running total within windows of 64 // tile groups."""
    groups = [k_free[i:i + tile] for i in range(0, len(k_free), tile)]
    per_window = max(1, 64 // tile)
    out, run, prev = [], 0.0, 0
    for gi, g in enumerate(groups):
        if gi % per_window == 0:
            run, prev = 0.0, 0
        run += sum(g) / len(g)
        out.append(round(run) - prev)  # Python rounds half to even, as torch.round
        prev = round(run)
    return out


def test_group_budgets_carry_their_rounding(seed):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randint(0, 20, (2, 150), generator=gen)  # 38 groups: three windows of 16, the last partial
    got = group_budgets(k, 4)
    for r in range(2):
        want = _group_budget_oracle(k[r].tolist(), 4)
        assert got[r].tolist() == want, f"seed {seed}"
        means = torch.tensor([k[r, i:i + 4].double().mean() for i in range(0, 150, 4)])
        assert float((got[r] - means).abs().max()) <= 1, f"seed {seed}: a budget strays from its group's mean"
        for w in range(0, 38, 16):  # the rounding does not add up within a window
            assert int(got[r, w:w + 16].sum()) == round(float(means[w:w + 16].sum())), f"seed {seed}: window {w}"
    same = torch.full((9,), 7)
    assert torch.equal(group_budgets(same, 4), torch.full((3,), 7))


def _brute_force_rows(q, k, p, *, q_offset, tile, bias, k_free):
    """Per query row r: (its forced blocks) + the best k_free of its free blocks by the group's key
    log(sum of the group rows' positive scores) + bias, ties to the smaller block. k_free [S] per row
    (the group's budget is `_group_budget_oracle`'s), None: k_total - forced."""
    S = q.shape[2]
    scores = torch.cat([bs.scores for bs in iter_block_scores(q, k, p, q_offset=q_offset, chunk_size=S)], dim=2)
    B, Hk, _, NB = scores.shape
    q_pos = torch.arange(S) + q_offset
    cand, forced = block_masks(q_pos, NB, p)
    group_budget = None if k_free is None else _group_budget_oracle([int(x) for x in k_free], tile)
    out = {}
    for b in range(B):
        for h in range(Hk):
            for r in range(S):
                g0 = r - r % tile
                rows = range(g0, min(S, g0 + tile))
                total = [sum(max(float(scores[b, h, i, j]), 0.0) if not math.isnan(float(scores[b, h, i, j])) else 0.0
                             for i in rows) for j in range(NB)]
                free = [j for j in range(NB) if cand[r, j] and not forced[r, j]]
                key = {j: (math.log(total[j]) + (float(bias[b, h, j]) if bias is not None else 0.0))
                       if total[j] > 0 else float("-inf") for j in free}
                if k_free is None:
                    budget = p.k_total(k.shape[2]) - int(forced[r].sum())
                else:
                    budget = group_budget[g0 // tile]
                best = sorted(free, key=lambda j: (-key[j], j))[:max(budget, 0)]
                out[b, h, r] = sorted(set(best) | {j for j in range(NB) if forced[r, j]})
    return out


def _lists(sel, S):
    """{(b, h, token): sorted blocks} of a BlockSelection, rows spread over their query_block tokens."""
    out = {}
    qb = sel.query_block
    for b in range(sel.idx.shape[0]):
        for h in range(sel.idx.shape[1]):
            for r in range(sel.idx.shape[2]):
                blocks = sorted(int(x) for x in sel.idx[b, h, r, :int(sel.counts[b, h, r])])
                for t in range(r * qb, min(S, r * qb + qb)):
                    out[b, h, t] = blocks
    return out


@pytest.mark.parametrize("q_offset,stem", [(0, True), (0, False), (8, True), (6, True), (6, False)])
def test_grouped_selection_equals_brute_force(q_offset, stem, seed):
    """Groups of 4 rows, fp32, two chunks: aligned groups (q_offset 0, 8) give one row a group
    (query_block 4), misaligned ones (6: a group may straddle a query block) per-token rows; every
    token's list is the brute-force one."""
    gen = torch.Generator().manual_seed(seed)
    p = _params()
    B, Hk, G, D, T = 1, 2, 2, 16, 300
    S = T - q_offset
    q = torch.randn(B, Hk * G, S, D, generator=gen)
    k = torch.randn(B, Hk, T, D, generator=gen)
    bias = 0.3 * torch.randn(B, Hk, -(-T // 16), generator=gen) if stem else None
    k_free = torch.randint(0, 6, (S,), generator=gen) if stem else None
    sel = infllmv2_select(q, k, p, q_offset=q_offset, chunk_size=128, key_bias=bias, k_free=k_free, tile_rows=4)
    assert sel.query_block == (4 if q_offset % 4 == 0 else 1)
    assert sel.idx.shape[2] == (-(-S // 4) if q_offset % 4 == 0 else S)
    want = _brute_force_rows(q, k, p, q_offset=q_offset, tile=4, bias=bias, k_free=k_free)
    got = _lists(sel, S)
    bad = [key for key in want if got[key] != want[key]]
    assert not bad, f"seed {seed}: {len(bad)} rows differ, first {bad[0]}: {got[bad[0]]} vs {want[bad[0]]}"


def test_one_token_groups_are_the_native_selection(seed):
    gen = torch.Generator().manual_seed(seed)
    p = _params()
    q = torch.randn(1, 4, 120, 16, generator=gen)
    k = torch.randn(1, 2, 120, 16, generator=gen)
    a = infllmv2_select(q, k, p, chunk_size=50)
    b = infllmv2_select(q, k, p, chunk_size=50, tile_rows=1)
    assert torch.equal(a.idx, b.idx) and torch.equal(a.counts, b.counts) and b.query_block == 1
    with pytest.raises(ValueError, match="tile_rows=0"):
        infllmv2_select(q, k, p, tile_rows=0)


@pytest.mark.parametrize("case", ["stem", "native_budget", "mass", "misaligned", "left_padding"])
def test_fused_grouped_selection_equals_pytorch(case, seed):
    """The fused selection with tile_rows 4 (pooled scores, `group_block_sums`, the top-k on the
    groups' first rows; interpreter) gives the PyTorch path's lists exactly."""
    pytest.importorskip("triton")
    from stem_boost.kernels.infllmv2_select import infllmv2_select_fused

    gen = torch.Generator().manual_seed(seed)
    p = _params()
    B, Hk, G, D, T = (2 if case == "left_padding" else 1), 2, 2, 16, 224
    q_offset = 6 if case == "misaligned" else 0
    S = T - q_offset
    q = torch.randn(B, Hk * G, S, D, generator=gen)
    k = torch.randn(B, Hk, T, D, generator=gen)
    bias = 0.3 * torch.randn(B, Hk, -(-T // 16), generator=gen)
    kw, ref_kw = dict(key_bias=bias, q_offset=q_offset, emulate_kernel_offset=False), {}
    if case in ("stem", "misaligned", "left_padding"):
        budgets = torch.randint(0, 6, (B, S), generator=gen)
        kw["budgets"] = budgets
        ref_kw["k_free"] = budgets.unsqueeze(1).expand(B, Hk, S)
    if case == "mass":
        def chunk_budgets(pooled, s0, s1):  # a budget read from the rows' own candidate scores (robust
            cand, _ = block_masks(torch.arange(s0, s1) + q_offset, pooled.shape[-1], p)  # to summation order)
            return (cand & (pooled > 0)).sum(-1) % 4  # at most the native free budget (3)
        kw["chunk_budgets"] = chunk_budgets
        ref_kw["free_budget_fn"] = lambda bs: chunk_budgets(bs.scores, bs.rows.start, bs.rows.stop)
    if case == "left_padding":
        seq_start = torch.tensor([0, 64], dtype=torch.int32)
        kw["seq_start"] = seq_start
    idx, counts, n_forced = infllmv2_select_fused(q, k, p, chunk_size=64, tile_rows=4, **kw)
    if case == "left_padding":  # the padded row equals the row alone, shifted by 4 blocks
        alone = infllmv2_select(q[1:, :, 64:], k[1:, :, 64:], p, chunk_size=64, key_bias=bias[1:, :, 4:],
                                k_free=budgets[1:, 64:].unsqueeze(1).expand(1, Hk, S - 64),
                                emulate_kernel_offset=False, tile_rows=4)
        shifted = torch.where(alone.idx[0] >= 0, alone.idx[0] + 4, -1)
        km = min(shifted.shape[-1], idx.shape[-1])
        assert torch.equal(counts[1, :, 16:], alone.counts[0]), f"seed {seed}"
        assert torch.equal(idx[1, :, 16:, :km], shifted[..., :km]), f"seed {seed}"
        B, q, k, bias, ref_kw = 1, q[:1], k[:1], bias[:1], dict(k_free=budgets[:1].unsqueeze(1).expand(1, Hk, S))
        idx, counts, n_forced = idx[:1], counts[:1], n_forced[:1]
    ref = infllmv2_select(q, k, p, q_offset=q_offset, chunk_size=64, key_bias=bias, tile_rows=4,
                          emulate_kernel_offset=False, use_fused=False, **ref_kw)
    assert idx.shape[2] == ref.idx.shape[2], f"seed {seed}: rows {idx.shape[2]} vs {ref.idx.shape[2]}"
    assert torch.equal(counts, ref.counts), f"seed {seed}"
    km = max(idx.shape[-1], ref.idx.shape[-1])
    pad = lambda t: torch.nn.functional.pad(t, (0, km - t.shape[-1]), value=-1)  # noqa: E731
    assert torch.equal(pad(idx), pad(ref.idx)), f"seed {seed}"
    assert torch.equal(n_forced, ref.forced.sum(-1).to(torch.int32)), f"seed {seed}"


@pytest.mark.parametrize("spread", [False, True])
def test_group_block_sums_kernel_in_place(spread, seed):
    pytest.importorskip("triton")
    from stem_boost.kernels.infllmv2_select import group_block_sums

    gen = torch.Generator().manual_seed(seed)
    B, H, C, NB, bs, q_pos0 = 1, 2, 14, 9, 8, 40  # rows at positions 40..53: query blocks 5 and 6
    s = torch.randn(B, H, C, NB, generator=gen)
    s[0, 0, 3, 2] = float("nan")
    before = s.clone()
    group_block_sums(s, 4, q_pos0=q_pos0, block_size=bs, spread=spread, block_n=4)
    sums = group_block_scores(before, 4)
    for r in range(C):
        g = r // 4
        last_qb = (q_pos0 + min(C, g * 4 + 4) - 1) // bs
        written = spread or r % 4 == 0
        for j in range(NB):
            want = sums[:, :, g, j] if written and j <= last_qb else before[:, :, r, j]
            assert torch.equal(s[:, :, r, j].nan_to_num(7.0), want.nan_to_num(7.0)), f"seed {seed}: row {r} block {j}"


# ------------------------------------------------------------------------------ the wrapped model
SC = dict(kernel_size=8, kernel_stride=4, init_blocks=1, block_size=16, window_size=32, topk=12,
          use_nope=False, dense_len=64)


def _model(tmp_path, seed):
    from stem_boost.models.minicpm4 import MiniCPM4Config, MiniCPM4ForCausalLM

    torch.manual_seed(seed % 10_000)
    cfg = MiniCPM4Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         initializer_range=0.1, tie_word_embeddings=False, sparse_config=dict(SC))
    MiniCPM4ForCausalLM(cfg).eval().save_pretrained(tmp_path / "m", safe_serialization=True)
    return MiniCPM4ForCausalLM.from_pretrained(tmp_path / "m").eval()


def test_wrapped_model_with_tiles_keeps_the_pairs_and_attends_its_rows(tmp_path, seed):
    """tile_tokens=4: the same pairs as per-token Stem (TPD budgets are equal in a query block), one
    row per 4 tokens, and the model's logits equal those of the same lists given per token."""
    model = _model(tmp_path, seed)
    S = 301
    ids = torch.randint(0, 96, (1, S))
    stem_boost.wrap(model, reduce=0.18, tile_tokens=1, keep_selections=True)
    with torch.no_grad():
        model(ids)
    per_token = stem_boost.stats(model)
    assert all(s.query_block == 1 for s in stem_boost.last_selections(model))
    stem_boost.wrap(model, reduce=0.18, keep_selections=True)  # the default, "auto": 4 tokens at G = 2
    with torch.no_grad():
        logits = model(ids).logits
    tiled = stem_boost.stats(model)
    assert tiled["stem_pairs"] == per_token["stem_pairs"] and tiled["native_pairs"] == per_token["native_pairs"]
    sels = stem_boost.last_selections(model)
    assert all(s.query_block == 4 and s.n_rows == -(-S // 4) for s in sels)

    # the same lists spread to one row per token, through the model's own hook: equal logits
    from stem_boost.adapters import infllmv2 as adapter

    def per_token_rows(sel):
        rows = torch.arange(S) // 4
        return type(sel)(idx=sel.idx[:, :, rows], counts=sel.counts[:, :, rows], block_size=sel.block_size,
                         query_block=1, q_offset=sel.q_offset, n_forced=sel.n_forced[:, :, rows], ordered=True)

    original = adapter.attend_blocks
    try:
        adapter.attend_blocks = lambda q, k, v, sel, scale, backend: original(q, k, v, per_token_rows(sel), scale,
                                                                             backend)
        with torch.no_grad():
            spread = model(ids).logits
    finally:
        adapter.attend_blocks = original
    assert (spread - logits).abs().max().item() <= 1e-5, f"seed {seed}"


def test_tile_tokens_is_validated_and_auto_keeps_the_identity():
    for bad in (0, -1, 1.5, True, "4", "all"):
        with pytest.raises(ValueError, match="tile_tokens"):
            StemConfig(tile_tokens=bad)
    assert StemConfig(reduce=0.0, beta=0.0).is_identity and StemConfig(reduce=0.0, beta=0.0).tile_tokens_for(16) == 1
    assert not StemConfig(reduce=0.0, beta=0.0, tile_tokens=4).is_identity
    auto = StemConfig(reduce=0.18)
    assert [auto.tile_tokens_for(g) for g in (1, 3, 16, 32, 64, 128)] == [4, 4, 4, 2, 1, 1]
    assert StemConfig(reduce=0.18, tile_tokens=8).tile_tokens_for(16) == 8


def test_tile_entries_counts_a_union_per_tile_and_a_row_of_the_tiles_tokens_once(seed):
    """`block_union.tile_entries`: per-token lists walk each 4-token tile's union (a Python set per tile),
    a row that holds 4 tokens walks its own list."""
    from stem_boost.kernels.block_union import tile_entries

    gen = torch.Generator().manual_seed(seed)
    S, K = 37, 6
    idx = torch.sort(torch.randint(0, 40, (1, 2, S, K), generator=gen), dim=-1).values.to(torch.int32)
    counts = torch.randint(1, K + 1, (1, 2, S), generator=gen).to(torch.int32)
    idx = torch.where(torch.arange(K) < counts[..., None], idx, -1)
    want = sum(len({int(b) for t in range(t0, min(S, t0 + 4)) for b in idx[0, h, t, :int(counts[0, h, t])]})
               for h in range(2) for t0 in range(0, S, 4))
    assert tile_entries(idx, counts, 4) == want, f"seed {seed}"
    assert tile_entries(idx[:, :, ::4], counts[:, :, ::4], 4, query_block=4) == int(counts[:, :, ::4].sum())
