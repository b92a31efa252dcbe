"""Per-layer reduce allocation (`StemConfig.layer_reduce`): measure on calibration text how far each
sparse layer's output moves when its native selection is cut by r, then spend the model-wide
`reduce` on the layers where it costs least.

    cal = stem_boost.calibrate(model, [ids_2k, ids_4k], reduce=0.15, schedule="mass")
    stem_boost.wrap(model, reduce=0.15, schedule="mass", layer_reduce=cal.layer_reduce)

Why: the paper's budget (and `schedule="mass"`) cuts every layer by the same fraction, but layers
differ by orders of magnitude in how much attention mass the native selection's tail carries.
Every sparse layer of one model has the same native budget, so any allocation whose mean is
`reduce` attends to the same number of pairs model-wide.

Sensitivity of layer l to cut r, three objectives:

  "layer"  (one forward of the native selection, then each layer re-run alone on its captured inputs)
           e_l(r) = sum_t ||a_l(r)_t - a_l(0)_t||^2 / sum_t ||x_l,t||^2
           a_l [B, S, hidden]: the attention module's output (after o_proj: what is added to the
           residual stream); x_l: the decoder layer's input (the residual stream). Cheap: one
           attention call per (layer, r).
  "logits" (a full forward per (layer, r), every other layer native)
           e_l(r) = mean_t KL(p_native,t || p_l(r),t) of the next-token distribution: what the
           evaluation measures, including how later layers amplify or absorb the change.
  "nll"    (the same forwards) e_l(r) = mean_t [-log p_l(r),t(y_t+1) + log p_native,t(y_t+1)]: the
           change of the next-token loss on the calibration text itself, signed (a cut that happens
           to help reads as 0 after the clamp in `allocate`); what perplexity measures, with the
           sampling noise of the calibration tokens.
The full-forward objectives resolve per-layer effects far below the rounding noise of bf16 only in a
higher precision: `calibrate(..., dtype=torch.float32)` measures in it and restores the weights'
dtypes bit for bit afterwards.
Per-layer errors add up to first order; `allocate` minimises their sum subject to
mean_l r_l = reduce, exactly (a dynamic programme on a grid of `step`; the curves are
interpolated linearly between measured points).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from .config import MAX_REDUCE

__all__ = ["Calibration", "allocate", "calibrate", "layer_errors", "merge"]

OBJECTIVES = ("layer", "logits", "nll")
FEASIBLE_SLACK = 0.01  # a layer "achieves" cut r when its achieved reduction is at least r - this
DEFAULT_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


@dataclass
class Calibration:
    """What `calibrate` measured and chose (JSON-ready with `to_dict`)."""

    reduce: float
    layer_reduce: tuple[float, ...]
    grid: tuple[float, ...]
    errors: list[list[float]]  # [n_layers][len(grid)]: e_l(r) summed over the calibration inputs
    achieved: list[list[float]] = field(default_factory=list)  # [n_layers][len(grid)]: lowest achieved cut
    wrap_kwargs: dict = field(default_factory=dict)
    tokens: int = 0
    objective: str = "layer"

    def to_dict(self) -> dict:
        return dict(reduce=self.reduce, layer_reduce=list(self.layer_reduce), grid=list(self.grid),
                    errors=self.errors, achieved=self.achieved, wrap_kwargs=self.wrap_kwargs, tokens=self.tokens,
                    objective=self.objective)

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(reduce=float(d["reduce"]), layer_reduce=tuple(float(x) for x in d["layer_reduce"]),
                   grid=tuple(float(x) for x in d["grid"]), errors=[list(map(float, e)) for e in d["errors"]],
                   achieved=[list(map(float, e)) for e in d.get("achieved", [])],
                   wrap_kwargs=dict(d.get("wrap_kwargs", {})), tokens=int(d.get("tokens", 0)),
                   objective=str(d.get("objective", "layer")))


def _check_grid(grid) -> tuple[float, ...]:
    g = tuple(float(x) for x in grid)
    if len(g) < 2 or g[0] != 0.0 or any(b <= a for a, b in zip(g, g[1:])) or g[-1] > MAX_REDUCE:
        raise ValueError(f"grid={list(grid)!r} must start at 0, increase strictly and end at most {MAX_REDUCE}")
    return g


def allocate(errors: torch.Tensor, grid, reduce: float, *, step: float = 0.005,
             feasible: torch.Tensor | None = None) -> tuple[float, ...]:
    """Per-layer fractions on multiples of `step`, mean exactly `reduce` (up to float rounding of
    reduce / step), minimising sum_l e_l(r_l).

    errors [L, G]: e_l at the `grid` points (grid[0] = 0), interpolated linearly in between; the
    curves are made non-decreasing first (a larger cut never claims to cost less than a smaller one).
    feasible [L, G] bool (optional): whether the layer really achieves that cut (a TPD plan can
    saturate); a layer is never given more than its last feasible grid point before the first
    infeasible one.
    """
    g = _check_grid(grid)
    e = torch.as_tensor(errors, dtype=torch.float64)
    if e.dim() != 2 or e.shape[1] != len(g):
        raise ValueError(f"errors must be [n_layers, {len(g)}] (one column per grid point), got {tuple(e.shape)}")
    if not 0.0 <= reduce <= g[-1]:
        raise ValueError(f"reduce={reduce!r} is outside [0, {g[-1]}] (the calibrated grid)")
    if not step > 0:
        raise ValueError(f"step={step!r} must be > 0")
    L = e.shape[0]
    e = torch.cummax(e.clamp_min(0), dim=1).values
    n_pts = int(math.floor(g[-1] / step + 1e-9)) + 1
    xs = torch.arange(n_pts, dtype=torch.float64) * step
    gt = torch.tensor(g, dtype=torch.float64)
    hi = torch.searchsorted(gt, xs, right=False).clamp(1, len(g) - 1)
    lo = hi - 1
    w = ((xs - gt[lo]) / (gt[hi] - gt[lo])).clamp(0, 1)
    cost = e[:, lo] * (1 - w) + e[:, hi] * w  # [L, n_pts]
    if feasible is not None:
        f = torch.as_tensor(feasible, dtype=torch.bool)
        if f.shape != e.shape:
            raise ValueError(f"feasible must be {tuple(e.shape)} like errors, got {tuple(f.shape)}")
        f = torch.cummin(f.to(torch.int8), dim=1).values.bool()  # feasible up to the first failure
        r_max = torch.tensor(g, dtype=torch.float64).expand(L, -1).masked_fill(~f, 0).amax(1)  # [L]
        cost = cost.masked_fill(xs.unsqueeze(0) > r_max.unsqueeze(1) + 1e-9, float("inf"))
    total = int(round(reduce * L / step))
    if total > (n_pts - 1) * L:
        raise ValueError(f"reduce={reduce!r} needs more than the grid's {g[-1]} in every layer")
    if not math.isfinite(float(cost.min(1).values.sum())):
        raise ValueError("allocate: no finite cost at r=0 for some layer")
    # best[u] = least cost of the layers so far spending u units; choice[l][u] = units of layer l
    inf = float("inf")
    best = torch.full((total + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    choices = []
    for layer in range(L):
        new = torch.full_like(best, inf)
        arg = torch.zeros(total + 1, dtype=torch.long)
        for u in range(min(n_pts, total + 1)):  # this layer spends u units
            cand = torch.full_like(best, inf)
            cand[u:] = best[: total + 1 - u] + cost[layer, u]
            better = cand < new
            new = torch.where(better, cand, new)
            arg = torch.where(better, torch.full_like(arg, u), arg)
        best = new
        choices.append(arg)
    if not math.isfinite(float(best[total])):
        raise ValueError(f"reduce={reduce!r} is more than the layers can achieve (their feasible cuts average "
                         f"{float(r_max.mean()) if feasible is not None else g[-1]:.3f})")
    units, left = [0] * L, total
    for layer in range(L - 1, -1, -1):
        units[layer] = int(choices[layer][left])
        left -= units[layer]
    fr = [u * step for u in units]
    # put the float rounding of total * step back on the layer with the largest cut, so the mean is reduce
    fr[max(range(L), key=lambda i: fr[i])] += reduce * L - sum(fr)
    return tuple(min(MAX_REDUCE, max(0.0, x)) for x in fr)


def _parents(model: torch.nn.Module, modules: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """The module holding each sparse attention as a child (the decoder layer)."""
    ids = {id(m): i for i, m in enumerate(modules)}
    out: list[torch.nn.Module | None] = [None] * len(modules)
    for parent in model.modules():
        for child in parent.children():
            if id(child) in ids:
                out[ids[id(child)]] = parent
    if any(p is None for p in out):
        raise ValueError("calibrate: a sparse-attention module has no parent layer in this model")
    return out


def _check_objectives(objective) -> tuple[str, ...]:
    objs = (objective,) if isinstance(objective, str) else tuple(objective)
    if not objs or any(o not in OBJECTIVES for o in objs) or len(set(objs)) != len(objs):
        raise ValueError(f"objective={objective!r}; allowed: one of {', '.join(OBJECTIVES)}, or a tuple of "
                         "distinct full-forward objectives (logits, nll)")
    if len(objs) > 1 and "layer" in objs:
        raise ValueError(f"objective={objective!r}: 'layer' re-runs single layers and cannot share the "
                         "full forwards of the others; calibrate it on its own")
    return objs


def _feasible(achieved: torch.Tensor, grid) -> torch.Tensor:
    """[L, G] bool: the layer achieved (within FEASIBLE_SLACK) the cut it was asked for."""
    return achieved >= torch.tensor(grid, dtype=torch.float64) - FEASIBLE_SLACK


def _each_cut(modules, g, base_cfg, achieved: torch.Tensor, bar):
    """Yield (i, j, module i) with module i set to cut g[j] (j > 0) and every other layer native;
    after each step record the cut the layer achieved (lowest over inputs) into `achieved` [L, G],
    and put the layer back to native after its last cut."""
    for i, m in enumerate(modules):
        try:
            for j, r in enumerate(g):
                if r == 0.0:
                    continue
                m._stem.cfg = replace(base_cfg, reduce=r)
                yield i, j, m
                achieved[i, j] = min(float(achieved[i, j]), m._stem.stats.reduce_achieved)
        finally:
            m._stem.cfg = base_cfg
        if bar is not None:
            bar.update(1)


@torch.no_grad()
def layer_errors(model: torch.nn.Module, inputs: list[torch.Tensor], grid=DEFAULT_GRID, *, progress: bool = True,
                 objective: str | tuple[str, ...] = "layer", dtype: torch.dtype | None = None,
                 **wrap_kwargs) -> tuple[torch.Tensor | dict[str, torch.Tensor], torch.Tensor]:
    """(errors, achieved), both [n_layers, len(grid)]: e_l(r) over `inputs` (each [B, S] token ids)
    and the lowest cut the layer achieved at requested r (`LayerStats.reduce_achieved`), for the
    Stem configuration `wrap_kwargs` (schedule, beta, ...) with reduce r, under `objective` (see the
    module docstring), with the model's floating weights in `dtype` meanwhile (None: as loaded). The
    model is left unwrapped, in its own dtypes. A tuple of full-forward objectives ("logits", "nll")
    measures them all from the same forwards and gives errors as a dict objective -> [L, G]."""
    from .api import detect_family, is_wrapped, unwrap, wrap

    g = _check_grid(grid)
    objs = _check_objectives(objective)
    if is_wrapped(model):
        unwrap(model)
    if not inputs:
        raise ValueError("calibrate: no calibration inputs")
    for bad in ("reduce", "layer_reduce"):
        if bad in wrap_kwargs:
            raise ValueError(f"calibrate: '{bad}' is what calibration chooses; pass the Stem knobs only")
    _, modules = detect_family(model)
    if objs == ("layer",):
        measure = _output_errors
    else:
        def measure(*args):
            out = _logit_errors(*args, objectives=objs)
            return out[objective] if isinstance(objective, str) else out
    achieved = torch.tensor(g, dtype=torch.float64).expand(len(modules), -1).clone()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(inputs) * len(modules), desc="calibrate layers", leave=False, dynamic_ncols=True)
    wrap(model, reduce=0.0, **wrap_kwargs)
    try:
        with _in_dtype(model, dtype):
            errors = measure(model, modules, inputs, g, model._stem_wrap.cfg, achieved, bar)
    finally:
        if bar is not None:
            bar.close()
        unwrap(model)
    return errors, achieved


def _output_errors(model, modules, inputs, g, base_cfg, achieved, bar) -> torch.Tensor:
    """The "layer" objective: sum ||a_l(r) - a_l(0)||^2 / sum ||x_l||^2, each layer re-run on the
    inputs it got in one native forward."""
    parents = _parents(model, modules)
    L = len(modules)
    num = torch.zeros(L, len(g), dtype=torch.float64)
    den = torch.zeros(L, dtype=torch.float64)
    for ids in inputs:
        captured: list[dict] = [dict() for _ in range(L)]
        hooks = []
        for i, (m, p) in enumerate(zip(modules, parents)):
            def pre_attn(mod, args, kwargs, i=i):
                shared = getattr(getattr(mod, "_stem", None), "shared", None)
                captured[i].update(args=args, kwargs=dict(kwargs), shared=getattr(shared, "last", None))

            def post_attn(mod, args, kwargs, out, i=i):
                captured[i]["out"] = (out[0] if isinstance(out, tuple) else out).double()

            def pre_layer(mod, args, kwargs, i=i):
                x = args[0] if args else kwargs["hidden_states"]
                den[i] += float(x.double().pow(2).sum())

            hooks += [m.register_forward_pre_hook(pre_attn, with_kwargs=True),
                      m.register_forward_hook(post_attn, with_kwargs=True),
                      p.register_forward_pre_hook(pre_layer, with_kwargs=True)]
        try:
            model(input_ids=ids, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        for i, j, m in _each_cut(modules, g, base_cfg, achieved, bar):
            c = captured[i]
            shared = getattr(m._stem, "shared", None)
            if shared is not None:
                shared.last = c["shared"]
            out = m(*c["args"], **c["kwargs"])
            out = (out[0] if isinstance(out, tuple) else out).double()
            num[i, j] += float((out - c["out"]).pow(2).sum())
            if j == len(g) - 1:
                captured[i] = {}  # this layer's inputs are no longer needed
    return num / den.clamp_min(1e-30).unsqueeze(1)


def _kl_sum(ref_logits: torch.Tensor, logits: torch.Tensor, chunk: int = 1024) -> float:
    """sum over positions of KL(softmax(ref) || softmax(logits)); [B, S, V] in chunks of positions
    (fp32 copies of a whole 8K x 49K-vocabulary tensor would take GBs per call)."""
    total = 0.0
    for s0 in range(0, ref_logits.shape[1], chunk):
        ref = ref_logits[:, s0:s0 + chunk].float().log_softmax(-1)
        lp = logits[:, s0:s0 + chunk].float().log_softmax(-1)
        total += float((ref.exp() * (ref - lp)).sum())
    return total


def _nll_sum(logits: torch.Tensor, ids: torch.Tensor, chunk: int = 1024) -> float:
    """sum over positions t < S-1 of -log softmax(logits[:, t])[ids[:, t+1]]; logits [B, S, V], ids [B, S]."""
    total = 0.0
    for s0 in range(0, logits.shape[1] - 1, chunk):
        s1 = min(s0 + chunk, logits.shape[1] - 1)
        lp = logits[:, s0:s1].float().log_softmax(-1)
        total -= float(lp.gather(-1, ids[:, s0 + 1:s1 + 1].unsqueeze(-1)).sum())
    return total


def _logit_errors(model, modules, inputs, g, base_cfg, achieved, bar, objectives=("logits",)) -> dict:
    """The full-forward objectives, every other layer native, all from the same forwards:
    objective -> [L, G]: "logits" = mean next-token KL(native || layer l cut by r); "nll" = mean
    change of the next-token loss on `inputs`."""
    err = {o: torch.zeros(len(modules), len(g), dtype=torch.float64) for o in objectives}
    n_kl = n_nll = 0
    for ids in inputs:
        ref = model(input_ids=ids, use_cache=False).logits  # [B, S, V]
        n_kl += ref.shape[0] * ref.shape[1]
        n_nll += ids.shape[0] * (ids.shape[1] - 1)
        ref_nll = _nll_sum(ref, ids) if "nll" in objectives else 0.0
        if "logits" not in objectives:
            ref = None
        for i, j, _ in _each_cut(modules, g, base_cfg, achieved, bar):
            logits = model(input_ids=ids, use_cache=False).logits
            if "logits" in objectives:
                err["logits"][i, j] += _kl_sum(ref, logits)
            if "nll" in objectives:
                err["nll"][i, j] += _nll_sum(logits, ids) - ref_nll
            del logits
        del ref  # before the next input's reference logits exist
    return {o: e / max(n_kl if o == "logits" else n_nll, 1) for o, e in err.items()}


@contextmanager
def _in_dtype(model: torch.nn.Module, dtype: torch.dtype | None):
    """Run the body with every floating parameter and buffer of `model` in `dtype` (None: as is),
    then give each back its own dtype and values exactly (the originals are kept, not cast back)."""
    if dtype is None:
        yield
        return
    saved = [(t, t.data) for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    try:
        for t, data in saved:
            t.data = data.to(dtype)
        yield
    finally:
        for t, data in saved:
            t.data = data


def calibrate(model: torch.nn.Module, inputs: list[torch.Tensor], reduce: float = 0.15, *, grid=DEFAULT_GRID,
              step: float = 0.005, progress: bool = True, objective: str | tuple[str, ...] = "layer",
              solve: bool = True, dtype: torch.dtype | None = None,
              **wrap_kwargs) -> Calibration | dict[str, Calibration]:
    """Measure `layer_errors` on `inputs` and `allocate` `reduce` over the layers.

    inputs: token ids [B, S] (calibration text, not the text you evaluate on); objective: "layer",
    "logits" or "nll" (module docstring), or a tuple of the last two (measured from the same
    forwards; the result is then a dict objective -> Calibration); dtype: measure with the weights in
    this dtype (e.g. torch.float32 for a bf16 model: the full-forward objectives need it);
    wrap_kwargs: the Stem knobs the allocation is for (schedule, beta, ...), passed to `wrap` with the
    result. solve=False measures only (layer_reduce left empty): a slice of the grid or of the
    inputs, for `merge`.
    """
    g = _check_grid(grid)
    if solve and not 0.0 <= reduce <= g[-1]:
        raise ValueError(f"reduce={reduce!r} is outside [0, {g[-1]}] (the calibrated grid)")
    errors, achieved = layer_errors(model, inputs, g, progress=progress, objective=objective, dtype=dtype,
                                    **wrap_kwargs)

    def solved(err: torch.Tensor, obj: str) -> Calibration:
        fr = allocate(err, g, reduce, step=step, feasible=_feasible(achieved, g)) if solve else ()
        return Calibration(reduce=float(reduce), layer_reduce=fr, grid=g, errors=err.tolist(),
                           achieved=achieved.tolist(), wrap_kwargs=dict(wrap_kwargs),
                           tokens=int(sum(x.numel() for x in inputs)), objective=obj)

    if isinstance(errors, dict):
        return {obj: solved(err, obj) for obj, err in errors.items()}
    return solved(errors, objective)


def merge(cals: list[Calibration], reduce: float | None = None, *, step: float = 0.005) -> Calibration:
    """One Calibration from several measured on other grid points or other inputs of the same model
    and Stem knobs (e.g. one process per grid point): errors at each grid point are averaged over
    the calibrations that measured it, weighted by their tokens; the achieved cut is the lowest;
    the allocation is solved again for `reduce` (default: theirs)."""
    if not cals:
        raise ValueError("merge: no calibrations")
    first = cals[0]
    for c in cals[1:]:
        if (c.wrap_kwargs, c.objective, len(c.errors)) != (first.wrap_kwargs, first.objective, len(first.errors)):
            raise ValueError("merge: the calibrations differ in Stem knobs, objective or number of layers")
    reduce = first.reduce if reduce is None else float(reduce)
    grid = sorted({x for c in cals for x in c.grid})
    L = len(first.errors)
    num = torch.zeros(L, len(grid), dtype=torch.float64)
    wsum = torch.zeros(len(grid), dtype=torch.float64)
    achieved = torch.tensor(grid, dtype=torch.float64).expand(L, -1).clone()
    for c in cals:
        e = torch.tensor(c.errors, dtype=torch.float64)
        a = torch.tensor(c.achieved, dtype=torch.float64) if c.achieved else torch.tensor(c.grid).expand(L, -1)
        w = max(c.tokens, 1)
        for j, x in enumerate(c.grid):
            k = grid.index(x)
            num[:, k] += w * e[:, j]
            wsum[k] += w
            achieved[:, k] = torch.minimum(achieved[:, k], a[:, j])
    errors = num / wsum.clamp_min(1)
    fr = allocate(errors, grid, reduce, step=step, feasible=_feasible(achieved, grid))
    return Calibration(reduce=reduce, layer_reduce=fr, grid=tuple(grid), errors=errors.tolist(),
                       achieved=achieved.tolist(), wrap_kwargs=dict(first.wrap_kwargs),
                       tokens=max(c.tokens for c in cals), objective=first.objective)
