"""PyTorch reference for selection-driven sparse attention: gather + fp32 softmax.

It is the oracle of every executor of `sparse_attention` (same arguments, same semantics; see
`stem_boost.kernels.dispatch` for the contract):

    q    [B, S, Hq, Dqk]      k [B, T, Hkv, Dqk]      v [B, T, Hkv, Dv]        Hq = G * Hkv
    selection                 `stem_boost.selection.Selection` (idx [B, Hsel, R, Kmax], counts, units)
    out  [B, S, Hq, Dv]       lse [B, Hq, S] (natural log, fp32, -inf for rows that attend to nothing)

Query position s (0-based in q) sits at key position `selection.q_offset + s` (default T - S: the
queries are the last S positions, as with a KV cache) and attends to the units of row
`s // query_block`; with `causal=True` only keys at positions <= its own are used.
"""

from __future__ import annotations

import math

import torch

from ..selection import Selection


def _key_positions(idx: torch.Tensor, counts: torch.Tensor, block_size: int, seq_k: int):
    """Expand unit indices to key positions.

    idx [B, Hsel, R, Kmax], counts [B, Hsel, R] -> pos [B, Hsel, R, Kmax * block_size] (long, clamped
    to a valid position where invalid) and valid [same] bool.
    """
    kmax = idx.shape[-1]
    slot = torch.arange(kmax, device=idx.device)
    valid_unit = (slot < counts.unsqueeze(-1).long()) & (idx >= 0)
    offs = torch.arange(block_size, device=idx.device)
    pos = idx.long().unsqueeze(-1) * block_size + offs  # [B, Hsel, R, Kmax, bs]
    valid = valid_unit.unsqueeze(-1) & (pos < seq_k)
    pos = torch.where(valid, pos, torch.zeros_like(pos))
    return pos.flatten(-2), valid.flatten(-2)


def sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: Selection,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    return_lse: bool = False,
    sinks: torch.Tensor | None = None,
    chunk_size: int = 256,
):
    """Gather the selected keys of every query row and run an fp32 softmax over them.

    Memory is bounded by processing `chunk_size` query positions at a time:
    O(B * Hq * chunk * Kmax * block_size) floats per chunk, never an S x T mask.
    Returns `out` [B, S, Hq, Dv] in q's dtype, and `lse` [B, Hq, S] fp32 when `return_lse`.
    """
    B, S, Hq, Dqk = q.shape
    T, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    idx, counts = selection.idx, selection.counts
    block_size, query_block = selection.block_size, selection.query_block
    Hsel = idx.shape[1]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(Dqk)
    offset = selection.offset_for(S, T)

    acc_dtype = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 when given fp64 (tests)
    kt = k.permute(0, 2, 1, 3).to(acc_dtype)  # [B, Hkv, T, Dqk]
    vt = v.permute(0, 2, 1, 3).to(acc_dtype)  # [B, Hkv, T, Dv]
    out = torch.empty(B, S, Hq, Dv, dtype=q.dtype, device=q.device)
    lse_all = torch.empty(B, Hq, S, dtype=acc_dtype, device=q.device)

    for s0 in range(0, S, chunk_size):
        s1 = min(S, s0 + chunk_size)
        rows = torch.arange(s0, s1, device=q.device) // query_block  # [C]
        pos, valid = _key_positions(idx[:, :, rows], counts[:, :, rows], block_size, T)  # [B, Hsel, C, N]
        if causal:
            qpos = (torch.arange(s0, s1, device=q.device) + offset).view(1, 1, -1, 1)
            valid = valid & (pos <= qpos)
        pos = pos.expand(B, Hkv, -1, -1) if Hsel == 1 else pos
        valid = valid.expand(B, Hkv, -1, -1) if Hsel == 1 else valid
        C, N = pos.shape[2], pos.shape[3]
        flat = pos.reshape(B, Hkv, C * N, 1)
        k_sel = kt.gather(2, flat.expand(-1, -1, -1, Dqk)).view(B, Hkv, C, N, Dqk)
        v_sel = vt.gather(2, flat.expand(-1, -1, -1, Dv)).view(B, Hkv, C, N, Dv)

        qc = q[:, s0:s1].to(acc_dtype).view(B, C, Hkv, G, Dqk).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, C, D]
        scores = torch.einsum("bkgcd,bkcnd->bkgcn", qc, k_sel) * scale
        scores = scores.masked_fill(~valid.unsqueeze(2), float("-inf"))
        if sinks is not None:
            sink = sinks.to(acc_dtype).view(1, Hkv, G, 1, 1).expand(B, -1, -1, C, 1)
            lse = torch.logsumexp(torch.cat([scores, sink], dim=-1), dim=-1)  # [B, Hkv, G, C]
        else:
            lse = torch.logsumexp(scores, dim=-1)
        safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        p = torch.exp(scores - safe.unsqueeze(-1))  # masked -> 0; empty rows -> all 0
        o = torch.einsum("bkgcn,bkcnd->bkgcd", p, v_sel)  # [B, Hkv, G, C, Dv]
        out[:, s0:s1] = o.permute(0, 3, 1, 2, 4).reshape(B, C, Hq, Dv).to(q.dtype)
        lse_all[:, :, s0:s1] = lse.reshape(B, Hq, C)
    return (out, lse_all) if return_lse else out
