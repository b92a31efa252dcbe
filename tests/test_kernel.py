"""The Triton sparse-attention kernel against its PyTorch reference (fp64 oracle) and dense SDPA.

On the CPU the kernel runs under TRITON_INTERPRET=1 (set by scripts/test.sh; the tests set it
themselves when missing so that `pytest` alone also exercises the kernel). Shapes are small.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F

from stem_boost.kernels import HAS_TRITON, sparse_attention, sparse_attention_reference
from stem_boost.kernels.dispatch import takes_mla_token_kernel
from stem_boost.selection import Selection
from tests.kernel_inputs import random_qkv, random_selection

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def oracle(q, k, v, selection, **kw):
    """The reference evaluated in float64."""
    return sparse_attention_reference(q.double(), k.double(), v.double(), selection, **kw)


def kernel(q, k, v, selection, **kw):
    """The Triton executor (CUDA, or the interpreter on the CPU)."""
    return sparse_attention(q, k, v, selection, backend="triton", **kw)


CASES = [
    # name, B, S, T, Hq, Hkv, Dqk, Dv, block_size, query_block, Hsel
    ("token-gqa", 2, 24, 24, 4, 2, 32, 32, 1, 1, "kv"),
    ("token-shared-mha", 1, 20, 33, 2, 2, 48, 16, 1, 1, "one"),
    ("block-gqa", 1, 70, 70, 8, 2, 32, 32, 16, 16, "kv"),
    ("block-qb-token-rows", 2, 40, 56, 4, 1, 16, 32, 16, 1, "kv"),
    ("block-192-split-dim", 1, 48, 48, 4, 4, 192, 128, 16, 16, "one"),
    ("token-small-tail-dim", 1, 20, 20, 4, 1, 40, 8, 1, 1, "one"),  # Dqk 32 + 8, Dv 8: padded to 16
]


@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_reference(case, dtype, tol):
    _, B, S, T, Hq, Hkv, Dqk, Dv, bs, qb, hsel = case
    Hsel = Hkv if hsel == "kv" else 1
    q, k, v = random_qkv(B, S, T, Hq, Hkv, Dqk, Dv, dtype, DEVICE)
    kmax = -(-T // bs) + 2  # room for ragged rows; tail stays -1
    idx, counts = random_selection(B, Hsel, S, T, block_size=bs, query_block=qb, kmax=kmax, device=DEVICE)
    sel = Selection(idx, counts, block_size=bs, query_block=qb)
    out, lse = kernel(q, k, v, sel, return_lse=True)
    ref, ref_lse = oracle(q, k, v, sel, return_lse=True)
    assert not torch.isnan(out).any()
    nonempty = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), nonempty)
    assert rel_err(out, ref) < tol
    assert rel_err(lse[nonempty], ref_lse[nonempty]) < tol


@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
def test_mla_absorbed_shape(dtype, tol):
    """DeepSeek MLA absorbed form: Dqk 576 = 512 latent + 64 rope, Dv 512 = k[..., :512], one kv head."""
    B, S, T, Hq = 1, 6, 40, 16
    q, k, v = random_qkv(B, S, T, Hq, 1, 576, 512, dtype, DEVICE, mla_absorbed=True)
    idx, counts = random_selection(B, 1, S, T, block_size=1, query_block=1, kmax=100, device=DEVICE)
    sel = Selection(idx, counts, block_size=1)
    # 16-bit inputs take mla_token.py's kernel (key positions a step ahead, several steps), fp32 the generic one
    assert takes_mla_token_kernel(q, k, v, sel) == (dtype != torch.float32)
    out, lse = kernel(q, k, v, sel, sm_scale=0.1, return_lse=True)
    ref, ref_lse = oracle(q, k, v, sel, sm_scale=0.1, return_lse=True)
    assert rel_err(out, ref) < tol
    live = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), live) and rel_err(lse[live], ref_lse[live]) < tol


@needs_triton
@pytest.mark.parametrize("bs,qb", [(1, 1), (16, 16), (16, 1)])
def test_full_selection_equals_dense_causal_sdpa(bs, qb):
    B, S, Hq, Hkv, D = 1, 48, 4, 2, 32
    q, k, v = random_qkv(B, S, S, Hq, Hkv, D, D, torch.float32, DEVICE)
    idx, counts = random_selection(B, Hkv, S, S, block_size=bs, query_block=qb, kmax=-(-S // bs), full=True, device=DEVICE)
    out = kernel(q, k, v, Selection(idx, counts, block_size=bs, query_block=qb))
    dense = F.scaled_dot_product_attention(
        q.transpose(1, 2).double(), k.transpose(1, 2).double(), v.transpose(1, 2).double(),
        is_causal=True, enable_gqa=True,
    ).transpose(1, 2)
    assert rel_err(out, dense) < 1e-4


@needs_triton
def test_zero_counts_give_zeros_and_neg_inf_lse():
    B, S, Hq, Hkv, D = 1, 16, 2, 1, 16
    q, k, v = random_qkv(B, S, S, Hq, Hkv, D, D, torch.float32, DEVICE)
    idx, counts = random_selection(B, 1, S, S, block_size=1, query_block=1, kmax=8, device=DEVICE)
    empty = torch.rand(S, device=DEVICE) < 0.5
    counts[0, 0, empty] = 0
    out, lse = kernel(q, k, v, Selection(idx, counts, block_size=1), return_lse=True)
    assert not torch.isnan(out).any()
    assert torch.all(out[0, empty] == 0)
    assert torch.all(lse[0, :, empty] == float("-inf"))


@needs_triton
def test_sinks_match_reference():
    B, S, Hq, Hkv, D = 1, 20, 4, 2, 16
    q, k, v = random_qkv(B, S, S, Hq, Hkv, D, D, torch.float32, DEVICE)
    idx, counts = random_selection(B, Hkv, S, S, block_size=1, query_block=1, kmax=10, device=DEVICE)
    sinks = torch.randn(Hq, device=DEVICE)
    out, lse = kernel(q, k, v, Selection(idx, counts, block_size=1), sinks=sinks, return_lse=True)
    ref, ref_lse = oracle(q, k, v, Selection(idx, counts, block_size=1), sinks=sinks.double(), return_lse=True)
    assert rel_err(out, ref) < 1e-4 and rel_err(lse, ref_lse) < 1e-4


@needs_triton
def test_non_contiguous_inputs_are_accepted():
    """[B, H, S, D] tensors transposed to [B, S, H, D] (what attention modules hold) work as they are."""
    B, S, Hq, Hkv, D = 1, 16, 2, 1, 16
    qh = torch.randn(B, Hq, S, D, device=DEVICE)
    kh = torch.randn(B, Hkv, S, D, device=DEVICE)
    vh = torch.randn(B, Hkv, S, D, device=DEVICE)
    q, k, v = (t.transpose(1, 2) for t in (qh, kh, vh))
    idx, counts = random_selection(B, 1, S, S, block_size=1, query_block=1, kmax=8, device=DEVICE)
    sel = Selection(idx, counts)
    out = kernel(q, k, v, sel)
    assert rel_err(out, oracle(q, k, v, sel)) < 1e-4


def test_reference_chunking_is_exact():
    """The reference's query chunking (bounded memory) does not change the result."""
    B, S, Hq, Hkv, D = 1, 37, 4, 2, 8
    q, k, v = random_qkv(B, S, S, Hq, Hkv, D, D, torch.float64)
    idx, counts = random_selection(B, Hkv, S, S, block_size=1, query_block=1, kmax=12)
    a = sparse_attention_reference(q, k, v, Selection(idx, counts), chunk_size=5)
    b = sparse_attention_reference(q, k, v, Selection(idx, counts), chunk_size=1000)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- bad input gets a clear error
def _ok_inputs():
    q, k, v = random_qkv(1, 8, 8, 2, 1, 16, 16, torch.float32)
    idx, counts = random_selection(1, 1, 8, 8, block_size=1, query_block=1, kmax=4)
    return q, k, v, idx, counts


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(q=a["q"].int()), "q.dtype"),  # fp64 is allowed on the CPU (PyTorch executors)
        (lambda a: a.update(k=a["k"].half()), "share one dtype"),
        (lambda a: a.update(v=a["v"][:, :4]), "must agree"),
        (lambda a: a.update(q=a["q"][..., :8]), "head dim"),
        (lambda a: a.update(q=torch.randn(1, 8, 3, 16), k=torch.randn(1, 8, 2, 16), v=torch.randn(1, 8, 2, 16)), "multiple"),
        (lambda a: a.update(block_size=8), "block_size=8"),
        (lambda a: a.update(query_block=3), "query_block=3"),
        (lambda a: a.update(idx=a["idx"].float()), "idx must be"),
        (lambda a: a.update(idx=a["idx"][:, :, :4], counts=a["counts"][:, :, :4]), "idx shape"),
        (lambda a: a.update(counts=a["counts"][..., :3]), "counts must be"),
        (lambda a: a["counts"].fill_(5), "counts must lie"),
        (lambda a: (a["idx"].__setitem__((0, 0, 7, 0), 99), a["counts"].__setitem__((0, 0, 7), 1)), "outside"),
        (lambda a: (a["idx"].__setitem__((0, 0, 2, 0), 6), a["counts"].__setitem__((0, 0, 2), 1)), "causal range"),
        (lambda a: a.update(sinks=torch.zeros(3)), "sinks"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, match):
    q, k, v, idx, counts = _ok_inputs()
    args = dict(q=q, k=k, v=v, idx=idx, counts=counts, block_size=1, query_block=1)
    mutate(args)
    sel = Selection(args.pop("idx"), args.pop("counts"), block_size=args.pop("block_size"),
                    query_block=args.pop("query_block"))
    with pytest.raises(ValueError, match=match):
        sparse_attention(args.pop("q"), args.pop("k"), args.pop("v"), sel, **args)


def test_cuda_without_triton_is_a_clear_error(monkeypatch):
    """A CUDA tensor on a machine without Triton must say what to install (simulated on CPU)."""
    import stem_boost.kernels.dispatch as sa

    class FakeCuda(torch.Tensor):
        @property
        def is_cuda(self):  # noqa: D401 - property override
            return True

    q, k, v, idx, counts = _ok_inputs()
    monkeypatch.setattr(sa, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="install triton"):
        sa.sparse_attention(q.as_subclass(FakeCuda), k, v, Selection(idx, counts))


def test_ordered_selection_skips_the_order_check(monkeypatch, seed):
    """A Selection marked `ordered` (its producer writes every row ascending) reaches the block
    kernel without the order check and its host synchronisation, with the reference's output; an
    unmarked one is still checked. InfLLMv2's selections come marked, and are ascending."""
    from stem_boost.kernels import dispatch
    from stem_boost.native.infllmv2 import InfLLMv2Params, infllmv2_select

    gen = torch.Generator().manual_seed(seed)
    B, S, Hq, Hkv, D, bs = 1, 96, 4, 2, 16, 16
    q, k, v = (torch.randn(B, S, h, D, generator=gen) for h in (Hq, Hkv, Hkv))
    idx, counts = random_selection(B, Hkv, S, S, block_size=bs, query_block=1, kmax=4, generator=gen)
    live = torch.arange(4) < counts[..., None]  # random_selection's live entries come in random order
    idx = torch.where(live, torch.where(live, idx, 1 << 20).sort(-1).values, -1).to(torch.int32)
    ref = sparse_attention_reference(q.double(), k.double(), v.double(), Selection(idx, counts, block_size=bs))

    def no_check(*args):
        raise AssertionError("the order check ran")

    monkeypatch.setattr(dispatch, "ascending_lists", no_check)
    out = sparse_attention(q, k, v, Selection(idx, counts, block_size=bs, ordered=True), backend="triton")
    assert float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)) < 1e-5, f"seed {seed}"
    with pytest.raises(AssertionError, match="order check ran"):
        sparse_attention(q, k, v, Selection(idx, counts, block_size=bs), backend="triton")

    params = InfLLMv2Params(kernel_size=16, kernel_stride=8, init_blocks=1, block_size=16, window_size=32, topk=4,
                            dense_len=0)
    sel = infllmv2_select(q.transpose(1, 2), k.transpose(1, 2), params, chunk_size=40).to_selection()
    assert sel.ordered
    live = torch.arange(sel.kmax) < sel.counts[..., None]
    gaps = sel.idx[..., 1:] - sel.idx[..., :-1]
    assert bool(((gaps > 0) | ~live[..., 1:]).all()) and bool((sel.idx[~live] == -1).all()), f"seed {seed}"
