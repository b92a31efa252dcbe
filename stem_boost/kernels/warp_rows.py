"""Warp-per-row tiles: helpers for kernels that give each row of a matrix to one warp.

A program holds ROWS rows, one per warp, as tiles [32, ROWS, C]: lane l of a row's warp holds
element c * 32 + l of each 32-element chunk c, so a row's counts are sums within threads and
shuffles across its warp's lanes, and nothing a row does waits at a block barrier. The positions
of kept elements come from one warp vote and two population counts per chunk (inline PTX) when
the compiled layout really puts a chunk on one warp's lanes (`ballot_layout_holds`, read from the
compiled TTGIR), else from a scan over the lanes (the interpreter, other layouts): the same
numbers. Used by the DSA top-k (`dsa_topk.topk_rows(method="warp")`) and the InfLLMv2 block top-k
(`infllmv2_select.block_topk(method="warp")`).
"""

from __future__ import annotations

import os
import re

import triton
import triton.language as tl

from .row_select import prefix_between

__all__ = ["ballot_layout_holds", "interpreting", "lane_ranks", "lanes_on_first_axis", "row_counts", "rows_common_prefix",
           "rows_compact", "rows_threshold"]


@triton.jit
def row_counts(x):
    """Per-row totals [ROWS] of a warp-per-row tile x [32, ROWS, C] (lanes, rows, chunks): a sum over
    the chunks in each thread, then over the lanes of the row's warp (shuffles)."""
    return tl.sum(tl.sum(x.to(tl.int32), 2), 0)


@triton.jit
def rows_common_prefix(key, BITS: tl.constexpr = 32):
    """Per row of a warp-per-row tile key [32, ROWS, C] (uint32, 0 where invalid): the high bits all
    its valid keys share (the rest zero) and the index, from the top, of the first bit where two
    differ (`row_select.common_prefix`, all rows at once: two warp reductions a row)."""
    ones = tl.full([], 0xFFFFFFFF, tl.uint32)
    hi = tl.max(tl.max(key, 2), 0)
    lo = tl.min(tl.min(tl.where(key != 0, key, ones), 2), 0)
    return prefix_between(hi, lo, BITS)


@triton.jit
def rows_threshold(key, want, done, BITS: tl.constexpr = 32, SKIP_PREFIX: tl.constexpr = False):
    """Per row of a warp-per-row tile key [32, ROWS, C] (uint32, 0 where invalid): the bisection of
    `row_select.rank_threshold`, all rows at once. A row stops at the first prefix with exactly
    `want` keys at or above it (`done` [ROWS] starts True for rows that need no threshold); the
    loop ends when every row of the program has stopped, after BITS steps at most (keys below
    2**BITS). Every candidate prefix has a bit set, so invalid keys (0) never count. SKIP_PREFIX:
    each row starts below the high bits its valid keys share (`rows_common_prefix`), as
    `rank_threshold` does: the same kept set. Returns the thresholds [ROWS] (uint32)."""
    thr = tl.zeros_like(want).to(tl.uint32)
    exact = done.to(tl.int32)
    first = tl.zeros([], tl.int32)  # the bit each row starts at: one for the program unless SKIP_PREFIX
    if SKIP_PREFIX:
        prefix, first = rows_common_prefix(key, BITS)
        thr = tl.where(exact != 0, thr, prefix)
        exact = exact | (first >= BITS).to(tl.int32)
    i = tl.zeros([], tl.int32)
    while (i < BITS) & (tl.min(exact, 0) == 0):
        pos = first + i  # a scalar without the prefix skip (the warp top-k's registers), else per row
        cand = thr | (tl.full([], 1, tl.uint32) << (BITS - 1 - tl.minimum(pos, BITS - 1)).to(tl.uint32))
        n_ge = row_counts(key >= cand[None, :, None])
        move = (n_ge >= want) & (exact == 0)
        thr = tl.where(move, cand, thr)
        exact = exact | (move & (n_ge == want)).to(tl.int32) | (pos + 1 >= BITS).to(tl.int32)
        i += 1
    return thr


@triton.jit
def lane_ranks(take, BALLOT: tl.constexpr):
    """For a warp-per-row tile take [32, ROWS, C] (lane l of a row's warp holds key l of each
    32-key chunk): how many keys before each lane's in its chunk are taken, and how many the whole
    chunk takes (the same in every lane), both [32, ROWS, C] int32. BALLOT (compiled CUDA): one
    warp vote and two population counts a chunk; else (the CPU interpreter) a scan and a sum over
    the lanes, the same numbers."""
    t = take.to(tl.int32)
    if BALLOT:
        before, total = tl.inline_asm_elementwise(
            asm="""{
            .reg .pred p;
            .reg .b32 m, lt;
            setp.ne.b32 p, $2, 0;
            vote.sync.ballot.b32 m, p, 0xffffffff;
            mov.u32 lt, %lanemask_lt;
            and.b32 lt, lt, m;
            popc.b32 $0, lt;
            popc.b32 $1, m;
            }""",
            constraints="=r,=r,r", args=[t], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        before = tl.cumsum(t, 0) - t
        total = tl.sum(t, 0)[None, :, :] + tl.zeros_like(t)
    return before, total


@triton.jit
def rows_compact(take, written, BALLOT: tl.constexpr):
    """Slots of the taken entries of a warp-per-row tile take [32, ROWS, C], in position order (key
    c * 32 + lane of a step), after the `written` [32, ROWS, 1] entries each row already holds (the
    same in every lane). Returns (slot [32, ROWS, C], written + what the tile took [32, ROWS, 1]):
    nothing crosses a lane but the vote (or the interpreter's scan) of `lane_ranks`."""
    before, total = lane_ranks(take, BALLOT)
    chunks_before = tl.cumsum(total, 2) - total  # within the thread
    return written + chunks_before + before, written + tl.sum(total, 2, keep_dims=True)


def interpreting() -> bool:
    """True under Triton's CPU interpreter (TRITON_INTERPRET=1), which runs no inline PTX."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_BALLOT_LAYOUT: dict[tuple, bool] = {}  # (kernel, launch constexprs) -> whether the compiled vote sees one row a warp


def lanes_on_first_axis(ttgir: str) -> bool:
    """Whether the warp vote of `lane_ranks` in this TTGIR runs on tiles whose first axis is the
    warp's 32 lanes, one element a lane (layout `threadsPerWarp = [32, 1, 1]`): only then is a
    ballot over the warp a ballot over one row's 32-key chunk. The layout is the compiler's choice
    (Triton 3.6 makes this one from the kernel's tiles; 3.9 another), so it is read, not assumed."""
    layouts = dict(re.findall(r"^(#[\w.]+) = (.*)$", ttgir, re.M))
    votes = [line for line in ttgir.splitlines() if "elementwise_inline_asm" in line and "vote.sync.ballot" in line]
    for line in votes:
        operand = re.search(r": tensor<32x\d+x\d+xi32, (#[\w.]+)>", line)
        layout = layouts.get(operand.group(1), "") if operand else ""
        if "sizePerThread = [1, 1, 1]" not in layout or "threadsPerWarp = [32, 1, 1]" not in layout:
            return False
    return bool(votes)


def ballot_layout_holds(kernel, args: tuple, launch: dict) -> bool:
    """`lanes_on_first_axis` for a warp-per-row `kernel` (a jit function with a BALLOT constexpr)
    compiled with BALLOT=True at these arguments and constexprs (once per process, kernel and
    launch configuration; the compile is the launch's own, cached by Triton). False: the kernel
    takes the scans over the lanes instead, slower but correct in any layout (and always under the
    interpreter, which runs no inline PTX)."""
    if interpreting():
        return False
    key = (kernel.fn.__qualname__, tuple(sorted(launch.items())))
    if key not in _BALLOT_LAYOUT:
        compiled = kernel.warmup(*args, grid=(1,), BALLOT=True, **launch)
        _BALLOT_LAYOUT[key] = lanes_on_first_axis(compiled.asm["ttgir"])
    return _BALLOT_LAYOUT[key]
