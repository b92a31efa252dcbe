"""Fused lightning-indexer scores (DSA): I[b, s, t] = sum_h w[b, s, h] * relu(scale * q[b, s, h] . k[b, t]).

The unfused computation writes the fp32 [B, S, H, T] per-head scores to memory and reads them back
for the weighted head sum: H times more traffic than the result. Here one program owns a
[BLOCK_S, BLOCK_T] tile of I and loops over the H heads, keeping the running sum in registers
(the product q_h k^T on tensor cores, relu and the weight in fp32), so only I is written.
Program roles: axis 0 = query tile, axis 1 = key tile, axis 2 = batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _index_scores_kernel(
    Q, K, W, OUT, scale, S, T, causal_offset,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_kt,
    stride_wb, stride_ws,
    stride_ob, stride_os,
    H: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, CAUSAL: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = tl.program_id(2)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, D)
    s_ok = offs_s < S
    t_ok = offs_t < T
    k = tl.load(K + b.to(tl.int64) * stride_kb + offs_t[:, None].to(tl.int64) * stride_kt + offs_d[None, :],
                mask=t_ok[:, None], other=0.0)
    q_base = Q + b.to(tl.int64) * stride_qb + offs_s[:, None].to(tl.int64) * stride_qs + offs_d[None, :]
    w_base = W + b.to(tl.int64) * stride_wb + offs_s.to(tl.int64) * stride_ws
    acc = tl.zeros([BLOCK_S, BLOCK_T], tl.float32)
    n_heads = H
    if CAUSAL:  # a tile wholly after the tile's last query needs no product: it is all -inf
        if pid_t * BLOCK_T > pid_s * BLOCK_S + BLOCK_S - 1 + causal_offset:
            n_heads = 0
    for h in range(n_heads):
        q = tl.load(q_base + h * stride_qh, mask=s_ok[:, None], other=0.0)
        w = tl.load(w_base + h, mask=s_ok, other=0.0)
        qk = tl.dot(q, tl.trans(k))
        acc += w[:, None] * tl.maximum(qk * scale, 0.0)
    if CAUSAL:
        acc = tl.where(offs_t[None, :] <= offs_s[:, None] + causal_offset, acc, float("-inf"))
    out = OUT + b.to(tl.int64) * stride_ob + offs_s[:, None].to(tl.int64) * stride_os + offs_t[None, :]
    tl.store(out, acc, mask=s_ok[:, None] & t_ok[None, :])


def fused_index_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, scale: float | None,
                       causal_offset: int | None = None, block_s: int = 64, block_t: int = 128) -> torch.Tensor:
    """q [B, S, H, D] (bf16/fp16), k [B, T, D], w [B, S, H] fp32 -> I [B, S, T] fp32.

    `scale=None` means the scale is already folded into w (scores relu(q.k) are then weighted).
    `causal_offset=o`: key t is visible to query s iff t <= s + o; others get -inf (and tiles
    wholly after the diagonal skip the products). None: no mask.
    """
    B, S, H, D = q.shape
    T = k.shape[1]
    if D & (D - 1) or D < 16:
        raise ValueError(f"index head dim {D} must be a power of two >= 16 for the fused kernel")
    k = k.to(q.dtype)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    w = w.float().contiguous()
    out = torch.empty(B, S, T, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(S, block_s), triton.cdiv(T, block_t), B)
    _index_scores_kernel[grid](
        q, k, w, out, 1.0 if scale is None else float(scale), S, T, 0 if causal_offset is None else int(causal_offset),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
        w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        H=H, D=D, BLOCK_S=block_s, BLOCK_T=block_t, CAUSAL=causal_offset is not None, num_warps=8 if block_s * block_t >= 8192 else 4,
    )
    return out
