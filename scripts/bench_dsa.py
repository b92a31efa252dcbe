"""GPU benchmark of the DSA prefill kernels of issue 18, each against its peers in the same run.

    python scripts/bench_dsa.py --out bench_dsa.json [--sections topk mla indexer cut quant lengths fallback] [--budget-s 170]

Sections (each starts with a correctness check on fresh random inputs, seed printed):
  topk     `kernels/dsa_topk.topk_rows` (radix select, Stem inside) on rows x keys fp32 scores, k 2048,
           vs its PyTorch definition; peers: torch.topk, the current path's exact top-k (int64
           composite key, as `chunked_index_topk`) + Stem's two-sort truncation (`truncate_by_score`).
  mla      `kernels/mla_token.mla_token_attention` tile variants on the absorbed-MLA shape (Dqk 576,
           Dv 512, one latent kv head, 128 and 64 heads, top-k 2048) vs `sparse_attention_reference`;
           peer: `sparse_attention` token mode. FLOP = 2 * topk * heads * (576 + 512) per query.
  fallback what a row whose sample missed costs the warp top-k (its radix select) per fallback tile.
  cut      `kernels/dsa_topk.candidate_cut` (Stem's cut of 2048 token candidates per row, OAM bias,
           per-row budgets) as a caller gets it (the default), one row a program at 1 / 2 / 4 / 8
           warps and its searches, one row a warp at its tilings, on N(0, 1) rows and tail rows;
           each vs the one-row-a-program bisection's result (the same kept set and counts).
  quant    the FP8 scorer's operand quantisation of one query chunk (rows x 64 heads x 128, bf16):
           the fused Triton pass vs the PyTorch definition (five fp32 passes); same e4m3 codes on
           >= 99.9% of entries, and the FP8 scores of the chunk with either.
  lengths  the default MLA route at uniform row lengths (`--lengths`), a least-squares fit of time =
           fixed + per_key * L: the fixed part is what a row pays whatever its budget; peer on Hopper:
           the 128-key Gluon tile (`mla_token_sm90.py`).
  indexer  the lightning indexer of one chunk of query rows at the end of a long sequence (64 heads x
           128): current `chunked_index_topk` (bf16 fused scores + int64 top-k) vs the fused bf16 /
           FP8 scores (causal tail unwritten) + `topk_rows(valid_len=)`; top-2048 overlap of the bf16
           and FP8 selections with the fp32 definition.
Times: `triton.testing.do_bench` medians (ms). A short table is printed last; everything goes to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from stem_boost.kernels.dsa_topk import CUT_METHOD, candidate_cut, topk_rows, topk_rows_reference  # noqa: E402
from stem_boost.kernels.indexer_scores import (  # noqa: E402
    fp8_index_scores,
    fp8_index_scores_reference,
    fused_index_scores,
    hadamard_matrix,
    quantize_fp8_rows,
    quantize_fp8_rows_fused,
)
from stem_boost.kernels.indexer_scores_sm90 import fp8_index_scores_sm90, supports_fp8_scores_sm90  # noqa: E402
from stem_boost.kernels.mla_token import mla_token_attention  # noqa: E402
from stem_boost.kernels.mla_token_sm90 import mla_token_attention_sm90, supports_sm90  # noqa: E402
from stem_boost.kernels.mla_token_ws import mla_token_attention_ws  # noqa: E402
from stem_boost.kernels.reference import sparse_attention_reference  # noqa: E402
from stem_boost.native.dsa_indexer import chunked_index_topk  # noqa: E402
from stem_boost.selection import Selection  # noqa: E402

ROWS: list[dict] = []  # the printed table
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def row(section: str, what: str, ms: float | None, extra: str = "") -> None:
    ROWS.append(dict(section=section, what=what, ms=ms, extra=extra))
    log(f"{section:8s} {what:48s} {'' if ms is None else f'{ms:9.3f} ms'} {extra}")


DEV = "cuda"


def bench(fn, rep: int = 100) -> float:
    if DEV != "cuda":  # CPU smoke run of the script (TRITON_INTERPRET=1): one timed call
        t = time.time()
        fn()
        return (time.time() - t) * 1e3
    return float(do_bench(fn, warmup=10, rep=rep, return_mode="median"))


def seed_all() -> int:
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    torch.manual_seed(seed)
    return seed


# ----------------------------------------------------------------------------------------- top-k
def composite_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The current exact top-k (as chunked_index_topk's position tie rule): int64 (score image, -pos)."""
    n = scores.shape[-1]
    bits = (scores.float() + 0.0).contiguous().view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    rev = torch.arange(n - 1, -1, -1, device=scores.device, dtype=torch.int64)
    return (ordered * (1 << 32) + rev).topk(k, dim=-1).indices


def section_topk(args, res: dict) -> None:
    R, T, k = args.topk_rows, args.topk_keys, args.k
    dev = DEV
    seed = seed_all()
    log(f"topk: seed {seed}, rows {R}, keys {T}, k {k}")
    # correctness on 256 rows with ties, -inf, bias, budgets, causal limits
    nc = min(256, R)
    s = torch.randn(1, nc, T, device=dev)
    s[:, :, ::7] = torch.round(s[:, :, ::7] * 4) / 4
    s[torch.rand_like(s) < 0.05] = float("-inf")
    bias = torch.randn(1, T, device=dev) * 0.1
    bud = torch.randint(0, k + 100, (1, nc), device=dev, dtype=torch.int32)
    vl = torch.randint(1, T + 1, (1, nc), device=dev, dtype=torch.int32)
    ok = True
    for kw in (dict(), dict(key_bias=bias, budgets=bud, valid_len=vl)):
        want = topk_rows_reference(s, k, **kw)
        for bits, extra in ((8, {}), (11, {}), (8, dict(block=1024, stages=3)), (8, dict(method="sampled")),
                            (8, dict(method="warp")), (8, dict(method="warp", samples=2048, num_warps=4))):
            got = topk_rows(s, k, bits=bits, **extra, **kw)
            ok &= torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    res["topk_correct"] = ok
    row("topk", "exact vs PyTorch definition (256 rows)", None, f"{'PASS' if ok else 'FAIL'} seed {seed}")

    scores = torch.randn(1, R, T, device=dev)
    bias = torch.randn(1, T, device=dev) * 0.1
    bud = torch.randint(k // 2, k + 1, (1, R), device=dev, dtype=torch.int32)
    full = torch.full((1, R), T, device=dev, dtype=torch.int32)
    causal = (T - R + 1 + torch.arange(R, device=dev, dtype=torch.int32)).view(1, R)  # rows at the end
    gb = R * T * 4 / 1e9
    res["topk"] = {}
    for name, fn in [
        ("torch.topk (values + indices, sorted)", lambda: scores.topk(k, dim=-1)),
        ("torch.topk sorted=False", lambda: scores.topk(k, dim=-1, sorted=False)),
        ("current exact top-k (int64 composite)", lambda: composite_topk(scores, k)),
    ]:
        ms = bench(fn)
        res["topk"][name] = ms
        row("topk", name, ms, f"{gb / ms:.0f} GB/s")

    def current_stem():
        from stem_boost.select import truncate_by_score
        c = composite_topk(scores, k)
        cs = scores.gather(-1, c) + bias.expand(R, -1).unsqueeze(0).gather(-1, c)
        return truncate_by_score(c.to(torch.int32).unsqueeze(1), cs.unsqueeze(1), bud[0])

    try:
        ms = bench(current_stem, rep=50)
        row("topk", "current top-k + OAM gather + truncate_by_score", ms)
        res["topk"]["current stem"] = ms
    except Exception as e:  # noqa: BLE001
        row("topk", "current top-k + truncate_by_score", None, f"failed: {e!r}"[:120])
    # (bits, block, warps, pipeline stages of the pass loops): the default first; the staged variants
    # trade registers for loads in flight (`stem-boost build`: 1024 x 8 warps x 3 stages = 115 regs,
    # 16 warps / SM, cp.async; the default has no load in flight while it counts)
    for bits, block, warps, stages in [(8, 4096, 8, 1)]:  # earlier runs: 1024 x 3 stages, 2048, 4 warps, 11-12 bits slower
        if time.time() - T0 > args.budget_s:
            row("topk", "time budget reached", None)
            return
        name = f"topk_rows bits {bits} block {block} warps {warps} stages {stages}"
        kw = dict(bits=bits, block=block, num_warps=warps, stages=stages)
        try:
            ms = bench(lambda: topk_rows(scores, k, **kw))
            ms_stem = bench(lambda: topk_rows(scores, k, key_bias=bias, budgets=bud, valid_len=full, **kw))
            ms_causal = bench(lambda: topk_rows(scores, k, key_bias=bias, budgets=bud, valid_len=causal, **kw))
        except Exception as e:  # noqa: BLE001
            row("topk", name, None, f"failed: {e!r}"[:120])
            continue
        res["topk"][name] = dict(plain=ms, stem=ms_stem, stem_causal_rows=ms_causal)
        row("topk", name, ms, f"{gb / ms:.0f} GB/s; +Stem {ms_stem:.3f} ms; +Stem causal rows {ms_causal:.3f} ms")
    # the sampled threshold + one read of each row (exact; a row whose sample misses takes the radix
    # select): one row a program ("sampled") or one row a warp ("warp"); the first of each is its default
    variants = [(f"sampled (capacity 4096, block {block}, {warps} warps, stages {stages})",
                 dict(method="sampled", stages=stages, block=block, num_warps=warps))
                for block, warps, stages in [(2048, 8, 2), (2048, 8, 1), (4096, 8, 2)]]
    variants += [(f"warp ({warps} rows a program, block {block}, {samples} samples, margin {margin})",
                  dict(method="warp", block=block, num_warps=warps, samples=samples, margin=margin))
                 for warps, block, samples, margin in WARP_TOPK_TILES]
    spread = torch.randint(1, T + 1, (1, R), device=dev, dtype=torch.int32)  # rows of a whole causal layer
    for label, kw in variants:
        name = f"topk_rows {label}"
        fell_back = torch.zeros(1, R, dtype=torch.int32, device=dev)
        try:
            ms = bench(lambda: topk_rows(scores, k, fell_back=fell_back, **kw))
            rate = float(fell_back.float().mean())
            ms_stem = bench(lambda: topk_rows(scores, k, key_bias=bias, budgets=bud, valid_len=full, **kw))
            ms_causal = bench(lambda: topk_rows(scores, k, key_bias=bias, budgets=bud, valid_len=causal, **kw))
            ms_native = bench(lambda: topk_rows(scores, k, valid_len=causal, **kw))  # what the native layer runs
            ms_spread = bench(lambda: topk_rows(scores, k, valid_len=spread, **kw))
        except Exception as e:  # noqa: BLE001
            row("topk", name, None, f"failed: {e!r}"[:120])
            continue
        res["topk"][name] = dict(plain=ms, stem=ms_stem, stem_causal_rows=ms_causal, causal_rows=ms_native,
                                 spread_rows=ms_spread, fallback_rate=rate)
        row("topk", name, ms, f"causal rows {ms_native:.3f} ms; rows of 1..T keys {ms_spread:.3f} ms; +Stem "
                              f"{ms_stem:.3f} ms; +Stem causal rows {ms_causal:.3f} ms; radix fallback on "
                              f"{rate:.2%} of rows")


# ------------------------------------------------------------------------------------------- MLA
def dsa_selection(S: int, T: int, k: int, dev: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows are the last S of T positions; each keeps min(k, pos + 1) random causal keys, ascending."""
    offset = T - S
    idx = torch.empty(1, 1, S, k, dtype=torch.int32, device=dev)
    counts = torch.empty(1, 1, S, dtype=torch.int32, device=dev)
    for s0 in range(0, S, 1024):
        s1 = min(S, s0 + 1024)
        pos = torch.arange(s0, s1, device=dev) + offset
        r = torch.rand(s1 - s0, T, device=dev)
        r = torch.where(torch.arange(T, device=dev)[None, :] <= pos[:, None], r, -1.0)
        top = r.topk(k, dim=-1)
        sel = torch.where(top.values >= 0, top.indices, T + 1).sort(dim=-1).values
        counts[0, 0, s0:s1] = (sel <= T).sum(-1).to(torch.int32)
        idx[0, 0, s0:s1] = torch.where(sel <= T, sel, -1).to(torch.int32)
    return idx, counts


MLA_VARIANTS = [  # earlier runs tried N 16 / 32 with 3-4 stages, 16 warps, DV_SPLIT 2, 128 heads: all slower
    dict(BLOCK_H=64, BLOCK_N=64, DV_SPLIT=1, NUM_STAGES=2, num_warps=8, PREFETCH_IDX=False, HEADS_INNER=False),
    # the key positions a step ahead in registers: the pipeliner then keeps a gathered tile in flight
    dict(BLOCK_H=64, BLOCK_N=64, DV_SPLIT=1, NUM_STAGES=2, num_warps=8, PREFETCH_IDX=True, HEADS_INNER=False),
    # and a token's head chunks side by side in the launch order: the second gathers from L2
    dict(BLOCK_H=64, BLOCK_N=64, DV_SPLIT=1, NUM_STAGES=2, num_warps=8, PREFETCH_IDX=True, HEADS_INNER=True),
    dict(BLOCK_H=64, BLOCK_N=32, DV_SPLIT=1, NUM_STAGES=3, num_warps=8, PREFETCH_IDX=True, HEADS_INNER=True),
]


SM90_VARIANTS = [  # the Gluon kernel (first session 7 calls: N 32 with 3-4 buffers ran 224 TFLOP/s against 316 at N 64)
    dict(BLOCK_N=64, NUM_BUF=2, SPLIT_KEYS=True, EARLY_QK=False, ROW_SUM_AT_END=False, P_IN_ROPE=False),
    dict(BLOCK_N=64, NUM_BUF=2, SPLIT_KEYS=True, EARLY_QK=False, ROW_SUM_AT_END=True, P_IN_ROPE=False),
    dict(BLOCK_N=64, NUM_BUF=2, SPLIT_KEYS=True, EARLY_QK=True, ROW_SUM_AT_END=True, P_IN_ROPE=False),
    dict(BLOCK_N=64, NUM_BUF=2, SPLIT_KEYS=False, EARLY_QK=False, ROW_SUM_AT_END=False, P_IN_ROPE=False),
    # each warpgroup its own 64 keys of a 128-key tile (Q K^T n64: half the shared-memory reads of Q a key),
    # one buffer (the gather is not overlapped), P in the tile's rope columns
    dict(BLOCK_N=128, NUM_BUF=1, SPLIT_KEYS=True, EARLY_QK=False, ROW_SUM_AT_END=False, P_IN_ROPE=True),
    dict(BLOCK_N=128, NUM_BUF=1, SPLIT_KEYS=True, EARLY_QK=False, ROW_SUM_AT_END=True, P_IN_ROPE=True),
    dict(BLOCK_N=64, NUM_BUF=2, SPLIT_KEYS=True, EARLY_QK=False, ROW_SUM_AT_END=True, P_IN_ROPE=True),
]


WS_VARIANTS = [dict(CONSUMER_REGS=232, EARLY_QK_L=False, LOCAL_P_REGS=p, L2_HINTS=h) for p in (False, True)
               for h in (False, True)] + [dict(CONSUMER_REGS=216, EARLY_QK_L=False, LOCAL_P_REGS=True, L2_HINTS=False)]


def ws_variant_name(v: dict) -> str:
    """A row label for a tile of the warp-specialised MLA kernel (mla_token_ws.py)."""
    return (f"ws consumer regs {v['CONSUMER_REGS']}" + (" next S early" if v["EARLY_QK_L"] else "")
            + (" own P from registers" if v["LOCAL_P_REGS"] else "") + (" L2 hints" if v["L2_HINTS"] else ""))


def sm90_variant_name(v: dict) -> str:
    """A row label for a tile of the 128-key Gluon kernel (mla_token_sm90.py)."""
    return (f"sm90 n{v['BLOCK_N']} buf{v['NUM_BUF']} " + ("split keys" if v["SPLIT_KEYS"] else "replicated S")
            + (" early QK" if v["EARLY_QK"] else "") + (" row sums at end" if v["ROW_SUM_AT_END"] else "")
            + (" P in rope" if v.get("P_IN_ROPE") else ""))


def section_mla(args, res: dict) -> None:
    from stem_boost.kernels import sparse_attention

    dev, k = DEV, args.k
    seed = seed_all()
    res["mla"] = {}
    for H in args.mla_heads:
        S, T = args.mla_queries, args.mla_keys
        log(f"mla: seed {seed}, heads {H}, queries {S} (the last of {T} keys), topk {k}")
        # correctness on a small problem (fresh inputs), every variant
        qs = torch.randn(1, 48, H, 576, device=dev).to(torch.bfloat16)
        kvs = torch.randn(1, args.check_keys, 1, 576, device=dev).to(torch.bfloat16)
        idx_s, cnt_s = dsa_selection(48, args.check_keys, k, dev)
        cnt_s[0, 0, 0] = 0
        want = sparse_attention_reference(qs.float(), kvs.float(), kvs[..., :512].float(),
                                          Selection(idx=idx_s, counts=cnt_s), sm_scale=576 ** -0.5)
        q = torch.randn(1, S, H, 576, device=dev).to(torch.bfloat16)
        kv = torch.randn(1, T, 1, 576, device=dev).to(torch.bfloat16)
        idx, counts = dsa_selection(S, T, k, dev)
        flop = 2.0 * float(counts.sum()) * H * (576 + 512)
        sel = Selection(idx=idx, counts=counts)
        # the generic token kernel (triton_sparse.py: `tiles={}` keeps sparse_attention off the MLA route)
        # and sparse_attention's default route (mla_token.py with its default tiles)
        for label, tiles in (("generic token kernel (peer)", {}), ("default route", None)):
            ms = bench(lambda: sparse_attention(q, kv, kv[..., :512], sel, check=False, tiles=tiles))
            got = sparse_attention(qs, kvs, kvs[..., :512], Selection(idx=idx_s, counts=cnt_s), tiles=tiles)
            err = float((got.float() - want).norm() / want.norm())
            res["mla"][f"H{H} sparse_attention {label}"] = dict(ms=ms, tflops=flop / ms / 1e9, err=err)
            row("mla", f"H{H} sparse_attention {label}", ms, f"{flop / ms / 1e9:.0f} TFLOP/s err {err:.1e}")
        for v in MLA_VARIANTS if "triton" in args.mla_kernels else ():
            if v["BLOCK_H"] > max(64, H):
                continue
            if time.time() - T0 > args.budget_s:
                row("mla", "time budget reached", None)
                return
            name = (f"H{H} h{v['BLOCK_H']} n{v['BLOCK_N']} split{v['DV_SPLIT']} st{v['NUM_STAGES']} w{v['num_warps']}"
                    + (" idx ahead" if v.get("PREFETCH_IDX") else "") + (" heads inner" if v.get("HEADS_INNER") else ""))
            try:
                got = mla_token_attention(qs, kvs, idx_s, cnt_s, sm_scale=576 ** -0.5, tiles=v)
                err = float((got.float() - want).norm() / want.norm())
                ms = bench(lambda: mla_token_attention(q, kv, idx, counts, sm_scale=576 ** -0.5, tiles=v))
            except Exception as e:  # noqa: BLE001
                row("mla", name, None, f"failed: {e!r}"[:160])
                continue
            res["mla"][name] = dict(ms=ms, tflops=flop / ms / 1e9, err=err)
            row("mla", name, ms, f"{flop / ms / 1e9:.0f} TFLOP/s err {err:.1e} {'PASS' if err < 1e-2 else 'FAIL'}")
        if not supports_sm90(q, 512):
            continue
        gluon = [(sm90_variant_name(v), mla_token_attention_sm90, v) for v in SM90_VARIANTS
                 if "sm90" in args.mla_kernels]  # mla_token_sm90.py
        gluon += [(ws_variant_name(v), mla_token_attention_ws, v) for v in WS_VARIANTS
                  if "ws" in args.mla_kernels]  # mla_token_ws.py
        for label, kernel, v in gluon:
            name = f"H{H} {label}"
            try:
                got, lse = kernel(qs, kvs, idx_s[:, 0], cnt_s[:, 0], sm_scale=576 ** -0.5, return_lse=True, tiles=v)
                _, lse_want = mla_token_attention(qs, kvs, idx_s, cnt_s, sm_scale=576 ** -0.5, return_lse=True)
                err = float((got.float() - want).norm() / want.norm())
                lse_err = float((lse - lse_want).nan_to_num(0.0, 0.0, 0.0).abs().max())
                ms = bench(lambda: kernel(q, kv, idx[:, 0], counts[:, 0], sm_scale=576 ** -0.5, tiles=v))
            except Exception as e:  # noqa: BLE001
                row("mla", name, None, f"failed: {e!r}"[:300])
                continue
            res["mla"][name] = dict(ms=ms, tflops=flop / ms / 1e9, err=err, lse_err=lse_err)
            row("mla", name, ms, f"{flop / ms / 1e9:.0f} TFLOP/s err {err:.1e} lse {lse_err:.1e} "
                f"{'PASS' if err < 1e-2 and lse_err < 1e-3 else 'FAIL'}")


def section_lengths(args, res: dict) -> None:
    """The default MLA route at uniform row lengths L: time = fixed + per_key * L per program, fitted by
    least squares. The fixed part (Q in, O out, the first gather) is paid by every row whatever its
    budget, so it is what keeps a Stem row from running in proportion to its keys."""
    from stem_boost.kernels import sparse_attention

    dev = DEV
    seed = seed_all()
    H, S, T = args.mla_heads[0], args.mla_queries, args.mla_keys
    log(f"lengths: seed {seed}, heads {H}, queries {S} (the last of {T} keys)")
    q = torch.randn(1, S, H, 576, device=dev).to(torch.bfloat16)
    kv = torch.randn(1, T, 1, 576, device=dev).to(torch.bfloat16)
    lengths, times = [], []
    res["lengths"] = {}
    for L in args.lengths:
        idx, counts = dsa_selection(S, T, L, dev)
        sel = Selection(idx=idx, counts=counts)
        ms = bench(lambda: sparse_attention(q, kv, kv[..., :512], sel, check=False))
        flop = 2.0 * float(counts.sum()) * H * (576 + 512)
        lengths.append(float(counts.float().mean()))
        times.append(ms)
        res["lengths"][str(L)] = dict(ms=ms, tflops=flop / ms / 1e9, mean_count=lengths[-1])
        row("lengths", f"H{H} rows of {L} keys", ms, f"{flop / ms / 1e9:.0f} TFLOP/s")
        if supports_sm90(q, 512):  # the route is the warp-specialised kernel: the 128-key tile beside it, same lists
            ms_tile = bench(lambda: mla_token_attention_sm90(q, kv, idx[:, 0], counts[:, 0], sm_scale=576 ** -0.5))
            res["lengths"][str(L)].update(tile128_ms=ms_tile, tile128_tflops=flop / ms_tile / 1e9)
            row("lengths", f"H{H} rows of {L} keys, 128-key tile (peer)", ms_tile, f"{flop / ms_tile / 1e9:.0f} TFLOP/s")
    if len(lengths) >= 2:
        x = torch.tensor(lengths, dtype=torch.float64)
        y = torch.tensor(times, dtype=torch.float64)
        A = torch.stack([torch.ones_like(x), x], dim=1)
        fixed, per_key = torch.linalg.lstsq(A, y[:, None]).solution[:, 0].tolist()
        res["lengths"]["fit"] = dict(fixed_ms=fixed, per_key_ms=per_key, fixed_in_keys=fixed / per_key)
        row("lengths", "fit: fixed + per_key * L", fixed,
            f"fixed = {fixed / per_key:.0f} keys a row; at L 2048 the fixed part is "
            f"{fixed / (fixed + per_key * 2048):.1%} of the time")


# --------------------------------------------------------------------------------------- indexer
def exact_scores(q, k, w, scale, offset):
    """fp32 definition, head by head: [B, S, T] (masked -inf after the causal limit)."""
    B, S, H, D = q.shape
    out = torch.zeros(B, S, k.shape[1], device=q.device)
    for h in range(H):
        out += w[:, :, h, None].float() * torch.relu(q[:, :, h].float() @ k.float().transpose(1, 2) * scale)
    vis = torch.arange(k.shape[1], device=q.device)[None, :] <= torch.arange(S, device=q.device)[:, None] + offset
    return out.masked_fill(~vis, float("-inf"))


def overlap(a: torch.Tensor, b: torch.Tensor, na: torch.Tensor) -> float:
    """Mean over rows of |a & b| / |a| for -1 padded position lists."""
    T = int(max(a.max(), b.max())) + 2
    ma = torch.zeros(a.shape[0], a.shape[1], T, dtype=torch.bool, device=a.device)
    mb = torch.zeros_like(ma)
    ma.scatter_(-1, (a.long() + 1), True)
    mb.scatter_(-1, (b.long() + 1), True)
    ma[..., 0] = mb[..., 0] = False
    return float(((ma & mb).sum(-1).float() / na.clamp(min=1).float()).mean())


def section_indexer(args, res: dict) -> None:
    dev, k = DEV, args.k
    S, T, H, D = args.ix_queries, args.ix_keys, 64, 128
    seed = seed_all()
    log(f"indexer: seed {seed}, queries {S} (the last of {T}), {H} heads x {D}, top-{k}")
    offset = T - S
    q = torch.randn(1, S, H, D, device=dev).to(torch.bfloat16)
    kk = torch.randn(1, T, D, device=dev).to(torch.bfloat16)
    w = torch.randn(1, S, H, device=dev) * H ** -0.5
    scale = D ** -0.5
    valid_len = (offset + 1 + torch.arange(S, device=dev, dtype=torch.int32)).view(1, S)
    res["indexer"] = {}
    # correctness of the FP8 kernel vs its definition on 64 rows
    sub = slice(max(0, S - 64), S)
    got = fp8_index_scores(q[:, sub], kk, w[:, sub], scale)
    ref = fp8_index_scores_reference(q[:, sub], kk, w[:, sub], scale)
    err = float((got.double() - ref).norm() / ref.norm())
    verdict = "PASS" if err < 1e-3 else "FAIL"
    row("indexer", "fp8 kernel vs quantised definition (64 rows)", None, f"rel err {err:.1e} {verdict}")
    res["indexer"]["fp8_kernel_err"] = err
    flop = 2.0 * H * D * float(valid_len.sum())  # causal pairs only

    def current():
        return chunked_index_topk(q, kk, w, None, k, scale, score_dtype=torch.bfloat16)

    def new(fp8: bool, bs: int = 64, bt: int = 128, nw: int | None = None):
        fn = fp8_index_scores if fp8 else fused_index_scores
        sc = fn(q, kk, w, scale, causal_offset=offset, block_s=bs, block_t=bt, write_masked=False, num_warps=nw)
        return topk_rows(sc, k, valid_len=valid_len)

    bias = torch.randn(1, T, device=dev) * 0.1
    budgets = torch.randint(k // 2, k + 1, (1, S), device=dev, dtype=torch.int32)

    def current_stem():
        from stem_boost.select import truncate_by_score
        top = current()
        c = top.indices.long().clamp(min=0)
        oam = torch.where(top.indices >= 0, top.scores + bias[0][c], float("-inf"))
        return truncate_by_score(top.indices.unsqueeze(1), oam.unsqueeze(1), budgets[0])

    def new_stem(fp8: bool):
        fn = fp8_index_scores if fp8 else fused_index_scores
        sc = fn(q, kk, w, scale, causal_offset=offset, write_masked=False)
        return topk_rows(sc, k, key_bias=bias, budgets=budgets, valid_len=valid_len)

    for name, fn in [("current chunked_index_topk (bf16 fused + int64 topk)", current),
                     ("bf16 fused scores + topk_rows", lambda: new(False)),
                     ("fp8 scores + topk_rows", lambda: new(True)),
                     ("current + Stem step (OAM gather + truncate_by_score)", current_stem),
                     ("bf16 scores + topk_rows with Stem inside", lambda: new_stem(False)),
                     ("fp8 scores + topk_rows with Stem inside", lambda: new_stem(True))]:
        try:
            ms = bench(fn, rep=50)
        except Exception as e:  # noqa: BLE001
            row("indexer", name, None, f"failed: {e!r}"[:160])
            continue
        res["indexer"][name] = ms
        row("indexer", name, ms)
    # the score kernel alone: the weights loaded a head ahead or per head (the default), the scale folded
    # into them (the default) or multiplied in the kernel, each dtype's default tile
    for fp8 in (False, True):
        for pipeline, fold in ((True, True), (False, True), (False, False)):
            if time.time() - T0 > args.budget_s:
                row("indexer", "time budget reached", None)
                break
            name = f"{'fp8' if fp8 else 'bf16'} scores only, weights ahead {pipeline}, scale folded {fold}"
            fn = fp8_index_scores if fp8 else fused_index_scores
            try:
                ms = bench(lambda: fn(q, kk, w, scale, causal_offset=offset, write_masked=False, pipeline=pipeline,
                                      fold_scale=fold), rep=50)
            except Exception as e:  # noqa: BLE001
                row("indexer", name, None, f"failed: {e!r}"[:160])
                continue
            res["indexer"][name] = ms
            row("indexer", name, ms, f"{flop / ms / 1e9:.0f} TFLOP/s (causal pairs)")
    # the FP8 score kernel's tiles (query rows x keys, warps: a wider key tile reads each query tile's
    # 64 heads half as often; the per-head q loads are most of the kernel's L2 traffic, about 0.5 TB at
    # 128K tokens with 64 x 128), each against the default
    base = fp8_index_scores(q, kk, w, scale, causal_offset=offset, write_masked=False)
    live = torch.arange(T, device=dev)[None, :] < valid_len[0][:, None]
    variants = [(f"fp8 scores only, tile {bs} x {bt}, {nw} warps, {ns or 'default'} stages{', keys fast' * kf}",
                 lambda bs=bs, bt=bt, nw=nw, ns=ns, kf=kf: fp8_index_scores(q, kk, w, scale, causal_offset=offset,
                                                                           write_masked=False, block_s=bs, block_t=bt,
                                                                           num_warps=nw, num_stages=ns, keys_fast=kf))
                for bs, bt, nw, ns, kf in FP8_SCORE_TILES]
    if supports_fp8_scores_sm90(q):  # the Gluon kernel: the next head's product beside this head's sum
        variants += [(f"fp8 scores only, Gluon sm_90, {tile or 'default tile'}",
                      lambda tile=tile: fp8_index_scores_sm90(q, kk, w, scale, causal_offset=offset, write_masked=False,
                                                              tile=tile))
                     for tile in SM90_SCORE_TILES]
    for name, fn in variants:
        if time.time() - T0 > args.budget_s:
            row("indexer", "time budget reached", None)
            break
        try:
            got = fn()
            ms = bench(fn, rep=50)
        except Exception as e:  # noqa: BLE001
            row("indexer", name, None, f"failed: {e!r}"[:160])
            continue
        err = float(((got[0][live] - base[0][live]).abs() / base[0][live].abs().clamp_min(1e-6)).max())
        res["indexer"][name] = dict(ms=ms, max_rel_diff_vs_default=err)
        row("indexer", name, ms, f"{flop / ms / 1e9:.0f} TFLOP/s (causal pairs); max rel. diff from the default "
                                 f"tile {err:.1e}")
        del got
    del base, live
    # selection overlap with the fp32 definition on 256 rows
    n_ov = min(256, S)
    sub = slice(S - n_ov, S)
    ex = exact_scores(q[:, sub], kk, w[:, sub], scale, offset + S - n_ov)
    ref_idx, ref_n = topk_rows(ex, k)
    for name, fn in [("bf16", fused_index_scores), ("fp8", fp8_index_scores)]:
        sc = fn(q[:, sub], kk, w[:, sub], scale, causal_offset=offset + S - n_ov)
        got_idx, _ = topk_rows(sc, k)
        ov = overlap(got_idx, ref_idx, ref_n)
        res["indexer"][f"overlap_{name}"] = ov
        row("indexer", f"top-{k} overlap with fp32: {name}", None, f"{ov:.4f} (random N(0,1) inputs)")

# ------------------------------------------------------------------------------------ Stem's cut
def section_cut(args, res) -> None:
    """candidate_cut as a caller gets it (the default), one row a program at several warp counts and
    searches, and one row a warp at several tilings: R rows x K ascending candidates with scores, OAM
    bias per key, TPD-like budgets (60-100% of K); each also on tail rows (a row's top K of T N(0, 1)
    scores, the layer's kind of row). Every variant is checked against the one-row-a-program bisection."""
    R, K, T = args.cut_rows, args.k, args.topk_keys
    seed = seed_all()
    log(f"cut: seed {seed}, {R} rows x {K} candidates over {T} keys")
    cand = torch.sort(torch.stack([torch.randperm(T, device=DEV)[:K] for _ in range(min(R, 64))]), -1).values
    cand = cand.repeat(-(-R // cand.shape[0]), 1)[:R].to(torch.int32).view(1, 1, R, K)
    cand[..., -7:] = torch.where(torch.rand(1, 1, R, 1, device=DEV) < 0.1, -1, cand[..., -7:])  # some short rows
    scores = torch.randn(1, 1, R, K, device=DEV).masked_fill(cand < 0, float("-inf"))
    tail = torch.stack([torch.randn(T, device=DEV).topk(K).values for _ in range(min(R, 64))])
    tail = tail[:, torch.randperm(K, device=DEV)].repeat(-(-R // tail.shape[0]), 1)[:R].view(1, 1, R, K)
    tail = tail.masked_fill(cand < 0, float("-inf"))
    bias = torch.randn(1, 1, T, device=DEV) * 0.5
    budgets = (K * (0.6 + 0.4 * torch.rand(1, 1, R, device=DEV))).to(torch.int32)
    block = dict(method="block", search="bisect", skip_prefix=False)
    want = {id(x): candidate_cut(cand, x, budgets, key_bias=bias, **block) for x in (scores, tail)}

    def measure(rows_scores, **kw) -> tuple[float, bool]:
        """(ms, whether it kept the one-row-a-program bisection's set) of candidate_cut(**kw)."""
        idx, n = candidate_cut(cand, rows_scores, budgets, key_bias=bias, **kw)
        w_idx, w_n = want[id(rows_scores)]
        return bench(lambda: candidate_cut(cand, rows_scores, budgets, key_bias=bias, **kw)), bool(
            torch.equal(idx, w_idx) and torch.equal(n, w_n))

    res["cut"] = {}
    # what a caller gets: no method or tiling named (`CUT_METHOD` and the `CUT_*` defaults)
    ms, same = measure(scores)
    ms_tail, same_tail = measure(tail)
    res["cut"]["default"] = dict(method=CUT_METHOD, ms=ms, same=same, tail_ms=ms_tail, tail_same=same_tail)
    row("cut", f"candidate_cut default (method={CUT_METHOD!r})", ms,
        f"same as the block cut: {same}; tail rows {ms_tail:.3f} ms, same: {same_tail}")
    gb = R * K * 8 / 1e9 + R * K * 4 / 1e9
    for warps in (1, 2, 4, 8):
        try:
            ms, same = measure(scores, **block, num_warps=warps)
        except Exception as e:  # noqa: BLE001
            row("cut", f"candidate_cut {warps} warps", None, f"failed: {e!r}"[:120])
            continue
        res["cut"][warps] = dict(ms=ms, same=same)
        row("cut", f"candidate_cut {warps} warps", ms, f"{gb / ms:.0f} GB/s (reads + writes); same as 4 warps: {same}")
    # the bisection started below the bits a row's candidates share (`skip_prefix`); the threshold by an
    # interpolation search (`search="interpolate"`); on N(0, 1) rows and on tail rows
    for prefix, rows_scores in (("", scores), ("tail rows, ", tail)):
        for name, kw in (("bisect", block), ("skip_prefix", dict(block, skip_prefix=True)),
                         ("interpolate", dict(block, search="interpolate"))):
            if not prefix and name == "bisect":
                continue  # the N(0, 1) rows' bisection is the 4-warp row above
            ms, same = measure(rows_scores, **kw)
            res["cut"][prefix + name] = dict(ms=ms, same=same)
            row("cut", f"candidate_cut 4 warps, {prefix}{name.replace('_', ' ')}", ms, f"same as the bisection: {same}")
    # one row a warp (`method="warp"`): rows a program x register cap x prefix skipped x keys stashed
    # (and chunks a writing step)
    grid = [(rows, maxnreg, skip, stash, 4) for rows in (1, 2, 4) for maxnreg in (0, 168) for skip in (False, True)
            for stash in (False, True)] + [(1, 168, True, False, 8), (1, 168, True, True, 8), (1, 128, True, False, 4)]
    for rows, maxnreg, skip, stash, out_chunks in grid:
        kw = dict(method="warp", num_warps=rows, maxnreg=maxnreg, out_chunks=out_chunks, skip_prefix=skip,
                  stash=stash)
        name = (f"warp {rows} rows, maxnreg {maxnreg or 'none'}, {out_chunks} chunks a write, "
                f"prefix {'skipped' if skip else 'bisected'}, keys {'stashed' if stash else 'recomputed'}")
        try:
            ms, same = measure(scores, **kw)
            ms_tail, same_tail = measure(tail, **kw)
        except Exception as e:  # noqa: BLE001
            row("cut", f"candidate_cut {name}", None, f"failed: {e!r}"[:120])
            continue
        res["cut"][name] = dict(ms=ms, same=same, tail_ms=ms_tail, tail_same=same_tail)
        row("cut", f"candidate_cut {name}", ms, f"same as the block cut: {same}; tail rows {ms_tail:.3f} ms, "
                                                f"same: {same_tail}")
    # what the OAM bias's gather costs (one 4-byte read of a [T] vector per candidate): the cut without it
    _, n = candidate_cut(cand, scores, budgets, method="block")
    _, want_n = topk_rows_reference(scores.view(1, R, K), K, budgets=budgets.view(1, R))
    same = bool(torch.equal(n.view(1, R), want_n))
    ms = bench(lambda: candidate_cut(cand, scores, budgets, method="block"))
    res["cut"]["no_bias"] = dict(ms=ms, same_counts_as_reference=same)
    row("cut", "candidate_cut 4 warps, no OAM bias", ms, f"counts as the reference's: {same}")


# (rows a program, keys a row a step, samples, margin) of the warp top-k; the first is the default.
# H200 (2026-12-03, 8192 rows x 64K keys): margin 3 / 3.5 / 4 / 5 1.51 / 1.36 / 1.39 / 1.48 ms at
# 4 rows, block 256; 8 rows 1.53, block 128 1.63, 2048 samples 1.77 (at margin 3)
WARP_TOPK_TILES = [(4, 256, 1024, 3.5), (4, 512, 1024, 3.5), (2, 512, 1024, 3.5), (8, 512, 1024, 3.5),
                   (2, 256, 1024, 3.5), (4, 256, 1024, 3.0)]


# ------------------------------------------------------------------ the top-k's radix fallback
FALLBACK_TILES = [(4096, 8), (8192, 16), (4096, 16), (2048, 16), (8192, 8)]  # (keys a step, warps); first: default


def section_fallback(args, res) -> None:
    """What a row whose sample missed costs `topk_rows(method="warp")`: one row of --fallback-keys
    fp32 scores with a capacity too small for its keys (so it always takes the radix select), per
    fallback tile; a launch over a chunk waits for its slowest such row (about one a 3584-row chunk
    at 128K). Peer: the same row with the default capacity (no fallback). Each result vs the
    reference's set."""
    T, k = args.fallback_keys, args.k
    seed = seed_all()
    log(f"fallback: seed {seed}, one row of {T} keys, k {k}")
    s = torch.randn(1, 1, T, device=DEV)
    want = topk_rows_reference(s, k)
    res["fallback"] = {}
    for tile in [None, *FALLBACK_TILES]:
        kw = dict(method="warp") if tile is None else dict(method="warp", capacity=256, fallback=tile)
        name = "no fallback (default capacity)" if tile is None else f"fallback {tile[0]} keys x {tile[1]} warps"
        try:
            got = topk_rows(s, k, **kw)
            same = bool(torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]))
            ms = bench(lambda: topk_rows(s, k, **kw))
        except Exception as e:  # noqa: BLE001
            row("fallback", name, None, f"failed: {e!r}"[:120])
            continue
        res["fallback"][name] = dict(ms=ms, same=same)
        row("fallback", name, ms, f"same set as the reference: {same}")


# (query rows, keys, warps, pipeline stages, key tiles on the grid's fast axis: `kernels.tile_order`);
# the first is the default. H200 (2026-12-03): 4 warps 9.5 ms with query tiles fast, 8.7 keys fast (the
# default since); keys fast, 8 warps 9.8, 64 x 256 12.6, 128 x 128 at 8 warps 10.0, 128 x 64 11.5;
# 2 / 4 stages (query tiles fast) 10.5 / 9.7
# the Gluon kernel's tiles (`indexer_scores_sm90.SM90_SCORE_TILE` overrides): the default (3 heads a trip of
# the head loop, two of three sums beside a product, 252 registers), 2 heads a trip (225), 4 heads at 64 keys a
# tile (138 registers, three programs an SM), and the pairs schedule that ptxas serialises (STEP 0, note C7514:
# what the first version of this kernel measured, no faster than the Triton kernel). A cap of 168 registers for
# three programs an SM spills 1.4 KB at 128 keys a tile (sm_90 build): not listed
SM90_SCORE_TILES = [None, dict(STEP=2), dict(STEP=4, BLOCK_T=64), dict(STEP=0)]
FP8_SCORE_TILES = [(64, 128, 4, None, True), (64, 128, 4, None, False), (64, 128, 8, None, True),
                   (64, 128, 4, 4, True)]


# ---------------------------------------------------------------------------- FP8 quantisation
def section_quant(args, res) -> None:
    """The query chunk's e4m3 quantisation, fused vs the PyTorch definition, and the scores after."""
    R, H, D, T = args.ix_queries, 64, 128, args.ix_keys
    seed = seed_all()
    log(f"quant: seed {seed}, {R} rows x {H} heads x {D}")
    q = torch.randn(1, R, H, D, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, T, D, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(1, R, H, device=DEV) * H ** -0.5
    rot = hadamard_matrix(D, DEV)
    q8_ref, s_ref = quantize_fp8_rows(q, rot)
    q8, sc = quantize_fp8_rows_fused(q)
    same_codes = float((q8.view(torch.uint8) == q8_ref.view(torch.uint8)).float().mean())
    scale_err = float(((sc - s_ref).abs() / s_ref).max())
    ms_ref = bench(lambda: quantize_fp8_rows(q, rot))
    ms_fused = bench(lambda: quantize_fp8_rows_fused(q))
    gb = q.numel() * 3 / 1e9
    res["quant"] = dict(torch_ms=ms_ref, fused_ms=ms_fused, same_codes=same_codes, max_scale_rel_err=scale_err)
    row("quant", "quantize_fp8_rows (PyTorch definition)", ms_ref, "")
    row("quant", "quantize_fp8_rows_fused (one Triton pass)", ms_fused,
        f"{gb / ms_fused:.0f} GB/s; same e4m3 codes {same_codes:.5f}; max scale rel. diff {scale_err:.1e}")
    off = T - R
    k8 = quantize_fp8_rows_fused(k)
    ms_scores_keys_once = bench(lambda: fp8_index_scores(q, k, w, D ** -0.5, causal_offset=off, write_masked=False, k_fp8=k8))
    ms_scores = bench(lambda: fp8_index_scores(q, k, w, D ** -0.5, causal_offset=off, write_masked=False))
    ms_bf16 = bench(lambda: fused_index_scores(q, k, w, D ** -0.5, causal_offset=off, write_masked=False))
    ms_bf16_64 = bench(lambda: fused_index_scores(q, k, w, D ** -0.5, causal_offset=off, write_masked=False, block_s=64))
    res["quant"].update(fp8_scores_ms=ms_scores, fp8_scores_keys_once_ms=ms_scores_keys_once, bf16_scores_ms=ms_bf16,
                        bf16_scores_s64_ms=ms_bf16_64)
    row("quant", "FP8 scores of the chunk (quantise q and k)", ms_scores, "")
    row("quant", "FP8 scores of the chunk (keys quantised before)", ms_scores_keys_once, "")
    row("quant", "bf16 scores of the chunk (default tile / 64 rows)", ms_bf16, f"64-row tile {ms_bf16_64:.3f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", nargs="+", default=["topk", "mla", "indexer"])
    ap.add_argument("--out", default="bench_dsa.json")
    ap.add_argument("--budget-s", type=float, default=170.0, help="skip remaining MLA variants after this")
    ap.add_argument("--k", type=int, default=2048, help="top-k (DeepSeek-V3.2: 2048)")
    ap.add_argument("--check-keys", type=int, default=4096, help="keys of the MLA correctness problem")
    ap.add_argument("--topk-rows", type=int, default=8192)
    ap.add_argument("--topk-keys", type=int, default=65536)
    ap.add_argument("--mla-heads", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--mla-kernels", nargs="+", choices=["triton", "sm90", "ws"], default=["triton", "sm90", "ws"],
                    help="the MLA section's kernel families whose tile variants run (the default route always does)")
    ap.add_argument("--mla-queries", type=int, default=8192)
    ap.add_argument("--mla-keys", type=int, default=32768)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 1536, 2048],
                    help="row lengths of the lengths section (uniform rows)")
    ap.add_argument("--ix-queries", type=int, default=8192)
    ap.add_argument("--cut-rows", type=int, default=32768)
    ap.add_argument("--fallback-keys", type=int, default=131072, help="keys of the fallback section's row")
    ap.add_argument("--ix-keys", type=int, default=65536)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run under TRITON_INTERPRET=1 (tiny sizes)")
    args = ap.parse_args()
    global DEV
    DEV = args.device
    res: dict = dict(device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu", torch=torch.__version__,
                     triton=triton.__version__,
                     date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), args=vars(args))
    log(f"{res['device']} torch {res['torch']} triton {res['triton']}")
    for sec in args.sections:
        try:
            {"topk": section_topk, "mla": section_mla, "indexer": section_indexer, "cut": section_cut,
             "quant": section_quant, "lengths": section_lengths, "fallback": section_fallback}[sec](args, res)
        except Exception as e:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            row(sec, "section failed", None, repr(e)[:200])
        if DEV == "cuda":
            torch.cuda.empty_cache()
        Path(args.out).write_text(json.dumps(dict(res, rows=ROWS), indent=1))
    print("\n| section | what | ms | notes |\n|---|---|---|---|")
    for r in ROWS:
        ms = "" if r["ms"] is None else f"{r['ms']:.3f}"
        print(f"| {r['section']} | {r['what']} | {ms} | {r['extra']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
