"""The fused InfLLMv2 stage-1 kernel against the PyTorch definition (Triton interpreter on CPU)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from stem_boost.kernels import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")


@pytest.mark.parametrize("B,Hk,G,C,K1,K2,D", [(1, 2, 2, 20, 37, 9, 16), (2, 1, 4, 33, 70, 17, 32)])
def test_fused_stage1_matches_definition(B, Hk, G, C, K1, K2, D):
    from stem_boost.kernels.infllmv2_scores import fused_stage1_scores
    from stem_boost.models.minicpm4.infllmv2 import _group_compressed_scores

    device = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(B, Hk * G, C, D, device=device)
    k1 = torch.randn(B, Hk, K1, D, device=device)
    k2 = torch.randn(B, Hk, K2, D, device=device)
    vis1 = torch.randint(0, K1 + 1, (C,), device=device).sort().values
    vis2 = torch.randint(0, K2 + 1, (C,), device=device).sort().values
    vis2[: C // 4] = 0  # rows that see no coarse key score 0
    scale = D ** -0.5
    ref = _group_compressed_scores(q.double().view(B, Hk, G, C, D), k1.double(), k2.double(), vis1, vis2, scale)
    out = fused_stage1_scores(q, k1, k2, vis1, vis2, scale, block_s=16, block_c=16, block_n=16)
    assert out.shape == ref.shape
    assert torch.all(out[..., : C // 4, :] == 0)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-4
