"""InfLLMv2 stage-1 pooled block scores for Hopper (sm_90), written in Gluon: the contract of
`infllmv2_select.pooled_block_scores`, with the next group head's product running while this head's
exponentials are taken.

    out = pooled_block_scores_sm90(q, k1, lse, vis1, n_blocks, pool, scale, q_pos0=..., block_size=64)

    q [B, Hq, C, D] bf16 / fp16, k1 [B, Hk, K1, D] fine compressed keys, lse [B, Hq, C] fp32 (log2 units,
    `coarse_lse`), vis1 [C] or [B, C] int32 -> [B, Hk, C, n_blocks] fp32 (blocks after a row's query
    block unwritten), or with key_bias Stem's ranking keys.

Why a second kernel. Per score the Triton kernel (`_pooled_scores_kernel`) does one product term of
2 D FLOP on the tensor cores and one exp2 on the SFU; on an H200 SM both take about 1/16 of a clock
per score (D = 128), so the two units could each run at full rate only side by side. Triton waits
for each head's product before its exponentials (the same `warp_group_dot_wait {pendings = 0}` as
the indexer's), and the kernel measured a third of either limit (330 TFLOP/s, 1.3 T exp/s). Here the
head loop is written out: head g's product is issued asynchronously, `warpgroup_mma_wait(1)` leaves it
running, and head g - 1's exp2 and sum run beside it; two product tiles alternate in the registers.
Measured (H200): the overlap alone 3% faster than the Triton kernel; most of what was lost was the
launch order (the query tiles streamed from HBM once per key tile, `tile_order`), which both kernels
now share; the Gluon one stays 4% ahead and is still at 40% of either unit's limit. ptxas serialises
the head loop's wgmmas (warning C7514: the product in flight crosses the loop's back edge, a register
copy of its accumulator there), so each head's 8 k-steps wait for one another; the group's heads
written out (static_range: no copy, one wait a head) measured no faster (2.514 against 2.505 ms, the
last 16K rows of 128K, H200, BENCHMARKS.md §0000000000000000) and spill 472 bytes: what holds the
kernel is its exponentials' side, not the tensor cores.

Program roles: axis 0 = BLOCK_S query rows, axis 1 = BLOCK_B - 1 key blocks (BLOCK_B * P fine keys,
the first group only for the pooling's previous key), the two swapped by KEYS_FAST (the default),
axis 2 = batch x kv head; one warpgroup. The
key tile goes to shared memory once; the group's query-head tiles stream through NUM_BUF cp.async
buffers, NUM_BUF - 2 heads ahead. The pooling (max over each block's P keys and the previous
block's last key) follows `_pooled_tile` step by step. Only for CUDA on compute capability 9.x (Gluon
has no CPU interpreter); the Triton kernel is its oracle on the GPU (`tests/test_gpu_infllmv2_pooled_sm90.py`)
and `stem-boost build` compiles it on any machine. `infllmv2_select.pooled_block_scores` takes it
on Hopper (`supports_pooled_sm90`): on an H200, the last 16384 rows of a 128K prefill in 2.55 ms
against the Triton kernel's 2.66 (both with key tiles on the grid's fast axis; `scripts/bench_infllmv2.py
--parts pooled`).
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp

from .gluon_heads import head_sums, head_trips, load_head, merge_tile
from .gluon_shims import async_load as _async_load
from .infllmv2_pooled_args import pooled_launch_args
from .tile_order import tile_grid
from .warp_rows import interpreting

__all__ = ["pooled_block_scores_sm90", "supports_pooled_sm90", "SM90_POOLED_TILE"]
LN2 = gl.constexpr(0.6931471805599453)

# BLOCK_B * P fine keys a tile; WARPS 4: one warpgroup, 8: two, each taking half the keys against the
# same query-head tiles (half the query traffic a key)
# STEP: group heads written out a trip of the head loop (`gluon_heads.head_sums`; 0: the run-time loop over
# pairs that ptxas serialises, note C7514). H200, the last 16384 rows of 128K keys, one run
# (`bench_infllmv2.py --parts pooled`, BENCHMARKS.md twenty-fifth session): STEP 2 2.350 ms, 3 2.415, 4 2.461,
# 8 2.452, 0 2.523
SM90_POOLED_TILE = dict(BLOCK_S=64, BLOCK_B=32, NUM_BUF=4, KEYS_FAST=True, WARPS=4, STEP=2)


@gluon.jit
def _log2_approx(x):
    """log2 of positive fp32 x by the SFU (`lg2.approx.f32`), elementwise."""
    return gl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=f,f", [x], dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _exp2_sum(acc, qk, lse, scale_log2):
    """acc + exp2(qk * scale_log2 - lse), a head's share of the group mass (0 where lse is -inf: a row
    with no visible coarse key); `gluon_heads.head_sums`'s epilogue."""
    lse_safe = gl.where(lse == float("-inf"), 0.0, lse)
    p = gl.exp2(qk * scale_log2 - lse_safe[:, None])
    return acc + gl.where((lse != float("-inf"))[:, None], p, 0.0)


@gluon.jit(do_not_specialize=["n_trips"])  # a constant one-trip loop fails to lower (Triton 3.6)
def _pooled_scores_sm90_fwd(
    Q, K1, LSE, VIS1, LO1, OUT, BIAS,
    scale_log2, C, K1N, NBC, q_pos0,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_kn,
    stride_lb, stride_lh,
    stride_vb,
    stride_ob, stride_oh, stride_os,
    stride_bb, stride_bh,
    HK, n_trips,
    G: gl.constexpr, D: gl.constexpr, P: gl.constexpr, BLOCK_SIZE: gl.constexpr,
    BLOCK_S: gl.constexpr, BLOCK_B: gl.constexpr, NUM_BUF: gl.constexpr, WARPS: gl.constexpr, STEP: gl.constexpr,
    HAS_LO: gl.constexpr,
    ROUND_BF16: gl.constexpr, ROUND_FP16: gl.constexpr, HAS_BIAS: gl.constexpr, KEYS_FAST: gl.constexpr,
):
    gl.static_assert(gl.num_warps() == WARPS, "WARPS is the launch's num_warps")
    gl.static_assert((WARPS == 4) | (WARPS == 8), "one warpgroup, or two splitting the key tile")
    gl.static_assert(NUM_BUF >= 3, "a head in flight beside the one being summed needs three buffers")
    dtype: gl.constexpr = Q.dtype.element_ty
    AHEAD: gl.constexpr = NUM_BUF - 2
    BLOCK_C: gl.constexpr = BLOCK_B * P
    WG: gl.constexpr = WARPS // 4  # warpgroups, each owning BLOCK_C / WG keys of the tile (columns of the product)
    # ---- layouts: 16-byte cp.async per thread, the product, the pooling (P keys of a block in a thread)
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [WARPS, 1], [1, 0])  # 16 threads a 256-byte row
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, WG],
                                                       instr_shape=[16, BLOCK_C // WG, 16])
    pool_layout: gl.constexpr = gl.BlockedLayout([1, P], [4, 8], [WARPS, 1], [1, 0])
    q_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_S, D], dtype)
    k_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_C, D], dtype)
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)

    pid_s = gl.program_id(1) if KEYS_FAST else gl.program_id(0)  # see `tile_order`
    pid_j = gl.program_id(0) if KEYS_FAST else gl.program_id(1)
    bh = gl.program_id(2)
    b = bh // HK
    hk = bh % HK
    jt0 = pid_j * (BLOCK_B - 1)
    s_lo = pid_s * BLOCK_S
    last_qb = (q_pos0 + gl.minimum(s_lo + BLOCK_S, C) - 1) // BLOCK_SIZE
    if jt0 <= last_qb:  # blocks after the rows' last query block are never candidates: unwritten
        if HAS_LO:
            lo = gl.load(LO1 + b)
        else:
            lo = 0
        # ---- the group mass of the fine keys [(jt0 - 1) P, (jt0 + BLOCK_B - 1) P) (s_layout)
        tok_s = s_lo + gl.arange(0, BLOCK_S, layout=rows_s)
        ok_s = tok_s < C
        vis_s = gl.load(VIS1 + b * stride_vb + tok_s, mask=ok_s, other=0)
        acc = gl.zeros([BLOCK_S, BLOCK_C], gl.float32, layout=s_layout)
        if (jt0 - 1) * P < gl.max(vis_s, 0):  # some row of the tile sees some key of the tile
            q_smem = gl.allocate_shared_memory(dtype, [NUM_BUF, BLOCK_S, D], q_smem_layout)
            k_smem = gl.allocate_shared_memory(dtype, [BLOCK_C, D], k_smem_layout)
            d = gl.arange(0, D, layout=gl.SliceLayout(0, ld_layout))
            # rows outside [0, K1N) / past C read a real row: their scores are masked below
            k_rows = gl.minimum(gl.maximum((jt0 - 1) * P + gl.arange(0, BLOCK_C, layout=gl.SliceLayout(1, ld_layout)),
                                           0), K1N - 1)
            _async_load(k_smem, K1 + b.to(gl.int64) * stride_kb + hk.to(gl.int64) * stride_kh
                        + k_rows[:, None].to(gl.int64) * stride_kn + d[None, :])
            q_rows = gl.minimum(s_lo + gl.arange(0, BLOCK_S, layout=gl.SliceLayout(1, ld_layout)), C - 1)
            q_row0 = (b.to(gl.int64) * stride_qb + (hk * G).to(gl.int64) * stride_qh
                      + q_rows.to(gl.int64) * stride_qs)
            for j in gl.static_range(AHEAD):  # heads 0 .. AHEAD - 1 (the key tile rides with head 0's group)
                load_head(q_smem.index(j), Q, q_row0, d, j, G, stride_qh)
                cp.commit_group()
            lse_row = LSE + b.to(gl.int64) * stride_lb + (hk * G).to(gl.int64) * stride_lh + tok_s
            k_t = k_smem.permute((1, 0))  # [D, BLOCK_C]
            zero = gl.zeros([BLOCK_S, BLOCK_C], gl.float32, layout=s_layout)  # use_acc=False: a placeholder
            acc = head_sums(acc, q_smem, k_t, zero, Q, q_row0, d, stride_qh, lse_row, stride_lh, ok_s,
                            float("-inf"), scale_log2, n_trips, _exp2_sum, G, AHEAD, NUM_BUF, STEP)
            cp.wait_group(0)

        # ---- visibility, rounding, max-pooling onto blocks (pool_layout): `_pooled_tile`'s steps
        val = gl.convert_layout(acc, pool_layout)
        tok = s_lo + gl.arange(0, BLOCK_S, layout=gl.SliceLayout(1, pool_layout))
        ok = tok < C
        vis = gl.load(VIS1 + b * stride_vb + tok, mask=ok, other=0)
        cols = (jt0 - 1) * P + gl.arange(0, BLOCK_C, layout=gl.SliceLayout(0, pool_layout))
        exists = (cols >= lo) & (cols >= 0) & (cols < K1N)
        visible = (cols[None, :] < vis[:, None]) & (cols[None, :] >= lo)
        val = gl.where(visible, val, 0.0)
        if ROUND_BF16:
            val = val.to(gl.bfloat16).to(gl.float32)
        if ROUND_FP16:
            val = val.to(gl.float16).to(gl.float32)
        val = gl.where(exists[None, :], val, float("-inf"))
        x3 = gl.reshape(val, [BLOCK_S, BLOCK_B, P])
        gmax = gl.max(x3, 2)  # [BLOCK_S, BLOCK_B]: keys [jP, jP + P) of group g's block j
        p_idx = gl.arange(0, P, layout=gl.SliceLayout(0, gl.SliceLayout(1, x3.type.layout)))
        glast = gl.max(gl.where((p_idx == P - 1)[None, None, :], x3, float("-inf")), 2)  # key jP + P - 1
        grp = gl.arange(0, BLOCK_B, layout=gl.SliceLayout(0, gmax.type.layout))
        prev_last = gl.gather(glast, gl.maximum(grp - 1, 0)[None, :] + gl.zeros_like(gmax).to(gl.int32), 1)
        pooled = gl.maximum(gmax, prev_last)
        j = jt0 - 1 + grp
        if HAS_BIAS:  # Stem's ranking key: log(score) + the block's OAM bias (score <= 0 or NaN -> -inf)
            bias = gl.load(BIAS + b.to(gl.int64) * stride_bb + hk.to(gl.int64) * stride_bh + j,
                           mask=(j >= 0) & (j < NBC), other=0.0)
            # log(x) = log2(x) ln 2 with one MUFU lg2.approx (within 2**-22 of log2): `gl.log` and
            # `gl.log2` are libdevice's precise functions, about 25 FMA-pipe instructions a score (570
            # more SASS lines than the native build) in a loop whose exponentials hold the MUFU
            key = gl.where(pooled > 0, _log2_approx(gl.maximum(pooled, 1.1754943508222875e-38)) * LN2 + bias[None, :],
                           float("-inf"))
            pooled = gl.where(key == key, key, float("-inf"))
        tok_o = s_lo + gl.arange(0, BLOCK_S, layout=gl.SliceLayout(1, gmax.type.layout))
        out_ok = (tok_o < C)[:, None] & (grp >= 1)[None, :] & (j < NBC)[None, :]
        gl.store(OUT + b.to(gl.int64) * stride_ob + hk.to(gl.int64) * stride_oh
                 + tok_o[:, None].to(gl.int64) * stride_os + j[None, :], pooled, mask=out_ok)


def supports_pooled_sm90(q: torch.Tensor, pool: int) -> bool:
    """Whether `pooled_block_scores_sm90` runs these queries [B, Hq, C, D] with blocks of `pool` fine
    keys at its default tile: CUDA on compute capability 9.x (not the interpreter), bf16 / fp16, head
    dim 64 or 128, pool a power of two <= 8."""
    return (q.is_cuda and not interpreting() and torch.cuda.get_device_capability(q.device)[0] == 9
            and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] in (64, 128)
            and pool > 0 and not pool & (pool - 1) and SM90_POOLED_TILE["BLOCK_B"] * pool <= 256)


def pooled_block_scores_sm90(q: torch.Tensor, k1: torch.Tensor, lse: torch.Tensor, vis1: torch.Tensor,
                             n_blocks: int, pool: int, scale: float, *, q_pos0: int, block_size: int,
                             n_existing: int | None = None, lo1: torch.Tensor | None = None,
                             round_to: torch.dtype | None = None, key_bias: torch.Tensor | None = None,
                             tile: dict | None = None) -> torch.Tensor:
    """`infllmv2_select.pooled_block_scores` (same arguments but the tile, same result) by the Gluon
    kernel above; q and k1 bf16 / fp16 with a head dim of 64 or 128. `tile` overrides
    `SM90_POOLED_TILE` (BLOCK_S = 64, BLOCK_B with BLOCK_B * pool <= 256, NUM_BUF >= 3)."""
    B, Hq, C, D = q.shape
    Hk, K1 = k1.shape[1], k1.shape[2]
    G = Hq // Hk
    if q.dtype not in (torch.bfloat16, torch.float16) or D not in (64, 128):
        raise ValueError(f"q {q.dtype}, head dim {D}; allowed for the sm_90 pooled kernel: bf16 / fp16, 64 or 128")
    if pool & (pool - 1):
        raise ValueError(f"pool ({pool}) must be a power of two")
    cfg = merge_tile(SM90_POOLED_TILE, tile)
    if (cfg["BLOCK_S"] != 64 or cfg["NUM_BUF"] < 3 or cfg["BLOCK_B"] * pool > 256 or cfg["BLOCK_B"] < 2
            or cfg["WARPS"] not in (4, 8) or cfg["BLOCK_B"] * pool % (8 * cfg["WARPS"] // 4)):
        raise ValueError(f"tile {cfg}: BLOCK_S must be 64, NUM_BUF >= 3, 2 <= BLOCK_B <= 256 / pool ({pool}), "
                         f"WARPS 4 or 8, and each warpgroup's BLOCK_B * pool / (WARPS / 4) keys a multiple of 8")
    trips = head_trips(G, cfg["STEP"])
    q = q if q.stride(-1) == 1 else q.contiguous()
    out, args = pooled_launch_args(q, k1, lse, vis1, n_blocks, scale, q_pos0=q_pos0, n_existing=n_existing, lo1=lo1,
                                   key_bias=key_bias)
    if B and C and n_blocks and K1:
        grid = tile_grid(triton.cdiv(C, cfg["BLOCK_S"]), triton.cdiv(n_blocks, cfg["BLOCK_B"] - 1), B * Hk,
                         cfg["KEYS_FAST"])
        _pooled_scores_sm90_fwd[grid](
            *args, trips,
            G=G, D=D, P=pool, BLOCK_SIZE=block_size, BLOCK_S=cfg["BLOCK_S"], BLOCK_B=cfg["BLOCK_B"],
            NUM_BUF=cfg["NUM_BUF"], WARPS=cfg["WARPS"], STEP=cfg["STEP"], HAS_LO=lo1 is not None, ROUND_BF16=round_to == torch.bfloat16,
            ROUND_FP16=round_to == torch.float16, HAS_BIAS=key_bias is not None, KEYS_FAST=cfg["KEYS_FAST"],
            num_warps=cfg["WARPS"],
        )
    return out
