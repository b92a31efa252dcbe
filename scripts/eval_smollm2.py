#!/usr/bin/env python
"""Dense vs native sparse vs Stem (and its two ablations) on the SmolLM2-135M testbeds.

    python scripts/eval_smollm2.py --lengths 2048 4096 8192 --samples 8 --out reports/smollm2_eval.json  # GPU
    python scripts/eval_smollm2.py --family infllmv2 --lengths 2048 4096 8192 --samples 8   # InfLLMv2, reduce 0.18
    python scripts/eval_smollm2.py --lengths 2048 --samples 2 --threads 1                                # CPU (slow)

Families (--family):
  dsa       SmolLM2 + the trained lightning indexers (`testbeds.smollm2_dsa`), native budget
            --index-topk tokens per query; Stem default reduce 0.15
  infllmv2  SmolLM2 in the native MiniCPM-4.1 class with training-free InfLLMv2
            (`testbeds.smollm2_infllmv2`; --topk blocks of 64 per query); Stem default reduce 0.18
Variants:
  dense     the original model (SDPA, every causal key)
  native    the native sparse model: the indexer's top-k keys / InfLLMv2's top-k blocks per query
  stem      stem_boost.wrap(reduce=r): OAM (beta 0.2) + TPD over the native candidates
  uniform   the TPD-off ablation at Stem's budget: schedule="uniform", OAM kept
  no_oam    the OAM-off ablation at Stem's budget: beta=0, TPD kept
  mass      this project's variant at Stem's budget: schedule="mass" (the cut goes to the pairs
            with the lowest probability the native scores predict; `stem_boost.mass`), OAM kept
  stem_cal  Stem with a calibrated per-layer allocation of the same model-wide reduce
  mass_cal  mass with a calibrated per-layer allocation (`stem_boost.calibrate`): measured once
            per run on --cal-windows windows of the *training* text (pydoc topics not held out)
            at each of --cal-lengths (default: the evaluated lengths), one allocation for all
            lengths, kept in --cal-dir (the package ships the SmolLM2 ones) and in the JSON
Metrics per sequence length:
  ppl / nll          held-out text (pydoc_data held-out topics, then the Debian licenses if
                     present), --samples windows of exactly L tokens, next-token NLL at every position
  kl_vs_dense        mean over positions of KL(p_dense || p_variant) of the next-token distribution
  niah_acc           needle in a haystack: "The special magic number for <key> is <7 digits>." at a
                     random depth of L tokens of held-out text, question at the end, greedy decode
                     --niah-tokens tokens, exact match = the 7 digits appear in the answer
  niah_answer_nll    teacher-forced: mean NLL of the answer tokens (" " + digits) after the prompt,
  niah_answer_token_acc  and the fraction of them the argmax gets right (graded NIAH signals)
  reduce_achieved    1 - attended pairs / native pairs (from stem_boost.stats; 0 for native;
                     InfLLMv2: budgeted blocks, forced init / local blocks excluded, as the contract)
  pair_fraction      attended (query, key) pairs / dense causal pairs, all layers (InfLLMv2:
                     selected blocks x block size, forced blocks included, an upper bound near
                     the diagonal)
Decode steps of the Stem variants keep the native selection (stem_boost's rule); the prefill is
where they differ. Results go to --out as JSON (rewritten after each length).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import stem_boost  # noqa: E402
from stem_boost.config import StemConfig  # noqa: E402
from stem_boost.eval.runner import Mode  # noqa: E402
from stem_boost.testbeds import _corpus  # noqa: E402
from stem_boost.testbeds import smollm2_dsa as sd  # noqa: E402
from stem_boost.testbeds import smollm2_infllmv2 as si  # noqa: E402
from stem_boost.testbeds.smollm2 import load_smollm2  # noqa: E402

VARIANTS = ("dense", "native", "stem", "uniform", "no_oam", "mass", "stem_cal", "mass_cal")
DEFAULT_VARIANTS = VARIANTS[:6]
NEEDLE = "The special magic number for {key} is {value}."
QUESTION = "What is the special magic number for {key} mentioned in the provided text? " \
           "The special magic number for {key} mentioned in the provided text is"
KEYS = ["lavender-harbor", "quiet-meadow", "copper-lantern", "silver-orchard", "amber-canyon", "velvet-glacier",
        "crimson-falcon", "hidden-lighthouse", "marble-summit", "golden-river"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--samples", type=int, default=4, help="perplexity windows and NIAH prompts per length")
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    ap.add_argument("--cal-windows", type=int, default=2, help="calibration windows per length (*_cal variants)")
    ap.add_argument("--cal-lengths", type=int, nargs="+", default=None,
                    help="calibration window lengths (*_cal variants; default: --lengths)")
    ap.add_argument("--cal-dir", default=str(Path(stem_boost.__file__).parent / "data" / "calibration"),
                    help="where the *_cal allocations are read from / written to")
    ap.add_argument("--cal-objective", choices=["layer", "logits", "nll"], nargs="+", default=["layer"],
                    help="calibration objective (stem_boost.calibrate): per-layer output error, next-token KL "
                         "or change of the next-token loss; several full-forward ones (logits nll) only with "
                         "--calibrate-only: measured from the same forwards, one file each")
    ap.add_argument("--cal-dtype", choices=["model", "float32"], default="model",
                    help="dtype of the weights while calibrating (float32: resolves the full-forward objectives "
                         "below bf16 rounding noise; the evaluation keeps --dtype)")
    ap.add_argument("--cal-grid", type=float, nargs="+", default=None,
                    help="calibration grid of cuts (default: stem_boost.calibrate.DEFAULT_GRID)")
    ap.add_argument("--recalibrate", action="store_true", help="measure the allocations even if --cal-dir has them")
    ap.add_argument("--calibrate-only", action="store_true", help="write the *_cal allocations and stop")
    ap.add_argument("--family", choices=["dsa", "infllmv2"], default="dsa")
    ap.add_argument("--reduce", type=float, default=None, help="default: 0.15 (dsa), 0.18 (infllmv2)")
    ap.add_argument("--beta", type=float, default=0.2)
    ap.add_argument("--index-topk", type=int, default=sd.DEFAULT_INDEX_TOPK)
    ap.add_argument("--topk", type=int, default=None,
                    help=f"infllmv2: top-k blocks per query (default {si.SPARSE['topk']})")
    ap.add_argument("--indexer", default="trained", help='"trained", "random" or a safetensors path')
    ap.add_argument("--niah-tokens", type=int, default=10)
    ap.add_argument("--no-niah", action="store_true")
    ap.add_argument("--no-ppl", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lm-chunk", type=int, default=1024, help="positions per lm_head chunk")
    ap.add_argument("--out", default="reports/smollm2_eval.json")
    return ap.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
def heldout_ids(tok) -> torch.Tensor:
    """pydoc held-out topics, then the licenses (when present): one token stream."""
    texts = _corpus.heldout_texts()
    return torch.tensor(tok.encode("\n\n".join(texts.values()), add_special_tokens=False))


def ppl_windows(ids: torch.Tensor, L: int, n: int) -> list[torch.Tensor]:
    if ids.numel() < L:
        raise ValueError(f"held-out text has {ids.numel()} tokens < {L}")
    starts = torch.linspace(0, ids.numel() - L, n).long().tolist()
    return [ids[s:s + L].unsqueeze(0) for s in starts]


def niah_prompts(tok, hay: torch.Tensor, L: int, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed * 1000 + L)
    out = []
    for _ in range(n):
        key, value = rng.choice(KEYS), str(rng.randint(1_000_000, 9_999_999))
        needle = tok.encode("\n" + NEEDLE.format(key=key, value=value) + "\n", add_special_tokens=False)
        question = tok.encode("\n\n" + QUESTION.format(key=key), add_special_tokens=False)
        n_hay = L - len(needle) - len(question)
        start = rng.randint(0, hay.numel() - n_hay)
        h = hay[start:start + n_hay].tolist()
        depth = rng.uniform(0.05, 0.95)
        pos = int(depth * n_hay)
        for d in range(64):  # insert after a line break near the chosen depth
            if pos + d < n_hay and "\n" in tok.decode([h[pos + d]]):
                pos = pos + d + 1
                break
        ids = h[:pos] + needle + h[pos:] + question
        answer = tok.encode(" " + value, add_special_tokens=False)
        out.append(dict(ids=torch.tensor(ids).unsqueeze(0), answer_ids=torch.tensor(answer).unsqueeze(0), key=key,
                        value=value, depth=pos / n_hay))
    return out


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def final_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    return model.model(input_ids=ids, use_cache=False).last_hidden_state


@torch.no_grad()
def nll_and_kl(lm_head, h: torch.Tensor, h_dense: torch.Tensor, ids: torch.Tensor, chunk: int):
    """Mean next-token NLL of h and mean KL(p_dense || p) over positions 0..L-2."""
    L = ids.shape[1]
    nll = kl = 0.0
    for s0 in range(0, L - 1, chunk):
        s1 = min(L - 1, s0 + chunk)
        lp = lm_head(h[:, s0:s1]).float().log_softmax(-1)
        tgt = ids[:, s0 + 1:s1 + 1].to(lp.device)
        nll += float(-lp.gather(-1, tgt.unsqueeze(-1)).sum())
        if h_dense is not None:
            ld = lm_head(h_dense[:, s0:s1]).float().log_softmax(-1)
            kl += float((ld.exp() * (ld - lp)).sum())
    n = (L - 1) * ids.shape[0]
    return nll / n, kl / n


@torch.no_grad()
def greedy(model, ids: torch.Tensor, n_tokens: int) -> list[int]:
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    past, nxt, gen = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True), []
    for _ in range(n_tokens):
        gen.append(int(nxt))
        out = model(input_ids=nxt, past_key_values=past, use_cache=True, logits_to_keep=1)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return gen


@torch.no_grad()
def answer_scores(model, ids: torch.Tensor, answer: torch.Tensor) -> tuple[float, float]:
    """Teacher-forced: mean NLL of the answer tokens after the prompt and the fraction that argmax
    gets right (a graded NIAH signal next to exact match)."""
    full = torch.cat([ids, answer.to(ids.device)], dim=1)
    n = answer.shape[1]
    logits = model(input_ids=full, use_cache=False, logits_to_keep=n + 1).logits[:, :-1].float()
    lp = logits.log_softmax(-1)
    tgt = answer.to(lp.device)
    nll = float(-lp.gather(-1, tgt.unsqueeze(-1)).mean())
    acc = float((logits.argmax(-1) == tgt).float().mean())
    return nll, acc


def native_pairs(L: int, k: int) -> int:
    return sum(min(k, i + 1) for i in range(L))


# --------------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------------
def variant_kwargs(variant: str, a, calibrations: dict | None = None) -> dict:
    """`stem_boost.wrap` arguments of a Stem variant: the same variant -> StemConfig mapping as the
    modes of `stem-boost compare`; "*_cal" adds the calibrated `layer_reduce`."""
    lr = calibrations[variant].layer_reduce if variant.endswith("_cal") else None
    return Mode(variant, variant, a.reduce, layer_reduce=lr).wrap_kwargs(StemConfig(beta=a.beta).to_dict())


def configure(sparse_model, variant: str, a, calibrations: dict | None = None) -> None:
    """Put the sparse model in `variant`'s state (native: unwrapped; the others: wrapped)."""
    if stem_boost.is_wrapped(sparse_model):
        stem_boost.unwrap(sparse_model)
    if variant == "native":
        return
    stem_boost.wrap(sparse_model, **variant_kwargs(variant, a, calibrations))


def calibration_windows(tok, lengths: list[int], n: int, device) -> list[torch.Tensor]:
    """`n` windows per length of the pydoc training split (never the held-out text)."""
    ids = torch.tensor(tok.encode(_corpus.pydoc_split()[0], add_special_tokens=False))
    return [w.to(device) for L in lengths for w in ppl_windows(ids, L, n)]


def is_grid_slice(a) -> bool:
    """--cal-grid ends below reduce: a slice of the grid, measured only and merged later
    (scripts/merge_calibrations.py)."""
    return bool(a.cal_grid) and max(a.cal_grid) < a.reduce


def calibration_path(a, variant: str, objective: str) -> Path:
    """Where the allocation of a "*_cal" variant lives: one file per testbed, schedule, reduce and
    objective (plus the calibration dtype and grid slice when not the defaults)."""
    tag = f"dsa_top{a.index_topk}" if a.family == "dsa" else f"infllmv2_top{a.topk or si.SPARSE['topk']}"
    obj = "" if objective == "layer" else f"_{objective}"
    obj += "_fp32" if a.cal_dtype == "float32" else ""
    if is_grid_slice(a):
        obj += "_grid" + "-".join(f"{x:g}" for x in a.cal_grid)
    return Path(a.cal_dir) / f"smollm2_{tag}_{variant.removesuffix('_cal')}_r{a.reduce:g}{obj}.json"


def run_calibrations(sparse_model, tok, a, device) -> dict:
    """variant -> Calibration for the "*_cal" variants asked for: read from --cal-dir when there
    (and not --recalibrate), else measured on the training text and written there."""
    out = {}
    objectives = tuple(a.cal_objective)
    if len(objectives) > 1 and not a.calibrate_only:
        raise SystemExit(f"--cal-objective {' '.join(objectives)}: several objectives only with --calibrate-only "
                         "(a *_cal variant is evaluated with one allocation)")
    for variant in [v for v in a.variants if v.endswith("_cal")]:
        paths = {obj: calibration_path(a, variant, obj) for obj in objectives}
        if all(p.exists() for p in paths.values()) and not a.recalibrate:
            path = paths[objectives[0]]
            out[variant] = stem_boost.Calibration.from_dict(json.loads(path.read_text()))
            print(f"{variant}: allocation from {path}", flush=True)
            continue
        t0 = time.time()
        kw = variant_kwargs(variant.removesuffix("_cal"), a)
        kw.pop("reduce")
        lengths = a.cal_lengths or a.lengths
        wins = calibration_windows(tok, lengths, a.cal_windows, device)
        grid = dict(grid=tuple(a.cal_grid)) if a.cal_grid else {}
        cals = stem_boost.calibrate(sparse_model, wins, a.reduce,
                                    objective=objectives if len(objectives) > 1 else objectives[0],
                                    dtype=torch.float32 if a.cal_dtype == "float32" else None,
                                    solve=not is_grid_slice(a), **grid, **kw)
        cals = cals if isinstance(cals, dict) else {objectives[0]: cals}
        for obj, cal in cals.items():
            path = paths[obj]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(dict(cal.to_dict(), windows=a.cal_windows, lengths=lengths,
                                            dtype=a.cal_dtype,
                                            text="pydoc_data.topics training split (stem_boost.testbeds._corpus)",
                                            command=" ".join(sys.argv)), indent=1))
            print(f"calibrated {variant} ({obj}) on {len(wins)} windows ({time.time() - t0:.1f}s) -> {path}: "
                  f"layer_reduce {[round(x, 3) for x in cal.layer_reduce]}", flush=True)
        out[variant] = cals[objectives[0]]
    return out


def attended_fraction(model, family: str, L: int, n_layers: int) -> tuple[float, float]:
    """(Stem's, the native selection's) attended pairs / dense causal pairs of the last prefill."""
    st = stem_boost.stats(model)
    dense_pairs = L * (L + 1) // 2 * n_layers
    if family == "dsa":
        return st["stem_pairs"] / dense_pairs, st["native_pairs"] / dense_pairs
    layers = stem_boost.layer_stats(model)
    bs = model.config.sparse_config["block_size"]
    kv = model.config.num_key_value_heads
    stem = sum(s.stem_pairs + s.forced_pairs for s in layers) * bs / kv
    native = sum(s.native_pairs + s.forced_pairs for s in layers) * bs / kv
    return min(1.0, stem / dense_pairs), min(1.0, native / dense_pairs)


def main(argv=None):
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    dense, tok = load_smollm2(dtype=dtype, device=device)
    if a.reduce is None:
        a.reduce = 0.15 if a.family == "dsa" else 0.18
    if a.family == "dsa":
        sparse_model, _ = sd.load_smollm2_dsa(index_topk=a.index_topk, indexer=a.indexer, dtype=dtype, device=device)
    else:
        sparse_model = si.minicpm4_from_llama(dense, dict(si.SPARSE, **({"topk": a.topk} if a.topk else {})))
    n_layers = dense.config.num_hidden_layers
    stream = heldout_ids(tok)
    calibrations = run_calibrations(sparse_model, tok, a, device)
    if a.calibrate_only:
        return
    res = dict(
        config=dict(vars(a), dtype=str(dtype).replace("torch.", ""), model="SmolLM2-135M-Instruct GGUF Q4_1",
                    indexer_file=(str(sd.INDEXER_FILE) if a.indexer == "trained" else a.indexer)
                    if a.family == "dsa" else None,
                    sparse_config=sparse_model.config.sparse_config if a.family == "infllmv2" else None,
                    heldout_tokens=int(stream.numel()), heldout=list(_corpus.heldout_texts())),
        env=dict(python=platform.python_version(), torch=torch.__version__,
                 device=torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
                 threads=torch.get_num_threads()),
        calibrations={k: c.to_dict() for k, c in calibrations.items()},
        results={},
    )
    out_path = Path(a.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    for L in a.lengths:
        if L > dense.config.max_position_embeddings:
            print(f"skip L={L}: above the model's {dense.config.max_position_embeddings} positions")
            continue
        wins = [] if a.no_ppl else [w.to(device) for w in ppl_windows(stream, L, a.samples)]
        prompts = [] if a.no_niah else niah_prompts(tok, stream, L, a.samples, a.seed)
        dense_h = [final_hidden(dense, w) for w in wins]
        per = {}
        native_fracs = []  # the native selection's pairs, counted by the wrapped variants (InfLLMv2)
        for variant in a.variants:
            t0 = time.time()
            model = dense if variant == "dense" else sparse_model
            if variant != "dense":
                configure(sparse_model, variant, a, calibrations)
            nlls, kls, reduces, fracs = [], [], [], []
            for w, hd in zip(wins, dense_h):
                h = hd if variant == "dense" else final_hidden(model, w)
                nll, kl = nll_and_kl(dense.lm_head, h, None if variant == "dense" else hd, w, a.lm_chunk)
                nlls.append(nll)
                kls.append(kl)
                dense_pairs = L * (L + 1) // 2 * n_layers
                if variant == "dense":
                    reduces.append(None)
                    fracs.append(1.0)
                elif variant == "native":
                    reduces.append(0.0)
                    if a.family == "dsa":
                        fracs.append(native_pairs(L, a.index_topk) * n_layers / dense_pairs)
                else:
                    reduces.append(stem_boost.stats(model)["reduce_achieved"])
                    frac, frac_native = attended_fraction(model, a.family, L, n_layers)
                    fracs.append(frac)
                    native_fracs.append(frac_native)
            niah = []
            for pr in prompts:
                gen = greedy(model, pr["ids"].to(device), a.niah_tokens)
                text = tok.decode(gen, skip_special_tokens=True)
                a_nll, a_acc = answer_scores(model, pr["ids"].to(device), pr["answer_ids"])
                niah.append(dict(depth=round(pr["depth"], 3), value=pr["value"], answer=text,
                                 correct=pr["value"] in text.replace(",", ""), answer_nll=round(a_nll, 4),
                                 answer_token_acc=round(a_acc, 4)))
            mean = (lambda v: sum(v) / len(v) if v else None)
            nll = mean(nlls)
            per[variant] = dict(
                nll=nll, ppl=float(torch.tensor(nll).exp()) if nll is not None else None,
                kl_vs_dense=mean(kls) if variant != "dense" else 0.0,
                niah_acc=mean([float(x["correct"]) for x in niah]),
                niah_answer_nll=mean([x["answer_nll"] for x in niah]),
                niah_answer_token_acc=mean([x["answer_token_acc"] for x in niah]), niah=niah,
                reduce_achieved=mean([r for r in reduces if r is not None]) if variant != "dense" else None,
                pair_fraction=mean(fracs), seconds=round(time.time() - t0, 1),
            )
            p = per[variant]
            print(f"L={L} {variant:8s} ppl {p['ppl'] if p['ppl'] is None else round(p['ppl'], 3)} "
                  f"kl {p['kl_vs_dense'] if p['kl_vs_dense'] is None else round(p['kl_vs_dense'], 4)} "
                  f"niah {p['niah_acc']} (answer nll {p['niah_answer_nll'] if p['niah_answer_nll'] is None else round(p['niah_answer_nll'], 3)}) reduce {p['reduce_achieved']} pairs/dense "
                  f"{p['pair_fraction'] if p['pair_fraction'] is None else round(p['pair_fraction'], 4)} "
                  f"({p['seconds']}s)", flush=True)
            res["results"][str(L)] = per  # after every variant: a run cut short keeps what it measured
            res["seconds"] = round(time.time() - t_all, 1)
            out_path.write_text(json.dumps(res, indent=1))
        if stem_boost.is_wrapped(sparse_model):
            stem_boost.unwrap(sparse_model)
        if "native" in per and per["native"]["pair_fraction"] is None and native_fracs:
            per["native"]["pair_fraction"] = sum(native_fracs) / len(native_fracs)
        res["results"][str(L)] = per
        res["seconds"] = round(time.time() - t_all, 1)
        out_path.write_text(json.dumps(res, indent=1))
    print(f"wrote {out_path} ({res.get('seconds', 0)}s)")


if __name__ == "__main__":
    main()
