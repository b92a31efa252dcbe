"""Benchmark of the shared sparse-attention kernel against its peers (run on a GPU).

(a) block mode, MiniCPM4-8B attention shapes: 32 query heads, 2 kv heads, d 128, key blocks of 64,
    one selection per 64-query block and kv head; densities 10-30% of the causal key blocks.
    `--groups` runs other GQA group sizes G (Hq = G x Hkv, Hkv = 2 / 4 / 8 / 8 for G = 16 / 8 / 6 / 4).
    Columns: what `sparse_attention(q, k, v, selection)` runs by default (the union-tile executor,
    `kernels/block_union.py`: tiles of 64 (token, head) rows, 3 stages, TMA loads; its other tiles beside it,
    `UNION_VARIANTS`) and the 1-token-row
    tile of `kernels/triton_sparse.py` (forced with `tiles=`, tuned). Peers: dense causal SDPA
    (flash), FlexAttention with the same BlockMask (`Selection.to_block_mask`).
(b) token mode, DeepSeek-V3.2 absorbed MLA: 128 heads, Dqk 576 (512 latent + 64 rope), Dv 512 (the
    latent itself), one kv head, top-k 2048 token lists. Columns: what `sparse_attention` runs by
    default (the absorbed-MLA route: `kernels/mla_token_ws.py` on Hopper, `kernels/mla_token.py`
    elsewhere) and the generic token kernel of `kernels/triton_sparse.py` (forced with `tiles=`,
    tuned). Peers: dense causal SDPA on the expanded per-head form (q/k 192, v 128, 128 heads: what
    the model runs without selection) and masked dense SDPA (what transformers does with the indices
    today: an S x T boolean mask).

TFLOP/s are counted on the pairs each method computes: the kernel's selected (query, key) pairs
(causally valid ones), dense SDPA's causal pairs. Times: triton.testing.do_bench, median, CUDA events;
in block mode the peers and the sparse executors are timed in one alternation (`bench_alternating`).
Inputs are random normal (never zeros); a correctness check against the fp32 reference runs first.

    stem-boost bench --seqs 32768 65536 131072 --out bench.json     # or: python scripts/bench_kernel.py ...
    stem-boost bench --check-only --tiny --device cpu               # the correctness check alone, tiny shapes
                                                                    # (CPU: TRITON_INTERPRET=1)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..kernels import sparse_attention, sparse_attention_reference
from ..selection import Selection

try:
    from triton.testing import do_bench
except ImportError:  # pragma: no cover
    do_bench = None


def fastest_tiles(run, grid: list[dict], label: str) -> tuple[float, dict]:
    """(ms, tiles) of the fastest tile choice of `run(tiles)` over `grid`; a tile that does not
    compile (shared memory, registers) is reported and skipped."""
    best = None
    for tiles in grid:
        try:
            ms = bench(lambda: run(tiles), rep_ms=100)
        except Exception as e:
            print(f"  tiles {tiles}: {type(e).__name__}: {str(e)[:100]}", flush=True)
            continue
        print(f"  {label} tiles={tiles}: {ms:.3f} ms", flush=True)
        if best is None or ms < best[0]:
            best = (ms, tiles)
    if best is None:
        raise RuntimeError(f"{label}: no tile choice compiled")
    return best


def bench(fn, rep_ms: int = 200) -> float:
    """Median milliseconds of fn() (CUDA events)."""
    return do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def bench_alternating(fns: dict, rounds: int = 3, rep_ms: int = 150) -> dict:
    """{name: median over `rounds` of fn's `bench` median}, the fns timed in turn in every round, so that a
    GPU whose clock drifts during a run weighs on all of them alike (one `bench` each, in a row, put 5-12%
    between two timings of the same kernel in one block-mode run on an H200: BENCHMARKS.md, sixteenth
    session)."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(bench(fn, rep_ms))
    return {name: statistics.median(t) for name, t in times.items()}


def peak_mem_gib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


# ------------------------------------------------------------------ selections
def block_selection(S: int, Hsel: int, density: float, block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 64-query row: the diagonal block, the first block and random earlier blocks, sorted.

    Each row r keeps round(density * (r + 1)) of its r + 1 causal blocks (at least the diagonal).
    Returns idx [1, Hsel, R, Kmax] int32 (-1 padded) and counts [1, Hsel, R].
    """
    R = S // block
    n_causal = torch.arange(1, R + 1, device=device)
    counts = torch.clamp((density * n_causal).round().long(), min=1)
    counts = torch.minimum(counts, n_causal)
    kmax = int(counts.max())
    # random scores over earlier blocks; the diagonal and block 0 are forced to the top
    idx = torch.full((Hsel, R, kmax), -1, dtype=torch.int32, device=device)
    chunk = 256
    for r0 in range(0, R, chunk):
        r1 = min(R, r0 + chunk)
        rows = torch.arange(r0, r1, device=device)
        score = torch.rand(Hsel, r1 - r0, R, device=device)
        cols = torch.arange(R, device=device)
        score = score.masked_fill(cols[None, None, :] > rows[None, :, None], -1.0)
        score[:, torch.arange(r1 - r0), rows] = 3.0
        score[:, :, 0] = torch.where(rows > 0, 2.0, score[:, :, 0])
        top = score.topk(kmax, dim=-1).indices
        keep = torch.arange(kmax, device=device)[None, None, :] < counts[rows][None, :, None]
        top = torch.where(keep, top, torch.full_like(top, R + 1)).sort(dim=-1).values
        idx[:, r0:r1] = torch.where(top > R, -1, top).to(torch.int32)
    cnt = counts.to(torch.int32).view(1, 1, R).expand(1, Hsel, R).contiguous()
    return idx.unsqueeze(0), cnt


def token_selection(S: int, topk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query i: all of 0..i while i < topk, else topk random earlier tokens (sorted; may repeat)."""
    i = torch.arange(S, device=device).view(S, 1)
    slot = torch.arange(topk, device=device).view(1, topk)
    rnd = (torch.rand(S, topk, device=device) * (i + 1).float()).long().clamp_max(S - 1)
    idx = torch.where(i < topk, torch.where(slot <= i, slot, -1), rnd.sort(dim=-1).values)
    counts = torch.clamp(i.view(-1) + 1, max=topk)
    return idx.to(torch.int32).view(1, 1, S, topk), counts.to(torch.int32).view(1, 1, S)


def selected_pairs_block(counts: torch.Tensor, block: int) -> int:
    """Causally valid pairs of a block selection with query_block == block and the diagonal kept."""
    # each row: (counts-1) full blocks of block x block pairs + the diagonal triangle
    c = counts[0, 0].long()
    return int(((c - 1) * block * block).sum() + counts.shape[-1] * block * (block + 1) // 2)


# ------------------------------------------------------------------ peers
def _group_heads(G: int) -> tuple[int, int]:
    """(Hq, Hkv) for a GQA group size: 32 query heads where G divides 32, else 8 kv heads."""
    return (32, 32 // G) if 32 % G == 0 else (8 * G, 8)


#: block_union_attention executors and tiles timed beside the default (on Hopper the Gluon kernel,
#: elsewhere the Triton kernel's flat tiles of 64 (token, head) rows, 3 stages): the Triton kernel's
#: default, other depths and M, the tiles of whole tokens that were its default before flat tiles,
#: and the Gluon kernel asked for by name
UNION_VARIANTS = {"triton": dict(kernel="triton"),  # the Triton kernel's default tiles (flat M64, 3 stages)
                  "triton flat M64 s2": dict(flat_rows=True, block_m=64, num_stages=2, kernel="triton"),
                  "triton flat M128 s3": dict(flat_rows=True, block_m=128, num_stages=3, kernel="triton"),
                  "triton token tiles": dict(flat_rows=False, kernel="triton"),
                  "sm90": dict(kernel="sm90"),  # the Gluon kernel (block_union_sm90.py), flat tiles of 64 rows
                  # its warp-specialised 128-row tiles: a producer warpgroup, two consumers sharing each K / V block
                  "sm90 ws": dict(kernel="sm90_ws"),
                  "sm90 ws no ping-pong": dict(kernel="sm90_ws", tile=dict(PINGPONG=False)),
                  "sm90 ws ring 4": dict(kernel="sm90_ws", tile=dict(NUM_BUF=4))}


def run_block_mode(seqs, densities, device, results, tiles_grid, groups=(16,), variants=tuple(UNION_VARIANTS)):
    for G in groups:
        _run_block_mode_group(seqs, densities, device, results, tiles_grid, G, variants)


def _run_block_mode_group(seqs, densities, device, results, tiles_grid, G: int, variants):
    from torch.nn.attention.flex_attention import flex_attention

    from ..kernels.block_union import block_union_attention

    flex = torch.compile(flex_attention, dynamic=False)
    (Hq, Hkv), D, block = _group_heads(G), 128, 64
    for S in seqs:
        q = torch.randn(1, S, Hq, D, device=device, dtype=torch.bfloat16)
        k = torch.randn(1, S, Hkv, D, device=device, dtype=torch.bfloat16)
        v = torch.randn(1, S, Hkv, D, device=device, dtype=torch.bfloat16)
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
        def dense():
            return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)

        dense_alone_ms = bench(dense)  # before any sparse run: the clock of a GPU that only ran dense
        dense_pairs = S * (S + 1) // 2
        for dens in densities:
            idx, counts = block_selection(S, Hkv, dens, block, device)
            sel = Selection(idx=idx, counts=counts, block_size=block, query_block=block, ordered=True)  # sorted, unique
            pairs = selected_pairs_block(counts, block)
            first = S == seqs[0] and dens == densities[0]
            grid = tiles_grid if first or "block_tiles" not in results else [results["block_tiles"]]
            ms, tiles = fastest_tiles(lambda t: sparse_attention(q, k, v, sel, backend="triton", check=False, tiles=t),
                                      grid, f"block S={S} d={dens}")
            results["block_tiles"] = tiles
            bm = sel.to_block_mask(S, S, n_heads=Hq)

            def flex_run():  # flex's tiles must divide the 64-token blocks of the mask
                return flex(qh, kh, vh, block_mask=bm, enable_gqa=True, kernel_options={"BLOCK_M": 64, "BLOCK_N": 64})

            # the peers (dense SDPA, FlexAttention), the default call (union tiles) and its executor's variants
            # on the same selection, each sparse one checked against the 1-token-row tile, all timed in one
            # alternation, so that every ratio below is of two timings taken at one clock (a GPU at its power cap
            # runs a short burst of dense alone faster than a long run of everything); the time of dense alone,
            # before the sparse runs, stays beside it as `dense_alone_ms`
            ref_out = sparse_attention(q, k, v, sel, backend="triton", check=False, tiles=tiles).float()
            runs = {"dense": dense, "flex": flex_run}
            union_err = float("nan")
            try:
                union_out = sparse_attention(q, k, v, sel, check=False)
                union_err = float((union_out.float() - ref_out).norm() / ref_out.norm())  # both checked vs fp32 above
                if not union_err < 1e-2:
                    raise RuntimeError(f"the default executor disagrees with the 1-token tile: rel err {union_err:.2e}")
                runs["default"] = lambda: sparse_attention(q, k, v, sel, check=False)
            except Exception as e:
                print(f"  default executor: {type(e).__name__}: {str(e)[:200]}", flush=True)
            for name in variants:  # the default executor's tiles, side by side
                kwargs = UNION_VARIANTS[name]
                def run_variant(kwargs=kwargs):
                    return block_union_attention(q, k, v, idx, counts, block_size=block, query_block=block, **kwargs)
                try:
                    err = float((run_variant().float() - ref_out).norm() / ref_out.norm())
                    if not err < 1e-2:
                        raise RuntimeError(f"disagrees with the 1-token tile: rel err {err:.2e}")
                    runs[name] = run_variant
                except Exception as e:
                    print(f"  union variant {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            timed = bench_alternating(runs)
            dense_ms, flex_ms = timed["dense"], timed["flex"]
            dense_tf = 4 * dense_pairs * Hq * D / dense_ms / 1e9
            union_ms = timed.get("default", float("nan"))
            variants_ms = {name: timed.get(name, float("nan")) for name in variants}
            tf = 4 * pairs * Hq * D / ms / 1e9
            flex_tf = 4 * pairs * Hq * D / flex_ms / 1e9
            union_tf = 4 * pairs * Hq * D / union_ms / 1e9
            row = dict(mode="block", G=G, Hq=Hq, Hkv=Hkv, S=S, density=dens, actual_density=pairs / dense_pairs, ms=ms,
                       tflops=tf, dense_ms=dense_ms, dense_tflops=dense_tf, flex_ms=flex_ms, flex_tflops=flex_tf,
                       tf_vs_dense=tf / dense_tf, speedup_vs_dense=dense_ms / ms, speedup_vs_flex=flex_ms / ms,
                       dense_alone_ms=dense_alone_ms, union_tf_vs_dense_alone=dense_alone_ms / union_ms * pairs / dense_pairs,
                       tiles=tiles, union_ms=union_ms, union_rel_err_vs_kernel=union_err, union_tflops=union_tf, union_tf_vs_dense=union_tf / dense_tf,
                       union_variants_ms=variants_ms,
                       union_variants_tf_vs_dense={n: 4 * pairs * Hq * D / t / 1e9 / dense_tf for n, t in variants_ms.items()})
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            del bm
        del q, k, v, qh, kh, vh
        torch.cuda.empty_cache()


def run_token_mode(seqs, device, results, tiles_grid, masked_max_seq):
    Hq, Dqk, Dv, topk = 128, 576, 512, 2048
    for S in seqs:
        q = torch.randn(1, S, Hq, Dqk, device=device, dtype=torch.bfloat16)
        kv = torch.randn(1, S, 1, Dqk, device=device, dtype=torch.bfloat16)
        v = kv[..., :Dv]
        idx, counts = token_selection(S, topk, device)
        sel = Selection(idx=idx, counts=counts)
        pairs = int(counts.long().sum())
        scale = 1.0 / math.sqrt(192)
        # what `sparse_attention` runs by default: the absorbed-MLA route (the warp-specialised kernel on
        # Hopper, mla_token.py elsewhere); the generic token kernel (triton_sparse.py, forced and tuned
        # with `tiles=`) beside it
        default = lambda: sparse_attention(q, kv, v, sel, sm_scale=scale, backend="triton", check=False)  # noqa: E731
        ms = bench(default)
        mem = peak_mem_gib(default)
        tf = 2 * pairs * Hq * (Dqk + Dv) / ms / 1e9
        grid = tiles_grid if S == seqs[0] else [results["token_tiles"]]
        generic_ms, tiles = fastest_tiles(lambda t: sparse_attention(q, kv, v, sel, sm_scale=scale, backend="triton",
                                                                     check=False, tiles=t), grid, f"token S={S}")
        results["token_tiles"] = tiles
        del q, kv, v
        torch.cuda.empty_cache()
        # dense causal SDPA on the expanded per-head MLA form
        qe = torch.randn(1, Hq, S, 192, device=device, dtype=torch.bfloat16)
        ke = torch.randn(1, Hq, S, 192, device=device, dtype=torch.bfloat16)
        ve = torch.randn(1, Hq, S, 128, device=device, dtype=torch.bfloat16)
        dense_ms = bench(lambda: F.scaled_dot_product_attention(qe, ke, ve, is_causal=True))
        dense_tf = 2 * (S * (S + 1) // 2) * Hq * (192 + 128) / dense_ms / 1e9
        masked_ms, masked_note = None, ""
        if S <= masked_max_seq:
            try:
                mask = torch.zeros(1, 1, S, S, dtype=torch.bool, device=device)
                mask[0, 0].scatter_(-1, idx[0, 0].clamp_min(0).long(), True)
                masked_ms = bench(lambda: F.scaled_dot_product_attention(qe, ke, ve, attn_mask=mask), rep_ms=50)
                del mask
            except torch.OutOfMemoryError:
                masked_note = "OOM"
        else:
            masked_note = f"not run (S x S mask = {S * S / 2**30:.0f} GiB)"
        del qe, ke, ve
        torch.cuda.empty_cache()
        row = dict(mode="token_mla", S=S, topk=topk, ms=ms, tflops=tf, peak_gib=mem,
                   generic_ms=generic_ms, generic_tflops=2 * pairs * Hq * (Dqk + Dv) / generic_ms / 1e9,
                   generic_tiles=tiles, dense_ms=dense_ms, dense_tflops=dense_tf, masked_sdpa_ms=masked_ms,
                   masked_note=masked_note, speedup_vs_dense=dense_ms / ms)
        results["rows"].append(row)
        print(json.dumps(row), flush=True)


# (S, Hq, Hkv, Dqk, Dv, block size, MLA: v is the first Dv dims of k, selection size)
# selection size: key blocks' density (block mode) or top-k tokens (token mode)
CHECK_SHAPES = {"block": (2048, 32, 2, 128, 128, 64, False, 0.3), "token_mla": (1024, 128, 1, 576, 512, 1, True, 256)}
TINY_CHECK_SHAPES = {"block": (256, 4, 2, 32, 32, 64, False, 0.5), "token_mla": (96, 4, 1, 48, 32, 1, True, 32)}
CHECK_TOLERANCE = 1e-2  # relative Frobenius error of the bf16 kernel output against the fp32 reference


def triton_attention(q, k, v, selection: Selection) -> torch.Tensor:
    """The Triton kernel itself (on the CPU: TRITON_INTERPRET=1), whatever `auto` would pick."""
    return sparse_attention(q, k, v, selection, backend="triton")


def check_correctness(device, shapes: dict = CHECK_SHAPES, attention=triton_attention) -> list[dict]:
    """Kernel (``attention(q, k, v, selection)``) vs the fp32 reference on both modes (bf16 inputs):
    one row per mode with its relative error and ``ok`` (error below `CHECK_TOLERANCE`), printed as
    it goes."""
    rows = []
    for name, (S, Hq, Hkv, Dqk, Dv, bs, mla, size) in shapes.items():
        q = torch.randn(1, S, Hq, Dqk, device=device, dtype=torch.bfloat16)
        k = torch.randn(1, S, Hkv, Dqk, device=device, dtype=torch.bfloat16)
        v = k[..., :Dv] if mla else torch.randn(1, S, Hkv, Dv, device=device, dtype=torch.bfloat16)
        if bs == 1:
            idx, counts = token_selection(S, int(size), device)
        else:
            idx, counts = block_selection(S, Hkv, float(size), bs, device)
        sel = Selection(idx=idx, counts=counts, block_size=bs, query_block=bs)
        out = attention(q, k, v, sel)
        ref = sparse_attention_reference(q, k, v, sel)
        err = float((out.float() - ref.float()).norm() / ref.float().norm())
        rows.append(dict(mode=name, S=S, rel_err=err, ok=err < CHECK_TOLERANCE))
        print(f"correctness {name}: rel err {err:.2e} ({'ok' if rows[-1]['ok'] else 'FAIL'})", flush=True)
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="stem-boost bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, nargs="+", default=[32768, 65536, 131072])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--modes", nargs="+", default=["block", "token"], choices=["block", "token"])
    ap.add_argument("--masked-max-seq", type=int, default=65536)
    ap.add_argument("--groups", type=int, nargs="+", default=[16], help="block mode: GQA group sizes G")
    ap.add_argument("--variants", nargs="+", default=list(UNION_VARIANTS), choices=list(UNION_VARIANTS),
                    metavar="NAME", help="block mode: the executors timed beside the default, by name: "
                    + ", ".join(repr(n) for n in UNION_VARIANTS))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--check-only", action="store_true", help="the correctness check alone (no timings)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes for the correctness check")
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark); cpu only with --check-only")
    ap.add_argument("--seed", type=int, default=None, help="default: the time")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    """The benchmark (or, with --check-only, the correctness check); 1 when a check fails."""
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("stem-boost bench needs a CUDA GPU (the correctness check alone: --check-only --device cpu)")
    if args.device != "cuda" and not args.check_only:
        sys.exit("timings need --device cuda; on another device use --check-only")
    device = args.device
    seed = int(time.time()) if args.seed is None else args.seed
    torch.manual_seed(seed)
    print(f"seed {seed}", flush=True)
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else device, "torch": torch.__version__,
               "seed": seed, "rows": []}
    import triton

    results["triton"] = triton.__version__
    results["checks"] = check_correctness(device, TINY_CHECK_SHAPES if args.tiny else CHECK_SHAPES)
    failed = not all(c["ok"] for c in results["checks"])
    if args.check_only:
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))
        return int(failed)
    # candidate tiles (the grid explored on 2026-11-25 is in BENCHMARKS.md; these were the best)
    block_tiles = [dict(BLOCK_T=4, BLOCK_H=16, BLOCK_N=64, num_warps=4, num_stages=2),
                   dict(BLOCK_T=4, BLOCK_H=16, BLOCK_N=64, num_warps=4, num_stages=3),
                   dict(BLOCK_T=8, BLOCK_H=16, BLOCK_N=64, num_warps=8, num_stages=2)]
    token_tiles = [dict(BLOCK_T=1, BLOCK_H=64, BLOCK_N=64, num_warps=8, num_stages=2),
                   dict(BLOCK_T=1, BLOCK_H=64, BLOCK_N=64, num_warps=8, num_stages=3),
                   dict(BLOCK_T=1, BLOCK_H=64, BLOCK_N=32, num_warps=8, num_stages=2)]
    if "block" in args.modes:
        run_block_mode(args.seqs, args.densities, device, results, block_tiles, args.groups, args.variants)
    if "token" in args.modes:
        run_token_mode(args.seqs, device, results, token_tiles, args.masked_max_seq)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    print(f"\n{results['device']}  torch {results['torch']}  triton {results['triton']}")
    print("| mode | G | S | density | 1-token tile ms | its TFLOP/s | dense ms | dense TFLOP/s | tile/dense TF | flex ms "
          "| tile x vs flex | tile x vs dense | default (union) ms | default/dense TF | the same, dense timed alone |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        if r["mode"] == "block":
            print(f"| block | {r['G']} | {r['S']} | {r['actual_density']:.2f} | {r['ms']:.2f} | {r['tflops']:.0f} | "
                  f"{r['dense_ms']:.2f} | {r['dense_tflops']:.0f} | {r['tf_vs_dense']:.2f} | {r['flex_ms']:.2f} | "
                  f"{r['speedup_vs_flex']:.2f} | {r['speedup_vs_dense']:.2f} | {r['union_ms']:.2f} | "
                  f"{r['union_tf_vs_dense']:.2f} | {r['union_tf_vs_dense_alone']:.2f} |")
    names = list(args.variants)
    print("\n| G | S | default ms | " + " | ".join(f"{n} ms" for n in names) + " | default / dense TF | "
          + " | ".join(f"{n} / dense TF" for n in names) + " |")
    print("|---" * (3 + 2 * len(names) + 1) + "|")
    for r in results["rows"]:
        if r["mode"] == "block":
            v, f = r["union_variants_ms"], r["union_variants_tf_vs_dense"]
            print(f"| {r['G']} | {r['S']} | {r['union_ms']:.2f} | " + " | ".join(f"{v[n]:.2f}" for n in names)
                  + f" | {r['union_tf_vs_dense']:.2f} | " + " | ".join(f"{f[n]:.2f}" for n in names) + " |")
    print("\n| mode | S | topk | default ms | its TFLOP/s | generic token kernel ms | its TFLOP/s | peak GiB | "
          "dense(expanded) ms | masked SDPA ms | x vs dense |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        if r["mode"] == "token_mla":
            masked = f"{r['masked_sdpa_ms']:.1f}" if r["masked_sdpa_ms"] else r["masked_note"]
            print(f"| MLA token | {r['S']} | {r['topk']} | {r['ms']:.2f} | {r['tflops']:.0f} | {r['generic_ms']:.2f} | "
                  f"{r['generic_tflops']:.0f} | {r['peak_gib']:.2f} | {r['dense_ms']:.2f} | {masked} | "
                  f"{r['speedup_vs_dense']:.2f} |")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
