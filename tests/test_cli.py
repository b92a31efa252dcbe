"""`stem-boost compare` end to end on a tiny model, and the command line's errors."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stem_boost.bench import kernel as bench_kernel
from stem_boost.cli import main
from stem_boost.kernels import sparse_attention_reference
from stem_boost.eval.report import fmt, summary_columns

REPO = Path(__file__).resolve().parents[1]

# A 2-layer testbed, short inputs: the whole report in well under a minute on 2 CPU cores.
FAST = [
    "model.options={family: deepseek_v32, seed: 0, num_hidden_layers: 2, index_topk: 16}",
    "tasks.names=[niah_single_1, niah_multikey_2]",
    "tasks.lengths=[384]",
    "tasks.samples=1",
    "tasks.max_new_tokens=8",
    "perplexity.length=384",
    "fidelity.length=384",
    "latency.lengths=[128, 384]",
    "latency.repeats=1",
    "latency.warmup=0",
    "runtime.threads=1",
    "runtime.progress=false",
]


def _table(md: str, heading: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the first markdown table after ``## heading``."""
    part = md.split(f"## {heading}\n", 1)[1]
    lines = [ln for ln in part.splitlines() if ln.startswith("|")]
    end = next((i for i, ln in enumerate(part.splitlines()) if ln.startswith("## ")), None)
    if end is not None:
        lines = [ln for ln in part.splitlines()[:end] if ln.startswith("|")]
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]] for ln in lines]
    return cells[0], cells[2:]


def _number(cell: str) -> float | None:
    if cell == "–":
        return None
    return float(cell[:-1]) / 100 if cell.endswith("%") else float(cell)


def _half_unit(cell: str) -> float:
    """Half a unit in the last printed digit of `cell`: the most rounding can move a number."""
    mantissa = cell.rstrip("%").split("e")[0]
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    unit = 10.0 ** -decimals * (10.0 ** int(cell.split("e")[1]) if "e" in cell else 1.0)
    return 0.5 * unit / (100 if cell.endswith("%") else 1) * (1 + 1e-9)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    t0 = time.perf_counter()
    args = ["compare", "--config", "tiny_dsa", "--out", str(out)]
    for s in FAST:
        args += ["--set", s]
    assert main(args) == 0
    return out, time.perf_counter() - t0


def test_report_end_to_end(report, capsys):
    out, seconds = report
    assert seconds < 60
    files = ["report.md", "report.html", "results.json", "budget_vs_position.png", "accuracy_vs_budget.png",
             "latency.png", "layer_error.png"]
    for name in files:
        assert (out / name).stat().st_size > 0, name
    for name in files[3:]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in res["modes"]] == ["dense", "native", "stem", "uniform", "no_oam"]
    assert set(res["summary"]) == {m["name"] for m in res["modes"]}
    assert res["meta"]["random_weights"] is True


def test_report_numbers_match_results_json(report):
    out, _ = report
    res = json.loads((out / "results.json").read_text())
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "random-weight smoke testbed" in md and "random-weight smoke testbed" in html

    # summary: every cell is the JSON value, formatted (and parses back to it)
    cols = summary_columns(res)
    header, rows = _table(md, "Summary")
    assert header == ["mode"] + [h for _, h, _ in cols]
    assert [r[0] for r in rows] == list(res["summary"])
    for row in rows:
        values = res["summary"][row[0]]
        for cell, (key, _, kind) in zip(row[1:], cols):
            assert cell == fmt(values[key], kind), (row[0], key)
            number = _number(cell)
            if number is None:
                assert values[key] is None
            else:
                assert abs(number - values[key]) <= _half_unit(cell), (row[0], key, cell, values[key])
        assert f"<td>{row[0]}</td>" in html and all(f"<td>{c}</td>" in html for c in row)

    # the Stem modes meet the budget contract; dense attends to more pairs than native
    s = res["summary"]
    assert s["native"]["rel_budget"] == pytest.approx(1.0)
    assert s["dense"]["rel_budget"] > 1.0
    for name in ("stem", "uniform", "no_oam"):
        assert s[name]["reduce_achieved"] == pytest.approx(0.15, abs=0.01)
        assert 0 < s[name]["kl_vs_native"] and 0 < s[name]["attn_err_mean"]
    assert s["native"]["kl_vs_native"] == pytest.approx(0.0, abs=1e-9)

    # tasks and per-layer error tables come from the JSON too
    header, rows = _table(md, "RULER-style tasks")
    names = header[1:]
    for row in rows:
        task, length = row[0].split(" @ ")
        for name, cell in zip(names, row[1:]):
            assert _number(cell) == pytest.approx(res["tasks"][name][task][length], abs=5e-3)
    header, rows = _table(md, "Attention-output error per layer (vs dense)")
    for row in rows:
        for name, cell in zip(header[1:], row[1:]):
            assert _number(cell) == pytest.approx(res["fidelity"]["layer_error"][name][int(row[0])], abs=5e-5)

    # every plot linked from the markdown exists and is embedded in the HTML
    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)
    assert len(images) == 4 and all((out / i).is_file() for i in images)
    assert html.count("data:image/png;base64,") == len(images)
    assert "src='budget_vs_position.png'" not in html  # self-contained


def test_cli_prints_where_the_report_is(tmp_path, capsys):
    args = ["compare", "--config", "tiny_dsa", "--out", str(tmp_path / "r"), "--set", "modes=[native, stem]",
            "--set", "tasks.enabled=false", "--set", "latency.enabled=false"]
    for s in FAST:
        args += ["--set", s]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"report: {(tmp_path / 'r' / 'report.html').resolve()}" in printed
    assert (tmp_path / "r" / "report.md").stat().st_size > 0


def test_cli_config_errors_name_the_key(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text("name: bad\nstem:\n  reduse: 0.2\n")
    assert main(["compare", "--config", str(f)]) == 2
    err = capsys.readouterr().err
    assert "stem.reduse" in err and str(f) in err
    assert main(["compare", "--set", "fidelity.lenght=3"]) == 2
    assert "fidelity.lenght" in capsys.readouterr().err


def test_local_config_without_a_path_says_so(tmp_path, capsys):
    assert main(["compare", "--config", "deepseek_v32", "--out", str(tmp_path / "x")]) == 1
    assert "model.path" in capsys.readouterr().err


def test_python_dash_m_and_configs_listing():
    r = subprocess.run([sys.executable, "-m", "stem_boost", "configs"], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "tiny_dsa" in r.stdout and "(default)" in r.stdout and "deepseek_v32" in r.stdout


def test_bench_checks_the_kernel_on_a_tiny_shape(tmp_path):
    """`stem-boost bench --check-only --tiny --device cpu`: the benchmark's correctness check (the
    Triton kernel vs the fp32 reference, block and MLA token mode) runs on the CPU under the
    Triton interpreter, and every row of its correctness column passes."""
    seed = int(time.time()) % 10_000
    print(f"seed {seed}")
    out = tmp_path / "check.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "stem_boost", "bench", "--check-only", "--tiny", "--device", "cpu",
                        "--seed", str(seed), "--out", str(out)], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    checks = json.loads(out.read_text())["checks"]
    assert [c["mode"] for c in checks] == ["block", "token_mla"]
    assert all(c["ok"] and 0 <= c["rel_err"] < bench_kernel.CHECK_TOLERANCE for c in checks), checks
    assert re.findall(r"correctness (\w+): rel err \S+ \((\w+)\)", r.stdout) == [("block", "ok"), ("token_mla", "ok")]


def test_bench_correctness_column_catches_a_wrong_kernel():
    """The same check on a kernel that is off by one query row (the fp32 reference shifted, so no
    Triton is needed here): every row says FAIL."""
    torch.manual_seed(0)

    def off_by_one_row(q, k, v, selection):
        return sparse_attention_reference(q, k, v, selection).roll(1, dims=1)

    bad = bench_kernel.check_correctness("cpu", bench_kernel.TINY_CHECK_SHAPES, attention=off_by_one_row)
    assert [c["ok"] for c in bad] == [False, False]
    assert all(c["rel_err"] > 10 * bench_kernel.CHECK_TOLERANCE for c in bad)


def test_longbench_files_in_the_report(tmp_path):
    data = tmp_path / "lb"
    data.mkdir()
    rows = [dict(input=f"What is the code {i}?", context=f"The code {i} is BLUE-{i}. " * 20, answers=[f"BLUE-{i}"],
                 length=60, dataset="hotpotqa", language="en", all_classes=None, _id=str(i)) for i in range(2)]
    (data / "hotpotqa.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (data / "gov_report.jsonl").write_text(json.dumps(dict(rows[0], dataset="gov_report")) + "\n")
    out = tmp_path / "r"
    args = ["compare", "--config", "tiny_dsa", "--out", str(out), "--set", "modes=[native, stem]",
            "--set", "tasks.enabled=false", "--set", "latency.enabled=false", "--set", "perplexity.enabled=false",
            "--set", f"longbench.path={data}",
            "--set", "longbench.max_new_tokens=4", "--set", "longbench.max_length=300"]
    for s in FAST:
        args += ["--set", s]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["longbench"]) == {"native", "stem"}
    assert set(res["longbench"]["stem"]) == {"hotpotqa"}  # gov_report (ROUGE) is skipped with a note
    assert any("gov_report" in n and "ROUGE" in n for n in res["notes"])
    header, rows_md = _table((out / "report.md").read_text(), "LongBench")
    assert header == ["dataset", "native", "stem"] and rows_md[0][0] == "hotpotqa"
    assert _number(rows_md[0][2]) == pytest.approx(res["longbench"]["stem"]["hotpotqa"], abs=5e-3)


def test_scripts_eval_is_compare(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "eval.py"), "--set", "nope=1"], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "unknown key 'nope'" in r.stderr
