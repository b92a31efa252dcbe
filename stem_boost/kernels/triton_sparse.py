"""Triton forward kernel for selection-driven sparse attention (token lists and block lists).

Program roles (one program = one tile of M = BLOCK_T x BLOCK_H query rows):
  axis 0: a tile of BLOCK_T consecutive query positions; all of them share one selection row
          (BLOCK_T divides `query_block`), so the program has one uniform loop over that row.
  axis 1: (batch, kv head, chunk of BLOCK_H of the G query heads that share the kv head).
Rows are ordered (token, head) so that the G heads of a GQA group, which share a selection, fill the
M dimension of the tensor-core tile together (MLA absorbed: 64 heads x 1 token).

Inner loop: BLOCK_N keys at a time: UNITS = BLOCK_N / BLOCK_SIZE selection entries gathered by
index (token lists, or several blocks per step), or a contiguous slice of one selected key block
when blocks are longer than BLOCK_N (SUB steps per block). The head dim is split in two power-of-two
parts (D1 + D2, e.g. 576 = 512 + 64, 192 = 128 + 64) so no FLOP is wasted on padding. When V is the
first Dv channels of K (MLA absorbed form) the K tile is reused as the V tile (V_FROM_K).
Online softmax in base 2, fp32 accumulation, outputs in the input dtype, lse in natural log.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .online_softmax import online_softmax_step, store_rows


@triton.jit
def sparse_attn_fwd(
    Q, K, V, IDX, CNT, O, LSE, SINKS,
    qk_scale_log2, S, T, q_offset, G,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ib, stride_ih, stride_ir,
    stride_cb, stride_ch,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    N_HEAD_CHUNKS, HKV,
    HSEL_SHARED: tl.constexpr, MASK_ONLY_WHERE_NEEDED: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, QUERY_BLOCK: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    D1: tl.constexpr, D2: tl.constexpr, D2P: tl.constexpr,
    DV: tl.constexpr, DVP: tl.constexpr,
    GATHER: tl.constexpr, UNITS: tl.constexpr, SUB: tl.constexpr, V_FROM_K: tl.constexpr, CAUSAL: tl.constexpr, RETURN_LSE: tl.constexpr, HAS_SINKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_T * BLOCK_H
    # heaviest tiles (last query positions: the most causal keys) are scheduled first
    pid_t = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    hc = pid_bh % N_HEAD_CHUNKS
    kvh = (pid_bh // N_HEAD_CHUNKS) % HKV
    b = pid_bh // (N_HEAD_CHUNKS * HKV)

    t0 = pid_t * BLOCK_T
    offs_m = tl.arange(0, BLOCK_M)
    tok = t0 + offs_m // BLOCK_H  # query position (index into q) of each row
    head_in_group = hc * BLOCK_H + offs_m % BLOCK_H
    head = kvh * G + head_in_group
    row_ok = (tok < S) & (head_in_group < G)
    qpos = tok + q_offset  # absolute position for causality

    # ---- load the Q tile [BLOCK_M, D1] (+ tail [BLOCK_M, D2P])
    d1 = tl.arange(0, D1)
    q_row = Q + b.to(tl.int64) * stride_qb + tok.to(tl.int64) * stride_qs + head * stride_qh
    q1 = tl.load(q_row[:, None] + d1[None, :], mask=row_ok[:, None], other=0.0)
    if D2 > 0:
        d2 = tl.arange(0, D2P)
        q2 = tl.load(q_row[:, None] + D1 + d2[None, :], mask=row_ok[:, None] & (d2[None, :] < D2), other=0.0)

    # ---- this tile's selection row
    if HSEL_SHARED:
        sel_h = 0
    else:
        sel_h = kvh
    row = t0 // QUERY_BLOCK
    idx_row = IDX + b.to(tl.int64) * stride_ib + sel_h * stride_ih + row.to(tl.int64) * stride_ir
    count = tl.load(CNT + b * stride_cb + sel_h * stride_ch + row)

    k_base = K + b.to(tl.int64) * stride_kb + kvh * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kvh * stride_vh
    dv = tl.arange(0, DVP)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DVP], tl.float32)

    # GATHER: UNITS selection entries per step, keys gathered by index (token lists, or several
    # small blocks); otherwise SUB >= 1 contiguous steps per selected block (scalar block index).
    if GATHER:
        n_iter = tl.cdiv(count, UNITS)
    else:
        n_iter = count * SUB
    offs_n = tl.arange(0, BLOCK_N)
    for it in range(0, n_iter):
        if GATHER:
            slot = it * UNITS + offs_n // BLOCK_SIZE
            kidx = tl.load(idx_row + slot, mask=slot < count, other=-1)
            kpos = kidx * BLOCK_SIZE + offs_n % BLOCK_SIZE
            k_ok = (kidx >= 0) & (kpos < T)
        else:
            blk = tl.load(idx_row + it // SUB)
            kpos = blk * BLOCK_SIZE + (it % SUB) * BLOCK_N + offs_n
            k_ok = (kpos < T) & (blk >= 0)
        kpos_safe = tl.where(k_ok, kpos, 0).to(tl.int64)
        k_row = k_base + kpos_safe * stride_kt
        k1 = tl.load(k_row[:, None] + d1[None, :], mask=k_ok[:, None], other=0.0)  # [BLOCK_N, D1]
        qk = tl.dot(q1, tl.trans(k1), input_precision=DOT_PRECISION)
        if D2 > 0:
            k2 = tl.load(k_row[:, None] + D1 + d2[None, :], mask=k_ok[:, None] & (d2[None, :] < D2), other=0.0)
            qk += tl.dot(q2, tl.trans(k2), input_precision=DOT_PRECISION)
        qk = qk * qk_scale_log2
        if BLOCK_SIZE > 1 and MASK_ONLY_WHERE_NEEDED:
            # Most block steps lie wholly before the tile's first query: skip the [M, N] mask there
            # and apply it where a key crosses the diagonal or is invalid (the causal mask also
            # covers keys past T, since every query is < T).
            if not GATHER:
                k_last = blk * BLOCK_SIZE + (it % SUB) * BLOCK_N + BLOCK_N - 1
                if CAUSAL:
                    crosses = k_last > t0 + q_offset
                else:
                    crosses = k_last >= T
            else:
                n_bad = tl.sum((k_ok == 0).to(tl.int32), 0)
                if CAUSAL:
                    crosses = (tl.max(tl.where(k_ok, kpos, -1), 0) > t0 + q_offset) | (n_bad > 0)
                else:
                    crosses = n_bad > 0
            if crosses:
                keep = k_ok[None, :]
                if CAUSAL:
                    keep = keep & (kpos[None, :] <= qpos[:, None])
                qk = tl.where(keep, qk, float("-inf"))
        else:
            keep = k_ok[None, :]
            if CAUSAL:
                keep = keep & (kpos[None, :] <= qpos[:, None])
            qk = tl.where(keep, qk, float("-inf"))

        p, alpha, m_new, l_i = online_softmax_step(qk, m_i, l_i)
        if V_FROM_K:
            v_t = k1
        else:
            v_row = v_base + kpos_safe * stride_vt
            v_t = tl.load(v_row[:, None] + dv[None, :], mask=k_ok[:, None] & (dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v_t.dtype), v_t, input_precision=DOT_PRECISION)
        m_i = m_new

    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    if HAS_SINKS:
        sink = tl.load(SINKS + head, mask=row_ok, other=float("-inf")).to(tl.float32) * 1.4426950408889634
        l_i += tl.math.exp2(sink - m_safe)
        # rows with no keys: m_i = -inf -> lse = sink, output 0
        m_safe = tl.where(m_i == float("-inf"), sink, m_safe)
        l_i = tl.where(m_i == float("-inf"), 1.0, l_i)
    store_rows(acc, m_safe, l_i, O + b.to(tl.int64) * stride_ob + tok.to(tl.int64) * stride_os + head * stride_oh,
               LSE + b * stride_lb + head * stride_lh + tok, row_ok, dv, DV, RETURN_LSE)
