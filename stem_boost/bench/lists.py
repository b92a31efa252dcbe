"""Token lists derived for benchmarks and list analyses: Stem's pair count laid out on native's lists
(`stem_count_peers`), and what the absorbed-MLA kernel's gathers cost in L2 on a list
(`replay_gathers`: its programs' order through a least-recently-used cache of latent rows).

Why the replay: on the DeepSeek-V3.2 benchmark layer the MLA kernel takes 0.79x native's time on Stem's
lists for 0.715x of the pairs, more than its fixed cost per row explains. If Stem's kept keys were
shared less between the rows that run at once, more of its gathers would miss L2 and come from HBM
(at 128K keys the 576-wide latent cache is 151 MB, three times an H200's L2).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace

import torch

from ..selection import Selection

__all__ = ["GatherReplay", "replay_gathers", "stem_count_peers"]


def stem_count_peers(native: Selection, stem: Selection, step: int = 128) -> dict[str, Selection]:
    """Stem's pair count laid out two other ways on native's token lists (same rows, `native`'s indices),
    to tell what the MLA kernel's time per pair on Stem's rows follows: "native lists, Stem counts" keeps
    each row's first (ascending) min(Stem's, native's) candidates (Stem's row lengths, native's key
    positions); "native lists, uniform length" gives every row with candidates the rows' mean Stem count,
    rounded to `step` keys (at most its native count): the same pairs with no length varying across rows."""
    stem_counts = stem.counts.expand_as(native.counts)
    counts = torch.minimum(stem_counts, native.counts)
    live = native.counts > 0
    mean = float(stem_counts[live].float().mean()) if bool(live.any()) else 0.0
    uniform = torch.where(live, native.counts.clamp(max=max(step, round(mean / step) * step)), native.counts)
    return {"native lists, Stem counts": replace(native, counts=counts.to(native.counts.dtype)),
            "native lists, uniform length": replace(native, counts=uniform.to(native.counts.dtype))}


@dataclass
class GatherReplay:
    """The outcome of `replay_gathers` over the rows after the warm-up.

    accesses: gathered latent rows (one a (query, key) pair: a query's head halves read a key together);
    misses: of those, the ones not in the modelled L2; wave_unique: distinct keys a wave of concurrent
    queries gathers, per access (1 = no key shared within a wave)."""

    accesses: int
    misses: int
    wave_unique: float

    @property
    def miss_rate(self) -> float:
        return self.misses / max(self.accesses, 1)


def replay_gathers(sel: Selection, capacity_rows: int, wave_queries: int = 66, step_keys: int = 128,
                   warmup: float = 0.25) -> GatherReplay:
    """Replay the warp-specialised MLA kernel's gathers of one batch row's token lists through an LRU
    cache of `capacity_rows` latent rows (an H200's 50 MB L2 holds about 45K rows of 1152 bytes).

    sel: token lists idx [1, 1, R, Kmax], counts [1, 1, R]. The kernel runs the latest query first and
    one program a (query, 64-head half) an SM, so `wave_queries` consecutive queries (132 SMs / 2
    halves) run at once; within a wave the programs advance `step_keys` keys a step side by side.
    Accesses in the first `warmup` fraction of the waves fill the cache and are not counted."""
    if sel.batch != 1 or sel.idx.shape[1] != 1:
        raise ValueError(f"replay_gathers takes one batch row and one selection head; got idx {tuple(sel.idx.shape)}")
    if capacity_rows < 1 or wave_queries < 1 or step_keys < 1 or not 0 <= warmup < 1:
        raise ValueError(f"capacity_rows={capacity_rows}, wave_queries={wave_queries}, step_keys={step_keys} must be "
                         f">= 1 and warmup={warmup} in [0, 1)")
    idx = sel.idx[0, 0].cpu()
    counts = sel.counts[0, 0].cpu().tolist()
    R = idx.shape[0]
    order = list(range(R - 1, -1, -1))  # late tokens first
    waves = [order[w:w + wave_queries] for w in range(0, R, wave_queries)]
    first_counted = int(len(waves) * warmup)
    cache: OrderedDict[int, None] = OrderedDict()
    accesses = misses = unique = 0
    for w, wave in enumerate(waves):
        lists = [idx[r, :counts[r]].tolist() for r in wave]
        n_steps = max((-(-len(lst) // step_keys) for lst in lists), default=0)
        counted = w >= first_counted
        if counted:
            unique += len(set().union(*lists)) if lists else 0
        for s in range(n_steps):
            for lst in lists:
                for key in lst[s * step_keys:(s + 1) * step_keys]:
                    if key in cache:
                        cache.move_to_end(key)
                    else:
                        misses += counted
                        cache[key] = None
                        if len(cache) > capacity_rows:
                            cache.popitem(last=False)
                    accesses += counted
    return GatherReplay(accesses=accesses, misses=misses, wave_unique=unique / max(accesses, 1))
