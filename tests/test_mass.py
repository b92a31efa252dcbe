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


def test_infllmv2_mass_budgets_from_the_top_k_equal_the_sorted_definition(seed):
    """The mass schedule's per-chunk budgets (`adapters.infllmv2.mass_free_budgets`, from each row's
    top blocks) equal its definition: rank every free block of the row by a full sort, take the top
    native_free[c], and cut the lowest-mass pairs of the chunk (ties in a row, zero and -inf scores)."""
    from stem_boost.adapters.infllmv2 import mass_free_budgets
    from stem_boost.mass import mass_budgets
    from stem_boost.native.infllmv2 import BlockScores

    gen = torch.Generator().manual_seed(seed)
    B, Hk, C, NB = 2, 2, 40, 30
    scores = torch.rand(B, Hk, C, NB, generator=gen)
    scores[..., 1::3] = scores[..., 0:NB - 1:3]  # ties inside a row (exact ties across rows would make
    # the result depend on the order of each row's fp32 sum, which the two layouts do differently)
    scores[torch.rand(B, Hk, C, NB, generator=gen) < 0.05] = 0.0
    scores[torch.rand(B, Hk, C, NB, generator=gen) < 0.05] = float("-inf")
    q_block = torch.arange(C) * NB // C  # [C]: the query block of each row
    blocks = torch.arange(NB)
    candidate = blocks[None, :] <= q_block[:, None]
    forced = candidate & ((blocks[None, :] < 1) | (blocks[None, :] >= q_block[:, None] - 1))
    native_free = torch.randint(0, 12, (C,), generator=gen)
    bs = BlockScores(scores=scores, forced=forced, candidate=candidate, q_pos=q_block * 16, rows=slice(0, C),
                     k_total=14, block_size=16)
    got = mass_free_budgets(native_free, 0.3)(bs)

    # the native free selection: the free blocks of the row, highest score first (a free block whose
    # score is -inf still counts, as the native top-k keeps it when the budget reaches it)
    free = (candidate & ~forced).expand_as(scores)
    by_score = scores.sort(dim=-1, descending=True, stable=True).indices
    free_first = (~free).gather(-1, by_score).to(torch.int8).sort(dim=-1, stable=True).indices
    order = by_score.gather(-1, free_first)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(NB).expand_as(order))
    want = mass_budgets(scores, free & (rank < native_free.view(1, 1, -1, 1)), 0.3, space="prob")
    assert torch.equal(got, want), f"seed={seed}"
