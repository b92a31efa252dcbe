"""GPU checks of the sparse-attention kernel at real head counts (run on the device: pytest -m gpu)."""

from __future__ import annotations

import pytest
import torch

from stem_boost.kernels import sparse_attention, sparse_attention_reference
from stem_boost.selection import Selection
from tests.kernel_inputs import random_qkv, random_selection

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def rel_err(a, b):
    """||a - b|| / ||b||; the absolute error where b is all zeros (every row of a small random
    selection can be empty: about one seed in 200 for the 100-token case)."""
    diff, norm = (a.double() - b.double()).norm(), b.double().norm()
    return float(diff / norm) if norm > 0 else float(diff)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize(
    "B,S,Hq,Hkv,Dqk,Dv,bs,qb,hsel,mla",
    [
        (1, 300, 32, 2, 128, 128, 64, 64, 2, False),   # MiniCPM4 block mode
        (2, 200, 16, 2, 128, 128, 64, 1, 2, False),    # block lists, per-token rows
        (1, 150, 128, 1, 576, 512, 1, 1, 1, True),     # DeepSeek-V3.2 absorbed MLA
        (1, 130, 16, 16, 192, 128, 1, 1, 1, False),    # expanded MLA, one selection for all heads
        (1, 100, 9, 3, 64, 64, 64, 64, 3, False),      # SmolLM2 (G = 3, padded head rows)
        (1, 333, 24, 4, 128, 128, 64, 64, 4, False),   # G = 6: flat tiles of 128 (token, head) rows
    ],
)
def test_gpu_kernel_matches_reference(B, S, Hq, Hkv, Dqk, Dv, bs, qb, hsel, mla, dtype, tol):
    q, k, v = random_qkv(B, S, S, Hq, Hkv, Dqk, Dv, dtype, "cuda", mla_absorbed=mla)
    idx, counts = random_selection(B, hsel, S, S, block_size=bs, query_block=qb, kmax=min(64, -(-S // bs)), device="cuda")
    sel = Selection(idx, counts, block_size=bs, query_block=qb)
    out, lse = sparse_attention(q, k, v, sel, return_lse=True)
    ref, ref_lse = sparse_attention_reference(q.double(), k.double(), v.double(), sel, return_lse=True)
    assert not torch.isnan(out).any()
    ok = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), ok)
    assert rel_err(out, ref) < tol
    assert rel_err(lse[ok], ref_lse[ok]) < tol


def test_gpu_fused_infllmv2_selection_agrees_with_fp32_definition():
    """MiniCPM-4.1 sparse_config, 8K tokens: the fused bf16 stage-1 selection vs the fp32 PyTorch one."""
    from stem_boost.native.infllmv2 import MINICPM41_SPARSE_CONFIG, InfLLMv2Params, infllmv2_select

    params = InfLLMv2Params.from_sparse_config(MINICPM41_SPARSE_CONFIG)
    S = 8192
    q = torch.randn(1, 32, S, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, S, 128, device="cuda", dtype=torch.bfloat16)
    fused = infllmv2_select(q, k, params, chunk_size=1024)
    ref = infllmv2_select(q.float(), k.float(), params, chunk_size=1024, score_dtype=torch.bfloat16)
    assert torch.equal(fused.counts, ref.counts)
    agree = (fused.idx == ref.idx).float().mean().item()
    assert agree > 0.99, agree
