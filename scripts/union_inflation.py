"""How much extra work the union tiles of the InfLLMv2 attention do, on real lists and on the
benchmark's random-weight lists (CPU or GPU, no timing).

    python scripts/union_inflation.py --source layer --seqs 32768 131072 --rows 2048
    python scripts/union_inflation.py --source smollm2 --seqs 4096 8192
    python scripts/union_inflation.py --source layer --seqs 32768 131072 --rows 2048 --smooth 128 --stem

The union kernel (`stem_boost.kernels.block_union`) computes QT consecutive tokens x the G heads of
a kv head together (M = QT x G rows, QT = 4 at MiniCPM-4.1's G = 16) over the union of their
per-token block lists, masking each token to its own list. Its work against the per-token work is
the inflation: union entries x QT / per-token entries (1 = the tokens of a tile chose the same
blocks; QT = independent lists). The kernel's time grows with it, so the same kernel is fast or
slow depending on how much neighbouring tokens agree.

- `--source layer`: the MiniCPM-4.1 attention layer of `scripts/bench_layers.py --family infllmv2`
  (32 q / 2 kv heads, d 128, MiniCPM-4.1's sparse_config, random weights, random hidden states):
  the native lists of its last `--rows` query rows at each length.
- `--source smollm2`: the SmolLM2-135M InfLLMv2 testbed (real weights, training-free InfLLMv2,
  G = 3) on the held-out English text (`stem_boost.text.corpus.heldout_stream`): every layer's
  native lists of one prefill of each length; mean, min and max over the layers.
- `--smooth W` (layer): hidden states whose neighbours share W - 1 of W draws (`bench_layers.py
  --smooth`), as neighbouring tokens of real text share their context.
- `--stem` (layer): also Stem's lists at reduce 0.18 for the same rows (the whole prefill's TPD
  budgets, OAM bias), per token (`tile_tokens=1`) and in rows of 4 tokens (the default), and the
  work of the kernel's 4-token tiles on each against native's: union entries, a 4-token row
  counting its list once. The kernel's time follows that work.

Prints a table last; JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stem_boost.bench.inputs import smooth_hidden_states  # noqa: E402
from stem_boost.kernels.block_union import tile_entries, union_block_lists_torch, union_inflation  # noqa: E402
from stem_boost.selection import Selection  # noqa: E402

TILES = (2, 4, 8)


def inflation(sel: Selection, qt: int) -> float:
    """`union_inflation` of a per-token block selection [B, Hk, S, Kmax] (the PyTorch union: any device)."""
    return union_inflation(union_block_lists_torch(sel.idx, sel.counts, qt)[2], sel.counts, qt)


def layer_lists(S: int, rows: int, device: torch.device, smooth: int = 0, stem: bool = False) -> dict[str, Selection]:
    """Lists of the last `rows` query rows of the benchmark's random-weight MiniCPM-4.1 layer: native,
    and with `stem` Stem's per token ("stem_tokens") and in 4-token rows ("stem_rows")."""
    from stem_boost.models.minicpm4 import MiniCPM4Config, MiniCPM4ForCausalLM
    from stem_boost.models.minicpm4.modeling_minicpm4 import apply_rotary_pos_emb
    from stem_boost.native.infllmv2 import MINICPM41_SPARSE_CONFIG, infllmv2_select

    cfg = MiniCPM4Config(vocab_size=64, hidden_size=4096, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=32, num_key_value_heads=2, head_dim=128,
                         max_position_embeddings=262144, sparse_config=dict(MINICPM41_SPARSE_CONFIG))
    model = MiniCPM4ForCausalLM(cfg).to(device).eval()
    attn = model.model.layers[0].self_attn
    x = smooth_hidden_states(S, cfg.hidden_size, smooth, device, dtype=torch.float32)
    with torch.no_grad():
        q = attn.q_proj(x).view(1, S, 32, 128).transpose(1, 2)  # [1, 32, S, 128]
        k = attn.k_proj(x).view(1, S, 2, 128).transpose(1, 2)  # [1, 2, S, 128]
        q, k = apply_rotary_pos_emb(q, k, *model.model.rotary_emb(torch.arange(S, device=device)[None]))
        r = min(rows, S)
        p = attn.infllmv2
        out = {"native": infllmv2_select(q[:, :, S - r:], k, p, q_offset=S - r, chunk_size=512).to_selection()}
        if stem:
            from stem_boost.adapters.infllmv2 import block_bias, token_plan
            from stem_boost.config import StemConfig

            v = attn.v_proj(x).view(1, S, 2, 128).transpose(1, 2)
            for name, tiles in (("stem_tokens", 1), ("stem_rows", "auto")):
                c = StemConfig(reduce=0.18, tile_tokens=tiles)
                k_free = token_plan(p, S, S, c, device).k_free[S - r:]  # the whole prefill's budgets, last rows
                out[name] = infllmv2_select(q[:, :, S - r:], k, p, q_offset=S - r, chunk_size=512,
                                            key_bias=block_bias(v, p.block_size, c), k_free=k_free,
                                            tile_rows=c.tile_tokens_for(16)).to_selection()
        return out


def token_pairs(sel: Selection, n_tokens: int) -> int:
    """(query token, block) pairs of a selection whose rows hold `query_block` tokens each."""
    rows = torch.arange(sel.n_rows, device=sel.counts.device)
    tokens = (n_tokens - rows * sel.query_block).clamp(max=sel.query_block)
    return int((sel.counts.long() * tokens).sum())


def smollm2_lists(S: int, device: torch.device) -> list[Selection]:
    """Every layer's native lists of one prefill of S held-out tokens on the SmolLM2 InfLLMv2 testbed."""
    import stem_boost
    from stem_boost.testbeds.smollm2_infllmv2 import load_smollm2_infllmv2
    from stem_boost.text.corpus import heldout_stream

    model, tok = load_smollm2_infllmv2(device=device)
    ids = tok(heldout_stream(), return_tensors="pt").input_ids[:, :S].to(device)
    if ids.shape[1] < S:
        raise SystemExit(f"the held-out text has {ids.shape[1]} tokens; --seqs {S} needs more")
    stem_boost.wrap(model, reduce=0.0, beta=0.0, keep_selections=True)
    with torch.no_grad():
        model.model(ids)
    return [s for s in stem_boost.last_selections(model) if s is not None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", choices=["layer", "smollm2"], default="layer")
    ap.add_argument("--seqs", nargs="+", type=int, default=[32768, 131072])
    ap.add_argument("--rows", type=int, default=2048, help="--source layer: query rows measured (the last ones)")
    ap.add_argument("--smooth", type=int, default=0, help="--source layer: hidden states smoothed over W positions")
    ap.add_argument("--stem", action="store_true", help="--source layer: also Stem's lists, per token and in rows")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    res = dict(source=args.source, device=str(device), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
               argv=sys.argv, rows=[])
    for S in args.seqs:
        t0 = time.time()
        stem = {}
        if args.source == "layer":
            lists = layer_lists(S, args.rows, device, args.smooth, args.stem)
            sels = [lists.pop("native")]
            n_tokens = min(args.rows, S)
            for name, sel in lists.items():  # Stem's work and pairs against native's, on the same rows
                work = [tile_entries(s.idx, s.counts, 4, query_block=s.query_block) for s in (sel, sels[0])]
                stem[f"{name}_tile_work_over_native"] = work[0] / work[1]
                stem[f"{name}_pairs_over_native"] = token_pairs(sel, n_tokens) / token_pairs(sels[0], n_tokens)
        else:
            sels = smollm2_lists(S, device)
        per_qt = {qt: [inflation(s, qt) for s in sels] for qt in TILES}
        row = dict(S=S, layers=len(sels), blocks_per_token=sum(float(s.counts.float().mean()) for s in sels) / len(sels),
                   smooth=args.smooth, seconds=time.time() - t0, **stem)
        for qt, vals in per_qt.items():
            row[f"qt{qt}"] = dict(mean=sum(vals) / len(vals), min=min(vals), max=max(vals))
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    print(f"\n{args.source} lists ({device}): union inflation, mean (min - max over layers)")
    print("| S | layers | blocks / token | " + " | ".join(f"QT {qt}" for qt in TILES) + " |")
    print("|---|---|---|" + "---|" * len(TILES))
    for r in res["rows"]:
        cells = " | ".join(f"{r[f'qt{qt}']['mean']:.2f} ({r[f'qt{qt}']['min']:.2f} - {r[f'qt{qt}']['max']:.2f})"
                           for qt in TILES)
        print(f"| {r['S']} | {r['layers']} | {r['blocks_per_token']:.1f} | {cells} |")
    if args.stem:
        print("\nStem at reduce 0.18 on the same rows, against native: the 4-token tiles' work (union entries) "
              "and the (token, block) pairs")
        print("| S | per token: tile work | pairs | 4-token rows: tile work | pairs |")
        print("|---|---|---|---|---|")
        for r in res["rows"]:
            print(f"| {r['S']} | {r['stem_tokens_tile_work_over_native']:.3f} | {r['stem_tokens_pairs_over_native']:.3f} | "
                  f"{r['stem_rows_tile_work_over_native']:.3f} | {r['stem_rows_pairs_over_native']:.3f} |")


if __name__ == "__main__":
    main()
