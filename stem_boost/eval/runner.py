"""Evaluate one model in up to five modes side by side and return a results dict.

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
With several `stem.reduce` values the three Stem modes run once per value ("stem@0.15", ...).

Per mode: RULER-style tasks (greedy generation, RULER's scoring), perplexity on English text,
fidelity against dense / native (per-layer attention-output error, next-token KL), the budget
per layer and per query position, prefill latency, and LongBench when files are configured.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import platform
import statistics
import time
from dataclasses import dataclass, replace

import torch

from .. import __version__
from ..api import is_wrapped, stats, unwrap, wrap
from . import fidelity as fid
from . import longbench as lb
from .perplexity import perplexity
from .tasks import METRICS, english_text, generate_task, postprocess_pred, score_sample, text_source
from .tokenizers import ByteTokenizer, HFTokenizer

__all__ = ["Mode", "build_modes", "load_model", "run"]


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
        kw = dict(common, reduce=self.reduce, beta=beta, schedule=schedule)
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
        return f"{what}: reduce={kw['reduce']:g} beta={kw['beta']:g} schedule={kw['schedule']}"


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


def _pairs(model: torch.nn.Module, mode: Mode, seq_len: int, n_layers: int) -> tuple[int | None, int | None]:
    """(attended pairs, native pairs) of the last prefill; dense: the causal pairs, native unknown.
    InfLLMv2 counts (query token, key block) pairs per kv head without the forced blocks (the
    `reduce` contract's unit), so its dense count is made in that unit too."""
    if mode.kind == "dense":
        sparse = getattr(model, "_dense_mode_sparse_config", None) or getattr(model.config, "sparse_config", None)
        if sparse is None:
            return n_layers * seq_len * (seq_len + 1) // 2, None
        from ..models.minicpm4.infllmv2 import InfLLMv2Params
        from ..tpd import block_available

        p = InfLLMv2Params.from_sparse_config(dict(sparse))
        avail = block_available(seq_len, -(-seq_len // p.block_size), query_block=1, block_size=p.block_size,
                                n_init=p.init_blocks, n_local=p.local_blocks + 1, seq_q=seq_len)
        return n_layers * model.config.num_key_value_heads * int(avail.sum()), None
    st = stats(model)
    return st["stem_pairs"], st["native_pairs"]


def _text_ids(tokenizer, offset: int, n_tokens: int, source: str = "english") -> list[int]:
    """The first ``n_tokens`` tokens of the text ``source`` from character ``offset`` (never
    repeated: a text too short for the request is an error)."""
    text = text_source(source)
    if not 0 <= offset < len(text):
        raise ValueError(f"offset_chars={offset} is outside the text {source!r} ({len(text)} characters)")
    chars = max(64, n_tokens * 8)
    while True:
        ids = tokenizer.encode(text[offset:offset + chars])
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
        if offset + chars >= len(text):
            raise ValueError(f"the text {source!r} from character {offset} has {len(ids)} tokens; "
                             f"{n_tokens} were asked for (lower the length or the offset)")
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
                    notes: list[str]) -> tuple[list[Mode], dict]:
    """The modes with each "*_cal" mode's `layer_reduce` measured by `stem_boost.calibrate` on the
    `calibration` section's text (never the evaluation text) for that mode's knobs and reduce, and
    {mode name: Calibration dict}. A mode whose calibration fails is dropped with a note."""
    from ..calibrate import calibrate

    cal_cfg = cfg["calibration"]
    if not any(m.kind.endswith("_cal") for m in modes):
        return modes, {}
    text = text_source(cal_cfg["text"])
    lengths = cal_cfg["lengths"] or sorted(set(cfg["tasks"]["lengths"]))
    inputs = [torch.tensor([bos + _text_ids(tok, i * len(text) // (cal_cfg["windows"] + 1), L - len(bos),
                                            cal_cfg["text"])], device=device)
              for L in lengths for i in range(cal_cfg["windows"])]
    out, cals = [], {}
    for mode in modes:
        if not mode.kind.endswith("_cal"):
            out.append(mode)
            continue
        kw = mode.uncalibrated().wrap_kwargs(cfg["stem"])
        kw.pop("reduce")
        try:
            cal = calibrate(model, inputs, mode.reduce, objective=cal_cfg["objective"],
                            progress=cfg["runtime"]["progress"], **kw)
        except (NotImplementedError, ValueError) as e:
            notes.append(f"mode {mode.name} not run: calibration failed: {type(e).__name__}: {e}")
            continue
        cals[mode.name] = dict(cal.to_dict(), text=cal_cfg["text"], lengths=lengths, windows=cal_cfg["windows"])
        out.append(replace(mode, layer_reduce=cal.layer_reduce))
    return out, cals


def run(cfg: dict, loaded: Loaded | None = None) -> dict:
    """Evaluate the configured model in every configured mode; returns the results dict that
    `report.write_report` renders (mode names as keys throughout):

        meta        config, model, device, versions, date, run time, haystack sources
        config      the resolved config
        modes       [{name, kind, reduce, description}]
        summary     {mode: {rel_budget, reduce_achieved, ruler_accuracy, ppl, mean_nll, kl_vs_native,
                    kl_vs_dense, attn_err_native_mean, attn_err_mean, latency_ms, latency_length,
                    longbench_avg}}
        tasks       {mode: {task: {length: RULER score in %}}}; samples: one dict per generation
        perplexity  {mode: {mean_nll, ppl, n_tokens, n_windows, window, stride}}
        fidelity    {length, layer_error / layer_error_vs_native: {mode: [per layer]},
                    error_by_position(_vs_native): {mode: {position, rel_err}}, kl_vs_dense, kl_vs_native}
        budget      {mode: {seq_len, pairs, native_pairs, layers: [LayerStats dicts], positions, native, stem}}
        latency     {mode: {length: {ms, pairs, native_pairs}}}
        longbench   {mode: {dataset: score}}
        calibration {mode: Calibration dict}: the per-layer allocations of the "*_cal" modes
        notes       [str]: skipped tasks, modes not run, ...
    """
    t_start = time.perf_counter()
    if cfg["runtime"]["threads"]:
        torch.set_num_threads(int(cfg["runtime"]["threads"]))
    torch.manual_seed(cfg["runtime"]["seed"])
    loaded = loaded or load_model(cfg)
    model, tok = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    n_layers = len(fid.attention_modules(model))
    modes = build_modes(cfg)
    stem_cfg = cfg["stem"]
    progress = cfg["runtime"]["progress"]
    bos = [tok.bos_id] if cfg["tokenizer"]["add_bos"] and tok.bos_id is not None else []
    notes: list[str] = []

    # ---- inputs shared by all modes
    task_sets = []
    if cfg["tasks"]["enabled"]:
        for task in cfg["tasks"]["names"]:
            for length in cfg["tasks"]["lengths"]:
                try:
                    samples = generate_task(task, length, cfg["tasks"]["samples"], tok, seed=cfg["tasks"]["seed"],
                                            tokens_to_generate=cfg["tasks"]["max_new_tokens"])
                except ValueError as e:
                    notes.append(f"task {task} at {length} tokens skipped: {e}")
                    continue
                task_sets.append((task, length, samples))
    ppl_cfg = cfg["perplexity"]
    ppl_ids = (_text_ids(tok, ppl_cfg["offset_chars"], ppl_cfg["length"], ppl_cfg["text"])
               if ppl_cfg["enabled"] else None)
    fid_cfg = cfg["fidelity"]
    fid_ids = (torch.tensor(bos + _text_ids(tok, fid_cfg["offset_chars"], fid_cfg["length"] - len(bos), fid_cfg["text"]))
               if fid_cfg["enabled"] else None)
    lat_cfg = cfg["latency"]
    lat_ids = {L: torch.tensor(_text_ids(tok, 0, L)) for L in lat_cfg["lengths"]} if lat_cfg["enabled"] else {}
    lb_sets = _longbench_inputs(cfg, tok, notes)
    modes, calibrations = calibrate_modes(modes, model, tok, bos, device, cfg, notes)

    res: dict = dict(
        meta=dict(
            config_name=cfg["name"], config_source=cfg["_source"], config_arg=cfg["_arg"], overrides=cfg["_overrides"],
            description=cfg["description"], model=loaded.description, random_weights=loaded.random_weights,
            model_class=type(model).__name__, n_layers=n_layers, tokenizer=getattr(tok, "name", type(tok).__name__),
            device=str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                                  f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"),
            dtype=str(next(model.parameters()).dtype).replace("torch.", ""), torch=torch.__version__,
            transformers=_version("transformers"), stem_boost=__version__,
            date=_dt.datetime.now().isoformat(timespec="seconds"), haystack_sources=list(english_text()[1]),
        ),
        config={k: v for k, v in cfg.items() if not k.startswith("_")},
        modes=[dict(name=m.name, kind=m.kind, reduce=m.reduce, description=m.describe(stem_cfg)) for m in modes],
        tasks={}, samples=[], perplexity={},
        fidelity=dict(length=None, layer_error={}, error_by_position={}, layer_error_vs_native={},
                      error_by_position_vs_native={}, kl_vs_dense={}, kl_vs_native={}),
        budget={}, latency={}, longbench={}, summary={}, calibration=calibrations, notes=notes,
    )
    refs: dict[str, fid.Capture] = {}
    n_work = len(modes) * (sum(len(s) for _, _, s in task_sets) + (ppl_ids is not None) + (fid_ids is not None)
                           + len(lat_ids) + sum(len(v) for v in lb_sets.values()))
    bar = _Progress(progress, n_work, "stem-boost compare")
    for mode in modes:
        ctx = use_mode(model, mode, stem_cfg)
        try:
            ctx.__enter__()
        except (NotImplementedError, ValueError) as e:  # the mode is not available for this model
            notes.append(f"mode {mode.name} not run: {type(e).__name__}: {e}")
            continue
        try:
            _run_mode(res, mode, model, tok, bos, device, n_layers, task_sets, ppl_ids, ppl_cfg, fid_ids,
                      fid_cfg, lat_ids, lat_cfg, lb_sets, refs, bar)
        finally:
            ctx.__exit__(None, None, None)
    bar.close()
    _summarize(res, modes)
    res["meta"]["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    return res


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


def _run_mode(res, mode, model, tok, bos, device, n_layers, task_sets, ppl_ids, ppl_cfg, fid_ids, fid_cfg,
              lat_ids, lat_cfg, lb_sets, refs, bar) -> None:
    name = mode.name
    # ---- RULER-style tasks
    per_task: dict = {}
    for task, length, samples in task_sets:
        preds, refs_out = [], []
        for s in samples:
            ids = bos + tok.encode(s.prompt)
            pred, secs = _generate(model, ids, s.tokens_to_generate, tok, device)
            pairs, native = _pairs(model, mode, len(ids), n_layers)
            preds.append(postprocess_pred(pred))
            refs_out.append(s.outputs)
            res["samples"].append(dict(mode=name, task=task, length=length, index=s.index, n_tokens=len(ids),
                                       outputs=s.outputs, pred=pred, score=score_sample(pred, s.outputs, s.metric),
                                       pairs=pairs, native_pairs=native, seconds=round(secs, 4)))
            bar.step(f"{name} {task}@{length}")
        per_task.setdefault(task, {})[str(length)] = METRICS[samples[0].metric](preds, refs_out)
    res["tasks"][name] = per_task

    # ---- perplexity
    if ppl_ids is not None:
        window = ppl_cfg["window"] or ppl_cfg["length"]
        bos_id = bos[0] if bos else None
        pr = perplexity(model, ppl_ids, window=window, stride=ppl_cfg["stride"], bos_id=bos_id)
        res["perplexity"][name] = pr.to_dict()
        bar.step(f"{name} perplexity")

    # ---- fidelity + budgets
    if fid_ids is not None:
        cap = fid.capture(model, fid_ids, max_rows=fid_cfg["max_rows"])
        res["fidelity"]["length"] = int(fid_ids.numel())
        if mode.kind in ("dense", "native"):
            refs[mode.kind] = cap
        if "dense" in refs:
            res["fidelity"]["layer_error"][name] = fid.layer_errors(cap, refs["dense"])
            res["fidelity"]["error_by_position"][name] = fid.error_by_position(cap, refs["dense"])
            res["fidelity"]["kl_vs_dense"][name] = fid.kl_divergence(refs["dense"], cap)
        if "native" in refs:
            res["fidelity"]["kl_vs_native"][name] = fid.kl_divergence(refs["native"], cap)
            res["fidelity"]["layer_error_vs_native"][name] = fid.layer_errors(cap, refs["native"])
            res["fidelity"]["error_by_position_vs_native"][name] = fid.error_by_position(cap, refs["native"])
        pairs, native = _pairs(model, mode, int(fid_ids.numel()), n_layers)
        entry = dict(seq_len=int(fid_ids.numel()), pairs=pairs, native_pairs=native)
        if mode.kind != "dense":
            entry.update(fid.budget_traces(model))
        res["budget"][name] = entry
        bar.step(f"{name} fidelity")

    # ---- prefill latency
    lat = {}
    for L, ids in lat_ids.items():
        x = ids.reshape(1, -1).to(device)
        times = []
        with torch.no_grad():
            for i in range(lat_cfg["warmup"] + lat_cfg["repeats"]):
                _sync(device)
                t0 = time.perf_counter()
                model(input_ids=x, use_cache=False)
                _sync(device)
                if i >= lat_cfg["warmup"]:
                    times.append(time.perf_counter() - t0)
        pairs, native = _pairs(model, mode, L, n_layers)
        lat[str(L)] = dict(ms=1000 * statistics.median(times), pairs=pairs, native_pairs=native)
        bar.step(f"{name} latency@{L}")
    res["latency"][name] = lat

    # ---- LongBench
    if lb_sets:
        out = {}
        for ds, (items, max_new) in lb_sets.items():
            preds = []
            for s, ids in items:
                pred, _ = _generate(model, bos + ids, max_new, tok, device)
                preds.append(pred)
                bar.step(f"{name} {ds}")
            out[ds] = lb.scorer(ds, preds, [s.answers for s, _ in items], items[0][0].all_classes)
        res["longbench"][name] = out


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

