"""GPU checks of the Gluon FP8 indexer-score kernel for Hopper (`kernels/indexer_scores_sm90.py`, opt-in by
`dsa_indexer.FP8_SCORER = "sm90"`; run on the device: pytest -m gpu tests/test_gpu_indexer_sm90.py). Oracle: the Triton FP8 kernel on the same e4m3
operands (the same products; only the order of fp32 sums may differ) and its PyTorch definition.
Fresh random inputs on every run (the `seed` fixture of conftest.py: reported with a failure, replayable)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _hopper() -> bool:
    return torch.cuda.get_device_capability()[0] == 9


@pytest.mark.parametrize("B,S,T,H,D,causal,write_masked,tile", [
    (1, 300, 1200, 64, 128, True, False, None),   # DeepSeek-V3.2's indexer, ragged query and key tiles
    (2, 100, 100, 64, 128, True, True, None),     # a batch, queries = keys, the masked tail written
    (1, 130, 700, 3, 32, False, True, None),      # odd head count (one trip of 3), the smallest head dim, no mask
    (1, 200, 900, 64, 64, True, True, dict(NUM_BUF=3)),
    (1, 200, 900, 64, 128, True, False, dict(STEP=4, BLOCK_T=64)),
    (1, 200, 900, 64, 128, True, False, dict(STEP=2)),
    (1, 200, 900, 5, 128, True, False, dict(STEP=2)),  # two trips and a tail of one
    (1, 200, 900, 2, 128, True, False, dict(STEP=3)),  # no trip: the tail alone
    (1, 200, 900, 64, 128, True, False, dict(STEP=0)),  # the pairs schedule (serialised by ptxas)
    (2, 200, 900, 64, 128, True, True, dict(KEYS_FAST=False)),
])
def test_gpu_sm90_fp8_scores_equal_the_triton_kernel(seed, B, S, T, H, D, causal, write_masked, tile):
    if not _hopper():
        pytest.skip("the Gluon kernel is for compute capability 9.x; this GPU is another")
    from stem_boost.kernels.indexer_scores import fp8_index_scores, fp8_index_scores_reference
    from stem_boost.kernels.indexer_scores_sm90 import fp8_index_scores_sm90

    q = torch.randn(B, S, H, D, device="cuda").to(torch.bfloat16)
    k = torch.randn(B, T, D, device="cuda").to(torch.bfloat16)
    w = torch.randn(B, S, H, device="cuda") * H ** -0.5  # a batch of B: not `_indexer_inputs`
    offset = T - S if causal else None
    got = fp8_index_scores_sm90(q, k, w, D ** -0.5, offset, write_masked=write_masked, tile=tile)
    want = fp8_index_scores(q, k, w, D ** -0.5, offset, write_masked=write_masked)
    ref = fp8_index_scores_reference(q, k, w, D ** -0.5)  # [B, S, T], no mask
    seen = torch.ones(S, T, dtype=torch.bool, device="cuda")
    if causal:
        seen = torch.arange(T, device="cuda")[None, :] <= torch.arange(S, device="cuda")[:, None] + offset
        if write_masked:
            assert bool((got[:, ~seen] == float("-inf")).all()), f"seed={seed}"
    a, b, r = got[:, seen].double(), want[:, seen].double(), ref[:, seen]
    assert float((a - b).abs().max() / b.abs().max()) < 1e-6, f"seed={seed}"
    assert float((a - r).norm() / r.norm()) < 1e-3, f"seed={seed}"


def test_gpu_sm90_fp8_scores_in_the_chunked_top_k(seed):
    """At DeepSeek-V3.2's shape (64 heads x 128) and 8192 keys: the top-2048 of each row from the Gluon
    kernel's scores equals the Triton kernel's (the scores differ at most in the order of fp32 sums)."""
    if not _hopper():
        pytest.skip("the Gluon kernel is for compute capability 9.x; this GPU is another")
    from stem_boost.kernels.dsa_topk import topk_rows
    from stem_boost.kernels.indexer_scores import fp8_index_scores
    from stem_boost.kernels.indexer_scores_sm90 import fp8_index_scores_sm90

    S, T, H, D = 256, 8192, 64, 128
    q, k, w = _indexer_inputs(S, T, H, D)
    got = fp8_index_scores_sm90(q, k, w, D ** -0.5, T - S)
    want = fp8_index_scores(q, k, w, D ** -0.5, T - S)
    a, _ = topk_rows(got, 2048)
    b, _ = topk_rows(want, 2048)
    same = _overlap(a[0], b[0])
    print(f"top-2048 overlap, Gluon vs Triton scores: {same:.6f}")
    assert same > 0.9999, f"seed={seed} overlap {same}"


def test_gpu_sm90_fp8_scorer_route_keeps_the_selection(seed, monkeypatch):
    """`dsa_indexer.FP8_SCORER = "sm90"`: the chunked FP8 top-k (DeepSeek-V3.2's shape, several chunks) selects
    what it selects with the Triton scorer, to within the rows where two keys' scores differ only in the order
    of fp32 sums."""
    if not _hopper():
        pytest.skip("the Gluon kernel is for compute capability 9.x; this GPU is another")
    from stem_boost.native import dsa_indexer

    S, T, H, D = 700, 4096, 64, 128
    q, k, w = _indexer_inputs(S, T, H, D)
    kw = dict(score_dtype="fp8", chunk_rows=256)
    monkeypatch.setattr(dsa_indexer, "FP8_SCORER", "triton")
    want = dsa_indexer.chunked_index_topk(q, k, w, None, 512, D ** -0.5, **kw)
    monkeypatch.setattr(dsa_indexer, "FP8_SCORER", "sm90")
    got = dsa_indexer.chunked_index_topk(q, k, w, None, 512, D ** -0.5, **kw)
    same = _overlap(got.indices[0], want.indices[0])
    assert same > 0.9999, f"seed={seed} overlap {same}"


def _indexer_inputs(S: int, T: int, H: int, D: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh DSA indexer inputs on the GPU: q [1, S, H, D] and k [1, T, D] bf16, head weights [1, S, H]."""
    q = torch.randn(1, S, H, D, device="cuda").to(torch.bfloat16)
    k = torch.randn(1, T, D, device="cuda").to(torch.bfloat16)
    return q, k, torch.randn(1, S, H, device="cuda") * H ** -0.5


def _overlap(got: torch.Tensor, want: torch.Tensor) -> float:
    """Share of want's selected keys (rows of [R, k] indices, -1 = none) that got selects in the same row."""
    same = sum(len(set(x.tolist()) & set(y.tolist()) - {-1}) for x, y in zip(got, want))
    return same / max(1, sum(len(set(y.tolist()) - {-1}) for y in want))
