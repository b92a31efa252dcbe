"""Brute-force InfLLMv2 selection, written from the definition of the official kernels (test oracle).

Independent of ``stem_boost.models.minicpm4.infllmv2``: explicit windows, the stage-1 causal
limit written as in ``apply_mask_stage1`` (C integer division), a dense per-row score, the
``max_pooling_1d_varlen`` window loop, and the official ``topk -> sort -> (> q_idx) = -1`` step
over *all* blocks of the sequence.
"""

from __future__ import annotations

import math

import torch


def _cdiv_trunc(a: int, b: int) -> int:
    return int(a / b)  # C semantics: truncation toward zero


def _windows(k: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """k [Hk, N, D] -> [Hk, n, D] means of complete windows."""
    out = []
    c = 0
    while c * stride + size <= k.shape[1]:
        out.append(k[:, c * stride : c * stride + size].double().mean(dim=1))
        c += 1
    if not out:
        return k.new_zeros(k.shape[0], 0, k.shape[2], dtype=torch.float64)
    return torch.stack(out, dim=1)


def naive_infllmv2(q: torch.Tensor, k: torch.Tensor, sc: dict, *, decode: bool = False):
    """Selection of the official MiniCPM-4.1 code for one sequence.

    Args:
        q: [Hq, Lq, D] queries (Lq == N for a prefill, 1 for a decode step of the last token).
        k: [Hk, N, D] all keys.
        sc: sparse_config dict.
    Returns:
        (sets, pooled): ``sets[h][r]`` = set of selected blocks of row r of KV head h;
        ``pooled[h][r]`` = the pooled (un-forced) block scores, a float64 tensor of n_blocks.
    """
    ks, st = sc["kernel_size"], sc["kernel_stride"]
    bs, init, win, topk = sc["block_size"], sc["init_blocks"], sc["window_size"], sc["topk"]
    local = win // bs
    Hq, Lq, D = q.shape
    Hk, N = k.shape[0], k.shape[1]
    G = Hq // Hk
    cache_len = N - Lq
    k1 = _windows(k, ks, st)  # fine
    k2 = _windows(k, ks * 4, st * 4)  # coarse
    K1, K2 = k1.shape[1], k2.shape[1]
    n_blocks = math.ceil((Lq + cache_len) / bs)
    pool = bs // st
    k_sel = min(topk + local, n_blocks)
    scale = 1.0 / math.sqrt(D)

    def limit(r: int, stride: int, Kc: int) -> int:
        if decode:
            return Kc  # non-causal stage 1 in the decode call
        right = max(0, (r + 1) // stride - 1 + Kc - _cdiv_trunc(Lq - stride + 1, stride))
        return min(Kc, right)

    sets = [[None] * Lq for _ in range(Hk)]
    pooled_all = [[None] * Lq for _ in range(Hk)]
    for h in range(Hk):
        for r in range(Lq):
            v1, v2 = limit(r, st, K1), limit(r, st * 4, K2)
            score = torch.zeros(K1, dtype=torch.float64)
            for g in range(G):
                qh = q[h * G + g, r].double()
                if v2 == 0:
                    continue
                lse = torch.logsumexp((k2[h, :v2] @ qh) * scale, dim=0)
                for c in range(v1):
                    score[c] += torch.exp((k1[h, c] @ qh) * scale - lse)
            q_blk = (r + cache_len) // bs
            pooled = torch.full((n_blocks,), float("-inf"), dtype=torch.float64)
            final = torch.empty(n_blocks, dtype=torch.float64)
            for b in range(n_blocks):
                lo, hi = max(b * pool - 1, 0), min(b * pool + pool, K1)
                if hi > lo:
                    pooled[b] = score[lo:hi].max()
                forced = b < init or (q_blk >= b and q_blk <= b + local)
                final[b] = float("inf") if forced else pooled[b]
            idx = torch.topk(final, k_sel).indices.sort().values
            sets[h][r] = {int(b) for b in idx if int(b) <= q_blk}
            pooled_all[h][r] = pooled
    return sets, pooled_all
