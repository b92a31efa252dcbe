"""Output-Aware Metric: norms, pooling, head aggregation, bias formulas, score combination."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stem_boost.oam import aggregate_heads, block_max, combine_scores, oam_bias, value_norms
from stem_boost.select import stem_select

SETTINGS = settings(deadline=None, max_examples=50)
seeds = st.integers(0, 2**31 - 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- norms and pooling
@SETTINGS
@given(b=st.integers(1, 2), t=st.integers(0, 9), h=st.integers(1, 4), d=st.integers(1, 8), seed=seeds,
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_value_norms_matches_loop(b, t, h, d, seed, dtype):
    v = torch.randn(b, t, h, d, generator=_gen(seed)).to(dtype)
    got = value_norms(v)
    assert got.dtype == torch.float32 and got.shape == (b, h, t)
    vn = v.float().numpy().astype(np.float64)
    for bi in range(b):
        for hi in range(h):
            for ti in range(t):
                want = float(np.linalg.norm(vn[bi, ti, hi]))
                assert float(got[bi, hi, ti]) == pytest.approx(want, rel=1e-5, abs=1e-6)


@SETTINGS
@given(b=st.integers(1, 2), h=st.integers(1, 3), t=st.integers(0, 20), block=st.integers(1, 7), seed=seeds)
def test_block_max_matches_loop(b, h, t, block, seed):
    norms = torch.rand(b, h, t, generator=_gen(seed))
    got = block_max(norms, block)
    n_blocks = -(-t // block)
    assert got.shape == (b, h, n_blocks)
    for bi in range(b):
        for hi in range(h):
            for blk in range(n_blocks):
                assert float(got[bi, hi, blk]) == max(norms[bi, hi, blk * block : (blk + 1) * block].tolist())


@SETTINGS
@given(b=st.integers(1, 2), n_sel=st.integers(1, 3), group=st.integers(1, 4), n=st.integers(1, 6),
       how=st.sampled_from(["rms", "max", "mean"]), seed=seeds)
def test_aggregate_heads_matches_loop(b, n_sel, group, n, how, seed):
    norms = torch.rand(b, n_sel * group, n, generator=_gen(seed))
    got = aggregate_heads(norms, n_sel, how)
    assert got.shape == (b, n_sel, n)
    for bi in range(b):
        for g in range(n_sel):
            for j in range(n):
                vals = [float(norms[bi, g * group + k, j]) for k in range(group)]
                want = {
                    "rms": math.sqrt(sum(x * x for x in vals) / group),
                    "max": max(vals),
                    "mean": sum(vals) / group,
                }[how]
                assert float(got[bi, g, j]) == pytest.approx(want, rel=1e-5)


def test_aggregate_heads_rejects_bad_groups():
    with pytest.raises(ValueError, match="n_sel"):
        aggregate_heads(torch.rand(1, 6, 3), 4)
    with pytest.raises(ValueError, match="how"):
        aggregate_heads(torch.rand(1, 6, 3), 3, "median")
    with pytest.raises(ValueError, match="block_size"):
        block_max(torch.rand(1, 6, 3), 0)


# ----------------------------------------------------------------------------- bias formulas
@SETTINGS
@given(b=st.integers(1, 2), hs=st.integers(1, 3), n=st.integers(1, 12), beta=st.floats(0.0, 1.0),
       use_valid=st.booleans(), seed=seeds)
def test_oam_bias_zscore_matches_numpy(b, hs, n, beta, use_valid, seed):
    gen = _gen(seed)
    norms = torch.rand(b, hs, n, generator=gen) * 4
    norms[torch.rand(norms.shape, generator=gen) < 0.1] = 0.0  # zero norms are floored at eps
    valid = torch.rand(b, n, generator=gen) < 0.7 if use_valid else None
    eps = 1e-6
    got = oam_bias(norms, beta=beta, norm="zscore", valid=valid, eps=eps)
    assert got.dtype == torch.float32 and got.shape == (b, hs, n)
    ok = np.ones((b, n), bool) if valid is None else valid.numpy()
    log_n = np.log(np.maximum(norms.numpy().astype(np.float64), eps))
    for bi in range(b):
        for hi in range(hs):
            sel = log_n[bi, hi, ok[bi]]
            for j in range(n):
                if not ok[bi, j]:
                    assert float(got[bi, hi, j]) == 0.0
                    continue
                z = (log_n[bi, hi, j] - sel.mean()) / (sel.std() + eps)
                # fp32 rounds each log-norm by up to 2**-24 of the largest |log|; the z-score divides
                # that by the std, so nearly equal norms (a tiny std) magnify it: the tolerance
                # follows that conditioning (8 roundings' worth), not a fixed 1e-4
                cond = 8 * 2.0 ** -24 * np.abs(sel).max() / (sel.std() + eps)
                assert float(got[bi, hi, j]) == pytest.approx(beta * max(z, 0.0), rel=1e-4, abs=1e-4 + beta * cond)


@SETTINGS
@given(b=st.integers(1, 2), hs=st.integers(1, 3), n=st.integers(1, 12), beta=st.floats(0.0, 1.0),
       use_valid=st.booleans(), seed=seeds)
def test_oam_bias_raw_matches_paper(b, hs, n, beta, use_valid, seed):
    gen = _gen(seed)
    norms = torch.rand(b, hs, n, generator=gen) * 5
    valid = torch.rand(b, n, generator=gen) < 0.7 if use_valid else None
    got = oam_bias(norms, beta=beta, norm="raw", valid=valid)
    for bi in range(b):
        for hi in range(hs):
            for j in range(n):
                want = beta * max(0.0, math.log(max(float(norms[bi, hi, j]), 1e-6)))
                if valid is not None and not valid[bi, j]:
                    want = 0.0
                assert float(got[bi, hi, j]) == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_oam_bias_rejects_bad_arguments():
    norms = torch.rand(1, 2, 5)
    with pytest.raises(ValueError, match="beta"):
        oam_bias(norms, beta=-0.1)
    with pytest.raises(ValueError, match="norm"):
        oam_bias(norms, norm="minmax")
    with pytest.raises(ValueError, match="valid"):
        oam_bias(norms, valid=torch.ones(1, 4, dtype=torch.bool))


# ----------------------------------------------------------------------------- combine_scores
@SETTINGS
@given(n=st.integers(1, 20), seed=seeds)
def test_combine_scores_spaces(n, seed):
    gen = _gen(seed)
    bias = torch.rand(n, generator=gen)
    logits = torch.randn(n, generator=gen)
    logits[torch.rand(n, generator=gen) < 0.3] = float("-inf")
    got = combine_scores(logits, bias, "logit")
    for x, bb, g in zip(logits.tolist(), bias.tolist(), got.tolist()):
        assert g == float("-inf") if x == float("-inf") else g == pytest.approx(x + bb, rel=1e-6)
    probs = torch.rand(n, generator=gen)
    probs[torch.rand(n, generator=gen) < 0.3] = 0.0
    got = combine_scores(probs, bias, "prob")
    for p, bb, g in zip(probs.tolist(), bias.tolist(), got.tolist()):
        assert g == float("-inf") if p <= 0 else g == pytest.approx(math.log(p) + bb, rel=1e-5, abs=1e-6)
    # monotone in the native score for a fixed bias
    sorted_p = probs.sort().values
    combined = combine_scores(sorted_p, torch.tensor(0.3), "prob")
    assert bool((combined[1:] >= combined[:-1]).all())
    with pytest.raises(ValueError, match="space"):
        combine_scores(probs, bias, "softmax")


# ----------------------------------------------------------------------------- ranking properties
def _scores(shape, ties: bool, gen: torch.Generator) -> torch.Tensor:
    """Integer-valued scores (many exact ties) or continuous ones."""
    return torch.randint(-2, 3, shape, generator=gen).float() if ties else torch.randn(shape, generator=gen)


def _native_order_oracle(cand_idx, scores, budgets):
    """Per row: valid candidates by (native score desc, index asc), first budgets[r] of them."""
    b, h, r, _ = cand_idx.shape
    out = {}
    for bi in range(b):
        for hi in range(h):
            for ri in range(r):
                pairs = [(float(s), int(c)) for c, s in zip(cand_idx[bi, hi, ri], scores[bi, hi, ri]) if c >= 0]
                pairs.sort(key=lambda p: (-p[0], p[1]))
                out[bi, hi, ri] = [c for _, c in pairs[: int(budgets[ri])]]
    return out


@SETTINGS
@given(b=st.integers(1, 2), hs=st.integers(1, 2), r=st.integers(1, 5), kc=st.integers(0, 8),
       ties=st.booleans(), norm=st.sampled_from(["zscore", "raw"]), seed=seeds)
def test_beta_zero_reproduces_native_order(b, hs, r, kc, ties, norm, seed):
    gen = _gen(seed)
    n_keys = kc + 3
    cand_idx = torch.rand(b, hs, r, n_keys, generator=gen).argsort(-1)[..., :kc]
    cand_idx[torch.rand(cand_idx.shape, generator=gen) < 0.2] = -1
    scores = _scores(cand_idx.shape, ties, gen)
    budgets = torch.randint(0, kc + 2, (r,), generator=gen)
    bias = oam_bias(torch.rand(b, hs, n_keys, generator=gen) * 3, beta=0.0, norm=norm)
    want = _native_order_oracle(cand_idx, scores, budgets)
    for by_position in (False, True):
        sel = stem_select(cand_idx, scores, budgets, key_bias=bias, sort_by_position=by_position)
        for (bi, hi, ri), row in want.items():
            got = sel.idx[bi, hi, ri, : sel.counts[bi, hi, ri]].tolist()
            assert got == (sorted(row) if by_position else row)


def _ranks(cand_idx, scores, bias):
    """Position of every key in each row's full OAM order (sort_by_position=False, no truncation)."""
    b, h, r, kc = cand_idx.shape
    sel = stem_select(cand_idx, scores, kc, key_bias=bias, sort_by_position=False)
    ranks = {}
    for bi in range(b):
        for hi in range(h):
            for ri in range(r):
                row = sel.idx[bi, hi, ri, : sel.counts[bi, hi, ri]].tolist()
                for slot, key in enumerate(row):
                    ranks[bi, hi, ri, key] = slot
    return ranks


@SETTINGS
@given(b=st.integers(1, 2), g=st.integers(1, 2), hs=st.integers(1, 2), r=st.integers(1, 4), n_keys=st.integers(2, 10),
       factor=st.floats(1.5, 20.0), beta=st.floats(0.05, 1.0), ties=st.booleans(), seed=seeds)
def test_raising_value_norm_never_lowers_rank_raw(b, g, hs, r, n_keys, factor, beta, ties, seed):
    gen = _gen(seed)
    v = torch.randn(b, n_keys, hs * g, 4, generator=gen)
    cand_idx = torch.rand(b, hs, r, n_keys, generator=gen).argsort(-1)
    cand_idx[torch.rand(cand_idx.shape, generator=gen) < 0.2] = -1
    scores = _scores(cand_idx.shape, ties, gen)
    j = int(torch.randint(0, n_keys, (1,), generator=gen))

    def bias_of(values):
        return oam_bias(aggregate_heads(value_norms(values), hs), beta=beta, norm="raw")

    before = _ranks(cand_idx, scores, bias_of(v))
    v2 = v.clone()
    v2[:, j] *= factor
    after = _ranks(cand_idx, scores, bias_of(v2))
    for (bi, hi, ri, key), slot in before.items():
        if key == j:
            assert after[bi, hi, ri, key] <= slot


@SETTINGS
@given(b=st.integers(1, 2), r=st.integers(1, 4), n_keys=st.integers(2, 10), factor=st.floats(1.5, 20.0),
       beta=st.floats(0.05, 1.0), seed=seeds)
def test_raising_value_norm_never_lowers_rank_zscore(b, r, n_keys, factor, beta, seed):
    """With the z-score the property holds for keys at or above the mean log-norm (see oam_bias)."""
    gen = _gen(seed)
    norms = torch.rand(b, 1, n_keys, generator=gen) * 3 + 0.05
    log_n = norms.log()
    above = (log_n >= log_n.mean(-1, keepdim=True))[:, 0]  # [B, N]
    cand_idx = torch.rand(b, 1, r, n_keys, generator=gen).argsort(-1)
    scores = torch.randint(-2, 3, cand_idx.shape, generator=gen).float()
    j = int(torch.randint(0, n_keys, (1,), generator=gen))
    before = _ranks(cand_idx, scores, oam_bias(norms, beta=beta))
    norms2 = norms.clone()
    norms2[..., j] *= factor
    after = _ranks(cand_idx, scores, oam_bias(norms2, beta=beta))
    for (bi, hi, ri, key), slot in before.items():
        if key == j and above[bi, j]:
            assert after[bi, hi, ri, key] <= slot


def test_value_norms_take_every_float_dtype(seed):
    """bf16 / fp32 values are summed in fp32 and give fp32 norms; fp64 values stay fp64 (an fp64
    model keeps its precision through the rescoring: `oam.work_dtype`)."""
    from stem_boost.oam import aggregate_heads, combine_scores, oam_bias, value_norms

    v = torch.randn(2, 7, 3, 16, dtype=torch.float64)
    want = v.norm(dim=-1).transpose(1, 2)
    got = value_norms(v)
    assert got.dtype == torch.float64 and got.shape == (2, 3, 7)
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0)
    assert value_norms(v.float()).dtype == value_norms(v.to(torch.bfloat16)).dtype == torch.float32
    torch.testing.assert_close(value_norms(v.to(torch.bfloat16)), want.float(), rtol=1e-2, atol=1e-2)
    assert aggregate_heads(got, 1).dtype == oam_bias(got, beta=0.2).dtype == torch.float64
    assert combine_scores(torch.randn(3), torch.randn(3, dtype=torch.float64)).dtype == torch.float64
    assert combine_scores(torch.randn(3, dtype=torch.bfloat16), torch.randn(3)).dtype == torch.float32
