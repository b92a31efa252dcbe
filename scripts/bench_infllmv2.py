"""InfLLMv2 prefill pieces on one GPU: stage-2 tilings (union tiles vs 1 token x G heads), the
fused selection, and their peers (dense causal SDPA, the current path), MiniCPM-4.1 shapes.

    python scripts/bench_infllmv2.py --parts stage2 --seqs 32768 --groups 16 4 6 8 --out OUT
    python scripts/bench_infllmv2.py --parts select stage2 --seqs 32768 131072 --out OUT

Stage 2 (`--parts stage2`): per-token block lists shaped like InfLLMv2's (block 0 + the 33 local
blocks forced, 62 more chosen per token by a score = a per-64-query-block base + `jitter` x a
per-token noise, so neighbouring tokens share most of their lists as they do in a trained model;
jitter "inf" = independent per-token choices, the worst case for union tiles). TFLOP/s are counted
on the pairs each method must compute (BENCHMARKS.md §1a): the kernels on the causally valid
selected (token, key) pairs x heads, dense SDPA on all causal pairs; the keys a union tile
computes and masks count as waste against it. Every variant is first checked against the fp32
reference on fresh random inputs (seed printed).

Selection (`--parts select`): the fused InfLLMv2 selection (`stem_boost.kernels.infllmv2_select`)
against the PyTorch selection (`stem_boost.native.infllmv2.infllmv2_select`): block agreement
and time, native, with Stem (OAM bias + per-row budgets), with Stem's mass schedule (budgets
from each chunk's pooled scores, as the adapter runs it on CUDA) and with Stem's grouped ranking (4
tokens a row, `tile_rows=4`, the default), with stage 2 on each selection's lists.

Pooled stage 1 (`--parts pooled`): the pooled-score kernel alone on the last 16K-row chunk, per
tile, and on Hopper the Gluon kernel (`kernels/infllmv2_pooled_sm90.py`: the next group head's
product beside this head's exponentials), each compared with the default tile's output.

Times: triton.testing.do_bench medians (CUDA events). Prints a short table last; JSON to --out.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
try:
    import stem_boost  # noqa: F401
except ImportError as _err:  # a half-integrated package must not stop the kernel benchmark
    import types

    print(f"note: `import stem_boost` failed ({_err}); loading stem_boost.kernels alone", flush=True)
    _pkg = types.ModuleType("stem_boost")
    _pkg.__path__ = [str(Path(__file__).resolve().parents[1] / "stem_boost")]
    sys.modules["stem_boost"] = _pkg

from stem_boost.kernels.block_union import block_union_attention, union_block_lists, union_inflation  # noqa: E402

BLOCK = 64
D = 128
N_INIT, N_LOCAL, N_TOPK = 1, 32, 62  # MiniCPM-4.1: init 1, window 2048 / 64 (+ the diagonal), topk 64 - 2


def bench(fn, rep_ms: int = 150) -> float:
    """Median ms (CUDA events); on the CPU (a smoke run under TRITON_INTERPRET=1) one wall-clock call."""
    if not torch.cuda.is_available():
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=20, rep=rep_ms, return_mode="median")


# ------------------------------------------------------------------------------------------ selections
def infllmv2_like_lists(B: int, H: int, S: int, *, jitter: float, device, seed: int, chunk: int = 2048):
    """Per-token block lists [B, H, S, Kmax] int32 ascending (-1 padded) and counts [B, H, S]: block 0,
    the diagonal block and the 32 before it forced, plus the 62 best other causal blocks by
    base[query block, key block] + jitter * noise[token, key block] (jitter = inf: noise only)."""
    g = torch.Generator(device=device).manual_seed(seed)
    nb = -(-S // BLOCK)
    kmax = N_INIT + N_LOCAL + 1 + N_TOPK
    idx = torch.full((B, H, S, kmax), -1, dtype=torch.int32, device=device)
    blk = torch.arange(nb, device=device)
    for b in range(B):
        for h in range(H):
            base = torch.rand(nb, nb, generator=g, device=device)
            for s0 in range(0, S, chunk):
                s1 = min(S, s0 + chunk)
                pos = torch.arange(s0, s1, device=device)
                qb = pos // BLOCK
                noise = torch.rand(s1 - s0, nb, generator=g, device=device)
                score = noise if math.isinf(jitter) else base[qb] + jitter * noise
                causal = blk[None] <= qb[:, None]
                forced = causal & ((blk[None] < N_INIT) | (blk[None] >= qb[:, None] - N_LOCAL))
                score = torch.where(forced, 3.0 + 0 * score, score)
                score = torch.where(causal, score, -1.0)
                k = min(kmax, nb)
                top = score.topk(k, dim=-1)
                keep = top.values >= 0
                sel = torch.where(keep, top.indices, nb + 1).sort(dim=-1).values
                idx[b, h, s0:s1, :k] = torch.where(sel > nb, -1, sel).to(torch.int32)
    counts = (idx >= 0).sum(-1).to(torch.int32)
    return idx, counts


def selected_pairs(idx: torch.Tensor, counts: torch.Tensor, q_offset: int, T: int) -> int:
    """Causally valid (token, key) pairs of per-token block lists, summed over batch and selection heads."""
    S = idx.shape[2]
    pos = (torch.arange(S, device=idx.device) + q_offset).view(1, 1, S, 1)
    start = idx.long() * BLOCK
    n = (torch.minimum(pos, torch.full_like(pos, T - 1)) - start + 1).clamp(0, BLOCK)
    return int(torch.where(idx >= 0, n, 0).sum())


# ------------------------------------------------------------------------------------------ peers
def current_path(q, k, v, idx, counts, block_size: int):
    """The shared kernel as the model calls it today: one row per token (1 token x G heads per tile)."""
    from stem_boost.kernels import sparse_attention

    if "selection" in inspect.signature(sparse_attention).parameters:
        from stem_boost.selection import Selection

        sel = Selection(idx=idx, counts=counts, block_size=block_size, query_block=1)
        return lambda: sparse_attention(q, k, v, sel, check=False)
    return lambda: sparse_attention(q, k, v, idx, counts, block_size=block_size, query_block=1, check_indices=False)


def reference(q, k, v, idx, counts, block_size: int):
    from stem_boost.kernels import sparse_attention_reference

    if "selection" in inspect.signature(sparse_attention_reference).parameters:
        from stem_boost.selection import Selection

        return sparse_attention_reference(q, k, v, Selection(idx=idx, counts=counts, block_size=block_size))
    return sparse_attention_reference(q, k, v, idx, counts, block_size=block_size)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


STAGE2_VARIANTS = {  # name -> block_union_attention kwargs (None: the current path)
    "1xG current": None,
    "union M64": dict(block_m=64, use_tma=False),
    "union M128": dict(block_m=128, use_tma=False),
    "union M64 tma": dict(block_m=64, use_tma=True),
    "union M128 tma": dict(block_m=128, use_tma=True),
    "union M64 tma s3": dict(block_m=64, use_tma=True, num_stages=3),
    "union M64 tma w8": dict(block_m=64, use_tma=True, num_warps=8),
    "union M64 tma ws": dict(block_m=64, use_tma=True, warp_specialize=True),
    "union M32 tma": dict(block_m=32, use_tma=True),
}


def run_stage2(args, device, results, log):
    if args.variants:
        for name in list(STAGE2_VARIANTS):
            if name not in args.variants:
                del STAGE2_VARIANTS[name]
    seed = args.seed
    log(f"stage2 seed {seed}")
    # correctness first: small shapes, every variant, every group size, fresh random inputs
    for G in args.groups:
        Hkv = max(1, 32 // G) if G != 6 else 4
        torch.manual_seed(seed + G)
        S = args.check_seq
        q = torch.randn(2, S, Hkv * G, D, device=device, dtype=torch.bfloat16)
        k = torch.randn(2, S, Hkv, D, device=device, dtype=torch.bfloat16)
        v = torch.randn(2, S, Hkv, D, device=device, dtype=torch.bfloat16)
        idx, counts = infllmv2_like_lists(2, Hkv, S, jitter=0.5, device=device, seed=seed + G)
        ref = reference(q.float(), k.float(), v.float(), idx, counts, BLOCK)
        for name, kw in STAGE2_VARIANTS.items():
            try:
                out = current_path(q, k, v, idx, counts, BLOCK)() if kw is None else block_union_attention(
                    q, k, v, idx, counts, block_size=BLOCK, **kw)
            except Exception as err:  # reported, and the variant is not timed
                log(f"check G={G} {name}: FAILED {type(err).__name__}: {str(err)[:300]}")
                results["checks"].append(dict(G=G, variant=name, rel_err=None))
                continue
            err = rel_err(out, ref)
            results["checks"].append(dict(G=G, variant=name, rel_err=err))
            log(f"check G={G} {name}: rel err {err:.2e}")
            if not err < 1e-2:
                raise SystemExit(f"FAILED check G={G} {name}: {err}")
    for S in args.seqs:
        for G in args.groups:
            Hkv = 2 if G == 16 else (4 if G == 8 else (8 if G in (4, 6) else max(1, 32 // G)))
            Hq = G * Hkv
            torch.manual_seed(seed)
            q = torch.randn(1, S, Hq, D, device=device, dtype=torch.bfloat16)
            k = torch.randn(1, S, Hkv, D, device=device, dtype=torch.bfloat16)
            v = torch.randn(1, S, Hkv, D, device=device, dtype=torch.bfloat16)
            qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
            dense_ms = bench(lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True))
            dense_flop = 4.0 * S * (S + 1) / 2 * Hq * D
            for jitter in args.jitters:
                idx, counts = infllmv2_like_lists(1, Hkv, S, jitter=jitter, device=device, seed=seed)
                pairs = selected_pairs(idx, counts, 0, S)
                flop = 4.0 * pairs * G * D
                variants = STAGE2_VARIANTS if (G == args.groups[0] and jitter == args.jitters[0]) else {
                    k_: v_ for k_, v_ in STAGE2_VARIANTS.items() if k_ in args.short_variants}
                base_out = None
                for name, kw in variants.items():
                    if kw is None:
                        fn = current_path(q, k, v, idx, counts, BLOCK)
                        waste = 1.0
                    else:
                        qt = max(1, min(32, kw.get("block_m", 64) // G))
                        un = union_block_lists(idx, counts, qt, n_units=-(-S // BLOCK))
                        waste = union_inflation(un[2], counts, qt)
                        def fn(kw=kw, un=un):
                            return block_union_attention(q, k, v, idx, counts, block_size=BLOCK, union=un, **kw)
                        union_ms = bench(lambda: union_block_lists(idx, counts, qt, n_units=-(-S // BLOCK)))
                    try:
                        ms = bench(fn)
                        out = fn()
                    except Exception as err:  # a variant that does not compile is reported, not fatal
                        log(f"S={S} G={G} jitter={jitter} {name}: FAILED {type(err).__name__}: {str(err)[:200]}")
                        continue
                    if base_out is None:
                        base_out = out
                    agree = rel_err(out, base_out)
                    row = dict(S=S, G=G, Hq=Hq, Hkv=Hkv, jitter=jitter, variant=name, ms=ms, tflops=flop / ms / 1e9,
                               dense_ms=dense_ms, dense_tflops=dense_flop / dense_ms / 1e9,
                               union_inflation=waste, union_ms=None if kw is None else union_ms,
                               blocks_per_token=float(counts.float().mean()), agree_vs_first=agree)
                    row["ratio"] = row["tflops"] / row["dense_tflops"]
                    results["stage2"].append(row)
                    log(f"S={S} G={G} jit={jitter} {name}: {ms:.2f} ms {row['tflops']:.0f} TF/s "
                        f"({row['ratio']:.2f} of dense {dense_ms:.1f} ms) inflation {waste:.2f} "
                        f"union {0 if kw is None else union_ms:.2f} ms agree {agree:.1e}")
                del idx, counts
            del q, k, v
            if device.type == "cuda":
                torch.cuda.empty_cache()


def block_agreement(idx_a: torch.Tensor, idx_b: torch.Tensor, n_blocks: int) -> float:
    """Fraction of the blocks selected by b (the oracle) that a selects too, and vice versa (the min)."""
    def member(idx):
        m = torch.zeros(*idx.shape[:-1], n_blocks + 1, dtype=torch.bool, device=idx.device)
        return m.scatter_(-1, torch.where(idx >= 0, idx.long(), n_blocks), True)[..., :n_blocks]

    a, b = member(idx_a), member(idx_b)
    both = float((a & b).sum())
    return min(both / max(1.0, float(b.sum())), both / max(1.0, float(a.sum())))


def run_select(args, device, results, log):
    """The fused selection (two launches per chunk; fused3: three) vs the PyTorch selection (native and
    Stem), then union stage 2 on the selection's lists, the current stage 2 and dense SDPA."""
    from stem_boost.kernels.infllmv2_select import infllmv2_select_fused
    from stem_boost.adapters.infllmv2 import mass_free_budgets
    from stem_boost.native.infllmv2 import MINICPM41_SPARSE_CONFIG, InfLLMv2Params, infllmv2_select

    p = InfLLMv2Params.from_sparse_config(MINICPM41_SPARSE_CONFIG)
    Hq, Hk = 32, 2
    for S in args.select_seqs:
        seed = args.seed + S
        torch.manual_seed(seed)
        q = torch.randn(1, Hq, S, D, device=device, dtype=torch.bfloat16)
        k = torch.randn(1, Hk, S, D, device=device, dtype=torch.bfloat16)
        nb = -(-S // p.block_size)
        bias = 0.2 * torch.randn(1, Hk, nb, device=device)
        qb = torch.arange(S, device=device) // p.block_size
        n_forced = p.init_blocks + p.local_blocks + 1
        native_free = torch.clamp(qb + 1 - n_forced, min=0).clamp(max=p.k_total(S) - n_forced)
        budgets = torch.floor(0.82 * native_free).to(torch.int32)
        fused_native = lambda: infllmv2_select_fused(q, k, p)  # noqa: E731
        fused_stem = lambda: infllmv2_select_fused(q, k, p, key_bias=bias, budgets=budgets, kmax=p.k_total(S))  # noqa: E731
        idx_n, cnt_n, _ = fused_native()
        idx_s, cnt_s, _ = fused_stem()
        row = dict(S=S, seed=seed, fused_ms=bench(fused_native), fused_stem_ms=bench(fused_stem),
                   fused3_ms=bench(lambda: infllmv2_select_fused(q, k, p, fuse_topk=False)),
                   # 8 warps: spill-free on sm_90 (`stem-boost build --cases select`), 4 is the default
                   fused_w8_ms=bench(lambda: infllmv2_select_fused(q, k, p, num_warps=8)))
        # the query-chunk size (the models run 1024 rows a chunk on CUDA; the default above is 16384)
        for chunk_rows in args.select_chunks:
            out = infllmv2_select_fused(q, k, p, chunk_size=chunk_rows)
            row[f"fused_chunk{chunk_rows}_ms"] = bench(lambda: infllmv2_select_fused(q, k, p, chunk_size=chunk_rows))
            row[f"fused_chunk{chunk_rows}_equal"] = bool(torch.equal(out[0], idx_n) and torch.equal(out[1], cnt_n))
            log(f"select S={S} chunk {chunk_rows}: {row[f'fused_chunk{chunk_rows}_ms']:.2f} ms, "
                f"equal {row[f'fused_chunk{chunk_rows}_equal']}")
            del out
        # step 3 with one row a warp (block_topk(method="warp")), native and with Stem's inputs
        row["warp_topk_ms"] = bench(lambda: infllmv2_select_fused(q, k, p, topk_method="warp"))
        row["warp_topk_stem_ms"] = bench(lambda: infllmv2_select_fused(q, k, p, key_bias=bias, budgets=budgets,
                                                                       kmax=p.k_total(S), topk_method="warp"))
        idx_w, cnt_w, _ = infllmv2_select_fused(q, k, p, topk_method="warp")
        idx_ws, cnt_ws, _ = infllmv2_select_fused(q, k, p, key_bias=bias, budgets=budgets, kmax=p.k_total(S),
                                                  topk_method="warp")
        row["warp_topk_equal"] = bool(torch.equal(idx_w, idx_n) and torch.equal(cnt_w, cnt_n)
                                      and torch.equal(idx_ws, idx_s) and torch.equal(cnt_ws, cnt_s))
        del idx_w, cnt_w, idx_ws, cnt_ws
        idx8, cnt8, _ = infllmv2_select_fused(q, k, p, num_warps=8)
        row["fused_w8_equal"] = bool(torch.equal(idx8, idx_n) and torch.equal(cnt8, cnt_n))
        del idx8, cnt8
        idx3, cnt3, _ = infllmv2_select_fused(q, k, p, fuse_topk=False)
        row["fused3_equal"] = bool(torch.equal(idx3, idx_n) and torch.equal(cnt3, cnt_n))
        del idx3, cnt3
        # Stem's mass schedule as the adapter runs it on CUDA: budgets from each 1024-row chunk's
        # pooled scores inside the fused selection (the PyTorch mass path is timed below, at oracle sizes)
        mass_fn = mass_free_budgets(native_free, 0.18)
        fused_mass = lambda: infllmv2_select(q, k, p, chunk_size=1024, key_bias=bias, free_budget_fn=mass_fn)  # noqa: E731
        row["fused_mass_ms"] = bench(fused_mass)
        if S <= args.select_oracle_max:
            chunk = 1024
            ref_n = infllmv2_select(q, k, p, chunk_size=chunk)
            ref_s = infllmv2_select(q, k, p, chunk_size=chunk, key_bias=bias, k_free=budgets)
            row["agree_native"] = block_agreement(idx_n, ref_n.idx, nb)
            row["agree_stem"] = block_agreement(idx_s, ref_s.idx, nb)
            row["counts_equal_native"] = bool(torch.equal(cnt_n, ref_n.counts))
            row["counts_equal_stem"] = bool(torch.equal(cnt_s, ref_s.counts))
            row["torch_ms"] = bench(lambda: infllmv2_select(q, k, p, chunk_size=chunk), rep_ms=50)
            row["torch_stem_ms"] = bench(lambda: infllmv2_select(q, k, p, chunk_size=chunk, key_bias=bias,
                                                                 k_free=budgets), rep_ms=50)
            torch_mass = lambda: infllmv2_select(q, k, p, chunk_size=1024, key_bias=bias,  # noqa: E731
                                                 free_budget_fn=mass_fn, use_fused=False)
            ref_m = torch_mass()
            got_m = fused_mass()
            row["agree_mass"] = block_agreement(got_m.idx, ref_m.idx, nb)
            row["counts_equal_mass"] = bool(torch.equal(got_m.counts, ref_m.counts))
            row["torch_mass_ms"] = bench(torch_mass, rep_ms=50)
            del ref_n, ref_s, ref_m, got_m
        # selection + union stage 2 on the selection's own lists (random q/k: little overlap between tokens)
        qa = q.transpose(1, 2)
        ka = k.transpose(1, 2)
        va = torch.randn_like(ka)
        union_kw = dict(block_m=64, use_tma=True)
        row["stage2_native_ms"] = bench(lambda: block_union_attention(qa, ka, va, idx_n, cnt_n, block_size=64, **union_kw))
        row["stage2_stem_ms"] = bench(lambda: block_union_attention(qa, ka, va, idx_s, cnt_s, block_size=64, **union_kw))
        row["stage2_current_native_ms"] = bench(current_path(qa, ka, va, idx_n, cnt_n, 64))
        row["blocks_per_token_native"] = float(cnt_n.float().mean())
        row["blocks_per_token_stem"] = float(cnt_s.float().mean())
        row["inflation_native_qt4"] = union_inflation(union_block_lists(idx_n, cnt_n, 4)[2], cnt_n, 4)
        # Stem's grouped ranking (the default: 4 tokens rank together and share a row): the selection with
        # its group sums, stage 2 on its rows, and its agreement with the PyTorch path
        fused_groups = lambda: infllmv2_select_fused(q, k, p, key_bias=bias, budgets=budgets,  # noqa: E731
                                                     kmax=p.k_total(S), tile_rows=4)
        idx_g, cnt_g, _ = fused_groups()
        row["fused_stem_groups_ms"] = bench(fused_groups)
        row["stage2_stem_groups_ms"] = bench(lambda: block_union_attention(qa, ka, va, idx_g, cnt_g, block_size=64,
                                                                           query_block=4, **union_kw))
        if S <= args.select_oracle_max:
            ref_g = infllmv2_select(q, k, p, chunk_size=1024, key_bias=bias, k_free=budgets, tile_rows=4,
                                    use_fused=False)
            row["agree_stem_groups"] = block_agreement(idx_g, ref_g.idx, nb)
            del ref_g
        del idx_g, cnt_g
        row["dense_ms"] = bench(lambda: F.scaled_dot_product_attention(qa.transpose(1, 2), ka.transpose(1, 2),
                                                                       va.transpose(1, 2), is_causal=True, enable_gqa=True))
        results["select"].append(row)
        log(" ".join(f"{k_}={v_:.4g}" if isinstance(v_, float) else f"{k_}={v_}" for k_, v_ in row.items()))
        del q, k, qa, ka, va, idx_n, idx_s
        torch.cuda.empty_cache()


# the Gluon kernel's tiles (`infllmv2_pooled_sm90.SM90_POOLED_TILE` overrides): the default (255 registers,
# 96 KB, two programs an SM, key tiles on the grid's fast axis: `kernels.tile_order`), query tiles there,
# and 64 fine keys a tile (with three buffers 144 registers, 64 KB: three programs, 12 warps an SM;
# `stem-boost build --cases "pooled sm90"`). H200 (2026-12-03, 128K): 2.55 / 2.97 ms; three buffers
# 2.84; 16 blocks 5.31 with query tiles fast (HBM-bound then), not yet timed keys first
# The group heads STEP at a time (`gluon_heads.head_sums`): each head's exponentials beside the next head's
# product, where the default's run-time loop over pairs is serialised by ptxas (note C7514, a wait after every
# wgmma k-step): STEP 4 with three buffers (255 registers, no spill), with four (20 bytes of spill), STEP 8
# (64), 3 and 2 (no spill). Two warpgroups a program (WARPS 8) split a tile of 256 keys against the same
# query-head tiles: half the query traffic a key (176 registers; 254 at STEP 4, no spill)
SM90_POOLED_TILES = [None, dict(KEYS_FAST=False), dict(BLOCK_B=16), dict(BLOCK_B=16, NUM_BUF=3),
                     dict(STEP=4, NUM_BUF=3), dict(STEP=4), dict(STEP=8), dict(STEP=3), dict(STEP=0),
                     dict(BLOCK_B=64, WARPS=8), dict(BLOCK_B=64, WARPS=8, STEP=4)]
# the coarse lse's tiles (rows = tokens x G a program, block_n, warps, stages); the default: 128, 64, 8, 3
# (`stem-boost build --cases "coarse lse"`: the default 64 registers, 80 KB, 16 warps an SM; 2 stages
# 64 KB, 24 warps; 32 keys a step 56 KB, 32 warps)
COARSE_LSE_TILES = [(64, 64, 4, None), (256, 64, 8, None), (128, 32, 8, None), (128, 128, 8, None),
                    (128, 64, 4, None), (128, 64, 8, 2), (128, 64, 8, 4), (64, 128, 4, None)]
POOLED_TILES = [  # (block_s, block_b, num_warps, num_stages, keys_fast); the first is the default
    (64, 32, 4, None, True), (64, 32, 4, None, False), (64, 64, 8, None, True),
    (64, 16, 4, None, True),  # 64 fine keys a tile: fewer registers, more programs an SM
]


def run_pooled(args, device, results, log):
    """The pooled stage-1 kernel alone (`pooled_block_scores`) on the last chunk of 16384 query rows
    of S keys (the heaviest chunk of a prefill), MiniCPM-4.1 shapes, per program tile; each tile's
    output is compared with the default tile's. FLOP: 2 x D x G x the causally visible (row, fine
    compressed key) pairs x 2 kv heads; exps: G x those pairs x 2."""
    from stem_boost.kernels.infllmv2_geometry import compress_keys, num_compressed, visible_compressed
    from stem_boost.kernels.infllmv2_scores import coarse_lse
    from stem_boost.kernels.infllmv2_pooled_sm90 import pooled_block_scores_sm90
    from stem_boost.kernels.infllmv2_select import block_topk, pooled_block_scores
    from stem_boost.native.infllmv2 import MINICPM41_SPARSE_CONFIG, InfLLMv2Params

    p = InfLLMv2Params.from_sparse_config(MINICPM41_SPARSE_CONFIG)
    Hq, Hk = 32, 2
    for S in args.seqs:
        seed = args.seed + S
        torch.manual_seed(seed)
        C = min(S, 16384)
        q = torch.randn(1, Hq, C, D, device=device, dtype=torch.bfloat16)
        k = torch.randn(1, Hk, S, D, device=device, dtype=torch.bfloat16)
        k1 = compress_keys(k, p.kernel_size, p.kernel_stride).contiguous()
        k2 = compress_keys(k, p.coarse_kernel_size, p.coarse_stride).contiguous()
        K1 = num_compressed(S, p.kernel_size, p.kernel_stride)
        K2 = num_compressed(S, p.coarse_kernel_size, p.coarse_stride)
        q_pos = torch.arange(S - C, S, device=device)
        vis1 = visible_compressed(q_pos, K1, p.kernel_size, p.kernel_stride, 0).to(torch.int32)
        vis2 = visible_compressed(q_pos, K2, p.coarse_kernel_size, p.coarse_stride, 0).to(torch.int32)
        scale = D ** -0.5
        lse = coarse_lse(q, k2, vis2, scale)
        lse_ms = bench(lambda: coarse_lse(q, k2, vis2, scale))
        for rows_, bn_, nw_, ns_ in COARSE_LSE_TILES:  # the coarse lse's tiles, each against the default
            name = f"coarse lse: rows {rows_} block_n {bn_} warps {nw_ or 'default'} stages {ns_ or 'default'}"
            try:
                got = coarse_lse(q, k2, vis2, scale, rows=rows_, block_n=bn_, num_warps=nw_, num_stages=ns_)
                ms = bench(lambda: coarse_lse(q, k2, vis2, scale, rows=rows_, block_n=bn_, num_warps=nw_,
                                              num_stages=ns_))
            except Exception as err:  # a tile that does not compile is reported, not fatal
                log(f"{name}: failed {err!r}"[:200])
                continue
            same = bool(torch.allclose(got, lse, rtol=1e-5, atol=1e-5, equal_nan=True))
            log(f"S={S} {name}: {ms:.3f} ms (default {lse_ms:.3f}); equal {same}")
            results["coarse_lse"].append(dict(S=S, C=C, tile=name, ms=ms, default_ms=lse_ms, equal=same))
        nbc = (S - 1) // p.block_size + 1
        pairs = float(vis1.long().sum()) * Hk
        base = None
        variants = [(f"block_s {bs_} block_b {bb_} warps {nw_} stages {ns_ or 'default'}{', keys fast' * kf_}",
                     lambda bs_=bs_, bb_=bb_, nw_=nw_, ns_=ns_, kf_=kf_: pooled_block_scores(
                         q, k1, lse, vis1, nbc, p.pool_size, scale, q_pos0=S - C, block_size=p.block_size,
                         n_existing=K1, round_to=torch.bfloat16, block_s=bs_, block_b=bb_, num_warps=nw_,
                         num_stages=ns_, keys_fast=kf_, kernel="triton"))
                    for bs_, bb_, nw_, ns_, kf_ in POOLED_TILES]
        if torch.cuda.get_device_capability()[0] == 9:  # the Gluon kernel: the next head's product beside the exps
            variants += [(f"Gluon sm_90 {tile or 'default tile'}",
                          lambda tile=tile: pooled_block_scores_sm90(
                              q, k1, lse, vis1, nbc, p.pool_size, scale, q_pos0=S - C, block_size=p.block_size,
                              n_existing=K1, round_to=torch.bfloat16, tile=tile))
                         for tile in SM90_POOLED_TILES]
        # only blocks up to each row's query block are written (the rest of an output is uninitialised)
        written = (torch.arange(nbc, device=device)[None, :]
                   <= (torch.arange(S - C, S, device=device) // p.block_size)[:, None]).expand(1, Hk, C, nbc)
        for name, fn in variants:
            try:
                out = fn()
                ms = bench(fn)
            except Exception as err:  # a tile that does not compile is reported, not fatal
                log(f"pooled S={S} {name}: FAILED {type(err).__name__}: {str(err)[:160]}")
                continue
            if base is None:
                base = out
            equal = bool(torch.equal(out[written].nan_to_num(), base[written].nan_to_num()))
            row = dict(S=S, C=C, seed=seed, tile=name, ms=ms, coarse_lse_ms=lse_ms,
                       tflops=2 * D * (Hq // Hk) * pairs / ms / 1e9, gexp_per_s=(Hq // Hk) * pairs / ms / 1e6,
                       equal_to_default=equal)
            results["pooled"].append(row)
            log(f"pooled S={S} C={C} {name}: {ms:.3f} ms {row['tflops']:.0f} TF/s {row['gexp_per_s']:.0f} Gexp/s "
                f"equal {equal} (coarse lse {lse_ms:.3f} ms)")
        # step 3 on the default tile's pooled scores: 32-bit keys against the bf16 scores' 16 bits
        # (`block_topk(score_dtype=)`), one row a program and one row a warp, and Stem's keys
        if base is not None:
            topk_kw = dict(q_pos0=S - C, block_size=p.block_size, init_blocks=p.init_blocks,
                           local_blocks=p.local_blocks, k_total=p.k_total(S), kmax=p.k_total(S))
            refs = {}  # the first result of each kind of key (native, Stem's): the others must equal it
            bias = 0.2 * torch.randn(1, Hk, nbc, device=device)
            budgets = torch.full((1, Hk, C), int(0.82 * (p.k_total(S) - p.init_blocks - p.local_blocks - 1)),
                                 dtype=torch.int32, device=device)
            for name, kw in (("32-bit keys", dict()), ("bf16 keys (16 bits)", dict(score_dtype=torch.bfloat16)),
                             ("bf16 keys, 4 warps a row", dict(score_dtype=torch.bfloat16, num_warps=4)),
                             ("bf16 keys, 2 warps a row", dict(score_dtype=torch.bfloat16, num_warps=2)),
                             ("warp, 32-bit keys", dict(method="warp")),
                             ("warp, bf16 keys", dict(method="warp", score_dtype=torch.bfloat16)),
                             ("Stem bias and budgets", dict(key_bias=bias, budgets=budgets)),
                             ("Stem, 4 warps a row", dict(key_bias=bias, budgets=budgets, num_warps=4)),
                             ("bf16 keys, interpolation search", dict(score_dtype=torch.bfloat16, search="interpolate")),
                             ("Stem, interpolation search", dict(key_bias=bias, budgets=budgets, search="interpolate"))):
                got = block_topk(base, **topk_kw, **kw)  # the top-k reads causal blocks only
                ms = bench(lambda kw=kw: block_topk(base, **topk_kw, **kw))
                kind = "Stem" if "key_bias" in kw else "native"
                ref = refs.setdefault(kind, (name, got))
                equal = all(torch.equal(a, b) for a, b in zip(got, ref[1]))
                results["block_topk"].append(dict(S=S, C=C, variant=name, ms=ms, equal=equal, reference=ref[0]))
                log(f"block top-k S={S} C={C} {name}: {ms:.3f} ms, equal to '{ref[0]}' {equal}")
        del q, k, k1, k2, base
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="+", default=["stage2"], choices=["stage2", "select", "pooled"])
    ap.add_argument("--seqs", nargs="+", type=int, default=[32768])
    ap.add_argument("--groups", nargs="+", type=int, default=[16, 4, 6, 8])
    ap.add_argument("--jitters", nargs="+", type=float, default=[0.5])
    ap.add_argument("--short-variants", nargs="+", default=["1xG current", "union M64 tma", "union M128 tma"])
    ap.add_argument("--variants", nargs="+", default=None, help="stage-2 variants to run (default: all)")
    ap.add_argument("--seed", type=int, default=20261202)
    ap.add_argument("--check-seq", type=int, default=1536)
    ap.add_argument("--select-seqs", nargs="+", type=int, default=[8192, 16384, 32768])
    ap.add_argument("--select-chunks", nargs="+", type=int, default=[1024, 4096],
                    help="query-chunk sizes of the fused selection timed beside its default (16384)")
    ap.add_argument("--select-oracle-max", type=int, default=32768, help="longest S compared with the PyTorch selection")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=str, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    logf = open(out_dir / "bench_infllmv2.log", "w") if out_dir else None

    def log(msg):
        print(msg, flush=True)
        if logf:
            logf.write(msg + "\n")
            logf.flush()

    results = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
                   date=time.strftime("%Y-%m-%d"),
                   argv=sys.argv, checks=[], stage2=[], select=[], pooled=[], coarse_lse=[], block_topk=[])
    import triton

    results["triton"] = triton.__version__
    t0 = time.time()
    if "select" in args.parts:
        run_select(args, device, results, log)
    if "stage2" in args.parts:
        run_stage2(args, device, results, log)
    if "pooled" in args.parts:
        run_pooled(args, device, results, log)
    results["seconds"] = time.time() - t0
    if out_dir:
        (out_dir / "bench_infllmv2.json").write_text(json.dumps(results, indent=1))
    if results["coarse_lse"]:
        print("\n| S (last C rows) | coarse lse tile | ms | default ms | equal |")
        print("|---|---|---|---|---|")
        for r in results["coarse_lse"]:
            print(f"| {r['S']} ({r['C']}) | {r['tile']} | {r['ms']:.3f} | {r['default_ms']:.3f} | {r['equal']} |")
    if results["pooled"]:
        print("\n| S (last C rows) | pooled stage-1 tile | ms | TFLOP/s | G exp/s | equal to the default | coarse lse ms |")
        print("|---|---|---|---|---|---|---|")
        for r in results["pooled"]:
            print(f"| {r['S']} ({r['C']}) | {r['tile']} | {r['ms']:.3f} | {r['tflops']:.0f} | {r['gexp_per_s']:.0f} | "
                  f"{r['equal_to_default']} | {r['coarse_lse_ms']:.3f} |")
    print("\n| S | G | jitter | variant | ms | TFLOP/s | of dense | dense ms | union inflation | union ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results["stage2"]:
        print(f"| {r['S']} | {r['G']} | {r['jitter']} | {r['variant']} | {r['ms']:.2f} | {r['tflops']:.0f} | "
              f"{r['ratio']:.2f} | {r['dense_ms']:.2f} | {r['union_inflation']:.2f} | "
              f"{'' if r['union_ms'] is None else format(r['union_ms'], '.2f')} |")
    if results["select"]:
        print("\n| S | fused sel ms (3 launches / 8 warps) | one row a warp: native / Stem ms (same lists) | fused Stem ms | fused mass ms | torch sel ms | torch Stem ms | "
              "torch mass ms | agree native / Stem / mass | stage2 union ms (native / Stem) | current stage2 ms | dense ms | "
              "inflation QT4 |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        nan = float("nan")
        for r in results["select"]:
            print(f"| {r['S']} | {r['fused_ms']:.2f} ({r['fused3_ms']:.2f} / {r['fused_w8_ms']:.2f}) | "
                  f"{r['warp_topk_ms']:.2f} / {r['warp_topk_stem_ms']:.2f} ({r['warp_topk_equal']}) | {r['fused_stem_ms']:.2f} | "
                  f"{r['fused_mass_ms']:.2f} | {r.get('torch_ms', nan):.1f} | {r.get('torch_stem_ms', nan):.1f} | "
                  f"{r.get('torch_mass_ms', nan):.1f} | {r.get('agree_native', nan):.5f} / {r.get('agree_stem', nan):.5f} / "
                  f"{r.get('agree_mass', nan):.5f} | {r['stage2_native_ms']:.2f} / {r['stage2_stem_ms']:.2f} | "
                  f"{r['stage2_current_native_ms']:.2f} | {r['dense_ms']:.2f} | {r['inflation_native_qt4']:.2f} |")
        print("\n| S | Stem selection ms: per token / 4-token rows | stage 2 ms: per-token lists / rows | rows agree |")
        print("|---|---|---|---|")
        for r in results["select"]:
            print(f"| {r['S']} | {r['fused_stem_ms']:.2f} / {r['fused_stem_groups_ms']:.2f} | {r['stage2_stem_ms']:.2f} / "
                  f"{r['stage2_stem_groups_ms']:.2f} | {r.get('agree_stem_groups', nan):.5f} |")


if __name__ == "__main__":
    main()
