"""One full-width attention layer, native vs Stem, prefill time and peak memory (run on a GPU); with
`--family minicpm4-model`, the prefill of a whole MiniCPM-4.1-8B-shaped model.

dsa:      a DeepSeek-V3.2 attention layer (transformers' DeepseekV32Attention at real dims: hidden
          7168, 128 heads, MLA kv_lora 512 / rope 64 / nope 128 / v 128, q_lora 1536, indexer
          64 x 128, top-k 2048), random bf16 weights; hidden states i.i.d. (the bars), or --smooth's.
          (a) dense: every causal key through SDPA, no indexer (stem_boost.wrap(dense=True));
              optionally transformers' own sdpa path (indices -> dense S x T mask, fp32 [S, 64, T]
              indexer scores: out of memory from 16K), (b) native selection + our kernel
              (stem_boost.wrap with reduce=0, beta=0, the default indexer), (c) Stem at reduce=0.15.
          Also the top-2048 overlap of the default (fast) indexer with the float32 one.
infllmv2: a MiniCPM-4.1-8B attention layer (hidden 4096, 32 q / 2 kv heads, d 128, the real
          sparse_config), random bf16 weights. (a) dense SDPA (stem_boost.wrap(dense=True): the same
          layer, every causal key), (b) native InfLLMv2 selection + our kernel, (c) Stem at
          reduce=0.18 (the default: 4 tokens a row, `tile_tokens="auto"`) and, in the same
          alternation, Stem with every token ranking alone (`tile_tokens=1`, the earlier default).
          Selection included in every time.
minicpm4-model: the whole model as a user pre-fills it: MiniCPM-4.1-8B's sizes (32 layers, MLP 16384,
          vocab 73448, muP values; --model-layers), random bf16 weights, `inputs_embeds` from
          --smooth's first window, the LM head on the last position; dense / native / Stem at 0.18.
Times: medians of CUDA-event timed calls; native and Stem alternate call by call (`timed_interleaved`,
on copies of the layer), so that a GPU slowing as it heats weighs on both alike; the paired column is
the median of the per-round ratios (the two calls of a round ran at nearly one clock; the SM clock's
range over the rounds is logged); dense and the parts are timed alone (triton.testing.do_bench).
--block-rounds N adds `timed_blocks`: each config in blocks of forwards of its own, at the clock its
own power draw leaves (an H200 at its power cap runs alternating configs at one shared clock).
Memory: peak allocated during one forward.

    python scripts/bench_layers.py --family dsa --seqs 32768 65536 131072 --out dsa.json
    python scripts/bench_layers.py --family minicpm4-model --seqs 131072 --smooth 128 --min-reps 3
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import stem_boost  # noqa: E402
from stem_boost.bench.inputs import dsa_bench_layer, smooth_hidden_states  # noqa: E402
from stem_boost.bench.lists import COUNT_PEERS, stem_count_peers  # noqa: E402

PROFILE: bool | int = False  # --profile / --profile-ab: True, or the longest profiled length (--profile-max-seq)
PROFILE_OPS = False  # --profile-ops: also the PyTorch operators behind the kernels
PROFILE_TABLES = False  # --profile: one native and one Stem forward's kernel tables
PROFILE_AB = 0  # --profile-ab N: N profiled forwards of each interleaved config, kernel by kernel side by side
ALL_PEERS = True  # --peers main: skip the part peers measured before (other dtype, radix, torch.topk)
SWEEP_TIMED = False  # --sweep-peers: the MLA kernel's SWEEP peers on the last chunk (measured no gain: off)


def profiling(S: int) -> bool:
    return PROFILE is True or (PROFILE is not False and S <= PROFILE)
T0 = time.time()


def note(msg: str) -> None:
    """Progress on stderr (a long row prints nothing else until it is done)."""
    print(f"[{time.time() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


MIN_REPS = 3  # --min-reps


LAST_FIRST_CALL_S = [float("nan")]  # wall seconds of the last `timed` call's first, untimed run


def _no_grad(fn):
    """fn() under torch.no_grad()."""
    with torch.no_grad():
        return fn()


def first_call(fn) -> tuple[float, float]:
    """(ms, peak GiB above the baseline) of a first call of fn (compiles included), its wall seconds
    in LAST_FIRST_CALL_S (a first call's cost to a user). Raises torch.OutOfMemoryError."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    LAST_FIRST_CALL_S[0] = time.perf_counter() - t0
    return start.elapsed_time(end), (torch.cuda.max_memory_allocated() - base) / 2**30


def timed(fn, rep_ms: int = 300, min_reps: int | None = None) -> tuple[float, float]:
    """(median ms, peak GiB above the baseline) of fn(); (nan, nan) if it runs out of memory.
    The median is over at least `min_reps` timed calls (do_bench's own count is rep_ms / the call's
    time: a single call for a 128K layer)."""
    from triton.testing import do_bench

    try:
        first_ms, peak = first_call(fn)
        rep_ms = max(rep_ms, int((min_reps or MIN_REPS) * first_ms) + 1)
        return do_bench(fn, warmup=1, rep=rep_ms, return_mode="median"), peak
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return float("nan"), float("nan")


def timed_interleaved(fns: dict, rep_ms: int = 1500, min_reps: int | None = None) -> dict:
    """{name: (median ms, peak GiB above the baseline, first call s)} of several forwards timed in
    alternation: after one first call each (`first_call`: compiles, peak memory), rounds call every
    fn once, the order rotating from round to round, each call between its own CUDA events. A GPU
    that slows as it heats (or a clock that drifts) then weighs on every fn alike, where timing one
    after the other penalised the later one: the ratio of two of them is the quantity a bar reads.
    Rounds: at least min_reps, more while they fit in rep_ms (1.5 s: 11 rounds of a 128K MiniCPM-4.1
    layer pair, whose ratio five rounds left 0.1 apart from call to call on an H200).
    (nan, nan, nan) for a fn that runs out of memory."""
    out = {}
    for name, fn in fns.items():
        try:
            ms, gib = first_call(fn)
            out[name] = (ms, gib, LAST_FIRST_CALL_S[0])
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            out[name] = (float("nan"), float("nan"), float("nan"))
    live = [n for n in fns if out[n][0] == out[n][0]]  # not nan
    if not live:
        return out
    # at least min_reps rounds, more while they fit in rep_ms; a round's time from one warm round
    # (the first calls include compiles: as the estimate they cut a 70 ms forward to five rounds,
    # too few for a ratio that must be read to 0.01)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for n in live:
        fns[n]()
    torch.cuda.synchronize()
    round_ms = (time.perf_counter() - t0) * 1e3
    rounds = max(min_reps or MIN_REPS, int(rep_ms / max(round_ms, 1e-3)) + 1)
    times = {n: [] for n in live}
    clocks = []  # the SM clock after each round (MHz; NVML), to tell a GPU that slowed from a slower config
    for r in range(rounds):
        order = live[r % len(live):] + live[:r % len(live)]
        events = []
        for n in order:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[n]()
            end.record()
            events.append((n, start, end))
        torch.cuda.synchronize()
        for n, start, end in events:
            times[n].append(start.elapsed_time(end))
        clocks.append(sm_clock_mhz())
    for n in live:
        out[n] = (statistics.median(times[n]), out[n][1], out[n][2])
    LAST_CLOCKS[:] = [c for c in clocks if c == c]
    LAST_TIMES.clear()
    LAST_TIMES.update(times)
    return out


def timed_blocks(fns: dict, rounds: int, block: int = 6) -> dict:
    """{name: (median ms, mean SM clock MHz)} of forwards timed in blocks of one config: each round runs
    `block` forwards of every fn back to back (the order of the fns rotating from round to round) and
    keeps all but a block's first, the one that follows another config. A GPU at its power cap sets
    its clock from the power the last tens of milliseconds drew, so `timed_interleaved`'s alternation
    call by call runs native and Stem at one shared clock, the mix of both; a block runs each config
    at the clock its own forwards leave, as a server that runs only that config does. The rounds
    still alternate, so a drift weighs on every fn alike. The per-round ratios are in LAST_BLOCK_TIMES."""
    names = list(fns)
    times = {n: [] for n in names}
    per_round = {n: [] for n in names}
    clocks = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            events = []
            for _ in range(block):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[n]()
                end.record()
                events.append((start, end))
            clocks[n].append(sm_clock_mhz())  # while the block's last forwards run
            torch.cuda.synchronize()
            kept = [s.elapsed_time(e) for s, e in events[1:]]
            times[n] += kept
            per_round[n].append(statistics.median(kept))
    LAST_BLOCK_TIMES.clear()
    LAST_BLOCK_TIMES.update(per_round)
    out = {}
    for n in names:
        sampled = [c for c in clocks[n] if c == c]  # nan without NVML
        out[n] = (statistics.median(times[n]), statistics.fmean(sampled) if sampled else float("nan"))
    return out


LAST_BLOCK_TIMES: dict[str, list[float]] = {}  # each fn's median ms, block by block, of the last `timed_blocks`
BLOCK_ROUNDS = 0  # --block-rounds: rounds of `timed_blocks` after the interleaved timing (0: none)
LAST_CLOCKS: list[float] = []  # SM clocks (MHz) after each round of the last `timed_interleaved`
LAST_TIMES: dict[str, list[float]] = {}  # each fn's ms, round by round, of the last `timed_interleaved`


def paired_ratio(times: dict[str, list[float]], name: str, ref: str) -> float:
    """Median over rounds of times[name][r] / times[ref][r]: the two ran next to each other in a
    round, at nearly one clock, so a GPU whose clock drifts between rounds moves this less than
    the ratio of the two medians."""
    pairs = [a / b for a, b in zip(times.get(name, []), times.get(ref, [])) if b > 0]
    return statistics.median(pairs) if pairs else float("nan")


def sm_clock_mhz() -> float:
    """The GPU's current SM clock in MHz (torch.cuda.clock_rate, through NVML), nan without NVML."""
    try:
        return float(torch.cuda.clock_rate())
    except Exception:  # noqa: BLE001 - no pynvml / NVML on this machine
        return float("nan")


def time_configs_interleaved(row: dict, models: dict, configs: dict, forward) -> None:
    """Wrap models[name] (copies of one layer, the same weights) with configs[name] once, time
    forward(model) of all of them in alternation (`timed_interleaved`) and write each name's
    `{name}_ms`, `_gib`, `_first_call_s` (and for the Stem ones `reduce_achieved{suffix}` and
    `{name}_over_native_paired`, the median of the per-round ratios) into row."""
    fns = {}
    for name, kwargs in configs.items():
        stem_boost.wrap(models[name], **kwargs)
        fns[name] = (lambda m: lambda: _no_grad(lambda: forward(m)))(models[name])
    for name, (ms, gib, first_s) in timed_interleaved(fns).items():
        row[f"{name}_ms"], row[f"{name}_gib"], row[f"{name}_first_call_s"] = ms, gib, first_s
        if name.startswith("stem"):
            row[f"reduce_achieved{name[4:]}"] = stem_boost.stats(models[name])["reduce_achieved"]
    for name in configs:
        if name.startswith("stem") and "native_kernel" in configs:
            row[f"{name}_over_native_paired"] = paired_ratio(LAST_TIMES, name, "native_kernel")
    if BLOCK_ROUNDS:
        note(f"{row['family']} S={row['S']}: {BLOCK_ROUNDS} rounds of blocks of one config")
        for name, (ms, mhz) in timed_blocks(fns, BLOCK_ROUNDS).items():
            row[f"{name}_blocks_ms"], row[f"{name}_blocks_sm_mhz"] = ms, mhz
        for name in configs:
            if name.startswith("stem") and "native_kernel" in configs:
                row[f"{name}_over_native_blocks"] = row[f"{name}_blocks_ms"] / row["native_kernel_blocks_ms"]
                row[f"{name}_over_native_blocks_paired"] = paired_ratio(LAST_BLOCK_TIMES, name, "native_kernel")
    if LAST_CLOCKS:
        row["sm_clock_mhz_min_max"] = (min(LAST_CLOCKS), max(LAST_CLOCKS))
        note(f"{row['family']} S={row['S']}: SM clock {min(LAST_CLOCKS):.0f}-{max(LAST_CLOCKS):.0f} MHz over the rounds")
    if PROFILE_AB and profiling(row["S"]):
        row["profile_ab"] = profile_alternating(f"{row['family']} S={row['S']}", fns, PROFILE_AB)
    for m in models.values():
        stem_boost.unwrap(m)


class _Wrapper(torch.nn.Module):
    """Holds one attention module as `model.layers[0].self_attn` so stem_boost.wrap can find it."""

    def __init__(self, attn, config):
        super().__init__()
        self.attn = attn
        self.config = config


def dsa_forward(x, pe, pos):
    """forward(holder) of the DSA rows: the layer on x, with the holder's `settings` ({name: value} of
    `adapters.dsa`, e.g. CUT_PLACE) if it has them."""
    from stem_boost.adapters import dsa as dsa_adapter

    def forward(h):
        with contextlib.ExitStack() as stack:
            for name, value in getattr(h, "settings", {}).items():
                stack.enter_context(library_setting(dsa_adapter, name, value))
            return h.attn(x, pe, None, position_ids=pos)
    return forward


def dsa_label(row: dict) -> str:
    """A DSA row's length, and its hidden-state window when smoothed, for the closing tables."""
    return f"{row['S']}" + (f" smooth {row['smooth_window']}" if row.get("smooth_window") else "")


def bench_dsa(seqs, device, native_max_seq, window: int = 0):
    """DeepSeek-V3.2 layer rows; window: `smooth_hidden_states`'s (0: i.i.d. positions, the bars' input)."""
    attn, cfg, rotary = dsa_bench_layer(device)
    holder = _Wrapper(attn, cfg)
    rows = []
    for S in seqs:
        x = smooth_hidden_states(S, cfg.hidden_size, window, device)
        pos = torch.arange(S, device=device)[None]
        pe = rotary(x, pos)
        row = dict(family="dsa", S=S, smooth_window=window)
        # (a) native sdpa path: 4-D causal mask, the module's own forward
        if S <= native_max_seq:
            def native():
                mask = torch.ones(S, S, dtype=torch.bool, device=device).tril_()[None, None]
                with torch.no_grad():
                    attn(x, pe, mask, position_ids=pos)
            row["native_sdpa_ms"], row["native_sdpa_gib"] = timed(native, rep_ms=100)
        else:
            row["native_sdpa_ms"] = row["native_sdpa_gib"] = float("nan")
        # dense alone first; native and the two Stem forms interleaved (`timed_interleaved`), each on
        # its own copy of the layer (the same weights), wrapped once
        stem_boost.wrap(holder, dense=True)
        note(f"dsa S={S} dense")
        row["dense_ms"], row["dense_gib"] = timed(lambda: _no_grad(lambda: attn(x, pe, None, position_ids=pos)))
        row["dense_first_call_s"] = LAST_FIRST_CALL_S[0]
        stem_boost.unwrap(holder)
        configs = {"native_kernel": dict(reduce=0.0, beta=0.0), "stem": dict(reduce=0.15),
                   "stem_step1": dict(reduce=0.15, budget_step=1), "stem_cut_chunks": dict(reduce=0.15)}
        holders = {name: holder if i == 0 else _Wrapper(copy.deepcopy(attn), cfg) for i, name in enumerate(configs)}
        holders["stem_cut_chunks"].settings = dict(CUT_PLACE="chunks")  # the cut inside the indexer's loop
        note(f"dsa S={S} native / Stem / Stem step 1 / Stem cut inside the indexer loop, interleaved")
        time_configs_interleaved(row, holders, configs, dsa_forward(x, pe, pos))
        del holders
        row["stem_over_native"] = row["stem_ms"] / row["native_kernel_ms"]
        row["stem_step1_over_native"] = row["stem_step1_ms"] / row["native_kernel_ms"]
        row["native_over_dense"] = row["native_kernel_ms"] / row["dense_ms"]
        note(f"dsa S={S} parts")
        row.update(dsa_breakdown(attn, x, pe, pos))
        if S == seqs[0]:
            row["indexer_overlap_vs_fp32"] = indexer_overlap(attn, x, pe, pos, min(S, 4096))
        if PROFILE_TABLES and profiling(S):
            for name, kwargs in (("native", dict(reduce=0.0, beta=0.0)), ("stem", dict(reduce=0.15))):
                stem_boost.wrap(holder, **kwargs)
                profile_table(f"dsa {name} S={S}", lambda: attn(x, pe, None, position_ids=pos))
                stem_boost.unwrap(holder)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del x, pe
    return rows


def profile_table(label: str, forward, rows: int = 18) -> None:
    """Print the CUDA kernels of one forward (after a warm-up one), heaviest first: where the time goes."""
    with torch.no_grad():
        forward()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            forward()
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events) / 1e3
    print(f"\n[profile] {label}: {total:.1f} ms of kernels", flush=True)
    for e in events[:rows]:
        print(f"[profile]   {e.device_time_total / 1e3:8.2f} ms {e.count:5d}x  {e.key[:90]}", flush=True)
    if PROFILE_OPS:  # which PyTorch operators (with their input shapes) launched the kernels
        with torch.no_grad(), torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
                record_shapes=True) as prof:
            forward()
            torch.cuda.synchronize()
        ops = [e for e in prof.key_averages(group_by_input_shape=True)
               if e.self_device_time_total > 0 and e.key.startswith("aten::")]
        ops.sort(key=lambda e: -e.self_device_time_total)
        for e in ops[:rows]:
            print(f"[profile op] {e.self_device_time_total / 1e3:8.2f} ms {e.count:5d}x  {e.key} "
                  f"{str(e.input_shapes)[:110]}", flush=True)


def profile_alternating(label: str, fns: dict, rounds: int, rows: int = 14) -> dict:
    """Where two forwards differ, kernel by kernel: `rounds` forwards of each fn in alternation (the
    order rotating, as `timed_interleaved`), each under its own profiler. Prints each fn's wall time
    (CUDA events), kernel time and their difference (the GPU idle inside a forward: host syncs,
    launch gaps), then the kernels whose mean time differs most from the first fn's.
    Returns {name: {"wall_ms", "kernel_ms", "kernels": {kernel: mean ms}}}."""
    names = list(fns)
    kernels = {n: {} for n in names}
    ops = {n: {} for n in names}  # with PROFILE_OPS: "operator shapes" -> mean ms of the kernels it launched
    wall = {n: [] for n in names}
    busy = {n: [] for n in names}
    activities = [torch.profiler.ProfilerActivity.CUDA]
    if PROFILE_OPS:
        activities.insert(0, torch.profiler.ProfilerActivity.CPU)
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=activities, record_shapes=PROFILE_OPS) as prof:
                start.record()
                fns[n]()
                end.record()
                torch.cuda.synchronize()
            total = 0.0
            for e in prof.key_averages():
                if e.device_time_total > 0 and is_kernel_event(e):
                    kernels[n][e.key] = kernels[n].get(e.key, 0.0) + e.device_time_total / 1e3 / rounds
                    total += e.device_time_total / 1e3
            if PROFILE_OPS:
                for e in prof.key_averages(group_by_input_shape=True):
                    if e.key.startswith("aten::") and e.self_device_time_total > 0:
                        key = f"{e.key} {str(e.input_shapes)[:100]}"
                        ops[n][key] = ops[n].get(key, 0.0) + e.self_device_time_total / 1e3 / rounds
            busy[n].append(total)
            wall[n].append(start.elapsed_time(end))
    out = {n: dict(wall_ms=statistics.median(wall[n]), kernel_ms=statistics.median(busy[n]), kernels=kernels[n])
           for n in names}
    print(f"\n[profile-ab] {label}: {rounds} forwards each, alternating", flush=True)
    for n in names:
        print(f"[profile-ab]   {n:14s} wall {out[n]['wall_ms']:8.2f} ms  kernels {out[n]['kernel_ms']:8.2f} ms  "
              f"idle {out[n]['wall_ms'] - out[n]['kernel_ms']:6.2f} ms", flush=True)
    ref = names[0]
    for n in names[1:]:
        keys = set(kernels[ref]) | set(kernels[n])
        diffs = sorted(keys, key=lambda k: -abs(kernels[n].get(k, 0.0) - kernels[ref].get(k, 0.0)))
        print(f"[profile-ab]   {n} - {ref}, by kernel (ms):", flush=True)
        for k in diffs[:rows]:
            a, b = kernels[ref].get(k, 0.0), kernels[n].get(k, 0.0)
            print(f"[profile-ab]     {b - a:+8.2f}  ({a:8.2f} -> {b:8.2f})  {k[:80]}", flush=True)
        if PROFILE_OPS:  # the same by operator and input shapes: which call of a shared kernel moved
            print(f"[profile-ab]   {n} - {ref}, by operator and input shapes (ms):", flush=True)
            for k, a, b in ops_that_differ(ops[ref], ops[n], rows):
                print(f"[profile-ab op]  {b - a:+8.2f}  ({a:8.2f} -> {b:8.2f})  {k[:150]}", flush=True)
    return out


def is_kernel_event(e) -> bool:
    """Whether a profiler average is a device kernel (not a CPU operator whose device time counts
    the kernels it launched: with CPU activity recorded, both appear)."""
    device_type = getattr(e, "device_type", None)
    return device_type is None or device_type == torch.autograd.DeviceType.CUDA


def ops_that_differ(ref: dict, other: dict, rows: int) -> list[tuple[str, float, float]]:
    """(key, ref ms, other ms) of the `rows` keys whose times differ most, largest difference first;
    a key missing on one side counts 0 there."""
    keys = sorted(set(ref) | set(other), key=lambda k: -abs(other.get(k, 0.0) - ref.get(k, 0.0)))
    return [(k, ref.get(k, 0.0), other.get(k, 0.0)) for k in keys[:rows]]


def indexer_overlap(attn, x, pe, pos, n_rows: int) -> float:
    """Mean |fast top-k  &  fp32 top-k| / k over the last `n_rows` query rows (the default GPU indexer
    against the exact float32 one, same chunked top-k). Only those rows are scored: the float32
    indexer over every row of a 32K prefill is 9e12 FLOP without tensor cores (minutes)."""
    from stem_boost.config import StemConfig
    from stem_boost.native.dsa_indexer import chunked_index_topk, detect_variant, indexer_qk, indexer_weights
    from stem_boost.selection import shared_units

    ix = attn.indexer
    fast_dtype = StemConfig().indexer_score_dtype(x.device, ix.head_dim)  # what `wrap` runs ("auto")
    with torch.no_grad():
        variant = detect_variant(ix)
        q_resid = attn.q_a_layernorm(attn.q_a_proj(x))
        q, k = indexer_qk(ix, x, q_resid, pe, None, variant)  # [1, S, H, D], [1, S, D]
        w = indexer_weights(ix, x, variant)  # [1, S, H]
        scale = None if variant.scale_in_weights else ix.softmax_scale
        tops = [chunked_index_topk(q[:, -n_rows:], k, w[:, -n_rows:], None, ix.index_topk, scale,
                                   max_bytes=2 * 2**30, score_dtype=dt)  # queries at the end: causal
                for dt in (fast_dtype, None)]
    hits, total = shared_units(*(t.indices[0] for t in tops))  # [rows, K] each, -1 padded
    return hits / max(total, 1)


# the MLA kernel's SWEEP values timed beside the default on the last chunk (`mla_token_ws.WS_TILES`)
SWEEP_PEERS = (33, 66)


def last_chunk_kernel_times(q, kv, native, stem, stem_step1, label: str) -> dict:
    """The MLA kernel on the last chunk's lists (Selections of its rows), every list timed in one
    alternation (`timed_interleaved`), so that a clock drifting over the run weighs on all alike:
    native, Stem, Stem on the exact TPD line, Stem's pair count laid out on native's lists
    (`stem_count_peers`) and, on Hopper with --sweep-peers, native and Stem with the kernel's SWEEP_PEERS. Returns
    kernel_{native,stem,stem_step1}_last_chunk_ms, kernel_last_chunk_{peer}_ms, last_chunk_pairs_{peer}
    and each list's median per-round ratio to native (kernel_last_chunk_paired: {name: ratio})."""
    from stem_boost.kernels import sparse_attention

    kern = lambda s: sparse_attention(q, kv, kv[..., :512], s, check=False)  # noqa: E731
    fns = {"native": lambda: kern(native), "stem": lambda: kern(stem), "stem_step1": lambda: kern(stem_step1)}
    out = {}
    try:  # diagnostic peers: a failure is printed, the main three kept
        for name, peer in stem_count_peers(native, stem).items():
            fns[name] = lambda peer=peer: kern(peer)
            out[f"last_chunk_pairs_{name}"] = int(peer.counts.sum())
    except Exception as err:  # noqa: BLE001
        note(f"{label}: the Stem-count peers failed: {err!r}")
    if SWEEP_TIMED and torch.cuda.get_device_capability()[0] == 9:  # alternate token blocks walked backward
        from stem_boost.kernels import mla_token_ws

        def swept(sel, sweep):
            with library_setting(mla_token_ws, "WS_TILES", {**mla_token_ws.WS_TILES, "SWEEP": sweep}):
                return kern(sel)
        for sweep in SWEEP_PEERS:
            for name, sel in (("native", native), ("stem", stem)):
                fns[f"{name}_sweep{sweep}"] = lambda sel=sel, sweep=sweep: swept(sel, sweep)
    try:
        got = timed_interleaved(fns, rep_ms=3000)
    except Exception as err:  # noqa: BLE001
        note(f"{label}: the kernel peers failed ({err!r}); the main three alone")
        fns = {n: fns[n] for n in ("native", "stem", "stem_step1")}
        got = timed_interleaved(fns, rep_ms=3000)
    main = {"native": "kernel_native_last_chunk_ms", "stem": "kernel_stem_last_chunk_ms",
            "stem_step1": "kernel_stem_step1_last_chunk_ms"}
    for name, (ms, _, _) in got.items():
        out[main.get(name, f"kernel_last_chunk_{name}_ms")] = ms
    if "native" in LAST_TIMES:
        out["kernel_last_chunk_paired"] = {n: paired_ratio(LAST_TIMES, n, "native") for n in LAST_TIMES if n != "native"}
    if LAST_CLOCKS:
        out["kernel_last_chunk_sm_clock_mhz_min_max"] = (min(LAST_CLOCKS), max(LAST_CLOCKS))
    return out


def dsa_breakdown(attn, x, pe, pos) -> dict:
    """Milliseconds of the parts: chunked fused indexer top-k, the Stem step, the absorbed kernel."""
    from stem_boost.adapters.dsa import latent_value_norms, latent_value_rms, native_selection, side_stream, value_gram
    from stem_boost.boost import ChunkedCut, stem_step
    from stem_boost.kernels import dsa_topk
    from stem_boost.config import StemConfig
    from stem_boost.native.dsa_indexer import dsa_indexer_topk
    from stem_boost.oam import aggregate_heads

    S = x.shape[1]
    with torch.no_grad():
        q_resid = attn.q_a_layernorm(attn.q_a_proj(x))
        # the indexer + top-k: the default (what `wrap` runs: auto dtype, sampled select) beside
        # torch.topk (no tie rule), the radix select (the same set) and the other score dtypes
        default_dtype = StemConfig().indexer_score_dtype(x.device, attn.indexer.head_dim)  # what `wrap` runs
        other_dtype = torch.bfloat16 if default_dtype == "fp8" else "fp8"

        def index_topk(score_dtype=default_dtype, **kw):
            return lambda: dsa_indexer_topk(attn.indexer, x, q_resid, pe, None, pos, max_bytes=2 * 2**30,
                                            score_dtype=score_dtype, **kw)
        # the Gluon FP8 scorer (Hopper, opt-in: `dsa_indexer.FP8_SCORER`) beside the run's, and its top-k's
        # agreement with the run's lists (the scores differ only in the order of fp32 sums)
        ms_index_sm90, overlap_sm90, sm90_indices = float("nan"), None, None
        if default_dtype == "fp8" and torch.cuda.get_device_capability()[0] == 9:
            from stem_boost.native import dsa_indexer

            with library_setting(dsa_indexer, "FP8_SCORER", "sm90"):
                ms_index_sm90, _ = timed(index_topk())
                sm90_indices = index_topk()().indices
        nan = float("nan")
        ms_index_torch = ms_index_other = ms_index_radix = ms_stem_radix = ms_norms_per_head = nan
        radix_same = same_set = None
        if ALL_PEERS:
            ms_index_torch, _ = timed(index_topk(tie_break="none"))
            ms_index_other, _ = timed(index_topk(score_dtype=other_dtype))
            ms_index_radix, _ = timed(index_topk(topk_method="radix"))
        top = index_topk()()  # the Stem step below starts from the layer's own (ascending) candidates
        if sm90_indices is not None:  # the Gluon scorer ran: its lists against the run's
            overlap_sm90 = list_overlap(sm90_indices, top.indices)
            del sm90_indices
        if ALL_PEERS:
            radix_same = bool(torch.equal(index_topk(topk_method="radix")().indices, top.indices))
        native = native_selection(top, q_offset=0, padding=None)
        kv_a = attn.kv_a_proj_with_mqa(x)
        latent = attn.kv_a_layernorm(kv_a[..., :512])
        w_uv = attn.kv_b_proj.weight.view(128, -1, 512)[:, 128:]
        cfg = StemConfig(reduce=0.15)
        norms = latent_value_rms(latent, w_uv)  # [1, 1, S]: what the layer runs (rms, no TP reducer)
        per_head = aggregate_heads(latent_value_norms(latent, w_uv), 1)  # the per-head path it replaced
        norms_rel_err = float(((norms - per_head).abs() / per_head.clamp_min(1e-6)).max())
        del per_head
        boost = lambda: stem_step(native, top.scores.unsqueeze(1), norms, 2048, cfg, seq_k=S,  # noqa: E731
                                  candidates_ascending=top.ascending)  # what the layer runs: fused
        sel, _ = boost()
        ms_stem_step, _ = timed(boost)
        # the same cut chunk by chunk inside the indexer's loop (the layer's CUT_PLACE="chunks"; its default
        # cuts after the loop), in one alternation with the indexer alone: its cost there, and its lists
        # against the cut after the loop
        def index_topk_with_cut(stream=side_stream(x.device)) -> ChunkedCut:  # on CUDA "chunks" runs on a side stream
            cut = ChunkedCut(1, S, top.indices.shape[-1], 0, S, 2048, cfg, norms, x.device, stream)
            index_topk(on_chunk=cut)()
            cut.result(native)
            return cut

        def index_topk_with_block_cut() -> None:  # the one-row-a-program cut
            with library_setting(dsa_topk, "CUT_METHOD", "block"):
                index_topk_with_cut()
        alt = timed_interleaved({"alone": index_topk(), "with_cut": index_topk_with_cut,
                                 "with_block_cut": index_topk_with_block_cut,
                                 "with_cut_one_stream": lambda: index_topk_with_cut(None)})
        ms_index, ms_index_with_cut = alt["alone"][0], alt["with_cut"][0]  # the indexer's own time: this alternation's
        ms_index_with_block_cut, ms_index_with_cut_one_stream = alt["with_block_cut"][0], alt["with_cut_one_stream"][0]
        sel_in_loop, _ = index_topk_with_cut().result(native)
        in_loop_same = bool(torch.equal(sel_in_loop.idx, sel.idx) and torch.equal(sel_in_loop.counts, sel.counts))
        del sel_in_loop
        # the exact TPD line (budget_step=1) beside the default 64-key budget quantum
        sel_step1, _ = stem_step(native, top.scores.unsqueeze(1), norms, 2048, StemConfig(reduce=0.15, budget_step=1),
                                 seq_k=S, candidates_ascending=top.ascending)
        if ALL_PEERS:
            # the previous GPU path (gathered OAM scores + radix select), side by side; both keep one set
            radix = lambda: stem_step(native, top.scores.unsqueeze(1), norms, 2048, cfg, seq_k=S, method="radix")  # noqa: E731
            ms_stem_radix, _ = timed(radix)
            sel_radix, _ = radix()
            same_set = bool(torch.equal(sel.counts, sel_radix.counts)
                            and torch.equal(sel.idx, sel_radix.idx[..., :sel.idx.shape[-1]]))
            del sel_radix
            ms_norms_per_head, _ = timed(lambda: aggregate_heads(latent_value_norms(latent, w_uv), 1))
        gram = value_gram(w_uv)  # what the layer keeps from one prefill to the next (`cached_value_gram`)
        ms_norms, _ = timed(lambda: latent_value_rms(latent, w_uv, gram=gram))  # what the layer runs
        ms_norms_with_gram, _ = timed(lambda: latent_value_rms(latent, w_uv))  # the Gram computed each call
        ms_norms_fp32, _ = timed(lambda: latent_value_rms(latent, w_uv, tensor_cores=False))  # the fp32 product
        norms_fp32 = latent_value_rms(latent, w_uv, tensor_cores=False)
        norms_fp32_rel_err = float(((norms - norms_fp32).abs() / norms_fp32.clamp_min(1e-6)).max())
        chunk = min(S, 16384)
        q = torch.randn(1, chunk, 128, 576, device=x.device, dtype=x.dtype)
        kv = torch.randn(1, S, 1, 576, device=x.device, dtype=x.dtype)
        pairs = lambda s: int(s.rows(S - chunk, S).counts.sum())  # noqa: E731
        kernel = last_chunk_kernel_times(q, kv, native.rows(S - chunk, S), sel.rows(S - chunk, S),
                                         sel_step1.rows(S - chunk, S), f"dsa S={S}")
    return dict(**kernel, last_chunk_pairs_native=pairs(native),
                last_chunk_pairs_stem=pairs(sel), last_chunk_pairs_stem_step1=pairs(sel_step1),
                indexer_dtype=str(default_dtype), indexer_other_dtype=str(other_dtype),
                indexer_topk_ms=ms_index, indexer_topk_torch_ms=ms_index_torch, indexer_topk_other_dtype_ms=ms_index_other,
                indexer_topk_radix_ms=ms_index_radix, radix_same_set=radix_same,
                indexer_topk_sm90_scorer_ms=ms_index_sm90, indexer_sm90_scorer_overlap=overlap_sm90,
                stem_step_ms=ms_stem_step, stem_step_radix_ms=ms_stem_radix,
                indexer_topk_with_cut_ms=ms_index_with_cut,
                indexer_topk_with_block_cut_ms=ms_index_with_block_cut,
                indexer_topk_with_cut_one_stream_ms=ms_index_with_cut_one_stream,
                cut_in_loop_same_set=in_loop_same,
                stem_step_same_set=same_set, value_norms_ms=ms_norms, value_norms_with_gram_ms=ms_norms_with_gram,
                value_norms_per_head_ms=ms_norms_per_head,
                value_norms_max_rel_err=norms_rel_err, value_norms_fp32_ms=ms_norms_fp32,
                value_norms_fp32_rel_err=norms_fp32_rel_err,
                kernel_chunk=chunk)


# Stem's InfLLMv2 peers timed in the alternation beside the default (`tile_tokens="auto"`: 4 tokens a row):
# the per-token ranking of the twenty-third session and before
INFLLMV2_STEM_PEERS = {"stem_tokens": dict(reduce=0.18, tile_tokens=1)}


def time_dense_native_stem(row: dict, model, forward, label: str, peers: dict | None = None) -> None:
    """An InfLLMv2 model's configurations into row: dense alone first (`timed`, the model wrapped
    with dense=True), then native, Stem at reduce 0.18 and `peers` (name -> wrap kwargs, names
    starting with "stem") interleaved (`time_configs_interleaved`) on `model` and copies of it (the
    same weights), each wrapped once; forward(m) runs one prefill of m."""
    stem_boost.wrap(model, dense=True)
    note(f"{label} dense")
    row["dense_ms"], row["dense_gib"] = timed(lambda: _no_grad(lambda: forward(model)))
    row["dense_first_call_s"] = LAST_FIRST_CALL_S[0]
    stem_boost.unwrap(model)
    configs = {"native_kernel": dict(reduce=0.0, beta=0.0), "stem": dict(reduce=0.18), **(peers or {})}
    models = {name: model if name == "native_kernel" else copy.deepcopy(model) for name in configs}
    note(f"{label} native / Stem, interleaved")
    time_configs_interleaved(row, models, configs, forward)
    del models
    row["stem_over_native"] = row["stem_ms"] / row["native_kernel_ms"]
    row["dense_over_stem"] = row["dense_ms"] / row["stem_ms"]


def bench_infllmv2(seqs, device, windows=(0,), select_chunk: int | None = None):
    from stem_boost.models.minicpm4 import MiniCPM4Config, MiniCPM4ForCausalLM
    from stem_boost.native.infllmv2 import MINICPM41_SPARSE_CONFIG

    cfg = MiniCPM4Config(vocab_size=1024, hidden_size=4096, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=32, num_key_value_heads=2, head_dim=128,
                         max_position_embeddings=262144, sparse_config=dict(MINICPM41_SPARSE_CONFIG))
    torch.manual_seed(0)
    model = MiniCPM4ForCausalLM(cfg).to(device=device, dtype=torch.bfloat16).eval()
    attn = model.model.layers[0].self_attn
    attn.select_chunk_size = select_chunk or 1024  # the model's own default on CUDA: 1024 query rows a step
    rotary = model.model.rotary_emb
    rows = []
    for S, window in ((S, w) for S in seqs for w in windows):
        x = smooth_hidden_states(S, cfg.hidden_size, window, device)
        pos = torch.arange(S, device=device)[None]
        pe = rotary(pos)
        row = dict(family="infllmv2", S=S, smooth_window=window)

        time_dense_native_stem(row, model, lambda m: m.model.layers[0].self_attn(x, pe),
                               f"infllmv2 S={S} smooth={window}", peers=INFLLMV2_STEM_PEERS)
        if PROFILE_TABLES and profiling(S):
            for name, kwargs in (("native", dict(reduce=0.0, beta=0.0)), ("stem", dict(reduce=0.18))):
                stem_boost.wrap(model, **kwargs)
                profile_table(f"infllmv2 {name} S={S} smooth={window}", lambda: attn(x, pe))
                stem_boost.unwrap(model)
        note(f"infllmv2 S={S} smooth={window} parts")
        row.update(infllmv2_breakdown(attn, x, pe))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def minicpm41_8b_config(layers: int):
    """A MiniCPM-4.1-8B config (the official config.json's sizes, muP values and sparse_config; RoPE
    without the long-context scaling, which changes no time) with `layers` decoder layers."""
    from stem_boost.models.minicpm4 import MiniCPM4Config
    from stem_boost.native.infllmv2 import MINICPM41_SPARSE_CONFIG

    return MiniCPM4Config(vocab_size=73448, hidden_size=4096, intermediate_size=16384, num_hidden_layers=layers,
                          num_attention_heads=32, num_key_value_heads=2, head_dim=128,
                          max_position_embeddings=262144, tie_word_embeddings=False, scale_emb=12,
                          scale_depth=1.4, dim_model_base=256, sparse_config=dict(MINICPM41_SPARSE_CONFIG))


def bench_minicpm4_model(seqs, device, window: int, layers: int):
    """The whole model's prefill, as a user runs it: a MiniCPM-4.1-8B-shaped model (`layers` decoder
    layers, MLPs, norms, the LM head on the last position), random bf16 weights, dense / native / Stem.
    The input is `inputs_embeds` from `smooth_hidden_states` (window 0: i.i.d. positions)."""
    from stem_boost.models.minicpm4 import MiniCPM4ForCausalLM

    cfg = minicpm41_8b_config(layers)
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the GPU: no fp32 copy of 8B weights
    try:
        with torch.device(device):
            model = MiniCPM4ForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    note(f"minicpm4 model: {layers} layers, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters")
    rows = []
    for S in seqs:
        x = smooth_hidden_states(S, cfg.hidden_size, window, device)

        def forward(m):
            return m(inputs_embeds=x, logits_to_keep=1, use_cache=False)

        row = dict(family=f"minicpm4 model, {layers} layers", S=S, smooth_window=window)
        time_dense_native_stem(row, model, forward, f"minicpm4 model S={S}")
        rows.append(row)
        print(json.dumps(row), flush=True)
        del x
    return rows


UNION_TILE_PEERS = {"triton": dict(kernel="triton"), "sm90": dict(kernel="sm90"),  # each executor beside the default
                    "sm90_ws": dict(kernel="sm90_ws")}
# the Gluon pooled stage-1 tiles whose selection (native and Stem's) is timed beside the run's tile, on Hopper:
# the head loop STEP heads a trip (each head's exponentials beside the next product), and two warpgroups a program
POOLED_TILE_PEERS = {"step0 (pairs)": dict(STEP=0), "step4": dict(STEP=4, NUM_BUF=3)}


@contextlib.contextmanager
def library_setting(module, name: str, value):
    """`module.name` (a library-wide choice such as `dsa_indexer.FP8_SCORER`) set to `value` inside the block,
    restored after."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def pooled_tile(override: dict):
    """The Gluon pooled stage-1 kernel's tile (`infllmv2_pooled_sm90.SM90_POOLED_TILE`) with `override`
    inside the block, restored after."""
    from stem_boost.kernels import infllmv2_pooled_sm90

    return library_setting(infllmv2_pooled_sm90, "SM90_POOLED_TILE", {**infllmv2_pooled_sm90.SM90_POOLED_TILE,
                                                                       **override})


def peer_ms(fn) -> float:
    """`timed(fn)`'s milliseconds, or NaN where the peer refuses these lists (a kernel asked for by name
    whose tile they do not fit raises ValueError before it runs)."""
    try:
        return timed(fn)[0]
    except ValueError as e:
        note(f"peer skipped: {e}")
        return float("nan")


def infllmv2_breakdown(attn, x, pe) -> dict:
    """Milliseconds of the parts: native InfLLMv2 selection (PyTorch), the kernel on its selection."""
    from stem_boost.kernels import sparse_attention
    from stem_boost.kernels.block_union import block_union_attention, tile_entries, union_block_lists, union_inflation
    from stem_boost.native.infllmv2 import infllmv2_select
    from stem_boost.adapters.infllmv2 import stem_block_selection
    from stem_boost.config import StemConfig
    from stem_boost.models.minicpm4.modeling_minicpm4 import apply_rotary_pos_emb

    B, S, _ = x.shape
    with torch.no_grad():
        q = attn.q_proj(x).view(B, S, 32, 128).transpose(1, 2)
        k = attn.k_proj(x).view(B, S, 2, 128).transpose(1, 2)
        v = attn.v_proj(x).view(B, S, 2, 128).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *pe)
        sel = infllmv2_select(q, k, attn.infllmv2, chunk_size=attn.select_chunk_size)
        ms_sel, _ = timed(lambda: infllmv2_select(q, k, attn.infllmv2, chunk_size=attn.select_chunk_size))
        selection = sel.to_selection()
        counts = selection.counts
        qT, kT, vT = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # the kernels' layout
        ms_kernel, _ = timed(lambda: sparse_attention(qT, kT, vT, selection, check=False))
        # the union tiles at other pipeline depths on the same lists (peers of the default)
        tile_peers = {name: timed(lambda: block_union_attention(qT, kT, vT, selection.idx, counts, block_size=64,
                                                                **kw))[0] for name, kw in UNION_TILE_PEERS.items()}
        # how much work the union tiles add on these lists: union entries x QT / per-token entries
        # (random weights give near-independent lists; the SmolLM2 testbed's real lists: 1.2 at QT 4)
        inflation = {qt: union_inflation(union_block_lists(selection.idx, counts, qt, n_units=-(-S // 64))[2], counts, qt)
                     for qt in (2, 4, 8)}
        # the same parts under Stem (reduce 0.18): its selection (bias + budgets inside) and the kernel
        cfg = StemConfig(reduce=0.18)
        plan_cache = {}  # as a wrapped layer keeps its schedules by length

        def stem_select():  # what the wrapped layer runs: schedule, OAM bias, selection
            return stem_block_selection(q, k, v, attn.infllmv2, cfg, attn.select_chunk_size, plan_cache)[0]
        ms_sel_stem, _ = timed(stem_select)
        stem_sel = stem_select().to_selection()
        ms_kernel_stem, _ = timed(lambda: sparse_attention(qT, kT, vT, stem_sel, check=False))
        stem_peers = {name: peer_ms(lambda: block_union_attention(qT, kT, vT, stem_sel.idx, stem_sel.counts, block_size=64,
                                                                  query_block=stem_sel.query_block, **kw))
                      for name, kw in UNION_TILE_PEERS.items()}  # rows of 4 tokens x 16 heads: no 128-row ws tile
        # the work of the kernel's 4-token tiles, against native's: union entries (a row of 4 tokens: its list)
        def tile_work(sel) -> int:
            return tile_entries(sel.idx, sel.counts, 4, query_block=sel.query_block, seq_q=S)
        native_union = tile_work(selection)
        stem_inflation = tile_work(stem_sel) * 4 / float(stem_sel.counts.sum() * stem_sel.query_block)
        # the per-token ranking (tile_tokens=1) beside the default's 4-token rows
        cfg_tokens = StemConfig(reduce=0.18, tile_tokens=1)
        tokens_cache = {}

        def stem_select_tokens():
            return stem_block_selection(q, k, v, attn.infllmv2, cfg_tokens, attn.select_chunk_size, tokens_cache)[0]
        ms_sel_tokens, _ = timed(stem_select_tokens)
        tokens_sel = stem_select_tokens().to_selection()
        ms_kernel_tokens, _ = timed(lambda: sparse_attention(qT, kT, vT, tokens_sel, check=False))
        # the selection with each pooled stage-1 tile (Hopper's Gluon kernel); the lists must not change
        pooled_peers = {}
        if torch.cuda.get_device_capability()[0] == 9:
            for name, tile in POOLED_TILE_PEERS.items():
                with pooled_tile(tile):
                    same = torch.equal(infllmv2_select(q, k, attn.infllmv2, chunk_size=attn.select_chunk_size)
                                       .to_selection().idx, selection.idx)
                    pooled_peers[f"native_selection_{name}_ms"] = timed(
                        lambda: infllmv2_select(q, k, attn.infllmv2, chunk_size=attn.select_chunk_size))[0]
                    pooled_peers[f"stem_selection_{name}_ms"] = timed(stem_select)[0]
                    pooled_peers[f"selection_{name}_same_lists"] = same
    return dict(native_selection_ms=ms_sel, kernel_native_ms=ms_kernel,
                **{f"kernel_native_{name}_ms": ms for name, ms in tile_peers.items()},
                mean_blocks_per_token=float(counts.float().mean()),
                union_inflation_qt2=inflation[2], union_inflation_qt4=inflation[4], union_inflation_qt8=inflation[8],
                stem_selection_ms=ms_sel_stem, kernel_stem_ms=ms_kernel_stem,
                **{f"kernel_stem_{name}_ms": ms for name, ms in stem_peers.items()},
                stem_blocks_per_token=float(stem_sel.counts.float().mean()), stem_union_inflation_qt4=stem_inflation,
                stem_rows_query_block=stem_sel.query_block,
                stem_tile_entries_over_native=tile_work(stem_sel) / native_union,
                stem_tokens_selection_ms=ms_sel_tokens, kernel_stem_tokens_ms=ms_kernel_tokens,
                stem_tokens_tile_entries_over_native=tile_work(tokens_sel) / native_union,
                **pooled_peers)


def list_overlap(got: torch.Tensor, want: torch.Tensor) -> float:
    """Share of want's selected keys that got selects in the same row: index lists [..., k], -1 = none."""
    big = torch.iinfo(torch.int32).max
    w = torch.where(want >= 0, want, big).sort(-1).values
    pos = torch.searchsorted(w.contiguous(), got.contiguous()).clamp(max=w.shape[-1] - 1)
    hit = (w.gather(-1, pos) == got) & (got >= 0)
    return int(hit.sum()) / max(1, int((want >= 0).sum()))


def parse_tile(items: list[str], defaults: dict) -> dict:
    """KEY=INT words -> a tile override whose keys are among `defaults`' (KEYS_FAST and other flags take 0 / 1)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise SystemExit(f"--pooled-tile {item!r}: expected KEY=INT with KEY one of {sorted(defaults)}")
        try:
            out[key] = int(value)
        except ValueError:
            raise SystemExit(f"--pooled-tile {item!r}: {value!r} is not an integer") from None
        if isinstance(defaults[key], bool):
            out[key] = bool(out[key])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["dsa", "infllmv2", "minicpm4-model"], nargs="+", default=["dsa", "infllmv2"],
                    help="minicpm4-model: the whole MiniCPM-4.1-8B-shaped model (--model-layers), not one layer")
    ap.add_argument("--model-layers", type=int, default=32, help="minicpm4-model: decoder layers (MiniCPM-4.1-8B: 32)")
    ap.add_argument("--seqs", type=int, nargs="+", default=[32768, 65536, 131072])
    ap.add_argument("--native-max-seq", type=int, default=0,
                    help="largest S to also time transformers' own DSA sdpa path at (0 = never; OOM from 16K)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--smooth", type=int, nargs="+", default=[0],
                    help="hidden-state windows (InfLLMv2, DeepSeek-V3.2: each in turn; the whole model: the first): 0 = "
                         "i.i.d. positions (the DSA bars' input); W > 1 = neighbours share W - 1 of W draws")
    ap.add_argument("--min-reps", type=int, default=3,
                    help="timed calls per median at least (5 made a 32K + 128K run of both families outlast 300 s; "
                         "a 128K Stem / native ratio needs 7: with 3 a median moved by up to 40 ms, BENCHMARKS.md §000000)")
    ap.add_argument("--peers", choices=["all", "main"], default="all",
                    help="DSA parts: 'main' skips the slower peers of the indexer / Stem step (other score dtype, radix "
                         "select, torch.topk, per-head value norms)")
    ap.add_argument("--select-chunk", type=int, default=None,
                    help="InfLLMv2: the attention module's select_chunk_size (default 1024, the model's own on CUDA); "
                         "the fused selection keeps its own 16384-row chunks except with the mass schedule")
    ap.add_argument("--union-kernel", choices=["triton", "sm90", "sm90_ws"], default=None,
                    help="the block walk's executor for every layer of the run (block_union.UNION_KERNEL; default: the "
                         "library's)")
    ap.add_argument("--fp8-scorer", choices=["triton", "sm90"], default=None,
                    help="DSA: the FP8 indexer's score kernel for the run (dsa_indexer.FP8_SCORER; default: the "
                         "library's)")
    ap.add_argument("--pooled-tile", nargs="+", default=None, metavar="KEY=INT",
                    help="InfLLMv2 on Hopper: overrides of the Gluon pooled stage-1 tile for the run "
                         "(infllmv2_pooled_sm90.SM90_POOLED_TILE), e.g. STEP=4 NUM_BUF=3")
    ap.add_argument("--block-rounds", type=int, default=0, metavar="N",
                    help="also time native and Stem in N rounds of blocks of one config (6 forwards back to back, the "
                         "first left out: each config at the clock its own forwards leave, as a server running only "
                         "it), beside the call-by-call alternation")
    ap.add_argument("--profile", action="store_true", help="print the CUDA kernels of one native and one Stem forward of each layer (torch.profiler)")
    ap.add_argument("--profile-ops", action="store_true",
                    help="with --profile: also the PyTorch operators (and input shapes) that launched kernels; with "
                         "--profile-ab: the operators whose kernels' time differs most")
    ap.add_argument("--profile-max-seq", type=int, default=None, help="with --profile: only rows up to this length")
    ap.add_argument("--sweep-peers", action="store_true",
                    help="also time the MLA kernel's SWEEP options on the last chunk (0.996-1.008x of the default "
                         "on an H100: off by default, 2 compiles and 4 kernels a length)")
    ap.add_argument("--profile-ab", type=int, default=0, metavar="N",
                    help="N profiled forwards of native and Stem each, in alternation: wall, kernel and idle time, and the "
                         "kernels that differ most (rows up to --profile-max-seq)")
    args = ap.parse_args()
    if args.model_layers < 1:
        ap.error(f"--model-layers must be at least 1, got {args.model_layers}")
    global PROFILE, PROFILE_TABLES, PROFILE_OPS, PROFILE_AB, MIN_REPS, ALL_PEERS, BLOCK_ROUNDS, SWEEP_TIMED
    PROFILE, MIN_REPS, ALL_PEERS = args.profile, max(1, args.min_reps), args.peers == "all"
    BLOCK_ROUNDS = max(0, args.block_rounds)
    SWEEP_TIMED = args.sweep_peers
    PROFILE_TABLES = args.profile
    PROFILE_OPS, PROFILE_AB = args.profile_ops, max(0, args.profile_ab)

    if (args.profile or PROFILE_AB) and args.profile_max_seq:
        PROFILE = args.profile_max_seq
    elif PROFILE_AB:
        PROFILE = True
    if not torch.cuda.is_available():
        sys.exit("bench_layers.py needs a CUDA GPU")
    if args.union_kernel:
        from stem_boost.kernels import block_union

        block_union.UNION_KERNEL = args.union_kernel
    if args.fp8_scorer:
        from stem_boost.native import dsa_indexer

        dsa_indexer.FP8_SCORER = args.fp8_scorer
    if args.pooled_tile:
        from stem_boost.kernels import infllmv2_pooled_sm90

        infllmv2_pooled_sm90.SM90_POOLED_TILE = {**infllmv2_pooled_sm90.SM90_POOLED_TILE,
                                                 **parse_tile(args.pooled_tile, infllmv2_pooled_sm90.SM90_POOLED_TILE)}
    torch.manual_seed(int(time.time()))
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for family in args.family:  # in the order given
        if family == "dsa":
            for window in args.smooth:
                res["rows"] += bench_dsa(args.seqs, "cuda", args.native_max_seq, window)
        elif family == "minicpm4-model":
            res["rows"] += bench_minicpm4_model(args.seqs, "cuda", args.smooth[0], args.model_layers)
        else:
            res["rows"] += bench_infllmv2(args.seqs, "cuda", args.smooth, args.select_chunk)
        if args.out:
            args.out.write_text(json.dumps(res, indent=1))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    print(f"\n{res['device']}  torch {res['torch']}")
    print("| layer | S | dense ms | native ms | Stem ms | dense/native | Stem/native | Stem/native, paired rounds "
          "| achieved reduce | peak GiB dense / native / Stem | first forward s (compiles): dense / native / Stem |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    nan = float("nan")
    for r in res["rows"]:
        print(f"| {r['family']}{' smooth ' + str(r['smooth_window']) if r.get('smooth_window') else ''} | {r['S']} | {r['dense_ms']:.1f} | {r['native_kernel_ms']:.1f} | {r['stem_ms']:.1f} | "
              f"{r['dense_ms'] / r['native_kernel_ms']:.2f} | {r['stem_over_native']:.3f} | "
              f"{r.get('stem_over_native_paired', nan):.3f} | {r['reduce_achieved']:.3f} | "
              f"{r['dense_gib']:.1f} / {r['native_kernel_gib']:.1f} / {r['stem_gib']:.1f} | "
              f"{r.get('dense_first_call_s', nan):.1f} / {r.get('native_kernel_first_call_s', nan):.1f} / "
              f"{r.get('stem_first_call_s', nan):.1f} |")
    tokens = [r for r in res["rows"] if "stem_tokens_ms" in r]
    if tokens:
        print("\n| InfLLMv2 S | Stem ms: 4-token rows (default) | per-token ranking | Stem/native: rows | per token "
              "| paired: rows / per token | kernel's tile work / native's: rows / per token | selection ms: rows / "
              "per token | kernel ms: native / rows / per token |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in tokens:
            print(f"| {r['S']} | {r['stem_ms']:.1f} | {r['stem_tokens_ms']:.1f} | {r['stem_over_native']:.3f} | "
                  f"{r['stem_tokens_ms'] / r['native_kernel_ms']:.3f} | {r.get('stem_over_native_paired', nan):.3f} / "
                  f"{r.get('stem_tokens_over_native_paired', nan):.3f} | "
                  f"{r.get('stem_tile_entries_over_native', nan):.3f} / {r.get('stem_tokens_tile_entries_over_native', nan):.3f} | "
                  f"{r.get('stem_selection_ms', nan):.1f} / {r.get('stem_tokens_selection_ms', nan):.1f} | "
                  f"{r.get('kernel_native_ms', nan):.1f} / {r.get('kernel_stem_ms', nan):.1f} / "
                  f"{r.get('kernel_stem_tokens_ms', nan):.1f} |")
    blocks = [r for r in res["rows"] if "native_kernel_blocks_ms" in r]
    if blocks:
        print("\n| layer | S | blocks of one config: native ms | Stem ms | Stem/native | paired rounds "
              "| mean SM MHz native / Stem |")
        print("|---|---|---|---|---|---|---|")
        for r in blocks:
            print(f"| {r['family']} | {r['S']} | {r['native_kernel_blocks_ms']:.1f} | {r['stem_blocks_ms']:.1f} | "
                  f"{r['stem_over_native_blocks']:.3f} | {r['stem_over_native_blocks_paired']:.3f} | "
                  f"{r['native_kernel_blocks_sm_mhz']:.0f} / {r['stem_blocks_sm_mhz']:.0f} |")
    inf = [r for r in res["rows"] if "union_inflation_qt4" in r]
    if inf:
        print("\n| InfLLMv2 S (smooth window) | selection ms | kernel ms (native) | the same, "
              + " / ".join(UNION_TILE_PEERS) + " | blocks / token | union inflation QT 2 / 4 / 8 "
              "| Stem: selection ms | kernel ms | the same, " + " / ".join(UNION_TILE_PEERS)
              + " | blocks / token | inflation QT 4 |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in inf:
            peers = " / ".join(f"{r.get(f'kernel_native_{n}_ms', float('nan')):.1f}" for n in UNION_TILE_PEERS)
            print(f"| {r['S']} ({r.get('smooth_window', 0)}) | {r['native_selection_ms']:.1f} | {r['kernel_native_ms']:.1f} | "
                  f"{peers} | "
                  f"{r['mean_blocks_per_token']:.1f} | {r['union_inflation_qt2']:.2f} / {r['union_inflation_qt4']:.2f} / "
                  f"{r['union_inflation_qt8']:.2f} | {r['stem_selection_ms']:.1f} | {r['kernel_stem_ms']:.1f} | "
                  + " / ".join(f"{r.get(f'kernel_stem_{n}_ms', float('nan')):.1f}" for n in UNION_TILE_PEERS)
                  + f" | {r['stem_blocks_per_token']:.1f} | {r['stem_union_inflation_qt4']:.2f} |")
    pooled = [r for r in inf if any(f"native_selection_{n}_ms" in r for n in POOLED_TILE_PEERS)]
    if pooled:
        print("\n| InfLLMv2 S | selection ms, native / Stem: the run's pooled tile | "
              + " | ".join(f"{n}" for n in POOLED_TILE_PEERS) + " | same lists |")
        print("|---|---|" + "---|" * len(POOLED_TILE_PEERS) + "---|")
        for r in pooled:
            print(f"| {r['S']} | {r['native_selection_ms']:.2f} / {r['stem_selection_ms']:.2f} | "
                  + " | ".join(f"{r[f'native_selection_{n}_ms']:.2f} / {r[f'stem_selection_{n}_ms']:.2f}"
                               for n in POOLED_TILE_PEERS)
                  + " | " + " / ".join(str(r[f"selection_{n}_same_lists"]) for n in POOLED_TILE_PEERS) + " |")
    dsa = [r for r in res["rows"] if "stem_step_radix_ms" in r]
    if dsa:
        from stem_boost.kernels.dispatch import TOKEN_KEY_STEP as step

        print(f"\n| DSA S | Stem ms: budget step {step} (default) | step 1 (exact line) | kernel ms, last 16K queries: "
              f"native | Stem step {step} | Stem step 1 | pairs there: Stem / native, step {step} | step 1 |")
        print("|---|---|---|---|---|---|---|---|")
        for r in dsa:
            print(f"| {dsa_label(r)} | {r['stem_ms']:.1f} | {r['stem_step1_ms']:.1f} | {r['kernel_native_last_chunk_ms']:.2f} | "
                  f"{r['kernel_stem_last_chunk_ms']:.2f} | {r['kernel_stem_step1_last_chunk_ms']:.2f} | "
                  f"{r['last_chunk_pairs_stem'] / r['last_chunk_pairs_native']:.4f} | "
                  f"{r['last_chunk_pairs_stem_step1'] / r['last_chunk_pairs_native']:.4f} |")
        peers = [r for r in dsa if any(f"kernel_last_chunk_{m}_ms" in r for m in COUNT_PEERS)]
        if peers:
            names = [m for m in COUNT_PEERS if f"kernel_last_chunk_{m}_ms" in peers[0]]
            print("\n| DSA S | kernel ms, last 16K queries: native | Stem | " + " | ".join(names)
                  + " | pairs / native's: Stem | " + " | ".join(names) + " |")
            print("|---|---|---|" + "---|" * len(names) + "---|" + "---|" * len(names))
            for r in peers:
                n = r["last_chunk_pairs_native"]
                print(f"| {dsa_label(r)} | {r['kernel_native_last_chunk_ms']:.2f} | {r['kernel_stem_last_chunk_ms']:.2f} | "
                      + " | ".join(f"{r[f'kernel_last_chunk_{m}_ms']:.2f}" for m in names)
                      + f" | {r['last_chunk_pairs_stem'] / n:.4f} | "
                      + " | ".join(f"{r[f'last_chunk_pairs_{m}'] / n:.4f}" for m in names) + " |")
        paired = [r for r in dsa if r.get("kernel_last_chunk_paired")]
        if paired:  # each list's kernel time over native's, the median of the rounds of one alternation
            names = list(paired[0]["kernel_last_chunk_paired"])
            print("\n| DSA S | last-chunk kernel / native's, paired rounds: " + " | ".join(names) + " |")
            print("|---|" + "---|" * len(names))
            for r in paired:
                ratios = r["kernel_last_chunk_paired"]
                print(f"| {dsa_label(r)} | " + " | ".join(f"{ratios.get(n, float('nan')):.3f}" for n in names) + " |")
        swept = [r for r in dsa if any(f"kernel_last_chunk_stem_sweep{n}_ms" in r for n in SWEEP_PEERS)]
        if swept:
            print("\n| DSA S | kernel ms, last 16K queries: native | Stem | "
                  + " | ".join(f"native SWEEP {n} | Stem SWEEP {n}" for n in SWEEP_PEERS) + " |")
            print("|---|---|---|" + "---|---|" * len(SWEEP_PEERS))
            for r in swept:
                nan = float("nan")
                print(f"| {dsa_label(r)} | {r['kernel_native_last_chunk_ms']:.2f} | {r['kernel_stem_last_chunk_ms']:.2f} | "
                      + " | ".join(f"{r.get(f'kernel_last_chunk_native_sweep{n}_ms', nan):.2f} | "
                                   f"{r.get(f'kernel_last_chunk_stem_sweep{n}_ms', nan):.2f}" for n in SWEEP_PEERS) + " |")
        sm90 = [r for r in dsa if r.get("indexer_topk_sm90_scorer_ms") == r.get("indexer_topk_sm90_scorer_ms")]
        if sm90:  # a number (not NaN): the Gluon FP8 scorer ran beside the run's
            print("\n| DSA S | indexer + top-k ms: the run's FP8 scorer | Gluon sm_90 scorer | top-k overlap |")
            print("|---|---|---|---|")
            for r in sm90:
                ov = r["indexer_sm90_scorer_overlap"]
                print(f"| {dsa_label(r)} | {r['indexer_topk_ms']:.1f} | {r['indexer_topk_sm90_scorer_ms']:.1f} | "
                      f"{'-' if ov is None else f'{ov:.5f}'} |")
        print("\n| DSA S | indexer + top-k ms: default (dtype, sampled) | other dtype | radix select | radix = sampled | "
              "torch.topk | Stem step ms: fused | radix | same set | value norms ms: kept Gram | Gram each call | "
              "Gram fp32 | per head | "
              "max rel. diff (per head / fp32) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in dsa:
            print(f"| {dsa_label(r)} | {r['indexer_topk_ms']:.1f} ({r['indexer_dtype']}) | {r['indexer_topk_other_dtype_ms']:.1f} "
                  f"({r['indexer_other_dtype']}) | {r['indexer_topk_radix_ms']:.1f} | {r['radix_same_set']} | "
                  f"{r['indexer_topk_torch_ms']:.1f} | "
                  f"{r['stem_step_ms']:.1f} | "
                  f"{r['stem_step_radix_ms']:.1f} | {r['stem_step_same_set']} | {r['value_norms_ms']:.2f} | "
                  f"{r['value_norms_with_gram_ms']:.2f} | {r['value_norms_fp32_ms']:.2f} | {r['value_norms_per_head_ms']:.1f} | "
                  f"{r['value_norms_max_rel_err']:.1e} / {r['value_norms_fp32_rel_err']:.1e} |")
    print_cut_places([r for r in res["rows"] if "stem_cut_chunks_ms" in r or "indexer_topk_with_cut_ms" in r])


def print_cut_places(rows: list[dict]) -> None:
    """Where Stem cuts a DSA prefill: after the indexer's loop (the layer's "stem", the default) against
    inside it ("stem_cut_chunks"), both over native, and the indexer alone / with the in-loop cut in one
    alternation."""
    if not rows:
        return
    nan = float("nan")
    print("\n| DSA S | native ms | Stem ms: cut after the indexer loop | in it | paired / native: after | in it "
          "| indexer + top-k ms: alone | with the cut in its loop | the cut there ms | the block cut there ms "
          "| the cut there, one stream ms | Stem step after the loop ms | same set |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        alone, with_cut = r.get("indexer_topk_ms", nan), r.get("indexer_topk_with_cut_ms", nan)
        print(f"| {dsa_label(r)} | {r['native_kernel_ms']:.1f} | {r['stem_ms']:.1f} | {r.get('stem_cut_chunks_ms', nan):.1f} | "
              f"{r.get('stem_over_native_paired', nan):.3f} | {r.get('stem_cut_chunks_over_native_paired', nan):.3f} | "
              f"{alone:.1f} | {with_cut:.1f} | {with_cut - alone:.2f} | "
              f"{r.get('indexer_topk_with_block_cut_ms', nan) - alone:.2f} | "
              f"{r.get('indexer_topk_with_cut_one_stream_ms', nan) - alone:.2f} | {r.get('stem_step_ms', nan):.2f} | "
              f"{r.get('cut_in_loop_same_set')} |")


if __name__ == "__main__":
    main()
