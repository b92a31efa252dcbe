"""Fused InfLLMv2 block selection (MiniCPM-4.1) with Stem inside: three Triton launches per query
chunk (two with `fuse_topk=True`), no torch sort / topk over [S, blocks], no host synchronisation
per chunk.

    idx, counts, n_forced = infllmv2_select_fused(q, k, params)                       # native
    idx, counts, n_forced = infllmv2_select_fused(q, k, params, key_bias=bias,        # Stem
                                                  budgets=k_free)

Per chunk of C query rows (the PyTorch definition is `stem_boost.native.infllmv2`:
`iter_block_scores` + `topk_blocks`, with Stem's `combine_scores(..., space="prob")`):
  1. `_coarse_lse_kernel` (kernels/infllmv2_scores.py): lse_h[s] over the visible coarse keys.
  2. `_pooled_scores_kernel`: for a tile of BLOCK_S query rows x BLOCK_B - 1 key blocks of one
     (batch, kv head), the group-summed stage-1 scores of the fine compressed keys
     ``score[s, c] = sum_g exp(q_g[s] . k1[c] * scale - lse_g[s])`` (0 where invisible; products in
     the input dtype, fp32 accumulation, as the fused stage-1 kernel), rounded to the input dtype
     as the official kernel stores them, max-pooled in registers onto blocks (block j takes the
     compressed keys [jP - 1, jP + P), P = block_size / kernel_stride; -inf when none exists) and
     written once: [B, Hk, C, NB] fp32, a quarter of the compressed scores.
     Program roles: axis 0 = query tile, axis 1 = block tile, axis 2 = batch x kv head. Block tiles
     overlap by one group of P keys so that key jP - 1 of the tile's first block is in the tile
     (the shift is a register gather). Block tiles wholly after the query tile are skipped.
  3. `_block_topk_kernel`: one program per (query row, batch x kv head). The row's pooled scores
     stay in registers; forced blocks (init blocks, the diagonal block and the `local_blocks`
     before it) are kept; the non-forced candidates are ranked by their score, or with Stem by
     ``log(score) + key_bias[block]`` (score <= 0 -> -inf: `combine_scores` in "prob" space), and
     the best k_free are kept (k_free = the row's budget, or natively k_total - n_forced). The k-th
     key is found by a 32-step bisection on the order-preserving uint32 image of the float keys;
     the tie rule is the library's: higher score first, equal scores -> smaller block index first
     (`topk_blocks`). The kept blocks are written ascending with a prefix sum; slots after the
     count get -1.
Launches: step 1, then steps 2 and 3 as separate launches (`pooled_block_scores`, `block_topk`:
the default, more programs in flight, the pooled scores through HBM); with `fuse_topk=True` steps
2 + 3 in one (`_select_chunk_kernel`: a program pools every causal block of its BLOCK_S rows into an
L2-resident scratch, then selects its rows one by one). On an H200 the separate launches are
1.4-1.8x faster at 32K-128K tokens (1.8 vs 3.2 ms, 22.4 vs 30.8 ms; `scripts/bench_infllmv2.py
--parts select`), with the same lists.

Left padding (`seq_start` [B] int32: the first real key position of each batch row). The rule:
blocks stay absolute (block j = key positions [j * block_size, (j + 1) * block_size), the units
the attention kernel reads), and so do the compression windows; a compressed key exists only when
its whole window lies in [seq_start, T); blocks before seq_start's block are never candidates;
the init blocks are the `init_blocks` blocks starting at seq_start's block; the kernel-offset
quirk of a fresh prefill is not applied to padded rows. When seq_start is a multiple of the
coarse stride (64 with MiniCPM-4.1's 128/64) every window and block of the row lines up with the
unpadded sequence, and the selection equals that of the row run alone (no padding, no quirk),
shifted by seq_start / block_size blocks. Other left paddings give a selection on the absolute
grid (pad to a multiple of 64 to get the exact unpadded one).
"""

from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from ..selection import Selection

from .infllmv2_geometry import (compress_keys, group_budgets, grouped_chunk_rows, groups_share_candidates,
                                kernel_causal_offset, num_compressed, visible_compressed)
from .infllmv2_scores import LOG2E, coarse_lse, group_mass
from .infllmv2_pooled_args import pooled_launch_args
from .row_select import keep_largest, ordered_u32
from .tile_order import tile_grid, tile_ids
from .warp_rows import ballot_layout_holds, row_counts, rows_compact, rows_threshold

try:  # the Hopper pooled kernel is Gluon code: an API change in a later Triton costs only this route
    from .infllmv2_pooled_sm90 import pooled_block_scores_sm90, supports_pooled_sm90
except Exception:  # pragma: no cover - Triton without a Gluon that this kernel compiles with
    supports_pooled_sm90 = None

__all__ = ["block_topk", "group_block_sums", "infllmv2_select_fused", "infllmv2_selection", "pooled_block_scores"]


BLOCK_TOPK_METHODS = ("program", "warp")
# low bits of an fp32 image that a value of this type never sets (its mantissa is shorter): a top-k over
# scores rounded to it ranks the keys without them, in fewer bisection steps
SCORE_KEY_SHIFT = {torch.bfloat16: 16, torch.float16: 13}
# How the block top-k finds a row's threshold: "bisect" (`row_select.rank_threshold`), "interpolate"
# (`row_select.interpolated_threshold`) or "auto": the interpolation on rounded 16 / 19-bit keys (the
# native ranking of bf16 / fp16 scores), the bisection on Stem's fp32 keys. The same lists either way.
# H200, the last 16384 rows of 128K (2048 blocks; BENCHMARKS.md, nineteenth session): interpolation
# 0.919x the bisection's time on bf16 keys, 1.011x on Stem's; two bits a bisection count (three
# prefixes at once) 1.13-1.15x.
TOPK_SEARCHES = ("auto", "bisect", "interpolate")
TOPK_SEARCH = "auto"


def _next_pow2(x: int) -> int:
    return 1 << (max(1, x) - 1).bit_length()


# ------------------------------------------------------------------------------------------------
# 2. stage-1 scores pooled onto key blocks
# ------------------------------------------------------------------------------------------------
@triton.jit
def _stem_key(score, bias):
    """Stem's ranking key of a pooled block score: log(score) + the block's OAM bias; score <= 0 or
    NaN -> -inf (`combine_scores` in "prob" space)."""
    logit = tl.log(tl.maximum(score, 1.1754943508222875e-38))
    key = tl.where(score > 0, logit + bias, float("-inf"))
    return tl.where(key == key, key, float("-inf"))


@triton.jit
def _pooled_tile(
    Q, K1, LSE, VIS1, LO1, OUT, b, hk, s_lo, jt0,
    scale_log2, C, K1N, NBC,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_kn,
    stride_lb, stride_lh,
    stride_vb,
    stride_ob, stride_oh, stride_os,
    G: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr, HAS_LO: tl.constexpr, ROUND_BF16: tl.constexpr,
    ROUND_FP16: tl.constexpr, BIAS=None, stride_bb=0, stride_bh=0, HAS_BIAS: tl.constexpr = False,
):
    """Pooled scores of BLOCK_S query rows [s_lo, s_lo + BLOCK_S) x key blocks [jt0, jt0 + BLOCK_B - 1)
    of one (batch, kv head), stored to OUT[b, hk, row, block].

    It computes the fine compressed keys [(jt0 - 1) * P, (jt0 + BLOCK_B - 1) * P): BLOCK_B groups of
    P keys; block jt0 - 1 + g pools group g and the last key of group g - 1 (its key jP - 1)."""
    BLOCK_C: tl.constexpr = BLOCK_B * P
    tok = s_lo + tl.arange(0, BLOCK_S)
    ok = tok < C
    cols = (jt0 - 1) * P + tl.arange(0, BLOCK_C)
    vis = tl.load(VIS1 + b * stride_vb + tok, mask=ok, other=0)
    if HAS_LO:
        lo = tl.load(LO1 + b)
    else:
        lo = 0
    exists = (cols >= lo) & (cols >= 0) & (cols < K1N)
    acc = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    if (jt0 - 1) * P < tl.max(vis, 0):  # some row of the tile sees some key of the tile
        d = tl.arange(0, D)
        k = tl.load(K1 + b.to(tl.int64) * stride_kb + hk * stride_kh + cols[:, None].to(tl.int64) * stride_kn
                    + d[None, :], mask=exists[:, None], other=0.0)
        acc = group_mass(acc, Q, LSE, k, b, hk, tok, ok, G, scale_log2, stride_qb, stride_qh, stride_qs,
                         stride_lb, stride_lh, G, D)
    visible = (cols[None, :] < vis[:, None]) & (cols[None, :] >= lo)
    val = tl.where(visible, acc, 0.0)
    if ROUND_BF16:
        val = val.to(tl.bfloat16).to(tl.float32)
    if ROUND_FP16:
        val = val.to(tl.float16).to(tl.float32)
    val = tl.where(exists[None, :], val, float("-inf"))
    x3 = tl.reshape(val, [BLOCK_S, BLOCK_B, P])
    gmax = tl.max(x3, 2)  # [BLOCK_S, BLOCK_B]: keys [jP, jP + P) of group g's block j
    is_last = (tl.arange(0, P) == P - 1)[None, None, :]
    glast = tl.max(tl.where(is_last, x3, float("-inf")), 2)  # key jP + P - 1
    prev = tl.maximum(tl.arange(0, BLOCK_B) - 1, 0)
    prev_last = tl.gather(glast, tl.broadcast_to(prev[None, :], [BLOCK_S, BLOCK_B]), 1)
    pooled = tl.maximum(gmax, prev_last)
    j = jt0 - 1 + tl.arange(0, BLOCK_B)
    if HAS_BIAS:  # Stem's ranking key, written in place of the score (`_stem_key`: what block_topk would add)
        bias = tl.load(BIAS + b.to(tl.int64) * stride_bb + hk.to(tl.int64) * stride_bh + j,
                       mask=(j >= 0) & (j < NBC), other=0.0)
        pooled = _stem_key(pooled, bias[None, :])
    out_ok = ok[:, None] & (tl.arange(0, BLOCK_B)[None, :] >= 1) & (j[None, :] < NBC)
    tl.store(OUT + b.to(tl.int64) * stride_ob + hk.to(tl.int64) * stride_oh + tok[:, None].to(tl.int64) * stride_os
             + j[None, :], pooled, mask=out_ok)


@triton.jit
def _pooled_scores_kernel(
    Q, K1, LSE, VIS1, LO1, OUT, BIAS,
    scale_log2, C, K1N, NBC, q_pos0,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_kn,
    stride_lb, stride_lh,
    stride_vb,
    stride_ob, stride_oh, stride_os,
    stride_bb, stride_bh,
    HK,
    G: tl.constexpr, D: tl.constexpr, P: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr, HAS_LO: tl.constexpr, ROUND_BF16: tl.constexpr,
    ROUND_FP16: tl.constexpr, HAS_BIAS: tl.constexpr, KEYS_FAST: tl.constexpr,
):
    """Program: axis 0 = BLOCK_S query rows, axis 1 = BLOCK_B - 1 key blocks (swapped with
    KEYS_FAST), axis 2 = batch x kv head (`_pooled_tile`); tiles wholly after the rows' last query
    block are skipped."""
    pid_s, pid_j = tile_ids(KEYS_FAST)
    bh = tl.program_id(2)
    jt0 = pid_j * (BLOCK_B - 1)
    s_lo = pid_s * BLOCK_S
    last_qb = (q_pos0 + tl.minimum(s_lo + BLOCK_S, C) - 1) // BLOCK_SIZE
    if jt0 <= last_qb:
        _pooled_tile(Q, K1, LSE, VIS1, LO1, OUT, bh // HK, bh % HK, s_lo, jt0,
                     scale_log2, C, K1N, NBC,
                     stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_kn, stride_lb, stride_lh,
                     stride_vb, stride_ob, stride_oh, stride_os,
                     G, D, P, BLOCK_S, BLOCK_B, HAS_LO, ROUND_BF16, ROUND_FP16, BIAS, stride_bb, stride_bh, HAS_BIAS)


def pooled_block_scores(q: torch.Tensor, k1: torch.Tensor, lse: torch.Tensor, vis1: torch.Tensor, n_blocks: int,
                        pool: int, scale: float, *, q_pos0: int, block_size: int, n_existing: int | None = None,
                        lo1: torch.Tensor | None = None,
                        round_to: torch.dtype | None = None, block_s: int = 64, block_b: int = 32,
                        key_bias: torch.Tensor | None = None, num_warps: int = 4,
                        num_stages: int | None = None, keys_fast: bool = True,
                        kernel: str | None = None) -> torch.Tensor:
    """Group-summed stage-1 scores of the fine compressed keys, max-pooled onto key blocks.

    Args:
        q: [B, Hq, C, D] fp16/bf16 (or fp32), HF layout; k1: [B, Hk, K1, D] fine compressed keys
            (the first `n_existing` exist; default all); lse: [B, Hq, C] fp32 coarse lse in log2
            units (`coarse_lse`); vis1: [C] or [B, C] int32 visible fine keys per row;
            lo1: optional [B] int32 first existing fine key (left padding).
        n_blocks: blocks to write (NB); pool: block_size / kernel_stride (a power of two).
        q_pos0, block_size: key position of row 0 and tokens per block (blocks after a row's
            query block are left unwritten: they are never candidates).
        round_to: round the compressed scores to this dtype before pooling (the official kernel
            stores them in the input dtype); None: no rounding.
        key_bias: optional [B, Hk, >= n_blocks] fp32 OAM bias per block: each pooled score x is
            written as Stem's ranking key log(x) + bias (x <= 0 -> -inf), so that the top-k reads
            one array and computes nothing (`block_topk` without key_bias ranks these keys as is).
        block_s, block_b, num_warps, num_stages: the program tile (BLOCK_S query rows x BLOCK_B - 1
            blocks), its warps and the software-pipeline depth of the loop over the group's heads
            (None: Triton's default); `scripts/bench_infllmv2.py --parts pooled` compares them.
        keys_fast: launch order, key tiles on the grid's fastest axis: the programs running at once
            share their query tiles (from L2) instead of streaming every query tile once per key tile.
        kernel: "triton", "gluon" (Hopper, `infllmv2_pooled_sm90`; its own tile, so block_s, block_b,
            num_warps and num_stages are the Triton kernel's only) or None: Gluon where
            `supports_pooled_sm90` says it runs (4% faster on an H200), else Triton.
    Returns [B, Hk, C, n_blocks] fp32, equal to `pool_block_scores(_group_compressed_scores(...))`
    (or, with key_bias, its Stem keys).
    """
    B, Hq, C, D = q.shape
    Hk = k1.shape[1]
    G = Hq // Hk
    if pool & (pool - 1) or D & (D - 1) or D < 16:
        raise ValueError(f"pool ({pool}) and head dim ({D}) must be powers of two (head dim >= 16)")
    if kernel not in (None, "triton", "gluon"):
        raise ValueError(f"kernel={kernel!r}; allowed: None (auto), 'triton', 'gluon'")
    gluon_ok = supports_pooled_sm90 is not None and supports_pooled_sm90(q, pool)
    if kernel == "gluon" and not gluon_ok:
        raise ValueError(f"kernel='gluon' needs CUDA compute capability 9.x, bf16 / fp16 q with head dim 64 or "
                         f"128 and pool <= 8; got {q.device}, {q.dtype}, head dim {D}, pool {pool}")
    if kernel == "gluon" or (kernel is None and gluon_ok):
        return pooled_block_scores_sm90(q, k1, lse, vis1, n_blocks, pool, scale, q_pos0=q_pos0, block_size=block_size,
                                        n_existing=n_existing, lo1=lo1, round_to=round_to, key_bias=key_bias,
                                        tile=dict(KEYS_FAST=keys_fast))
    out, args = pooled_launch_args(q, k1, lse, vis1, n_blocks, scale, q_pos0=q_pos0, n_existing=n_existing, lo1=lo1,
                                   key_bias=key_bias)
    grid = tile_grid(triton.cdiv(C, block_s), triton.cdiv(n_blocks, block_b - 1), B * Hk, keys_fast)
    _pooled_scores_kernel[grid](
        *args, G=G, D=D, P=pool, BLOCK_SIZE=block_size, BLOCK_S=block_s, BLOCK_B=block_b, HAS_LO=lo1 is not None,
        ROUND_BF16=round_to == torch.bfloat16, ROUND_FP16=round_to == torch.float16, HAS_BIAS=key_bias is not None,
        KEYS_FAST=keys_fast,
        num_warps=num_warps, **({} if num_stages is None else dict(num_stages=num_stages)),
    )
    return out


# ------------------------------------------------------------------------------------------------
# 2b. Stem's grouped ranking: the scores of groups of consecutive rows summed
# ------------------------------------------------------------------------------------------------
@triton.jit
def _group_sum_kernel(
    SCORES, C, NBC, q_pos0,
    stride_sb, stride_sh, stride_sc,
    HK,
    GROUP: tl.constexpr, SPREAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program: axis 0 = one group of GROUP consecutive rows, axis 1 = BLOCK_N blocks, axis 2 = batch x
    kv head. Sums the rows' positive scores (NaN, -inf and values <= 0 add nothing), row after row,
    and writes the sum in place: into the group's first row, or into each of its rows (SPREAD).
    Blocks after the group's last query block are neither read nor written (no row ranks them)."""
    g = tl.program_id(0)
    bh = tl.program_id(2)
    b = bh // HK
    hk = bh % HK
    r0 = g * GROUP
    last_qb = (q_pos0 + tl.minimum(r0 + GROUP, C) - 1) // BLOCK_SIZE
    j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = (j < NBC) & (j <= last_qb)
    if tl.program_id(1) * BLOCK_N <= last_qb:
        base = SCORES + b.to(tl.int64) * stride_sb + hk.to(tl.int64) * stride_sh
        total = tl.zeros([BLOCK_N], tl.float32)
        for t in tl.static_range(GROUP):
            row = base + (r0 + t).to(tl.int64) * stride_sc
            x = tl.load(row + j, mask=live & (r0 + t < C), other=0.0)
            total += tl.where(x > 0, x, 0.0)
        if SPREAD:
            for t in tl.static_range(GROUP):
                tl.store(base + (r0 + t).to(tl.int64) * stride_sc + j, total, mask=live & (r0 + t < C))
        else:
            tl.store(base + r0.to(tl.int64) * stride_sc + j, total, mask=live)


def group_block_sums(scores: torch.Tensor, group: int, *, q_pos0: int, block_size: int, spread: bool,
                     block_n: int = 256) -> torch.Tensor:
    """In place: the pooled scores [B, Hk, C, NB] fp32 of each group of `group` consecutive rows
    (row 0 first) summed over the group (`native.infllmv2.group_block_scores`: positive scores only,
    added row after row), written into the group's first row (spread=False: the top-k then reads
    rows 0, group, 2 group, ...) or into all its rows. Blocks after a group's last query block (row
    c's is (q_pos0 + c) // block_size) are left as they were. Returns `scores`."""
    B, Hk, C, NB = scores.shape
    if scores.dtype != torch.float32 or scores.stride(-1) != 1:
        raise ValueError(f"group_block_sums needs fp32 scores with unit block stride; got {scores.dtype}, "
                         f"strides {scores.stride()}")
    if group < 2 or C == 0:
        return scores
    _group_sum_kernel[(triton.cdiv(C, group), triton.cdiv(NB, block_n), B * Hk)](
        scores, C, NB, q_pos0, scores.stride(0), scores.stride(1), scores.stride(2), Hk,
        GROUP=group, SPREAD=spread, BLOCK_SIZE=block_size, BLOCK_N=block_n, num_warps=4,
    )
    return scores


# ------------------------------------------------------------------------------------------------
# 3. forced blocks + Stem + top-k per row
# ------------------------------------------------------------------------------------------------
@triton.jit
def _row_masks(j, qb, sb, NBC, INIT_BLOCKS: tl.constexpr, LOCAL_BLOCKS: tl.constexpr):
    """(forced, free) for blocks j of rows whose query block is qb (-1: no row) and whose first real
    block is sb: the candidates are the causal, existing blocks from sb on; the init blocks, the
    diagonal block and the LOCAL_BLOCKS before it are forced, the others free."""
    cand = (j <= qb) & (j >= sb) & (j < NBC)
    forced = cand & ((j < sb + INIT_BLOCKS) | (j >= qb - LOCAL_BLOCKS))
    return forced, cand & (forced == 0)


@triton.jit
def _row_keys(S_ROW, B_ROW, j, free, HAS_BIAS: tl.constexpr, LOAD_CACHE: tl.constexpr, KEY_SHIFT: tl.constexpr):
    """Order-preserving uint32 ranking keys of blocks j of a row (pooled scores at S_ROW, OAM bias at
    B_ROW): the score (NaN -> -inf), or Stem's key log(score) + bias (`_stem_key`). KEY_SHIFT: the
    scores are values of a narrower float (bf16: 16, fp16: 13 low mantissa bits always 0, and -inf's
    image has them all 1), so the key drops those bits: equal keys are still equal scores, and the
    bisection takes 32 - KEY_SHIFT steps at most."""
    score = tl.load(S_ROW + j, mask=free, other=float("-inf"), cache_modifier=LOAD_CACHE)
    score = tl.where(score == score, score, float("-inf"))  # NaN -> -inf
    if HAS_BIAS:
        score = _stem_key(score, tl.load(B_ROW + j, mask=free, other=0.0))
    return ordered_u32(score) >> KEY_SHIFT


@triton.jit
def _topk_row(
    SCORES, BIAS, BUDGET, SEQ_START, IDX, CNT, NFORCED, c, b, hk,
    row0, q_pos0, NBC, k_total,
    stride_sb, stride_sh, stride_sc,
    stride_bb, stride_bh,
    stride_ub, stride_uh, stride_us,
    stride_ib, stride_ih, stride_is,
    stride_cb, stride_ch,
    KMAX,
    BLOCK_SIZE: tl.constexpr, INIT_BLOCKS: tl.constexpr, LOCAL_BLOCKS: tl.constexpr,
    NBP: tl.constexpr, KMAXP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BUDGET: tl.constexpr, HAS_SEQ_START: tl.constexpr, LOAD_CACHE: tl.constexpr,
    KEY_SHIFT: tl.constexpr, INTERPOLATE: tl.constexpr,
):
    """Chunk row c of (batch b, kv head hk): NBP block scores in registers -> idx[row0 + c, :KMAX],
    counts and n_forced (see the module docstring, step 3). INTERPOLATE: the threshold by an
    interpolation search (`row_select.interpolated_threshold`) instead of the bisection."""
    s = row0 + c  # row in the output (query index)
    qb = (q_pos0 + c) // BLOCK_SIZE
    if HAS_SEQ_START:
        sb = tl.load(SEQ_START + b) // BLOCK_SIZE
    else:
        sb = 0
    j = tl.arange(0, NBP)
    forced, free = _row_masks(j, qb, sb, NBC, INIT_BLOCKS, LOCAL_BLOCKS)
    n_forced = tl.sum(forced.to(tl.int32), 0)
    key = _row_keys(SCORES + b.to(tl.int64) * stride_sb + hk.to(tl.int64) * stride_sh + c.to(tl.int64) * stride_sc,
                    BIAS + b.to(tl.int64) * stride_bb + hk.to(tl.int64) * stride_bh, j, free, HAS_BIAS, LOAD_CACHE,
                    KEY_SHIFT)

    if HAS_BUDGET:
        k_free = tl.load(BUDGET + b.to(tl.int64) * stride_ub + hk.to(tl.int64) * stride_uh + c.to(tl.int64) * stride_us)
    else:
        k_free = k_total - n_forced
    k_free = tl.maximum(k_free, 0)

    keep = keep_largest(key, free, k_free, forced, 32 - KEY_SHIFT, False, INTERPOLATE)  # ties: smaller block index first
    count = tl.sum(keep.to(tl.int32), 0)
    slot = tl.cumsum(keep.to(tl.int32), 0) - 1
    out = IDX + b.to(tl.int64) * stride_ib + hk.to(tl.int64) * stride_ih + s.to(tl.int64) * stride_is
    tl.store(out + slot, j, mask=keep & (slot < KMAX))
    pad = tl.arange(0, KMAXP)
    tl.store(out + pad, tl.full([KMAXP], -1, tl.int32), mask=(pad >= count) & (pad < KMAX))
    tl.store(CNT + b * stride_cb + hk * stride_ch + s, tl.minimum(count, KMAX))
    tl.store(NFORCED + b * stride_cb + hk * stride_ch + s, n_forced)


@triton.jit
def _block_topk_kernel(
    SCORES, BIAS, BUDGET, SEQ_START, IDX, CNT, NFORCED,
    row0, q_pos0, NBC, k_total,
    stride_sb, stride_sh, stride_sc,
    stride_bb, stride_bh,
    stride_ub, stride_uh, stride_us,
    stride_ib, stride_ih, stride_is,
    stride_cb, stride_ch,
    HK, KMAX,
    BLOCK_SIZE: tl.constexpr, INIT_BLOCKS: tl.constexpr, LOCAL_BLOCKS: tl.constexpr,
    NBP: tl.constexpr, KMAXP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BUDGET: tl.constexpr, HAS_SEQ_START: tl.constexpr, KEY_SHIFT: tl.constexpr,
    INTERPOLATE: tl.constexpr,
):
    """Program: axis 0 = one chunk row, axis 1 = batch x kv head (`_topk_row`)."""
    bh = tl.program_id(1)
    _topk_row(SCORES, BIAS, BUDGET, SEQ_START, IDX, CNT, NFORCED, tl.program_id(0), bh // HK, bh % HK,
              row0, q_pos0, NBC, k_total,
              stride_sb, stride_sh, stride_sc, stride_bb, stride_bh, stride_ub, stride_uh, stride_us,
              stride_ib, stride_ih, stride_is, stride_cb, stride_ch, KMAX,
              BLOCK_SIZE, INIT_BLOCKS, LOCAL_BLOCKS, NBP, KMAXP, HAS_BIAS, HAS_BUDGET, HAS_SEQ_START, "", KEY_SHIFT,
              INTERPOLATE)


@triton.jit(do_not_specialize=["UNIT"])
def _block_topk_warp_kernel(
    SCORES, BIAS, BUDGET, SEQ_START, IDX, CNT, NFORCED,
    row0, q_pos0, NBC, k_total, C, UNIT,
    stride_sb, stride_sh, stride_sc,
    stride_bb, stride_bh,
    stride_ub, stride_uh, stride_us,
    stride_ib, stride_ih, stride_is,
    stride_cb, stride_ch,
    HK, KMAX,
    BLOCK_SIZE: tl.constexpr, INIT_BLOCKS: tl.constexpr, LOCAL_BLOCKS: tl.constexpr,
    NCH: tl.constexpr, WCH: tl.constexpr, NPAD: tl.constexpr, ROWS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BUDGET: tl.constexpr, HAS_SEQ_START: tl.constexpr, KEY_SHIFT: tl.constexpr,
    BALLOT: tl.constexpr,
):
    """`_topk_row` with one row a warp (`kernels/warp_rows.py`): axis 0 = ROWS chunk rows (num_warps
    = ROWS), axis 1 = batch x kv head. Tiles are [32 lanes, ROWS, NCH]: lane l holds block
    ch * 32 + l of chunk ch. The same rule and result as `_topk_row`; the bisection's counts and the
    compaction of the kept blocks stay inside each row's warp (no block barrier). The bisection holds
    the row's keys; the writing pass reloads them WCH chunks a step (the row is in cache), which
    keeps the kernel from spilling. UNIT is 1, passed at run time so that the lanes' addresses are
    not provably contiguous (see warp_rows)."""
    bh = tl.program_id(1)
    b = bh // HK
    hk = bh % HK
    c = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # chunk rows [ROWS]
    row_ok = c < C
    qb = (q_pos0 + c) // BLOCK_SIZE
    if HAS_SEQ_START:
        sb = tl.load(SEQ_START + b) // BLOCK_SIZE
    else:
        sb = 0
    lane = tl.arange(0, 32)[:, None, None] * UNIT  # [32, 1, 1]
    j = tl.arange(0, NCH)[None, None, :] * 32 + lane  # [32, 1, NCH] block numbers
    ok3 = row_ok[None, :, None]
    c3 = c[None, :, None]
    qb3 = tl.where(ok3, qb[None, :, None], -1)  # -1: no row, no candidate
    s_row = SCORES + b.to(tl.int64) * stride_sb + hk.to(tl.int64) * stride_sh + c3.to(tl.int64) * stride_sc
    b_row = BIAS + b.to(tl.int64) * stride_bb + hk.to(tl.int64) * stride_bh
    forced, free = _row_masks(j, qb3, sb, NBC, INIT_BLOCKS, LOCAL_BLOCKS)
    n_forced = row_counts(forced)  # [ROWS]
    key = tl.where(free, _row_keys(s_row, b_row, j, free, HAS_BIAS, "", KEY_SHIFT), 0)  # a free block's key is never 0

    if HAS_BUDGET:
        k_free = tl.load(BUDGET + b.to(tl.int64) * stride_ub + hk.to(tl.int64) * stride_uh
                         + c.to(tl.int64) * stride_us, mask=row_ok, other=0)
    else:
        k_free = k_total - n_forced
    want = tl.maximum(k_free, 0)
    thr = rows_threshold(key, want, row_ok == 0, 32 - KEY_SHIFT)[None, :, None]
    need_eq = (want - row_counts((key > thr) & free))[None, :, None]

    # the writing pass, WCH chunks a step (the keys are recomputed from the row, which is in cache):
    # the blocks above the threshold, the first ties at it and the forced ones, ascending
    s3 = (row0 + c3).to(tl.int64)
    out = IDX + b.to(tl.int64) * stride_ib + hk.to(tl.int64) * stride_ih + s3 * stride_is
    eq_seen = tl.zeros([32, ROWS, 1], tl.int32)
    count = tl.zeros([32, ROWS, 1], tl.int32)
    for c0 in range(0, NCH, WCH):
        jw = (c0 + tl.arange(0, WCH))[None, None, :] * 32 + lane
        forced_w, free_w = _row_masks(jw, qb3, sb, NBC, INIT_BLOCKS, LOCAL_BLOCKS)
        key_w = _row_keys(s_row, b_row, jw, free_w, HAS_BIAS, "", KEY_SHIFT)
        eq = (key_w == thr) & free_w
        eq_rank, eq_seen = rows_compact(eq, eq_seen, BALLOT)  # ties: the smaller block first
        keep = forced_w | ((key_w > thr) & free_w) | (eq & (eq_rank < need_eq))
        slot, count = rows_compact(keep, count, BALLOT)
        tl.store(out + slot, jw + tl.zeros_like(slot), mask=keep & (slot < KMAX))
    count = tl.max(tl.max(count, 2), 0)  # [ROWS] (every lane holds the row's count)
    pad = tl.arange(0, NPAD)[None, None, :] * 32 + lane
    tl.store(out + pad, tl.full([32, ROWS, NPAD], -1, tl.int32),
             mask=(pad >= count[None, :, None]) & (pad < KMAX) & ok3)
    s = row0 + c
    tl.store(CNT + b * stride_cb + hk * stride_ch + s, tl.minimum(count, KMAX), mask=row_ok)
    tl.store(NFORCED + b * stride_cb + hk * stride_ch + s, n_forced, mask=row_ok)


@triton.jit
def _select_chunk_kernel(
    Q, K1, LSE, VIS1, LO1, SCRATCH, BIAS, BUDGET, SEQ_START, IDX, CNT, NFORCED,
    scale_log2, C, K1N, NBC, row0, q_pos0, k_total,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_kn,
    stride_lb, stride_lh,
    stride_vb,
    stride_sb, stride_sh, stride_sc,
    stride_bb, stride_bh,
    stride_ub, stride_uh, stride_us,
    stride_ib, stride_ih, stride_is,
    stride_cb, stride_ch,
    HK, KMAX,
    G: tl.constexpr, D: tl.constexpr, P: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr, HAS_LO: tl.constexpr, ROUND_BF16: tl.constexpr,
    ROUND_FP16: tl.constexpr, INIT_BLOCKS: tl.constexpr, LOCAL_BLOCKS: tl.constexpr,
    NBP: tl.constexpr, KMAXP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BUDGET: tl.constexpr, HAS_SEQ_START: tl.constexpr, KEY_SHIFT: tl.constexpr,
    INTERPOLATE: tl.constexpr,
):
    """Steps 2 and 3 in one launch. Program: axis 0 = BLOCK_S query rows, axis 1 = batch x kv head.
    It pools every causal block of its rows (`_pooled_tile`, one block tile after the other) into
    SCRATCH, waits for its own threads (the rows are its own: no other program reads them), then
    selects row after row (`_topk_row`, SCRATCH re-read through L2)."""
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HK
    hk = bh % HK
    s_lo = pid_s * BLOCK_S
    last_qb = (q_pos0 + tl.minimum(s_lo + BLOCK_S, C) - 1) // BLOCK_SIZE
    for jt in range(0, last_qb // (BLOCK_B - 1) + 1):
        _pooled_tile(Q, K1, LSE, VIS1, LO1, SCRATCH, b, hk, s_lo, jt * (BLOCK_B - 1),
                     scale_log2, C, K1N, NBC,
                     stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_kn, stride_lb, stride_lh,
                     stride_vb, stride_sb, stride_sh, stride_sc,
                     G, D, P, BLOCK_S, BLOCK_B, HAS_LO, ROUND_BF16, ROUND_FP16)
    tl.debug_barrier()
    for r in range(0, tl.minimum(BLOCK_S, C - s_lo)):
        _topk_row(SCRATCH, BIAS, BUDGET, SEQ_START, IDX, CNT, NFORCED, s_lo + r, b, hk,
                  row0, q_pos0, NBC, k_total,
                  stride_sb, stride_sh, stride_sc, stride_bb, stride_bh, stride_ub, stride_uh, stride_us,
                  stride_ib, stride_ih, stride_is, stride_cb, stride_ch, KMAX,
                  BLOCK_SIZE, INIT_BLOCKS, LOCAL_BLOCKS, NBP, KMAXP, HAS_BIAS, HAS_BUDGET, HAS_SEQ_START, ".cg",
                  KEY_SHIFT, INTERPOLATE)


def _budget_view(budgets: torch.Tensor | None, B: int, Hk: int, S: int):
    """Budgets as a [B, Hk, S] int32 view (stride 0 where broadcast) from [S], [B, S] or [B, Hk, S]."""
    if budgets is None:
        return None
    t = budgets.to(torch.int32)
    if t.dim() == 1:
        t = t.view(1, 1, S)
    elif t.dim() == 2:
        t = t.view(t.shape[0], 1, S)
    if t.dim() != 3 or t.shape[-1] != S:
        raise ValueError(f"budgets must be [S], [B, S] or [B, Hk, S] with S={S}; got {tuple(budgets.shape)}")
    return t.contiguous().expand(B, Hk, S)


def _row_topk_args(bias, budgets, seq_start, idx, counts, n_forced, n_blocks: int, kmax: int,
                   score_dtype: torch.dtype | None = None, search: str | None = None):
    """The top-k step's launch arguments (`_topk_row`), shared by the kernels that run it: its
    pointers (an absent input points at `counts`, never read), their strides, and its constexprs.
    score_dtype: the scores are values of this float type (the pooled kernel rounded them): without
    a bias the keys drop the bits it does not have (`KEY_SHIFT`). search: how a row's threshold is
    found (None: `TOPK_SEARCH`)."""
    search = TOPK_SEARCH if search is None else search
    if search not in TOPK_SEARCHES:
        raise ValueError(f"search={search!r}; allowed: {', '.join(map(repr, TOPK_SEARCHES))}")
    key_shift = SCORE_KEY_SHIFT.get(score_dtype, 0) if bias is None else 0
    if search == "auto":
        search = "interpolate" if key_shift else "bisect"
    absent = counts
    pointers = (bias if bias is not None else absent, budgets if budgets is not None else absent,
                seq_start if seq_start is not None else absent, idx, counts, n_forced)
    strides = (*(bias.stride()[:2] if bias is not None else (0, 0)),
               *(budgets.stride()[:3] if budgets is not None else (0, 0, 0)),
               *idx.stride()[:3], *counts.stride()[:2])
    flags = dict(NBP=max(16, _next_pow2(n_blocks)), KMAXP=max(16, _next_pow2(kmax)), HAS_BIAS=bias is not None,
                 HAS_BUDGET=budgets is not None, HAS_SEQ_START=seq_start is not None,
                 KEY_SHIFT=key_shift, INTERPOLATE=search == "interpolate")
    return pointers, strides, flags


def topk_row_warps(n_blocks: int) -> int:
    """Warps of the block top-k's program for rows of n_blocks candidates: 8-16 keys a thread. On an
    H200 (16384 rows, bf16 keys): 512 blocks 2 warps 0.161 ms, 4 warps 0.190; 2048 blocks 2 / 4 / 8
    warps 0.701 / 0.669 / 0.746 ms (Stem's keys at 4 / 8: 0.825 / 0.911)."""
    return 2 if n_blocks <= 1024 else 4 if n_blocks <= 4096 else 8


def block_topk(scores: torch.Tensor, *, q_pos0: int, block_size: int, init_blocks: int, local_blocks: int,
               k_total: int, key_bias: torch.Tensor | None = None, budgets: torch.Tensor | None = None,
               seq_start: torch.Tensor | None = None, kmax: int, out: tuple | None = None, row0: int = 0,
               method: str = "program", rows_per_program: int = 4, score_dtype: torch.dtype | None = None,
               num_warps: int | None = None, search: str | None = None):
    """Forced blocks + the best non-forced candidates of every row (the `topk_blocks` rule).

    Args:
        scores: [B, Hk, C, NB] fp32 pooled block scores of C consecutive query rows, the first at
            key position q_pos0 (row c's query block is (q_pos0 + c) // block_size).
        key_bias: optional [B, Hk, >= NB] fp32 OAM bias per key block (Stem; log space).
        budgets: optional [C], [B, C] or [B, Hk, C] non-forced blocks to keep per row (Stem);
            None: natively k_total - n_forced.
        seq_start: optional [B] int32 first real key position (see the module docstring).
        kmax: width of the output lists (must cover forced + kept blocks of every row).
        out: optional (idx [B, Hk, S, kmax], counts [B, Hk, S], n_forced [B, Hk, S]) written at rows
            row0 .. row0 + C - 1 (the chunk loop writes straight into the final selection).
        method: "program" (one row a program of 4-8 warps: the measured default) or "warp" (one
            row a warp, `rows_per_program` rows a program: no block barrier in the bisection; the
            same lists, not yet timed on a GPU).
        score_dtype: the caller's promise that every score is a value of this type (the pooled
            kernel's `round_to`): bf16 / fp16 scores rank in 16 / 19 bisection steps instead of 32,
            with the same result. Ignored with key_bias (Stem's keys are fp32).
        num_warps: warps of a row's program with method "program" (default `topk_row_warps(NB)`):
            fewer warps hold more keys a thread and pay less for each step's block-wide count.
        search: how method "program" finds a row's threshold, "bisect", "interpolate" or "auto"
            (the interpolation on rounded keys: `TOPK_SEARCH`); the same lists. None: `TOPK_SEARCH`.
    Returns (idx, counts, n_forced): ascending block lists, -1 padded; int32.
    """
    if method not in BLOCK_TOPK_METHODS:
        raise ValueError(f"method={method!r}; allowed: {', '.join(BLOCK_TOPK_METHODS)}")
    if num_warps is not None and num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps={num_warps}; allowed: 1, 2, 4, 8, 16")
    if rows_per_program not in (1, 2, 4, 8, 16):
        raise ValueError(f"rows_per_program={rows_per_program}; allowed: 1, 2, 4, 8, 16 (one row a warp)")
    B, Hk, C, NB = scores.shape
    if out is None:
        idx = torch.empty(B, Hk, C, kmax, dtype=torch.int32, device=scores.device)
        counts = torch.empty(B, Hk, C, dtype=torch.int32, device=scores.device)
        n_forced = torch.empty_like(counts)
        row0 = 0
    else:
        idx, counts, n_forced = out
    bud = _budget_view(budgets, B, Hk, C) if budgets is not None and out is None else budgets
    if key_bias is not None:
        key_bias = key_bias.float().contiguous()
    if C == 0:
        return idx, counts, n_forced
    pointers, strides, flags = _row_topk_args(key_bias, bud, seq_start, idx, counts, n_forced, NB, kmax, score_dtype,
                                              search)
    if method == "warp":
        nbp, kmaxp = flags.pop("NBP"), flags.pop("KMAXP")
        flags.pop("INTERPOLATE")  # the warp rows bisect per warp (`warp_rows.rows_threshold`)
        args = (scores, *pointers, row0, q_pos0, NB, k_total, C, 1,
                scores.stride(0), scores.stride(1), scores.stride(2), *strides, Hk, kmax)
        launch = dict(flags, BLOCK_SIZE=block_size, INIT_BLOCKS=init_blocks, LOCAL_BLOCKS=local_blocks,
                      NCH=max(1, nbp // 32), WCH=min(max(1, nbp // 32), 8), NPAD=max(1, kmaxp // 32),
                      ROWS=rows_per_program,
                      num_warps=rows_per_program)
        ballot = ballot_layout_holds(_block_topk_warp_kernel, args, launch)
        _block_topk_warp_kernel[(triton.cdiv(C, rows_per_program), B * Hk)](*args, BALLOT=ballot, **launch)
        return idx, counts, n_forced
    _block_topk_kernel[(C, B * Hk)](
        scores, *pointers,
        row0, q_pos0, NB, k_total,
        scores.stride(0), scores.stride(1), scores.stride(2),
        *strides,
        Hk, kmax,
        BLOCK_SIZE=block_size, INIT_BLOCKS=init_blocks, LOCAL_BLOCKS=local_blocks, **flags,
        num_warps=num_warps or topk_row_warps(NB),
    )
    return idx, counts, n_forced


# ------------------------------------------------------------------------------------------------
# the whole selection
# ------------------------------------------------------------------------------------------------
def infllmv2_select_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    params,
    *,
    q_offset: int | None = None,
    key_bias: torch.Tensor | None = None,
    budgets: torch.Tensor | None = None,
    seq_start: torch.Tensor | None = None,
    chunk_size: int = 16384,
    emulate_kernel_offset: bool = True,
    kmax: int | None = None,
    budgets_max: int | None = None,
    k1: torch.Tensor | None = None,
    k2: torch.Tensor | None = None,
    fuse_topk: bool = False,
    block_s: int = 64,
    num_warps: int = 4,
    chunk_budgets: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None,
    topk_method: str = "program",
    tile_rows: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InfLLMv2 block selection of queries q over keys k, with Stem's inputs optional.

    Args:
        q: [B, Hq, S, D] selection queries (HF layout; fp16 / bf16 on CUDA, any float under the
            interpreter); k: [B, Hk, T, D] all keys; params: `InfLLMv2Params` (kernel_size,
            kernel_stride, coarse_factor, block_size, init_blocks, local_blocks, k_total(T)).
            D must be a power of two; any group size Hq / Hk.
        q_offset: key position of q[:, :, 0] (default T - S).
        key_bias: [B, Hk, >= NB] OAM bias per key block (added to log(score) of non-forced blocks).
        budgets: int [S], [B, S] or [B, Hk, S]: non-forced blocks to keep per row (None: native).
        seq_start: [B] int32 first real key position of each row (left padding; module docstring).
        chunk_size: query rows per chunk (memory: B * Hk * chunk * NB fp32 pooled scores).
        kmax: list width; default native k_total, or forced + max(budgets) (one host sync, unless
            the caller knows max(budgets) on the host and gives it as `budgets_max`).
        k1, k2: precomputed fine / coarse compressed keys (`compress_keys`), e.g. from a cache.
        fuse_topk: steps 2 and 3 in one launch (`_select_chunk_kernel`: two launches per chunk in
            all; not with tile_rows > 1, whose group sums come between them); False (default):
            `pooled_block_scores` then `block_topk` (three launches, one top-k program per row:
            1.4-1.8x faster on an H200 at 32K-128K, the same lists).
        block_s: query rows per program of steps 2(-3) (64: the M of a Hopper wgmma; unmeasured).
        chunk_budgets: budgets computed from each chunk's pooled scores instead of given up front
            (Stem's mass schedule): called as chunk_budgets(pooled [B, Hk, C, NBC] fp32, s0, s1) for
            query rows [s0, s1), it returns the rows' non-forced budgets ([C], [B, C] or [B, Hk, C],
            at most the native k_total - forced). Such a chunk runs as three launches (the pooled
            scores go through HBM once); not with `budgets`.
        topk_method: step 3 of the three-launch path (`block_topk(method=...)`): "program" (the
            measured default) or "warp" (one row a warp).
        num_warps: warps of the fused step-2-3 program. 4 is the measured default; on sm_90 it
            compiles to 255 registers with ~0.5 KB of spills per thread, 8 to ~220 and none
            (`stem-boost build --cases select`); 8 is the candidate for the next GPU measurement.
        tile_rows: Stem's grouped ranking (`native.infllmv2.infllmv2_select`): groups of tile_rows
            consecutive rows rank their non-forced blocks by the group's summed score
            (`group_block_sums`, between steps 2 and 3) with the group's budget (`group_budgets`).
            When the groups share their candidates (`groups_share_candidates`) the top-k runs once a
            group and the lists have one row per group: R = ceil(S / tile_rows); else R = S.
    Returns:
        idx [B, Hk, R, kmax] int32 ascending (-1 padded), counts [B, Hk, R] int32, n_forced
        [B, Hk, R] int32 (forced blocks among counts: not counted by the reduce contract); R = S
        unless tile_rows groups share a row.
    The scores round to q's dtype before pooling when q is fp16 / bf16 (`score_dtype="auto"`).
    """
    B, Hq, S, D = q.shape
    Hk, T = k.shape[1], k.shape[2]
    G = Hq // Hk
    if Hq % Hk or D & (D - 1) or D < 16:
        raise ValueError(f"the fused selection needs Hq ({Hq}) a multiple of Hk ({Hk}) and D ({D}) a power of two >= 16")
    p = params
    offset = T - S if q_offset is None else int(q_offset)
    if offset < 0 or offset + S > T:
        raise ValueError(f"queries [{offset}, {offset + S}) must lie inside the {T} keys")
    if k1 is None:
        k1 = compress_keys(k, p.kernel_size, p.kernel_stride)
    if k2 is None:
        k2 = compress_keys(k, p.coarse_kernel_size, p.coarse_stride)
    k1, k2 = k1.to(q.dtype).contiguous(), k2.to(q.dtype).contiguous()
    K1, K2 = num_compressed(T, p.kernel_size, p.kernel_stride), num_compressed(T, p.coarse_kernel_size, p.coarse_stride)
    fresh = emulate_kernel_offset and offset == 0 and S == T and S > 1 and seq_start is None
    d1 = kernel_causal_offset(S, K1, p.kernel_stride) if fresh else 0
    d2 = kernel_causal_offset(S, K2, p.coarse_stride) if fresh else 0
    lo1 = lo2 = None
    if seq_start is not None:
        seq_start = seq_start.to(device=q.device, dtype=torch.int32).contiguous()
        lo1 = ((seq_start + p.kernel_stride - 1) // p.kernel_stride).to(torch.int32)
        lo2 = ((seq_start + p.coarse_stride - 1) // p.coarse_stride).to(torch.int32)
    n_forced_max = p.init_blocks + p.local_blocks + 1
    k_total = p.k_total(T)
    if budgets is not None and chunk_budgets is not None:
        raise ValueError("give budgets or chunk_budgets, not both")
    if kmax is None:
        kmax = k_total if budgets is None else n_forced_max + int(budgets.max() if budgets_max is None else budgets_max)
    nb_total = -(-T // p.block_size)
    kmax = max(1, min(int(kmax), nb_total))
    bud = _budget_view(budgets.to(q.device), B, Hk, S) if budgets is not None else None
    round_to = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else None
    scale = D ** -0.5
    bias = key_bias.float().contiguous() if key_bias is not None else None
    chunk_size = grouped_chunk_rows(chunk_size, tile_rows)  # whole groups (and budget windows) a chunk
    shared = tile_rows > 1 and groups_share_candidates(offset, p.block_size, tile_rows)
    if tile_rows > 1 and bud is not None:  # the groups' budgets once: [B, Hk, ceil(S / tile_rows)]
        bud = group_budgets(bud, tile_rows).to(torch.int32)
        if not shared:
            bud = bud.repeat_interleave(tile_rows, dim=-1)[..., :S]
    rows = -(-S // tile_rows) if shared else S

    idx = torch.empty(B, Hk, rows, kmax, dtype=torch.int32, device=q.device)
    counts = torch.empty(B, Hk, rows, dtype=torch.int32, device=q.device)
    n_forced = torch.empty_like(counts)
    for s0 in range(0, S, chunk_size):
        s1 = min(S, s0 + chunk_size)
        q_pos = torch.arange(s0 + offset, s1 + offset, device=q.device)
        vis1 = visible_compressed(q_pos, K1, p.kernel_size, p.kernel_stride, d1).to(torch.int32)
        vis2 = visible_compressed(q_pos, K2, p.coarse_kernel_size, p.coarse_stride, d2).to(torch.int32)
        qc = q[:, :, s0:s1]
        lse = coarse_lse(qc, k2, vis2, scale, lo2=lo2)
        nbc = (s1 - 1 + offset) // p.block_size + 1
        if tile_rows > 1:  # the pooled scores, their group sums, one top-k a group (or a row)
            _grouped_chunk(qc, k1, lse, vis1, nbc, scale, p, s0=s0, offset=offset, n_existing=K1, lo1=lo1,
                           round_to=round_to, bias=bias, bud=bud, chunk_budgets=chunk_budgets, seq_start=seq_start,
                           k_total=k_total, kmax=kmax, out=(idx, counts, n_forced), topk_method=topk_method,
                           tile_rows=tile_rows, shared=shared)
            continue
        bud_c = bud[:, :, s0:s1] if bud is not None else None
        if not fuse_topk or chunk_budgets is not None:  # steps 2 and 3 as two launches (pooled scores through HBM)
            # Stem's bias goes into the pooled kernel (its keys written in place of the scores), except
            # where the mass schedule needs the scores themselves for its budgets
            bias_in_pool = bias is not None and chunk_budgets is None
            pooled = pooled_block_scores(qc, k1, lse, vis1, nbc, p.pool_size, scale, q_pos0=s0 + offset,
                                         block_size=p.block_size, n_existing=K1, lo1=lo1, round_to=round_to,
                                         key_bias=bias if bias_in_pool else None)
            if chunk_budgets is not None:
                bud_c = _budget_view(chunk_budgets(pooled, s0, s1).to(q.device), B, Hk, s1 - s0)
            block_topk(pooled, q_pos0=s0 + offset, block_size=p.block_size, init_blocks=p.init_blocks,
                       local_blocks=p.local_blocks, k_total=k_total, key_bias=None if bias_in_pool else bias,
                       budgets=bud_c, seq_start=seq_start, kmax=kmax, out=(idx, counts, n_forced), row0=s0,
                       method=topk_method, score_dtype=None if bias_in_pool else round_to)
            continue
        C = s1 - s0
        scratch = torch.empty(B, Hk, C, nbc, dtype=torch.float32, device=q.device)
        vis1_2d = vis1.unsqueeze(0)
        pointers, strides, flags = _row_topk_args(bias, bud_c, seq_start, idx, counts, n_forced, nbc, kmax, round_to)
        _select_chunk_kernel[(triton.cdiv(C, block_s), B * Hk)](
            qc, k1, lse, vis1_2d, lo1 if lo1 is not None else vis1_2d, scratch, *pointers,
            scale * LOG2E, C, K1, nbc, s0, s0 + offset, k_total,
            qc.stride(0), qc.stride(1), qc.stride(2),
            k1.stride(0), k1.stride(1), k1.stride(2),
            lse.stride(0), lse.stride(1),
            0,
            scratch.stride(0), scratch.stride(1), scratch.stride(2),
            *strides,
            Hk, kmax,
            G=G, D=D, P=p.pool_size, BLOCK_SIZE=p.block_size, BLOCK_S=block_s, BLOCK_B=32, HAS_LO=lo1 is not None,
            ROUND_BF16=round_to == torch.bfloat16, ROUND_FP16=round_to == torch.float16,
            INIT_BLOCKS=p.init_blocks, LOCAL_BLOCKS=p.local_blocks, **flags,
            num_warps=num_warps,
        )
    return idx, counts, n_forced


def _grouped_chunk(qc: torch.Tensor, k1: torch.Tensor, lse: torch.Tensor, vis1: torch.Tensor, nbc: int, scale: float,
                   p, *, s0: int, offset: int, n_existing: int, lo1, round_to, bias, bud, chunk_budgets, seq_start,
                   k_total: int, kmax: int, out: tuple, topk_method: str, tile_rows: int, shared: bool) -> None:
    """One chunk of `infllmv2_select_fused` with Stem's grouped ranking (query rows [s0, s0 + C), s0 a
    multiple of tile_rows): the pooled scores (no bias: the groups add probabilities), their group
    sums, then the top-k with the bias on the sums. With shared candidates the top-k reads the groups'
    first rows as rows of a sequence at 1 / tile_rows resolution: row g's query block is
    (q_pos0 / tile_rows + g) // (block_size / tile_rows), exact because both divide (and the first
    real block of a padded row is seq_start // tile_rows // (block_size / tile_rows))."""
    B, Hk, C = qc.shape[0], k1.shape[1], qc.shape[2]
    q_pos0 = s0 + offset
    pooled = pooled_block_scores(qc, k1, lse, vis1, nbc, p.pool_size, scale, q_pos0=q_pos0, block_size=p.block_size,
                                 n_existing=n_existing, lo1=lo1, round_to=round_to)
    if chunk_budgets is not None:  # the mass schedule reads the rows' own scores
        bud_rows = _budget_view(chunk_budgets(pooled, s0, s0 + C).to(qc.device), B, Hk, C)
        bud_c = group_budgets(bud_rows, tile_rows).to(torch.int32)
        if not shared:
            bud_c = bud_c.repeat_interleave(tile_rows, dim=-1)[..., :C]
    elif bud is not None:
        bud_c = bud[:, :, s0 // tile_rows:-(-(s0 + C) // tile_rows)] if shared else bud[:, :, s0:s0 + C]
    else:
        bud_c = None
    group_block_sums(pooled, tile_rows, q_pos0=q_pos0, block_size=p.block_size, spread=not shared)
    if shared:
        step = tile_rows
        block_topk(pooled[:, :, ::step], q_pos0=q_pos0 // step, block_size=p.block_size // step,
                   init_blocks=p.init_blocks, local_blocks=p.local_blocks, k_total=k_total,
                   key_bias=bias, budgets=bud_c, seq_start=None if seq_start is None else seq_start // step,
                   kmax=kmax, out=out, row0=s0 // step, method=topk_method)
    else:
        block_topk(pooled, q_pos0=q_pos0, block_size=p.block_size, init_blocks=p.init_blocks,
                   local_blocks=p.local_blocks, k_total=k_total, key_bias=bias, budgets=bud_c,
                   seq_start=seq_start, kmax=kmax, out=out, row0=s0, method=topk_method)


def infllmv2_selection(q: torch.Tensor, k: torch.Tensor, params, **kwargs):
    """`infllmv2_select_fused` as a `stem_boost.selection.Selection` (per-token rows, blocks of
    `params.block_size`, `n_forced` and `seq_start` filled in) for `sparse_attention`."""
    idx, counts, n_forced = infllmv2_select_fused(q, k, params, **kwargs)
    q_offset = kwargs.get("q_offset")
    return Selection(idx=idx, counts=counts, block_size=params.block_size, query_block=1,
                     q_offset=k.shape[2] - q.shape[2] if q_offset is None else int(q_offset),
                     seq_start=kwargs.get("seq_start"), n_forced=n_forced, ordered=True)
