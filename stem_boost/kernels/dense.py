"""Dense causal attention (PyTorch SDPA), the baseline that sparse attention is measured against
and the path of sequences too short to be sparse."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                           key_padding: torch.Tensor | None = None) -> torch.Tensor:
    """Every causally valid key, the queries being the last S of the T keys.

    q [B, Hq, S, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv] (Hq a multiple of Hkv) -> [B, Hq, S, Dv].
    key_padding [B, T] bool (True = real token): padding keys are masked; a padding query keeps its
    own key so that no row is empty (its output is not used).
    """
    S, T = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if key_padding is None and S == T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    q_pos = torch.arange(T - S, T, device=q.device)
    mask = torch.arange(T, device=q.device) <= q_pos[:, None]  # [S, T]
    if key_padding is not None:
        own = torch.arange(T, device=q.device) == q_pos[:, None]
        mask = (mask & key_padding[:, None, -T:].bool()) | own  # [B, S, T]
        mask = mask[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
