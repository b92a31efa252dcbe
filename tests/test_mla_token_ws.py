"""The warp-specialised Hopper MLA token kernel (`kernels/mla_token_ws.py`) against
`sparse_attention_reference` (fp64), on the GPU (pytest -m gpu; Hopper only: sm_90 code). Fresh random
inputs, seed logged."""

from __future__ import annotations

import pytest
import torch

from tests.kernel_inputs import check_mla_token_kernel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                       reason="the kernel is sm_90 code: needs a Hopper GPU"),
]


@pytest.mark.parametrize("tiles", [None, dict(CONSUMER_REGS=232), dict(CONSUMER_REGS=192), dict(EARLY_QK_L=True), dict(LOCAL_P_REGS=False),
                                   dict(L2_HINTS=True), dict(STEP_VIEWS=False), dict(L2_PREFETCH=256),
                                   dict(L2_HINTS=True, L2_PREFETCH=128),
                                   dict(SWEEP=3)],  # None: the defaults (WS_TILES); SWEEP 3: rows walked both ways
                         ids=lambda t: "default" if t is None else "-".join(f"{k}={v}" for k, v in t.items()))
@pytest.mark.parametrize("B,S,T,H,kmax,dtype", [
    (1, 70, 300, 128, 200, torch.bfloat16),  # DeepSeek-V3.2's 128 heads, rows of 0..200 keys (ragged last step)
    (2, 33, 600, 64, 520, torch.float16),    # 64 heads (tensor parallel 2), a batch, five steps of 128 keys
    (1, 20, 64, 20, 64, torch.bfloat16),     # a head count that is not a multiple of 64 (masked head rows)
])
def test_ws_mla_token_matches_reference(B, S, T, H, kmax, dtype, tiles):
    from stem_boost.kernels.mla_token_ws import mla_token_attention_ws

    check_mla_token_kernel(mla_token_attention_ws, B, S, T, H, kmax, dtype, tiles, same_without_lse=True)


def test_ws_rejects_unknown_tiles_and_other_widths():
    from stem_boost.kernels.mla_token_ws import mla_token_attention_ws

    q = torch.randn(1, 4, 64, 576, device="cuda").to(torch.bfloat16)
    kv = torch.randn(1, 16, 1, 576, device="cuda").to(torch.bfloat16)
    idx = torch.zeros(1, 4, 8, dtype=torch.int32, device="cuda")
    counts = torch.ones(1, 4, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="BLOCK_N"):
        mla_token_attention_ws(q, kv, idx, counts, tiles=dict(BLOCK_N=64))
    with pytest.raises(ValueError, match="SWEEP=-1"):
        mla_token_attention_ws(q, kv, idx, counts, tiles=dict(SWEEP=-1))
    with pytest.raises(ValueError, match="dv 256"):
        mla_token_attention_ws(q, kv, idx, counts, dv=256)
