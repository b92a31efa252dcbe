"""Token-sparse absorbed-MLA attention for Hopper (sm_90) with warp specialisation: a producer warpgroup
gathers the selected latent rows while two consumer warpgroups compute. Same contract as `mla_token.py`.

    out = mla_token_attention_ws(q, kv, idx, counts, q_offset=T - S, sm_scale=1 / sqrt(576))

    q [B, S, H, 576] bf16/fp16, kv [B, T, 576] (values = the first 512 channels), idx [B, S, Kmax]
    int32, counts [B, S] -> out [B, S, H, 512] (and lse [B, H, S] fp32, natural log).

Why. In `mla_token_sm90.py` the same threads gather and compute, and a 128-key tile leaves shared
memory room for one buffer only, so each step waits for its gather. Here a program (one token x 64
heads, 12 warps) splits into three partitions (`gl.warp_specialize`):

  producer (4 warps, few registers)   Q once, then per step of 128 selected keys four cp.async
                                      gathers, one per quarter of the tile, each into its own buffer
                                      as soon as the consumers have released it (mbarriers)
  consumer 0 (4 warps)                keys 0..63 of the step for S = Q K^T, output columns 0..255
  consumer 1 (4 warps)                keys 64..127 for S, output columns 256..511

The tile is held as two 64-key blocks, each split into L (latent columns 0..255) and R (columns
256..511 and the 64 rope columns); a quarter is (block, half). Per step, consumer c:
  1. S_c [64 heads, 64 keys] = Q K_c^T (3 wgmma: q_L K_L^T + q_V2 K_V2^T + q_rope K_rope^T)
  2. the running max, one way: consumer 0 publishes m_0 = max(m, rowmax S_0) and goes on; consumer 1
     takes m_1 = max(m_0, rowmax S_1) and publishes it back
  3. P_c = exp2(S_c - m_c), O_c *= exp2(m_old - m_c), O_c += P_c V_c[:, own half]
  4. consumer 0 rescales O_0, its row sums and P_0 by exp2(m_0 - m_1) once m_1 is known; each P_c
     goes to shared memory for the other consumer (P_0 over block 0's rope columns, dead by then)
  5. O_c += P_other V_other[:, own half]
A consumer's own product reads P from registers (`LOCAL_P_REGS`, FlashMLA's choice: wgmma's A
operand in registers, so consumer 0 issues it with no store, fence and barrier before it, and
consumer 1 stores P_1 for the other while its own runs; 3-4% faster on an H200), the other's P from
shared memory. A quarter is released when its last reader is done: block 0 L by consumer 0 alone,
block 1 R by consumer 1 alone, block 0 R and block 1 L by both (one reads it for S, the other for P V); the producer refills them in that order,
so the next step's gather runs under this step's products. The key positions of a step are staged
in shared memory a step ahead (the consumers mask S with them). Row sums stay per consumer until
the end. Shared memory: Q 72 KB + two blocks 144 KB + P_1 8 KB + positions: 226 KB. Measured on an
H200 with the own P from registers: 388 TFLOP/s at 131072 keys, 409 at 32768 (373 / 397 from shared
memory; BENCHMARKS.md §000000000000); 412 / 400 at 64K / 128K keys with the step's views rebuilt
each step (§0000000000000000).

Only for CUDA tensors on sm_90 (Gluon has no CPU interpreter); `mla_token.py` is the portable path.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, warpgroup_mma, warpgroup_mma_wait

from .gluon_shims import PUBLIC_REINTERPRET
from .gluon_shims import async_load as gluon_async_load
from .gluon_shims import cta_barrier
from .gluon_softmax import finite_max
from .mla_token import prepare_mla_token_call
from .ptx_hints import l2_prefetch_on_copies

__all__ = ["mla_token_attention_ws", "WS_TILES", "KEYS_PER_STEP"]

BLOCK_H = 64  # heads per program (M of every product)
BLOCK_K = 64  # keys per consumer per step (a step takes 2 * BLOCK_K)
KEYS_PER_STEP = 2 * BLOCK_K  # selected keys a step (a row's last step is padded to it)
# measured on an H200 (BENCHMARKS.md §000000): 232 registers a consumer thread 373 TFLOP/s, 216 370; the
# next step's S queued early gave nothing (372). With the step's views (no spill at any of these) the splits
# from 192 to 240 registers a consumer lie within 1-2% of one another, the sign changing from call to call;
# 208 (the producer gets 96) measured the layer's 444 ms at 128K (§0000000000000000); the early S 0.98-1.06x
# own P from registers 11.43 ms against 11.76 from shared memory (8192 queries at the end of 32K keys, 128
# heads; L2 hints 11.45 / 11.80: no gain; bench_dsa --sections mla, 2026-12-04)
# STEP_VIEWS: shared-memory views rebuilt every step (no hoisted wgmma descriptors, no spills; see
# `_consumer`): 0.951-0.952x the time of the hoisted ones (8192 queries, 64K / 128K keys, 128 heads, H200,
# BENCHMARKS.md §0000000000000000). L2_PREFETCH: the gathers' L2 prefetch size in bytes (`ptx_hints`; 0 =
# none); 128 = the latent row's granularity (1152 = 9 x 128 bytes), so it fetches no byte the kernel does not
# read: 0.996-0.998x of none in that run (256: 0.997-1.005x, evict-last hints with it 1.002-1.015x)
# SWEEP: 0 = every list walked by ascending slot; N > 0 = alternate blocks of N tokens walk theirs backward
# (the same keys and sums in another order, each wave starting on what the one before fetched last). An
# LRU model of a 50 MB L2 fed the benchmark layer's lists in the programs' timing (`scripts/gather_locality.py
# --jitter 0.05`) saves 0.02-0.05 of Stem's misses with 66 and none with 33; on an H100 the last 16K rows of
# the 128K DSA layer ran 0.996-1.008x of the default's time with 33 / 66 (Stem's lists; native's 0.978-1.003x;
# BENCHMARKS.md §000000000000000000000000 (g)): off
WS_TILES = dict(CONSUMER_REGS=208, EARLY_QK_L=False, LOCAL_P_REGS=True, L2_HINTS=False, L2_PREFETCH=128,
                STEP_VIEWS=True, SWEEP=0)
REINTERPRET_IS_PUBLIC = gl.constexpr(PUBLIC_REINTERPRET)
# quarters of a step's tile, in the producer's refill order
Q_K0L = gl.constexpr(0)  # block 0, latent columns 0..255: read by consumer 0 (S and P V)
Q_K1R = gl.constexpr(1)  # block 1, columns 256..575: read by consumer 1 (S and P V)
Q_K0R = gl.constexpr(2)  # block 0, columns 256..575: consumer 0 (S; then P_0 over its rope part), consumer 1 (P V)
Q_K1L = gl.constexpr(3)  # block 1, latent columns 0..255: consumer 1 (S), consumer 0 (P V)


@gluon.jit
def _valid_keys(pos, T, qpos, CAUSAL: gl.constexpr):
    """Which key positions name a real key the query may see: in [0, T), and at or before qpos if causal."""
    ok = (pos >= 0) & (pos < T)
    if CAUSAL:
        ok = ok & (pos <= qpos)
    return ok


@gluon.jit
def _copy_rows(dst, row_ptrs, col0, layout: gl.constexpr, COLS: gl.constexpr, EVICT: gl.constexpr = ""):
    """cp.async row_ptrs[r][col0:col0 + COLS] into dst [R, COLS] (row_ptrs [R] in SliceLayout(1, layout));
    EVICT: the L2 eviction policy of the copies ("" the default, "evict_last", "evict_first")."""
    d = col0 + gl.arange(0, COLS, layout=gl.SliceLayout(0, layout))
    if EVICT == "":
        gluon_async_load(dst, row_ptrs[:, None] + d[None, :])
    else:
        gluon_async_load(dst, row_ptrs[:, None] + d[None, :], eviction_policy=EVICT)


@gluon.jit
def _gather_block(dst, positions, kv_base, stride_kt, T, qpos, col0, layout: gl.constexpr, COLS: gl.constexpr,
                  CAUSAL: gl.constexpr, EVICT: gl.constexpr):
    """cp.async the 64 rows kv[positions[r], col0:col0 + COLS] into dst [64, COLS] (positions: [64] int32 in
    shared memory), 16 rows at a time (a few live addresses per thread: the producer runs on few
    registers). Invalid positions read row 0 (a real row, masked in S by the consumers), so the copies
    need no predicate."""
    rows: gl.constexpr = gl.SliceLayout(1, layout)
    for r0 in gl.static_range(0, 64, 16):
        pos = positions.slice(r0, 16).load(rows)
        ok = _valid_keys(pos, T, qpos, CAUSAL)
        _copy_rows(dst.slice(r0, 16, dim=0), kv_base + gl.where(ok, pos, 0).to(gl.int64) * stride_kt, col0,
                   layout, COLS, EVICT)


@gluon.jit
def _step_positions(idx_row, step, count, backward, SWEEP: gl.constexpr):
    """The 128 key positions of a step, one per producer thread (-1 past count). SWEEP > 0 and
    backward != 0: the row's list is walked from its last entry down (the same keys, in reverse)."""
    slot = step * 128 + gl.arange(0, 128, layout=gl.BlockedLayout([1], [32], [4], [0]))
    if SWEEP > 0:
        src = gl.where(backward != 0, count - 1 - slot, slot)
    else:
        src = slot
    return gl.load(idx_row + src, mask=slot < count, other=-1)


@gluon.jit
def _producer(q_row, stride_qh, h0, H, kv_base, stride_kt, idx_row, count, T, qpos, n_steps, backward,
              q_l, q_v2, q_r, k_l, k_v2, k_r, positions, q_ready, ready, free,
              DV: gl.constexpr, DR: gl.constexpr, CAUSAL: gl.constexpr, L2_HINTS: gl.constexpr, SWEEP: gl.constexpr):
    """4 warps: Q into shared memory, then every step's four quarters as soon as each is free. The key
    positions go through shared memory (`positions`, [2 x 128] by step parity; the consumers mask S
    with them): the next step's are loaded while this step's quarters are gathered. L2_HINTS: Q's
    copies marked evict-first (read once), the latent rows' evict-last (the token's other head chunk and
    the next tokens gather many of the same rows)."""
    q_evict: gl.constexpr = "evict_first" if L2_HINTS else ""
    kv_evict: gl.constexpr = "evict_last" if L2_HINTS else ""
    wide: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0])  # [*, 256]: a warp per row, 16 B a thread
    narrow: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])  # [*, 64]
    rows_w: gl.constexpr = gl.SliceLayout(1, wide)
    rows_n: gl.constexpr = gl.SliceLayout(1, narrow)
    # Q [64 heads, 576], 16 heads at a time: head rows past H read head 0 (their outputs are not stored)
    for r0 in gl.static_range(0, 64, 16):
        hw = h0 + r0 + gl.arange(0, 16, layout=rows_w)
        rows_wide = q_row + gl.where(hw < H, hw, 0).to(gl.int64) * stride_qh
        _copy_rows(q_l.index(0).slice(r0, 16, dim=0), rows_wide, 0, wide, 256, q_evict)
        _copy_rows(q_v2.index(0).slice(r0, 16, dim=0), rows_wide, 256, wide, 256, q_evict)
        hn = h0 + r0 + gl.arange(0, 16, layout=rows_n)
        _copy_rows(q_r.index(0).slice(r0, 16, dim=0), q_row + gl.where(hn < H, hn, 0).to(gl.int64) * stride_qh, DV, narrow, DR,
                   q_evict)
    cp.mbarrier_arrive(q_ready, increment_count=False)
    positions.index(0).store(_step_positions(idx_row, 0, count, backward, SWEEP))
    cta_barrier()
    for i in range(n_steps):
        phase = (i & 1) ^ 1  # the first wait on a fresh barrier passes
        pos0 = positions.index(i & 1).slice(0, 64)
        pos1 = positions.index(i & 1).slice(64, 64)
        upcoming = _step_positions(idx_row, i + 1, count, backward, SWEEP)  # in flight under the gathers
        mbarrier.wait(free.index(Q_K0L), phase)
        _gather_block(k_l.index(0), pos0, kv_base, stride_kt, T, qpos, 0, wide, 256, CAUSAL, kv_evict)
        cp.mbarrier_arrive(ready.index(Q_K0L), increment_count=False)
        mbarrier.wait(free.index(Q_K1R), phase)
        _gather_block(k_v2.index(1), pos1, kv_base, stride_kt, T, qpos, 256, wide, 256, CAUSAL, kv_evict)
        _gather_block(k_r.index(1), pos1, kv_base, stride_kt, T, qpos, DV, narrow, DR, CAUSAL, kv_evict)
        cp.mbarrier_arrive(ready.index(Q_K1R), increment_count=False)
        mbarrier.wait(free.index(Q_K0R), phase)
        _gather_block(k_v2.index(0), pos0, kv_base, stride_kt, T, qpos, 256, wide, 256, CAUSAL, kv_evict)
        _gather_block(k_r.index(0), pos0, kv_base, stride_kt, T, qpos, DV, narrow, DR, CAUSAL, kv_evict)
        cp.mbarrier_arrive(ready.index(Q_K0R), increment_count=False)
        mbarrier.wait(free.index(Q_K1L), phase)
        _gather_block(k_l.index(1), pos1, kv_base, stride_kt, T, qpos, 0, wide, 256, CAUSAL, kv_evict)
        cp.mbarrier_arrive(ready.index(Q_K1L), increment_count=False)
        # both consumers have read step i - 1's positions (before releasing block 1 L of step i - 1)
        positions.index((i + 1) & 1).store(upcoming)
        cta_barrier()


@gluon.jit
def _release(bar):
    """Every thread of this consumer is past its reads (one barrier), then one arrival."""
    cta_barrier()
    mbarrier.arrive(bar, count=1)


@gluon.jit
def _masked_scores(qk, kpos, T, qpos, qk_scale_log2, CAUSAL: gl.constexpr):
    """S in log2 units, -inf where the slot holds no valid key (past count, out of range, after qpos)."""
    return gl.where(_valid_keys(kpos, T, qpos, CAUSAL)[None, :], qk * qk_scale_log2, float("-inf"))


@gluon.jit
def _consumer(c: gl.constexpr, T, qpos, n_steps, qk_scale_log2, o_row, stride_oh, h0, H,
              lse_ptr, stride_lh, q_l, q_v2, q_r, k_l, k_v2, k_r, p_1, positions, row_max, row_sum,
              q_ready, ready, free, max_ready, p_ready, p_1_free,
              DV: gl.constexpr, CAUSAL: gl.constexpr, RETURN_LSE: gl.constexpr, EARLY_QK_L: gl.constexpr,
              LOCAL_P_REGS: gl.constexpr, STEP_VIEWS: gl.constexpr):
    """Consumer c (4 warps): S over block c's keys, O over output columns [256 c, 256 c + 256).

    The running max goes one way per step: consumer 0 publishes max(m, its row max) and starts its first
    P V at once; consumer 1 takes the larger of that and its own and publishes it back; consumer 0
    then rescales its O, its sums and the P it hands over by exp2(m_0 - m_1). Consumer 0 never waits
    for consumer 1 before its first product."""
    dtype: gl.constexpr = q_l.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 256, 16])
    p_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, 64], dtype)
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    cols_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    p_regs_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)  # P as wgmma's A

    # P_0 lives in block 0's rope columns (read by consumer 0's S only, done before P_0 is written)
    if REINTERPRET_IS_PUBLIC:
        p_0 = k_r.index(0).reinterpret(dtype, [64, 64], p_smem_layout)
    else:
        p_0 = k_r.index(0)._reinterpret(dtype, [64, 64], p_smem_layout)
    max_0 = row_max.slice(0, 64)
    max_1 = row_max.slice(64, 64)
    m_i = gl.full([64], float("-inf"), gl.float32, layout=rows_s)
    l_i = gl.zeros([64], gl.float32, layout=rows_s)
    acc = gl.zeros([64, 256], gl.float32, layout=o_layout)
    s_zero = gl.zeros([64, 64], gl.float32, layout=s_layout)
    mbarrier.wait(q_ready, 0)
    if c == 0 and EARLY_QK_L:  # the next step's S is carried in flight across steps
        mbarrier.wait(ready.index(Q_K0L), 0, pred=n_steps > 0)
        qk = warpgroup_mma(q_l.index(0), k_l.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    else:
        qk = s_zero
    zero = (T < 0).to(gl.int32)  # 0 (T >= 0), but not a constant to the compiler
    for i in range(n_steps):
        phase = i & 1
        # The step's shared-memory views. Indexed by the constant 0 / 1, the 72 wgmma descriptors of
        # a step are loop invariants: the compiler hoists them, they overflow the uniform registers
        # and consumer 1 spills (584 bytes of local memory traffic, 270 register moves in the loop).
        # Indexed by zero * i, each is rebuilt by one uniform add next to its wgmma.
        if STEP_VIEWS:
            at = zero * i
        else:
            at = 0
        ql = q_l.index(at)
        qv = q_v2.index(at)
        qr = q_r.index(at)
        k0l = k_l.index(at)
        k1l = k_l.index(at + 1)
        k0v = k_v2.index(at)
        k1v = k_v2.index(at + 1)
        k0r = k_r.index(at)
        k1r = k_r.index(at + 1)
        if c == 0:
            if not EARLY_QK_L:
                mbarrier.wait(ready.index(Q_K0L), phase)
                qk = warpgroup_mma(ql, k0l.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            mbarrier.wait(ready.index(Q_K0R), phase)
            qk = warpgroup_mma(qv, k0v.permute((1, 0)), qk, is_async=True)
            qk = warpgroup_mma(qr, k0r.permute((1, 0)), qk, is_async=True)
            qk = warpgroup_mma_wait(0, deps=(qk,))
            qk = _masked_scores(qk, positions.index(phase).slice(0, 64).load(cols_s), T, qpos, qk_scale_log2, CAUSAL)
            m_0 = gl.maximum(m_i, gl.max(qk, axis=1))
            max_0.store(m_0)
            _release(max_ready.index(0))
            p = gl.exp2(qk - finite_max(m_0)[:, None])
            alpha = gl.exp2(m_i - finite_max(m_0))
            l_i = l_i * alpha + gl.sum(p, axis=1)
            acc = acc * gl.convert_layout(alpha, rows_o)[:, None]
            if LOCAL_P_REGS:  # the own product reads P from registers: no store, fence and barrier before it
                p_own = gl.convert_layout(p.to(dtype), p_regs_layout)
                acc = warpgroup_mma(p_own, k0l, acc, is_async=True)
            else:
                p_0.store(p.to(dtype))
                fence_async_shared()
                cta_barrier()
                acc = warpgroup_mma(p_0, k0l, acc, is_async=True)
            mbarrier.wait(max_ready.index(1), phase)
            m_i = max_1.load(rows_s)  # m_1 >= m_0
            f = gl.where(m_0 == float("-inf"), 1.0, gl.exp2(m_0 - finite_max(m_i)))
            acc = warpgroup_mma_wait(0, deps=(acc,))
            _release(free.index(Q_K0L))
            acc = acc * gl.convert_layout(f, rows_o)[:, None]
            l_i = l_i * f
            p_0.store((p * f[:, None]).to(dtype))  # P_0 against m_1, for consumer 1
            fence_async_shared()
            _release(p_ready.index(0))
            mbarrier.arrive(free.index(Q_K0R), count=1)  # this consumer is done with block 0 R
            mbarrier.wait(p_ready.index(1), phase)
            acc = warpgroup_mma(p_1, k1l, acc, is_async=True)
            if EARLY_QK_L:
                # the next step's S over block 0 L (released first, so usually landed) queued behind this
                # P V; after the last step it reads stale rows once and is never used
                mbarrier.wait(ready.index(Q_K0L), phase ^ 1, pred=i + 1 < n_steps)
                qk = warpgroup_mma(ql, k0l.permute((1, 0)), s_zero, use_acc=False, is_async=True)
                acc = warpgroup_mma_wait(1, deps=(acc,))
            else:
                acc = warpgroup_mma_wait(0, deps=(acc,))
            _release(free.index(Q_K1L))
            mbarrier.arrive(p_1_free, count=1)
        else:
            mbarrier.wait(ready.index(Q_K1R), phase)
            qk = warpgroup_mma(qv, k1v.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            qk = warpgroup_mma(qr, k1r.permute((1, 0)), qk, is_async=True)
            mbarrier.wait(ready.index(Q_K1L), phase)
            qk = warpgroup_mma(ql, k1l.permute((1, 0)), qk, is_async=True)
            qk = warpgroup_mma_wait(0, deps=(qk,))
            kpos = positions.index(phase).slice(64, 64).load(cols_s)  # before block 1 L is released
            _release(free.index(Q_K1L))
            qk = _masked_scores(qk, kpos, T, qpos, qk_scale_log2, CAUSAL)
            mbarrier.wait(max_ready.index(0), phase)
            m_1 = gl.maximum(max_0.load(rows_s), gl.max(qk, axis=1))  # max_0 >= m_i
            max_1.store(m_1)
            _release(max_ready.index(1))
            p = gl.exp2(qk - finite_max(m_1)[:, None])
            alpha = gl.exp2(m_i - finite_max(m_1))
            m_i = m_1
            l_i = l_i * alpha + gl.sum(p, axis=1)
            acc = acc * gl.convert_layout(alpha, rows_o)[:, None]
            if LOCAL_P_REGS:  # the own product from registers first, P_1 stored for consumer 0 under it
                p_own = gl.convert_layout(p.to(dtype), p_regs_layout)
                acc = warpgroup_mma(p_own, k1v, acc, is_async=True)
                mbarrier.wait(p_1_free, phase ^ 1)
                p_1.store(p_own)
                fence_async_shared()
                _release(p_ready.index(1))
            else:
                mbarrier.wait(p_1_free, phase ^ 1)
                p_1.store(p.to(dtype))
                fence_async_shared()
                _release(p_ready.index(1))
                acc = warpgroup_mma(p_1, k1v, acc, is_async=True)
            mbarrier.wait(p_ready.index(0), phase)
            acc = warpgroup_mma(p_0, k0v, acc, is_async=True)
            acc = warpgroup_mma_wait(1, deps=(acc,))
            _release(free.index(Q_K1R))
            acc = warpgroup_mma_wait(0, deps=(acc,))
            _release(free.index(Q_K0R))

    # ---- epilogue: the two partial row sums added, O [64, 256] of this consumer's columns, lse
    if c == 0 and EARLY_QK_L:  # the stale S after the last step
        qk = warpgroup_mma_wait(0, deps=(qk,))
    row_sum.slice(c * 64, 64).store(l_i)
    _release(max_ready.index(c))
    mbarrier.wait(max_ready.index(1 - c), n_steps & 1)
    l_i = l_i + row_sum.slice((1 - c) * 64, 64).load(rows_s)
    l_div = gl.where(l_i == 0.0, 1.0, l_i)
    out = (acc / gl.convert_layout(l_div, rows_o)[:, None]).to(dtype)
    # through shared memory (this consumer's Q piece: both are past their last S), then 16 heads at a
    # time to global memory (a few live addresses per thread)
    if c == 0:
        staging = q_l.index(0)
    else:
        staging = q_v2.index(0)
    staging.store(out)
    cta_barrier()
    store_layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0])
    d_o = c * 256 + gl.arange(0, 256, layout=gl.SliceLayout(0, store_layout))
    for r0 in gl.static_range(0, 64, 16):
        ho = h0 + r0 + gl.arange(0, 16, layout=gl.SliceLayout(1, store_layout))
        gl.store(o_row + ho[:, None] * stride_oh + d_o[None, :], staging.slice(r0, 16, dim=0).load(store_layout),
                 mask=(ho < H)[:, None])
    if RETURN_LSE and c == 0:
        lse = (finite_max(m_i) + gl.log2(l_div)) * 0.6931471805599453
        lse = gl.where(l_i == 0.0, float("-inf"), lse)
        hs = h0 + gl.arange(0, 64, layout=rows_s)
        gl.store(lse_ptr + hs * stride_lh, lse, mask=hs < H)


@gluon.jit
def _mla_token_ws_fwd(
    Q, KV, IDX, CNT, O, LSE,
    qk_scale_log2, S, T, q_offset, H,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_kt,
    stride_ib, stride_ir, stride_cb,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    DV: gl.constexpr, DR: gl.constexpr, CAUSAL: gl.constexpr, RETURN_LSE: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, EARLY_QK_L: gl.constexpr, LOCAL_P_REGS: gl.constexpr, L2_HINTS: gl.constexpr,
    L2_PREFETCH: gl.constexpr,  # read by the PTX patch only (`ptx_hints`): here it keys the build
    STEP_VIEWS: gl.constexpr, SWEEP: gl.constexpr,
):
    gl.static_assert(DV == 512 and DR == 64, "the absorbed DeepSeek MLA widths")
    dtype: gl.constexpr = Q.dtype.element_ty
    # ---- program -> (batch, token, head chunk); a token's head chunks side by side, late tokens first
    n_h = gl.cdiv(H, 64)
    s = S - 1 - gl.program_id(0) // n_h
    h0 = (gl.program_id(0) % n_h) * 64
    b = gl.program_id(2)
    qpos = s + q_offset
    q_row = Q + b.to(gl.int64) * stride_qb + s.to(gl.int64) * stride_qs
    kv_base = KV + b.to(gl.int64) * stride_kb
    idx_row = IDX + b.to(gl.int64) * stride_ib + s.to(gl.int64) * stride_ir
    o_row = O + b.to(gl.int64) * stride_ob + s.to(gl.int64) * stride_os
    lse_ptr = LSE + b * stride_lb + s
    count = gl.load(CNT + b * stride_cb + s)
    n_steps = gl.cdiv(count, 128)
    # SWEEP > 0: every other block of SWEEP tokens (counted from the last, as they run) walks its lists
    # backward, so that a wave starts on the keys the wave before it gathered last (still in L2)
    if SWEEP > 0:
        backward = ((gl.program_id(0) // n_h) // SWEEP) % 2
    else:
        backward = gl.program_id(0) * 0  # unread

    # ---- shared memory: Q, two 64-key blocks (L / V2 / rope), P_1, the row max and sum exchange
    wide_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, 256], dtype)
    rope_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, 64], dtype)
    vec_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    q_l = gl.allocate_shared_memory(dtype, [1, 64, 256], wide_layout)  # [1, ...]: see `_consumer` (STEP_VIEWS)
    q_v2 = gl.allocate_shared_memory(dtype, [1, 64, 256], wide_layout)
    q_r = gl.allocate_shared_memory(dtype, [1, 64, 64], rope_layout)
    k_l = gl.allocate_shared_memory(dtype, [2, 64, 256], wide_layout)
    k_v2 = gl.allocate_shared_memory(dtype, [2, 64, 256], wide_layout)
    k_r = gl.allocate_shared_memory(dtype, [2, 64, 64], rope_layout)
    p_1 = gl.allocate_shared_memory(dtype, [64, 64], rope_layout)
    row_max = gl.allocate_shared_memory(gl.float32, [128], vec_layout)  # consumer c's at [64 c, 64 c + 64)
    row_sum = gl.allocate_shared_memory(gl.float32, [128], vec_layout)
    positions = gl.allocate_shared_memory(gl.int32, [2, 128], vec_layout)  # the key positions of two steps
    # ---- barriers (phase = step parity): quarters ready / free, Q landed, max and P exchanged, P_1 read
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
    free = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
    max_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    p_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    p_1_free = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(q_ready, count=128)  # every producer thread's cp.async arrival (no increment)
    for j in gl.static_range(4):
        mbarrier.init(ready.index(j), count=128)
    mbarrier.init(free.index(Q_K0L), count=1)
    mbarrier.init(free.index(Q_K1R), count=1)
    mbarrier.init(free.index(Q_K0R), count=2)
    mbarrier.init(free.index(Q_K1L), count=2)
    for j in gl.static_range(2):
        mbarrier.init(max_ready.index(j), count=1)
        mbarrier.init(p_ready.index(j), count=1)
    mbarrier.init(p_1_free, count=1)
    fence_async_shared()

    # The argument tuples are written inline: a tuple held in a variable turns its constexprs (the
    # consumer's index, the flags) into runtime values.
    gl.warp_specialize([
        (_producer, (q_row, stride_qh, h0, H, kv_base, stride_kt, idx_row, count, T, qpos, n_steps, backward, q_l, q_v2,
                     q_r, k_l, k_v2, k_r, positions, q_ready, ready, free, DV, DR, CAUSAL, L2_HINTS, SWEEP)),
        (_consumer, (0, T, qpos, n_steps, qk_scale_log2, o_row, stride_oh, h0, H, lse_ptr, stride_lh, q_l, q_v2, q_r, k_l,
                     k_v2, k_r, p_1, positions, row_max, row_sum, q_ready, ready, free, max_ready, p_ready, p_1_free,
                     DV, CAUSAL, RETURN_LSE, EARLY_QK_L, LOCAL_P_REGS, STEP_VIEWS)),
        (_consumer, (1, T, qpos, n_steps, qk_scale_log2, o_row, stride_oh, h0, H, lse_ptr, stride_lh, q_l, q_v2, q_r, k_l,
                     k_v2, k_r, p_1, positions, row_max, row_sum, q_ready, ready, free, max_ready, p_ready, p_1_free,
                     DV, CAUSAL, RETURN_LSE, False, LOCAL_P_REGS, STEP_VIEWS)),
    ], [4, 4], [CONSUMER_REGS, CONSUMER_REGS])


def mla_token_attention_ws(
    q: torch.Tensor,
    kv: torch.Tensor,
    idx: torch.Tensor,
    counts: torch.Tensor,
    *,
    q_offset: int | None = None,
    sm_scale: float | None = None,
    dv: int = 512,
    return_lse: bool = False,
    causal: bool = True,
    tiles: dict | None = None,
):
    """Same arguments and results as `mla_token.mla_token_attention` (q [B, S, H, 576], kv [B, T, 576]
    or [B, T, 1, 576], idx [B, S, Kmax] or [B, 1, S, Kmax], counts to match); Dqk = 576 and dv = 512 only."""
    if dv != 512 or q.shape[-1] != 576:
        raise ValueError(f"the warp-specialised MLA kernel takes Dqk 576 / dv 512; got Dqk {q.shape[-1]}, dv {dv}")
    unknown = set(tiles or {}) - set(WS_TILES)
    if unknown:
        raise ValueError(f"unknown tile options {sorted(unknown)}; allowed: {sorted(WS_TILES)}")
    call = prepare_mla_token_call(q, kv, idx, counts, q_offset=q_offset, sm_scale=sm_scale, dv=dv,
                                  return_lse=return_lse)
    B, S, H, Dqk = call.q.shape
    cfg = dict(WS_TILES)
    cfg.update(tiles or {})
    if isinstance(cfg["SWEEP"], bool) or not isinstance(cfg["SWEEP"], int) or cfg["SWEEP"] < 0:
        raise ValueError(f"SWEEP={cfg['SWEEP']!r}; allowed: 0 (every list ascending) or N > 0 tokens a block")
    grid = (S * triton.cdiv(H, BLOCK_H), 1, B)
    if S and B:
        with l2_prefetch_on_copies("_mla_token_ws_fwd", cfg["L2_PREFETCH"]):  # applied if this launch compiles
            _mla_token_ws_fwd[grid](
                *call.kernel_args(),
                DV=dv, DR=Dqk - dv, CAUSAL=causal, RETURN_LSE=return_lse, CONSUMER_REGS=cfg["CONSUMER_REGS"],
                EARLY_QK_L=cfg["EARLY_QK_L"], LOCAL_P_REGS=cfg["LOCAL_P_REGS"], L2_HINTS=cfg["L2_HINTS"],
                L2_PREFETCH=cfg["L2_PREFETCH"], STEP_VIEWS=cfg["STEP_VIEWS"], SWEEP=cfg["SWEEP"], num_warps=4,
            )
    return call.result()
