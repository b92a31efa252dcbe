"""Evaluate one model in up to eight modes side by side and return a results dict.

Modes (always run in this order, so that the references exist when the others are compared):
  dense    the native model with its selection disabled (`fidelity.dense_mode`)
  native   the native sparse selection, through stem_boost.wrap(reduce=0, beta=0): the same
           selection as the unwrapped model (tests/test_dsa_adapter.py), on the same kernels as
           the Stem modes, with the same budget accounting
  stem     Stem: OAM rescoring + TPD truncation at `reduce`
  uniform  ablation at Stem's budget: OAM on, TPD off (every row keeps the same fraction of its
           native budget; StemConfig.schedule="uniform")
  no_oam   ablation at Stem's budget: TPD on, OAM off (beta = 0)
  mass     this project's variant at Stem's budget: schedule="mass" (the cut goes to the pairs of
           least predicted attention mass, `stem_boost.mass`), OAM on
  stem_cal, mass_cal  stem / mass with per-layer budgets calibrated first (`calibrate_modes`, on
           the `calibration` section's text), the same model-wide reduce
With several `stem.reduce` values the Stem modes run once per value ("stem@0.15", ...).

Per mode: RULER-style tasks (greedy generation, RULER's scoring), perplexity on English text,
fidelity against dense / native (per-layer attention-output error, next-token KL), the budget
per layer and per query position, prefill latency, and LongBench when files are configured.

The work is a list of units (`plan_units`: a task sample, a perplexity window, a mode's fidelity
capture, a latency length, a LongBench item), each seeded from its own name. Under torchrun /
deepspeed the units are split over the processes (`split_units`, `workshare`) and gathered on rank
0 (`_assemble`, in the order of a one-process run), so the numbers do not depend on the split.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import platform
import statistics
import time
from dataclasses import dataclass, field, replace

import torch

from .. import __version__
from ..api import is_wrapped, layer_stats, stats, unwrap, wrap
from ..stats import LayerStats
from . import fidelity as fid
from . import longbench as lb
from .allocations import load_allocation
from .perplexity import Window, combine, plan_windows, window_nll
from .tasks import (METRICS, generate_task, haystack_sources, is_named_source, postprocess_pred, score_sample,
                    text_source)
from .textfile import TextFileError
from .workshare import Team, assign, join_team, seed_unit
from ..text.tokenizers import ByteTokenizer, HFTokenizer

__all__ = ["Inputs", "Mode", "Unit", "build_modes", "load_model", "plan_units", "run", "split_units"]


@dataclass(frozen=True)
class Mode:
    name: str
    kind: str  # dense | native | stem | uniform | no_oam | mass | stem_cal | mass_cal
    reduce: float | None = None
    layer_reduce: tuple[float, ...] | None = None  # *_cal: the calibrated allocation (`calibrate_modes`)

    def wrap_kwargs(self, stem_cfg: dict) -> dict | None:
        if self.kind == "dense":
            return None
        common = dict(oam_norm=stem_cfg["oam_norm"], head_agg=stem_cfg["head_agg"], alpha_min=stem_cfg["alpha_min"],
                      backend=stem_cfg["backend"], indexer_dtype=stem_cfg["indexer_dtype"])
        if self.kind == "native":
            return dict(common, reduce=0.0, beta=0.0)
        base = self.kind.removesuffix("_cal")
        beta = 0.0 if base == "no_oam" else float(stem_cfg["beta"])
        schedule = base if base in ("uniform", "mass") else "tpd"
        kw = dict(common, reduce=self.reduce, beta=beta, schedule=schedule, tile_tokens=stem_cfg["tile_tokens"])
        if base != self.kind:
            if self.layer_reduce is None:
                raise ValueError(f"mode {self.name}: its per-layer allocation is not calibrated yet (calibrate_modes)")
            kw["layer_reduce"] = self.layer_reduce
        return kw

    def uncalibrated(self) -> "Mode":
        """The same mode with every layer cut alike ("stem_cal" -> "stem", "mass_cal" -> "mass"): the
        knobs a calibration is measured for."""
        return replace(self, kind=self.kind.removesuffix("_cal"), layer_reduce=None)

    def describe(self, stem_cfg: dict) -> str:
        if self.kind == "dense":
            return "dense: the native model with its sparse selection disabled"
        if self.kind == "native":
            return "native sparse selection (stem_boost.wrap reduce=0, beta=0)"
        kw = self.uncalibrated().wrap_kwargs(stem_cfg)  # reduce, beta and schedule are the same
        what = {"stem": "Stem (OAM + TPD)", "uniform": "ablation: OAM + uniform truncation (no TPD)",
                "no_oam": "ablation: TPD without OAM (beta=0)",
                "mass": "mass-aware budgets (this project's variant; OAM on)",
                "stem_cal": "Stem with calibrated per-layer budgets (this project's allocation; same model-wide reduce)",
                "mass_cal": "mass-aware budgets with calibrated per-layer budgets (this project's variant)"}[self.kind]
        return f"{what}: reduce={kw['reduce']:g} beta={kw['beta']:g} schedule={kw['schedule']} tile_tokens={kw['tile_tokens']}"


def build_modes(cfg: dict) -> list[Mode]:
    wanted = set(cfg["modes"])
    reduces = cfg["stem"]["reduce"]
    out = [Mode(k, k) for k in ("dense", "native") if k in wanted]
    for r in reduces:
        for kind in ("stem", "uniform", "no_oam", "mass", "stem_cal", "mass_cal"):
            if kind in wanted:
                out.append(Mode(kind if len(reduces) == 1 else f"{kind}@{r:g}", kind, r))
    return out


# ------------------------------------------------------------------ model loading
@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    description: str
    random_weights: bool


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is 'cuda' but no CUDA device is available (set model.device=cpu)")
    return name


def load_model(cfg: dict) -> Loaded:
    m, t = cfg["model"], cfg["tokenizer"]
    if m["source"] == "local" and not m["path"]:
        raise ValueError(f"{cfg['_source']}: model.source is 'local' but model.path is not set "
                         f"(set it in the file or with --set model.path=DIR)")
    device = _device(m["device"])
    if m["source"] == "testbed":
        from ..testbeds import load_testbed

        options = dict(m["options"])
        options.setdefault("dtype", m["dtype"])
        options.setdefault("device", device)
        tb = load_testbed(m["testbed"], **options)
        model, tokenizer, desc, random_weights = tb.model, tb.tokenizer, tb.description, tb.random_weights
    elif m["parallel"] == "tensor":  # this rank's shard of a DSA checkpoint (stem_boost.dist)
        from ..dist import load_sharded_checkpoint

        where = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device(device)
        model = load_sharded_checkpoint(m["path"], device=where, dtype=getattr(torch, m["dtype"]),
                                        attn_implementation=m["attn_implementation"])
        tokenizer = None
        desc, random_weights = f"{type(model).__name__} from {m['path']} (tensor parallel)", False
    else:
        kwargs = dict(dtype=getattr(torch, m["dtype"]))
        if m["loader"] == "minicpm4":
            from ..models import load_minicpm4

            model = load_minicpm4(m["path"], **kwargs)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(m["path"], attn_implementation=m["attn_implementation"],
                                                         trust_remote_code=m["trust_remote_code"], **kwargs)
        model = model.to(device).eval()
        tokenizer = None
        desc, random_weights = f"{type(model).__name__} from {m['path']}", False
    if t["kind"] == "bytes":
        tokenizer = ByteTokenizer()
    elif t["kind"] == "hf" or tokenizer is None:
        path = t["path"] or m["path"]
        if not path:
            raise ValueError(f"{cfg['_source']}: tokenizer.kind needs tokenizer.path or model.path")
        tokenizer = HFTokenizer.from_pretrained(path)
    return Loaded(model=model.eval(), tokenizer=tokenizer, description=desc, random_weights=random_weights)


# ------------------------------------------------------------------ helpers
@contextlib.contextmanager
def use_mode(model: torch.nn.Module, mode: Mode, stem_cfg: dict):
    """The model in ``mode`` for the duration of the block (unwrapped again afterwards)."""
    if is_wrapped(model):
        unwrap(model)
    if mode.kind == "dense":
        with fid.dense_mode(model):
            yield
        return
    wrap(model, **mode.wrap_kwargs(stem_cfg))
    try:
        yield
    finally:
        unwrap(model)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _clear_stats(model: torch.nn.Module) -> None:
    """Forget the last prefill's accounting, so that a unit never reports another unit's: a forward
    that records nothing (InfLLMv2 below ``dense_len`` attends densely) would otherwise leave the
    previous unit's numbers, which depend on what ran before on this rank."""
    if is_wrapped(model):
        for s in layer_stats(model):
            s.__dict__.update(LayerStats(layer=s.layer, family=s.family).__dict__)


def _recorded(model: torch.nn.Module) -> bool:
    """Whether the wrapped model's last forward recorded a sparse prefill (after `_clear_stats`)."""
    return any(s.seq_len > 0 for s in layer_stats(model))


def _pairs(model: torch.nn.Module, mode: Mode, seq_len: int, n_layers: int) -> tuple[int | None, int | None]:
    """(attended pairs, native pairs) of the last prefill; dense: the causal pairs, native unknown.
    InfLLMv2 counts (query token, key block) pairs per kv head without the forced blocks (the
    `reduce` contract's unit), so its dense count is made in that unit too."""
    if mode.kind == "dense":
        sparse = getattr(model, "_dense_mode_sparse_config", None) or getattr(model.config, "sparse_config", None)
        if sparse is None:
            return n_layers * seq_len * (seq_len + 1) // 2, None
        from ..native.infllmv2 import InfLLMv2Params
        from ..tpd import block_available

        p = InfLLMv2Params.from_sparse_config(dict(sparse))
        avail = block_available(seq_len, -(-seq_len // p.block_size), query_block=1, block_size=p.block_size,
                                n_init=p.init_blocks, n_local=p.local_blocks + 1, seq_q=seq_len)
        return n_layers * model.config.num_key_value_heads * int(avail.sum()), None
    if not _recorded(model):  # the forward attended densely (e.g. InfLLMv2 below dense_len): no sparse pairs
        return None, None
    st = stats(model)
    return st["stem_pairs"], st["native_pairs"]


def _text_ids(tokenizer, offset: int, n_tokens: int, source: str = "english", key: str = "text") -> list[int]:
    """The first ``n_tokens`` tokens of the text ``source`` (a built-in text's name or the user's
    file) from character ``offset`` (never repeated: a text too short for the request is an
    error naming the config ``key``, the source and the tokens needed)."""
    text = text_source(source, key)
    what = f"the text {source!r}" if is_named_source(source) else f"the file {source!r}"
    if not 0 <= offset < len(text):
        raise TextFileError(f"{key}: offset_chars={offset} is outside {what} ({len(text)} characters)")
    chars = max(64, n_tokens * 8)
    while True:
        ids = tokenizer.encode(text[offset:offset + chars])
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
        if offset + chars >= len(text):
            raise TextFileError(f"{key}: {what} from character {offset} has {len(ids)} tokens; {n_tokens} are "
                                f"needed (a longer text, or a lower length or offset)")
        chars *= 2


class _Progress:
    def __init__(self, enabled: bool, total: int, desc: str):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def step(self, text: str = "") -> None:
        if self.bar is not None:
            if text:
                self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------ the run
def calibrate_modes(modes: list[Mode], model: torch.nn.Module, tok, bos: list[int], device, cfg: dict,
                    notes: list[str], team: Team | None = None) -> tuple[list[Mode], dict]:
    """The modes with each "*_cal" mode's `layer_reduce` measured by `stem_boost.calibrate` on the
    `calibration` section's text (never the evaluation text) for that mode's knobs and reduce, or
    read from the file that `calibration.allocations` names for its kind, and
    {mode name: Calibration dict}. A mode whose calibration fails is dropped with a note. With a
    ``team`` of several processes each calibrates its share of the modes and all get every result."""
    from ..calibrate import calibrate

    team = team or Team()
    cal_cfg = cfg["calibration"]
    cal_modes = [m for m in modes if m.kind.endswith("_cal")]
    if not cal_modes:
        return modes, {}
    text = text_source(cal_cfg["text"], "calibration.text")
    lengths = cal_cfg["lengths"] or sorted(set(cfg["tasks"]["lengths"]))
    inputs = [torch.tensor([bos + _text_ids(tok, i * len(text) // (cal_cfg["windows"] + 1), L - len(bos),
                                            cal_cfg["text"], "calibration.text")], device=device)
              for L in lengths for i in range(cal_cfg["windows"])]
    mine: dict[str, tuple] = {}  # mode name -> (layer_reduce, Calibration dict) or (None, failure note)
    files = cal_cfg["allocations"]  # modes whose allocation is read from a file (`allocations.py`)
    for mode in [m for m in cal_modes if m.kind in files]:
        cal, info = load_allocation(files[mode.kind], mode.kind, mode.reduce)  # wrap checks the layer count
        mine[mode.name] = (cal.layer_reduce, info)
    cal_modes = [m for m in cal_modes if m.kind not in files]
    owner = assign([1.0] * len(cal_modes), team.world)
    for mode, rank in zip(cal_modes, owner):
        if rank != team.rank:
            continue
        kw = mode.uncalibrated().wrap_kwargs(cfg["stem"])
        kw.pop("reduce")
        seed_unit(cfg["runtime"]["seed"], f"{mode.name}/calibration")
        try:
            cal = calibrate(model, inputs, mode.reduce, objective=cal_cfg["objective"],
                            progress=cfg["runtime"]["progress"] and team.is_main, **kw)
        except (NotImplementedError, ValueError) as e:
            mine[mode.name] = (None, f"mode {mode.name} not run: calibration failed: {type(e).__name__}: {e}")
            continue
        mine[mode.name] = (cal.layer_reduce, dict(cal.to_dict(), text=cal_cfg["text"], lengths=lengths,
                                                  windows=cal_cfg["windows"]))
    results = {k: v for part in team.all_gather(mine) for k, v in part.items()}
    out, cals = [], {}
    for mode in modes:
        if not mode.kind.endswith("_cal"):
            out.append(mode)
            continue
        layer_reduce, info = results[mode.name]
        if layer_reduce is None:
            notes.append(info)
            continue
        cals[mode.name] = info
        out.append(replace(mode, layer_reduce=tuple(layer_reduce)))
    return out, cals


@dataclass(frozen=True)
class Unit:
    """One piece of work of a mode: a task sample, a perplexity window, the fidelity capture, a
    latency length or a LongBench item. ``cost`` (~tokens processed) balances the ranks."""

    mode: int  # index into the modes
    kind: str  # sample | perplexity | perplexity_length | fidelity | fidelity_length | latency | longbench
    key: tuple
    cost: float

    def name(self, modes: list[Mode]) -> str:
        return "/".join([modes[self.mode].name, self.kind, *map(str, self.key)])


@dataclass
class Inputs:
    """What every mode is evaluated on (the same on every rank)."""

    task_sets: list  # [(task, length, [TaskSample])]
    ppl_windows: list[Window]
    ppl_meta: dict  # window, stride of the perplexity run
    fid_ids: torch.Tensor | None
    lat_ids: dict
    lb_sets: dict
    bos: list[int]
    ppl_by_length: dict = field(default_factory=dict)  # {L: [Window of exactly L tokens]} (perplexity.lengths)
    fid_by_length: dict = field(default_factory=dict)  # {L: ids [L]} (fidelity.lengths)


def plan_units(modes: list[Mode], inp: Inputs, cfg: dict) -> list[Unit]:
    """Every unit of the run in report order: per mode its samples, perplexity windows, fidelity,
    latency lengths, LongBench items."""
    lat = cfg["latency"]
    out = []
    for m in range(len(modes)):
        for t, (_task, _length, samples) in enumerate(inp.task_sets):
            out += [Unit(m, "sample", (t, i), s.n_tokens + 8.0 * s.tokens_to_generate) for i, s in enumerate(samples)]
        out += [Unit(m, "perplexity", (w,), float(len(win.seq))) for w, win in enumerate(inp.ppl_windows)]
        out += [Unit(m, "perplexity_length", (L, w), float(L)) for L, wins in inp.ppl_by_length.items()
                for w in range(len(wins))]
        if inp.fid_ids is not None:
            out.append(Unit(m, "fidelity", (), 2.0 * inp.fid_ids.numel()))
        out += [Unit(m, "fidelity_length", (L,), 2.0 * L) for L in inp.fid_by_length]
        out += [Unit(m, "latency", (L,), float(L * (lat["warmup"] + lat["repeats"]))) for L in inp.lat_ids]
        for ds, (items, max_new) in inp.lb_sets.items():
            out += [Unit(m, "longbench", (ds, i), len(ids) + 8.0 * max_new) for i, (_s, ids) in enumerate(items)]
    return out


def split_units(units: list[Unit], world: int) -> list[int]:
    """The rank of each unit. The fidelity units (every length) of all modes stay together on one
    rank, which then holds the dense / native references that the other modes are compared with."""
    fid = [i for i, u in enumerate(units) if u.kind.startswith("fidelity")]
    bundles = ([fid] if fid else []) + [[i] for i, u in enumerate(units) if not u.kind.startswith("fidelity")]
    owner = assign([sum(units[i].cost for i in b) for b in bundles], world)
    ranks = [0] * len(units)
    for bundle, rank in zip(bundles, owner):
        for i in bundle:
            ranks[i] = rank
    return ranks


def run(cfg: dict, loaded: Loaded | None = None) -> dict | None:
    """Evaluate the configured model in every configured mode; returns the results dict that
    `report.write_report` renders (mode names as keys throughout). Under torchrun / deepspeed
    (WORLD_SIZE > 1) the work units are split over the processes (`workshare`), rank 0 returns
    the results of the whole run and the other ranks return None.

        meta        config, model, device, versions, date, run time, haystack sources, world_size,
                    units_per_rank
        config      the resolved config
        modes       [{name, kind, reduce, description}]
        summary     {mode: {rel_budget, reduce_achieved, ruler_accuracy, ppl, mean_nll, kl_vs_native,
                    kl_vs_dense, attn_err_native_mean, attn_err_mean, latency_ms, latency_length,
                    longbench_avg}}
        tasks       {mode: {task: {length: RULER score in %}}}; samples: one dict per generation
        perplexity  {mode: {mean_nll, ppl, n_tokens, n_windows, window, stride}}
        perplexity_by_length {mode: {L: the same}}: the text in windows of exactly L tokens (perplexity.lengths)
        fidelity_by_length {mode: {L: {kl_vs_dense, kl_vs_native, attn_err_vs_dense, attn_err_vs_native}}}
        fidelity    {length, layer_error / layer_error_vs_native: {mode: [per layer]},
                    error_by_position(_vs_native): {mode: {position, rel_err}}, kl_vs_dense, kl_vs_native}
        budget      {mode: {seq_len, pairs, native_pairs, layers: [LayerStats dicts], positions, native, stem}}
        latency     {mode: {length: {ms, pairs, native_pairs}}}
        longbench   {mode: {dataset: score}}
        calibration {mode: Calibration dict}: the per-layer allocations of the "*_cal" modes
        notes       [str]: skipped tasks, modes not run, ...
    """
    t_start = time.perf_counter()
    team = join_team()
    res = _run(cfg, loaded, team, t_start)
    team.leave()  # not after an error: a rank that fails must not wait in a barrier for the others
    return res


def _run(cfg: dict, loaded: Loaded | None, team: Team, t_start: float) -> dict | None:
    if not team.is_main:  # rank 0 alone shows progress
        cfg = dict(cfg, runtime=dict(cfg["runtime"], progress=False))
    # model.parallel "tensor": every rank holds a shard and runs every unit together with the others
    split = Team() if cfg["model"]["parallel"] == "tensor" else team
    if cfg["runtime"]["threads"]:
        torch.set_num_threads(int(cfg["runtime"]["threads"]))
    torch.manual_seed(cfg["runtime"]["seed"])
    loaded = loaded or load_model(cfg)
    model, tok = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    n_layers = len(fid.attention_modules(model))
    modes = build_modes(cfg)
    stem_cfg = cfg["stem"]
    bos = [tok.bos_id] if cfg["tokenizer"]["add_bos"] and tok.bos_id is not None else []
    notes: list[str] = []

    inp = _inputs(cfg, tok, bos, notes)
    modes, calibrations = calibrate_modes(modes, model, tok, bos, device, cfg, notes, split)
    units = plan_units(modes, inp, cfg)
    ranks = split_units(units, split.world)
    mine = [i for i, r in enumerate(ranks) if r == split.rank]
    desc = "stem-boost compare" + (f" (rank 0's {len(mine)} of {len(units)} units)" if split.world > 1 else "")
    bar = _Progress(cfg["runtime"]["progress"], len(mine), desc)
    records, failed = _run_units(mine, units, modes, model, tok, device, n_layers, inp, cfg, bar)
    bar.close()
    gathered = split.gather((records, failed))
    if not team.is_main:
        return None
    records = {k: v for part, _ in gathered for k, v in part.items()}
    failed = {k: v for _, part in gathered for k, v in part.items()}

    res: dict = dict(
        meta=dict(
            config_name=cfg["name"], config_source=cfg["_source"], config_arg=cfg["_arg"], overrides=cfg["_overrides"],
            description=cfg["description"], model=loaded.description, random_weights=loaded.random_weights,
            model_class=type(model).__name__, n_layers=n_layers, tokenizer=getattr(tok, "name", type(tok).__name__),
            device=str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                                  f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"),
            world_size=team.world, parallel=cfg["model"]["parallel"],
            units_per_rank=[ranks.count(r) if split.world > 1 else len(units) for r in range(team.world)],
            dtype=str(next(model.parameters()).dtype).replace("torch.", ""), torch=torch.__version__,
            transformers=_version("transformers"), stem_boost=__version__,
            date=_dt.datetime.now().isoformat(timespec="seconds"),
            haystack_sources=haystack_sources(cfg["tasks"]["haystack"]),
        ),
        config={k: v for k, v in cfg.items() if not k.startswith("_")},
        modes=[dict(name=m.name, kind=m.kind, reduce=m.reduce, description=m.describe(stem_cfg)) for m in modes],
        tasks={}, samples=[], perplexity={}, perplexity_by_length={}, fidelity_by_length={},
        fidelity=dict(length=None, layer_error={}, error_by_position={}, layer_error_vs_native={},
                      error_by_position_vs_native={}, kl_vs_dense={}, kl_vs_native={}),
        budget={}, latency={}, longbench={}, summary={}, calibration=calibrations, notes=notes,
    )
    for m, note in sorted(failed.items()):
        notes.append(note)
    _assemble(res, modes, units, records, set(failed), inp)
    _summarize(res, [m for i, m in enumerate(modes) if i not in failed])
    res["meta"]["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    return res


def _inputs(cfg: dict, tok, bos: list[int], notes: list[str]) -> Inputs:
    task_sets = []
    if cfg["tasks"]["enabled"]:
        for task in cfg["tasks"]["names"]:
            for length in cfg["tasks"]["lengths"]:
                try:
                    samples = generate_task(task, length, cfg["tasks"]["samples"], tok, seed=cfg["tasks"]["seed"],
                                            tokens_to_generate=cfg["tasks"]["max_new_tokens"],
                                            haystack=cfg["tasks"]["haystack"])
                except TextFileError:
                    raise  # the user's haystack file: an error, never a silently skipped task
                except ValueError as e:
                    notes.append(f"task {task} at {length} tokens skipped: {e}")
                    continue
                task_sets.append((task, length, samples))
    ppl_cfg = cfg["perplexity"]
    windows, ppl_meta, ppl_by_length = [], {}, {}
    if ppl_cfg["enabled"]:
        ids = _text_ids(tok, ppl_cfg["offset_chars"], ppl_cfg["length"], ppl_cfg["text"], "perplexity.text")
        window = ppl_cfg["window"] or ppl_cfg["length"]
        windows, stride = plan_windows(ids, window=window, stride=ppl_cfg["stride"], bos_id=bos[0] if bos else None)
        ppl_meta = dict(window=window, stride=stride)
        ppl_by_length = {L: length_windows(ids, L, bos) for L in ppl_cfg["lengths"]}
    fid_cfg = cfg["fidelity"]
    fid_ids = (torch.tensor(bos + _text_ids(tok, fid_cfg["offset_chars"], fid_cfg["length"] - len(bos),
                                            fid_cfg["text"], "fidelity.text"))
               if fid_cfg["enabled"] else None)
    fid_by_length = ({L: torch.tensor(bos + _text_ids(tok, fid_cfg["offset_chars"], L - len(bos), fid_cfg["text"],
                                                      "fidelity.text")) for L in fid_cfg["lengths"]}
                     if fid_cfg["enabled"] else {})
    lat_cfg = cfg["latency"]
    lat_ids = {L: torch.tensor(_text_ids(tok, 0, L)) for L in lat_cfg["lengths"]} if lat_cfg["enabled"] else {}
    return Inputs(task_sets=task_sets, ppl_windows=windows, ppl_meta=ppl_meta, fid_ids=fid_ids, lat_ids=lat_ids,
                  lb_sets=_longbench_inputs(cfg, tok, notes), bos=bos, ppl_by_length=ppl_by_length,
                  fid_by_length=fid_by_length)


def length_windows(ids: list[int], L: int, bos: list[int]) -> list[Window]:
    """``ids`` cut into consecutive windows of exactly ``L`` tokens (BOS included when the model has
    one; a shorter tail is dropped), each scoring every token after its first position."""
    windows, _ = plan_windows(ids, window=L, stride=L - len(bos), bos_id=bos[0] if bos else None)
    return [w for w in windows if len(w.seq) == L]


def _run_units(mine: list[int], units: list[Unit], modes: list[Mode], model, tok, device, n_layers: int,
               inp: Inputs, cfg: dict, bar) -> tuple[dict, dict]:
    """Run this rank's units, mode by mode: ({unit index: result}, {mode index: why it did not run})."""
    records, failed, refs = {}, {}, {}
    for m, mode in enumerate(modes):
        todo = [i for i in mine if units[i].mode == m]
        if not todo:
            continue
        ctx = use_mode(model, mode, cfg["stem"])
        try:
            ctx.__enter__()
        except (NotImplementedError, ValueError) as e:  # the mode is not available for this model
            failed[m] = f"mode {mode.name} not run: {type(e).__name__}: {e}"
            continue
        try:
            for i in todo:
                u = units[i]
                seed_unit(cfg["runtime"]["seed"], u.name(modes))
                _clear_stats(model)
                records[i] = _run_unit(u, mode, model, tok, device, n_layers, inp, cfg, refs)
                bar.step(f"{mode.name} {u.kind}")
        finally:
            ctx.__exit__(None, None, None)
    return records, failed


def _run_unit(u: Unit, mode: Mode, model, tok, device, n_layers: int, inp: Inputs, cfg: dict, refs: dict):
    """The result of one unit (plain Python, tensors on the CPU: it travels to rank 0)."""
    if u.kind == "sample":
        s = inp.task_sets[u.key[0]][2][u.key[1]]
        ids = inp.bos + tok.encode(s.prompt)
        pred, secs = _generate(model, ids, s.tokens_to_generate, tok, device)
        pairs, native = _pairs(model, mode, len(ids), n_layers)
        return dict(pred=pred, n_tokens=len(ids), pairs=pairs, native_pairs=native, seconds=round(secs, 4))
    if u.kind == "perplexity":
        return window_nll(model, inp.ppl_windows[u.key[0]])
    if u.kind == "perplexity_length":
        return window_nll(model, inp.ppl_by_length[u.key[0]][u.key[1]])
    if u.kind == "fidelity":
        return _fidelity(mode, model, n_layers, inp.fid_ids, cfg["fidelity"], refs)
    if u.kind == "fidelity_length":
        return _kl_at_length(mode, model, inp.fid_by_length[u.key[0]], cfg["fidelity"], refs)
    if u.kind == "latency":
        return _latency(mode, model, device, n_layers, u.key[0], inp.lat_ids[u.key[0]], cfg["latency"])
    if u.kind == "longbench":
        items, max_new = inp.lb_sets[u.key[0]]
        return _generate(model, inp.bos + items[u.key[1]][1], max_new, tok, device)[0]
    raise ValueError(f"unit kind {u.kind!r}")


def _fidelity(mode: Mode, model, n_layers: int, fid_ids: torch.Tensor, fid_cfg: dict, refs: dict) -> dict:
    """Fidelity against the dense / native captures (made earlier in this bundle) and the budget."""
    cap = fid.capture(model, fid_ids, max_rows=fid_cfg["max_rows"])
    if mode.kind in ("dense", "native"):
        refs[mode.kind] = cap
    out: dict = {}
    if "dense" in refs:
        out.update(layer_error=fid.layer_errors(cap, refs["dense"]),
                   error_by_position=fid.error_by_position(cap, refs["dense"]),
                   kl_vs_dense=fid.kl_divergence(refs["dense"], cap))
    if "native" in refs:
        out.update(kl_vs_native=fid.kl_divergence(refs["native"], cap),
                   layer_error_vs_native=fid.layer_errors(cap, refs["native"]),
                   error_by_position_vs_native=fid.error_by_position(cap, refs["native"]))
    pairs, native = _pairs(model, mode, int(fid_ids.numel()), n_layers)
    entry = dict(seq_len=int(fid_ids.numel()), pairs=pairs, native_pairs=native)
    if mode.kind != "dense" and _recorded(model):
        entry.update(fid.budget_traces(model))
    return dict(out, budget=entry)


def _kl_at_length(mode: Mode, model, ids: torch.Tensor, fid_cfg: dict, refs: dict) -> dict:
    """Next-token KL (and the mean attention-output error) against the dense / native captures of
    the same ``ids`` (made earlier in this bundle): one row of the per-length table."""
    cap = fid.capture(model, ids, max_rows=fid_cfg["max_rows"])
    L = int(ids.numel())
    if mode.kind in ("dense", "native"):
        refs[(mode.kind, L)] = cap
    out: dict = {}
    for ref in ("dense", "native"):
        if (ref, L) in refs:
            errs = fid.layer_errors(cap, refs[(ref, L)])
            out[f"kl_vs_{ref}"] = fid.kl_divergence(refs[(ref, L)], cap)
            out[f"attn_err_vs_{ref}"] = sum(errs) / len(errs) if errs else None
    return out


@torch.no_grad()
def _latency(mode: Mode, model, device, n_layers: int, L: int, ids: torch.Tensor, lat_cfg: dict) -> dict:
    x = ids.reshape(1, -1).to(device)
    times = []
    for i in range(lat_cfg["warmup"] + lat_cfg["repeats"]):
        _sync(device)
        t0 = time.perf_counter()
        model(input_ids=x, use_cache=False)
        _sync(device)
        if i >= lat_cfg["warmup"]:
            times.append(time.perf_counter() - t0)
    pairs, native = _pairs(model, mode, L, n_layers)
    return dict(ms=1000 * statistics.median(times), pairs=pairs, native_pairs=native)


def _assemble(res: dict, modes: list[Mode], units: list[Unit], records: dict, failed: set[int], inp: Inputs) -> None:
    """Fill ``res`` from the units' results, in report order (the order of a one-process run)."""
    by_mode: dict[int, list[int]] = {}
    for i, u in enumerate(units):
        if u.mode not in failed:
            by_mode.setdefault(u.mode, []).append(i)
    for m, idx in sorted(by_mode.items()):
        name = modes[m].name
        preds: dict[int, list] = {}
        ppl_parts, lat, lbs, by_length = [], {}, {}, {}
        for i in idx:
            u, r = units[i], records[i]
            if u.kind == "sample":
                task, length, samples = inp.task_sets[u.key[0]]
                s = samples[u.key[1]]
                preds.setdefault(u.key[0], []).append(postprocess_pred(r["pred"]))
                res["samples"].append(dict(mode=name, task=task, length=length, index=s.index, n_tokens=r["n_tokens"],
                                           outputs=s.outputs, pred=r["pred"],
                                           score=score_sample(r["pred"], s.outputs, s.metric), pairs=r["pairs"],
                                           native_pairs=r["native_pairs"], seconds=r["seconds"]))
            elif u.kind == "perplexity":
                ppl_parts.append(r)
            elif u.kind == "perplexity_length":
                by_length.setdefault(u.key[0], []).append(r)
            elif u.kind == "fidelity_length":
                res["fidelity_by_length"].setdefault(name, {})[str(u.key[0])] = r
            elif u.kind == "fidelity":
                res["fidelity"]["length"] = int(inp.fid_ids.numel())
                for key, value in r.items():
                    if key == "budget":
                        res["budget"][name] = value
                    else:
                        res["fidelity"][key][name] = value
            elif u.kind == "latency":
                lat[str(u.key[0])] = r
            elif u.kind == "longbench":
                lbs.setdefault(u.key[0], []).append(r)
        per_task: dict = {}
        for t, p in preds.items():
            task, length, samples = inp.task_sets[t]
            per_task.setdefault(task, {})[str(length)] = METRICS[samples[0].metric](p, [s.outputs for s in samples])
        res["tasks"][name] = per_task
        if ppl_parts:
            res["perplexity"][name] = combine(ppl_parts, **inp.ppl_meta).to_dict()
        if by_length:
            res["perplexity_by_length"][name] = {str(L): combine(parts, window=L, stride=L).to_dict()
                                                 for L, parts in by_length.items()}
        res["latency"][name] = lat
        if lbs:
            res["longbench"][name] = {
                ds: lb.scorer(ds, p, [s.answers for s, _ in inp.lb_sets[ds][0]], inp.lb_sets[ds][0][0][0].all_classes)
                for ds, p in lbs.items()}


def _version(pkg: str) -> str:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:  # pragma: no cover
        return "?"


def _longbench_inputs(cfg: dict, tok, notes: list[str]) -> dict:
    lbc = cfg["longbench"]
    if not lbc["path"]:
        return {}
    import json
    from pathlib import Path

    data = lb.load_dir(lbc["path"], lbc["datasets"] or None, max_samples=lbc["max_samples"])
    prompts = json.loads(Path(lbc["prompt_file"]).read_text()) if lbc["prompt_file"] else {}
    maxlen = json.loads(Path(lbc["maxlen_file"]).read_text()) if lbc["maxlen_file"] else {}
    out = {}
    for name, samples in data.items():
        try:
            lb.metric_for(name)
        except (NotImplementedError, ValueError) as e:
            notes.append(f"LongBench {name} skipped: {e}")
            continue
        items = []
        for s in samples:
            ids = tok.encode(lb.build_prompt(s, prompts.get(name.removesuffix("_e"))))
            if lbc["max_length"] and len(ids) > lbc["max_length"]:  # LongBench truncates in the middle
                half = lbc["max_length"] // 2
                ids = ids[:half] + ids[-half:]
            items.append((s, ids))
        out[name] = (items, int(maxlen.get(name.removesuffix("_e"), lbc["max_new_tokens"])))
    return out


@torch.no_grad()
def _generate(model, ids: list[int], max_new: int, tok, device) -> tuple[str, float]:
    x = torch.tensor([ids], device=device)
    pad = tok.eos_id if tok.eos_id is not None else getattr(model.config, "pad_token_id", None) or 0
    _sync(device)
    t0 = time.perf_counter()
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                         pad_token_id=pad, eos_token_id=tok.eos_id, use_cache=True)
    _sync(device)
    return tok.decode(out[0, x.shape[1]:].tolist()), time.perf_counter() - t0


def _summarize(res: dict, modes: list[Mode]) -> None:
    """One row per mode: the numbers the report's first table shows."""
    native_budget = res["budget"].get("native", {}).get("pairs")
    for mode in modes:
        name = mode.name
        if name not in res["tasks"] and name not in res["budget"] and name not in res["latency"]:
            continue  # the mode failed
        row: dict = dict(kind=mode.kind, reduce_requested=mode.reduce)
        scores = [v for per_len in res["tasks"].get(name, {}).values() for v in per_len.values()]
        row["ruler_accuracy"] = round(sum(scores) / len(scores), 2) if scores else None
        pr = res["perplexity"].get(name)
        row["ppl"] = pr["ppl"] if pr else None
        row["mean_nll"] = pr["mean_nll"] if pr else None
        b = res["budget"].get(name, {})
        ref = b.get("native_pairs") or native_budget
        row["rel_budget"] = b["pairs"] / ref if b.get("pairs") is not None and ref else None
        row["reduce_achieved"] = (1.0 - row["rel_budget"] if row["rel_budget"] is not None and mode.kind != "dense"
                                  else None)
        row["kl_vs_dense"] = res["fidelity"]["kl_vs_dense"].get(name)
        row["kl_vs_native"] = res["fidelity"]["kl_vs_native"].get(name)
        for key, src in (("attn_err_mean", "layer_error"), ("attn_err_native_mean", "layer_error_vs_native")):
            errs = res["fidelity"][src].get(name)
            row[key] = sum(errs) / len(errs) if errs else None
        lat = res["latency"].get(name, {})
        if lat:
            longest = max(lat, key=int)
            row["latency_length"] = int(longest)
            row["latency_ms"] = lat[longest]["ms"]
        lbs = res["longbench"].get(name)
        row["longbench_avg"] = round(sum(lbs.values()) / len(lbs), 2) if lbs else None
        for k, v in list(row.items()):
            if isinstance(v, float) and not math.isfinite(v):
                row[k] = None
        res["summary"][name] = row

