"""The warp-specialised Hopper MLA token kernel (`kernels/mla_token_ws.py`) against
`sparse_attention_reference` (fp64), on the GPU (pytest -m gpu; Hopper only: sm_90 code). Fresh random
inputs, seed logged."""

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


@pytest.mark.parametrize("tiles", [None, dict(CONSUMER_REGS=232), dict(EARLY_QK_L=True)])
@pytest.mark.parametrize("B,S,T,H,kmax,dtype", [
    (1, 70, 300, 128, 200, torch.bfloat16),  # DeepSeek-V3.2's 128 heads, rows of 0..200 keys (ragged last step)
    (2, 33, 600, 64, 520, torch.float16),    # 64 heads (tensor parallel 2), a batch, five steps of 128 keys
    (1, 20, 64, 20, 64, torch.bfloat16),     # a head count that is not a multiple of 64 (masked head rows)
])
def test_ws_mla_token_matches_reference(B, S, T, H, kmax, dtype, tiles):
    from stem_boost.kernels.mla_token_ws import mla_token_attention_ws

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
    got, got_lse = mla_token_attention_ws(q, kv, idx[:, 0], counts[:, 0], sm_scale=576 ** -0.5,
                                          return_lse=True, tiles=tiles)
    torch.cuda.synchronize()
    assert got.shape == (B, S, H, 512) and got.dtype == dtype
    err = float((got.double() - want).norm() / want.norm())
    assert err < 1e-2, f"seed={seed} rel err {err}"
    live = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(got_lse), live), f"seed={seed}"
    assert float((got_lse[live].double() - want_lse[live]).abs().max()) < 1e-2, f"seed={seed}"
    assert bool((got[0, 0] == 0).all())
    # without lse: the same output
    again = mla_token_attention_ws(q, kv, idx[:, 0], counts[:, 0], sm_scale=576 ** -0.5, tiles=tiles)
    assert torch.equal(again, got), f"seed={seed}"


def test_ws_rejects_unknown_tiles_and_other_widths():
    from stem_boost.kernels.mla_token_ws import mla_token_attention_ws

    q = torch.randn(1, 4, 64, 576, device="cuda").to(torch.bfloat16)
    kv = torch.randn(1, 16, 1, 576, device="cuda").to(torch.bfloat16)
    idx = torch.zeros(1, 4, 8, dtype=torch.int32, device="cuda")
    counts = torch.ones(1, 4, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="BLOCK_N"):
        mla_token_attention_ws(q, kv, idx, counts, tiles=dict(BLOCK_N=64))
    with pytest.raises(ValueError, match="dv 256"):
        mla_token_attention_ws(q, kv, idx, counts, dv=256)
