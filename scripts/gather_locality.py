"""Do Stem's DSA lists gather from L2 as well as native's? (CPU or GPU, no timing.)

    python scripts/gather_locality.py --seqs 65536 131072 --rows 4096 --sweeps 0 33 66

Builds the DeepSeek-V3.2 layer of `scripts/bench_layers.py --family dsa` (real dims, random weights,
i.i.d. hidden states; fp32 here), the native top-2048 lists of its last `--rows` query rows (the fp32
indexer over every causal key), Stem's lists at reduce 0.15 for the same rows (the whole prefill's
TPD budgets in the default multiples of 128 keys and, as "stem, budget step 1", the exact line, with the OAM
bias of the layer's value norms) and Stem's pair count laid out on native's lists
(`bench.lists.stem_count_peers`), then replays each through the MLA kernel's gather order and an LRU
model of L2 (`bench.lists.replay_gathers`) at a few capacities, each list walked ascending or, `--sweeps`,
with alternate blocks of queries walking theirs backward (the kernel's `WS_TILES["SWEEP"]`), in lockstep
waves or, `--jitter`, with the programs drifting apart as they run (`bench.lists.replay_gathers_timed`). Prints a table last; JSON to --out.

Why: timed one list after another, the kernel read 0.79x native's time on Stem's last 16K rows for
0.715x of the pairs, where its fixed cost per row explains 0.737; more misses per pair would have been
the rest. The timed replay (`--jitter`) gives Stem none, and in one alternation on a GPU the kernel
reads 0.745x (BENCHMARKS.md, twenty-sixth session).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stem_boost.adapters.dsa import latent_value_rms, native_selection  # noqa: E402
from stem_boost.bench.inputs import dsa_bench_layer  # noqa: E402
from stem_boost.bench.lists import replay_gathers, replay_gathers_timed, stem_count_peers  # noqa: E402
from stem_boost.boost import plan_for, token_budget_step  # noqa: E402
from stem_boost.config import StemConfig  # noqa: E402
from stem_boost.native.dsa_indexer import chunked_index_topk, detect_variant, indexer_qk, indexer_weights  # noqa: E402
from stem_boost.oam import oam_bias  # noqa: E402
from stem_boost.select import stem_select  # noqa: E402

LATENT_ROW_BYTES = 576 * 2


def layer_lists(S: int, rows: int, seed: int, key_chunk: int = 8192) -> dict:
    """Native and Stem lists (Selections of the last `rows` query rows) of the benchmark layer at S."""
    attn, cfg, rotary = dsa_bench_layer("cpu", torch.float32)
    indexer = attn.indexer
    variant = detect_variant(indexer)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, S, cfg.hidden_size, generator=g)
    cos, sin = rotary(x, torch.arange(S)[None])
    r0 = S - rows
    with torch.no_grad():
        # the indexer's keys at every position (indexer_qk also builds queries of a zero q_resid: dropped)
        k = torch.empty(1, S, indexer.head_dim)
        for t0 in range(0, S, key_chunk):
            t1 = min(S, t0 + key_chunk)
            zeros = torch.zeros(1, t1 - t0, cfg.q_lora_rank)
            _, k[:, t0:t1] = indexer_qk(indexer, x[:, t0:t1], zeros, (cos[:, t0:t1], sin[:, t0:t1]),
                                        variant=variant, fused_rope=False)
        q_resid = attn.q_a_layernorm(attn.q_a_proj(x[:, r0:]))
        q, _ = indexer_qk(indexer, x[:, r0:], q_resid, (cos[:, r0:], sin[:, r0:]), variant=variant, fused_rope=False)
        w = indexer_weights(indexer, x[:, r0:], variant)
        scale = None if variant.scale_in_weights else indexer.softmax_scale
        top = chunked_index_topk(q, k, w, None, indexer.index_topk, scale)  # queries at the end: causal
        native = native_selection(top, q_offset=r0, padding=None)
        # Stem: the layer's value norms, OAM bias, the whole prefill's TPD budgets for these rows
        latent = attn.kv_a_layernorm(attn.kv_a_proj_with_mqa(x)[..., :cfg.kv_lora_rank])
        w_uv = attn.kv_b_proj.weight.view(cfg.num_attention_heads, -1, cfg.kv_lora_rank)[:, cfg.qk_nope_head_dim:]
        norms = latent_value_rms(latent, w_uv, tensor_cores=False)  # [1, 1, S]
    c = StemConfig(reduce=0.15)
    bias = oam_bias(norms, beta=c.beta, norm=c.oam_norm)
    lists = {"native": native}
    for name, step in (("stem", token_budget_step(indexer.index_topk, c)), ("stem, budget step 1", 1)):
        budgets = plan_for(torch.arange(1, S + 1), indexer.index_topk, c, step).budgets  # the whole prefill's
        lists[name] = replace(stem_select(native.idx, top.scores.unsqueeze(1), budgets[r0:], key_bias=bias), q_offset=r0)
    return {**lists, **stem_count_peers(native, lists["stem"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[131072])
    ap.add_argument("--rows", type=int, default=4096, help="the last query rows analysed")
    ap.add_argument("--capacities-mb", type=float, nargs="+", default=[25.0, 50.0],
                    help="modelled L2 sizes (an H200 has 50 MB in two halves)")
    ap.add_argument("--sweeps", type=int, nargs="+", default=[0],
                    help="the MLA kernel's SWEEP values replayed (0: every list ascending; N: alternate blocks of N "
                         "queries backward)")
    ap.add_argument("--jitter", type=float, default=None,
                    help="replay with the programs' timing (`replay_gathers_timed`): each token's step time varies by "
                         "this fraction (N(0, 1) a token), so that equal rows drift apart; default: lockstep waves")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    print(f"seed {args.seed}", flush=True)
    rows = []
    for S in args.seqs:
        t = time.time()
        lists = layer_lists(S, min(args.rows, S), args.seed)
        print(f"S={S}: lists in {time.time() - t:.0f} s", flush=True)
        native_pairs = int(lists["native"].counts.sum())
        for name, sel in lists.items():
            for mb, sweep in ((mb, sweep) for mb in args.capacities_mb for sweep in args.sweeps):
                capacity = int(mb * 2**20 // LATENT_ROW_BYTES)
                rep = (replay_gathers(sel, capacity, sweep=sweep) if args.jitter is None else
                       replay_gathers_timed(sel, capacity, sweep=sweep, jitter=args.jitter, seed=args.seed))
                rows.append(dict(S=S, lists=name, capacity_mb=mb, sweep=sweep, pairs=int(sel.counts.sum()),
                                 pairs_vs_native=int(sel.counts.sum()) / native_pairs, accesses=rep.accesses,
                                 misses=rep.misses, miss_rate=rep.miss_rate, wave_unique=rep.wave_unique))
                print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(dict(args=vars(args) | {"out": str(args.out)}, rows=rows), indent=1))
    print("\n| S | lists | pairs / native | L2 MB | SWEEP | miss rate | misses / native's accesses | "
          "distinct keys a wave / access |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(x for x in rows if x["S"] == r["S"] and x["lists"] == "native" and x["capacity_mb"] == r["capacity_mb"]
                    and x["sweep"] == 0) if 0 in args.sweeps else r
        print(f"| {r['S']} | {r['lists']} | {r['pairs_vs_native']:.3f} | {r['capacity_mb']:g} | {r['sweep']} | {r['miss_rate']:.3f} | "
              f"{r['misses'] / max(base['accesses'], 1):.3f} | {r['wave_unique']:.3f} |")


if __name__ == "__main__":
    main()
