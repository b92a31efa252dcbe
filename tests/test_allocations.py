"""`calibration.allocations`: a *_cal mode reads its per-layer allocation from a file (a path, or one
that ships in stem_boost/data/calibration) instead of measuring it, and runs with exactly that
allocation; files for another reduce, unknown names and bad config values are errors that say so."""

from __future__ import annotations

import json

import pytest
import torch

from stem_boost.calibrate import Calibration
from stem_boost.eval.allocations import load_allocation, shipped_allocations
from stem_boost.eval.config import ConfigError, load_config
from stem_boost.eval.runner import run


@pytest.mark.parametrize("name", shipped_allocations())
def test_shipped_allocations_keep_their_mean_reduce(name):
    reduce = float(name.rsplit("_r", 1)[1].removesuffix(".json"))
    cal, info = load_allocation(name, "mass_cal", reduce)
    assert len(cal.layer_reduce) == 30  # SmolLM2-135M's layers
    assert abs(sum(cal.layer_reduce) / 30 - reduce) < 1e-6 and len(set(cal.layer_reduce)) > 1
    assert info["file"].endswith(name)


def test_wrong_reduce_and_unknown_names_are_errors(tmp_path):
    name = shipped_allocations()[0]
    with pytest.raises(ValueError, match=r"is for reduce .*, the mode runs at 0.5"):
        load_allocation(name, "stem_cal", 0.5)
    with pytest.raises(ValueError, match="neither a file nor a shipped allocation"):
        load_allocation(str(tmp_path / "missing.json"), "stem_cal", 0.15)
    with pytest.raises(ConfigError, match="calibration.allocations"):
        load_config("tiny_dsa", ["calibration.allocations={stem: a.json}"])


def test_a_mode_runs_with_the_allocation_of_its_file(tmp_path):
    """tiny_dsa (2 sparse layers) with mass_cal read from a file holding a random allocation of mean
    0.15: nothing is measured, the results carry the file, and each layer cuts its own fraction. The
    file is written as the shipped ones are (no "objective": they predate it); the report still draws
    the allocation."""
    from stem_boost.eval.report import write_report

    seed = int(torch.randint(0, 10_000, (1,)))
    print(f"seed {seed}")
    g = torch.Generator().manual_seed(seed)
    d = float(torch.rand((), generator=g)) * 0.1 + 0.02
    layer_reduce = (0.15 - d, 0.15 + d)
    cal = Calibration(reduce=0.15, layer_reduce=layer_reduce, grid=(0.0, 0.3), errors=[[0.0, 1.0], [0.0, 1.0]])
    path = tmp_path / "alloc.json"
    path.write_text(json.dumps({k: v for k, v in cal.to_dict().items() if k != "objective"}))
    cfg = load_config("tiny_dsa", ["modes=[native, mass_cal]", "tasks.enabled=false", "perplexity.enabled=false",
                                   "fidelity.length=256", "fidelity.max_rows=256", "latency.enabled=false",
                                   f"model.options={{family: deepseek_v32, seed: {seed}, num_hidden_layers: 2}}",
                                   f"calibration.allocations={{mass_cal: {path}}}", "runtime.progress=false"])
    res = run(cfg)
    got = res["calibration"]["mass_cal"]
    assert got["file"] == str(path) and tuple(got["layer_reduce"]) == layer_reduce and got["objective"] == "layer"
    assert "layer_allocation.png" in write_report(res, tmp_path / "report")
    layers = res["budget"]["mass_cal"]["layers"]
    assert len(layers) == 2
    for layer, want in zip(layers, layer_reduce):
        assert abs(layer["reduce_achieved"] - want) < 0.03, (layer["reduce_achieved"], want)


def test_a_measured_allocation_is_written_and_read_back(tmp_path):
    """A *_cal mode measured in one run is written to the report folder (calibration/<mode>.json); a
    second run that names that file applies exactly the same allocation without measuring."""
    from stem_boost.eval.report import write_report

    seed = int(torch.randint(0, 10_000, (1,)))
    print(f"seed {seed}")
    common = ["modes=[native, stem_cal]", "tasks.enabled=false", "perplexity.enabled=false", "fidelity.length=256",
              "fidelity.max_rows=256", "latency.enabled=false", "calibration.lengths=[256]", "runtime.progress=false",
              f"model.options={{family: deepseek_v32, seed: {seed}, num_hidden_layers: 2}}"]
    first = run(load_config("tiny_dsa", common))
    paths = write_report(first, tmp_path / "first")
    saved = paths["calibration/stem_cal.json"]
    second = run(load_config("tiny_dsa", common + [f"calibration.allocations={{stem_cal: {saved}}}"]))
    assert second["calibration"]["stem_cal"]["file"] == str(saved)
    assert second["calibration"]["stem_cal"]["layer_reduce"] == first["calibration"]["stem_cal"]["layer_reduce"]
    assert second["budget"]["stem_cal"]["pairs"] == first["budget"]["stem_cal"]["pairs"]
