"""The fused indexer-score kernel against the unfused PyTorch computation (Triton interpreter on CPU)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from stem_boost.kernels import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("B,S,T,H,D,scale,pipeline", [(1, 37, 50, 3, 16, 0.25, True), (2, 20, 20, 4, 32, None, True),
                                                      (1, 37, 50, 3, 16, -0.5, True), (1, 20, 40, 4, 16, 0.5, False)])
def test_fused_index_scores_match_unfused(B, S, T, H, D, scale, pipeline, causal):
    """A positive scale is folded into the weights, a negative one stays in the kernel (relu(c x) is
    not c relu(x) for c < 0); the weights loaded a head ahead (pipeline) or per head."""
    from stem_boost.kernels.indexer_scores import fused_index_scores

    _seeded()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(B, S, H, D, device=device)
    k = torch.randn(B, T, D, device=device)
    w = torch.randn(B, S, H, device=device)
    ref = torch.einsum("bsh,bsht->bst", w.double(),
                       torch.relu(torch.einsum("bshd,btd->bsht", q.double(), k.double()) * (scale or 1.0)))
    offset = T - S
    out = fused_index_scores(q, k, w, scale, causal_offset=offset if causal else None, block_s=16, block_t=16,
                             pipeline=pipeline)
    if causal:
        visible = torch.arange(T, device=device)[None, :] <= torch.arange(S, device=device)[:, None] + offset
        assert torch.all(out[:, ~visible] == float("-inf"))
        out, ref = out[:, visible], ref[:, visible]
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-4


@pytest.mark.parametrize("causal", [False, True])
def test_index_scores_same_in_either_launch_order(causal):
    """Key tiles on the grid's fast axis (`keys_fast`) change which programs run together, not what a
    program computes: the same bits, masked tail included."""
    from stem_boost.kernels.indexer_scores import fused_index_scores

    _seeded()
    q, k, w = torch.randn(2, 37, 3, 16), torch.randn(2, 50, 16), torch.randn(2, 37, 3)
    kw = dict(causal_offset=13 if causal else None, block_s=16, block_t=16)
    assert torch.equal(fused_index_scores(q, k, w, 0.5, keys_fast=True, **kw),
                       fused_index_scores(q, k, w, 0.5, keys_fast=False, **kw))


def _seeded() -> int:
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    print(f"seed={seed}")
    torch.manual_seed(seed)
    return seed


@pytest.mark.parametrize("rotate", [True, False])
def test_fp8_index_scores_match_quantised_definition(rotate):
    """The FP8 kernel computes exactly the PyTorch definition on the same quantised operands."""
    from stem_boost.kernels.indexer_scores import fp8_index_scores, fp8_index_scores_reference

    seed = _seeded()
    B, S, T, H, D = 2, 21, 40, 3, 32
    q, k, w = torch.randn(B, S, H, D), torch.randn(B, T, D), torch.randn(B, S, H)
    ref = fp8_index_scores_reference(q, k, w, 0.3, rotate=rotate)
    offset = T - S
    out = fp8_index_scores(q, k, w, 0.3, causal_offset=offset, block_s=16, block_t=16, rotate=rotate,
                           heads_per_step=1)
    visible = torch.arange(T)[None, :] <= torch.arange(S)[:, None] + offset
    assert torch.all(out[:, ~visible] == float("-inf")), f"seed={seed}"
    err = float((out[:, visible].double() - ref[:, visible]).norm() / ref[:, visible].norm())
    assert err < 1e-5, f"seed={seed} rel err {err}"


def test_fp8_index_scores_near_exact_and_rotation_preserves_dots():
    from stem_boost.kernels.indexer_scores import fp8_index_scores, hadamard_matrix

    seed = _seeded()
    h = hadamard_matrix(64)
    torch.testing.assert_close(h @ h.T, torch.eye(64), atol=1e-6, rtol=0)
    B, S, T, H, D = 1, 16, 64, 4, 64
    q, k, w = torch.randn(B, S, H, D), torch.randn(B, T, D), torch.rand(B, S, H)
    q[..., 3] *= 20  # an outlier channel: what the rotation is for
    per_head = torch.relu(torch.einsum("bshd,btd->bsht", q.double(), k.double()))
    exact = torch.einsum("bsh,bsht->bst", w.double(), per_head)
    out = fp8_index_scores(q, k, w, None, block_s=16, block_t=16)
    err = float((out.double() - exact).norm() / exact.norm())
    assert err < 0.05, f"seed={seed} rel err {err}"


def test_unwritten_masked_tiles():
    """write_masked=False: tiles wholly after the diagonal are not written; the rest is unchanged."""
    from stem_boost.kernels.indexer_scores import fused_index_scores

    seed = _seeded()
    q, k, w = torch.randn(1, 32, 4, 16), torch.randn(1, 64, 16), torch.randn(1, 32, 4)
    full = fused_index_scores(q, k, w, 0.5, causal_offset=0, block_s=16, block_t=16, heads_per_step=4)
    part = fused_index_scores(q, k, w, 0.5, causal_offset=0, block_s=16, block_t=16, write_masked=False,
                              heads_per_step=2)
    visible = torch.arange(64)[None, :] <= torch.arange(32)[:, None]
    assert torch.equal(part[:, visible], full[:, visible]), f"seed={seed}"


@pytest.mark.parametrize("D,rotate", [(32, True), (64, True), (32, False)])
def test_fused_fp8_quantiser_matches_its_definition(D, rotate):
    """The one-pass Triton quantiser gives the PyTorch definition's e4m3 codes and scales (up to the
    order of the rotation's fp32 sums: a code may move by one step where a value sits on a rounding
    edge), and every row, a zero row included, is written."""
    from stem_boost.kernels.indexer_scores import hadamard_matrix, quantize_fp8_rows, quantize_fp8_rows_fused

    seed = _seeded()
    x = (torch.randn(3, 37, D) * torch.rand(3, 37, 1) * 4).to(torch.bfloat16)
    x[1, 5] = 0
    want8, want_scale = quantize_fp8_rows(x, hadamard_matrix(D) if rotate else None)
    got8, got_scale = quantize_fp8_rows_fused(x, rotate)
    assert got8.shape == want8.shape and got_scale.shape == want_scale.shape
    torch.testing.assert_close(got_scale, want_scale, rtol=1e-6, atol=0, msg=f"seed={seed}")
    codes_got, codes_want = got8.view(torch.uint8).int(), want8.view(torch.uint8).int()
    assert float((codes_got == codes_want).float().mean()) > 0.995, f"seed={seed}"
    # one e4m3 step is at most 1/8 of the value (3 mantissa bits; 2^-9 below the normals): a value on a
    # rounding edge (seed 1310791358: 336.00003 by the definition's sums, just under 336 by the kernel's)
    # may take either neighbour, 352 or 320
    torch.testing.assert_close(got8.float(), want8.float(), rtol=0.125, atol=2**-9, msg=f"seed={seed}")
    assert torch.equal(got8[1, 5].float(), torch.zeros(D)), f"seed={seed}"


def test_fused_fp8_quantiser_names_what_it_takes():
    from stem_boost.kernels.indexer_scores import quantize_fp8_rows_fused

    with pytest.raises(ValueError, match="bfloat16 / float16"):
        quantize_fp8_rows_fused(torch.randn(4, 32))
    with pytest.raises(ValueError, match="power-of-two D"):
        quantize_fp8_rows_fused(torch.randn(4, 48).to(torch.bfloat16))


def test_sm90_fp8_scorer_names_what_it_refuses():
    """The Gluon FP8 scorer (Hopper only) checks its arguments before any launch, on any machine."""
    from stem_boost.kernels.indexer_scores_sm90 import fp8_index_scores_sm90

    q, k, w = torch.randn(1, 4, 2, 48), torch.randn(1, 8, 48), torch.randn(1, 4, 2)
    with pytest.raises(ValueError, match="index head dim 48"):
        fp8_index_scores_sm90(q, k, w, 0.1)
    q, k = torch.randn(1, 4, 2, 32), torch.randn(1, 8, 32)
    with pytest.raises(ValueError, match="unknown tile options"):
        fp8_index_scores_sm90(q, k, w, 0.1, tile=dict(BLOCK_M=64))
    with pytest.raises(ValueError, match="BLOCK_S must be 64"):
        fp8_index_scores_sm90(q, k, w, 0.1, tile=dict(BLOCK_S=128))
    with pytest.raises(ValueError, match="NUM_BUF >= 3"):
        fp8_index_scores_sm90(q, k, w, 0.1, tile=dict(NUM_BUF=2))
    with pytest.raises(ValueError, match="STEP=1; allowed: 0"):
        fp8_index_scores_sm90(q, k, w, 0.1, tile=dict(STEP=1))


def test_fp8_scorer_route_is_checked_and_keeps_triton_off_hopper(monkeypatch):
    """`dsa_indexer.FP8_SCORER`: an unknown name is refused with what is allowed; "sm90" falls back to the
    Triton scorer where the Gluon kernel cannot run (here: CPU tensors), and "triton" is the default."""
    from stem_boost.kernels.indexer_scores import fp8_index_scores
    from stem_boost.native import dsa_indexer

    q = torch.randn(1, 4, 2, 32)
    assert dsa_indexer.FP8_SCORER == "triton"
    assert dsa_indexer.fp8_scorer(q) is fp8_index_scores
    monkeypatch.setattr(dsa_indexer, "FP8_SCORER", "sm90")
    assert dsa_indexer.fp8_scorer(q) is fp8_index_scores
    monkeypatch.setattr(dsa_indexer, "FP8_SCORER", "gluon")
    with pytest.raises(ValueError, match="FP8_SCORER='gluon'; allowed: 'triton', 'sm90'"):
        dsa_indexer.fp8_scorer(q)
