"""GPU checks of the Gluon pooled stage-1 kernel for Hopper (`kernels/infllmv2_pooled_sm90.py`; run on the
device: pytest -m gpu tests/test_gpu_infllmv2_pooled_sm90.py). Oracle: the Triton kernel
(`infllmv2_select.pooled_block_scores`) on the same inputs (the same products and exponentials; only
the order of fp32 sums may differ). Fresh random inputs on every run (the conftest `seed` fixture)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("G,C,T,with_lo,with_bias,tile", [
    (16, 300, 4096, False, False, None),         # MiniCPM-4.1's group, a ragged query chunk at the end
    (16, 200, 2000, True, True, None),           # left padding and Stem's bias, ragged key blocks
    (3, 130, 1500, False, False, dict(NUM_BUF=3)),
    (16, 256, 8192, False, False, dict(BLOCK_B=16)),
    (16, 300, 4096, True, True, dict(KEYS_FAST=False)),  # query tiles on the grid's fast axis
    (6, 256, 4096, False, True, dict(BLOCK_B=16, NUM_BUF=3)),  # an even group that is not a power of two
    (1, 100, 1024, False, False, None),  # one head: no pair of heads in flight
    # the heads STEP at a time (each sum beside the next head's product): whole trips, trips and a tail
    # (6 = 4 + 2, 3 = 2 + 1), no trip at all (1 head), eight a trip
    (16, 300, 4096, False, False, dict(STEP=4, NUM_BUF=3)),
    (16, 200, 2000, True, True, dict(STEP=4)),
    (6, 256, 4096, False, True, dict(STEP=4)),
    (3, 130, 1500, False, False, dict(STEP=2, NUM_BUF=3)),
    (1, 100, 1024, False, False, dict(STEP=4)),
    (16, 256, 8192, False, False, dict(STEP=8)),
    # two warpgroups splitting 256 keys (or 128: 64 a warpgroup), with and without the STEP schedule
    (16, 300, 4096, False, False, dict(BLOCK_B=64, WARPS=8)),
    (16, 200, 2000, True, True, dict(BLOCK_B=64, WARPS=8, STEP=4)),
    (6, 256, 4096, False, True, dict(BLOCK_B=32, WARPS=8, STEP=3)),
    (1, 100, 1024, False, False, dict(BLOCK_B=64, WARPS=8)),
])
def test_gpu_sm90_pooled_scores_equal_the_triton_kernel(seed, G, C, T, with_lo, with_bias, tile):
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel is for compute capability 9.x; this GPU is another")
    from stem_boost.kernels.infllmv2_geometry import compress_keys, num_compressed, visible_compressed
    from stem_boost.kernels.infllmv2_pooled_sm90 import pooled_block_scores_sm90
    from stem_boost.kernels.infllmv2_scores import coarse_lse
    from stem_boost.kernels.infllmv2_select import pooled_block_scores
    from stem_boost.native.infllmv2 import MINICPM41_SPARSE_CONFIG, InfLLMv2Params

    p = InfLLMv2Params.from_sparse_config(MINICPM41_SPARSE_CONFIG)
    Hk, D = 2, 128
    q = torch.randn(1, G * Hk, C, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, Hk, T, D, device="cuda", dtype=torch.bfloat16)
    k1 = compress_keys(k, p.kernel_size, p.kernel_stride).contiguous()
    k2 = compress_keys(k, p.coarse_kernel_size, p.coarse_stride).contiguous()
    K1 = num_compressed(T, p.kernel_size, p.kernel_stride)
    K2 = num_compressed(T, p.coarse_kernel_size, p.coarse_stride)
    q_pos = torch.arange(T - C, T, device="cuda")
    vis1 = visible_compressed(q_pos, K1, p.kernel_size, p.kernel_stride, 0).to(torch.int32)
    vis2 = visible_compressed(q_pos, K2, p.coarse_kernel_size, p.coarse_stride, 0).to(torch.int32)
    lse = coarse_lse(q, k2, vis2, D ** -0.5)
    nbc = (T - 1) // p.block_size + 1
    kw = dict(q_pos0=T - C, block_size=p.block_size, n_existing=K1, round_to=torch.bfloat16)
    if with_lo:
        kw["lo1"] = torch.tensor([5], device="cuda", dtype=torch.int32)
    if with_bias:
        kw["key_bias"] = torch.randn(1, Hk, nbc, device="cuda") * 0.3
    want = pooled_block_scores(q, k1, lse, vis1, nbc, p.pool_size, D ** -0.5, kernel="triton", **kw)
    got = pooled_block_scores_sm90(q, k1, lse, vis1, nbc, p.pool_size, D ** -0.5, tile=tile, **kw)
    # the blocks each row may see (the rest is unwritten by both)
    row_qb = (q_pos // p.block_size)[:, None]
    seen = (torch.arange(nbc, device="cuda")[None, :] <= row_qb).expand(C, nbc)
    a, b = got[:, :, seen], want[:, :, seen]
    assert torch.equal(torch.isfinite(a), torch.isfinite(b)), f"seed={seed}"
    fin = torch.isfinite(b)
    floor = 1e-5 if with_bias else 1e-12  # Stem's keys are logs (near 0 an absolute bound); scores are sums of exp2
    assert bool(((a[fin] - b[fin]).abs() <= 1e-5 * b[fin].abs() + floor).all()), f"seed={seed}"
