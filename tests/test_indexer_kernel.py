"""The fused indexer-score kernel against the unfused PyTorch computation (Triton interpreter on CPU)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from stem_boost.kernels import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("B,S,T,H,D,scale", [(1, 37, 50, 3, 16, 0.25), (2, 20, 20, 4, 32, None)])
def test_fused_index_scores_match_unfused(B, S, T, H, D, scale, causal):
    from stem_boost.kernels.indexer_scores import fused_index_scores

    device = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(B, S, H, D, device=device)
    k = torch.randn(B, T, D, device=device)
    w = torch.randn(B, S, H, device=device)
    ref = torch.einsum("bsh,bsht->bst", w.double(),
                       torch.relu(torch.einsum("bshd,btd->bsht", q.double(), k.double()) * (scale or 1.0)))
    offset = T - S
    out = fused_index_scores(q, k, w, scale, causal_offset=offset if causal else None, block_s=16, block_t=16)
    if causal:
        visible = torch.arange(T, device=device)[None, :] <= torch.arange(S, device=device)[:, None] + offset
        assert torch.all(out[:, ~visible] == float("-inf"))
        out, ref = out[:, visible], ref[:, visible]
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-4
