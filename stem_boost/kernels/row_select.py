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
def keep_largest(key, valid, want, forced, BITS: tl.constexpr = 32, SKIP_PREFIX: tl.constexpr = False):
    """Mask of the `forced` entries and the `want` largest keys among the `valid` ones of a 1-D block
    (all of them when fewer are valid); equal keys at the edge go to the earlier positions first.
    When the bisection stopped early, #{keys >= thr} = want, so every key equal to thr is kept."""
    thr = rank_threshold(key, valid, want, BITS, SKIP_PREFIX)  # exactly want at or above it, or the want-th key (ties)
    gt = valid & (key > thr)
    eq = valid & (key == thr)
    need_eq = want - tl.sum(gt.to(tl.int32), 0)
    eq_rank = tl.cumsum(eq.to(tl.int32), 0) - eq.to(tl.int32)
    return forced | gt | (eq & (eq_rank < need_eq))
