"""Build report: every Triton kernel of the library compiled for a GPU architecture, without a GPU.

Each case calls a host wrapper the way the model paths call it on a GPU (real head counts, head dims,
block sizes, top-k; the key length of a 128K prefill where a constexpr depends on it) with CPU
tensors inside `kernels.aot.compile_only`, so the kernels compile for sm_`arch` and do not run.
The table gives registers per thread, spill bytes, shared memory, warps resident per SM and the
tensor-core / TMA instructions of each specialisation (the JSON adds a hash of its PTX
instructions): a spill, a Hopper dot that fell back to `mma.sync`, low occupancy or a compile
error shows here on any machine, before device time is spent.

    stem-boost build                       # sm_90 (H100 / H200), every case
    stem-boost build --cases union select  # cases whose name contains one of the words
    stem-boost build --json builds.json
    stem-boost build --compare builds.json # after a change: which kernels compile to other code
    stem-boost build --cases mla --dump asm/  # the TTGIR and PTX, to read what the pipeliner did
    stem-boost build --cases sm90 --sass   # from the SASS: where ptxas put the wgmma waits, and how much
                                           # of the epilogue runs beside a product
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

BF16 = torch.bfloat16
ARCHS = (80, 86, 89, 90, 100)  # compute capabilities x10 the build can target (sm_90: what the tests hold)


@dataclass
class BuildCase:
    """One host-wrapper call at production shapes; `run` makes its launches (compiled, not run)."""

    name: str
    what: str
    run: Callable[[], None]


def _lists(B: int, H: int, R: int, k: int, n_units: int, *, query_block: int, unit_rows: int = 1) -> tuple:
    """Causally valid ascending lists: row r keeps min(k, visible) of its visible units (the last k)."""
    visible = torch.clamp((torch.arange(R) * query_block + query_block - 1 + (n_units * unit_rows - R * query_block))
                          // unit_rows + 1, 1, n_units)
    counts = torch.clamp(visible, max=k).to(torch.int32)
    cols = torch.arange(k)
    idx = (visible[:, None] - counts[:, None] + cols[None]).to(torch.int32)
    idx = torch.where(cols[None] < counts[:, None], idx, torch.full_like(idx, -1))
    return idx.expand(B, H, R, k).contiguous(), counts.expand(B, H, R).contiguous()


def union_case(G: int, Hkv: int, query_block: int = 1, D: int = 128, S: int = 256, T: int = 4096,
               kernel: str = "triton") -> BuildCase:
    """The block walk of `block_union_attention` by `kernel` ("triton", "sm90": the Gluon kernel, or
    "sm90_ws": its warp-specialised 128-row tile on row lists)."""
    from ..kernels.block_union import block_union_attention

    def run():
        q = torch.randn(1, S, G * Hkv, D, dtype=BF16)
        k, v = torch.randn(1, T, Hkv, D, dtype=BF16), torch.randn(1, T, Hkv, D, dtype=BF16)
        R = -(-S // query_block)
        idx, counts = _lists(1, Hkv, R, 16, T // 64, query_block=query_block, unit_rows=64)
        block_union_attention(q, k, v, idx, counts, block_size=64, query_block=query_block, kernel=kernel)

    rows = "per-token lists" if query_block == 1 else f"lists per {query_block} queries"
    what = {"triton": "; Triton", "sm90": "; the Gluon kernel for Hopper (the default there)",
            "sm90_ws": "; the warp-specialised Gluon kernel for Hopper (128-row tiles)"}[kernel]
    return BuildCase(f"union G{G}" + ("" if query_block == 1 else f" qb{query_block}")
                     + ("" if kernel == "triton" else f" {kernel}"),
                     f"block-sparse attention, {G * Hkv} q / {Hkv} kv heads, d {D}, blocks of 64, {rows}{what}", run)


def select_case(stem: str | None, G: int = 16, Hk: int = 2, S: int = 128, T: int = 131072,
                fused: bool = False, topk_method: str = "program") -> BuildCase:
    """stem: None (native), "budgets" (Stem's bias and budgets given) or "mass" (budgets computed from
    each chunk's pooled scores). The default three-launch layout, or with `fused` the two-launch one
    (`fuse_topk=True`: pooling and top-k in one program); topk_method: the three-launch top-k's
    ("program" or "warp": one row a warp)."""
    from ..kernels.infllmv2_select import infllmv2_select_fused
    from ..native.infllmv2 import InfLLMv2Params

    def run():
        p = InfLLMv2Params()  # MiniCPM-4.1's sparse_config
        q = torch.randn(1, G * Hk, S, 128, dtype=BF16)
        k = torch.randn(1, Hk, T, 128, dtype=BF16)
        kw = {}
        if stem:
            kw = dict(key_bias=torch.randn(1, Hk, T // p.block_size), kmax=p.topk + p.window_size // p.block_size)
            if stem == "mass":
                kw["chunk_budgets"] = lambda pooled, s0, s1: torch.full((s1 - s0,), 40, dtype=torch.int32)
            else:
                kw["budgets"] = torch.full((S,), 40, dtype=torch.int32)
        infllmv2_select_fused(q, k, p, q_offset=T - S, fuse_topk=fused, topk_method=topk_method, **kw)

    what = {None: "", "budgets": ", Stem's bias and budgets", "mass": ", Stem's bias, budgets from the pooled scores"}
    warp = topk_method == "warp"
    return BuildCase(f"select {stem or 'native'}{' fused' if fused else ''}{' warp-topk' if warp else ''}",
                     f"InfLLMv2 stage 1 + pooling + top-k, MiniCPM-4.1 ({G * Hk} q / {Hk} kv heads), 128K keys"
                     + what[stem] + (", pooling and top-k in one launch" if fused else "")
                     + (", the top-k one row a warp" if warp else ""), run)


def select_g3_case(S: int = 128, T: int = 8192) -> BuildCase:
    from ..kernels.infllmv2_select import infllmv2_select_fused
    from ..native.infllmv2 import InfLLMv2Params

    def run():
        p = InfLLMv2Params(topk=12, window_size=256, block_size=64, dense_len=0)
        q, k = torch.randn(1, 9, S, 64, dtype=BF16), torch.randn(1, 3, T, 64, dtype=BF16)
        infllmv2_select_fused(q, k, p, q_offset=T - S)

    return BuildCase("select G3", "InfLLMv2 selection, the SmolLM2 testbed (9 q / 3 kv heads, d 64: a group that is "
                                  "not a power of two, per-head coarse lse)", run)


def stage1_case(G: int = 16, Hk: int = 2, C: int = 128, T: int = 131072) -> BuildCase:
    from ..kernels.infllmv2_scores import fused_stage1_scores

    def run():
        K1, K2 = T // 16, T // 64
        q = torch.randn(1, G * Hk, C, 128, dtype=BF16)
        k1, k2 = torch.randn(1, Hk, K1, 128, dtype=BF16), torch.randn(1, Hk, K2, 128, dtype=BF16)
        vis = torch.full((C,), K1, dtype=torch.int32)
        fused_stage1_scores(q, k1, k2, vis, vis // 4, 128 ** -0.5)

    return BuildCase("stage1 scores", "InfLLMv2 stage-1 compressed scores, group-summed (the PyTorch selection's "
                                      "GPU scorer), MiniCPM-4.1, 128K keys", run)


def indexer_case(dtype: str, stem: bool = False, S: int = 128, T: int = 131072, head_dim: int = 128) -> BuildCase:
    from ..kernels.dsa_topk import indexer_topk

    def run():
        q = torch.randn(1, S, 64, head_dim, dtype=BF16)
        k = torch.randn(1, T, head_dim, dtype=BF16)
        w = torch.randn(1, S, 64)
        kw = dict(key_bias=torch.randn(1, T), budgets=torch.full((1, S), 1700, dtype=torch.int32)) if stem else {}
        indexer_topk(q, k, w, head_dim ** -0.5, 2048, dtype=dtype, **kw)

    if head_dim != 128:  # the smallest head dim the FP8 scorer takes (FP8 MMA: K >= 32)
        return BuildCase(f"indexer {dtype} d{head_dim}", f"lightning indexer ({dtype}, 64 heads, d {head_dim}) + "
                         "radix top-2048, 128K keys", run)
    return BuildCase(f"indexer {dtype}" + (" stem" if stem else ""),
                     f"DeepSeek-V3.2 lightning indexer ({dtype}, 64 heads, d 128) + radix top-2048, 128K keys"
                     + (", Stem's bias and budgets" if stem else ""), run)


def sampled_topk_case(R: int = 64, T: int = 131072) -> BuildCase:
    from ..kernels.dsa_topk import topk_rows

    def run():
        topk_rows(torch.randn(1, R, T), 2048, key_bias=torch.randn(1, T), budgets=torch.full((1, R), 1700, dtype=torch.int32),
                  valid_len=torch.full((1, R), T, dtype=torch.int32), method="sampled")

    return BuildCase("topk sampled", "DSA top-2048 of 128K-key rows by a sampled threshold, one read of the row, "
                                     "and the exact top-k of the kept keys (radix select as the fallback)", run)


def warp_topk_case(R: int = 64, T: int = 131072) -> BuildCase:
    from ..kernels.dsa_topk import topk_rows

    def run():  # as the chunked indexer calls it: causal row lengths, indices and scores into the result
        idx, scores = torch.empty(1, R, 2048, dtype=torch.int32), torch.empty(1, R, 2048)
        topk_rows(torch.randn(1, R, T), 2048, valid_len=torch.full((1, R), T, dtype=torch.int32), method="warp",
                  out=idx, out_scores=scores)

    return BuildCase("topk warp", "DSA top-2048 of 128K-key rows, one row a warp (the default): a sampled "
                                  "threshold, one read of the row, the exact top-k of the kept keys", run)


def indexer_sm90_case(S: int = 128, T: int = 131072, tile: dict | None = None) -> BuildCase:
    from ..kernels.indexer_scores_sm90 import fp8_index_scores_sm90

    def run():  # as the chunked indexer calls it with FP8_SCORER "sm90": a causal chunk at the end of 128K keys
        q = torch.randn(1, S, 64, 128, dtype=BF16)
        fp8_index_scores_sm90(q, torch.randn(1, T, 128, dtype=BF16), torch.randn(1, S, 64), 128 ** -0.5,
                              causal_offset=T - S, write_masked=False, tile=tile)

    return BuildCase(f"indexer fp8 sm90{_tile_label(tile)}",
                     "DeepSeek-V3.2 FP8 indexer scores in Gluon for Hopper (opt-in: the next head's product beside "
                     f"this head's sum){f'; tile {tile}' if tile else ''}", run)


def _tile_label(tile: dict | None) -> str:
    """A build case's name suffix for a Gluon tile override: ' step4 block_t64'."""
    return "" if not tile else " " + " ".join(f"{k.lower()}{v}" for k, v in tile.items())


def pooled_sm90_case(G: int = 16, Hk: int = 2, C: int = 128, T: int = 131072, stem: bool = False,
                     tile: dict | None = None) -> BuildCase:
    from ..kernels.infllmv2_pooled_sm90 import pooled_block_scores_sm90

    def run():  # MiniCPM-4.1's stage 1 on the last chunk of a 128K prefill (pool 4, bf16 rounding)
        K1, NB = T // 16, T // 64
        pooled_block_scores_sm90(torch.randn(1, G * Hk, C, 128, dtype=BF16), torch.randn(1, Hk, K1, 128, dtype=BF16),
                                 torch.randn(1, G * Hk, C), torch.full((C,), K1, dtype=torch.int32), NB, 4,
                                 128 ** -0.5, q_pos0=T - C, block_size=64, round_to=BF16,
                                 key_bias=torch.randn(1, Hk, NB) if stem else None, tile=tile)

    label = (" stem" if stem else "") + _tile_label(tile)
    return BuildCase(f"select pooled sm90{label}",
                     "InfLLMv2 stage-1 pooled scores in Gluon for Hopper (the selection's path there: the next head's "
                     f"product beside this head's exponentials){'; with Stem OAM keys' if stem else ''}"
                     f"{f'; tile {tile}' if tile else ''}", run)


def coarse_lse_case(block_n: int = 64, num_stages: int | None = None, G: int = 16, Hk: int = 2, C: int = 128,
                    T: int = 131072) -> BuildCase:
    from ..kernels.infllmv2_scores import coarse_lse

    def run():  # MiniCPM-4.1's coarse level (stride 64) on the last chunk of a 128K prefill
        K2 = T // 64
        coarse_lse(torch.randn(1, G * Hk, C, 128, dtype=BF16), torch.randn(1, Hk, K2, 128, dtype=BF16),
                   torch.full((C,), K2, dtype=torch.int32), 128 ** -0.5, block_n=block_n, num_stages=num_stages)

    label = ("" if block_n == 64 else f" n{block_n}") + ("" if num_stages is None else f" s{num_stages}")
    return BuildCase(f"coarse lse{label}", f"InfLLMv2 coarse log-sum-exp, {block_n} keys a step, "
                                           f"{num_stages or 'default'} stages (its shared memory sets the SM's warps)",
                     run)


# the row selections' threshold searches (`candidate_cut`, `block_topk`), as a case's description names them
SEARCH_NAMES = {"bisect": "bisection", "interpolate": "interpolation search"}


def stem_cut_case(R: int = 64, K: int = 2048, T: int = 131072, search: str = "bisect",
                  skip_prefix: bool = False, method: str = "block") -> BuildCase:
    from ..kernels.dsa_topk import candidate_cut

    def run():
        cand = torch.arange(K, dtype=torch.int32).expand(1, 1, R, K).contiguous()
        scores = torch.randn(1, 1, R, K)
        candidate_cut(cand, scores, torch.full((1, 1, R), 1700, dtype=torch.int32), key_bias=torch.randn(1, 1, T),
                      search=search, skip_prefix=skip_prefix, method=method)

    label = ("" if search == "bisect" else f" {search}") + (" prefix" if skip_prefix else "")
    if method == "warp":
        return BuildCase("stem cut warp", "Stem's cut of the DSA top-2048 candidates, one row a warp (OAM bias "
                                          "gathered, budget by bisection), one pass", run)
    return BuildCase(f"stem cut{label}", f"Stem's cut of the DSA top-2048 candidates (OAM bias gathered, budget by "
                                         f"{SEARCH_NAMES[search]}"
                                         + (", the shared prefix skipped" if skip_prefix else "") + "), one pass", run)


def block_topk_case(search: str, C: int = 64, NB: int = 2048, Hk: int = 2) -> BuildCase:
    from ..kernels.infllmv2_select import block_topk

    def run():  # the last rows of a 128K MiniCPM-4.1 prefill: 2048 key blocks of 64, Stem's bias and budgets
        block_topk(torch.randn(1, Hk, C, NB), q_pos0=NB * 64 - C, block_size=64, init_blocks=1, local_blocks=32,
                   k_total=96, key_bias=torch.randn(1, Hk, NB), budgets=torch.full((C,), 50, dtype=torch.int32),
                   kmax=96, search=search)

    return BuildCase(f"block topk {search}", "InfLLMv2 block top-k alone (2048 blocks, Stem's bias and budgets), "
                                             f"the threshold by {SEARCH_NAMES[search]}", run)


def grouped_topk_case(C: int = 64, NB: int = 2048, Hk: int = 2, group: int = 4) -> BuildCase:
    from ..kernels.infllmv2_select import block_topk, group_block_sums

    def run():  # Stem's grouped ranking at the end of a 128K MiniCPM-4.1 prefill: 4 rows a group
        scores = torch.rand(1, Hk, C, NB)
        q_pos0 = NB * 64 - C
        group_block_sums(scores, group, q_pos0=q_pos0, block_size=64, spread=False)
        block_topk(scores[:, :, ::group], q_pos0=q_pos0 // group, block_size=64 // group, init_blocks=1,
                   local_blocks=32, k_total=96, key_bias=torch.randn(1, Hk, NB),
                   budgets=torch.full((C // group,), 50, dtype=torch.int32), kmax=96)

    return BuildCase("grouped topk", "Stem's grouped ranking on InfLLMv2: 4 rows' scores summed in place, then the "
                                     "block top-k on the groups' first rows (2048 blocks, bias, budgets)", run)


def mla_case(S: int = 64, T: int = 4096, heads: int = 128) -> BuildCase:
    from ..kernels.dispatch import sparse_attention
    from ..selection import Selection

    def run():
        q = torch.randn(1, S, heads, 576, dtype=BF16)
        kv = torch.randn(1, T, 1, 576, dtype=BF16)
        idx, counts = _lists(1, 1, S, 2048, T, query_block=1)
        sel = Selection(idx=idx, counts=counts, block_size=1, query_block=1)
        sparse_attention(q, kv, kv[..., :512], sel, backend="triton")

    return BuildCase(f"mla token h{heads}", f"token-sparse absorbed MLA (DeepSeek-V3.2), {heads} heads, d 576 / 512, "
                                             "top-2048", run)


def mla_experimental_case(S: int = 64, T: int = 4096) -> BuildCase:
    from ..kernels.mla_token import mla_token_attention

    def run():
        q = torch.randn(1, S, 128, 576, dtype=BF16)
        kv = torch.randn(1, T, 1, 576, dtype=BF16)
        idx, counts = _lists(1, 1, S, 2048, T, query_block=1)
        mla_token_attention(q, kv, idx[:, 0], counts[:, 0])

    return BuildCase("mla token split", "the heads-on-M MLA kernel with the value width split (mla_token.py)", run)


def mla_gluon_case(kernel: str, S: int = 64, T: int = 4096, tiles: dict | None = None) -> BuildCase:
    """A Hopper MLA token kernel in Gluon, 128 heads: "sm90" (mla_token_sm90.py, the 128-key tile) or
    "ws" (mla_token_ws.py, warp-specialised: the route; `tiles` overrides its WS_TILES)."""
    from ..kernels.mla_token_sm90 import mla_token_attention_sm90
    from ..kernels.mla_token_ws import mla_token_attention_ws

    fn, what = {"sm90": (mla_token_attention_sm90, "the Hopper MLA token kernel in Gluon (mla_token_sm90.py)"),
                "ws": (mla_token_attention_ws, "the warp-specialised Hopper MLA token kernel (mla_token_ws.py)")}[kernel]
    extra = {"tiles": tiles} if tiles else {}

    def run():
        q = torch.randn(1, S, 128, 576, dtype=BF16)
        kv = torch.randn(1, T, 1, 576, dtype=BF16)
        idx, counts = _lists(1, 1, S, 2048, T, query_block=1)
        fn(q, kv, idx[:, 0], counts[:, 0], return_lse=True, **extra)

    name = f"mla token {kernel}" + "".join(f" {k}={v}" for k, v in (tiles or {}).items())
    return BuildCase(name, f"{what}, 128 heads" + (f", tiles {tiles}" if tiles else ""), run)


def gqa_token_case() -> BuildCase:
    from ..kernels.dispatch import sparse_attention
    from ..selection import Selection

    def run():
        S, T = 64, 4096
        q, k, v = torch.randn(1, S, 9, 64, dtype=BF16), torch.randn(1, T, 3, 64, dtype=BF16), torch.randn(1, T, 3, 64, dtype=BF16)
        idx, counts = _lists(1, 1, S, 1024, T, query_block=1)
        sparse_attention(q, k, v, Selection(idx=idx, counts=counts, block_size=1, query_block=1), backend="triton")

    return BuildCase("gqa token", "token-sparse GQA attention (the SmolLM2 DSA testbed: 9 q / 3 kv heads, d 64)", run)


def rope_case(S: int = 4096) -> BuildCase:
    from ..kernels.rope import rope_half_fused

    def run():
        q = torch.randn(2, S, 32, 128, dtype=BF16).transpose(1, 2)  # [B, H, S, D] view, as the attention has it
        cos = torch.randn(2, S, 128)
        rope_half_fused(q, cos, cos, head_axis=1)

    return BuildCase("rope", "MiniCPM-4's fp32 half-split RoPE in one pass (32 heads, d 128, batch 2)", run)


def rope_interleaved_case(S: int = 4096) -> BuildCase:
    from ..kernels.rope import rope_interleaved_fused

    def run():  # DeepSeek-V3.2's MLA rope columns: a strided view of the query projection
        q = torch.randn(1, S, 128, 192, dtype=BF16).transpose(1, 2)[..., 128:]
        cos = torch.randn(1, S, 64, dtype=BF16)
        rope_interleaved_fused(q, cos, cos, out=torch.empty(1, 128, S, 576, dtype=BF16)[..., 512:])

    return BuildCase("rope interleaved", "DeepSeek-V3.2's interleaved MLA RoPE in one pass into the absorbed "
                                         "queries (128 heads, d 64)", run)


def rope_half_rounded_case(S: int = 4096) -> BuildCase:
    from ..kernels.rope import rope_half_rounded_fused

    def run():  # DeepSeek-V3.2's indexer queries: the 64 rope channels of 64 heads x 128, in place
        q = torch.randn(1, S, 64, 128, dtype=BF16)
        cos = torch.randn(1, S, 64, dtype=BF16)
        rope_half_rounded_fused(q[..., :64], cos, cos, head_axis=2, out=q[..., :64])

    return BuildCase("rope half rounded", "DeepSeek-V3.2's indexer RoPE (half-split, bf16 rounding as PyTorch's ops) "
                                          "in place, one pass (64 heads, d 64 of 128)", run)


def value_rms_case(T: int = 4096, L: int = 512) -> BuildCase:
    from ..kernels.quadratic_form import quadratic_form_sqrt

    def run():
        quadratic_form_sqrt(torch.randn(1, T, L, dtype=BF16), torch.randn(L, L))

    return BuildCase("value rms", "DeepSeek-V3.2's OAM value RMS: sqrt(c^T G c) per latent row, G as two bf16 "
                                  "halves on the tensor cores (L 512)", run)


def all_cases() -> list[BuildCase]:
    return [
        union_case(16, 2), union_case(8, 4), union_case(6, 8), union_case(4, 8), union_case(1, 16),
        union_case(16, 2, query_block=64), union_case(16, 2, kernel="sm90"), union_case(6, 8, kernel="sm90"),
        union_case(16, 2, query_block=64, kernel="sm90"), union_case(16, 2, query_block=64, kernel="sm90_ws"),
        union_case(6, 8, query_block=64, kernel="sm90_ws"), union_case(16, 2, kernel="sm90_ws"), union_case(6, 8, kernel="sm90_ws"),
        select_case(None), select_case("budgets"), select_case("mass"), select_case(None, fused=True),
        select_case(None, topk_method="warp"), select_case("budgets", topk_method="warp"),
        select_g3_case(), stage1_case(), pooled_sm90_case(), pooled_sm90_case(stem=True),
        pooled_sm90_case(tile=dict(STEP=0)),  # the serialised pairs of heads (the default before STEP 2)
        pooled_sm90_case(tile=dict(BLOCK_B=16, NUM_BUF=3)), pooled_sm90_case(tile=dict(STEP=4, NUM_BUF=3)),
        pooled_sm90_case(stem=True, tile=dict(STEP=4, NUM_BUF=3)), pooled_sm90_case(tile=dict(BLOCK_B=64, WARPS=8, STEP=4)),
        coarse_lse_case(), coarse_lse_case(num_stages=2),
        coarse_lse_case(block_n=32),
        indexer_case("bfloat16"), indexer_case("fp8"), indexer_case("fp8", head_dim=32), indexer_case("bfloat16", stem=True),
        indexer_sm90_case(), indexer_sm90_case(tile=dict(STEP=4, BLOCK_T=64)),
        stem_cut_case(), stem_cut_case(skip_prefix=True), stem_cut_case(search="interpolate"),
        stem_cut_case(method="warp"),
        block_topk_case("bisect"), block_topk_case("interpolate"), grouped_topk_case(), sampled_topk_case(),
        warp_topk_case(),
        mla_case(), mla_case(heads=64), mla_experimental_case(), mla_gluon_case("sm90"), mla_gluon_case("ws"),
        mla_gluon_case("ws", tiles=dict(SWEEP=66)),
        gqa_token_case(), rope_case(), rope_interleaved_case(), rope_half_rounded_case(), value_rms_case(),
    ]


def build_case(case: BuildCase, arch: int = 90, dump: str | None = None, sass: bool = False) -> list[dict]:
    """Compile one case for sm_`arch`: one row per kernel specialisation (case name first), or one row
    with "error" where the arch cannot build it (e.g. FP8 before sm_89). sass: also read each tensor-core
    kernel's pipeline from its machine code (`bench.sass.read_pipeline`: waits, epilogue beside a product)."""
    from ..kernels.aot import compile_only

    try:
        with compile_only(arch, keep_asm=dump is not None or sass) as builds:
            case.run()
    except Exception as e:  # a kernel this arch cannot build: report, go on
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        return [{"case": case.name, "name": "-", "error": f"{type(e).__name__}: {lines[-1] if lines else ''}"}]
    if not builds:
        raise RuntimeError(f"case {case.name!r} launched no Triton kernel")
    if dump is not None:
        folder = Path(dump)
        folder.mkdir(parents=True, exist_ok=True)
        for n, b in enumerate(builds):
            stem = f"{case.name.replace(' ', '_')}.{b.name}" + (f".{n}" if len(builds) > 1 else "")
            for kind, text in b.asm.items():
                (folder / f"{stem}.{kind}").write_text(text)
    rows = [{"case": case.name, **b.row()} for b in builds]
    if sass:
        from .sass import disassemble, read_pipeline

        for row, b in zip(rows, builds):
            if b.wgmma:
                reading = read_pipeline(disassemble(b.cubin))
                row["gmma_waits"] = " ".join(f"{n}:{c}" for n, c in reading.waits.items()) or "-"
                row["epilogue_beside"] = f"{reading.beside}/{reading.epilogue}" if reading.epilogue else "-"
    return rows


_POOL_CASES: list[BuildCase] = []  # the cases a forked worker of `build(jobs > 1)` compiles by index


def _build_in_worker(i: int, arch: int, dump: str | None, sass: bool) -> list[dict]:
    return build_case(_POOL_CASES[i], arch, dump, sass)


def build(cases: list[BuildCase], arch: int = 90, progress: bool = True, dump: str | None = None,
          jobs: int = 1, sass: bool = False) -> list[dict]:
    """Compile every case for sm_`arch`; one row per kernel specialisation (case name first), in the
    order of `cases`. dump: a folder to write each kernel's TTGIR and PTX to (`<case>.<kernel>.ttgir`
    / `.ptx`). jobs > 1: that many forked processes (Triton's front end and ptxas are single-threaded:
    two cores halve the wall time)."""
    import multiprocessing
    from functools import partial

    from tqdm.auto import tqdm

    bar = tqdm(total=len(cases), desc=f"compiling for sm_{arch}", disable=not progress)
    if jobs <= 1 or len(cases) <= 1:
        rows = []
        for case in cases:
            rows += build_case(case, arch, dump, sass)
            bar.update()
        bar.close()
        return rows
    _POOL_CASES[:] = cases
    try:
        with multiprocessing.get_context("fork").Pool(min(jobs, len(cases))) as pool:
            per_case = []
            for r in pool.imap(partial(_build_in_worker, arch=arch, dump=dump, sass=sass), range(len(cases))):
                per_case.append(r)
                bar.update()
    finally:
        _POOL_CASES.clear()
        bar.close()
    return [row for rows in per_case for row in rows]


def format_table(rows: list[dict]) -> str:
    """The builds as an aligned text table; cases that failed to compile are listed under it."""
    errors = [r for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]
    table = _aligned(rows) if rows else "(no kernel compiled)"
    return table + "".join(f"\n{r['case']}: does not compile: {r['error']}" for r in errors)


def _aligned(rows: list[dict]) -> str:
    cols = ["case", "name", "num_warps", "num_stages", "registers", "spill_bytes", "shared_bytes", "warps_per_sm",
            "wgmma", "tcgen05", "mma_sync", "tma", "ptxas_notes", "seconds"]
    heads = ["case", "kernel", "warps", "stages", "regs", "spill B", "smem B", "warps/SM", "wgmma", "tcgen05",
             "mma.sync", "tma", "ptxas notes", "compile s"]
    if not any(r.get("tcgen05") for r in rows):  # Blackwell only
        cols, heads = [c for c in cols if c != "tcgen05"], [h for h in heads if h != "tcgen05"]
    if any("gmma_waits" in r for r in rows):  # --sass
        cols[-1:-1], heads[-1:-1] = ["gmma_waits", "epilogue_beside"], ["gmma waits N:count", "epilogue beside"]
    show = {"seconds": lambda v: f"{v:.1f}", "ptxas_notes": lambda v: ",".join(v) or "-",
            "gmma_waits": lambda v: v or "-", "epilogue_beside": lambda v: v or "-"}
    cells = [[show.get(c, str)(r.get(c, ())) for c in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    line = lambda xs: "  ".join(x.ljust(w) for x, w in zip(xs, widths))  # noqa: E731
    return "\n".join([line(heads), line(["-" * w for w in widths])] + [line(c) for c in cells])


def compare_builds(old: list[dict], new: list[dict]) -> list[dict]:
    """Per (case, kernel) of `new`: "same code" (equal PTX instructions), "changed" (with the
    register / spill / warps-per-SM deltas) or "new"; kernels of a built case only in `old`: "gone"."""
    before = {(r["case"], r["name"]): r for r in old}
    out = []
    for r in new:
        o = before.pop((r["case"], r["name"]), None)
        if "error" in r:
            verdict = "does not compile"
        elif o is None:
            verdict = "new"
        elif o.get("code_hash") and o.get("code_hash") == r["code_hash"]:
            verdict = "same code"
        else:
            deltas = [f"{k} {o[k]} -> {r[k]}" for k in ("registers", "spill_bytes", "warps_per_sm", "shared_bytes")
                      if k in o and o[k] != r[k]]
            verdict = "changed" + (f" ({', '.join(deltas)})" if deltas else " (same registers, spills, occupancy)")
        out.append({"case": r["case"], "name": r["name"], "verdict": verdict})
    built = {r["case"] for r in new}  # cases left out of this build (--cases) are not "gone"
    out += [{"case": c, "name": n, "verdict": "gone"} for c, n in before if c in built]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="stem-boost build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, choices=sorted(ARCHS),
                    help="compute capability x10: 90 Hopper (H100 / H200, the tested target), 100 Blackwell, "
                         "80 / 86 / 89 Ampere / Ada (default %(default)s)")
    ap.add_argument("--cases", nargs="*", default=None, help="words; keep cases whose name contains one")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--dump", default=None, metavar="DIR", help="write each kernel's TTGIR and PTX into DIR")
    ap.add_argument("--jobs", type=int, default=1, metavar="N",
                    help="compile in N processes (default %(default)s; one per core halves the wall time)")
    ap.add_argument("--sass", action="store_true",
                    help="also read each tensor-core kernel's machine code: its wgmma waits (N: at most N product "
                         "groups left running) and how many of its exponentials / max-ReLUs are issued while a "
                         "product runs (`stem_boost.bench.sass`)")
    ap.add_argument("--compare", default=None, metavar="OLD_JSON",
                    help="a --json file of an earlier build: say per kernel whether the code is the same "
                         "(a refactor's check) or what changed")
    args = ap.parse_args(argv)
    cases = all_cases()
    if args.list:
        print("\n".join(f"{c.name:18s} {c.what}" for c in cases))
        return 0
    if args.cases:
        cases = [c for c in cases if any(w in c.name for w in args.cases)]
        if not cases:
            names = ", ".join(c.name for c in all_cases())
            raise SystemExit(f"--cases {' '.join(args.cases)} matches no case; cases: {names}")
    old = None
    if args.compare:
        with open(args.compare) as f:
            old = json.load(f)
        if old.get("arch") != args.arch:
            raise SystemExit(f"--compare {args.compare}: built for sm_{old.get('arch')}, this build is sm_{args.arch}")
    if args.jobs < 1:
        raise SystemExit(f"--jobs {args.jobs}: must be at least 1")
    rows = build(cases, args.arch, dump=args.dump, jobs=args.jobs, sass=args.sass)
    print(format_table(rows))
    if old is not None:
        print()
        for c in compare_builds(old["rows"], rows):
            print(f"{c['case']:22s} {c['name']:24s} {c['verdict']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "rows": rows}, f, indent=1)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
