"""CPU executor of the sparse-attention contract: dense matmuls under a boolean mask built per chunk.

The gather of `sparse_attention_reference` (the kernel's oracle) copies Kmax * block_size key and
value vectors per query, which on a CPU costs far more than the arithmetic (72% of a SmolLM2 DSA
prefill at 1K tokens was `aten::gather`). This path computes q . k for all T keys of a chunk of
queries with one batched matmul and masks the unselected ones instead: O(C * T) scores per head and
chunk, never an S x T mask. Same contract and results as the reference (see
`stem_boost.kernels.dispatch` for shapes), except that an index listed twice in a row counts once
here (selections never repeat an index; the reference and the kernel would count it twice).
"""

from __future__ import annotations

import math

import torch

from ..selection import Selection


def selection_mask(idx: torch.Tensor, counts: torch.Tensor, block_size: int, seq_k: int) -> torch.Tensor:
    """Boolean key mask of selection rows.

    idx [B, Hsel, C, Kmax] (key units, -1 padded), counts [B, Hsel, C] -> mask [B, Hsel, C, seq_k]:
    True where the key's unit is among the row's first `counts` entries.
    """
    B, Hsel, C, kmax = idx.shape
    n_units = -(-seq_k // block_size)
    valid = (torch.arange(kmax, device=idx.device) < counts.unsqueeze(-1).long()) & (idx >= 0)
    units = torch.zeros(B, Hsel, C, n_units + 1, dtype=torch.bool, device=idx.device)
    slot = torch.where(valid, idx.long(), torch.full_like(idx, n_units, dtype=torch.long))  # invalid -> spare column
    units.scatter_(-1, slot, True)
    units = units[..., :n_units]
    if block_size == 1:
        return units
    return units.repeat_interleave(block_size, dim=-1)[..., :seq_k]


def sparse_attention_masked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: Selection,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    return_lse: bool = False,
    sinks: torch.Tensor | None = None,
    max_chunk_bytes: int = 256 * 2**20,
):
    """Masked-dense sparse attention (fp32 accumulation), query chunks sized so that one chunk's
    scores stay under `max_chunk_bytes`. Returns `out` [B, S, Hq, Dv] in q's dtype, and `lse`
    [B, Hq, S] fp32 when `return_lse` (-inf for rows that attend to nothing)."""
    B, S, Hq, Dqk = q.shape
    T, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    idx, counts = selection.idx, selection.counts
    block_size, query_block = selection.block_size, selection.query_block
    Hsel = idx.shape[1]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(Dqk)
    offset = selection.offset_for(S, T)
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    elem = torch.tensor([], dtype=acc_dtype).element_size()
    chunk = max(1, min(S, max_chunk_bytes // max(1, 2 * B * Hq * T * elem)))

    kt = k.permute(0, 2, 3, 1).to(acc_dtype).unsqueeze(2)  # [B, Hkv, 1, Dqk, T]
    vt = v.permute(0, 2, 1, 3).to(acc_dtype).unsqueeze(2)  # [B, Hkv, 1, T, Dv]
    out = torch.empty(B, S, Hq, Dv, dtype=q.dtype, device=q.device)
    lse_all = torch.empty(B, Hq, S, dtype=acc_dtype, device=q.device)
    keys = torch.arange(T, device=q.device)
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        rows = torch.arange(s0, s1, device=q.device) // query_block
        allowed = selection_mask(idx[:, :, rows], counts[:, :, rows], block_size, T)  # [B, Hsel, C, T]
        if causal:
            qpos = torch.arange(s0, s1, device=q.device) + offset
            allowed = allowed & (keys.view(1, -1) <= qpos.view(-1, 1))
        allowed = allowed.unsqueeze(2)  # [B, Hsel, 1, C, T], broadcast over G (and Hkv when Hsel == 1)
        C = s1 - s0
        if not return_lse and sinks is None:  # torch's fused CPU attention under the mask
            out[:, s0:s1] = _sdpa_chunk(q[:, s0:s1], k, v, allowed, scale).to(q.dtype)
            continue
        qc = q[:, s0:s1].to(acc_dtype).view(B, C, Hkv, G, Dqk).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, C, D]
        scores = torch.matmul(qc, kt) * scale  # [B, Hkv, G, C, T]
        scores = scores.masked_fill(~allowed, float("-inf"))
        if sinks is not None:
            sink = sinks.to(acc_dtype).view(1, Hkv, G, 1, 1).expand(B, -1, -1, C, 1)
            lse = torch.logsumexp(torch.cat([scores, sink], dim=-1), dim=-1)
        else:
            lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G, C]
        safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        p = torch.exp(scores - safe.unsqueeze(-1))
        o = torch.matmul(p, vt)  # [B, Hkv, G, C, Dv]
        out[:, s0:s1] = o.permute(0, 3, 1, 2, 4).reshape(B, C, Hq, Dv).to(q.dtype)
        lse_all[:, :, s0:s1] = lse.reshape(B, Hq, C)
    return (out, lse_all) if return_lse else out


def _sdpa_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, C, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv], allowed [B, Hsel, 1, C, T] -> [B, C, Hq, Dv].
    Rows that may attend to nothing give zeros (as the contract says), not SDPA's NaN."""
    B, C, Hq, _ = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    allowed = allowed.squeeze(2)  # [B, Hsel, C, T]
    empty = ~allowed.any(-1, keepdim=True)  # [B, Hsel, C, 1]
    if allowed.shape[1] > 1 and G > 1:  # one selection per kv head: repeat it for the group's heads
        allowed = allowed.repeat_interleave(G, dim=1)
        empty = empty.repeat_interleave(G, dim=1)
    dtype = torch.promote_types(q.dtype, torch.float32)
    bias = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).to(dtype), k.transpose(1, 2).to(dtype), v.transpose(1, 2).to(dtype), attn_mask=bias,
        scale=scale, enable_gqa=G > 1)  # [B, Hq, C, Dv]
    o = o.masked_fill(empty, 0.0)
    return o.transpose(1, 2)
