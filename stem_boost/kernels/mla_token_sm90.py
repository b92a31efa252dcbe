"""Token-sparse absorbed-MLA attention for Hopper (sm_90), written in Gluon: the same contract as
`mla_token.py`, with the schedule written out instead of left to Triton's pipeliner.

    out = mla_token_attention_sm90(q, kv, idx, counts, q_offset=T - S, sm_scale=1 / sqrt(576))

    q [B, S, H, 576] bf16/fp16, kv [B, T, 576] (values = the first 512 channels), idx [B, S, Kmax]
    int32, counts [B, S] -> out [B, S, H, 512] (and lse [B, H, S] fp32, natural log).

Why a second kernel. Reading the Triton kernel's compiled schedule (`aot.compile_only(keep_asm=True)`)
shows two costs the Triton language cannot avoid on this shape:
  1. the gather of tile i + 1 is issued after the P V product of tile i, and waited at the top of
     step i + 1: it overlaps that product only, not Q K^T and the softmax;
  2. Q K^T ([64 heads, 64 keys]) is a chained dot, so Triton gives it all 8 warps along M: with 64
     rows both warpgroups compute the same product (twice the tensor work of Q K^T).
Here a program is one token x 64 heads, 8 warps = 2 warpgroups, and the schedule is explicit. The
default tile (SM90_TILES, measured on an H200: BENCHMARKS.md §00000) takes 128 selected keys a step
and gives each warpgroup its own 64 of them for S = Q K^T (64 x 64 each: Q, read from shared memory
by every wgmma, is read once per 64 keys per warpgroup, half of what 32-key products read); P goes
through shared memory, into the tile's rope columns (dead once Q K^T is done), and O += P V splits
the 512-wide value across the warpgroups (each 64 x 256, 128 fp32 registers a thread). Per step:
wait P V (i - 1); barrier; cp.async gather of tile i; wait; Q K^T; online softmax in base 2 (the
max crosses the warpgroups); P to shared memory; P V. Shared memory: Q 72 KB + the 128-key tile
144 KB, so the gather is not overlapped (333 TFLOP/s). The other tiles keep two 64-key buffers and
refill the free one before Q K^T (NUM_BUF = 2: 325 TFLOP/s with ROW_SUM_AT_END, the softmax sums
kept per element until the end), optionally with Q K^T queued behind the previous P V (EARLY_QK)
or S replicated in both warpgroups with P in registers (SPLIT_KEYS=False).

Program roles: axis 0 = (token, chunk of 64 heads), the head chunk fastest and late tokens first;
axis 2 = batch. Only for CUDA tensors on sm_90 (Gluon has no CPU interpreter); `mla_token.py` is the
portable path and the oracle for it on the GPU, `sparse_attention_reference` for both. Hopper's route
is now the warp-specialised `mla_token_ws.py` (373 against 333 TFLOP/s); this kernel stays as its
measured peer and as the one-partition form of the same products.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma, warpgroup_mma_init,
                                                              warpgroup_mma_wait)

from .gluon_shims import PUBLIC_REINTERPRET as _PUBLIC_REINTERPRET
from .gluon_shims import async_load as _async_load
from .gluon_shims import cta_barrier as _cta_barrier
from .mla_token import prepare_mla_token_call

__all__ = ["mla_token_attention_sm90", "SM90_TILES", "supports_sm90"]

BLOCK_H = 64
SM90_TILES = dict(BLOCK_N=128, NUM_BUF=1, SPLIT_KEYS=True, EARLY_QK=False, ROW_SUM_AT_END=False, P_IN_ROPE=True)


@gluon.jit
def _positions(idx_row, slot0, count, layout: gl.constexpr, BLOCK_N: gl.constexpr):
    """Key positions of slots slot0 .. slot0 + BLOCK_N - 1 in `layout` ([BLOCK_N] int32, -1 past count)."""
    slot = slot0 + gl.arange(0, BLOCK_N, layout=layout)
    return gl.load(idx_row + slot, mask=slot < count, other=-1)


@gluon.jit
def _issue_gather(kv_base, stride_kt, kpos_v, kpos_r, T, qpos, kv_buf, kr_buf,
                  v_layout: gl.constexpr, r_layout: gl.constexpr,
                  DV: gl.constexpr, DR: gl.constexpr, CAUSAL: gl.constexpr):
    """cp.async the latent rows at kpos into kv_buf [BLOCK_N, DV] and kr_buf [BLOCK_N, DR]; slots that
    are invalid read row 0 (a real row, masked in S), so the copies need no predicate."""
    ok_v = (kpos_v >= 0) & (kpos_v < T)
    ok_r = (kpos_r >= 0) & (kpos_r < T)
    if CAUSAL:
        ok_v = ok_v & (kpos_v <= qpos)
        ok_r = ok_r & (kpos_r <= qpos)
    row_v = kv_base + gl.where(ok_v, kpos_v, 0).to(gl.int64) * stride_kt
    row_r = kv_base + gl.where(ok_r, kpos_r, 0).to(gl.int64) * stride_kt
    d_v = gl.arange(0, DV, layout=gl.SliceLayout(0, v_layout))
    d_r = gl.arange(0, DR, layout=gl.SliceLayout(0, r_layout))
    _async_load(kv_buf, row_v[:, None] + d_v[None, :])
    _async_load(kr_buf, row_r[:, None] + (DV + d_r)[None, :])


@gluon.jit
def _mla_token_sm90_fwd(
    Q, KV, IDX, CNT, O, LSE,
    qk_scale_log2, S, T, q_offset, H,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_kt,
    stride_ib, stride_ir, stride_cb,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr, DV: gl.constexpr, DR: gl.constexpr,
    CAUSAL: gl.constexpr, RETURN_LSE: gl.constexpr, SPLIT_KEYS: gl.constexpr, NUM_BUF: gl.constexpr,
    EARLY_QK: gl.constexpr, ROW_SUM_AT_END: gl.constexpr, P_IN_ROPE: gl.constexpr,
    PUBLIC_REINTERPRET: gl.constexpr,
):
    gl.static_assert(gl.num_warps() == 8, "two warpgroups")
    dtype: gl.constexpr = Q.dtype.element_ty
    # ---- layouts: gathers (16-byte cp.async per thread, a warp per row), the two products, shared tiles
    v_layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [8, 1], [1, 0])  # [*, 512]: a warp reads 512 B of a row
    r_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [8, 1], [1, 0])  # [*, 64]
    if SPLIT_KEYS:  # S [64 heads, BLOCK_N keys]: warpgroup g takes the keys of its half
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                           instr_shape=[16, BLOCK_N // 2, 16])
    else:  # each warpgroup the whole S (the Triton kernel's choice)
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, 256, 16])
    qv_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, DV], dtype)
    qr_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, DR], dtype)
    kv_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, DV], dtype)
    kr_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, DR], dtype)
    p_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, BLOCK_N], dtype)
    rows_v: gl.constexpr = gl.SliceLayout(1, v_layout)
    rows_r: gl.constexpr = gl.SliceLayout(1, r_layout)
    cols_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    # ---- program -> (batch, token, head chunk); a token's head chunks side by side, late tokens first
    n_h = gl.cdiv(H, BLOCK_H)
    s = S - 1 - gl.program_id(0) // n_h
    h0 = (gl.program_id(0) % n_h) * BLOCK_H
    b = gl.program_id(2)
    qpos = s + q_offset

    # ---- Q tile into shared memory: latent part [BLOCK_H, DV] and rope part [BLOCK_H, DR]
    q_row = Q + b.to(gl.int64) * stride_qb + s.to(gl.int64) * stride_qs
    hv = h0 + gl.arange(0, BLOCK_H, layout=rows_v)
    hr = h0 + gl.arange(0, BLOCK_H, layout=rows_r)
    d_v = gl.arange(0, DV, layout=gl.SliceLayout(0, v_layout))
    d_r = gl.arange(0, DR, layout=gl.SliceLayout(0, r_layout))
    q_v = gl.load(q_row + hv[:, None] * stride_qh + d_v[None, :], mask=(hv < H)[:, None], other=0.0)
    q_r = gl.load(q_row + hr[:, None] * stride_qh + (DV + d_r)[None, :], mask=(hr < H)[:, None], other=0.0)
    qv_smem = gl.allocate_shared_memory(dtype, [BLOCK_H, DV], qv_smem_layout, q_v)
    qr_smem = gl.allocate_shared_memory(dtype, [BLOCK_H, DR], qr_smem_layout, q_r)
    kv_smem = gl.allocate_shared_memory(dtype, [NUM_BUF, BLOCK_N, DV], kv_smem_layout)
    kr_smem = gl.allocate_shared_memory(dtype, [NUM_BUF, BLOCK_N, DR], kr_smem_layout)
    gl.static_assert(NUM_BUF > 1 or not EARLY_QK, "Q K^T ahead of the refill needs a second buffer")
    gl.static_assert(not P_IN_ROPE or (SPLIT_KEYS and BLOCK_N * DR == BLOCK_H * BLOCK_N),
                     "P [BLOCK_H, BLOCK_N] fits the rope columns [BLOCK_N, DR] when DR == BLOCK_H")
    if SPLIT_KEYS and not P_IN_ROPE:
        p_smem = gl.allocate_shared_memory(dtype, [BLOCK_H, BLOCK_N], p_smem_layout)

    idx_row = IDX + b.to(gl.int64) * stride_ib + s.to(gl.int64) * stride_ir
    count = gl.load(CNT + b * stride_cb + s)
    kv_base = KV + b.to(gl.int64) * stride_kb
    n_tiles = gl.cdiv(count, BLOCK_N)

    m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, layout=rows_s)
    l_i = gl.zeros([BLOCK_H], gl.float32, layout=rows_s)
    acc = warpgroup_mma_init(gl.zeros([BLOCK_H, DV], gl.float32, layout=o_layout))  # the loop carries it in flight
    s_zero = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, layout=s_layout)
    l_part = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, layout=s_layout)

    # prologue: tiles 0 .. NUM_BUF - 2 in flight, the positions of tile NUM_BUF - 1 in registers
    for j in gl.static_range(NUM_BUF - 1):
        _issue_gather(kv_base, stride_kt, _positions(idx_row, j * BLOCK_N, count, rows_v, BLOCK_N),
                      _positions(idx_row, j * BLOCK_N, count, rows_r, BLOCK_N), T, qpos,
                      kv_smem.index(j), kr_smem.index(j), v_layout, r_layout, DV, DR, CAUSAL)
        cp.commit_group()
    next_v = _positions(idx_row, (NUM_BUF - 1) * BLOCK_N, count, rows_v, BLOCK_N)
    next_r = _positions(idx_row, (NUM_BUF - 1) * BLOCK_N, count, rows_r, BLOCK_N)
    kpos_s = _positions(idx_row, 0, count, cols_s, BLOCK_N)
    for i in range(n_tiles):
        buf = i % NUM_BUF
        free = (i + NUM_BUF - 1) % NUM_BUF  # the buffer of tile i - 1, refilled with tile i + NUM_BUF - 1
        k_v = kv_smem.index(buf)
        k_r = kr_smem.index(buf)
        if EARLY_QK:
            # Q K^T of tile i queued behind P V of tile i - 1 (the tensor cores never wait for the refill)
            cp.wait_group(NUM_BUF - 2)  # tile i has landed (this thread's copies) ...
            fence_async_shared()
            _cta_barrier()  # ... and every thread's
            qk = warpgroup_mma(qv_smem, k_v.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            qk = warpgroup_mma(qr_smem, k_r.permute((1, 0)), qk, is_async=True)
            acc = warpgroup_mma_wait(2, deps=(acc,))  # P V (i - 1) done: its buffer and P are free
            _cta_barrier()
            _issue_gather(kv_base, stride_kt, next_v, next_r, T, qpos, kv_smem.index(free), kr_smem.index(free),
                          v_layout, r_layout, DV, DR, CAUSAL)
            cp.commit_group()
        else:
            acc = warpgroup_mma_wait(0, deps=(acc,))
            if NUM_BUF == 1:
                # one buffer: P V (i - 1) done in every thread, then tile i is gathered and waited for
                _cta_barrier()
                _issue_gather(kv_base, stride_kt, next_v, next_r, T, qpos, k_v, k_r, v_layout, r_layout, DV, DR,
                              CAUSAL)
                cp.commit_group()
                cp.wait_group(0)
                fence_async_shared()
                _cta_barrier()
            else:
                # P V (i - 1) done and tile i landed, in every thread (one barrier); then the refill
                cp.wait_group(NUM_BUF - 2)
                fence_async_shared()
                _cta_barrier()
                _issue_gather(kv_base, stride_kt, next_v, next_r, T, qpos, kv_smem.index(free),
                              kr_smem.index(free), v_layout, r_layout, DV, DR, CAUSAL)
                cp.commit_group()
            qk = warpgroup_mma(qv_smem, k_v.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            qk = warpgroup_mma(qr_smem, k_r.permute((1, 0)), qk, is_async=True)
        # positions past count read row 0 and are never used
        next_v = _positions(idx_row, (i + NUM_BUF) * BLOCK_N, count, rows_v, BLOCK_N)
        next_r = _positions(idx_row, (i + NUM_BUF) * BLOCK_N, count, rows_r, BLOCK_N)
        kpos_next_s = _positions(idx_row, (i + 1) * BLOCK_N, count, cols_s, BLOCK_N)
        qk = warpgroup_mma_wait(0, deps=(qk,))

        k_ok = (kpos_s >= 0) & (kpos_s < T)
        if CAUSAL:
            k_ok = k_ok & (kpos_s <= qpos)
        qk = gl.where(k_ok[None, :], qk * qk_scale_log2, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(qk, axis=1))
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(qk - m_use[:, None])
        alpha = gl.exp2(m_i - m_use)
        if ROW_SUM_AT_END:  # per-element partial sums: no cross-warpgroup reduction in the loop
            l_part = l_part * alpha[:, None] + p
        else:
            l_i = l_i * alpha + gl.sum(p, axis=1)
        m_i = m_new
        acc = acc * gl.convert_layout(alpha, rows_o)[:, None]
        if SPLIT_KEYS:
            if P_IN_ROPE:  # P takes the rope columns of the key tile, read by Q K^T only: both Q K^T done
                if PUBLIC_REINTERPRET:
                    p_smem = k_r.reinterpret(dtype, [BLOCK_H, BLOCK_N], p_smem_layout)
                else:
                    p_smem = k_r._reinterpret(dtype, [BLOCK_H, BLOCK_N], p_smem_layout)
                _cta_barrier()
            p_smem.store(p.to(dtype))
            fence_async_shared()
            _cta_barrier()
            acc = warpgroup_mma(p_smem, k_v, acc, is_async=True)
        else:
            p_op = gl.convert_layout(p.to(dtype), gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2))
            acc = warpgroup_mma(p_op, k_v, acc, is_async=True)
        kpos_s = kpos_next_s
    acc = warpgroup_mma_wait(0, deps=(acc,))
    cp.wait_group(0)
    if ROW_SUM_AT_END:
        l_i = gl.sum(l_part, axis=1)

    # ---- epilogue: normalise, store out [BLOCK_H, DV] and the natural-log lse
    l_div = gl.where(l_i == 0.0, 1.0, l_i)
    out = acc / gl.convert_layout(l_div, rows_o)[:, None]
    ho = h0 + gl.arange(0, BLOCK_H, layout=rows_o)
    d_o = gl.arange(0, DV, layout=gl.SliceLayout(0, o_layout))
    o_row = O + b.to(gl.int64) * stride_ob + s.to(gl.int64) * stride_os
    gl.store(o_row + ho[:, None] * stride_oh + d_o[None, :], out.to(dtype), mask=(ho < H)[:, None])
    if RETURN_LSE:
        m_safe = gl.where(m_i == float("-inf"), 0.0, m_i)
        lse = (m_safe + gl.log2(l_div)) * 0.6931471805599453
        lse = gl.where(l_i == 0.0, float("-inf"), lse)
        hs = h0 + gl.arange(0, BLOCK_H, layout=rows_s)
        gl.store(LSE + b * stride_lb + hs * stride_lh + s, lse, mask=hs < H)


def supports_sm90(q: torch.Tensor, dv: int) -> bool:
    """True where this kernel runs: CUDA bf16 / fp16 on compute capability 9.x with the DeepSeek MLA widths."""
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] - dv == 64 and dv == 512
            and torch.cuda.get_device_capability(q.device)[0] == 9)


def mla_token_attention_sm90(
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
        raise ValueError(f"the sm_90 MLA kernel takes Dqk 576 / dv 512; got Dqk {q.shape[-1]}, dv {dv}")
    call = prepare_mla_token_call(q, kv, idx, counts, q_offset=q_offset, sm_scale=sm_scale, dv=dv,
                                  return_lse=return_lse)
    B, S, H, Dqk = call.q.shape
    cfg = dict(SM90_TILES)
    cfg.update(tiles or {})
    grid = (S * triton.cdiv(H, BLOCK_H), 1, B)
    if S and B:
        _mla_token_sm90_fwd[grid](
            *call.kernel_args(),
            BLOCK_H=BLOCK_H, BLOCK_N=cfg["BLOCK_N"], DV=dv, DR=Dqk - dv, CAUSAL=causal, RETURN_LSE=return_lse,
            SPLIT_KEYS=cfg["SPLIT_KEYS"], NUM_BUF=cfg["NUM_BUF"], EARLY_QK=cfg["EARLY_QK"],
            ROW_SUM_AT_END=cfg["ROW_SUM_AT_END"], P_IN_ROPE=cfg["P_IN_ROPE"],
            PUBLIC_REINTERPRET=_PUBLIC_REINTERPRET, num_warps=8,
        )
    return call.result()
