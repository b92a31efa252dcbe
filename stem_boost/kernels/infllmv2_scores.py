"""Fused InfLLMv2 stage-1 scores (the compressed attention that ranks key blocks).

For a kv head with G query heads, query position s and fine compressed key c:
    score[s, c] = sum_g exp(q_g[s] . k1[c] * scale - lse_g[s])   for c < vis1[s], else 0
    lse_g[s]    = logsumexp_{c2 < vis2[s]} q_g[s] . k2[c2] * scale   (the coarse level)
(stem_boost.models.minicpm4.infllmv2._group_compressed_scores is the PyTorch definition.)
The PyTorch path writes fp32 [G, S, K] per-head logits several times; here kernel A computes lse
with an online logsumexp over coarse-key tiles, kernel B keeps the group sum in registers and
writes only [S, K1] per kv head. Program roles: axis 0 = query tile, axis 1 = key tile (B only),
axis 2 = batch x kv head.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _visible_lse(q, k_base, vis, lo, n_max, scale_log2, K2N, stride_kn, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online log-sum-exp (log2 units) of the rows q [M, D] over the coarse keys lo <= c < vis[row]
    of one (batch, kv head) (k_base: its key 0), BLOCK_N keys per step -> [M] fp32, -inf for a row
    that sees no key."""
    d = tl.arange(0, D)
    m_i = tl.full([q.shape[0]], float("-inf"), tl.float32)
    l_i = tl.zeros([q.shape[0]], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(0, n_max, BLOCK_N):
        cols = n0 + offs_n
        k = tl.load(k_base + cols[:, None].to(tl.int64) * stride_kn + d[None, :], mask=cols[:, None] < K2N, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        s = tl.where((cols[None, :] < vis[:, None]) & (cols[None, :] >= lo), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.math.exp2(m_i - m_safe) + tl.sum(tl.math.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    return tl.where(l_i > 0, m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))


@triton.jit
def _coarse_lse_rows(Q, K2, VIS2, LO, LSE, b, hk, head, q_head, tok, ok, scale_log2, K2N,
                     stride_qb, stride_qs, stride_kb, stride_kh, stride_kn, stride_lb, stride_lh,
                     D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LO: tl.constexpr):
    """The coarse lse of M query rows (tok [M]: positions in the chunk; head: their query heads,
    [M] or one; q_head: head's offset into Q, [M, 1] or one) over the coarse keys of (batch b, kv
    head hk) -> LSE[b, head, tok]."""
    d = tl.arange(0, D)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + q_head + tok[:, None].to(tl.int64) * stride_qs + d[None, :],
                mask=ok[:, None], other=0.0)
    vis = tl.load(VIS2 + tok, mask=ok, other=0)
    n_max = tl.max(vis, 0)
    if HAS_LO:  # left padding: coarse keys before LO[b] do not exist
        lo = tl.load(LO + b)
    else:
        lo = 0
    k_base = K2 + b.to(tl.int64) * stride_kb + hk * stride_kh
    lse = _visible_lse(q, k_base, vis, lo, n_max, scale_log2, K2N, stride_kn, D, BLOCK_N)
    tl.store(LSE + b.to(tl.int64) * stride_lb + head * stride_lh + tok, lse, mask=ok)


@triton.jit
def group_mass(acc, Q, LSE, k, b, hk, tok, ok, n_heads, scale_log2, stride_qb, stride_qh, stride_qs,
               stride_lb, stride_lh, G: tl.constexpr, D: tl.constexpr):
    """acc [M, N] + the stage-1 mass of keys k [N, D] summed over the first n_heads heads of kv head
    hk's group: sum_g exp2(q_g[tok] . k * scale_log2 - lse_g[tok]) (0 for rows whose lse is -inf)."""
    d = tl.arange(0, D)
    for g in range(n_heads):
        head = hk * G + g
        q = tl.load(Q + b.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
                    + tok[:, None].to(tl.int64) * stride_qs + d[None, :], mask=ok[:, None], other=0.0)
        lse = tl.load(LSE + b.to(tl.int64) * stride_lb + head * stride_lh + tok, mask=ok, other=float("-inf"))
        # a row that sees no coarse key (lse -inf) subtracts +inf: exp2(-inf) = 0 with no select a score
        lse_safe = tl.where(lse == float("-inf"), float("inf"), lse)
        acc += tl.math.exp2(tl.dot(q, tl.trans(k)) * scale_log2 - lse_safe[:, None])
    return acc


@triton.jit
def _coarse_lse_kernel(
    Q, K2, VIS2, LO, LSE, scale_log2, S, K2N,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_kn, stride_lb, stride_lh,
    HK, G: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LO: tl.constexpr,
):
    pid_s = tl.program_id(0)
    bh = tl.program_id(2)
    b = bh // HK
    hk = bh % HK
    offs_m = tl.arange(0, BLOCK_S * G)
    tok = pid_s * BLOCK_S + offs_m // G
    head = hk * G + offs_m % G
    ok = tok < S
    _coarse_lse_rows(Q, K2, VIS2, LO, LSE, b, hk, head, head[:, None].to(tl.int64) * stride_qh, tok, ok, scale_log2,
                     K2N, stride_qb, stride_qs, stride_kb, stride_kh, stride_kn, stride_lb, stride_lh, D, BLOCK_N, HAS_LO)


@triton.jit
def _coarse_lse_head_kernel(
    Q, K2, VIS2, LO, LSE, scale_log2, S, K2N,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_kn, stride_lb, stride_lh,
    HK, G, D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LO: tl.constexpr,
):
    """`_coarse_lse_kernel` for any group size: axis 0 = query tile, axis 1 = one query head of the
    group, axis 2 = batch x kv head (M = BLOCK_S rows of one head)."""
    pid_s = tl.program_id(0)
    g = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // HK
    hk = bh % HK
    tok = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    head = hk * G + g
    ok = tok < S
    _coarse_lse_rows(Q, K2, VIS2, LO, LSE, b, hk, head, head.to(tl.int64) * stride_qh, tok, ok, scale_log2,
                     K2N, stride_qb, stride_qs, stride_kb, stride_kh, stride_kn, stride_lb, stride_lh, D, BLOCK_N, HAS_LO)


@triton.jit
def _fine_scores_kernel(
    Q, K1, VIS1, LSE, OUT, scale_log2, S, K1N,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_kn, stride_lb, stride_lh,
    stride_ob, stride_oh, stride_os,
    HK, G: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // HK
    hk = bh % HK
    tok = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = tok < S
    d = tl.arange(0, D)
    vis = tl.load(VIS1 + tok, mask=ok, other=0)
    acc = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    n_heads = G
    if pid_c * BLOCK_C >= tl.max(vis, 0):  # no row of the tile sees these keys: all zeros
        n_heads = 0
    if n_heads > 0:
        k = tl.load(K1 + b.to(tl.int64) * stride_kb + hk * stride_kh + cols[:, None].to(tl.int64) * stride_kn
                    + d[None, :], mask=cols[:, None] < K1N, other=0.0)
        acc = group_mass(acc, Q, LSE, k, b, hk, tok, ok, n_heads, scale_log2, stride_qb, stride_qh, stride_qs,
                         stride_lb, stride_lh, G, D)
    acc = tl.where(cols[None, :] < vis[:, None], acc, 0.0)
    tl.store(OUT + b.to(tl.int64) * stride_ob + hk.to(tl.int64) * stride_oh + tok[:, None].to(tl.int64) * stride_os
             + cols[None, :], acc, mask=ok[:, None] & (cols[None, :] < K1N))


def fused_stage1_scores(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, vis1: torch.Tensor,
                        vis2: torch.Tensor, scale: float, *, block_s: int = 64, block_c: int = 64,
                        block_n: int = 64) -> torch.Tensor:
    """q [B, Hq, C, D] (bf16/fp16, HF layout), k1 [B, Hk, K1, D], k2 [B, Hk, K2, D], vis1/vis2 [C]
    -> [B, Hk, C, K1] fp32 group-summed stage-1 scores (0 where invisible)."""
    B, Hq, C, D = q.shape
    Hk, K1, K2 = k1.shape[1], k1.shape[2], k2.shape[2]
    G = Hq // Hk
    if D & (D - 1) or D < 16:
        raise ValueError(f"head dim {D} must be a power of two >= 16 for the fused stage-1 kernel")
    if G & (G - 1):
        raise ValueError(f"query heads per kv head ({G}) must be a power of two for the fused stage-1 kernel")
    k1 = k1.to(q.dtype).contiguous()
    k2 = k2.to(q.dtype).contiguous()
    vis1 = vis1.to(torch.int32).contiguous()
    vis2 = vis2.to(torch.int32).contiguous()
    lse = torch.empty(B, Hq, C, dtype=torch.float32, device=q.device)
    scale_log2 = float(scale) * LOG2E
    bs_a = max(1, 128 // G)
    _coarse_lse_kernel[(triton.cdiv(C, bs_a), 1, B * Hk)](
        q, k2, vis2, vis2, lse, scale_log2, C, K2,
        q.stride(0), q.stride(1), q.stride(2), k2.stride(0), k2.stride(1), k2.stride(2), lse.stride(0), lse.stride(1),
        Hk, G=G, D=D, BLOCK_S=bs_a, BLOCK_N=block_n, HAS_LO=False, num_warps=8 if bs_a * G >= 128 else 4,
    )
    out = torch.empty(B, Hk, C, K1, dtype=torch.float32, device=q.device)
    bs_b = max(16, block_s)
    _fine_scores_kernel[(triton.cdiv(C, bs_b), triton.cdiv(K1, block_c), B * Hk)](
        q, k1, vis1, lse, out, scale_log2, C, K1,
        q.stride(0), q.stride(1), q.stride(2), k1.stride(0), k1.stride(1), k1.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        Hk, G=G, D=D, BLOCK_S=bs_b, BLOCK_C=block_c, num_warps=4,
    )
    return out


COARSE_LSE_STAGES = 2  # pipeline stages of the folded-group coarse lse (see `coarse_lse`)


def coarse_lse(q: torch.Tensor, k2: torch.Tensor, vis2: torch.Tensor, scale: float, *,
               lo2: torch.Tensor | None = None, block_n: int = 64, rows: int = 128, num_warps: int | None = None,
               num_stages: int | None = None) -> torch.Tensor:
    """The coarse level of stage 1 alone: lse [B, Hq, C] fp32 in log2 units (-inf for rows that see
    no coarse key) of ``q_g[s] . k2[c2] * scale`` over ``lo2[b] <= c2 < vis2[s]``.

    q [B, Hq, C, D] (HF layout), k2 [B, Hk, K2, D] in q's dtype, vis2 [C] int32, lo2 optional [B]
    int32 first existing coarse key (left padding). D a power of two; any group size (a group of
    a power of two runs with the group's heads folded into the tile rows: `rows` (token, head) rows
    a program, a power of two; other groups one head a program, 64 tokens). `block_n` coarse keys a
    step, `num_warps` (None: 8 from 128 rows, else 4) and `num_stages` (None: 2 for a folded group,
    Triton's default for one head a program) are the tile's other knobs (`scripts/bench_infllmv2.py
    --parts pooled` times them: on an H200 two stages took 0.93x / 0.97x of three's time at 32K / 128K
    keys, MiniCPM-4.1's group of 16, 16384 rows; 64 KB of shared memory instead of 80, 24 warps an SM)."""
    B, Hq, C, D = q.shape
    Hk, K2 = k2.shape[1], k2.shape[2]
    G = Hq // Hk
    if D & (D - 1) or D < 16:
        raise ValueError(f"head dim {D} must be a power of two >= 16")
    if rows < 16 or rows & (rows - 1):
        raise ValueError(f"rows={rows}: a power of two >= 16")
    k2 = k2.to(q.dtype).contiguous()
    vis2 = vis2.to(torch.int32).contiguous()
    lse = torch.empty(B, Hq, C, dtype=torch.float32, device=q.device)
    stages = {} if num_stages is None else dict(num_stages=num_stages)
    if G & (G - 1):
        _coarse_lse_head_kernel[(triton.cdiv(C, 64), G, B * Hk)](
            q, k2, vis2, lo2 if lo2 is not None else vis2, lse, float(scale) * LOG2E, C, K2,
            q.stride(0), q.stride(1), q.stride(2), k2.stride(0), k2.stride(1), k2.stride(2),
            lse.stride(0), lse.stride(1),
            Hk, G, D=D, BLOCK_S=64, BLOCK_N=block_n, HAS_LO=lo2 is not None, num_warps=num_warps or 4, **stages,
        )
        return lse
    bs_a = max(1, rows // G)
    _coarse_lse_kernel[(triton.cdiv(C, bs_a), 1, B * Hk)](
        q, k2, vis2, lo2 if lo2 is not None else vis2, lse, float(scale) * LOG2E, C, K2,
        q.stride(0), q.stride(1), q.stride(2), k2.stride(0), k2.stride(1), k2.stride(2), lse.stride(0), lse.stride(1),
        Hk, G=G, D=D, BLOCK_S=bs_a, BLOCK_N=block_n, HAS_LO=lo2 is not None,
        num_warps=num_warps or (8 if bs_a * G >= 128 else 4), num_stages=num_stages or COARSE_LSE_STAGES,
    )
    return lse
