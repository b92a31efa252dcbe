"""Mass-aware budgets (StemConfig(schedule="mass")): the cut removes the lowest-probability pairs."""

from __future__ import annotations

import math

import pytest
import torch

from stem_boost.mass import mass_budgets


@pytest.mark.parametrize("space", ["logit", "prob"])
def test_removes_exactly_the_lowest_probability_pairs(space):
    B, H, R, K = 2, 3, 17, 11
    scores = torch.randn(B, H, R, K) if space == "logit" else torch.rand(B, H, R, K)
    valid = torch.rand(B, H, R, K) < 0.8
    reduce = float(torch.empty(()).uniform_(0.05, 0.5))
    budgets = mass_budgets(scores, valid, reduce, space=space)
    n = int(valid.sum())
    # oracle: global sort of the row-normalised probabilities
    if space == "logit":
        p = torch.softmax(scores.masked_fill(~valid, float("-inf")), -1)
    else:
        m = scores.masked_fill(~valid, 0)
        p = m / m.sum(-1, keepdim=True)
    flat = p[valid]
    k = math.floor(reduce * n)
    thresh = flat.sort().values[k - 1]
    removed_oracle = ((p <= thresh) & valid).sum(-1)
    rows_nonempty = valid.sum(-1) > 0
    want = torch.where(rows_nonempty, torch.clamp(valid.sum(-1) - removed_oracle, min=1), torch.zeros_like(budgets))
    assert torch.equal(budgets, want)
    assert abs(int((valid.sum(-1) - budgets).sum()) - k) <= int(rows_nonempty.sum())  # the >= 1 floor only


def test_the_cut_goes_to_the_row_whose_tail_has_no_mass():
    K = 64
    peaked = torch.full((K,), -10.0)
    peaked[:4] = 5.0
    flat = torch.zeros(K)
    budgets = mass_budgets(torch.stack([peaked, flat]), torch.ones(2, K, dtype=torch.bool), 0.3)
    cut = math.floor(0.3 * 2 * K)  # 38 pairs: all from the peaked row's 60 near-zero keys
    assert budgets.tolist() == [K - cut, K]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="reduce"):
        mass_budgets(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), 1.5)
    with pytest.raises(ValueError, match="space"):
        mass_budgets(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), 0.1, space="odds")


@pytest.mark.parametrize("family", ["dsa", "infllmv2"])
def test_wrap_with_mass_schedule_meets_the_contract(family):
    import stem_boost

    if family == "dsa":
        from .dsa_tiny import build_deepseek_v32

        model, reduce, n = build_deepseek_v32(seed=int(torch.randint(0, 1000, (1,))), index_topk=16), 0.15, 256
    else:
        from stem_boost.testbeds.tiny_minicpm4 import build_testbed

        model, reduce, n = build_testbed(seed=int(torch.randint(0, 1000, (1,))), num_hidden_layers=2).model, 0.18, 1024
    ids = torch.randint(3, 256, (1, n))
    stem_boost.wrap(model, reduce=reduce, schedule="mass")
    with torch.no_grad():
        model(ids)
    st = stem_boost.stats(model)
    stem_boost.unwrap(model)
    assert st["config"]["schedule"] == "mass"
    assert abs(st["reduce_achieved"] - reduce) < 0.01, st["reduce_achieved"]
