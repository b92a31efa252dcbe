"""Probe (CPU, not library code): would DeepSeek-V3.2-style token selection survive ranking for groups of
4 tokens? On the SmolLM2 DSA testbed (real weights, the shipped distilled indexers), each token's top-k
is taken from its group's mean index score (the mean over the group's tokens for which the key is causal)
instead of its own, restricted to its own causal keys; Stem then cuts per token as before.

    python benchmarks/dsa_grouped_probe_session24_2026-12-04.py LENGTH WINDOWS
"""
import math
import sys

import torch

sys.path.insert(0, ".")
import stem_boost  # noqa: E402
from stem_boost.adapters import dsa_gqa  # noqa: E402
from stem_boost.eval.perplexity import token_nll  # noqa: E402
from stem_boost.native.dsa_indexer import IndexerTopK  # noqa: E402
from stem_boost.testbeds.smollm2_dsa import load_smollm2_dsa  # noqa: E402
from stem_boost.text.corpus import heldout_stream  # noqa: E402

torch.set_num_threads(2)
L, N = int(sys.argv[1]), int(sys.argv[2])
ORIG = dsa_gqa.chunked_index_topk
GROUP = [1]


def grouped_topk(q, k, w, mask, topk, scale, **kw):
    if GROUP[0] == 1 or q.shape[1] == 1:
        return ORIG(q, k, w, mask, topk, scale, **kw)
    T = k.shape[1]
    full = ORIG(q, k, w, mask, T, scale, **kw)  # every key, by score
    B, S, _ = full.indices.shape
    mat = torch.full((B, S, T), float("-inf"))
    live = full.indices >= 0
    mat.scatter_(-1, torch.where(live, full.indices, 0).long(), torch.where(live, full.scores, float("-inf")))
    g = GROUP[0]
    pad = (-S) % g
    m = torch.cat([mat, torch.full((B, pad, T), float("-inf"))], 1).view(B, -1, g, T)
    valid = torch.isfinite(m)
    mean = torch.where(valid, m, 0.0).sum(2) / valid.sum(2).clamp(min=1)  # [B, S/g, T]
    shared = mean.repeat_interleave(g, 1)[:, :S]
    shared = torch.where(torch.isfinite(mat), shared, float("-inf"))  # each token: its own causal keys
    kk = min(topk, T)
    top_v, top_i = shared.topk(kk, dim=-1)
    ok = torch.isfinite(top_v)
    own = mat.gather(-1, top_i)  # the token's own index scores at the chosen keys (Stem's OAM adds to them)
    return IndexerTopK(torch.where(ok, top_i, -1).to(torch.int32), torch.where(ok, own, float("-inf")))


dsa_gqa.chunked_index_topk = grouped_topk
model, tok = load_smollm2_dsa(index_topk=256)
ids = tok(heldout_stream(), return_tensors="pt").input_ids[0]
wins = [ids[i * L:(i + 1) * L] for i in range(N)]
base = None
for name, group, kw in (("native", 1, dict(reduce=0.0, beta=0.0)), ("native groups of 4", 4, dict(reduce=0.0, beta=0.0)),
                        ("stem", 1, dict(reduce=0.15)), ("stem, groups of 4", 4, dict(reduce=0.15))):
    GROUP[0] = group
    stem_boost.wrap(model, **kw)
    with torch.no_grad():
        ppl = math.exp(float(torch.cat([token_nll(model, w) for w in wins]).mean()))
    base = base or ppl
    print(f"| {name} | {ppl:.4f} | {100 * (ppl / base - 1):+.2f}% |", flush=True)
