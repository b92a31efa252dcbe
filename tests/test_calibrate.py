"""Per-layer reduce allocation: `allocate` against brute force, `layer_errors` against its definition,
and `wrap(layer_reduce=...)` keeping the model-wide contract."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import stem_boost
from stem_boost.calibrate import Calibration, allocate, calibrate, layer_errors
from stem_boost.config import StemConfig


def _interp(curve, grid, x):
    for (g0, e0), (g1, e1) in zip(zip(grid, curve), zip(grid[1:], curve[1:])):
        if g0 <= x <= g1 + 1e-12:
            return e0 + (e1 - e0) * (x - g0) / (g1 - g0)
    raise AssertionError(x)


def test_allocate_matches_brute_force():
    grid = (0.0, 0.1, 0.2, 0.4)
    L, step, reduce = 3, 0.05, 0.15
    errors = torch.rand(L, len(grid)).cumsum(1) * torch.rand(L, 1) * 10  # non-decreasing, scaled per layer
    errors[:, 0] = 0
    fr = allocate(errors, grid, reduce, step=step)
    assert abs(sum(fr) / L - reduce) < 1e-9
    pts = [round(i * step, 10) for i in range(int(0.4 / step) + 1)]
    best = min((sum(_interp(errors[i].tolist(), grid, c[i]) for i in range(L)), c)
               for c in itertools.product(pts, repeat=L) if abs(sum(c) - reduce * L) < 1e-9)
    got = sum(_interp(errors[i].tolist(), grid, fr[i]) for i in range(L))
    assert got <= best[0] + 1e-9


def test_allocate_moves_the_cut_off_the_sensitive_layer():
    grid = (0.0, 0.3)
    errors = torch.tensor([[0.0, 100.0], [0.0, 1.0], [0.0, 1.0]])
    fr = allocate(errors, grid, 0.1)
    assert fr[0] == 0.0 and abs(fr[1] + fr[2] - 0.3) < 1e-9


def test_allocate_respects_feasible_cuts():
    grid = (0.0, 0.2, 0.4)
    errors = torch.tensor([[0.0, 0.0, 0.0], [0.0, 5.0, 10.0]])  # layer 0 is free to cut, but only to 0.2
    fr = allocate(errors, grid, 0.15, feasible=torch.tensor([[True, True, False], [True, True, True]]))
    assert fr[0] == pytest.approx(0.2) and fr[1] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="more than the layers can achieve"):
        allocate(errors, grid, 0.35, feasible=torch.tensor([[True, True, False], [True, True, False]]))


def test_allocate_rejects_bad_input():
    with pytest.raises(ValueError, match="grid"):
        allocate(torch.zeros(2, 2), (0.1, 0.2), 0.1)
    with pytest.raises(ValueError, match="errors must be"):
        allocate(torch.zeros(2, 3), (0.0, 0.2), 0.1)
    with pytest.raises(ValueError, match="reduce=0.5"):
        allocate(torch.zeros(2, 2), (0.0, 0.2), 0.5)


def test_stem_config_layer_reduce_is_validated():
    with pytest.raises(ValueError, match="mean"):
        StemConfig(reduce=0.15, layer_reduce=(0.1, 0.1))
    with pytest.raises(ValueError, match=r"layer_reduce\[1\]=0.95"):
        StemConfig(reduce=0.5, layer_reduce=(0.05, 0.95))
    with pytest.raises(ValueError, match="non-empty"):
        StemConfig(reduce=0.1, layer_reduce=())
    cfg = StemConfig(reduce=0.15, layer_reduce=[0.1, 0.2])
    assert cfg.for_layer(1, 2).reduce == 0.2 and cfg.for_layer(1, 2).layer_reduce is None
    with pytest.raises(ValueError, match="3 sparse-attention layers"):
        cfg.for_layer(0, 3)


def _model(family: str):
    seed = int(torch.randint(0, 1000, (1,)))
    if family == "dsa":
        from .dsa_tiny import build_deepseek_v32

        return build_deepseek_v32(seed=seed, index_topk=16), 0.15, 192
    from stem_boost.testbeds.tiny_minicpm4 import build_testbed

    return build_testbed(seed=seed, num_hidden_layers=2).model, 0.18, 1024


@pytest.mark.parametrize("family", ["dsa", "infllmv2"])
def test_wrap_with_layer_reduce_cuts_each_layer_by_its_fraction(family):
    model, reduce, n = _model(family)
    L = len(stem_boost.api.detect_family(model)[1])
    lr = [reduce * 2 * i / (L - 1) for i in range(L)]  # 0 ... 2 reduce, mean reduce
    ids = torch.randint(3, 256, (1, n))
    stem_boost.wrap(model, reduce=reduce, schedule="mass", layer_reduce=lr)
    with torch.no_grad():
        model(ids)
    st = stem_boost.stats(model)
    with pytest.raises(ValueError, match="sparse-attention layers"):
        stem_boost.wrap(model, reduce=reduce, layer_reduce=[reduce] * (L + 1))
    stem_boost.unwrap(model)
    for layer, want in zip(st["layers"], lr):
        assert abs(layer["reduce_achieved"] - want) < 0.02, (layer, want)
    assert abs(st["reduce_achieved"] - reduce) < 0.02
    assert st["config"]["layer_reduce"] == pytest.approx(lr)


def test_layer_errors_match_their_definition():
    """e_l(r) against an independent computation: the full model wrapped with reduce r on layer l
    only, where upstream layers run native, so layer l sees the same input."""
    model, reduce, n = _model("dsa")
    ids = torch.randint(3, 256, (1, n))
    grid = (0.0, 0.2, 0.5)
    err, achieved = layer_errors(model, [ids], grid, progress=False, schedule="mass")
    assert torch.allclose(achieved, torch.tensor(grid, dtype=torch.float64).expand_as(achieved), atol=0.02)
    assert not stem_boost.is_wrapped(model)
    assert torch.all(err[:, 0] == 0) and torch.all(err[:, 1:] > 0)
    _, modules = stem_boost.api.detect_family(model)
    L = len(modules)
    layer = L - 1
    outs, resid = {}, {}
    parent = next(p for p in model.modules() if any(c is modules[layer] for c in p.children()))
    h1 = modules[layer].register_forward_hook(lambda m, a, o: outs.__setitem__("a", o[0].double()))
    h2 = parent.register_forward_pre_hook(
        lambda m, a, k: resid.__setitem__("x", (a[0] if a else k["hidden_states"]).double()), with_kwargs=True)
    try:
        for r in grid:
            lr = [0.0] * L
            lr[layer] = r
            stem_boost.wrap(model, reduce=r / L, schedule="mass", layer_reduce=lr)
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
            outs[r] = outs["a"]
            stem_boost.unwrap(model)
    finally:
        h1.remove()
        h2.remove()
    for j, r in enumerate(grid):
        want = float((outs[r] - outs[0.0]).pow(2).sum() / resid["x"].pow(2).sum())
        assert math.isclose(float(err[layer, j]), want, rel_tol=1e-4, abs_tol=1e-12), (r, float(err[layer, j]), want)


def test_calibrate_returns_an_allocation_that_wraps():
    model, reduce, n = _model("infllmv2")
    ids = torch.randint(3, 256, (1, n))
    cal = calibrate(model, [ids], reduce, grid=(0.0, 0.1, 0.2, 0.4), progress=False, schedule="mass")
    assert abs(sum(cal.layer_reduce) / len(cal.layer_reduce) - reduce) < 1e-9
    again = Calibration.from_dict(cal.to_dict())
    assert again.layer_reduce == cal.layer_reduce and again.tokens == n and again.achieved == cal.achieved
    stem_boost.wrap(model, reduce=reduce, schedule="mass", layer_reduce=again.layer_reduce)
    with torch.no_grad():
        model(ids)
    assert abs(stem_boost.stats(model)["reduce_achieved"] - reduce) < 0.02
    stem_boost.unwrap(model)
    with pytest.raises(ValueError, match="'layer_reduce' is what calibration chooses"):
        calibrate(model, [ids], reduce, layer_reduce=cal.layer_reduce)


def test_full_forward_objectives_match_their_definition():
    """"logits": the next-token KL of one cut layer; "nll": the change of the next-token loss on the
    calibration ids; both measured from the same forwards (a tuple) and each against a forward of the
    model wrapped with that layer cut only; one objective alone gives the same numbers."""
    model, reduce, n = _model("dsa")
    ids = torch.randint(3, 256, (1, n))
    grid = (0.0, 0.3)
    both, _ = layer_errors(model, [ids], grid, progress=False, objective=("logits", "nll"), schedule="mass")
    alone, _ = layer_errors(model, [ids], grid, progress=False, objective="nll", schedule="mass")
    assert torch.allclose(alone, both["nll"], rtol=1e-9, atol=1e-12)
    L = alone.shape[0]
    for err in both.values():
        assert torch.all(err[:, 0] == 0) and torch.all(err[:, 1] != 0)
    layer = int(torch.randint(0, L, (1,)))
    logp = {}
    for r in grid:
        lr = [0.0] * L
        lr[layer] = r
        stem_boost.wrap(model, reduce=r / L, schedule="mass", layer_reduce=lr)
        with torch.no_grad():
            logp[r] = model(input_ids=ids, use_cache=False).logits.double().log_softmax(-1)
        stem_boost.unwrap(model)
    nxt = ids[:, 1:].unsqueeze(-1)
    want = dict(logits=float((logp[0.0].exp() * (logp[0.0] - logp[0.3])).sum(-1).mean()),
                nll=float((logp[0.0][:, :-1].gather(-1, nxt) - logp[0.3][:, :-1].gather(-1, nxt)).mean()))
    for obj, w in want.items():
        got = float(both[obj][layer, 1])
        assert math.isclose(got, w, rel_tol=1e-3, abs_tol=1e-9), (obj, got, w)
    with pytest.raises(ValueError, match="objective='output'"):
        layer_errors(model, [ids], grid, objective="output")
    with pytest.raises(ValueError, match="cannot share"):
        layer_errors(model, [ids], grid, objective=("layer", "nll"))


def test_calibration_dtype_measures_in_it_and_restores_the_weights():
    """dtype=float32 on a bf16 model: the errors of a float32 copy, and afterwards every parameter and
    buffer back in its own dtype with the same bits."""
    import copy

    model, reduce, n = _model("dsa")
    model.to(torch.bfloat16)
    ids = torch.randint(3, 256, (1, n))
    before = {k: (v.dtype, v.clone()) for k, v in model.state_dict().items()}
    grid = (0.0, 0.2)
    err, _ = layer_errors(model, [ids], grid, progress=False, schedule="mass", dtype=torch.float32)
    want, _ = layer_errors(copy.deepcopy(model).float(), [ids], grid, progress=False, schedule="mass")
    assert torch.allclose(err, want, rtol=1e-5, atol=1e-12)
    after = model.state_dict()
    for k, (dt, v) in before.items():
        assert after[k].dtype == dt and torch.equal(after[k], v), k


def test_merge_of_grid_slices_equals_one_calibration():
    model, reduce, n = _model("dsa")
    ids = torch.randint(3, 256, (1, n))
    whole = calibrate(model, [ids], reduce, grid=(0.0, 0.1, 0.3), progress=False, schedule="mass")
    parts = [calibrate(model, [ids], reduce, grid=(0.0, r), progress=False, schedule="mass", solve=False)
             for r in (0.1, 0.3)]
    assert parts[0].layer_reduce == ()
    from stem_boost.calibrate import merge

    merged = merge(parts)
    assert merged.grid == whole.grid
    assert torch.allclose(torch.tensor(merged.errors), torch.tensor(whole.errors), rtol=1e-6, atol=1e-12)
    assert merged.layer_reduce == pytest.approx(whole.layer_reduce)
    with pytest.raises(ValueError, match="differ"):
        merge([parts[0], calibrate(model, [ids], reduce, grid=(0.0, 0.2), progress=False, schedule="uniform",
                                   solve=False)])


def test_calibrate_with_several_objectives_gives_one_calibration_each():
    model, reduce, n = _model("dsa")
    ids = torch.randint(3, 256, (1, n))
    cals = calibrate(model, [ids], reduce, grid=(0.0, 0.1, 0.3), progress=False, objective=["nll", "logits"],
                     schedule="mass")
    assert set(cals) == {"nll", "logits"}
    for obj, cal in cals.items():
        assert cal.objective == obj and abs(sum(cal.layer_reduce) / len(cal.layer_reduce) - reduce) < 1e-9
    assert cals["nll"].errors != cals["logits"].errors and cals["nll"].achieved == cals["logits"].achieved
