"""The sm_90 Gluon MLA token kernel (`kernels/mla_token_sm90.py`) against `sparse_attention_reference`
(fp64) and the portable Triton kernel, on the GPU (pytest -m gpu; Hopper only: the kernel is sm_90
code). Fresh random inputs, seed logged."""

from __future__ import annotations

import pytest
import torch

from tests.kernel_inputs import check_mla_token_kernel

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

    check_mla_token_kernel(mla_token_attention_sm90, B, S, T, H, kmax, dtype, tiles)
