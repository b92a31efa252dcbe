"""Per-row top-k of index scores by radix select (Triton), with Stem's step inside.

    idx, counts = topk_rows(scores, k, key_bias=None, budgets=None, valid_len=None)

The DSA selection of one chunk of query rows is the top-k of each row of an fp32 score matrix
[B, R, T]. `torch.topk` sorts candidates; Stem then re-ranks them by score + bias (OAM) and cuts
each row to its budget (TPD) with two more sorts. Here one program owns one row and selects in
place, reading the row a few times (the first read from HBM, the others from L2) and writing only
the k kept positions:

1. Order-preserving image: the float score s (+ the key's OAM bias) becomes the uint32
   key = bits(s) ^ (s < 0 ? 0xFFFFFFFF : 0x80000000), so that larger scores give larger keys
   (-0.0 is taken as +0.0). Keys that are -inf, NaN or at positions >= valid_len are invalid
   (key 0, never selected); a row keeps n = min(budget, k, #valid) keys.
2. Radix passes: pass p histograms the next BITS bits of the keys that share the prefix found so
   far (`tl.histogram`, 2**BITS bins; Triton builds it from warp ballots and one popcount per bin
   and lane, so 8-bit digits in 4 passes beat 11-bit digits in 3 by 5x), and finds the bin where
   the running count from the top reaches the number still needed. After ceil(32 / BITS) passes
   the prefix is the n-th largest key `thr`, and `need_eq` is how many keys equal to thr are still
   needed. A pass stops early when its bin is wholly taken (then every key >= the bin's lowest
   value is kept).
3. Collect: one more scan in position order keeps key > thr, and among key == thr the first
   need_eq positions (the tie rule: higher score first, equal scores -> smaller key index first).
   The kept positions are written ascending with a running prefix sum; slots count..k-1 get -1.

Program roles: axis 0 = one query row (b * R + r). Tile: BLOCK keys of the row per step.

`topk_rows(method="sampled")` reads each row once instead: a threshold from a 1/32 sample, the keys
above it (about 1.4 k) kept with their positions in a per-row buffer, and the exact top-k of the
buffer by bisection (`row_select.keep_largest`); a row whose sample misses runs the radix select
above, so both methods return the same set. `candidate_cut` is Stem's cut of a row's top-k
candidates (OAM bias gathered at their keys, the row's budget by bisection) in one pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .row_select import keep_largest, ordered_u32, rank_threshold
from .warp_rows import ballot_layout_holds, interpreting, row_counts, rows_compact, rows_threshold


@triton.jit
def _scores_at(S, B_ROW, offs, in_row, HAS_BIAS: tl.constexpr):
    """Scores (+ bias) at `offs` as fp32, -inf outside the row (apart from `_key_of`, so that the
    warp kernel's main pass can issue a step's loads one step ahead)."""
    s = tl.load(S + offs, mask=in_row, other=float("-inf")).to(tl.float32)
    if HAS_BIAS:
        s = s + tl.load(B_ROW + offs, mask=in_row, other=0.0).to(tl.float32)
    return s


@triton.jit
def _key_of(s):
    """The order-preserving uint32 image of fp32 scores s, 0 for -inf and NaN (never selected):
    bits ^ 0x80000000 for s >= 0, ~bits below (-0.0 taken as +0.0)."""
    bits = (s + 0.0).to(tl.int32, bitcast=True)
    key = (bits ^ ((bits >> 31) | -2147483648)).to(tl.uint32, bitcast=True)  # arithmetic shift: 0 or -1
    return tl.where(s > float("-inf"), key, 0)


@triton.jit
def _score_of_key(key):
    """The fp32 score of a valid uint32 key of `_key_of` (its inverse: bits ^ 0x80000000 where the
    top bit is set, ~bits below; -0.0 comes back as +0.0)."""
    k = key.to(tl.int32, bitcast=True)
    return tl.where(k < 0, k ^ -2147483648, ~k).to(tl.float32, bitcast=True)


@triton.jit
def _ordered_key(S, B_ROW, offs, in_row, HAS_BIAS: tl.constexpr):
    """uint32 order-preserving image of score (+ bias) at `offs`, and whether it is valid: the key
    is 0 exactly where it is not (-inf, NaN, outside the row; a finite or +inf score's key is not)."""
    key = _key_of(_scores_at(S, B_ROW, offs, in_row, HAS_BIAS))
    return key, key != 0


@triton.jit
def _radix_select_row(s_row, b_row, i_row, COUNTS, pid, n_keys, want, k, HAS_BIAS: tl.constexpr,
                      BITS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_OUT: tl.constexpr, PASS_STAGES: tl.constexpr,
                      o_row=None, WRITE_SCORES: tl.constexpr = False):
    """One row's radix select (module docstring, steps 1-3): the `want` largest of its first n_keys
    keys, written ascending at i_row[:count] (then -1 up to k) and the count at COUNTS[pid]; with
    WRITE_SCORES their scores (without the bias) at o_row[:count] (then -inf)."""
    NB: tl.constexpr = 1 << BITS
    N_PASS: tl.constexpr = (32 + BITS - 1) // BITS
    bins = tl.arange(0, NB)
    offs0 = tl.arange(0, BLOCK)

    # ---- radix passes: find thr (the `need`-th largest key) and how many keys == thr to keep
    prefix = tl.zeros([], tl.uint32)  # the digits found so far (the high bits of thr)
    need = tl.zeros([], tl.int32) + want
    done = tl.zeros([], tl.int32) + (want == 0).to(tl.int32)
    thr = tl.zeros([], tl.uint32)
    need_eq = tl.zeros([], tl.int32)
    ONE = tl.full([], 1, tl.int32)
    ZERO = tl.zeros([], tl.int32)
    for p in tl.static_range(N_PASS):
        HI = 32 - p * BITS  # this pass looks at key bits [LO, HI)
        LO = HI - BITS if HI > BITS else 0
        if done == 0:
            hist = tl.zeros([NB], tl.int32)
            for start in tl.range(0, n_keys, BLOCK, num_stages=PASS_STAGES):
                offs = start + offs0
                key, valid = _ordered_key(s_row, b_row, offs, offs < n_keys, HAS_BIAS)
                match = valid
                if p > 0:
                    match = match & ((key >> HI) == prefix)
                digit = ((key >> LO) & (NB - 1)).to(tl.int32)
                hist += tl.histogram(digit, NB, mask=match)
            total = tl.sum(hist, 0)
            if p == 0:
                need = tl.minimum(need, total)  # a row keeps at most its valid keys
            above = total - tl.cumsum(hist, 0)  # keys in bins strictly above each bin
            hit = (above < need) & (above + hist >= need)
            digit_sel = tl.max(tl.where(hit, bins, -1), 0)
            above_sel = tl.sum(tl.where(bins == digit_sel, above, 0), 0)
            count_sel = tl.sum(tl.where(bins == digit_sel, hist, 0), 0)
            if need == 0:  # the row has no valid key
                done = ONE
                thr = tl.full([], 0xFFFFFFFF, tl.uint32)
                need_eq = ZERO
            else:
                prefix = (prefix << (HI - LO)) | digit_sel.to(tl.uint32)
                need = need - above_sel
                if count_sel == need:  # the whole bin is kept: keep every key >= its lowest value
                    done = ONE
                    thr = (prefix << LO) - 1  # >= 0: valid keys are >= 0x00800000
                    need_eq = ZERO
                elif p == N_PASS - 1:
                    done = ONE
                    thr = prefix
                    need_eq = need

    # ---- collect: keep key > thr and the first need_eq keys == thr, ascending by position
    written = tl.zeros([], tl.int32)
    eq_seen = tl.zeros([], tl.int32)
    n_scan = tl.where(want == 0, 0, n_keys)
    for start in tl.range(0, n_scan, BLOCK, num_stages=PASS_STAGES):
        offs = start + offs0
        key, valid = _ordered_key(s_row, b_row, offs, offs < n_keys, HAS_BIAS)
        eq = valid & (key == thr)
        eq_rank = eq_seen + tl.cumsum(eq.to(tl.int32), 0) - 1
        take = (valid & (key > thr)) | (eq & (eq_rank < need_eq))
        slot = written + tl.cumsum(take.to(tl.int32), 0) - 1
        tl.store(i_row + slot, offs, mask=take)
        if WRITE_SCORES:
            tl.store(o_row + slot, tl.load(s_row + offs, mask=take, other=0.0).to(tl.float32), mask=take)
        written += tl.sum(take.to(tl.int32), 0)
        eq_seen += tl.sum(eq.to(tl.int32), 0)
    tl.store(COUNTS + pid, written)
    for start in range(0, k, BLOCK_OUT):
        slot = start + tl.arange(0, BLOCK_OUT)
        tail = (slot >= written) & (slot < k)
        tl.store(i_row + slot, tl.full([BLOCK_OUT], -1, tl.int32), mask=tail)
        if WRITE_SCORES:
            tl.store(o_row + slot, tl.full([BLOCK_OUT], float("-inf"), tl.float32), mask=tail)


@triton.jit
def _row_setup(SCORES, BIAS, BUDGETS, VALID_LEN, IDX, pid, R, T, k, stride_sb, stride_sr, stride_bb, stride_ib,
               stride_ir, HAS_BUDGETS: tl.constexpr, HAS_VALID_LEN: tl.constexpr):
    """Row pid = b * R + r of a top-k launch: its score, bias and output rows, the keys it reads
    (n_keys: its causal limit) and how many it keeps at most (want: its budget, at most k)."""
    b = pid // R
    r = pid % R
    s_row = SCORES + b.to(tl.int64) * stride_sb + r.to(tl.int64) * stride_sr
    b_row = BIAS + b.to(tl.int64) * stride_bb
    i_row = IDX + b.to(tl.int64) * stride_ib + r.to(tl.int64) * stride_ir
    n_keys = T
    if HAS_VALID_LEN:
        n_keys = tl.minimum(tl.maximum(tl.load(VALID_LEN + pid), 0), T)
    want = k
    if HAS_BUDGETS:
        want = tl.minimum(tl.maximum(tl.load(BUDGETS + pid), 0), k)
    return s_row, b_row, i_row, n_keys, want


@triton.jit
def _radix_topk_row(SCORES, BIAS, BUDGETS, VALID_LEN, IDX, COUNTS, SCORES_OUT, row, R, T, k,
                    stride_sb, stride_sr, stride_bb, stride_ib, stride_ir,
                    HAS_BIAS: tl.constexpr, HAS_BUDGETS: tl.constexpr, HAS_VALID_LEN: tl.constexpr,
                    BITS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_OUT: tl.constexpr, PASS_STAGES: tl.constexpr,
                    WRITE_SCORES: tl.constexpr):
    """The radix select of row `row` = b * R + r."""
    s_row, b_row, i_row, n_keys, want = _row_setup(SCORES, BIAS, BUDGETS, VALID_LEN, IDX, row, R, T, k,
                                                   stride_sb, stride_sr, stride_bb, stride_ib, stride_ir,
                                                   HAS_BUDGETS, HAS_VALID_LEN)
    o_row = SCORES_OUT + (row // R).to(tl.int64) * stride_ib + (row % R).to(tl.int64) * stride_ir
    _radix_select_row(s_row, b_row, i_row, COUNTS, row, n_keys, want, k, HAS_BIAS, BITS, BLOCK, BLOCK_OUT,
                      PASS_STAGES, o_row, WRITE_SCORES)


@triton.jit
def _topk_rows_kernel(
    SCORES, BIAS, BUDGETS, VALID_LEN, IDX, COUNTS, FLAGS, SCORES_OUT,
    N_ROWS, R, T, k,
    stride_sb, stride_sr, stride_bb, stride_ib, stride_ir,
    HAS_BIAS: tl.constexpr, HAS_BUDGETS: tl.constexpr, HAS_VALID_LEN: tl.constexpr,
    BITS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_OUT: tl.constexpr, PASS_STAGES: tl.constexpr = 1,
    ONLY_FLAGGED: tl.constexpr = False, WRITE_SCORES: tl.constexpr = False,
):
    """Program: one row, the radix select. ONLY_FLAGGED: a few programs walk all N_ROWS rows (row
    pid, pid + programs, ...) and select only those with FLAGS[row] != 0 (the rows whose sample
    missed in `_topk_rows_warp_kernel`, about 1 in 2 x 10^4 at the default margin). Such a launch
    lasts as long as its slowest flagged row's select on one CTA (about 0.14 ms for 128K keys on an
    H200), so a chunk with one pays that, and one without pays little. WRITE_SCORES: the kept keys' scores too, at
    SCORES_OUT (the strides of IDX)."""
    pid = tl.program_id(0)
    if ONLY_FLAGGED:
        for row in range(pid, N_ROWS, tl.num_programs(0)):
            if tl.load(FLAGS + row) != 0:
                _radix_topk_row(SCORES, BIAS, BUDGETS, VALID_LEN, IDX, COUNTS, SCORES_OUT, row, R, T, k,
                                stride_sb, stride_sr, stride_bb, stride_ib, stride_ir, HAS_BIAS, HAS_BUDGETS,
                                HAS_VALID_LEN, BITS, BLOCK, BLOCK_OUT, PASS_STAGES, WRITE_SCORES)
    else:
        _radix_topk_row(SCORES, BIAS, BUDGETS, VALID_LEN, IDX, COUNTS, SCORES_OUT, pid, R, T, k,
                        stride_sb, stride_sr, stride_bb, stride_ib, stride_ir, HAS_BIAS, HAS_BUDGETS,
                        HAS_VALID_LEN, BITS, BLOCK, BLOCK_OUT, PASS_STAGES, WRITE_SCORES)


@triton.jit
def _topk_rows_sampled_kernel(
    SCORES, BIAS, BUDGETS, VALID_LEN, IDX, COUNTS, BUF_KEY, BUF_POS, FELL_BACK,
    R, T, k,
    stride_sb, stride_sr, stride_bb, stride_ib, stride_ir, stride_fr,
    HAS_BIAS: tl.constexpr, HAS_BUDGETS: tl.constexpr, HAS_VALID_LEN: tl.constexpr,
    BITS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_OUT: tl.constexpr, PASS_STAGES: tl.constexpr,
    N_SAMPLE: tl.constexpr, GROUP: tl.constexpr, SPACING: tl.constexpr, CAP: tl.constexpr,
):
    """Program: one row. (a) a threshold from a sample (GROUP consecutive keys every SPACING: 1 /
    (SPACING / GROUP) of the row), low enough that, with a margin of `margin` standard deviations, at
    least `want` keys lie at or above it; (b) one pass over the row writes every key >= it, with its
    position, in position order to the row's buffer of CAP; (c) the exact top-`want` of the buffer
    (bisection, ties to the earlier position). When the buffer holds fewer than `want` keys or
    overflows, the row takes the radix select instead: the result is exact either way."""
    pid = tl.program_id(0)
    s_row, b_row, i_row, n_keys, want = _row_setup(SCORES, BIAS, BUDGETS, VALID_LEN, IDX, pid, R, T, k, stride_sb,
                                                   stride_sr, stride_bb, stride_ib, stride_ir, HAS_BUDGETS,
                                                   HAS_VALID_LEN)

    # (a) the threshold: the r-th largest sampled key, r = the expected count above the want-th
    # largest key plus 3 standard deviations (and 4); 0 (every valid key) for rows that fit the buffer
    thr = tl.zeros([], tl.uint32)
    if n_keys > CAP:
        j = tl.arange(0, N_SAMPLE)
        pos = (j // GROUP) * SPACING + j % GROUP
        s_key, s_valid = _ordered_key(s_row, b_row, pos, pos < n_keys, HAS_BIAS)
        n_sampled = tl.sum((pos < n_keys).to(tl.int32), 0)
        mean = (want * n_sampled).to(tl.float32) / (n_keys * 1.0)
        rank = tl.ceil(mean + 3.0 * tl.sqrt(mean) + 4.0).to(tl.int32)
        if rank <= tl.sum(s_valid.to(tl.int32), 0):
            thr = rank_threshold(s_key, s_valid, rank)  # `rank` sampled keys at or above it

    # (b) one pass: keys >= thr and their positions, in position order, to the row's buffer
    buf_k = BUF_KEY + pid.to(tl.int64) * stride_fr
    buf_p = BUF_POS + pid.to(tl.int64) * stride_fr
    offs0 = tl.arange(0, BLOCK)
    written = tl.zeros([], tl.int32)
    for start in tl.range(0, n_keys, BLOCK, num_stages=PASS_STAGES):
        offs = start + offs0
        key, valid = _ordered_key(s_row, b_row, offs, offs < n_keys, HAS_BIAS)
        take = valid & (key >= thr)
        slot = written + tl.cumsum(take.to(tl.int32), 0) - 1
        fits = take & (slot < CAP)
        tl.store(buf_k + slot, key.to(tl.int32, bitcast=True), mask=fits)
        tl.store(buf_p + slot, offs, mask=fits)
        written += tl.sum(take.to(tl.int32), 0)
    # thr 0 takes every valid key: a row that fits its buffer keeps min(want, #valid) of them. A
    # higher threshold that took fewer than `want` keys (a sample that missed, or fewer valid keys
    # than `want`) falls back to the radix select, which counts the valid keys itself.
    if (thr == 0) & (written <= CAP):
        want = tl.minimum(want, written)
    fell_back = (written < want) | (written > CAP)
    tl.store(FELL_BACK + pid, fell_back.to(tl.int32))
    if fell_back:  # the sample missed: the exact radix select
        _radix_select_row(s_row, b_row, i_row, COUNTS, pid, n_keys, want, k, HAS_BIAS, BITS, BLOCK, BLOCK_OUT,
                          PASS_STAGES)
    else:
        # (c) the exact top-`want` of the buffer, written ascending by position
        tl.debug_barrier()  # the buffer was written by other threads of this program
        c = tl.arange(0, CAP)
        live = c < written
        key = tl.load(buf_k + c, mask=live, other=0).to(tl.uint32, bitcast=True)
        keep = keep_largest(key, live, want, c < 0)
        pos = tl.load(buf_p + c, mask=keep, other=0)
        slot = tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(i_row + slot, pos, mask=keep)
        count = tl.sum(keep.to(tl.int32), 0)
        tl.store(COUNTS + pid, count)
        for start in range(0, k, BLOCK_OUT):
            out = start + tl.arange(0, BLOCK_OUT)
            tl.store(i_row + out, tl.full([BLOCK_OUT], -1, tl.int32), mask=(out >= count) & (out < k))


@triton.jit(do_not_specialize=["UNIT", "SPACING", "CAP"])
def _topk_rows_warp_kernel(
    SCORES, BIAS, BUDGETS, VALID_LEN, IDX, COUNTS, BUF_KEY, BUF_POS, FELL_BACK, SCORES_OUT,
    N_ROWS, R, T, k, UNIT, SPACING, CAP, MARGIN,
    stride_sb, stride_sr, stride_bb, stride_ib, stride_ir, stride_fr,
    HAS_BIAS: tl.constexpr, HAS_BUDGETS: tl.constexpr, HAS_VALID_LEN: tl.constexpr,
    ROWS: tl.constexpr, NR: tl.constexpr, SCAN_CHUNKS: tl.constexpr,
    SAMPLE_CHUNKS: tl.constexpr, GROUP: tl.constexpr,
    BALLOT: tl.constexpr, WRITE_SCORES: tl.constexpr,
):
    """Program: ROWS rows, one per warp (num_warps = ROWS), so that no step of a row waits at a
    block barrier: a row's counts and prefix sums are warp votes (or shuffles) only. Tiles are
    [32, ROWS, chunks]: lane l of the warp of a row holds key l of each 32-key chunk of it. UNIT is
    1, passed at run time so that the compiler cannot prove the lanes' addresses contiguous: every
    load and store then keeps this layout, where a vectorised one would put several warps on a
    row and route the scans through shared memory. SPACING and CAP follow the row length T (each
    chunk of a causal prefill has its own): run-time values, so that one compiled kernel serves
    every chunk (as constexprs they cost a compile per chunk: minutes on a first 128K prefill). The steps are those of
    `_topk_rows_sampled_kernel`: (a) a threshold from a sample held in registers; (b) one pass over
    the row (NR chunks a step, the next step's loads issued before this step's work) keeps the keys
    at or above it, with their positions, in the row's buffer of CAP; (c) the exact top-`want` of
    the buffer by bisection over it (SCAN_CHUNKS chunks a load), written ascending by position. A
    row whose sample missed is only flagged (FELL_BACK): `topk_rows` then runs the radix select on
    the flagged rows. WRITE_SCORES: the kept keys' scores too, at SCORES_OUT (the strides of IDX)."""
    pid = tl.program_id(0)
    g = pid * ROWS + tl.arange(0, ROWS)  # flattened row ids b * R + r
    row_ok = g < N_ROWS
    b = g // R
    r = g % R
    s_row = SCORES + b.to(tl.int64) * stride_sb + r.to(tl.int64) * stride_sr  # [ROWS] pointers
    b_row = BIAS + b.to(tl.int64) * stride_bb
    out_offset = b.to(tl.int64) * stride_ib + r.to(tl.int64) * stride_ir
    i_row = IDX + out_offset
    n_keys = tl.zeros([ROWS], tl.int32) + T
    if HAS_VALID_LEN:
        n_keys = tl.minimum(tl.maximum(tl.load(VALID_LEN + g, mask=row_ok, other=0), 0), T)
    n_keys = tl.where(row_ok, n_keys, 0)
    want = tl.zeros([ROWS], tl.int32) + k
    if HAS_BUDGETS:
        want = tl.minimum(tl.maximum(tl.load(BUDGETS + g, mask=row_ok, other=0), 0), k)
    lane = tl.arange(0, 32)[:, None, None] * UNIT  # [32, 1, 1]
    s3 = s_row[None, :, None]
    b3 = b_row[None, :, None]
    n3 = n_keys[None, :, None]

    # (a) the threshold: the rank-th largest sampled key (GROUP consecutive keys every SPACING),
    # rank = the expected count above the want-th largest key + MARGIN standard deviations + 4
    j = tl.arange(0, SAMPLE_CHUNKS)[None, None, :] * 32 + lane  # [32, 1, SC]
    pos = (j // GROUP) * SPACING + j % GROUP
    in_sample = pos < n3
    s_key = _key_of(_scores_at(s3, b3, pos, in_sample, HAS_BIAS))
    n_sampled = row_counts(in_sample)
    mean = (want * n_sampled).to(tl.float32) / tl.maximum(n_keys, 1).to(tl.float32)
    rank = tl.ceil(mean + MARGIN * tl.sqrt(mean) + 4.0).to(tl.int32)
    sampled = (n_keys > CAP) & (rank <= row_counts(s_key != 0))
    thr = rows_threshold(s_key, rank, sampled == 0)
    thr = tl.where(sampled, thr, 0)
    thr3 = thr[None, :, None]

    # (b) one pass: keys >= thr and their positions, in position order, to each row's buffer
    buf_k = BUF_KEY + g.to(tl.int64)[None, :, None] * stride_fr
    buf_p = BUF_POS + g.to(tl.int64)[None, :, None] * stride_fr
    chunk = tl.arange(0, NR)[None, None, :] * 32 + lane  # [32, 1, NR]
    written = tl.zeros([32, ROWS, 1], tl.int32)
    n_max = tl.max(n_keys, 0)
    s_next = _scores_at(s3, b3, chunk, chunk < n3, HAS_BIAS)
    for start in range(0, n_max, NR * 32):
        offs = start + chunk
        s = s_next
        s_next = _scores_at(s3, b3, offs + NR * 32, offs + NR * 32 < n3, HAS_BIAS)  # in flight meanwhile
        key = _key_of(s)
        take = (key >= thr3) & (key != 0)
        slot, written_after = rows_compact(take, written, BALLOT)
        fits = take & (slot < CAP)
        tl.store(buf_k + slot, key.to(tl.int32, bitcast=True), mask=fits)
        tl.store(buf_p + slot, offs + tl.zeros_like(slot), mask=fits)
        written = written_after
    written_rows = tl.max(tl.max(written, 2), 0)  # [ROWS] (every lane holds the same count)
    # thr 0 took every valid key: such a row keeps min(want, #valid). A sampled threshold that took
    # fewer than `want` keys, or a buffer that overflowed, sends the row to the radix select.
    want = tl.where((thr == 0) & (written_rows <= CAP), tl.minimum(want, written_rows), want)
    fell_back = row_ok & ((written_rows < want) | (written_rows > CAP))
    tl.store(FELL_BACK + g, fell_back.to(tl.int32), mask=row_ok)
    n_buf = tl.where(fell_back | (row_ok == 0), 0, written_rows)
    nb3 = n_buf[None, :, None]
    tl.debug_barrier()  # the buffers were written by other threads of each warp

    # (c) the exact top-`want` of each buffer: the bisection over the buffer, then the keys above the
    # threshold and the first ties at it, ascending by position
    scan = tl.arange(0, SCAN_CHUNKS)[None, None, :] * 32 + lane  # [32, 1, SCAN_CHUNKS]
    buf_max = tl.max(n_buf, 0)
    thr = tl.zeros([ROWS], tl.uint32)
    exact = (n_buf == 0) | (want == 0)
    i = tl.zeros([], tl.int32)
    while (i < 32) & (tl.min(exact.to(tl.int32), 0) == 0):
        cand = thr | (tl.full([], 1, tl.uint32) << (31 - i).to(tl.uint32))
        ge = tl.zeros([32, ROWS, SCAN_CHUNKS], tl.int32)
        for c0 in range(0, buf_max, SCAN_CHUNKS * 32):
            c = c0 + scan
            kk = tl.load(buf_k + c, mask=c < nb3, other=0).to(tl.uint32, bitcast=True)
            ge += (kk >= cand[None, :, None]).to(tl.int32)
        n_ge = row_counts(ge)
        move = (n_ge >= want) & (exact == 0)
        thr = tl.where(move, cand, thr)
        exact = exact | (move & (n_ge == want))
        i += 1
    thr = tl.where(want == 0, 0xFFFFFFFF, thr)
    gt = tl.zeros([32, ROWS, SCAN_CHUNKS], tl.int32)
    for c0 in range(0, buf_max, SCAN_CHUNKS * 32):
        c = c0 + scan
        kk = tl.load(buf_k + c, mask=c < nb3, other=0).to(tl.uint32, bitcast=True)
        gt += (kk > thr[None, :, None]).to(tl.int32)
    need_eq = (want - row_counts(gt))[None, :, None]
    thr3 = thr[None, :, None]
    count = tl.zeros([32, ROWS, 1], tl.int32)
    eq_seen = tl.zeros([32, ROWS, 1], tl.int32)
    o3 = i_row[None, :, None]
    so3 = SCORES_OUT + out_offset[None, :, None]
    half = tl.arange(0, SCAN_CHUNKS // 2)[None, None, :] * 32 + lane  # the writing pass: half the chunks a
    for c0 in range(0, buf_max, SCAN_CHUNKS * 16):  # step, as it holds five tiles (registers, not spills)
        c = c0 + half
        live = c < nb3
        kk = tl.load(buf_k + c, mask=live, other=0).to(tl.uint32, bitcast=True)
        eq = live & (kk == thr3)
        eq_rank, eq_after = rows_compact(eq, eq_seen, BALLOT)  # the tie's rank among the row's ties
        take = (live & (kk > thr3)) | (eq & (eq_rank < need_eq))
        slot, count_after = rows_compact(take, count, BALLOT)
        kept = tl.load(buf_p + c, mask=take, other=0)
        tl.store(o3 + slot, kept, mask=take)
        if WRITE_SCORES:  # the score without the bias: the key's own value, or with a bias gathered from the row
            if HAS_BIAS:
                tl.store(so3 + slot, tl.load(s3 + kept, mask=take, other=0.0).to(tl.float32), mask=take)
            else:  # no gather: a chunk's rows run in one wave, so the row left L2 long ago (a sector a key)
                tl.store(so3 + slot, _score_of_key(kk), mask=take)
        count = count_after
        eq_seen = eq_after
    done = row_ok & (fell_back == 0)
    count_rows = tl.max(tl.max(count, 2), 0)
    tl.store(COUNTS + g, count_rows, mask=done)
    for o0 in range(0, k, SCAN_CHUNKS * 32):
        o = o0 + scan
        tail = done[None, :, None] & (o >= count) & (o < k)
        tl.store(o3 + o, tl.full([32, ROWS, SCAN_CHUNKS], -1, tl.int32), mask=tail)
        if WRITE_SCORES:
            tl.store(so3 + o, tl.full([32, ROWS, SCAN_CHUNKS], float("-inf"), tl.float32), mask=tail)


TOPK_METHODS = ("radix", "sampled", "warp")
FALLBACK_PROGRAMS = 256  # programs of the radix launch over the rows whose sample missed (two waves on an H200)
FALLBACK_BLOCK, FALLBACK_WARPS = 4096, 8  # its tile (`scripts/bench_dsa.py --sections fallback` compares others)
# the warp top-k's threshold rank: the sample's expected count + this many standard deviations.
# H200, 8192 rows x 64K keys (`bench_dsa.py --sections topk`): margin 3 / 3.5 / 4 / 5 took 1.51 /
# 1.36 / 1.39 / 1.48 ms with the radix fallback on 0.04 / 0.00 / 0.00 / 0.00% of rows
SAMPLE_MARGIN = 3.5


def warp_topk_sample(T: int, samples: int = 1024) -> tuple[int, int]:
    """The sample of `topk_rows(method="warp")` for rows of up to T keys: (group, spacing), `group`
    consecutive keys (8: one 32-byte sector) every `spacing` (at least 256, so at most 1/32 of a
    row; more for long rows, so that a row holds at most `samples` of them)."""
    group = 8
    return group, max(256, -(-T // (samples // group) // group) * group)


WARP_ROWS, WARP_BLOCK = 4, 256  # the warp top-k's defaults: rows a program (one a warp), keys a row a step
# its register cap, per Triton release (the compiler's register use is the release's): with Triton 3.6,
# 72 lets seven 4-warp programs share an SM (six at the compiler's 80), so a 128K prefill's chunk of
# 3328 rows runs in one wave instead of one and a few programs. H200, the layer's chunks (BENCHMARKS.md,
# seventeenth session): 0.82x the time at 128K keys, 0.92-0.97x at 32K-64K; 64 and fewer registers
# spill and lose. Triton 3.9 builds the same kernel with 115-128 registers and spills 264-660 bytes at
# 72 (`stem-boost build`), unmeasured on a GPU: no cap. The same result at any cap.
WARP_MAXNREG_BY_TRITON = {(3, 6): 72}


def warp_maxnreg_default() -> int | None:
    """The warp top-k's register cap for the installed Triton (`WARP_MAXNREG_BY_TRITON`; None: the
    compiler's choice)."""
    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    return WARP_MAXNREG_BY_TRITON.get((major, minor))


def warp_kernel_constexprs(T: int, num_warps: int = WARP_ROWS, block: int = WARP_BLOCK, samples: int = 1024) -> dict:
    """The compile-time parameters of `topk_rows(method="warp")` on rows of up to T keys (besides
    the HAS_* / WRITE_SCORES flags): one set serves every T with the same power-of-two sample size,
    so a causal prefill's chunks, each with its own T, share one or two compiled kernels."""
    group, spacing = warp_topk_sample(T, samples)
    sample_chunks = max(1, min(samples, triton.next_power_of_2(-(-T // spacing) * group)) // 32)
    return dict(ROWS=num_warps, NR=block // 32, SCAN_CHUNKS=16, SAMPLE_CHUNKS=sample_chunks, GROUP=group,
                num_warps=num_warps)


def topk_buffer_bytes(T: int, k: int, method: str = "warp", samples: int = 1024) -> int:
    """Bytes of scratch a row costs in `topk_rows` with the default capacity: the candidate keys and
    positions (int32 each) of "sampled" / "warp"; 0 for "radix"."""
    if method == "radix":
        return 0
    if method == "sampled":
        return 8 * 4096
    group, spacing = warp_topk_sample(T, samples)
    return 8 * warp_topk_capacity(k, group / spacing)


def warp_topk_capacity(k: int, fraction: float, margin: float = SAMPLE_MARGIN) -> int:
    """Buffer entries a row needs in `topk_rows(method="warp")` when a `fraction` of its keys is
    sampled: the threshold is the sample's (m + margin sqrt(m) + 4)-th largest key (m = k * fraction,
    the expected count above the k-th largest key), so about that many / fraction keys pass it, with
    a standard deviation of sqrt(that) / fraction, skewed upwards (the passing share of a row is
    Beta-distributed). Room for 7 standard deviations more, in whole 128-key chunks: at 128K keys,
    k 2048, a 1/128 sample and margin 3 (rank 32 of 1024 samples), a buffer of 9216 overflows in
    about 1 row in 10^7 (Beta(32, 993) x T above it; 4.5 standard deviations, 7424 entries, did in
    5 in 10^5). Capacity costs memory only: the passes over a buffer stop at what was written."""
    m = k * fraction
    passing = m + margin * m ** 0.5 + 4.0
    need = (passing + 7.0 * passing ** 0.5) / fraction
    return max(128, -(-int(need) // 128) * 128)


def topk_rows(
    scores: torch.Tensor,
    k: int,
    *,
    key_bias: torch.Tensor | None = None,
    budgets: torch.Tensor | None = None,
    valid_len: torch.Tensor | None = None,
    bits: int = 8,
    block: int | None = None,
    num_warps: int | None = None,
    stages: int | None = None,
    method: str = "radix",
    capacity: int | None = None,
    fell_back: torch.Tensor | None = None,
    samples: int = 1024,
    out: torch.Tensor | None = None,
    out_scores: torch.Tensor | None = None,
    fallback: tuple[int, int] | None = None,
    margin: float = SAMPLE_MARGIN,
    maxnreg: int | str | None = "default",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k key positions of every row of `scores`, ascending by position, with Stem's step inside.

    scores [B, R, T] fp32 / bf16 / fp16 (-inf where masked or acausal); key_bias [B, T] or None: added
    to every row's scores before ranking (Stem's OAM bias); budgets int [B, R] or None: row r keeps
    min(budgets[b, r], k, #valid) keys (Stem's TPD budget; None = k); valid_len int [B, R] or None:
    row r only looks at keys t < valid_len[b, r] (the causal limit; the tail is never read).
    A key is valid when its score (+ bias) is neither -inf nor NaN and t < valid_len.
    Ranking: higher score first; equal scores -> smaller key index first.
    Returns idx int32 [B, R, k] (kept positions ascending, then -1) and counts int32 [B, R].
    Tuning knobs: `bits` (radix digit width; 8, i.e. 4 passes, is the fastest measured: the
    histogram's cost grows with its bin count), `block` (keys per step; default 4096, "sampled" 2048:
    128 registers, two rows in flight per SM on sm_90), `num_warps`, `stages`
    (software-pipeline depth of the passes over the row: > 1 keeps the next steps' loads in flight
    through shared memory at the cost of registers; default: 2 for "sampled" without a key bias,
    else 1 — H200, 8192 rows x 65536 keys: sampled 3.4 ms at 2 stages vs 4.1 at 1, but with the
    bias's second load stream 5.7 vs 3.9; the radix select is fastest at 1).
    method: "radix" (the radix select above: about five reads of each row), "sampled" (a
    threshold from a 1/32 sample, then one read of the row that keeps the keys above it in a buffer
    of `capacity` per row, and the exact top-k of that buffer; a row whose sample misses takes the
    radix select: the result is the same set either way; for k = 2048 the buffer receives about
    2900 +- 300 keys: the default capacity 4096 overflows in about 1 row in 10^4) or "warp" (the
    same steps with one row a warp, `num_warps` rows a program, so that no step of a row waits at a
    block barrier; at most `samples` sampled keys a row, held in registers; `block` keys a row a
    step (default 256); `capacity` default `warp_topk_capacity`; the rows whose sample missed take
    the radix select in a second launch). The buffers cost B * R * capacity * 8 bytes.
    fell_back: optional int32 [B, R], filled by "sampled" / "warp" with 1 where a row took the radix select.
    out: optional int32 [B, R, k] (unit last stride, e.g. a slice of a larger result) to write the
    indices into. out_scores: optional fp32 [B, R, k] with out's strides: each kept key's score
    (without the bias), -inf after the row's count; the kernels of "warp" and "radix" write it as
    they write the indices ("sampled": one gather after).
    num_warps default: 4 for "warp" (rows a program; H200, 8192 rows x 65536 keys: 1.56 ms against
    1.61 at 8), else 8. fallback: (keys a step, warps) of "warp"'s radix select over the rows whose
    sample missed (default `FALLBACK_BLOCK`, `FALLBACK_WARPS`; a tuning knob, the same set).
    margin: "warp"'s sampled threshold is the sample's (m + margin sqrt(m) + 4)-th largest key (m
    the sample's expected count above the k-th key). At margin 3 a 128K-key row gets fewer than k
    keys above it, and takes the radix select, about 1 time in 4000 (Beta(32, 993) model; 0.02-0.04%
    measured): about one row a 3584-row chunk, each such launch as long as one row's select (0.14
    ms on an H200, 5.7 ms of a 128K prefill). The default 3.5 (rank 34 of 1024 samples): about 1 in
    2 x 10^4 (Beta(34, 991); none in 8192 rows measured), for 6% more keys in the buffer, and the
    top-k 10% faster on an H200; 4: about 1 in 10^5.
    maxnreg: "warp"'s register cap a thread, a tuning knob: fewer registers put more row warps on an
    SM at once (the kernel waits on memory latency). "default": the cap measured for the installed
    Triton (`warp_maxnreg_default`: 72 on Triton 3.6); None: the compiler's choice (80 on 3.6, sm_90).
    """
    if scores.dim() != 3:
        raise ValueError(f"scores must be [B, R, T]; got {tuple(scores.shape)}")
    if scores.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"scores.dtype={scores.dtype}; allowed: float32, bfloat16, float16")
    if not 4 <= bits <= 12:
        raise ValueError(f"bits={bits}; allowed: 4..12")
    B, R, T = scores.shape
    k = int(k)
    if k < 0:
        raise ValueError(f"k={k} must be >= 0")
    device = scores.device
    if out is not None and (out.shape != (B, R, k) or out.dtype != torch.int32 or (k and out.stride(-1) != 1)):
        raise ValueError(f"out must be an int32 [B={B}, R={R}, k={k}] tensor with unit last stride; got "
                         f"{out.dtype} {tuple(out.shape)} strides {out.stride()}")
    if out_scores is not None and (out_scores.shape != (B, R, k) or out_scores.dtype != torch.float32
                                   or (out is not None and out_scores.stride() != out.stride())
                                   or (out is None and not out_scores.is_contiguous())):
        raise ValueError(f"out_scores must be a float32 [B={B}, R={R}, k={k}] tensor with out's strides "
                         f"(contiguous without out); got {out_scores.dtype} {tuple(out_scores.shape)}")
    idx = out if out is not None else torch.empty(B, R, k, dtype=torch.int32, device=device)
    counts = torch.empty(B, R, dtype=torch.int32, device=device)
    if B * R == 0:
        return idx, counts
    if k == 0:
        return idx, counts.zero_()
    scores = scores if scores.stride(-1) == 1 else scores.contiguous()
    if key_bias is not None:
        if key_bias.shape != (B, T):
            raise ValueError(f"key_bias must be [B={B}, T={T}]; got {tuple(key_bias.shape)}")
        key_bias = key_bias.to(device=device, dtype=torch.float32).contiguous()
    for name, t in (("budgets", budgets), ("valid_len", valid_len)):
        if t is not None and t.shape != (B, R):
            raise ValueError(f"{name} must be [B={B}, R={R}]; got {tuple(t.shape)}")
    budgets = budgets.to(device=device, dtype=torch.int32).contiguous() if budgets is not None else None
    valid_len = valid_len.to(device=device, dtype=torch.int32).contiguous() if valid_len is not None else None
    if method not in TOPK_METHODS:
        raise ValueError(f"method={method!r}; allowed: {', '.join(map(repr, TOPK_METHODS))}")
    if method != "warp" and maxnreg not in ("default", None):
        raise ValueError(f"maxnreg={maxnreg!r} caps the registers of method='warp' only; got method={method!r}")
    if fell_back is not None and (fell_back.shape != (B, R) or fell_back.dtype != torch.int32
                                  or not fell_back.is_contiguous()):
        raise ValueError(f"fell_back must be a contiguous int32 [B={B}, R={R}] tensor; got "
                         f"{fell_back.dtype} {tuple(fell_back.shape)}")
    has = dict(HAS_BIAS=key_bias is not None, HAS_BUDGETS=budgets is not None, HAS_VALID_LEN=valid_len is not None)
    row_args = (scores, key_bias if key_bias is not None else scores, budgets if budgets is not None else counts,
                valid_len if valid_len is not None else counts, idx, counts)
    strides = (scores.stride(0), scores.stride(1), key_bias.stride(0) if key_bias is not None else 0,
               idx.stride(0), idx.stride(1))
    block_out = min(1024, triton.next_power_of_2(k))

    scores_out = out_scores if out_scores is not None else counts

    def radix(flags: torch.Tensor | None, radix_block: int, radix_stages: int, warps: int) -> None:
        """The radix select on every row, or only on the rows with flags != 0."""
        grid = (B * R,) if flags is None else (min(B * R, FALLBACK_PROGRAMS),)
        _topk_rows_kernel[grid](
            *row_args, flags if flags is not None else counts, scores_out, B * R, R, T, k, *strides, **has, BITS=bits,
            BLOCK=min(radix_block, triton.next_power_of_2(max(T, 16))), BLOCK_OUT=block_out,
            PASS_STAGES=radix_stages, ONLY_FLAGGED=flags is not None, WRITE_SCORES=out_scores is not None,
            num_warps=warps)

    if method == "warp":
        num_warps = num_warps or WARP_ROWS
        if num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps={num_warps}; allowed for method='warp' (one row a warp): 1, 2, 4, 8, 16")
        block = block or WARP_BLOCK
        if block < 32 or block & (block - 1):
            raise ValueError(f"block={block}; allowed for method='warp': a power of two >= 32 (keys a row a step)")
        if samples < 32 or samples & (samples - 1):
            raise ValueError(f"samples={samples}; allowed: a power of two >= 32")
        group, spacing = warp_topk_sample(T, samples)
        if not margin >= 0:
            raise ValueError(f"margin={margin!r}; allowed: >= 0 (standard deviations of the sample's threshold rank)")
        capacity = capacity or warp_topk_capacity(k, group / spacing, margin)
        if capacity < 16:
            raise ValueError(f"capacity={capacity}; allowed: >= 16")
        buf_key = torch.empty(B * R, capacity, dtype=torch.int32, device=device)
        buf_pos = torch.empty_like(buf_key)
        flags = fell_back if fell_back is not None else torch.empty(B, R, dtype=torch.int32, device=device)
        args = (*row_args, buf_key, buf_pos, flags, scores_out, B * R, R, T, k, 1, spacing, capacity, float(margin),
                *strides, buf_key.stride(0))
        launch = dict(has, **warp_kernel_constexprs(T, num_warps, block, samples), WRITE_SCORES=out_scores is not None)
        if maxnreg == "default":
            maxnreg = warp_maxnreg_default()
        if maxnreg is not None and (isinstance(maxnreg, str) or not 32 <= maxnreg <= 255):
            raise ValueError(f"maxnreg={maxnreg!r}; allowed: 'default', None or 32..255 registers a thread")
        regs = {} if maxnreg is None or interpreting() else dict(maxnreg=int(maxnreg))
        ballot = ballot_layout_holds(_topk_rows_warp_kernel, args, dict(launch, **regs))
        _topk_rows_warp_kernel[(triton.cdiv(B * R, num_warps),)](*args, BALLOT=ballot, **launch, **regs)
        # the rows whose sample missed (about 1 in 2 x 10^4 at the default margin): a launch costs one row's
        # select, whose latency (5 passes over up to 128K keys) one CTA carries alone
        fb_block, fb_warps = fallback or (FALLBACK_BLOCK, FALLBACK_WARPS)
        radix(flags, fb_block, 1, fb_warps)
        return idx, counts
    num_warps = num_warps or 8
    block = block or (2048 if method == "sampled" else 4096)
    if stages is None:
        stages = 2 if method == "sampled" and key_bias is None else 1
    block = min(block, triton.next_power_of_2(max(T, 16)))
    if method == "sampled":
        capacity = capacity or 4096
        if capacity < 16 or capacity & (capacity - 1):
            raise ValueError(f"capacity={capacity}; allowed: a power of two >= 16")
        group, spacing = 8, 256  # 8 consecutive keys (one 32-byte sector) every 256: 1/32 of the row
        n_sample = max(16, triton.next_power_of_2(-(-T // spacing) * group))
        buf_key = torch.empty(B * R, capacity, dtype=torch.int32, device=device)
        buf_pos = torch.empty_like(buf_key)
        if fell_back is None:
            fell_back = torch.empty(B, R, dtype=torch.int32, device=device)
        _topk_rows_sampled_kernel[(B * R,)](
            *row_args, buf_key, buf_pos, fell_back, R, T, k, *strides, buf_key.stride(0), **has,
            BITS=bits, BLOCK=block, BLOCK_OUT=block_out, PASS_STAGES=stages,
            N_SAMPLE=n_sample, GROUP=group, SPACING=spacing, CAP=capacity, num_warps=num_warps,
        )
        if out_scores is not None:
            kept = scores.gather(-1, idx.clamp_min(0).long()).float()
            out_scores.copy_(torch.where(idx >= 0, kept, float("-inf")))
        return idx, counts
    radix(None, block, stages, num_warps)
    return idx, counts


# How the cut (`candidate_cut`) finds a row's threshold: "bisect" (bit by bit) or "interpolate" (an
# interpolation search), and whether the bisection starts below the bits a row's candidates share.
# Every choice keeps the same set. H200, 32768 rows x 2048 candidates (BENCHMARKS.md, nineteenth
# session): the shared prefix skipped 1.00-1.03x the time, the interpolation 0.99-1.05x, two bits a count
# 1.13x. The cut's time is not its search but its load latency at the occupancy its registers allow
# (ncu, twentieth session: 1.1-1.5 TB/s with DRAM 23-32% busy, at 19-31% occupancy).
SEARCHES = ("bisect", "interpolate")
CUT_SEARCH = "bisect"
CUT_SKIP_PREFIX = False


@triton.jit
def _candidate_cut_kernel(
    CAND, SCORES, BIAS, BUDGETS, IDX, COUNTS,
    H, R, K,
    stride_cb, stride_ch, stride_cr,
    stride_sb, stride_sh, stride_sr,
    stride_bb, stride_bh,
    stride_ub, stride_uh, stride_ur,
    stride_ib, stride_ih, stride_ir,
    HAS_BIAS: tl.constexpr, KP: tl.constexpr, SKIP_PREFIX: tl.constexpr, INTERPOLATE: tl.constexpr,
):
    """Program: one candidate row (b, h, r). Its K candidates stay in registers: one read of the
    candidates, their scores and (gathered) biases, the threshold of the budget-th largest
    order-preserving key (`row_select.keep_largest`), one write of the kept candidates. (Persistent
    programs that load their next row into registers while they cut this one ran 1.29-1.55x slower on
    an H200: 159 registers, 2-4 programs an SM; BENCHMARKS.md, nineteenth session.)"""
    pid = tl.program_id(0)
    r = pid % R
    bh = pid // R
    b = bh // H
    h = bh % H
    cols = tl.arange(0, KP)
    in_row = cols < K
    cand = tl.load(CAND + b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch + r.to(tl.int64) * stride_cr + cols,
                   mask=in_row, other=-1)
    live = cand >= 0
    s = tl.load(SCORES + b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh + r.to(tl.int64) * stride_sr + cols,
                mask=live, other=float("-inf")).to(tl.float32)
    if HAS_BIAS:  # Stem's OAM bias of each candidate's key (log space), gathered
        s = s + tl.load(BIAS + b.to(tl.int64) * stride_bb + h.to(tl.int64) * stride_bh + cand, mask=live, other=0.0)
    valid = live & (s > float("-inf"))  # False for -inf and NaN
    key = tl.where(valid, ordered_u32(s), 0)
    want = tl.load(BUDGETS + b.to(tl.int64) * stride_ub + h.to(tl.int64) * stride_uh + r.to(tl.int64) * stride_ur)
    want = tl.minimum(tl.maximum(want, 0), tl.sum(valid.to(tl.int32), 0))
    keep = keep_largest(key, valid, want, cols < 0, 32, SKIP_PREFIX, INTERPOLATE)  # ties: the earlier column (smaller key) first
    count = tl.sum(keep.to(tl.int32), 0)
    slot = tl.cumsum(keep.to(tl.int32), 0) - 1
    out = IDX + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih + r.to(tl.int64) * stride_ir
    tl.store(out + slot, cand, mask=keep)
    tl.store(out + cols, tl.full([KP], -1, tl.int32), mask=in_row & (cols >= count))
    tl.store(COUNTS + pid, count)


@triton.jit
def _cut_warp_keys(c3, s3, b3, cols, in_row, HAS_BIAS: tl.constexpr):
    """The candidates at `cols` of warp-per-row rows and their order-preserving keys (score + the
    gathered OAM bias), 0 for holes (-1), -inf and NaN scores: (cand, key), both [32, ROWS, n]."""
    cand = tl.load(c3 + cols, mask=in_row, other=-1)
    s = tl.load(s3 + cols, mask=in_row, other=float("-inf")).to(tl.float32)  # not waiting for cand
    live = cand >= 0
    if HAS_BIAS:  # Stem's OAM bias of each candidate's key (log space), gathered
        s = s + tl.load(b3 + cand, mask=live, other=0.0)
    return cand, tl.where(live, _key_of(s), 0)


@triton.jit
def _cut_warp_write(c3, s3, b3, o3, lane, ok3, thr3, need_eq3, want3, K, HAS_BIAS: tl.constexpr,
                    ROWS: tl.constexpr, OUT_C: tl.constexpr, BALLOT: tl.constexpr, STASH: tl.constexpr,
                    TIES: tl.constexpr):
    """(c) of `_candidate_cut_warp_kernel`, OUT_C chunks a step: the `want` kept candidates of each row
    written ascending at o3 and -1 after them. Without TIES every key >= thr is kept (each row's
    bisection stopped at a prefix with exactly its budget at or above it); with TIES the keys > thr
    and the first need_eq keys == thr by position. The keys are read back from o3 (STASH: (a) left
    them there) or recomputed from the candidates and scores. A step reads its positions before it
    writes, and writes slots below its last position (a row's n-th kept candidate lies at or after
    position n) and -1 at its own positions from `want` on: nothing is overwritten before it is read."""
    written = tl.zeros([32, ROWS, 1], tl.int32)
    eq_seen = tl.zeros([32, ROWS, 1], tl.int32)
    part = tl.arange(0, OUT_C)[None, None, :] * 32 + lane  # [32, 1, OUT_C]
    for c0 in range(0, K, OUT_C * 32):
        cc = c0 + part
        in_part = (cc < K) & ok3
        if STASH:
            k_p = tl.load(o3 + cc, mask=in_part, other=0).to(tl.uint32, bitcast=True)
            cand_p = tl.load(c3 + cc, mask=in_part, other=-1)
        else:
            cand_p, k_p = _cut_warp_keys(c3, s3, b3, cc, in_part, HAS_BIAS)
        if TIES:
            eq = (k_p == thr3) & (k_p != 0)
            eq_rank, eq_seen = rows_compact(eq, eq_seen, BALLOT)
            take = (k_p > thr3) | (eq & (eq_rank < need_eq3))
        else:
            take = (k_p >= thr3) & (k_p != 0)
        slot, written = rows_compact(take, written, BALLOT)
        tl.store(o3 + slot, cand_p, mask=take)
        tl.store(o3 + cc, tl.full([32, ROWS, OUT_C], -1, tl.int32), mask=in_part & (cc >= want3))


@triton.jit(do_not_specialize=["UNIT"])
def _candidate_cut_warp_kernel(
    CAND, SCORES, BIAS, BUDGETS, IDX, COUNTS,
    N_ROWS, H, R, K, UNIT,
    stride_cb, stride_ch, stride_cr,
    stride_sb, stride_sh, stride_sr,
    stride_bb, stride_bh,
    stride_ub, stride_uh, stride_ur,
    stride_ib, stride_ih, stride_ir,
    HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, C: tl.constexpr, OUT_C: tl.constexpr, BALLOT: tl.constexpr,
    SKIP_PREFIX: tl.constexpr, STASH: tl.constexpr,
):
    """Program: ROWS candidate rows, one a warp (num_warps = ROWS), as warp-per-row tiles [32, ROWS, C]
    (`warp_rows`: lane l holds candidate c * 32 + l of chunk c; UNIT = 1 at run time keeps that layout).
    Every count of the bisection is a sum in each thread and a warp reduction, so a row never waits
    at a block barrier. (a) one read of the candidates and their scores (independent loads) and the
    gathered OAM bias: the order-preserving keys, 0 where not a candidate (STASH: also written to the
    output row, which (c) overwrites); (b) the budget-th largest key by bisection (`rows_threshold`,
    SKIP_PREFIX: from below the bits a row's keys share); (c) the kept candidates written ascending
    (`_cut_warp_write`; the tie rule's ranks only in a program where some row ended on a tie) and -1
    after them, in one pass."""
    pid = tl.program_id(0)
    g = pid * ROWS + tl.arange(0, ROWS)  # flattened row ids (b * H + h) * R + r
    row_ok = g < N_ROWS
    r = (g % R).to(tl.int64)
    bh = g // R
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    c3 = (CAND + b * stride_cb + h * stride_ch + r * stride_cr)[None, :, None]  # [1, ROWS, 1]
    s3 = (SCORES + b * stride_sb + h * stride_sh + r * stride_sr)[None, :, None]
    b3 = (BIAS + b * stride_bb + h * stride_bh)[None, :, None]
    o3 = (IDX + b * stride_ib + h * stride_ih + r * stride_ir)[None, :, None]
    lane = tl.arange(0, 32)[:, None, None] * UNIT  # [32, 1, 1]
    ok3 = row_ok[None, :, None]

    # (a) keys: 0 for holes (-1), -inf and NaN scores
    col = tl.arange(0, C)[None, None, :] * 32 + lane  # [32, 1, C]
    in_row = (col < K) & ok3
    _, key = _cut_warp_keys(c3, s3, b3, col, in_row, HAS_BIAS)
    if STASH:
        tl.store(o3 + col, key.to(tl.int32, bitcast=True), mask=in_row)
    n_valid = row_counts(key != 0)  # [ROWS]
    want = tl.load(BUDGETS + b * stride_ub + h * stride_uh + r * stride_ur, mask=row_ok, other=0)
    want = tl.minimum(tl.maximum(want, 0), n_valid)

    # (b) the threshold: rows keeping all their valid keys take 0 (every valid key is above it)
    thr = rows_threshold(key, want, (want == 0) | (want == n_valid), 32, SKIP_PREFIX)
    thr = tl.where(want == 0, 0xFFFFFFFF, thr)  # no key reaches it: none kept
    thr3 = thr[None, :, None]
    want3 = want[None, :, None]
    n_ge = row_counts((key >= thr3) & (key != 0))
    if tl.max((n_ge != want).to(tl.int32), 0) == 0:  # every row's bisection stopped at exactly its budget
        _cut_warp_write(c3, s3, b3, o3, lane, ok3, thr3, thr3, want3, K, HAS_BIAS, ROWS, OUT_C, BALLOT, STASH, False)
    else:  # ties at some row's threshold: keys > thr, then the first need_eq ties by position
        need_eq = want - row_counts(key > thr3)
        _cut_warp_write(c3, s3, b3, o3, lane, ok3, thr3, need_eq[None, :, None], want3, K, HAS_BIAS, ROWS, OUT_C,
                        BALLOT, STASH, True)
    tl.store(COUNTS + g, want, mask=row_ok)  # a row keeps exactly min(budget, #valid)


# Stem's cut: one row a program ("block", `_candidate_cut_kernel`) or one row a warp ("warp"). H200,
# 32768 rows x 2048 candidates (BENCHMARKS.md, twentieth session): the warp cut at 2 rows a program,
# 168 registers (Triton 3.6) and its keys stashed 0.94x the block cut's time on tail rows (0.62 / 0.66
# ms; 0.93-1.35x over its other tilings), 0.92x in the 128K layer (2.56-2.66 ms against 2.78-2.88).
# Neither is bound by its counts: the one-row-a-program cut's barriers, occupancy, the prefix skip and
# the interpolation search all moved it by less than 7%.
CUT_METHODS = ("block", "warp")
CUT_METHOD = "warp"
CUT_WARP_ROWS, CUT_OUT_CHUNKS = 2, 4  # the warp cut's rows a program (one a warp) and chunks of 32 a writing step
CUT_WARP_STASH = True  # the warp cut's keys parked in its output row between (a) and (c), else recomputed
# its register cap per Triton release: 3.6 builds it with 246 registers (8 warps an SM), 168 leaves 12
# without spill (`stem-boost build --cases "stem cut warp"`); 3.9 builds it with 208 and spills 256 bytes
# at 168: no cap
CUT_WARP_MAXNREG_BY_TRITON = {(3, 6): 168}


def cut_warp_maxnreg_default() -> int:
    """The warp cut's register cap for the installed Triton (`CUT_WARP_MAXNREG_BY_TRITON`; 0: the
    compiler's choice)."""
    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    return CUT_WARP_MAXNREG_BY_TRITON.get((major, minor), 0)


def candidate_cut(
    cand_idx: torch.Tensor,
    scores: torch.Tensor,
    budgets: torch.Tensor,
    *,
    key_bias: torch.Tensor | None = None,
    num_warps: int | None = None,
    skip_prefix: bool | None = None,
    search: str | None = None,
    method: str | None = None,
    out_chunks: int | None = None,
    maxnreg: int | None = None,
    stash: bool | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stem's cut of token candidates in one pass: each row keeps its budget of candidates by
    score + OAM bias (the tie rule: higher first, equal -> the smaller key index).

    cand_idx [B, H, R, K] int (live entries ascending by key index, -1 anywhere else: the native
    selectors write them so); scores [B, H, R, K] fp32 / bf16 / fp16 logits (-inf: not a candidate);
    budgets int [B, H, R] (broadcast views welcome); key_bias [B, H|1, N] fp32 per key or None.
    Returns idx int32 [B, H, R, K] (the kept keys ascending, then -1) and counts int32 [B, H, R].
    Unlike `topk_rows` over a gathered score matrix, nothing [B, H, R, K] is written but the result.
    `search`: how a row's threshold is found, "bisect" (`row_select.rank_threshold`, bit by bit) or
    "interpolate" (`row_select.interpolated_threshold`); `skip_prefix`: the bisection starts below
    the high bits all of a row's candidates share (`row_select.common_prefix`). Every choice keeps
    the same set; None takes `CUT_SEARCH` / `CUT_SKIP_PREFIX`.
    `method`: "block" (`_candidate_cut_kernel`: one row a program of `num_warps` warps, default 4; the
    searches above) or "warp" (`_candidate_cut_warp_kernel`: one row a warp, `num_warps` rows a
    program, default `CUT_WARP_ROWS`; the bisection, `out_chunks` chunks of 32 a writing step,
    `maxnreg` a register cap (0: none), `stash` the keys parked in the output row rather than
    recomputed); None takes `CUT_METHOD` (and the `CUT_*` defaults). Both keep the same set.
    out: optional int32 [B, H, R, K] with unit last stride (e.g. rows of a larger result) to write
    the kept keys into; it must not overlap cand_idx or scores. It is returned as idx.
    """
    if cand_idx.dim() != 4 or scores.shape != cand_idx.shape:
        raise ValueError(f"cand_idx and scores must be one [B, H, R, K] shape; got {tuple(cand_idx.shape)}, "
                         f"{tuple(scores.shape)}")
    B, H, R, K = cand_idx.shape
    method = CUT_METHOD if method is None else method
    if method not in CUT_METHODS:
        raise ValueError(f"method={method!r}; allowed: {', '.join(map(repr, CUT_METHODS))}")
    skip_prefix = CUT_SKIP_PREFIX if skip_prefix is None else skip_prefix
    search = CUT_SEARCH if search is None else search
    if search not in SEARCHES:
        raise ValueError(f"search={search!r}; allowed: {', '.join(map(repr, SEARCHES))}")
    if method == "warp" and search != "bisect":
        raise ValueError(f"method='warp' finds a row's threshold by bisection; got search={search!r} (allowed with "
                         f"it: 'bisect', from the top or, skip_prefix=True, below the bits a row's keys share)")
    if budgets.shape != (B, H, R):
        raise ValueError(f"budgets must be [B={B}, H={H}, R={R}]; got {tuple(budgets.shape)}")
    device = cand_idx.device
    if out is not None and (out.shape != (B, H, R, K) or out.dtype != torch.int32 or out.device != device
                            or (K and out.stride(-1) != 1)):
        raise ValueError(f"out must be an int32 [B={B}, H={H}, R={R}, K={K}] tensor on {device} with unit last "
                         f"stride; got {out.dtype} {tuple(out.shape)} on {out.device}, strides {out.stride()}")
    idx = out if out is not None else torch.empty(B, H, R, K, dtype=torch.int32, device=device)
    counts = torch.empty(B, H, R, dtype=torch.int32, device=device)
    if idx.numel() == 0:
        return idx, counts.zero_()
    cand_idx = cand_idx.to(torch.int32)
    cand_idx = cand_idx if cand_idx.stride(-1) == 1 else cand_idx.contiguous()
    scores = scores if scores.stride(-1) == 1 else scores.contiguous()
    budgets = budgets.to(device=device, dtype=torch.int32)
    if key_bias is not None:
        if key_bias.dim() != 3 or key_bias.shape[0] != B or key_bias.shape[1] not in (1, H):
            raise ValueError(f"key_bias must be [B={B}, 1 or H={H}, N]; got {tuple(key_bias.shape)}")
        key_bias = key_bias.to(device=device, dtype=torch.float32).contiguous()
    kp = max(16, triton.next_power_of_2(K))
    bias_arg = key_bias if key_bias is not None else scores
    bias_strides = (key_bias.stride(0) if key_bias is not None else 0,
                    (key_bias.stride(1) if key_bias.shape[1] > 1 else 0) if key_bias is not None else 0)
    if method == "warp":
        rows = num_warps or CUT_WARP_ROWS
        if rows not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps={rows}; allowed for method='warp' (one row a warp): 1, 2, 4, 8, 16")
        if out_chunks is not None and (out_chunks < 1 or out_chunks & (out_chunks - 1)):
            raise ValueError(f"out_chunks={out_chunks}; allowed: a power of two (chunks of 32 a writing step)")
        maxnreg = cut_warp_maxnreg_default() if maxnreg is None else maxnreg
        if isinstance(maxnreg, bool) or not isinstance(maxnreg, int) or not (maxnreg == 0 or 32 <= maxnreg <= 255):
            raise ValueError(f"maxnreg={maxnreg!r}; allowed: 0 (the compiler's choice) or 32..255 registers a thread")
        chunks = max(1, kp // 32)
        out_c = min(out_chunks or CUT_OUT_CHUNKS, chunks)
        args = (cand_idx, scores, bias_arg, budgets, idx, counts, B * H * R, H, R, K, 1,
                *cand_idx.stride()[:3], *scores.stride()[:3], *bias_strides, *budgets.stride(), *idx.stride()[:3])
        launch = dict(HAS_BIAS=key_bias is not None, ROWS=rows, C=chunks, OUT_C=out_c, SKIP_PREFIX=bool(skip_prefix),
                      STASH=CUT_WARP_STASH if stash is None else bool(stash), num_warps=rows)
        if maxnreg and not interpreting():  # the interpreter has no registers to cap
            launch["maxnreg"] = maxnreg
        ballot = ballot_layout_holds(_candidate_cut_warp_kernel, args, launch)
        _candidate_cut_warp_kernel[(triton.cdiv(B * H * R, rows),)](*args, BALLOT=ballot, **launch)
        return idx, counts
    _candidate_cut_kernel[(B * H * R,)](
        cand_idx, scores, bias_arg, budgets, idx, counts, H, R, K,
        *cand_idx.stride()[:3], *scores.stride()[:3], *bias_strides, *budgets.stride(), *idx.stride()[:3],
        HAS_BIAS=key_bias is not None, KP=kp, SKIP_PREFIX=bool(skip_prefix), INTERPOLATE=search == "interpolate",
        num_warps=num_warps or 4,  # H200, 2048 candidates: 4 warps fastest
    )
    return idx, counts


def topk_rows_reference(
    scores: torch.Tensor,
    k: int,
    *,
    key_bias: torch.Tensor | None = None,
    budgets: torch.Tensor | None = None,
    valid_len: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch definition of `topk_rows` (the oracle): one stable sort by (score desc, index asc)."""
    B, R, T = scores.shape
    s = scores.float()
    if key_bias is not None:
        s = s + key_bias.float().view(B, 1, T)
    s = s + 0.0
    valid = s > float("-inf")
    if valid_len is not None:
        valid = valid & (torch.arange(T, device=s.device).view(1, 1, T) < valid_len.view(B, R, 1).long())
    s = torch.where(valid, s, float("-inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices  # ties: smaller index first
    n = torch.minimum(valid.sum(-1), torch.tensor(k, device=s.device))
    if budgets is not None:
        n = torch.minimum(n, budgets.to(s.device).long().clamp(min=0))
    kk = min(k, T)
    keep = torch.arange(kk, device=s.device).view(1, 1, kk) < n.unsqueeze(-1)
    big = torch.iinfo(torch.int32).max
    kept = torch.where(keep, order[..., :kk].to(torch.int32), big).sort(dim=-1).values
    idx = torch.full((B, R, k), -1, dtype=torch.int32, device=s.device)
    idx[..., :kk] = torch.where(kept == big, -1, kept)
    return idx, n.to(torch.int32)


def indexer_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    scale: float | None,
    index_topk: int,
    *,
    dtype: str = "fp8",
    key_bias: torch.Tensor | None = None,
    budgets: torch.Tensor | None = None,
    q_offset: int | None = None,
    chunk_rows: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The DSA lightning-indexer selection of every query, chunk by chunk: scores, then `topk_rows`.

    I[b, s, t] = sum_h w[b, s, h] * relu(scale * q[b, s, h] . k[b, t]) for keys t <= q_offset + s
    (plain causal; q_offset defaults to T - S), then each row keeps its top min(budget, index_topk)
    keys by I + key_bias (Stem's OAM bias and TPD budget; both optional), tie rule as `topk_rows`.

    q [B, S, H, D], k [B, T, D], w [B, S, H]; key_bias fp32 [B, T] or None; budgets int [B, S] or None.
    dtype: "fp8" (`indexer_scores.fp8_index_scores`: Hadamard rotation, e4m3, CUDA compute
    capability >= 8.9 or the Triton interpreter), "bfloat16" / "float16" (the fused kernel), or
    "float32" (PyTorch, exact; any device). The causally masked tail of each chunk's score tile is
    neither computed nor written (`valid_len` tells `topk_rows` where each row ends).
    Returns idx int32 [B, S, index_topk] (ascending, -1 padded) and counts int32 [B, S].
    """
    from .indexer_scores import fp8_index_scores, fused_index_scores

    B, S, H, D = q.shape
    T = k.shape[1]
    offset = T - S if q_offset is None else int(q_offset)
    if dtype not in ("fp8", "bfloat16", "float16", "float32"):
        raise ValueError(f"dtype={dtype!r}; allowed: 'fp8', 'bfloat16', 'float16', 'float32'")
    idx = torch.full((B, S, index_topk), -1, dtype=torch.int32, device=q.device)
    counts = torch.zeros(B, S, dtype=torch.int32, device=q.device)
    for s0 in range(0, S, chunk_rows):
        s1 = min(S, s0 + chunk_rows)
        t1 = max(0, min(T, s1 + offset))  # keys any row of the chunk can see
        if t1 == 0:
            continue
        qc, wc, kc = q[:, s0:s1], w[:, s0:s1], k[:, :t1]
        if dtype == "fp8":
            sc = fp8_index_scores(qc, kc, wc, scale, causal_offset=s0 + offset, write_masked=False)
        elif dtype in ("bfloat16", "float16"):
            dt = torch.bfloat16 if dtype == "bfloat16" else torch.float16
            sc = fused_index_scores(qc.to(dt), kc, wc, scale, causal_offset=s0 + offset, write_masked=False)
        else:
            sc = torch.zeros(B, s1 - s0, t1, dtype=torch.float32, device=q.device)
            for h in range(H):
                sc += wc[:, :, h, None].float() * torch.relu(qc[:, :, h].float() @ kc.float().transpose(1, 2)
                                                             * (1.0 if scale is None else scale))
        vl = (torch.arange(s0, s1, device=q.device, dtype=torch.int32) + offset + 1).clamp(0, t1)
        got_idx, got_n = topk_rows(
            sc, index_topk,
            key_bias=key_bias[:, :t1] if key_bias is not None else None,
            budgets=budgets[:, s0:s1] if budgets is not None else None,
            valid_len=vl.view(1, -1).expand(B, -1).contiguous(),
        )
        idx[:, s0:s1] = got_idx
        counts[:, s0:s1] = got_n
    return idx, counts
