"""What the indexer's precision does to a real DSA model: top-k overlap with the float32 indexer and
perplexity, for each `indexer_dtype` (CPU or GPU).

    python scripts/indexer_precision.py --lengths 2048 4096 --windows 4 2

Model: the SmolLM2-135M DSA testbed (real weights, the shipped distilled lightning indexers, native
top-1024), native selection (`stem_boost.wrap(reduce=0, beta=0)`), on the held-out English text
(`stem_boost.text.corpus.heldout_stream`), consecutive windows of exactly L tokens.

For each dtype: the mean over layers and query rows of |top-k(dtype) & top-k(float32)| / |top-k(float32)|
(one window per length), and the perplexity over the windows. On a GPU "bfloat16" and "fp8" run
the Triton score kernels; on the CPU "fp8" runs the same quantised operands in fp32 (the kernel's
arithmetic up to the order of its fp32 sums) and "bfloat16" PyTorch's bf16 matmul. Prints a table
last; JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import stem_boost  # noqa: E402
from stem_boost.selection import shared_units  # noqa: E402
from stem_boost.testbeds.smollm2_dsa import load_smollm2_dsa  # noqa: E402
from stem_boost.text.corpus import heldout_stream  # noqa: E402


def overlap(a, b) -> float:
    """|a & b| / |b| over every layer and query row of two lists of per-layer Selections."""
    pairs = [shared_units(sa.idx, sb.idx) for sa, sb in zip(a, b)]
    return sum(h for h, _ in pairs) / max(sum(t for _, t in pairs), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096])
    ap.add_argument("--windows", nargs="+", type=int, default=[4, 2], help="windows per length")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "fp8"])
    ap.add_argument("--index-topk", type=int, default=1024)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if len(args.windows) != len(args.lengths):
        sys.exit(f"--windows needs one count per length ({len(args.lengths)}); got {len(args.windows)}")
    if "float32" not in args.dtypes:
        sys.exit("--dtypes must include float32 (the reference of the overlap)")
    model, tok = load_smollm2_dsa(index_topk=args.index_topk, device=args.device)
    ids = tok(heldout_stream(), return_tensors="pt").input_ids[0].to(args.device)
    res = dict(device=str(args.device), torch=torch.__version__, date=time.strftime("%Y-%m-%d"), argv=sys.argv,
               index_topk=args.index_topk, rows=[])
    for L, n_win in zip(args.lengths, args.windows):
        if ids.numel() < L * n_win:
            sys.exit(f"the held-out text has {ids.numel()} tokens; {n_win} windows of {L} need {L * n_win}")
        first = {}
        for dtype in args.dtypes:
            stem_boost.wrap(model, reduce=0.0, beta=0.0, indexer_dtype=dtype, keep_selections=True)
            nll = n_tok = 0.0
            t0 = time.time()
            for w in range(n_win):
                window = ids[w * L:(w + 1) * L][None]
                with torch.no_grad():
                    logits = model(window, use_cache=False).logits.float()
                nll += float(F.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum"))
                n_tok += L - 1
                if w == 0:
                    first[dtype] = stem_boost.last_selections(model)
            row = dict(length=L, dtype=dtype, windows=n_win, perplexity=math.exp(nll / n_tok), seconds=time.time() - t0)
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
        for row in res["rows"]:
            if row["length"] == L:
                row["overlap_vs_float32"] = overlap(first[row["dtype"]], first["float32"])
    stem_boost.unwrap(model)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    print(f"\nSmolLM2 DSA testbed, native top-{args.index_topk}, held-out text ({args.device})")
    print("| length | indexer dtype | top-k overlap with float32 | perplexity | vs float32 |")
    print("|---|---|---|---|---|")
    ref = {r["length"]: r["perplexity"] for r in res["rows"] if r["dtype"] == "float32"}
    for r in res["rows"]:
        print(f"| {r['length']} | {r['dtype']} | {r['overlap_vs_float32']:.4f} | {r['perplexity']:.3f} | "
              f"{100 * (r['perplexity'] / ref[r['length']] - 1):+.2f}% |")


if __name__ == "__main__":
    main()
