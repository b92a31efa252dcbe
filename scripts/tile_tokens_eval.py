"""Stem's grouped ranking on the SmolLM2 InfLLMv2 testbed (real weights, CPU or GPU): perplexity
against native, and the work of the attention kernel's 4-token tiles, for each `tile_tokens` and
schedule at one reduce.

    python scripts/tile_tokens_eval.py --length 2048 --windows 4 --modes native tpd:1 tpd:4 mass:1 mass:4

A mode is `native` or `SCHEDULE:TILE_TOKENS` (schedule tpd / uniform / mass, or tpd_cal / mass_cal:
the same with the shipped per-layer allocation of the testbed at top-12, reduce 0.18). Perplexity: `--windows`
consecutive windows of `--length` held-out tokens (`stem_boost.text.corpus.heldout_stream`), every
token after the first scored. Tile work: over every layer of the last window, the entries the
kernel's tiles of 4 tokens walk (the union of the 4 tokens' lists; a row that holds 4 tokens counts
its list once), against native's. Prints a table last; JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import stem_boost  # noqa: E402
from stem_boost.eval.perplexity import token_nll  # noqa: E402
from stem_boost.kernels.block_union import tile_entries  # noqa: E402


SCHEDULES = ("tpd", "uniform", "mass", "tpd_cal", "mass_cal")
# the calibrated schedules: the allocations the testbed's config ships for its stem_cal / mass_cal modes
CAL_MODES = {"tpd_cal": "stem_cal", "mass_cal": "mass_cal"}


def wrap_kwargs(mode: str, reduce: float) -> dict:
    """`stem_boost.wrap` keywords of a mode name (see the module docstring)."""
    if mode == "native":
        return dict(reduce=0.0, beta=0.0)
    schedule, _, tiles = mode.partition(":")
    if schedule not in SCHEDULES or not tiles.isdigit() or int(tiles) < 1:
        raise SystemExit(f"mode {mode!r}: allowed 'native' or SCHEDULE:TILE_TOKENS with SCHEDULE "
                         f"{' / '.join(SCHEDULES)} and TILE_TOKENS an int >= 1")
    kw = dict(reduce=reduce, schedule=schedule.removesuffix("_cal"), tile_tokens=int(tiles))
    if schedule in CAL_MODES:
        from stem_boost.eval.allocations import load_allocation
        from stem_boost.eval.config import load_config

        shipped = load_config("smollm2_infllmv2")["calibration"]["allocations"]
        try:
            cal, _ = load_allocation(shipped[CAL_MODES[schedule]], mode, reduce)
        except ValueError as err:
            raise SystemExit(f"mode {mode!r}: {err}") from None
        kw["layer_reduce"] = tuple(cal.layer_reduce)
    return kw


def modes_kwargs(modes: list[str], reduce: float, beta: float | None = None) -> dict[str, dict]:
    """`wrap_kwargs` of each mode, with the OAM weight `beta` on every Stem mode when given (native stays
    reduce 0, beta 0)."""
    if beta is not None and not beta >= 0:
        raise SystemExit(f"--beta {beta}: allowed a number >= 0")
    kwargs = {m: wrap_kwargs(m, reduce) for m in modes}
    return kwargs if beta is None else {m: kw if m == "native" else dict(kw, beta=beta) for m, kw in kwargs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--modes", nargs="+", default=["native", "tpd:1", "tpd:4"])
    ap.add_argument("--reduce", type=float, default=0.18)
    ap.add_argument("--beta", type=float, default=None,
                    help="OAM weight of every Stem mode (default: the library's, 0.2); 0 ranks by the native score alone")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kwargs = modes_kwargs(args.modes, args.reduce, args.beta)  # every mode checked before the model loads
    from stem_boost.testbeds.smollm2_infllmv2 import load_smollm2_infllmv2
    from stem_boost.text.corpus import heldout_stream

    model, tok = load_smollm2_infllmv2(device=args.device)
    ids = tok(heldout_stream(), return_tensors="pt").input_ids[0]
    if ids.numel() < args.length * args.windows:
        raise SystemExit(f"the held-out text has {ids.numel()} tokens; {args.windows} x {args.length} need more")
    windows = [ids[i * args.length:(i + 1) * args.length] for i in range(args.windows)]
    res = dict(length=args.length, windows=args.windows, reduce=args.reduce, beta=args.beta, device=args.device,
               torch=torch.__version__, date=time.strftime("%Y-%m-%d"), argv=sys.argv, modes={})
    for mode, kw in kwargs.items():
        t0 = time.time()
        stem_boost.wrap(model, keep_selections=True, **kw)
        with torch.no_grad():
            nll = torch.cat([token_nll(model, w) for w in windows])
        sels = [s for s in stem_boost.last_selections(model) if s is not None]
        st = stem_boost.stats(model)
        res["modes"][mode] = dict(ppl=math.exp(float(nll.mean())), tile_work=sum(tile_entries(s.idx, s.counts, 4, query_block=s.query_block)
                                                                      for s in sels),
                                  reduce_achieved=st["reduce_achieved"], seconds=time.time() - t0)
        print(json.dumps({mode: res["modes"][mode]}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    base = res["modes"].get("native")
    print(f"\nSmolLM2 InfLLMv2 testbed, {args.windows} x {args.length} held-out tokens, reduce {args.reduce}"
          f"{'' if args.beta is None else f', beta {args.beta:g}'} ({args.device})")
    print("| mode | perplexity | vs native | 4-token tile work / native | achieved reduce |")
    print("|---|---|---|---|---|")
    for mode, r in res["modes"].items():
        rel = f"{100 * (r['ppl'] / base['ppl'] - 1):+.2f}%" if base else "-"
        work = f"{r['tile_work'] / base['tile_work']:.3f}" if base else "-"
        print(f"| {mode} | {r['ppl']:.4f} | {rel} | {work} | {r['reduce_achieved']:.4f} |")


if __name__ == "__main__":
    main()
