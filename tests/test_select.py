"""stem_select against a brute-force per-row oracle; Selection.validate."""

from __future__ import annotations

import math

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stem_boost.select import stem_select
from stem_boost.selection import Selection

SETTINGS = settings(deadline=None, max_examples=80)
seeds = st.integers(0, 2**31 - 1)
NEG_INF = float("-inf")


def _oracle(cand_idx, native, bias, budgets, forced, space, by_position):
    """Python loops: forced keys + top budget candidates by (score desc, index asc) per row."""
    b, h, r, kc = cand_idx.shape
    rows = {}
    for bi in range(b):
        for hi in range(h):
            for ri in range(r):
                fset = sorted({int(x) for x in forced[bi, hi, ri] if x >= 0}) if forced is not None else []
                best = {}
                for c, s in zip(cand_idx[bi, hi, ri].tolist(), native[bi, hi, ri].tolist()):
                    if c < 0 or c in fset:
                        continue
                    if space == "logit":
                        if s == NEG_INF:
                            continue
                        score = s
                    else:
                        if s <= 0:
                            continue
                        score = math.log(s)
                    score += 0.0 if bias is None else float(bias[bi, min(hi, bias.shape[1] - 1), c])
                    best[c] = max(best.get(c, NEG_INF), score)
                ranked = sorted(best, key=lambda c: (-best[c], c))[: int(budgets[bi, hi, ri])]
                rows[bi, hi, ri] = sorted(fset + ranked) if by_position else fset + ranked
    return rows


def _check_against_oracle(sel: Selection, want: dict) -> None:
    k_max = max([1] + [len(row) for row in want.values()])
    assert sel.idx.dtype == torch.int32 and sel.counts.dtype == torch.int32
    assert sel.idx.shape[-1] == k_max
    for (bi, hi, ri), row in want.items():
        assert int(sel.counts[bi, hi, ri]) == len(row)
        assert sel.idx[bi, hi, ri].tolist() == row + [-1] * (k_max - len(row))


@st.composite
def selection_inputs(draw):
    seed = draw(seeds)
    gen = torch.Generator().manual_seed(seed)
    b, h, r = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 5))
    n_keys = draw(st.integers(1, 12))
    kc = draw(st.integers(0, n_keys))
    n_forced = draw(st.integers(0, 4))
    cand_idx = torch.rand(b, h, r, n_keys, generator=gen).argsort(-1)[..., :kc]
    if draw(st.booleans()):  # duplicates among the candidates themselves
        cand_idx = torch.randint(0, n_keys, (b, h, r, kc), generator=gen)
    cand_idx[torch.rand(cand_idx.shape, generator=gen) < draw(st.sampled_from([0.0, 0.3]))] = -1
    space = draw(st.sampled_from(["logit", "prob"]))
    if space == "logit":  # integer-valued: plenty of exact ties
        native = torch.randint(-2, 3, cand_idx.shape, generator=gen).float()
        native[torch.rand(native.shape, generator=gen) < 0.1] = NEG_INF
    else:
        native = torch.randint(0, 4, cand_idx.shape, generator=gen).float() / 4  # 0 = masked
    bias = None
    if draw(st.booleans()):
        bias = torch.randint(0, 3, (b, draw(st.sampled_from([1, h])), n_keys), generator=gen).float() / 2
    forced = torch.randint(-1, n_keys, (b, h, r, n_forced), generator=gen) if draw(st.booleans()) else None
    budget_shape = draw(st.sampled_from([(r,), (b, r), (b, h, r)]))
    budgets = torch.randint(0, kc + 2, budget_shape, generator=gen)
    return cand_idx, native, bias, budgets, forced, space


@SETTINGS
@given(inputs=selection_inputs(), by_position=st.booleans(), idx_dtype=st.sampled_from([torch.int32, torch.int64]))
def test_stem_select_matches_oracle(inputs, by_position, idx_dtype):
    cand_idx, native, bias, budgets, forced, space = inputs
    b, h, r, _ = cand_idx.shape
    sel = stem_select(
        cand_idx.to(idx_dtype), native, budgets, key_bias=bias, score_space=space,
        forced_idx=None if forced is None else forced.to(idx_dtype), sort_by_position=by_position,
    )
    full_budgets = {1: budgets[None, None], 2: budgets[:, None], 3: budgets}[budgets.dim()].expand(b, h, r)
    _check_against_oracle(sel, _oracle(cand_idx, native, bias, full_budgets, forced, space, by_position))


@SETTINGS
@given(b=st.integers(1, 2), h=st.integers(1, 3), r=st.integers(1, 5), kc=st.integers(1, 8), extra=st.integers(0, 3),
       seed=seeds)
def test_full_budget_returns_native_candidates(b, h, r, kc, extra, seed):
    gen = torch.Generator().manual_seed(seed)
    cand_idx = torch.rand(b, h, r, kc + 4, generator=gen).argsort(-1)[..., :kc].int()
    cand_idx[torch.rand(cand_idx.shape, generator=gen) < 0.25] = -1
    scores = torch.randn(cand_idx.shape, generator=gen)
    sel = stem_select(cand_idx, scores, torch.full((r,), kc + extra))
    for bi in range(b):
        for hi in range(h):
            for ri in range(r):
                native = sorted(int(c) for c in cand_idx[bi, hi, ri] if c >= 0)
                assert sel.idx[bi, hi, ri, : sel.counts[bi, hi, ri]].tolist() == native


@SETTINGS
@given(seq=st.integers(1, 40), block_size=st.integers(1, 4), query_block=st.integers(1, 4), kc=st.integers(1, 6),
       n_forced=st.integers(0, 2), seed=seeds)
def test_causal_candidates_validate(seq, block_size, query_block, kc, n_forced, seed):
    """Causally valid candidates and forced keys give a selection that validates; pairs() counts rows."""
    gen = torch.Generator().manual_seed(seed)
    n_rows = -(-seq // query_block)
    last_q = (torch.arange(n_rows) + 1).mul(query_block).clamp(max=seq) - 1
    n_valid_units = last_q // block_size + 1  # [R]
    cand_idx = (torch.rand(2, 1, n_rows, kc, generator=gen) * n_valid_units[:, None]).long()
    forced = (torch.rand(2, 1, n_rows, n_forced, generator=gen) * n_valid_units[:, None]).long()
    budgets = torch.randint(0, kc + 1, (n_rows,), generator=gen)
    sel = stem_select(cand_idx, torch.randn(cand_idx.shape, generator=gen), budgets, forced_idx=forced,
                      block_size=block_size, query_block=query_block)
    sel.validate(seq, seq)
    sel.validate(seq, seq + 5)
    assert sel.pairs() == int(sel.counts.sum()) * query_block


def _good_selection() -> Selection:
    idx = torch.tensor([[[[0, -1, -1], [0, 1, -1], [2, 0, 1]]]], dtype=torch.int32)
    counts = torch.tensor([[[1, 2, 3]]], dtype=torch.int32)
    return Selection(idx=idx, counts=counts)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s.idx.__setitem__((0, 0, 1, 1), 5), "outside"),  # beyond seq_k
        (lambda s: s.idx.__setitem__((0, 0, 0, 0), -3), "outside"),  # negative live entry
        (lambda s: s.idx.__setitem__((0, 0, 0, 0), 1), "acausal"),  # row 0 cannot see key 1
        (lambda s: s.counts.__setitem__((0, 0, 0), 4), "counts"),  # > Kmax
        (lambda s: s.counts.__setitem__((0, 0, 0), -1), "counts"),
        (lambda s: s.idx.__setitem__((0, 0, 0, 2), 0), "padding"),
        (lambda s: s.idx.__setitem__((0, 0, 2, 2), 0), "duplicate"),
    ],
)
def test_validate_raises(mutate, message):
    sel = _good_selection()
    sel.validate(3, 3)
    mutate(sel)
    with pytest.raises(ValueError, match=message):
        sel.validate(3, 3)


def test_validate_shapes_and_blocks():
    sel = _good_selection()
    with pytest.raises(ValueError, match="rows"):
        sel.validate(4, 4)
    with pytest.raises(ValueError, match="int32"):
        Selection(idx=sel.idx.long(), counts=sel.counts).validate(3, 3)
    # block granularity: 2 query positions per row, 4 tokens per key block, 8 tokens.
    idx = torch.tensor([[[[0, -1], [0, -1], [0, 1], [0, 1]]]], dtype=torch.int32)
    counts = torch.tensor([[[1, 1, 2, 2]]], dtype=torch.int32)
    blocks = Selection(idx=idx, counts=counts, block_size=4, query_block=2)
    blocks.validate(8, 8)
    assert blocks.pairs() == 12
    blocks.idx[0, 0, 1, 1], blocks.counts[0, 0, 1] = 1, 2  # row 1 (queries 2, 3) cannot see block 1
    with pytest.raises(ValueError, match="acausal"):
        blocks.validate(8, 8)
    blocks.validate(8, 8, causal=False)
    blocks.validate(8, 10)  # with a KV-cache offset of 2 the row's last query sits at 5 >= 4


def test_stem_select_rejects_bad_input():
    idx = torch.zeros(1, 1, 2, 3, dtype=torch.int32)
    scores = torch.zeros(1, 1, 2, 3)
    with pytest.raises(ValueError, match="cand_scores"):
        stem_select(idx, scores[..., :2], 1)
    with pytest.raises(ValueError, match="budgets"):
        stem_select(idx, scores, torch.tensor([1, -1]))
    with pytest.raises(ValueError, match="budgets"):
        stem_select(idx, scores, torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="key_bias"):
        stem_select(idx + 4, scores, 1, key_bias=torch.zeros(1, 1, 4))
    with pytest.raises(ValueError, match="cand_idx"):
        stem_select(idx.float(), scores, 1)
    with pytest.raises(ValueError, match="block_size"):
        stem_select(idx, scores, 1, block_size=0)


def _top_by_rule(idx: torch.Tensor, score: torch.Tensor, budget: int) -> set[int]:
    """The project's one tie rule, by brute force: higher score first, equal scores -> smaller index."""
    live = [(float(s), int(i)) for i, s in zip(idx.tolist(), score.tolist()) if i >= 0 and s > float("-inf")]
    return {i for _, i in sorted(live, key=lambda t: (-t[0], t[1]))[:budget]}


@pytest.mark.parametrize("tied", [False, True])
def test_truncate_by_score_and_stem_select_follow_one_tie_rule(tied):
    """The sort path and the exact path keep the same keys as the brute-force rule, ties included
    (tied=True draws scores from a few values, so many candidates tie at the budget's edge)."""
    from stem_boost.oam import combine_scores
    from stem_boost.select import truncate_by_score

    for _ in range(10):
        B, H, R, K, N = 2, 1, 25, 10, 40
        idx = torch.stack([torch.randperm(N)[:K] for _ in range(B * H * R)]).view(B, H, R, K).int()
        drop = torch.rand(B, H, R, K) < 0.2
        idx = torch.where(drop, -1, idx)
        raw = torch.randint(0, 3, (B, H, R, K)).float() if tied else torch.randn(B, H, R, K)
        scores = torch.where(drop, float("-inf"), raw)
        bias = torch.randint(0, 2, (B, 1, N)).float() if tied else torch.rand(B, 1, N)
        budgets = torch.randint(0, K + 1, (R,))
        a = stem_select(idx, scores, budgets, key_bias=bias)
        gathered = bias.expand(B, H, -1).gather(-1, idx.clamp_min(0).long().flatten(-2)).view_as(idx)
        oam = combine_scores(scores, gathered)
        b = truncate_by_score(idx, oam, budgets)
        for bb in range(B):
            for r in range(R):
                want = _top_by_rule(idx[bb, 0, r], oam[bb, 0, r], int(budgets[r]))
                for sel in (a, b):
                    got = {int(x) for x in sel.idx[bb, 0, r, : int(sel.counts[bb, 0, r])]}
                    assert got == want, (bb, r, got, want)


@pytest.mark.parametrize("schedule", ["tpd", "uniform", "mass"])
def test_stem_step_sort_and_exact_paths_agree(schedule):
    """`stem_step` keeps the same selection through either truncation path (the GPU-sized sort path is
    reachable on the CPU by `method=`), with padded batch rows planned on their own extents."""
    from stem_boost.boost import stem_step
    from stem_boost.config import StemConfig
    from stem_boost.selection import Selection

    B, S, K = 2, 40, 12
    cand = torch.full((B, 1, S, K), -1, dtype=torch.int32)
    for b in range(B):
        for s in range(S):
            n = min(K, s + 1)
            cand[b, 0, s, :n] = torch.randperm(s + 1)[:n].int()
    scores = torch.where(cand >= 0, torch.randn(B, 1, S, K), float("-inf"))
    native = Selection.from_padded(cand, q_offset=0, seq_start=torch.tensor([0, 5], dtype=torch.int32),
                                   seq_len=torch.tensor([S, S - 5], dtype=torch.int32))
    norms = torch.rand(B, 1, S) + 0.1
    cfg = StemConfig(reduce=0.3, schedule=schedule)
    exact, plans = stem_step(native, scores, norms, K, cfg, seq_k=S, method="exact")
    fast, _ = stem_step(native, scores, norms, K, cfg, seq_k=S, method="sort", row_chunk=7)
    assert torch.equal(exact.counts, fast.counts) and torch.equal(exact.idx, fast.idx)
    if os.environ.get("TRITON_INTERPRET") == "1":  # the GPU's Triton paths, under the interpreter
        for method in ("radix", "fused"):
            gpu, _ = stem_step(native, scores, norms, K, cfg, seq_k=S, method=method, row_chunk=16)
            w = exact.idx.shape[-1]  # "fused" keeps the candidates' width: -1 after each count
            assert torch.equal(exact.counts, gpu.counts) and torch.equal(exact.idx, gpu.idx[..., :w]), method
            assert bool((gpu.idx[..., w:] == -1).all()), method
        # the candidates already ascending (IndexerTopK.ascending): the fused cut skips its sort
        asc_idx = torch.where(cand >= 0, cand, K + S).sort(-1)
        asc = Selection.from_padded(torch.where(asc_idx.values < K + S, asc_idx.values, -1).int(), q_offset=0,
                                    seq_start=native.seq_start, seq_len=native.seq_len)
        asc_scores = scores.gather(-1, asc_idx.indices)
        got, _ = stem_step(asc, asc_scores, norms, K, cfg, seq_k=S, method="fused", candidates_ascending=True)
        assert torch.equal(got.counts, exact.counts) and torch.equal(got.idx[..., :exact.idx.shape[-1]], exact.idx)
    assert int(exact.counts[1, 0, :5].sum()) == 0  # padding rows of row 1 keep nothing
    assert plans.plans[1] is not None and plans.plans[1].budgets.numel() == S - 5
    with pytest.raises(ValueError, match="method='fast'"):
        stem_step(native, scores, norms, K, cfg, seq_k=S, method="fast")


def test_shared_units_counts_the_set_intersection_row_by_row():
    """shared_units(a, b) = (sum over rows of |set(a_row) & set(b_row)|, sum of |set(b_row)|), -1 padding
    ignored, against Python sets on random padded lists."""
    from stem_boost.selection import shared_units

    B, R, K, T = 2, 7, 5, 12
    lists = []
    for _ in range(2):
        idx = torch.full((B, 1, R, K), -1, dtype=torch.int32)
        for b in range(B):
            for r in range(R):
                n = int(torch.randint(0, K + 1, ()))
                idx[b, 0, r, :n] = torch.randperm(T)[:n].to(torch.int32)
        lists.append(idx)
    a, b = lists
    want_hits = want_total = 0
    for row_a, row_b in zip(a.reshape(-1, K).tolist(), b.reshape(-1, K).tolist()):
        sa, sb = {u for u in row_a if u >= 0}, {u for u in row_b if u >= 0}
        want_hits += len(sa & sb)
        want_total += len(sb)
    assert shared_units(a, b) == (want_hits, want_total)
    assert shared_units(b, b) == (want_total, want_total)
