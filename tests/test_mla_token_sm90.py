"""The sm_90 Gluon MLA token kernel (`kernels/mla_token_sm90.py`) against `sparse_attention_reference`
(fp64) and the portable Triton kernel, on the GPU (pytest -m gpu; Hopper only: the kernel is sm_90
code). Fresh random inputs, seed logged."""

from __future__ import annotations

import pytest
import torch

from stem_boost.kernels import sparse_attention_reference
from stem_boost.selection import Selection
from tests.kernel_inputs import random_selection

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                       reason="the kernel is sm_90 code: needs a Hopper GPU"),
]


@pytest.mark.parametrize("tiles", [
    dict(BLOCK_N=64, NUM_BUF=2, SPLIT_KEYS=True, EARLY_QK=False, ROW_SUM_AT_END=False, P_IN_ROPE=False),
    dict(BLOCK_N=64, NUM_BUF=2, SPLIT_KEYS=True, EARLY_QK=True, ROW_SUM_AT_END=True, P_IN_ROPE=False),
    dict(BLOCK_N=64, NUM_BUF=2, SPLIT_KEYS=False, EARLY_QK=True, P_IN_ROPE=False),
    dict(BLOCK_N=32, NUM_BUF=3, SPLIT_KEYS=True, EARLY_QK=True, P_IN_ROPE=False),
    dict(BLOCK_N=128, NUM_BUF=1, SPLIT_KEYS=True, ROW_SUM_AT_END=False, P_IN_ROPE=True),
    dict(BLOCK_N=32, NUM_BUF=4, SPLIT_KEYS=False, EARLY_QK=False, P_IN_ROPE=False),
])
@pytest.mark.parametrize("B,S,T,H,kmax,dtype", [
    (1, 70, 300, 128, 200, torch.bfloat16),  # DeepSeek-V3.2's 128 heads, rows of 0..200 keys (ragged last tile)
    (2, 33, 90, 64, 90, torch.float16),      # 64 heads (tensor parallel 2), a batch
    (1, 20, 64, 20, 64, torch.bfloat16),     # a head count that is not a multiple of 64 (masked head rows)
])
def test_sm90_mla_token_matches_reference(B, S, T, H, kmax, dtype, tiles):
    from stem_boost.kernels.mla_token_sm90 import mla_token_attention_sm90

    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    print(f"seed={seed}")
    torch.manual_seed(seed)
    q = torch.randn(B, S, H, 576, device="cuda").to(dtype)
    kv = torch.randn(B, T, 1, 576, device="cuda").to(dtype)
    idx, counts = random_selection(B, 1, S, T, block_size=1, query_block=1, kmax=kmax, device="cuda")
    counts[0, 0, 0] = 0  # an empty row: zeros, lse -inf
    idx[0, 0, 0] = -1
    sel = Selection(idx=idx, counts=counts)
    want, want_lse = sparse_attention_reference(q.double(), kv.double(), kv[..., :512].double(), sel,
                                                sm_scale=576 ** -0.5, return_lse=True)
    got, got_lse = mla_token_attention_sm90(q, kv, idx[:, 0], counts[:, 0], sm_scale=576 ** -0.5,
                                            return_lse=True, tiles=tiles)
    assert got.shape == (B, S, H, 512) and got.dtype == dtype
    err = float((got.double() - want).norm() / want.norm())
    assert err < 1e-2, f"seed={seed} rel err {err}"
    live = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(got_lse), live), f"seed={seed}"
    assert float((got_lse[live].double() - want_lse[live]).abs().max()) < 1e-2, f"seed={seed}"
    assert bool((got[0, 0] == 0).all())
