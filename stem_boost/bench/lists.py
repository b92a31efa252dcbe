"""Token lists derived for benchmarks and list analyses: Stem's pair count laid out on native's lists
(`stem_count_peers`), and what the absorbed-MLA kernel's gathers cost in L2 on a list
(`replay_gathers`: its programs' order through a least-recently-used cache of latent rows).

Why the replay: timed one list after another, the MLA kernel on the DeepSeek-V3.2 benchmark layer read
0.79x native's time on Stem's lists for 0.715x of the pairs, more than its fixed cost per row explains.
If Stem's kept keys were shared less between the rows that run at once, more of its gathers would miss
L2 (at 128K keys the 576-wide latent cache is 151 MB, three times an H200's L2). The timed replay gives
Stem no extra misses, and timed in one alternation the kernel reads 0.745x, the fixed-cost line
(BENCHMARKS.md, twenty-sixth session): the 0.79 was the timing order.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..selection import Selection

__all__ = ["COUNT_PEERS", "GatherReplay", "replay_gathers", "replay_gathers_timed", "stem_count_peers"]


# the peers of `stem_count_peers`, in the order the layer benchmark prints them
COUNT_PEERS = ("native lists, Stem counts", "native lists, uniform length", "native lists, random subset",
               "shared lists")


def stem_count_peers(native: Selection, stem: Selection, step: int = 128, wave_queries: int = 66,
                     seed: int = 0) -> dict[str, Selection]:
    """Stem's pair count laid out other ways on native's token lists (one batch row's rows), to tell
    what the MLA kernel's time per pair on Stem's rows follows:

    - "native lists, Stem counts": each row's first (ascending) min(Stem's, native's) candidates (Stem's
      row lengths, native's key positions);
    - "native lists, uniform length": every row with candidates keeps the rows' mean Stem count, rounded
      to `step` keys (at most its native count): the same pairs with no length varying across rows;
    - "native lists, random subset": a random min(Stem's, native's) of each row's native keys (`seed`):
      native's positions thinned independently row by row, as a cut that ignores what neighbours keep;
    - "shared lists": the `wave_queries` rows the kernel runs at once (consecutive rows) all read the
      native list of their earliest row, each its own count of it: the same pairs, nearly every
      gather shared within a wave (an upper bound on what L2 reuse can give).
    """
    stem_counts = stem.counts.expand_as(native.counts)
    counts = torch.minimum(stem_counts, native.counts)
    live = native.counts > 0
    mean = float(stem_counts[live].float().mean()) if bool(live.any()) else 0.0
    uniform = torch.where(live, native.counts.clamp(max=max(step, round(mean / step) * step)), native.counts)
    g = torch.Generator(device=native.idx.device).manual_seed(seed)
    slots = torch.arange(native.idx.shape[-1], device=native.idx.device)
    in_native = slots < native.counts[..., None].long()
    draw = torch.where(in_native, torch.rand(native.idx.shape, generator=g, device=native.idx.device), 2.0)
    chosen = draw.argsort(dim=-1)  # each row's native slots first, in random order
    keep = torch.zeros_like(in_native).scatter_(-1, chosen, slots.expand_as(chosen) < counts[..., None].long())
    subset = torch.where(keep, native.idx, torch.iinfo(torch.int32).max).sort(dim=-1).values
    subset = torch.where(subset == torch.iinfo(torch.int32).max, -1, subset).to(native.idx.dtype)
    R = native.idx.shape[2]
    # the kernel runs the latest row first: wave w holds rows R-1-66w down to R-66-66w
    wave = (R - 1 - torch.arange(R, device=native.idx.device)) // wave_queries
    earliest = (R - (wave + 1) * wave_queries).clamp_min(0)  # its earliest row: every key causal for the wave
    shared_idx = native.idx[:, :, earliest]
    shared_counts = torch.minimum(counts, native.counts[:, :, earliest])
    return {"native lists, Stem counts": replace(native, counts=counts.to(native.counts.dtype)),
            "native lists, uniform length": replace(native, counts=uniform.to(native.counts.dtype)),
            "native lists, random subset": replace(native, idx=subset, counts=counts.to(native.counts.dtype)),
            "shared lists": replace(native, idx=shared_idx, counts=shared_counts.to(native.counts.dtype))}


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
                   warmup: float = 0.25, sweep: int = 0) -> GatherReplay:
    """Replay the warp-specialised MLA kernel's gathers of one batch row's token lists through an LRU
    cache of `capacity_rows` latent rows (an H200's 50 MB L2 holds about 45K rows of 1152 bytes).

    sel: token lists idx [1, 1, R, Kmax], counts [1, 1, R]. The kernel runs the latest query first and
    one program a (query, 64-head half) an SM, so `wave_queries` consecutive queries (132 SMs / 2
    halves) run at once; within a wave the programs advance `step_keys` keys a step side by side.
    Accesses in the first `warmup` fraction of the waves fill the cache and are not counted. sweep > 0:
    alternate blocks of `sweep` queries (counted from the latest: the kernel's `WS_TILES["SWEEP"]`)
    walk their lists backward."""
    if sel.batch != 1 or sel.idx.shape[1] != 1:
        raise ValueError(f"replay_gathers takes one batch row and one selection head; got idx {tuple(sel.idx.shape)}")
    if capacity_rows < 1 or wave_queries < 1 or step_keys < 1 or sweep < 0 or not 0 <= warmup < 1:
        raise ValueError(f"capacity_rows={capacity_rows}, wave_queries={wave_queries}, step_keys={step_keys} must be "
                         f">= 1, sweep={sweep} >= 0 and warmup={warmup} in [0, 1)")
    idx = sel.idx[0, 0].cpu()
    counts = sel.counts[0, 0].cpu().tolist()
    R = idx.shape[0]
    order = list(range(R - 1, -1, -1))  # late tokens first
    waves = [order[w:w + wave_queries] for w in range(0, R, wave_queries)]
    first_counted = int(len(waves) * warmup)
    keys: list[int] = []
    counted_flags: list[bool] = []
    unique = 0
    for w, wave in enumerate(waves):
        lists = [idx[r, :counts[r]].tolist() for r in wave]
        if sweep:
            lists = [lst[::-1] if ((R - 1 - r) // sweep) % 2 else lst for r, lst in zip(wave, lists)]
        n_steps = max((-(-len(lst) // step_keys) for lst in lists), default=0)
        counted = w >= first_counted
        if counted:
            unique += len(set().union(*lists)) if lists else 0
        for s in range(n_steps):  # the wave's programs side by side, a step of keys each in turn
            for lst in lists:
                step = lst[s * step_keys:(s + 1) * step_keys]
                keys += step
                counted_flags += [counted] * len(step)
    accesses, misses = _lru_misses(np.asarray(keys, dtype=np.int64), np.asarray(counted_flags, dtype=bool), capacity_rows)
    return GatherReplay(accesses=accesses, misses=misses, wave_unique=unique / max(accesses, 1))


def _lru_misses(keys: np.ndarray, counted: np.ndarray, capacity_rows: int) -> tuple[int, int]:
    """(accesses, misses) among the `counted` of an access stream through an LRU of `capacity_rows`."""
    cache: OrderedDict[int, None] = OrderedDict()
    accesses = misses = 0
    for key, c in zip(keys.tolist(), counted.tolist()):
        if key in cache:
            cache.move_to_end(key)
        else:
            misses += c
            cache[key] = None
            if len(cache) > capacity_rows:
                cache.popitem(last=False)
        accesses += c
    return accesses, misses


def replay_gathers_timed(sel: Selection, capacity_rows: int, slots: int = 66, step_keys: int = 128,
                         warmup: float = 0.25, sweep: int = 0, jitter: float = 0.05, fixed_steps: float = 1.2,
                         seed: int = 0) -> GatherReplay:
    """`replay_gathers` with the programs' timing instead of lockstep waves: `slots` tokens run at once
    (a token's two head halves on two SMs read the same keys together: one slot), the next token takes
    the first slot that frees, and the gathers of all running tokens merge by time into the LRU.

    A token of n keys runs fixed_steps + ceil(n / step_keys) steps (the fixed cost: its queries, output
    and pipeline fill), each step lasting 1 x (1 + jitter z), z ~ N(0, 1) drawn per token (`seed`), so
    that equal rows drift apart as they do on a GPU; its j-th key is gathered at start + (fixed_steps / 2
    + j / step_keys) steps. sweep > 0: alternate blocks of `sweep` tokens walk their lists backward.
    The tokens of the first `warmup` fraction of the waves of `slots` tokens (latest first) are not
    counted, as in `replay_gathers` (with wave_queries = slots), so both count the same pairs; wave_unique
    counts those waves' distinct keys as `replay_gathers` does, and the two give the same value."""
    if sel.batch != 1 or sel.idx.shape[1] != 1:
        raise ValueError(f"replay_gathers_timed takes one batch row and one selection head; got idx {tuple(sel.idx.shape)}")
    if capacity_rows < 1 or slots < 1 or step_keys < 1 or sweep < 0 or jitter < 0 or fixed_steps < 0 or not 0 <= warmup < 1:
        raise ValueError(f"capacity_rows={capacity_rows}, slots={slots}, step_keys={step_keys} must be >= 1, sweep={sweep}, "
                         f"jitter={jitter} and fixed_steps={fixed_steps} >= 0, warmup={warmup} in [0, 1)")
    idx = sel.idx[0, 0].cpu().numpy()
    counts = sel.counts[0, 0].cpu().numpy()
    R = idx.shape[0]
    rng = np.random.default_rng(seed)
    speed = np.clip(1.0 + jitter * rng.standard_normal(R), 0.1, None)
    free = [(0.0, k) for k in range(slots)]
    heapq.heapify(free)
    first_counted = int(-(-R // slots) * warmup) * slots  # whole waves, as `replay_gathers` counts them
    keys, times, counted = [], [], []
    unique = 0
    block: list[np.ndarray] = []
    for j, r in enumerate(range(R - 1, -1, -1)):  # late tokens first
        lst = idx[r, :counts[r]]
        if sweep and (j // sweep) % 2:
            lst = lst[::-1]
        start, slot = heapq.heappop(free)
        d = speed[j]
        times.append(start + d * (fixed_steps / 2 + np.arange(lst.size) / step_keys))
        keys.append(lst)
        counted.append(np.full(lst.size, j >= first_counted))
        heapq.heappush(free, (start + d * (fixed_steps + -(-lst.size // step_keys)), slot))
        if j >= first_counted:
            block.append(lst)
        if len(block) == slots or (j == R - 1 and block):
            unique += np.unique(np.concatenate(block)).size
            block = []
    if not keys:
        return GatherReplay(accesses=0, misses=0, wave_unique=0.0)
    order = np.argsort(np.concatenate(times), kind="stable")
    accesses, misses = _lru_misses(np.concatenate(keys)[order], np.concatenate(counted)[order], capacity_rows)
    return GatherReplay(accesses=accesses, misses=misses, wave_unique=unique / max(accesses, 1))
