"""Select the k largest scores of a row held in registers (Triton helpers shared by the InfLLMv2
block top-k and the DSA Stem cut; inlined into their kernels).

A float score becomes an order-preserving uint32 key (`ordered_u32`); a 32-step bisection finds the
k-th largest key among the valid entries, and the entries above it plus the first ties (by position,
i.e. the smaller key or block index when the row is in ascending order) are kept (`keep_largest`).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["keep_largest", "kth_largest_key", "ordered_u32"]


@triton.jit
def ordered_u32(x):
    """Order-preserving uint32 image of float32 x (no NaN; -0.0 taken as +0.0)."""
    x = x + 0.0
    bits = x.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)


@triton.jit
def kth_largest_key(key, valid, want):
    """The want-th largest of the `valid` uint32 keys of a 1-D block (0 when fewer are valid), by a
    32-step bisection: the largest t with #{valid keys >= t} >= want."""
    thr = tl.zeros([], tl.uint32)
    one = tl.full([], 1, tl.uint32)
    for i in tl.static_range(32):
        cand_t = thr | (one << (31 - i))
        n_ge = tl.sum((valid & (key >= cand_t)).to(tl.int32), 0)
        thr = tl.where(n_ge >= want, cand_t, thr)
    return thr


@triton.jit
def keep_largest(key, valid, want, forced):
    """Mask of the `forced` entries and the `want` largest keys among the `valid` ones of a 1-D block
    (all of them when fewer are valid); equal keys at the edge go to the earlier positions first."""
    thr = kth_largest_key(key, valid, want)
    gt = valid & (key > thr)
    eq = valid & (key == thr)
    need_eq = want - tl.sum(gt.to(tl.int32), 0)
    eq_rank = tl.cumsum(eq.to(tl.int32), 0) - eq.to(tl.int32)
    return forced | gt | (eq & (eq_rank < need_eq))
