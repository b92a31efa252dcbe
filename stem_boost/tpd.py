"""Token Position-Decay (TPD) budgets (docs/design.md, "TPD").

A causal decoder's early keys feed every later query in every later layer, so Stem gives early
query rows a larger key budget than late ones:

    k(i) = k_start                                                     for i < k_start (the stem)
    k(i) = floor(k_start + (i - k_start) / (R - 1 - k_start) * (alpha * k_start - k_start))

clamped to ``[k_min, k_start]``. For a boosted model ``k_start`` is the native budget and the
budgets count only the keys the native method does not force (sinks / init blocks, the local
window, the diagonal block): those are always kept on top of k(i).

`plan_budgets` turns the user's contract ``reduce=r`` (attend (1 - r) of the native pairs, counting
only causally valid non-forced keys) into an ``alpha`` for the actual sequence.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

__all__ = [
    "BudgetPlan",
    "block_available",
    "decay_budgets",
    "plan_budgets",
    "plan_uniform",
    "token_available",
]

# Absolute slack added before the floor of the decay line, so that values that are integers in
# exact arithmetic (alpha = 0.7, k_start = 10 -> k_end = 7) do not round down to 6.999... -> 6.
_FLOOR_SLACK = 1e-9

MAX_REDUCE = 0.9


def _check_int(name: str, value: int, low: int, high: int | None = None) -> int:
    """``value`` as an int in [low, high] (ValueError naming the argument otherwise)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f"[{low}, inf)"
        raise ValueError(f"{name}={value} is outside {bound}")
    return value


def _check_float(name: str, value: float, low: float, high: float) -> float:
    """``value`` as a float in [low, high] (ValueError naming the argument otherwise; NaN fails)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (low <= value <= high):
        raise ValueError(f"{name}={value!r} is outside [{low}, {high}]")
    return float(value)


def decay_budgets(
    n_rows: int,
    k_start: int,
    alpha: float,
    *,
    k_min: int = 1,
    device: torch.device | str | None = None,
) -> torch.LongTensor:
    """TPD schedule k(i) for ``n_rows`` query rows (tokens or query blocks).

    Args:
        n_rows: number of query rows R (>= 0).
        k_start: budget of the stem rows (the native budget), >= 1.
        alpha: k_end / k_start at the last row, in [0, 1].
        k_min: floor of the schedule, in [0, k_start].

    Returns:
        LongTensor [R]: non-increasing, ``k_start`` for the first ``k_start`` rows, then a linear
        decay to ``max(k_min, floor(alpha * k_start))`` at row R - 1. When ``R - 1 - k_start <= 0``
        every row is in the stem and gets ``k_start``.
    """
    n_rows = _check_int("n_rows", n_rows, 0)
    k_start = _check_int("k_start", k_start, 1)
    alpha = _check_float("alpha", alpha, 0.0, 1.0)
    k_min = _check_int("k_min", k_min, 0, k_start)

    rows = torch.arange(n_rows, dtype=torch.float64, device=device)
    return _decay(rows, k_start, alpha, k_min)


def _decay(rows: torch.Tensor, k_start: int, alpha: float, k_min: int) -> torch.LongTensor:
    """`decay_budgets` on a precomputed float64 row index ``rows = arange(R)`` (no validation)."""
    denom = rows.numel() - 1 - k_start
    if denom <= 0:
        return torch.full_like(rows, k_start, dtype=torch.long)
    slope = (1.0 - alpha) * k_start / denom  # (k_start - k_end) / denom
    line = (k_start + k_start * slope + _FLOOR_SLACK) - rows * slope  # k_start - (i - k_start) * slope
    return torch.floor(line).to(torch.long).clamp_(min=k_min, max=k_start)


def _quantise(k: torch.LongTensor, step: int, k_min: int, k_max: int) -> torch.LongTensor:
    """k rounded to the nearest multiple of ``step`` (halves up), clamped to [k_min, k_max]."""
    if step == 1:
        return k
    return (torch.div(k + step // 2, step, rounding_mode="floor") * step).clamp_(min=k_min, max=k_max)


def _available(n_valid: torch.Tensor, n_first: int, n_last: int) -> torch.Tensor:
    """Non-forced keys among ``n_valid`` causally valid ones, where the first ``n_first`` and the
    last ``n_last`` are forced (their union counted once). All arguments broadcast, [R]."""
    first = n_valid.clamp(max=n_first)
    last = n_valid.clamp(max=n_last)
    overlap = (first - (n_valid - last)).clamp(min=0)
    return n_valid - (first + last - overlap)


def token_available(
    seq_len: int,
    *,
    n_sink: int = 0,
    window: int = 0,
    device: torch.device | str | None = None,
) -> torch.LongTensor:
    """Per query position i in [0, seq_len): causally valid keys that are not forced.

    Query i sees keys 0..i (i + 1 keys). Forced keys: the sinks (positions < n_sink) and the local
    window (the ``window`` positions i - window + 1 .. i, the query itself included); their union
    is counted once.

    Returns:
        LongTensor [seq_len].
    """
    seq_len = _check_int("seq_len", seq_len, 0)
    n_sink = _check_int("n_sink", n_sink, 0)
    window = _check_int("window", window, 0)
    n_valid = torch.arange(1, seq_len + 1, dtype=torch.long, device=device)
    return _available(n_valid, n_sink, window)


def block_available(
    n_query_rows: int,
    n_key_blocks: int,
    *,
    query_block: int,
    block_size: int,
    n_init: int = 0,
    n_local: int = 0,
    seq_q: int | None = None,
    device: torch.device | str | None = None,
) -> torch.LongTensor:
    """Per query row: causally valid key blocks that are not forced (block granularity).

    Row r covers query positions [r * query_block, (r + 1) * query_block) (cut at ``seq_q - 1`` if
    given, for a ragged last row). Key block b is causally valid for the row when its first token
    b * block_size <= the row's last query position. The diagonal block is the last valid one.
    Forced: the first ``n_init`` blocks and the ``n_local`` blocks ending at (and including) the
    diagonal block; their union is counted once.

    Returns:
        LongTensor [n_query_rows].
    """
    n_query_rows = _check_int("n_query_rows", n_query_rows, 0)
    n_key_blocks = _check_int("n_key_blocks", n_key_blocks, 0)
    query_block = _check_int("query_block", query_block, 1)
    block_size = _check_int("block_size", block_size, 1)
    n_init = _check_int("n_init", n_init, 0)
    n_local = _check_int("n_local", n_local, 0)
    r = torch.arange(n_query_rows, dtype=torch.long, device=device)
    last_q = (r + 1) * query_block - 1
    if seq_q is not None:
        seq_q = _check_int("seq_q", seq_q, 0)
        last_q = last_q.clamp(max=max(seq_q - 1, 0))
    n_valid = (last_q // block_size + 1).clamp(max=n_key_blocks)
    return _available(n_valid, n_init, n_local)


@dataclass
class BudgetPlan:
    """The outcome of `plan_budgets` for one sequence.

    Attributes:
        budgets: LongTensor [R], per-row Stem budget for the non-forced keys
            (= min(k(i), available_i), never above min(k_native, available_i)).
        alpha: the decay factor used (k_end = alpha * k_native).
        reduce_requested: the requested reduction r.
        reduce_achieved: 1 - stem_pairs / native_pairs (0 when native_pairs == 0).
        native_pairs: sum_i min(k_native, available_i).
        stem_pairs: sum_i budgets_i.
        reachable: False when even alpha_min cannot reach the requested reduction.
    """

    budgets: torch.LongTensor
    alpha: float
    reduce_requested: float
    reduce_achieved: float
    native_pairs: int
    stem_pairs: int
    reachable: bool

    def summary(self) -> str:
        state = "" if self.reachable else " (requested reduction NOT reachable)"
        return (
            f"TPD: rows={self.budgets.numel()} alpha={self.alpha:.4f} "
            f"reduce requested={self.reduce_requested:.2%} achieved={self.reduce_achieved:.2%} "
            f"pairs native={self.native_pairs} stem={self.stem_pairs}{state}"
        )


def _bisect(lo: float, hi: float, goes_high) -> tuple[float, float]:
    """Shrink [lo, hi] to adjacent floats: `goes_high(mid)` True moves hi to mid, else lo."""
    while True:
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            return lo, hi
        if goes_high(mid):
            hi = mid
        else:
            lo = mid


def plan_budgets(
    available: torch.Tensor,
    k_native: int,
    reduce: float,
    *,
    alpha_min: float = 0.0,
    k_min: int = 1,
    step: int = 1,
) -> BudgetPlan:
    """Solve the TPD ``alpha`` that removes a fraction ``reduce`` of the native (query, key) pairs.

    Args:
        available: [R] integer tensor, non-forced causally valid keys per row
            (`token_available` / `block_available`).
        k_native: the native budget (k_start of the schedule), >= 1.
        reduce: requested reduction r in [0, 0.9].
        alpha_min: smallest alpha allowed, in [0, 1].
        k_min: floor of the schedule, in [0, k_native].
        step: budget quantum, >= 1: each row's k(i) is rounded to the nearest multiple of ``step``
            (halves up; then clamped to [k_min, k_native]) before the causal clamp, so that a
            kernel walking a row's list ``step`` entries at a time never runs a partly empty step
            on a decayed row. 1 keeps the exact schedule. Rounding keeps k(i) monotone in i and in
            alpha, so the solve below is unchanged and still meets ``reduce`` over all rows.

    native_pairs = sum_i min(k_native, available_i); stem_pairs(alpha) = sum_i min(k(i), available_i)
    with k = decay_budgets(R, k_native, alpha). stem_pairs is a non-decreasing, right-continuous
    step function of alpha, so the achieved reduction is a non-increasing step function. Bisection
    finds alpha* = the smallest alpha whose reduction does not exceed r. Two counts bracket r: the
    one at alpha* (reduction <= r) and the step just below alpha* (reduction > r, by at most one
    step of the floor rounding). The plan keeps whichever is closer to r (ties: the smaller
    reduction, i.e. the more conservative). ``alpha`` is then the midpoint of the alpha interval
    that yields the chosen count (1.0 when the chosen count is the native one), so re-evaluating
    the schedule at ``alpha`` in other arithmetic lands on the same count; still, prefer
    ``plan.budgets`` over recomputing.

    If even alpha_min gives less reduction than r, the plan uses alpha_min, reports the achieved
    reduction and ``reachable=False``.

    Returns:
        BudgetPlan (budgets on ``available``'s device).
    """
    if isinstance(reduce, bool) or not isinstance(reduce, numbers.Real) or not (0.0 <= reduce <= MAX_REDUCE):
        raise ValueError(f"reduce={reduce!r} is outside [0, {MAX_REDUCE}]")
    reduce = float(reduce)
    k_native = _check_int("k_native", k_native, 1)
    alpha_min = _check_float("alpha_min", alpha_min, 0.0, 1.0)
    k_min = _check_int("k_min", k_min, 0, k_native)
    step = _check_int("step", step, 1)
    if not isinstance(available, torch.Tensor) or available.dim() != 1:
        raise ValueError("available must be a 1-D tensor [R]")
    if available.is_floating_point() or available.is_complex() or available.dtype == torch.bool:
        raise ValueError(f"available must be an integer tensor, got {available.dtype}")
    out_device = available.device
    avail = available.detach().to("cpu", torch.long)
    if avail.numel() and int(avail.min()) < 0:
        raise ValueError(f"available must be >= 0, got min {int(avail.min())}")
    n_rows = avail.numel()

    native_pairs = int(avail.clamp(max=k_native).sum())
    rows = torch.arange(n_rows, dtype=torch.float64)

    def budgets_at(alpha: float) -> torch.Tensor:
        return torch.minimum(_quantise(_decay(rows, k_native, alpha, k_min), step, k_min, k_native), avail)

    def pairs_at(alpha: float) -> int:
        return int(budgets_at(alpha).sum())

    def reduction(pairs: int) -> float:
        return 1.0 - pairs / native_pairs if native_pairs > 0 else 0.0

    def plan(alpha: float, pairs: int, reachable: bool) -> BudgetPlan:
        return BudgetPlan(
            budgets=budgets_at(alpha).to(out_device),
            alpha=float(alpha),
            reduce_requested=float(reduce),
            reduce_achieved=reduction(pairs),
            native_pairs=native_pairs,
            stem_pairs=pairs,
            reachable=reachable,
        )

    # stem pairs >= target  <=>  achieved reduction <= requested (small slack for float rounding).
    target = (1.0 - reduce) * native_pairs - 1e-9 * max(native_pairs, 1)
    pairs_min = pairs_at(alpha_min)
    if pairs_min >= target:
        if reduction(pairs_min) < reduce - 1e-12:
            return plan(alpha_min, pairs_min, reachable=False)
        # alpha_min already meets the request exactly (e.g. no row can decay, or no pairs at all).
        lo, hi, pairs_lo = None, alpha_min, None
    else:
        lo, hi = alpha_min, 1.0  # invariant: pairs(lo) < target <= pairs(hi); pairs(1) == native
        lo, hi = _bisect(lo, hi, lambda mid: pairs_at(mid) >= target)
        pairs_lo = pairs_at(lo)
    pairs_hi = pairs_at(hi)

    use_lo = pairs_lo is not None and abs(reduction(pairs_lo) - reduce) < abs(reduction(pairs_hi) - reduce)
    if use_lo:
        pairs, left, right = pairs_lo, _step_edge(pairs_at, pairs_lo, alpha_min, lo), lo
    else:
        pairs, left, right = pairs_hi, hi, _step_edge(pairs_at, pairs_hi, 1.0, hi)
    if pairs == native_pairs:
        return plan(1.0, pairs, reachable=True)
    return plan(0.5 * (left + right), pairs, reachable=True)


# Golden-ratio offsets: a deterministic low-discrepancy sequence in [0, 1) that spreads the rows
# rounded up evenly over the sequence (uniform ablation).
_GOLDEN = 0.6180339887498949


def plan_uniform(
    available: torch.Tensor,
    k_native: int,
    reduce: float,
    *,
    k_min: int = 1,
) -> BudgetPlan:
    """The TPD-off ablation: every row keeps the same fraction ``1 - f`` of its native budget.

    Row i's native budget is ``n_i = min(k_native, available_i)``; its uniform budget is

        b_i = min(n_i, max(k_min, floor((1 - f) * n_i + d_i))),   d_i = frac((i + 1) * 0.618...)

    The offsets d_i dither the rounding so that a fractional ``(1 - f) * k_native`` is met on
    average: all rows past the stem (``n_i = k_native``) get ``floor`` or ``ceil`` of the same
    value (equal up to 1, spread evenly over the positions, no position trend), and the total can
    match TPD's to about one pair, so that the two schedules are compared at the same budget.
    ``f`` is solved by bisection (every b_i is non-increasing in f) for the total closest to
    ``(1 - reduce) * native_pairs`` (ties: the smaller reduction).

    Returns:
        BudgetPlan; ``alpha`` holds ``1 - f`` (the kept fraction, k_end / k_start as for TPD).
    """
    if isinstance(reduce, bool) or not isinstance(reduce, numbers.Real) or not (0.0 <= reduce <= MAX_REDUCE):
        raise ValueError(f"reduce={reduce!r} is outside [0, {MAX_REDUCE}]")
    reduce = float(reduce)
    k_native = _check_int("k_native", k_native, 1)
    k_min = _check_int("k_min", k_min, 0, k_native)
    if not isinstance(available, torch.Tensor) or available.dim() != 1:
        raise ValueError("available must be a 1-D tensor [R]")
    if available.is_floating_point() or available.is_complex() or available.dtype == torch.bool:
        raise ValueError(f"available must be an integer tensor, got {available.dtype}")
    out_device = available.device
    native = available.detach().to("cpu", torch.long).clamp(max=k_native)
    if native.numel() and int(native.min()) < 0:
        raise ValueError(f"available must be >= 0, got min {int(native.min())}")
    native_f = native.to(torch.float64)
    dither = torch.frac(torch.arange(1, native.numel() + 1, dtype=torch.float64) * _GOLDEN)
    native_pairs = int(native.sum())

    def budgets_at(f: float) -> torch.Tensor:
        b = torch.floor((1.0 - f) * native_f + dither).to(torch.long)
        return torch.minimum(b.clamp(min=k_min), native)

    def pairs_at(f: float) -> int:
        return int(budgets_at(f).sum())

    def reduction(pairs: int) -> float:
        return 1.0 - pairs / native_pairs if native_pairs > 0 else 0.0

    target = (1.0 - reduce) * native_pairs - 1e-9 * max(native_pairs, 1)
    if reduce == 0.0 or native_pairs == 0:
        f, reachable = 0.0, True
    elif pairs_at(1.0) >= target:  # even keeping k_min per row removes too little
        f, reachable = 1.0, reduction(pairs_at(1.0)) >= reduce - 1e-12
    else:
        lo, hi = 0.0, 1.0  # invariant: pairs(lo) >= target > pairs(hi)
        lo, hi = _bisect(lo, hi, lambda mid: pairs_at(mid) < target)
        p_lo, p_hi = pairs_at(lo), pairs_at(hi)
        f = hi if abs(reduction(p_hi) - reduce) < abs(reduction(p_lo) - reduce) else lo
        reachable = True
    budgets = budgets_at(f)
    pairs = int(budgets.sum())
    return BudgetPlan(budgets=budgets.to(out_device), alpha=1.0 - f, reduce_requested=reduce,
                      reduce_achieved=reduction(pairs), native_pairs=native_pairs, stem_pairs=pairs,
                      reachable=reachable)


def _step_edge(pairs_at, pairs: int, outer: float, inner: float) -> float:
    """Farthest alpha from ``inner`` towards ``outer`` (within float bisection precision) whose
    pair count is still ``pairs``; the count is monotone in alpha, so one bisection suffices."""
    if pairs_at(outer) == pairs:
        return outer
    good, bad = inner, outer
    while True:
        mid = 0.5 * (good + bad)
        if mid in (good, bad):
            return good
        if pairs_at(mid) == pairs:
            good = mid
        else:
            bad = mid
