"""GPU checks of the DSA prefill kernels at real sizes (run on the device: pytest -m gpu tests/test_gpu_dsa.py).

Fresh random inputs on every run (seed printed); oracles in fp32 / fp64 PyTorch.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _seed() -> int:
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    print(f"seed={seed}")
    torch.manual_seed(seed)
    return seed


@pytest.mark.parametrize("bits,method", [(8, "radix"), (11, "radix"), (8, "sampled"), (8, "warp")])
def test_gpu_topk_rows_exact_at_64k_keys(bits, method):
    """256 rows x 65536 keys, k 2048, with ties, -inf, OAM bias, budgets and causal limits."""
    from stem_boost.kernels.dsa_topk import topk_rows, topk_rows_reference

    seed = _seed()
    R, T, k = 256, 65536, 2048
    s = torch.randn(1, R, T, device="cuda")
    s[:, :, ::5] = torch.round(s[:, :, ::5] * 4) / 4  # exact ties
    s[torch.rand_like(s) < 0.05] = float("-inf")
    kw = dict(key_bias=torch.randn(1, T, device="cuda") * 0.1,
              budgets=torch.randint(0, k + 50, (1, R), device="cuda", dtype=torch.int32),
              valid_len=torch.randint(1, T + 1, (1, R), device="cuda", dtype=torch.int32))
    for args in (dict(), kw):
        want = topk_rows_reference(s, k, **args)
        got = topk_rows(s, k, bits=bits, method=method, **args)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), f"seed={seed}"


@pytest.mark.parametrize("maxnreg", [None, 72, 56])
def test_gpu_warp_topk_register_caps_keep_the_set(maxnreg):
    """The warp top-k's register cap (None: the compiler's 80; 72 the default; 56 spills) changes how
    many rows an SM holds, never the result: 512 causal rows at the end of 131072 keys, k 2048."""
    from stem_boost.kernels.dsa_topk import topk_rows, topk_rows_reference

    seed = _seed()
    R, T, k = 512, 131072, 2048
    s = torch.randn(1, R, T, device="cuda")
    s[:, :, ::7] = torch.round(s[:, :, ::7] * 4) / 4  # exact ties
    valid_len = (T - R + 1 + torch.arange(R, device="cuda", dtype=torch.int32)).view(1, R)
    want = topk_rows_reference(s, k, valid_len=valid_len)
    got = topk_rows(s, k, valid_len=valid_len, method="warp", maxnreg=maxnreg)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), f"seed={seed}"


@pytest.mark.parametrize("variant", [
    dict(method="block", search="bisect", skip_prefix=False), dict(method="block", search="bisect", skip_prefix=True),
    dict(method="block", search="interpolate"), dict(method="warp", num_warps=4), dict(method="warp", num_warps=1),
    dict(method="warp", num_warps=4, maxnreg=128), dict(method="warp", num_warps=1, maxnreg=168, skip_prefix=True),
    dict(method="warp", num_warps=2, skip_prefix=True, stash=True), dict(),
], ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()))
def test_gpu_candidate_cut_equals_radix_path_at_2048_candidates(variant):
    """Stem's one-pass cut (the default on CUDA) keeps the set of the gathered-score radix path on
    4096 rows of 2048 ascending candidates of 128K keys, with ties, -inf, OAM bias and budgets; one
    row a program with each search (the bisection from the top or below the shared prefix, the
    interpolation search) and one row a warp (4, 2 or 1 rows a program; register caps, one that spills;
    the prefix skipped; the keys stashed in the output row)."""
    from stem_boost.kernels.dsa_topk import candidate_cut, topk_rows

    seed = _seed()
    R, K, T = 4096, 2048, 131072
    cand = torch.sort(torch.randint(0, T, (1, 1, R, K), device="cuda"), dim=-1).values.int()
    cand[:, :, :, 1:][cand[:, :, :, 1:] == cand[:, :, :, :-1]] = -1  # duplicates -> holes
    cand = torch.sort(torch.where(cand < 0, T, cand), dim=-1).values
    cand = torch.where(cand == T, -1, cand).int()  # ascending, -1 at the end
    scores = torch.round(torch.randn(1, 1, R, K, device="cuda") * 8) / 8
    scores[torch.rand_like(scores) < 0.05] = float("-inf")
    bias = torch.randn(1, 1, T, device="cuda") * 0.1
    budgets = torch.randint(0, K + 10, (1, 1, R), device="cuda", dtype=torch.int32)
    got_idx, got_n = candidate_cut(cand, scores, budgets, key_bias=bias, **variant)
    oam = torch.where(cand >= 0, scores + bias[0, 0][cand.clamp_min(0).long()], float("-inf"))
    cols, want_n = topk_rows(oam.view(1, R, K), K, budgets=budgets.view(1, R))
    want_idx = torch.where(cols >= 0, cand.view(1, R, K).gather(-1, cols.clamp_min(0).long()), -1)
    assert torch.equal(got_n.view(1, R), want_n), f"seed={seed}"
    assert torch.equal(got_idx.view(1, R, K), want_idx), f"seed={seed}"


@pytest.mark.parametrize("H", [128, 64])
def test_gpu_mla_token_matches_reference(H):
    """Absorbed MLA (576 / 512, one latent head), top-2048 selections, bf16, vs the fp32 reference."""
    from stem_boost.kernels.mla_token import mla_token_attention
    from stem_boost.kernels.reference import sparse_attention_reference
    from stem_boost.selection import Selection

    seed = _seed()
    S, T, k = 40, 4096, 2048
    q = torch.randn(1, S, H, 576, device="cuda").to(torch.bfloat16)
    kv = torch.randn(1, T, 1, 576, device="cuda").to(torch.bfloat16)
    pos = torch.arange(S, device="cuda") + T - S
    r = torch.where(torch.arange(T, device="cuda")[None, :] <= pos[:, None], torch.rand(S, T, device="cuda"), -1.0)
    idx = r.topk(k, dim=-1).indices.sort(dim=-1).values.to(torch.int32).view(1, 1, S, k)
    counts = torch.full((1, 1, S), k, dtype=torch.int32, device="cuda")
    counts[0, 0, :3] = torch.tensor([0, 5, 700], device="cuda")
    want, want_lse = sparse_attention_reference(q.float(), kv.float(), kv[..., :512].float(),
                                                Selection(idx=idx, counts=counts), sm_scale=576 ** -0.5,
                                                return_lse=True)
    got, lse = mla_token_attention(q, kv, idx, counts, sm_scale=576 ** -0.5, return_lse=True)
    err = float((got.float() - want).norm() / want.norm())
    assert err < 1e-2, f"seed={seed} rel err {err}"
    live = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), live), f"seed={seed}"
    assert float((lse[live] - want_lse[live]).abs().max()) < 1e-2, f"seed={seed}"


def test_gpu_fp8_index_scores():
    """FP8 scores equal their quantised definition; top-2048 overlap with fp32 is reported."""
    from stem_boost.kernels.dsa_topk import topk_rows
    from stem_boost.kernels.indexer_scores import fp8_index_scores, fp8_index_scores_reference

    seed = _seed()
    S, T, H, D = 128, 8192, 64, 128
    q = torch.randn(1, S, H, D, device="cuda").to(torch.bfloat16)
    k = torch.randn(1, T, D, device="cuda").to(torch.bfloat16)
    w = torch.randn(1, S, H, device="cuda") * H ** -0.5
    got = fp8_index_scores(q, k, w, D ** -0.5)
    ref = fp8_index_scores_reference(q, k, w, D ** -0.5)
    err = float((got.double() - ref).norm() / ref.norm())
    assert err < 1e-3, f"seed={seed} rel err {err}"
    per_head = torch.relu(torch.einsum("bshd,btd->bsht", q.double(), k.double()) * D ** -0.5)
    exact = torch.einsum("bsh,bsht->bst", w.double(), per_head)
    a, _ = topk_rows(got, 2048)
    b, _ = topk_rows(exact.float(), 2048)
    overlap = sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a[0], b[0])) / (S * 2048)
    print(f"top-2048 overlap fp8 vs fp32: {overlap:.4f}")
    assert overlap > 0.8, f"seed={seed} overlap {overlap}"


def test_gpu_fused_fp8_quantiser_and_keys_quantised_once():
    """The one-pass quantiser gives the definition's e4m3 codes (>= 99.9%, the rest one step apart
    from fp32 sum order) at indexer sizes; the chunked FP8 indexer, which quantises the keys once,
    keeps the same top-k as the FP8 scores of the whole row block."""
    from stem_boost.kernels.dsa_topk import topk_rows
    from stem_boost.kernels.indexer_scores import (fp8_index_scores, hadamard_matrix, quantize_fp8_rows,
                                                   quantize_fp8_rows_fused)
    from stem_boost.native.dsa_indexer import chunked_index_topk

    seed = _seed()
    x = torch.randn(4096, 64, 128, device="cuda").to(torch.bfloat16) * 3
    want8, want_s = quantize_fp8_rows(x, hadamard_matrix(128, "cuda"))
    got8, got_s = quantize_fp8_rows_fused(x)
    same = float((got8.view(torch.uint8) == want8.view(torch.uint8)).float().mean())
    assert same > 0.999, f"seed={seed} same codes {same}"
    torch.testing.assert_close(got_s, want_s, rtol=1e-5, atol=0, msg=f"seed={seed}")
    S, H, D, k = 3000, 64, 128, 512
    q = torch.randn(1, S, H, D, device="cuda").to(torch.bfloat16)
    kk = torch.randn(1, S, D, device="cuda").to(torch.bfloat16)
    w = torch.randn(1, S, H, device="cuda") * H ** -0.5
    top = chunked_index_topk(q, kk, w, None, k, D ** -0.5, score_dtype="fp8", chunk_rows=700)
    full = fp8_index_scores(q, kk, w, D ** -0.5, causal_offset=0)
    want_idx, want_n = topk_rows(full, k)
    assert torch.equal(top.indices, torch.where(torch.arange(k, device="cuda") < want_n[..., None], want_idx, -1)), \
        f"seed={seed}"


def test_gpu_fused_interleaved_rope_equals_the_model_function():
    """On the GPU too, the fused interleaved rotation equals transformers' DeepSeek-V3.2 function
    bit for bit (bf16, the layer's strided query view, 128 heads x 2048 tokens)."""
    from transformers.models.deepseek_v32 import modeling_deepseek_v32 as mod

    from stem_boost.kernels.rope import rope_interleaved_fused

    seed = _seed()
    B, H, S = 1, 128, 2048
    q_rot = torch.randn(B, S, H, 192, device="cuda").to(torch.bfloat16).transpose(1, 2)[..., 128:]
    k_rot = torch.randn(B, 1, S, 64, device="cuda").to(torch.bfloat16)
    angles = torch.rand(B, S, 32, device="cuda") * 100.0
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(torch.bfloat16)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(torch.bfloat16)
    q_ref, k_ref = mod.apply_rotary_pos_emb_interleave(q_rot, k_rot, cos, sin)
    assert torch.equal(rope_interleaved_fused(q_rot, cos, sin), q_ref), f"seed={seed}"
    assert torch.equal(rope_interleaved_fused(k_rot, cos, sin), k_ref), f"seed={seed}"


def test_gpu_latent_value_rms_on_the_tensor_cores_equals_fp64():
    """DeepSeek-V3.2's OAM value RMS on the tensor cores (G as two bf16 halves) against the fp64
    product on the same bf16 latent: 16K + 5 keys (a ragged last tile), two batch rows, L 512,
    128 heads x Dv 128; within 2e-5 relative, like the fp32 product it replaces."""
    from stem_boost.adapters.dsa import latent_value_rms

    seed = _seed()
    latent = torch.randn(2, 16389, 512, device="cuda").to(torch.bfloat16)
    w_uv = (torch.randn(128, 128, 512, device="cuda") * 0.02).to(torch.bfloat16)
    w = w_uv.double()
    gram = torch.einsum("hvl,hvm->lm", w, w) / 128
    c = latent.double()
    want = ((c @ gram) * c).sum(-1).clamp_min(0).sqrt()[:, None]
    for tensor_cores in (True, False):
        got = latent_value_rms(latent, w_uv, tensor_cores=tensor_cores)
        rel = ((got.double() - want).abs() / want).max().item()
        assert rel < 2e-5, f"seed={seed} tensor_cores={tensor_cores}: max rel. err {rel:.2e}"


def test_gpu_stem_cut_in_the_indexer_loop_equals_the_cut_after_it():
    """The DeepSeek-V3.2 layer at real dims (FP8 indexer, the warp top-k's ascending lists, the absorbed
    MLA kernel), 8192 tokens in 32 indexer chunks of 256 rows: Stem's cut inside the indexer's loop (on a
    side stream, and on the current one) keeps the selection of the cut after the loop (the default), and
    the layer's output is the same."""
    import stem_boost
    from stem_boost.adapters import dsa
    from stem_boost.bench.inputs import dsa_bench_layer

    seed = _seed()
    attn, cfg, rotary = dsa_bench_layer("cuda", seed=seed % 10_000)

    class Holder(torch.nn.Module):  # the layer as a model `wrap` finds
        def __init__(self):
            super().__init__()
            self.attn, self.config = attn, cfg

    holder, S = Holder(), 8192
    x = torch.randn(1, S, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(S, device="cuda")[None]
    pe = rotary(x, pos)
    stem_boost.wrap(holder, reduce=0.15, keep_selections=True, indexer_max_bytes=1024 * S * 4 + 2**20)  # 256-row chunks
    got = {}
    for place, side in (("after", False), ("chunks", False), ("chunks", True)):
        saved = dsa.CUT_PLACE, dsa.CUT_ON_SIDE_STREAM
        dsa.CUT_PLACE, dsa.CUT_ON_SIDE_STREAM = place, side
        try:
            with torch.no_grad():
                out = attn(x, pe, None, position_ids=pos)[0]
        finally:
            dsa.CUT_PLACE, dsa.CUT_ON_SIDE_STREAM = saved
        got[place, side] = (out, stem_boost.last_selections(holder)[0], stem_boost.stats(holder)["reduce_achieved"])
    want, want_sel, want_r = got["after", False]
    for key in (("chunks", False), ("chunks", True)):  # in the loop on the current stream, and on the side one
        out, sel, r = got[key]
        assert torch.equal(sel.counts, want_sel.counts) and torch.equal(sel.idx, want_sel.idx), (key, f"seed={seed}")
        assert torch.equal(out, want), (key, f"seed={seed}")
        assert r == want_r and abs(r - 0.15) < 0.01, (key, r, want_r)
    stem_boost.unwrap(holder)
