"""`stem-boost compare` on two processes (torchrun, gloo, CPU) equals the one-process run.

The two-process run goes through the real command line (`torchrun -m stem_boost compare`); the
one-process run is `stem_boost.eval.run` with the same config. Every number of results.json must
be equal (timings, dates and the output folder aside), and both ranks must have done work.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from stem_boost.eval.config import load_config
from stem_boost.eval.runner import Mode, Unit, split_units
from stem_boost.eval.workshare import assign, unit_seed

ROOT = Path(__file__).resolve().parents[1]


# the random-weight testbeds cut down to seconds: every kind of work unit (task samples, perplexity
# windows, fidelity, latency); on DSA two layers and one calibrated mode; on MiniCPM-4 every input
# is shorter than dense_len (dense attention: no sparse pairs to report, whichever rank runs what)
TESTBEDS = {
    "tiny_dsa": ("model.options={{family: deepseek_v32, seed: {seed}, num_hidden_layers: 2, index_topk: 16}}",
                 "modes=[dense, native, stem, mass_cal]"),
    "tiny_minicpm4": ("model.options={{seed: {seed}}}", "modes=[dense, native, stem]"),
}


def _shrunk(config: str, seed: int) -> list[str]:
    options, modes = TESTBEDS[config]
    return [options.format(seed=seed), modes, "tasks.names=[niah_single_1, niah_multikey_1]",
            "tasks.lengths=[1024]", "tasks.samples=2", "tasks.max_new_tokens=4", "perplexity.length=512",
            "perplexity.window=256", "perplexity.stride=128", "fidelity.length=256", "fidelity.max_rows=256",
            "latency.lengths=[128]", "latency.repeats=1", "latency.warmup=0", "calibration.lengths=[256]",
            "runtime.progress=false"]


def _without_timings(res: dict) -> dict:
    res = json.loads(json.dumps(res))
    for key in ("date", "elapsed_s", "world_size", "units_per_rank", "device"):
        res["meta"].pop(key, None)
    res["config"]["output"].pop("dir")
    for s in res["samples"]:
        s.pop("seconds")
    for per_len in res["latency"].values():
        for entry in per_len.values():
            entry.pop("ms")
    for row in res["summary"].values():
        row.pop("latency_ms", None)
    return res


@pytest.mark.parametrize("config", list(TESTBEDS))
def test_torchrun_two_processes_equal_one_process(tmp_path, config):
    seed = random.randrange(1000)
    print(f"model seed {seed}")
    sets = _shrunk(config, seed)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "stem_boost", "compare", "--config", config, "--out", str(tmp_path / "two")]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(f"stem-boost compare: {config}") == 1  # rank 0 alone reports
    two = json.loads((tmp_path / "two" / "results.json").read_text())

    from stem_boost.eval.runner import run

    one = run(load_config(config, sets))
    assert one["meta"]["world_size"] == 1 and two["meta"]["world_size"] == 2
    per_rank = two["meta"]["units_per_rank"]
    assert len(per_rank) == 2 and min(per_rank) > 0 and sum(per_rank) == one["meta"]["units_per_rank"][0]
    assert set(two["calibration"]) == ({"mass_cal"} if "mass_cal" in sets[1] else set())
    assert two["summary"]["stem"]["ppl"] is not None
    a, b = _without_timings(one), _without_timings(two)
    for key in a:
        assert a[key] == b[key], key
    report = (tmp_path / "two" / "report.md").read_text()
    assert "x 2 processes" in report
    if config == "tiny_minicpm4":  # no sparse prefill below dense_len: no budget table
        assert "## Budget per mode" not in report
        return
    budget = report.split("## Budget per mode")[1].split("\n## ")[0]
    rows = [ln.split("|")[1].strip() for ln in budget.splitlines() if ln.startswith("| ") and "---" not in ln]
    assert rows == ["mode", "stem", "mass_cal"]  # one row per sparse mode (native is the reference)


def _units(n_modes: int, rng: random.Random) -> list[Unit]:
    out = []
    for m in range(n_modes):
        out += [Unit(m, "sample", (0, i), rng.uniform(1, 100)) for i in range(rng.randrange(0, 6))]
        out += [Unit(m, "perplexity", (w,), rng.uniform(1, 50)) for w in range(rng.randrange(0, 4))]
        out.append(Unit(m, "fidelity", (), rng.uniform(1, 20)))
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_split_keeps_fidelity_together_and_balances(world):
    seed = random.randrange(10**6)
    print(f"seed {seed}")
    rng = random.Random(seed)
    units = _units(rng.randrange(1, 6), rng)
    ranks = split_units(units, world)
    assert ranks == split_units(units, world)  # every rank computes the same split
    assert all(0 <= r < world for r in ranks)
    assert len({r for u, r in zip(units, ranks) if u.kind == "fidelity"}) == 1
    costs = [rng.uniform(0, 10) for _ in range(rng.randrange(1, 40))]
    owner = assign(costs, world)
    load = [sum(c for c, r in zip(costs, owner) if r == k) for k in range(world)]
    # longest-first greedy: no rank exceeds the least loaded one by more than one item
    assert max(load) - min(load) <= max(costs) + 1e-9


def test_unit_seeds_depend_on_the_unit_only():
    modes = [Mode("dense", "dense"), Mode("stem", "stem", 0.15)]
    u = Unit(1, "sample", (0, 3), 1.0)
    assert u.name(modes) == "stem/sample/0/3"
    assert unit_seed(0, u.name(modes)) == unit_seed(0, "stem/sample/0/3")
    assert unit_seed(0, "stem/sample/0/3") != unit_seed(0, "stem/sample/0/4") != unit_seed(1, "stem/sample/0/4")
