"""Select the k largest scores of a row held in registers (Triton helpers shared by the InfLLMv2
block top-k and the DSA Stem cut; inlined into their kernels).

A float score becomes an order-preserving uint32 key (`ordered_u32`); a bisection over the key bits
finds a threshold with the wanted count at or above it (`rank_threshold`), and the entries above it
plus the first ties at it (by position, i.e. the smaller key or block index when the row is in
ascending order) are kept (`keep_largest`).

The bisection builds the threshold from the high bit down and stops as soon as exactly `want` valid
keys lie at or above it: that set is then the answer (every tie at the threshold is kept), and it
is the one the full 32 steps give. Scores spread over a few binades separate the want-th and the
next key after about 12-20 of the 32 steps; each step is a reduction over the whole row.
`interpolated_threshold` finds the same threshold in about half the counts on smooth rows (an
interpolation search with a bisection step whenever the bracket did not halve). Counting two bits
a reduction (three prefixes at once) was 1.13-1.15x slower on an H200: the counts' compares, not
the reductions' latency, hold these kernels.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["common_prefix", "interpolated_threshold", "keep_largest", "ordered_u32", "prefix_between", "rank_threshold"]


@triton.jit
def ordered_u32(x):
    """Order-preserving uint32 image of float32 x (no NaN; -0.0 taken as +0.0)."""
    x = x + 0.0
    bits = x.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)


@triton.jit
def common_prefix(key, valid, BITS: tl.constexpr = 32):
    """(prefix, first): the high bits all `valid` keys share (the rest zero) and the index, counted from
    the top, of the first bit where two of them differ (BITS when all are equal; 0 without valid keys).
    Two reductions (the largest and the smallest key), then `prefix_between`."""
    ones = tl.full([], 0xFFFFFFFF, tl.uint32)
    return prefix_between(tl.max(tl.where(valid, key, 0), 0), tl.min(tl.where(valid, key, ones), 0), BITS)


@triton.jit
def prefix_between(hi, lo, BITS: tl.constexpr = 32):
    """(prefix, first) of keys between lo and hi (uint32, any shape; lo = all ones, hi = 0 when there is
    no key): their shared high bits and the index from the top of the first differing bit. The
    highest differing bit is read from the float exponent of hi ^ lo, which may round up one bit (then
    one shared bit is bisected too)."""
    ones = tl.full([], 0xFFFFFFFF, tl.uint32)
    diff = hi ^ lo  # all ones without a valid key: no prefix
    top = ((diff.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # -127 when diff == 0
    top = tl.minimum(top, BITS - 1)
    one = tl.full([], 1, tl.uint32)
    low_mask = tl.where(top >= 31, ones, (one << tl.minimum(tl.maximum(top + 1, 0), 31).to(tl.uint32)) - one)
    prefix = tl.where(diff == 0, lo, lo & (ones ^ low_mask))
    first = tl.where(diff == 0, BITS, BITS - 1 - top)
    return prefix, first


@triton.jit
def rank_threshold(key, valid, want, BITS: tl.constexpr = 32, SKIP_PREFIX: tl.constexpr = False):
    """A threshold t over the `valid` uint32 keys of a 1-D block such that #{valid keys >= t} >= want
    (t = 0 when fewer are valid) and no larger prefix of the want-th largest key does that: the
    bisection stops at the first t with exactly `want` keys at or above it, else (ties at the edge)
    after BITS steps at the want-th largest key itself. BITS < 32: the keys are below 2**BITS (keys
    of scores that carry fewer bits, shifted right by the caller), so the steps above are skipped.
    SKIP_PREFIX: start below the high bits all valid keys share (`common_prefix`: two reductions for
    the steps a narrow score range would spend on them); the same threshold when the bisection runs
    to its end, the same kept set (`keep_largest`) when it stops early."""
    thr = tl.zeros([], tl.uint32)
    one = tl.full([], 1, tl.uint32)
    i = tl.zeros([], tl.int32)
    if SKIP_PREFIX:
        thr, i = common_prefix(key, valid, BITS)
    exact = tl.zeros([], tl.int32)
    # every candidate has a bit set, so an invalid key zeroed once never counts: one AND less per key
    # and step (the InfLLMv2 block top-k issues integer instructions 80% of its cycles, ncu on an H200)
    key = tl.where(valid, key, 0)
    while (i < BITS) & (exact == 0):
        cand_t = thr | (one << (BITS - 1 - i).to(tl.uint32))
        n_ge = tl.sum((key >= cand_t).to(tl.int32), 0)
        thr = tl.where(n_ge >= want, cand_t, thr)
        exact = (n_ge == want).to(tl.int32)
        i += 1
    return thr


@triton.jit
def interpolated_threshold(key, valid, want):
    """`rank_threshold`'s answer found by a safeguarded interpolation search instead of bit by bit.

    The bracket [lo, hi) starts at the smallest and one past the largest valid key, with counts
    n(lo) > want > n(hi) = 0 (n(t) = #{valid keys >= t}). Each step counts once, at the key where
    the line between the bracket's counts meets `want`, or at the bracket's middle when the last step
    did not halve it (so no row takes more than about twice the bisection's steps). It stops at a t
    with n(t) = want (that set is the answer) or when hi = lo + 1 (lo is then the want-th largest
    key). Scores whose keys are smooth between the extremes (a row's top candidates: the tail of a
    distribution) need 10-13 counts where the bisection needs 20-22 (a simulation on 2048-key rows).
    Returns 0 when want >= #valid (every valid key), all ones when want <= 0 (none), as the
    bisection does; the same kept set (`keep_largest`) in every case."""
    key = tl.where(valid, key, 0)  # every valid key is above 0: the zeros never count
    n_valid = tl.sum(valid.to(tl.int32), 0)
    lo = tl.min(tl.where(valid, key, tl.full([], 0xFFFFFFFF, tl.uint32)), 0).to(tl.int64)
    hi = tl.max(key, 0).to(tl.int64) + 1
    n_lo = n_valid
    n_hi = tl.zeros([], tl.int32)
    last_width = tl.full([], 1 << 34, tl.int64)
    done = (want <= 0) | (n_valid <= want)
    while (hi - lo > 1) & (done == 0):
        width = hi - lo
        frac = (n_lo - want).to(tl.float32) / (n_lo - n_hi).to(tl.float32)
        off = (width.to(tl.float32) * frac).to(tl.int64)
        off = tl.where(2 * width > last_width, width // 2, off)  # the last step did not halve it
        t = lo + tl.minimum(tl.maximum(off, 1), width - 1)
        n = tl.sum((key >= t.to(tl.uint32)).to(tl.int32), 0)
        up = n >= want
        lo = tl.where(up, t, lo)
        n_lo = tl.where(up, n, n_lo)
        hi = tl.where(up, hi, t)
        n_hi = tl.where(up, n_hi, n)
        done = up & (n == want)
        last_width = width
    thr = tl.where(want <= 0, 0xFFFFFFFF, tl.where(n_valid <= want, 0, lo))
    return thr.to(tl.uint32)


@triton.jit
def keep_largest(key, valid, want, forced, BITS: tl.constexpr = 32, SKIP_PREFIX: tl.constexpr = False,
                 INTERPOLATE: tl.constexpr = False):
    """Mask of the `forced` entries and the `want` largest keys among the `valid` ones of a 1-D block
    (all of them when fewer are valid); equal keys at the edge go to the earlier positions first.
    When the bisection stopped early, #{keys >= thr} = want, so every key equal to thr is kept.
    INTERPOLATE: the threshold from `interpolated_threshold` (BITS and SKIP_PREFIX unused)."""
    if INTERPOLATE:
        thr = interpolated_threshold(key, valid, want)
    else:
        thr = rank_threshold(key, valid, want, BITS, SKIP_PREFIX)  # exactly want at or above it, or the want-th key (ties)
    gt = valid & (key > thr)
    eq = valid & (key == thr)
    need_eq = want - tl.sum(gt.to(tl.int32), 0)
    eq_rank = tl.cumsum(eq.to(tl.int32), 0) - eq.to(tl.int32)
    return forced | gt | (eq & (eq_rank < need_eq))
