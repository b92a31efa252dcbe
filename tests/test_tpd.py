"""Token Position-Decay budgets: schedule shape, availability counts, the `reduce` contract."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stem_boost.select import stem_select
from stem_boost.tpd import BudgetPlan, block_available, decay_budgets, plan_budgets, token_available

SETTINGS = settings(deadline=None, max_examples=60)
alphas = st.floats(0.0, 1.0, allow_nan=False)


# ----------------------------------------------------------------------------- decay_budgets
@SETTINGS
@given(n_rows=st.integers(0, 300), k_start=st.integers(1, 64), alpha=alphas, data=st.data())
def test_decay_schedule_shape(n_rows, k_start, alpha, data):
    k_min = data.draw(st.integers(0, k_start))
    k = decay_budgets(n_rows, k_start, alpha, k_min=k_min)
    assert k.dtype == torch.long and k.shape == (n_rows,)
    assert bool((k <= k_start).all()) and bool((k >= k_min).all())  # never above the native budget
    assert bool((k[:k_start] == k_start).all())  # the stem is dense
    assert bool((k[1:] <= k[:-1]).all())  # non-increasing (after the stem in particular)
    if n_rows - 1 - k_start > 0:
        k_end = Fraction(alpha) * k_start
        want = max(k_min, math.floor(k_end))
        near_integer = abs(k_end - round(k_end)) < Fraction(1, 10**6)
        assert int(k[-1]) == want or (near_integer and abs(int(k[-1]) - want) <= 1)


@SETTINGS
@given(n_rows=st.integers(1, 200), k_start=st.integers(1, 40), alpha=alphas)
def test_decay_matches_exact_formula(n_rows, k_start, alpha):
    k = decay_budgets(n_rows, k_start, alpha, k_min=0).tolist()
    denom = n_rows - 1 - k_start
    for i, got in enumerate(k):
        if denom <= 0 or i < k_start:
            assert got == k_start
            continue
        exact = k_start + Fraction(i - k_start, denom) * (Fraction(alpha) * k_start - k_start)
        want = min(max(math.floor(exact), 0), k_start)
        near_integer = abs(exact - round(exact)) < Fraction(1, 10**6)
        assert got == want or (near_integer and abs(got - want) <= 1)


def test_decay_paper_setting_is_exact():
    k = decay_budgets(100, 10, 0.7)
    assert int(k[-1]) == 7 and int(k[10]) == 10
    assert decay_budgets(5, 10, 0.0).tolist() == [10] * 5  # all rows in the stem


@pytest.mark.parametrize(
    "call",
    [
        lambda: decay_budgets(-1, 4, 0.5),
        lambda: decay_budgets(10, 0, 0.5),
        lambda: decay_budgets(10, 4, 1.5),
        lambda: decay_budgets(10, 4, 0.5, k_min=5),
    ],
)
def test_decay_rejects_bad_arguments(call):
    with pytest.raises(ValueError, match="outside"):
        call()


# ----------------------------------------------------------------------------- availability
def _available_loop(n_valid: int, n_first: int, n_last: int) -> int:
    forced = set(range(min(n_first, n_valid))) | set(range(max(0, n_valid - n_last), n_valid))
    return n_valid - len(forced)


@SETTINGS
@given(seq_len=st.integers(0, 60), n_sink=st.integers(0, 8), window=st.integers(0, 12))
def test_token_available_matches_loop(seq_len, n_sink, window):
    got = token_available(seq_len, n_sink=n_sink, window=window).tolist()
    assert got == [_available_loop(i + 1, n_sink, window) for i in range(seq_len)]


@SETTINGS
@given(
    n_rows=st.integers(0, 20),
    query_block=st.integers(1, 8),
    block_size=st.integers(1, 8),
    n_init=st.integers(0, 3),
    n_local=st.integers(0, 4),
    extra_blocks=st.integers(-3, 3),
)
def test_block_available_matches_loop(n_rows, query_block, block_size, n_init, n_local, extra_blocks):
    seq = n_rows * query_block
    n_key_blocks = max(0, -(-seq // block_size) + extra_blocks)
    got = block_available(
        n_rows, n_key_blocks, query_block=query_block, block_size=block_size, n_init=n_init, n_local=n_local
    ).tolist()
    want = []
    for r in range(n_rows):
        last_q = (r + 1) * query_block - 1
        valid = [blk for blk in range(n_key_blocks) if blk * block_size <= last_q]
        forced = set(valid[:n_init]) | (set(valid[-n_local:]) if n_local else set())
        want.append(len(valid) - len(forced))
    assert got == want


# ----------------------------------------------------------------------------- plan_budgets
def _check_plan_consistency(plan: BudgetPlan, available: torch.Tensor, k_native: int, k_min: int = 1) -> None:
    native_cap = available.clamp(max=k_native)
    assert plan.native_pairs == int(native_cap.sum())
    assert plan.stem_pairs == int(plan.budgets.sum())
    assert bool((plan.budgets <= native_cap).all())  # never above the native budget
    schedule = decay_budgets(available.numel(), k_native, plan.alpha, k_min=k_min)
    assert torch.equal(plan.budgets, torch.minimum(schedule, available))
    if plan.native_pairs:
        assert plan.reduce_achieved == pytest.approx(1 - plan.stem_pairs / plan.native_pairs, abs=1e-12)
    assert isinstance(plan.summary(), str) and "alpha" in plan.summary()


@SETTINGS
@given(
    k_native=st.integers(12, 48),
    rows_factor=st.floats(4.0, 10.0),
    n_sink=st.integers(0, 4),
    window_frac=st.floats(0.0, 1.0),
    reduce=st.floats(0.0, 0.3),
)
def test_plan_meets_reduce(k_native, rows_factor, n_sink, window_frac, reduce):
    n_rows = int(rows_factor * k_native)
    available = token_available(n_rows, n_sink=n_sink, window=int(window_frac * k_native))
    plan = plan_budgets(available, k_native, reduce)
    _check_plan_consistency(plan, available, k_native)
    assert plan.reachable
    assert abs(plan.reduce_achieved - reduce) <= 0.005
    assert 0.0 <= plan.alpha <= 1.0


@SETTINGS
@given(
    k_native=st.integers(1, 16),
    n_rows=st.integers(0, 80),
    reduce=st.floats(0.0, 0.9),
    alpha_min=alphas,
    seed=st.integers(0, 2**31 - 1),
)
def test_plan_is_honest_on_any_input(k_native, n_rows, reduce, alpha_min, seed):
    gen = torch.Generator().manual_seed(seed)
    available = torch.randint(0, 2 * k_native + 1, (n_rows,), generator=gen)
    plan = plan_budgets(available, k_native, reduce, alpha_min=alpha_min)
    _check_plan_consistency(plan, available, k_native)
    assert alpha_min <= plan.alpha <= 1.0
    if not plan.reachable:
        assert plan.alpha == alpha_min and plan.reduce_achieved < reduce
        best = plan_budgets(available, k_native, 0.9, alpha_min=alpha_min)
        assert best.stem_pairs == plan.stem_pairs  # nothing stronger was possible


@SETTINGS
@given(k_native=st.integers(1, 32), n_rows=st.integers(0, 200), n_sink=st.integers(0, 4), window=st.integers(0, 16))
def test_plan_zero_reduce_is_native(k_native, n_rows, n_sink, window):
    available = token_available(n_rows, n_sink=n_sink, window=window)
    plan = plan_budgets(available, k_native, 0.0)
    assert plan.alpha == 1.0 and plan.reachable and plan.reduce_achieved == 0.0
    assert torch.equal(plan.budgets, available.clamp(max=k_native))
    assert plan.stem_pairs == plan.native_pairs


@SETTINGS
@given(k_native=st.integers(8, 32), extra_rows=st.integers(0, 3), reduce=st.floats(0.5, 0.9))
def test_plan_unreachable_short_sequence(k_native, extra_rows, reduce):
    available = token_available(k_native + extra_rows)  # (almost) all rows inside the stem
    plan = plan_budgets(available, k_native, reduce)
    assert not plan.reachable
    assert plan.reduce_achieved < reduce and plan.alpha == 0.0
    assert "NOT reachable" in plan.summary()


def test_plan_unreachable_alpha_min():
    available = token_available(512)
    plan = plan_budgets(available, 32, 0.3, alpha_min=0.9)
    assert not plan.reachable and plan.alpha == 0.9
    assert 0.0 < plan.reduce_achieved < 0.3


@SETTINGS
@given(reduce=st.one_of(st.floats(max_value=-1e-9, allow_nan=False), st.floats(min_value=0.90001, allow_nan=False)))
def test_plan_rejects_reduce_outside_range(reduce):
    with pytest.raises(ValueError) as err:
        plan_budgets(token_available(64), 8, reduce)
    assert f"reduce={reduce!r}" in str(err.value) and "[0, 0.9]" in str(err.value)


@SETTINGS
@given(
    step=st.sampled_from([2, 4, 8, 16]),
    steps_native=st.integers(2, 8),
    rows_factor=st.floats(3.0, 8.0),
    reduce=st.floats(0.02, 0.3),
)
def test_plan_with_a_budget_step(step, steps_native, rows_factor, reduce):
    # every budget that the causal limit does not cut is a multiple of the step (or the native
    # budget), the schedule is the rounded decay line, and the solve still meets `reduce`
    k_native = step * steps_native
    n_rows = int(rows_factor * k_native)
    available = token_available(n_rows)
    plan = plan_budgets(available, k_native, reduce, step=step)
    line = decay_budgets(n_rows, k_native, plan.alpha, k_min=1)
    rounded = (torch.div(line + step // 2, step, rounding_mode="floor") * step).clamp(1, k_native)
    assert torch.equal(plan.budgets, torch.minimum(rounded, available))
    uncut = plan.budgets < available
    # a multiple of the step, or the floor k_min = 1 where the line rounds below half a step
    assert bool(((plan.budgets[uncut] % step == 0) | (plan.budgets[uncut] == 1)).all())
    assert bool((rounded[1:] <= rounded[:-1]).all())  # still a decay: early rows keep more
    assert plan.stem_pairs == int(plan.budgets.sum())
    if plan.reachable:
        # the step's granularity moves the achieved reduction by at most one row's step
        assert abs(plan.reduce_achieved - reduce) <= max(0.005, step / plan.native_pairs)
    else:  # a native budget of a few steps cannot give every reduction: the line is at its floor
        assert plan.alpha == 0.0 and plan.reduce_achieved < reduce
    assert torch.equal(plan_budgets(available, k_native, 0.0, step=step).budgets, available.clamp(max=k_native))


def test_plan_step_one_is_the_exact_schedule():
    available = token_available(700)
    a, b = plan_budgets(available, 48, 0.2), plan_budgets(available, 48, 0.2, step=1)
    assert torch.equal(a.budgets, b.budgets) and a.alpha == b.alpha


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(k_native=4, reduce=0.1, step=0), "step"),
        (dict(k_native=0, reduce=0.1), "k_native"),
        (dict(k_native=4, reduce=0.1, alpha_min=-0.1), "alpha_min"),
        (dict(k_native=4, reduce=0.1, alpha_min=1.5), "alpha_min"),
        (dict(k_native=4, reduce=float("nan")), "reduce"),
    ],
)
def test_plan_rejects_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        plan_budgets(token_available(64), **kwargs)


# ----------------------------------------------------------------------------- with stem_select
@SETTINGS
@given(
    k_native=st.integers(2, 6),
    n_rows=st.integers(1, 40),
    n_forced=st.integers(0, 4),
    reduce=st.floats(0.0, 0.9),
    seed=st.integers(0, 2**31 - 1),
)
def test_tpd_never_drops_forced_keys(k_native, n_rows, n_forced, reduce, seed):
    gen = torch.Generator().manual_seed(seed)
    b, h, n_keys = 2, 2, n_rows
    cand_idx = torch.rand(b, h, n_rows, n_keys, generator=gen).argsort(-1)[..., :k_native]
    cand_idx[torch.rand(cand_idx.shape, generator=gen) < 0.2] = -1
    scores = torch.randint(-2, 3, cand_idx.shape, generator=gen).float()
    forced = torch.randint(-1, n_keys, (b, h, n_rows, n_forced), generator=gen)
    plan = plan_budgets(torch.full((n_rows,), k_native), k_native, reduce)
    sel = stem_select(cand_idx, scores, plan.budgets, forced_idx=forced)
    for bi in range(b):
        for hi in range(h):
            for r in range(n_rows):
                row = sel.idx[bi, hi, r, : sel.counts[bi, hi, r]].tolist()
                want_forced = {int(x) for x in forced[bi, hi, r] if x >= 0}
                assert want_forced <= set(row)
                assert len(row) - len(want_forced) <= int(plan.budgets[r])


# ----------------------------------------------------------------------------- token rows (boost)
def test_token_rows_budgets_are_multiples_of_the_kernel_step():
    # DeepSeek-V3.2's native budget (2048) spans 32 token-kernel steps: the default budgets are
    # multiples of the step below the causal limit, and the solve still removes `reduce` of the pairs
    from stem_boost.boost import row_budgets, token_budget_step
    from stem_boost.config import StemConfig
    from stem_boost.kernels.dispatch import TOKEN_KEY_STEP
    from stem_boost.kernels.mla_token import DEFAULT_TILES
    from stem_boost.kernels.mla_token_sm90 import SM90_TILES
    from stem_boost.kernels.mla_token_ws import KEYS_PER_STEP
    from stem_boost.selection import Selection

    # the step the budgets are rounded to: the Hopper kernels' step, a multiple of the Triton kernel's
    assert KEYS_PER_STEP == SM90_TILES["BLOCK_N"] == TOKEN_KEY_STEP and TOKEN_KEY_STEP % DEFAULT_TILES["BLOCK_N"] == 0
    cfg = StemConfig(reduce=0.15)
    assert token_budget_step(2048, cfg) == TOKEN_KEY_STEP and token_budget_step(64, cfg) == 1
    assert token_budget_step(2048, StemConfig(budget_step=1)) == 1
    S = 12288
    native = Selection(idx=torch.zeros(1, 1, S, 1, dtype=torch.int32), counts=torch.ones(1, 1, S, dtype=torch.int32))
    plans = row_budgets(native, S, S, 2048, cfg)
    budgets, avail = plans.budgets[0], torch.arange(S) + 1
    uncut = budgets < avail
    assert bool((budgets[uncut] % TOKEN_KEY_STEP == 0).all()) and bool(uncut.any())
    assert abs(plans.plans[0].reduce_achieved - 0.15) < 1e-3
    exact = row_budgets(native, S, S, 2048, StemConfig(reduce=0.15, budget_step=1)).budgets[0]
    assert abs(int(exact.sum()) - int(budgets.sum())) <= TOKEN_KEY_STEP  # the same pairs, rounded rows


@pytest.mark.parametrize("bad", [0, -64, 1.5, True, "64"])
def test_config_rejects_a_bad_budget_step(bad):
    from stem_boost.config import StemConfig

    with pytest.raises(ValueError, match="budget_step"):
        StemConfig(budget_step=bad)


@pytest.mark.parametrize("schedule", ["tpd", "uniform"])
def test_unpadded_row_budgets_equal_the_per_row_plan_and_are_reused(schedule):
    """Without padding, `row_budgets` takes the cached device plan (no host synchronisation): the
    same budgets as the per-row path (a zero-start padded description of the same rows), for two
    batch rows and a query offset (a continued prefill), and the same tensors on the next call."""
    from stem_boost.boost import row_budgets
    from stem_boost.config import StemConfig
    from stem_boost.selection import Selection

    B, S, T, K = 2, 300, 420, 64
    cfg = StemConfig(reduce=0.2, schedule=schedule)
    idx = torch.zeros(B, 1, S, 1, dtype=torch.int32)
    unpadded = Selection(idx=idx, counts=torch.ones(B, 1, S, dtype=torch.int32))
    padded = Selection(idx=idx, counts=torch.ones(B, 1, S, dtype=torch.int32),
                       seq_start=torch.zeros(B, dtype=torch.int32), seq_len=torch.full((B,), T, dtype=torch.int32))
    fast, slow = row_budgets(unpadded, S, T, K, cfg), row_budgets(padded, S, T, K, cfg)
    assert torch.equal(fast.budgets, slow.budgets) and torch.equal(fast.real_rows, slow.real_rows)
    assert [p.reduce_achieved for p in fast.plans] == [p.reduce_achieved for p in slow.plans]
    assert row_budgets(unpadded, S, T, K, cfg).budgets is fast.budgets
