"""Probe (CPU, not library code): can Stem's DSA cut prefer the keys that neighbouring rows also keep, so
that the rows an MLA kernel runs at once gather fewer distinct latent rows, without losing accuracy?

On the SmolLM2 DSA testbed (real weights, the shipped distilled indexers, top-256), each candidate's OAM
score gets a bonus gamma * std(row's candidate scores) * share, share = the fraction of the previous
WINDOW rows whose native lists hold that key; Stem's budgets and tie rule are unchanged. Reports the
perplexity against native on held-out windows, and over every layer's lists Stem's pairs and the distinct
keys its waves of WINDOW consecutive rows gather, both as fractions of native's.

    python benchmarks/dsa_shared_bonus_probe_session26_2026-12-05.py LENGTH WINDOWS
"""
import math
import sys
from dataclasses import replace

import torch

sys.path.insert(0, ".")
import stem_boost  # noqa: E402
from stem_boost.adapters import dsa  # noqa: E402
from stem_boost.eval.perplexity import token_nll  # noqa: E402
from stem_boost.testbeds.smollm2_dsa import load_smollm2_dsa  # noqa: E402
from stem_boost.text.corpus import heldout_stream  # noqa: E402

torch.set_num_threads(2)
L, N = int(sys.argv[1]), int(sys.argv[2])
WINDOW = 64
ORIG = dsa.stem_step
GAMMA = [0.0]
STATS = {"pairs": 0, "distinct": 0, "native_pairs": 0, "native_distinct": 0}


def neighbour_share(idx: torch.Tensor, T: int) -> torch.Tensor:
    """[B, H, R, K] -> the fraction of the previous WINDOW rows whose lists hold each candidate's key."""
    B, H, R, K = idx.shape
    live = idx >= 0
    member = torch.zeros(B, H, R + 1, T)
    member[:, :, 1:].scatter_(-1, idx.clamp_min(0).long(), live.float())
    c = member.cumsum(2)  # c[:, :, r] = lists of rows < r holding the key
    lo = (torch.arange(R) - WINDOW).clamp_min(0)
    window = c[:, :, torch.arange(R)] - c[:, :, lo]  # rows [r - WINDOW, r)
    return window.gather(-1, idx.clamp_min(0).long()) / WINDOW


def distinct_per_pair(sel) -> tuple[int, int]:
    idx, counts = sel.idx[0, 0], sel.counts[0, 0]
    pairs = distinct = 0
    for r0 in range(0, idx.shape[0], WINDOW):
        keys = [idx[r, :int(counts[r])] for r in range(r0, min(r0 + WINDOW, idx.shape[0]))]
        flat = torch.cat(keys)
        pairs += flat.numel()
        distinct += flat.unique().numel()
    return pairs, distinct


def stem_step_with_bonus(native, scores, key_norms, k_native, cfg, *, seq_k, **kw):
    if GAMMA[0] > 0 and native.q_offset == 0 and native.batch == 1:
        share = neighbour_share(native.idx, seq_k)
        live = torch.isfinite(scores)
        spread = torch.where(live, scores, 0.0).std(dim=-1, keepdim=True)
        scores = torch.where(live, scores + GAMMA[0] * spread * share, scores)
    sel, plans = ORIG(native, scores, key_norms, k_native, cfg, seq_k=seq_k, **kw)
    if native.batch == 1:
        for sel_, prefix in ((sel, ""), (native, "native_")):
            p, d = distinct_per_pair(sel_)
            STATS[prefix + "pairs"] += p
            STATS[prefix + "distinct"] += d
    return sel, plans


dsa.stem_step = stem_step_with_bonus
model, tok = load_smollm2_dsa(index_topk=256)
ids = tok(heldout_stream(), return_tensors="pt").input_ids[0]
wins = [ids[i * L:(i + 1) * L] for i in range(N)]
base = None
for name, gamma, kw in (("native", 0.0, dict(reduce=0.0, beta=0.0)), ("stem", 0.0, dict(reduce=0.15)),
                        ("stem, bonus 0.1", 0.1, dict(reduce=0.15)), ("stem, bonus 0.25", 0.25, dict(reduce=0.15)),
                        ("stem, bonus 1", 1.0, dict(reduce=0.15))):
    GAMMA[0] = gamma
    STATS.update(pairs=0, distinct=0, native_pairs=0, native_distinct=0)
    stem_boost.wrap(model, **kw)
    with torch.no_grad():
        ppl = math.exp(float(torch.cat([token_nll(model, w) for w in wins]).mean()))
    base = base or ppl
    print(f"| {name} | {ppl:.4f} | {100 * (ppl / base - 1):+.2f}% | {STATS['pairs'] / max(STATS['native_pairs'], 1):.4f} | "
          f"{STATS['distinct'] / max(STATS['native_distinct'], 1):.4f} |", flush=True)
