"""The absorbed-MLA token kernel (`kernels/mla_token.py`) against `sparse_attention_reference` (fp64),
under the Triton interpreter on tiny shapes (fresh random inputs, seed logged)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from stem_boost.kernels import HAS_TRITON

from .kernel_inputs import random_selection

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("case", [  # B, S, T, H, dv, dr, tiles
    (1, 6, 40, 4, 32, 16, dict(BLOCK_N=16, DV_SPLIT=1, NUM_STAGES=1, num_warps=4)),
    (2, 5, 33, 20, 32, 16, dict(BLOCK_H=16, BLOCK_N=16, DV_SPLIT=2, NUM_STAGES=2, num_warps=4)),
    (1, 7, 70, 4, 32, 16, dict(BLOCK_N=16, DV_SPLIT=1, NUM_STAGES=3, num_warps=4, PREFETCH_IDX=True)),
    # head chunks on their own grid axis (the order before HEADS_INNER): the same values
    (2, 5, 33, 20, 32, 16, dict(BLOCK_H=16, BLOCK_N=16, DV_SPLIT=2, NUM_STAGES=2, num_warps=4, HEADS_INNER=False)),
])
def test_mla_token_matches_reference(case, dtype, tol):
    from stem_boost.kernels.mla_token import mla_token_attention
    from stem_boost.kernels.reference import sparse_attention_reference
    from stem_boost.selection import Selection

    B, S, T, H, dv, dr, tiles = case
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    print(f"seed={seed}")
    torch.manual_seed(seed)
    q = torch.randn(B, S, H, dv + dr).to(dtype)
    kv = torch.randn(B, T, 1, dv + dr).to(dtype)
    idx, counts = random_selection(B, 1, S, T, block_size=1, query_block=1, kmax=40)  # several BLOCK_N steps
    counts[0, 0, 0] = 0  # one empty row: zeros, lse -inf
    idx[0, 0, 0] = -1
    scale = 0.125
    want, want_lse = sparse_attention_reference(q.double(), kv.double(), kv[..., :dv].double(),
                                                Selection(idx=idx, counts=counts), sm_scale=scale, return_lse=True)
    got, got_lse = mla_token_attention(q, kv, idx, counts, sm_scale=scale, dv=dv, return_lse=True, tiles=tiles)
    assert got.shape == (B, S, H, dv) and got.dtype == dtype
    err = float((got.double() - want).norm() / want.norm())
    assert err < tol, f"seed={seed} rel err {err}"
    live = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(got_lse), live), f"seed={seed}"
    assert float((got_lse[live].double() - want_lse[live]).abs().max()) < 10 * tol, f"seed={seed}"
    assert bool((got[0, 0] == 0).all())
