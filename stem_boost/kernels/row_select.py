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
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["common_prefix", "keep_largest", "ordered_u32", "rank_threshold"]


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
    Two reductions (the largest and the smallest key); the highest differing bit is read from the
    float exponent of max ^ min, which may round up one bit (then one shared bit is bisected too)."""
    ones = tl.full([], 0xFFFFFFFF, tl.uint32)
    hi = tl.max(tl.where(valid, key, 0), 0)
    lo = tl.min(tl.where(valid, key, ones), 0)
    diff = hi ^ lo  # all ones without a valid key: no prefix
    top = ((diff.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # -127 when diff == 0
    top = tl.minimum(top, BITS - 1)
    one = tl.full([], 1, tl.uint32)
    low_mask = tl.where(top >= 31, ones, (one << tl.minimum(tl.maximum(top + 1, 0), 31).to(tl.uint32)) - one)
    prefix = tl.where(diff == 0, lo, lo & (ones ^ low_mask))
    first = tl.where(diff == 0, BITS, BITS - 1 - top)
    return prefix, first


@triton.jit
def rank_threshold(key, valid, want, BITS: tl.constexpr = 32, SKIP_PREFIX: tl.constexpr = False,
                   BITS_PER_STEP: tl.constexpr = 1):
    """A threshold t over the `valid` uint32 keys of a 1-D block such that #{valid keys >= t} >= want
    (t = 0 when fewer are valid) and no larger prefix of the want-th largest key does that: the
    bisection stops at the first t with exactly `want` keys at or above it, else (ties at the edge)
    after BITS steps at the want-th largest key itself. BITS < 32: the keys are below 2**BITS (keys
    of scores that carry fewer bits, shifted right by the caller), so the steps above are skipped.
    SKIP_PREFIX: start below the high bits all valid keys share (`common_prefix`: two reductions for
    the steps a narrow score range would spend on them); the same threshold when the bisection runs
    to its end, the same kept set (`keep_largest`) when it stops early.
    BITS_PER_STEP = 2: each reduction decides two bits (the three prefixes 01 / 10 / 11 below the
    threshold counted at once, one packed reduction: half the dependent reductions for 1.5x the
    compares); the same threshold at the end, the same kept set when it stops early (it may stop
    one prefix higher, at the same count). Rows of at most 2**15 entries."""
    thr = tl.zeros([], tl.uint32)
    one = tl.full([], 1, tl.uint32)
    i = tl.zeros([], tl.int32)
    if SKIP_PREFIX:
        thr, i = common_prefix(key, valid, BITS)
    exact = tl.zeros([], tl.int32)
    # every candidate has a bit set, so an invalid key zeroed once never counts: one AND less per key
    # and step (the InfLLMv2 block top-k issues integer instructions 80% of its cycles, ncu on an H200)
    key = tl.where(valid, key, 0)
    if BITS_PER_STEP == 1:
        while (i < BITS) & (exact == 0):
            cand_t = thr | (one << (BITS - 1 - i).to(tl.uint32))
            n_ge = tl.sum((key >= cand_t).to(tl.int32), 0)
            thr = tl.where(n_ge >= want, cand_t, thr)
            exact = (n_ge == want).to(tl.int32)
            i += 1
    else:
        tl.static_assert(BITS_PER_STEP == 2, "BITS_PER_STEP must be 1 or 2")
        tl.static_assert(key.numel <= 32768, "two bits a step count in 16-bit fields: rows of at most 2**15 entries")
        while (i < BITS) & (exact == 0):
            # the two bits below the threshold's decided ones (one when a single bit is left: only c1)
            two = i + 2 <= BITS
            low = tl.maximum(BITS - 2 - i, 0).to(tl.uint32)
            c1 = thr | (one << low)  # prefix ..01 (..1 when one bit is left)
            c2 = thr | ((one + one) << low)  # ..10
            c3 = c2 | (one << low)  # ..11
            # #{key >= c1} and #{key >= c3} in the two halves of one int32, #{key >= c2} beside it
            pair = (key >= c1).to(tl.int32) + ((key >= c3) & two).to(tl.int32) * 65536
            mid = ((key >= c2) & two).to(tl.int32)
            pair_n, n2 = tl.reduce((pair, mid), 0, _add_pair)
            n1 = pair_n & 0xFFFF
            n3 = pair_n >> 16
            take3 = n3 >= want
            take2 = (n2 >= want) & ~take3
            take1 = (n1 >= want) & ~take3 & ~take2
            thr = tl.where(take3, c3, tl.where(take2, c2, tl.where(take1, c1, thr)))
            n_at = tl.where(take3, n3, tl.where(take2, n2, tl.where(take1, n1, -1)))
            exact = (n_at == want).to(tl.int32)
            i += tl.where(two, 2, 1)
    return thr


@triton.jit
def _add_pair(a0, b0, a1, b1):
    return a0 + a1, b0 + b1


@triton.jit
def keep_largest(key, valid, want, forced, BITS: tl.constexpr = 32, SKIP_PREFIX: tl.constexpr = False,
                 BITS_PER_STEP: tl.constexpr = 1):
    """Mask of the `forced` entries and the `want` largest keys among the `valid` ones of a 1-D block
    (all of them when fewer are valid); equal keys at the edge go to the earlier positions first.
    When the bisection stopped early, #{keys >= thr} = want, so every key equal to thr is kept."""
    thr = rank_threshold(key, valid, want, BITS, SKIP_PREFIX, BITS_PER_STEP)  # exactly want at or above it, or the want-th key (ties)
    gt = valid & (key > thr)
    eq = valid & (key == thr)
    need_eq = want - tl.sum(gt.to(tl.int32), 0)
    eq_rank = tl.cumsum(eq.to(tl.int32), 0) - eq.to(tl.int32)
    return forced | gt | (eq & (eq_rank < need_eq))
