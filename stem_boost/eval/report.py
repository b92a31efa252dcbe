"""Render a results dict (`runner.run`) into a report folder:

    report.md      tables + the plots (relative links)
    report.html    the same content, self-contained (the PNGs embedded as base64)
    results.json   the results dict itself (every number of the report comes from it)
    budget_vs_position.png, accuracy_vs_budget.png, latency.png, layer_error.png, and
    layer_allocation.png when the run has calibrated (*_cal) modes

Both documents are rendered from one list of blocks, so they always show the same numbers.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path

__all__ = ["FORMATS", "fmt", "write_report", "summary_columns"]

# column key -> (header, format kind)
SUMMARY_COLUMNS = [
    ("rel_budget", "attended pairs / native", "ratio"),
    ("reduce_achieved", "reduction vs native", "pct"),
    ("ruler_accuracy", "RULER accuracy (%)", "score"),
    ("ppl", "perplexity", "ppl"),
    ("kl_vs_native", "KL vs native (nats)", "sci"),
    ("kl_vs_dense", "KL vs dense (nats)", "sci"),
    ("attn_err_native_mean", "attn. output error vs native (mean over layers)", "err"),
    ("attn_err_mean", "attn. output error vs dense (mean over layers)", "err"),
    ("latency_ms", "prefill ms", "ms"),
    ("longbench_avg", "LongBench avg", "score"),
]
FORMATS = {"ratio": "{:.3f}", "pct": "{:.2%}", "score": "{:.2f}", "ppl": "{:.3f}", "sci": "{:.3e}",
           "err": "{:.4f}", "ms": "{:.1f}", "int": "{:d}"}
MODE_COLORS = {"dense": "#444444", "native": "#1f77b4", "stem": "#d62728", "uniform": "#2ca02c", "no_oam": "#ff7f0e",
               "mass": "#9467bd", "stem_cal": "#e377c2", "mass_cal": "#17becf"}


def fmt(value, kind: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return FORMATS[kind].format(value)


def summary_columns(res: dict) -> list[tuple[str, str, str]]:
    """The summary table's columns that have at least one value."""
    rows = res["summary"].values()
    cols = [c for c in SUMMARY_COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    out = []
    for key, header, kind in cols:
        if key == "latency_ms":
            lengths = {r.get("latency_length") for r in rows if r.get("latency_length")}
            header = f"prefill ms @ {max(lengths)} tokens" if lengths else header
        out.append((key, header, kind))
    return out


# ------------------------------------------------------------------ plots
def _color(mode: dict) -> str:
    return MODE_COLORS.get(mode["kind"], "#9467bd")


def _style(mode: dict) -> str:
    return "--" if mode["kind"] == "no_oam" else "-"


def _plot_budget(res: dict, path: Path, plt) -> bool:
    budget = res["budget"]
    modes = [m for m in res["modes"] if budget.get(m["name"], {}).get("stem")]
    if not modes:
        return False
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    top = 0
    native_drawn = False
    for m in modes:
        b = budget[m["name"]]
        label = {"native": "native sparse", "uniform": f"{m['name']} (equal rows, +-1 rounding dither)"}.get(
            m["kind"], m["name"])
        ax.plot(b["positions"][:len(b["stem"])], b["stem"], _style(m), color=_color(m), lw=2 if m["kind"] != "no_oam" else 1.6,
                label=label, alpha=0.9)
        native_drawn |= m["kind"] == "native"
        top = max(top, max(b["stem"]))
    if not native_drawn:
        b = next((budget[m["name"]] for m in modes if budget[m["name"]].get("native")), None)
        if b:
            ax.plot(b["positions"][:len(b["native"])], b["native"], color=MODE_COLORS["native"], lw=2, label="native sparse")
            top = max(top, max(b["native"]))
    pos = budget[modes[0]["name"]]["positions"]
    if pos:
        ax.plot(pos, [p + 1 for p in pos], ":", color=MODE_COLORS["dense"], lw=1.2, label="dense (all causal keys)")
    ax.set_ylim(0, top * 1.25 + 1)
    ax.set_xlim(0, pos[-1] if pos else 1)
    ax.set_xlabel("query position (token)")
    ax.set_ylabel("keys attended (mean over layers)")
    seq = budget[modes[0]["name"]].get("seq_len")
    ax.set_title(f"Budget per query position, sequence of {seq} tokens")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


MODE_MARKERS = {"dense": "o", "native": "s", "stem": "*", "uniform": "D", "no_oam": "^", "mass": "P"}


def _plot_accuracy(res: dict, path: Path, plt) -> bool:
    rows = [(m, res["summary"][m["name"]]) for m in res["modes"] if m["name"] in res["summary"]]
    rows = [(m, r) for m, r in rows if r.get("rel_budget") is not None]
    panels = [("ruler_accuracy", "RULER accuracy (%)"), ("ppl", "perplexity (lower is better)"),
              ("longbench_avg", "LongBench average")]
    panels = [p for p in panels if any(r.get(p[0]) is not None for _, r in rows)]
    if not rows or not panels:
        return False
    from matplotlib.ticker import FixedLocator, NullLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 4.6), dpi=110, squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        pts = [(r["rel_budget"], r[key], m) for m, r in rows if r.get(key) is not None]
        ys = [p[1] for p in pts]
        if key in ("ruler_accuracy", "longbench_avg"):
            lo, hi = 0.0, 100.0
        else:
            span = (max(ys) - min(ys)) or max(abs(max(ys)), 1.0) * 0.05
            lo, hi = min(ys) - 0.2 * span, max(ys) + 0.2 * span
        # points at the same (budget, value) are spread sideways a little, so that none hides another
        placed: list[tuple[float, float]] = []
        for x, y, m in pts:
            clash = sum(1 for px, py in placed if abs(px / x - 1) < 0.02 and abs(py - y) < 0.03 * (hi - lo))
            placed.append((x, y))
            xd = x * (1.045 ** clash)
            ax.scatter([xd], [y], s=150 if m["kind"] == "stem" else 70, marker=MODE_MARKERS.get(m["kind"], "o"),
                       color=_color(m), edgecolor="black", linewidth=0.6, zorder=3, label=m["name"])
        ax.set_xscale("log")
        xs = sorted({round(p[0], 3) for p in pts})
        ax.xaxis.set_major_locator(FixedLocator(xs))
        ax.xaxis.set_minor_locator(NullLocator())
        # ticks closer than a factor 1.25 on the log axis: every other label one line lower
        labels, low = [], False
        for i, x in enumerate(xs):
            low = (not low) if i and x / xs[i - 1] < 1.25 else False
            labels.append(("\n" if low else "") + f"{x:.3g}")
        ax.set_xticklabels(labels)
        ax.set_xlim(min(xs) / 1.3, max(xs) * 1.5)
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
        ax.set_xlabel("attended (query, key) pairs relative to native (log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.set_title(label.split(" (")[0] + " vs budget")
        ax.legend(fontsize=8, loc="best", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _plot_latency(res: dict, path: Path, plt) -> bool:
    modes = [m for m in res["modes"] if res["latency"].get(m["name"])]
    if not modes:
        return False
    lengths = sorted({int(L) for m in modes for L in res["latency"][m["name"]]})
    fig, ax = plt.subplots(figsize=(max(6.5, 1.2 * len(lengths) * len(modes) / 2 + 3), 4.5), dpi=110)
    width = 0.8 / len(modes)
    for j, m in enumerate(modes):
        lat = res["latency"][m["name"]]
        xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(lengths))]
        ys = [lat.get(str(L), {}).get("ms", 0.0) for L in lengths]
        bars = ax.bar(xs, ys, width=width * 0.95, color=_color(m), label=m["name"],
                      hatch="//" if m["kind"] == "no_oam" else None, edgecolor="white")
        for bar, y in zip(bars, ys):
            ax.annotate(f"{y:.0f}" if y >= 10 else f"{y:.1f}", (bar.get_x() + bar.get_width() / 2, y),
                        textcoords="offset points", xytext=(0, 2), ha="center", fontsize=7)
    ax.set_xticks(range(len(lengths)))
    ax.set_xticklabels([f"{L} tokens" for L in lengths])
    ax.set_ylabel("prefill time (ms, median)")
    ax.set_title(f"Prefill latency per mode — {res['meta']['device']}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=9, ncol=min(5, len(modes)))
    ax.set_ylim(0, ax.get_ylim()[1] * 1.12)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _plot_error(res: dict, path: Path, plt) -> bool:
    f = res["fidelity"]
    panels = [
        ("layer_error_vs_native", "native", "layer", "Error per layer vs native sparse"),
        ("layer_error", "dense", "layer", "Error per layer vs dense"),
        ("error_by_position_vs_native", "native", "position", "Error vs query position (vs native)"),
    ]
    panels = [p for p in panels if any(n != p[1] for n in f.get(p[0], {}))]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.3 * len(panels), 4.6), dpi=110, squeeze=False)
    for ax, (key, ref, xkind, title) in zip(axes[0], panels):
        for m in res["modes"]:
            data = f[key].get(m["name"])
            if not data or m["kind"] == ref:
                continue
            if xkind == "layer":
                xs, ys = range(len(data)), data
            else:
                xs, ys = data["position"], data["rel_err"]
            ax.plot(xs, ys, _style(m), marker="o" if xkind == "layer" else ".", color=_color(m), label=m["name"],
                    lw=1.8)
        if xkind == "layer":
            n = max(len(v) for v in f[key].values())
            ax.set_xticks(range(n) if n <= 32 else range(0, n, max(1, n // 16)))
            ax.set_xlabel("layer")
        else:
            ax.set_xlabel("query position (token, bin centre)")
        ax.set_ylabel(f"||O - O_{ref}|| / ||O_{ref}||")
        ax.set_title(f"{title} (S={f['length']})", fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def draw_allocation(ax, bars: list[tuple[str, str, list[float]]], reduce: float) -> None:
    """Grouped bars of per-layer cuts (%), one (label, colour, layer_reduce) per calibrated mode, and a
    dashed line at `reduce` (every layer cut alike)."""
    w = 0.8 / len(bars)
    for i, (label, color, lr) in enumerate(bars):
        ax.bar([x + (i - (len(bars) - 1) / 2) * w for x in range(len(lr))], [100 * x for x in lr], w, color=color,
               label=label)
    ax.axhline(100 * reduce, color="black", ls="--", lw=1, label=f"every layer alike: {100 * reduce:g}%")
    ax.set_xlabel("sparse layer")
    ax.set_ylabel("pairs cut from the native selection (%)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def _plot_allocation(res: dict, path: Path, plt) -> bool:
    """The calibrated per-layer cut of each "*_cal" mode against the uniform reduce."""
    cals = res.get("calibration") or {}
    if not cals:
        return False
    kinds = {m["name"]: m for m in res["modes"]}
    fig, ax = plt.subplots(figsize=(11, 3.8), dpi=110)
    draw_allocation(ax, [(f"{name} ({c['objective']} objective)", _color(kinds.get(name, {"kind": name})),
                          c["layer_reduce"]) for name, c in cals.items()], next(iter(cals.values()))["reduce"])
    ax.set_title("Calibrated per-layer allocation (mean = reduce)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


PLOTS = [
    ("budget_vs_position.png", _plot_budget, "Keys attended per query position: native sparse selection vs Stem (TPD) and the ablations"),
    ("accuracy_vs_budget.png", _plot_accuracy, "Accuracy and perplexity vs attended pairs, per mode"),
    ("latency.png", _plot_latency, "Prefill latency per mode"),
    ("layer_error.png", _plot_error, "Attention-output error per layer (vs native sparse, vs dense) and per query "
                                     "position (vs native): errors compound through depth"),
    ("layer_allocation.png", _plot_allocation, "Calibrated per-layer budgets of the *_cal modes "
                                               "(stem_boost.calibrate on text the evaluation does not use)"),
]


# ------------------------------------------------------------------ document
def _spread(values: list, kind: str) -> str:
    """"mean / min / max" of the numbers in ``values`` (None left out), "–" when there are none."""
    xs = [v for v in values if v is not None]
    if not xs:
        return "–"
    return " / ".join(fmt(v, kind) for v in (sum(xs) / len(xs), min(xs), max(xs)))


def budget_row(name: str, layers: list[dict]) -> list[str]:
    """The report's budget row of one mode from its per-layer stats: pairs summed over the layers,
    the model-wide reduction, and the per-layer reduction and alpha as mean / min / max."""
    native = sum(s["native_pairs"] for s in layers)
    kept = sum(s["stem_pairs"] for s in layers)
    return [name, str(native), str(kept), fmt(1 - kept / native if native else None, "pct"),
            _spread([s["reduce_achieved"] for s in layers], "pct"), _spread([s["alpha"] for s in layers], "ratio")]


def perplexity_by_length_blocks(by_length: dict) -> list[tuple]:
    """Heading, note and table of the per-length perplexity: one row per length, per mode the
    perplexity and its change against native (when native ran)."""
    names = list(by_length)
    lengths = sorted({int(L) for per in by_length.values() for L in per})
    rows = []
    for L in lengths:
        native = by_length.get("native", {}).get(str(L))
        row = [str(L)]
        for n in names:
            p = by_length[n].get(str(L))
            cell = fmt(p["ppl"], "ppl") if p else "-"
            if p and native and n != "native":
                cell += f" ({100 * (p['ppl'] / native['ppl'] - 1):+.2f}%)"
            row.append(cell)
        rows.append(row)
    note = ("The perplexity text cut into consecutive windows of exactly L tokens, every position scored "
            "(windows: " + ", ".join(f"{L}: {by_length[names[0]][str(L)]['n_windows']}" for L in lengths
                                     if str(L) in by_length[names[0]]) + "); in brackets: the change against native.")
    return [("h2", "Perplexity by length"), ("p", note), ("table", ["length"] + names, rows, "perplexity_by_length")]


def kl_by_length_blocks(by_length: dict) -> list[tuple]:
    """Heading, note and table of the next-token KL per length: one row per length, per mode the KL
    against dense and against native."""
    names = [n for n in by_length if n != "dense"]
    lengths = sorted({int(L) for per in by_length.values() for L in per})
    rows = []
    for L in lengths:
        row = [str(L)]
        for n in names:
            r = by_length[n].get(str(L), {})
            row.append(f"{fmt(r.get('kl_vs_dense'), 'sci')} / {fmt(r.get('kl_vs_native'), 'sci')}")
        rows.append(row)
    note = ("Mean next-token KL(reference || mode) over the captured positions of the fidelity text cut to "
            "L tokens, against dense / against native (nats).")
    return [("h2", "Next-token KL by length"), ("p", note), ("table", ["length"] + names, rows, "kl_by_length")]


def _blocks(res: dict, plots: list[tuple[str, str]]) -> list[tuple]:
    meta, cfg = res["meta"], res["config"]
    b: list[tuple] = [("h1", f"stem_boost comparison report — {meta['config_name']}")]
    if meta["random_weights"]:
        b.append(("warn", "This is a random-weight smoke testbed. The model cannot read, so the task accuracy "
                          "(RULER) is about 0 in every mode and says nothing about Stem. The budgets, the reduction "
                          "achieved, the attention-output error per layer and the next-token KL are real measurements "
                          "of Stem on the model's native sparse selection. For accuracy, run a config with real "
                          "weights (configs/deepseek_v32.yaml, configs/minicpm4.yaml, configs/smollm2.yaml)."))
    b.append(("p", f"Model: {meta['model']}."))
    b.append(("ul", [
        f"config: `{meta['config_source']}`" + (f" with `--set {' '.join(meta['overrides'])}`" if meta["overrides"] else ""),
        f"device: {meta['device']}"
        + (f" x {meta['world_size']} processes (units per rank: {meta.get('units_per_rank')})"
           if meta.get("world_size", 1) > 1 else "") + f", dtype {meta['dtype']}; torch {meta['torch']}, transformers {meta['transformers']}, "
        f"stem_boost {meta['stem_boost']}",
        f"date: {meta['date']}; run time {meta.get('elapsed_s', '?')} s",
        f"tokenizer: {meta['tokenizer']}; haystack / perplexity text: {'; '.join(meta['haystack_sources'])}",
    ]))
    b.append(("h2", "Modes"))
    b.append(("ul", [f"**{m['name']}** — {m['description']}"
                     + ("" if m["name"] in res["summary"] else " (not run: see Notes)") for m in res["modes"]]))
    for name, c in (res.get("calibration") or {}).items():
        where = (f" on {c['windows']} window(s) of `{c['text']}` at {', '.join(map(str, c['lengths']))} tokens"
                 if all(key in c for key in ("windows", "text", "lengths")) else "")
        source = f", read from `{c['file']}`" if "file" in c else ""
        b.append(("p", f"{name}: per-layer cuts calibrated by `stem_boost.calibrate` ({c['objective']} objective)"
                       f"{where}{source}; mean {c['reduce']:g} over {len(c['layer_reduce'])} layers, from "
                       f"{min(c['layer_reduce']):g} to {max(c['layer_reduce']):g}."))

    b.append(("h2", "Summary"))
    cols = summary_columns(res)
    flen = res["fidelity"].get("length")
    measured = (f"Budget, KL and attention error are measured on one prefill of {flen} tokens of English text; "
                if flen else "The fidelity run (budget, KL, attention error) is disabled in this configuration; ")
    b.append(("p", measured + "the reduction counts the attended (query, key) pairs against the native selection's (the "
                   "`reduce` contract: causally valid keys, forced keys excluded). "
                   "RULER accuracy is the mean of the task scores below (RULER's string_match_all, in %)."))
    rows = [[name] + [fmt(r.get(k), kind) for k, _, kind in cols] for name, r in res["summary"].items()]
    b.append(("table", ["mode"] + [h for _, h, _ in cols], rows, "summary"))

    if res["tasks"]:
        b.append(("h2", "RULER-style tasks"))
        names = [m["name"] for m in res["modes"] if m["name"] in res["tasks"]]
        keys = []
        for per_task in res["tasks"].values():
            for task, per_len in per_task.items():
                for L in per_len:
                    if (task, L) not in keys:
                        keys.append((task, L))
        rows = [[f"{t} @ {L}"] + [fmt(res["tasks"][n].get(t, {}).get(L), "score") for n in names] for t, L in keys]
        b.append(("p", f"{cfg['tasks']['samples']} samples per task and length (seed {cfg['tasks']['seed']}); "
                       "lengths in tokens of the tokenizer, generation included; greedy decoding."))
        b.append(("table", ["task @ length"] + names, rows, "tasks"))

    if res["longbench"]:
        b.append(("h2", "LongBench"))
        names = list(res["longbench"])
        datasets = sorted({d for v in res["longbench"].values() for d in v})
        rows = [[d] + [fmt(res["longbench"][n].get(d), "score") for n in names] for d in datasets]
        b.append(("table", ["dataset"] + names, rows, "longbench"))

    if res["perplexity"]:
        b.append(("h2", "Perplexity"))
        pc = cfg["perplexity"]
        b.append(("p", f"Text `{pc['text']}` from character {pc['offset_chars']}; window "
                       f"{pc['window'] or pc['length']}" + (f", stride {pc['stride']}" if pc["stride"] else "") + "."))
        rows = [[n, fmt(p["mean_nll"], "err"), fmt(p["ppl"], "ppl"), str(p["n_tokens"]), str(p["n_windows"])]
                for n, p in res["perplexity"].items()]
        b.append(("table", ["mode", "NLL / token (nats)", "perplexity", "tokens scored", "windows"], rows, "perplexity"))

    if res.get("perplexity_by_length"):
        b += perplexity_by_length_blocks(res["perplexity_by_length"])
    if res.get("fidelity_by_length"):
        b += kl_by_length_blocks(res["fidelity_by_length"])

    budget_rows = [budget_row(n, v["layers"]) for n, v in res["budget"].items() if v.get("layers") and n != "native"]
    if budget_rows:
        b.append(("h2", "Budget per mode"))
        b.append(("p", f"Last prefill of {flen} tokens; one row per mode, over its layers: the pairs summed, the "
                       "per-layer reduction and alpha (the TPD end ratio solved for the requested reduction; for "
                       "`uniform`: the kept fraction of every row) as mean, min and max. Each layer's numbers are in "
                       "`results.json` (`budget.<mode>.layers`) and the plots."))
        b.append(("table", ["mode", "native pairs", "attended pairs", "reduction", "reduction per layer (mean / min / max)",
                            "alpha (mean / min / max)"], budget_rows, "budget"))

    lat_modes = [n for n, v in res["latency"].items() if v]
    if lat_modes:
        b.append(("h2", "Prefill latency and reduction by length"))
        lengths = sorted({int(L) for n in lat_modes for L in res["latency"][n]})
        rows = []
        for n in lat_modes:
            cells = [n]
            for L in lengths:
                e = res["latency"][n].get(str(L))
                red = (1 - e["pairs"] / e["native_pairs"]) if e and e.get("native_pairs") else None
                cells.append(fmt(e["ms"], "ms") + (f" ({fmt(red, 'pct')})" if red is not None else "") if e else "–")
            rows.append(cells)
        b.append(("p", "Median prefill time in ms (in parentheses: the reduction of attended pairs vs native at that "
                       "length; short sequences sit mostly inside the stem, where TPD cannot cut)."
                       + (" On the CPU the sparse modes run the PyTorch reference (gather + softmax), not the Triton "
                          "kernel, and dense runs PyTorch SDPA: these times show overheads, not the GPU speed-up."
                          if "cpu" in meta["device"] else "")))
        b.append(("table", ["mode"] + [f"{L} tokens" for L in lengths], rows, "latency"))

    for key, ref in (("layer_error_vs_native", "native"), ("layer_error", "dense")):
        errs = res["fidelity"][key]
        names = [n for n in errs if n != ref]
        if not names:
            continue
        b.append(("h2", f"Attention-output error per layer (vs {ref})"))
        n_layers = max(len(errs[n]) for n in names)
        rows = [[str(i)] + [fmt(errs[n][i] if i < len(errs[n]) else None, "err") for n in names] for i in range(n_layers)]
        b.append(("table", ["layer"] + names, rows, key))

    if plots:
        b.append(("h2", "Plots"))
        for fname, caption in plots:
            b.append(("img", fname, caption))

    b.append(("h2", "Notes"))
    notes = list(res["notes"])
    if meta["random_weights"]:
        notes.append("With random weights the attention is close to uniform over many keys: dropping keys changes the "
                     "output a lot, and a sparse output can differ from the dense one by more than the dense output's "
                     "norm (errors above 1). Compare the modes with each other.")
    notes.append("Dense for DSA models = the native model with index_topk raised to the sequence length (its "
                 "indexer keeps every causal key); the per-layer error compares attention outputs of full "
                 "forwards, so it includes the effect of earlier layers' errors.")
    notes.append("Task scoring follows RULER (NVIDIA, scripts/eval/synthetic/constants.py); the generators follow "
                 "RULER's synthetic.yaml with the differences listed in stem_boost/eval/tasks.py.")
    b.append(("ul", notes))
    b.append(("p", "Reproduce: `stem-boost compare --config " + meta.get("config_arg", meta["config_source"])
              + "".join(f" --set {o}" for o in meta["overrides"]) + "`"))
    return b


_INLINE_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*([^*]+)\*\*")


def _inline_html(text: str) -> str:
    text = html.escape(text)
    text = _INLINE_CODE.sub(r"<code>\1</code>", text)
    return _BOLD.sub(r"<strong>\1</strong>", text)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(blocks) -> str:
    out = []
    for blk in blocks:
        kind = blk[0]
        if kind == "h1":
            out.append(f"# {blk[1]}\n")
        elif kind == "h2":
            out.append(f"## {blk[1]}\n")
        elif kind == "p":
            out.append(blk[1] + "\n")
        elif kind == "warn":
            out.append(f"> **Warning.** {blk[1]}\n")
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in blk[1]) + "\n")
        elif kind == "table":
            header, rows = blk[1], blk[2]
            lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |",
                     "|" + "|".join("---" for _ in header) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines) + "\n")
        elif kind == "img":
            out.append(f"![{blk[2]}]({blk[1]})\n\n*{blk[2]}*\n")
    return "\n".join(out)


_CSS = """body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}table{border-collapse:collapse;margin:1em 0;font-size:0.92em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}td:first-child,th:first-child
{text-align:left}.warn{background:#fff4e5;border-left:5px solid #f0a020;padding:0.8em 1em;margin:1em 0}
img{max-width:100%;border:1px solid #eee}figure{margin:1.5em 0}figcaption{color:#555;font-style:italic}
code{background:#f4f4f4;padding:1px 4px;border-radius:3px}"""


def render_html(blocks, folder: Path) -> str:
    title = next((blk[1] for blk in blocks if blk[0] == "h1"), "stem_boost report")
    out = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
           f"<style>{_CSS}</style></head><body>"]
    for blk in blocks:
        kind = blk[0]
        if kind == "h1":
            out.append(f"<h1>{html.escape(blk[1])}</h1>")
        elif kind == "h2":
            out.append(f"<h2>{html.escape(blk[1])}</h2>")
        elif kind == "p":
            out.append(f"<p>{_inline_html(blk[1])}</p>")
        elif kind == "warn":
            out.append(f"<div class='warn'><strong>Warning.</strong> {_inline_html(blk[1])}</div>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in blk[1]) + "</ul>")
        elif kind == "table":
            header, rows, table_id = blk[1], blk[2], blk[3]
            out.append(f"<table id='{table_id}'><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header)
                       + "</tr></thead><tbody>")
            out += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows]
            out.append("</tbody></table>")
        elif kind == "img":
            data = base64.b64encode((folder / blk[1]).read_bytes()).decode("ascii")
            out.append(f"<figure><img alt='{html.escape(blk[2])}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{html.escape(blk[2])}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)


def _clean(obj):
    """JSON-safe copy: non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_report(res: dict, folder) -> dict[str, Path]:
    """Write results.json, the PNG plots, report.md and report.html into ``folder`` (and each
    calibrated mode's allocation as calibration/<mode>.json, a file `calibration.allocations` reads);
    returns the paths by name."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    res = _clean(res)
    paths = {"results.json": folder / "results.json"}
    paths["results.json"].write_text(json.dumps(res, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    for name, cal in res.get("calibration", {}).items():  # reusable: calibration.allocations={mode: this file}
        key = f"calibration/{name.replace('@', '_r')}.json"
        paths[key] = folder / key
        paths[key].parent.mkdir(exist_ok=True)
        paths[key].write_text(json.dumps(cal, indent=1) + "\n", encoding="utf-8")
    plots = []
    for fname, fn, caption in PLOTS:
        if fn(res, folder / fname, plt):
            plots.append((fname, caption))
            paths[fname] = folder / fname
    blocks = _blocks(res, plots)
    paths["report.md"] = folder / "report.md"
    paths["report.md"].write_text(render_markdown(blocks), encoding="utf-8")
    paths["report.html"] = folder / "report.html"
    paths["report.html"].write_text(render_html(blocks, folder), encoding="utf-8")
    return paths
