"""Stem on InfLLMv2 (MiniCPM-4 / MiniCPM-4.1, `stem_boost.models.minicpm4`).

`wrap` swaps each attention's `sparse_forward` (the native InfLLMv2 path) for `stem_sparse_forward`,
which reads as the native path with Stem's two inputs given to the native selector:

    budgets = TPD plan over query blocks          k_free [S]: non-forced blocks each query row keeps
    bias    = OAM(max over the block of ||v||)    [B, Hk, n_blocks], added in log space to the native
                                                  block score (a softmax mass summed over the GQA group)
    blocks  = infllmv2_select(q, k, key_bias=bias, k_free=budgets)   native selector, Stem inside
    out     = sparse_attention(q, k, v, blocks.to_selection())       the shared kernel in block mode

Forced blocks (init blocks, the local window and the diagonal block) are always kept and are not
counted against the budget. TPD runs over query blocks (the `block_size` query tokens of a block
share one budget; pairs are counted per token). Decode steps (one query) keep the native selection.
A padded batch reaches this function one row at a time, cut to its real tokens (the model's
`padded_sparse_forward`), so every row is planned on its own length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..boost import plan_for
from ..config import StemConfig
from ..kernels.dense import dense_causal_attention
from ..mass import mass_budgets
from ..models.minicpm4.modeling_minicpm4 import BatchRow, attend_blocks
from ..native.infllmv2 import BlockScores, BlockSelection, InfLLMv2Params, infllmv2_select
from ..oam import block_max, oam_bias, value_norms
from ..selection import Selection
from ..stats import LayerStats
from ..tpd import BudgetPlan, block_available

__all__ = ["is_infllmv2_attention", "wrap_modules", "unwrap_modules", "stem_sparse_forward", "stem_block_selection"]


def is_infllmv2_attention(module: torch.nn.Module) -> bool:
    """An attention with an InfLLMv2 `sparse_config` and q/k/v/o projections."""
    has_proj = all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj"))
    sparse = getattr(module, "infllmv2", None) is not None or getattr(getattr(module, "config", None),
                                                                         "sparse_config", None) is not None
    return has_proj and sparse


@dataclass
class InfState:
    cfg: StemConfig
    stats: LayerStats
    saved_forward: object
    last_selection: BlockSelection | None = None
    plans: dict = field(default_factory=dict)  # budget schedules by (T, S, device): `token_plan`


def query_block_plan(params: InfLLMv2Params, T: int, S: int, cfg: StemConfig) -> tuple[BudgetPlan, torch.Tensor]:
    """TPD plan over the query blocks of a prefill of S tokens (T keys): rows are query blocks,
    `available` their non-forced causal key blocks, k_native the native free budget
    (k_total - init - local - diagonal). Returns the plan and the native free budget per row [R]."""
    bs = params.block_size
    n_rows = -(-S // bs)
    available = block_available(n_rows, -(-T // bs), query_block=bs, block_size=bs, n_init=params.init_blocks,
                                n_local=params.local_blocks + 1, seq_q=S)
    k_native = max(1, params.k_total(T) - params.init_blocks - params.local_blocks - 1)
    return plan_for(available, k_native, cfg), torch.clamp(available, max=k_native)


def block_bias(v: torch.Tensor, block_size: int, cfg: StemConfig) -> torch.Tensor:
    """OAM bias per (batch, kv head, key block) from v [B, Hk, T, D] -> [B, Hk, n_blocks]."""
    norms = value_norms(v.transpose(1, 2))  # [B, Hk, T]: the group's query heads share this v head
    return oam_bias(block_max(norms, block_size), beta=cfg.beta, norm=cfg.oam_norm)


def mass_free_budgets(native_free_per_token: torch.Tensor, reduce: float):
    """`schedule="mass"`: a chunk's budgets are the native free selection of each token row (its top
    `native_free[c]` non-forced candidates by native score) minus the `reduce` fraction of the chunk's
    pairs with the lowest mass (`stem_boost.mass`). Returns the per-chunk budget function."""

    k_max = int(native_free_per_token.max()) if native_free_per_token.numel() else 0  # one sync per layer

    def budgets(bs: BlockScores) -> torch.Tensor:  # -> [B, Hk, C]
        # the budgets depend only on the scores of each row's native free selection (its top
        # native_free[c] non-forced candidates), so the top k_max of each row stand in for a sort of
        # all its blocks; ties at the edge have equal scores, so which one is taken changes nothing
        native_free = native_free_per_token[bs.rows]  # [C]
        free = bs.candidate & ~bs.forced  # [C, NB]
        k = max(1, min(k_max, free.shape[-1]))
        top = bs.scores.masked_fill(~free, float("-inf")).topk(k, dim=-1).values  # [B, Hk, C, k]
        n_sel = torch.minimum(native_free, free.sum(-1))  # [C]
        sel = torch.arange(k, device=top.device) < n_sel.view(1, 1, -1, 1)  # [B, Hk, C, k] after broadcast
        return mass_budgets(top, sel.expand_as(top), reduce, space="prob")

    return budgets


@dataclass
class TokenPlan:
    """A prefill's budget schedule, per query token, where the selector reads it.

    plan: the TPD plan over query blocks (CPU); k_free [S] long on the device: non-forced blocks each
    query token keeps; native_free [S] long (CPU): the native free budget per token; k_free_max:
    max(k_free), known on the host (the selector's list width without asking the device)."""

    plan: BudgetPlan
    k_free: torch.Tensor
    native_free: torch.Tensor
    k_free_max: int


def token_plan(params: InfLLMv2Params, T: int, S: int, cfg: StemConfig, device: torch.device,
               cache: dict | None = None) -> TokenPlan:
    """`query_block_plan` spread over the S query tokens, its budgets copied to `device` once per
    (T, S) when `cache` (a layer's) is given: the plan depends only on the lengths and the config,
    and a copy from the host every forward is a host synchronisation (the GPU idles while Python
    launches the selection after it)."""
    key = (T, S, str(device))
    if cache is not None and key in cache:
        return cache[key]
    plan, native_free = query_block_plan(params, T, S, cfg)
    row_of_token = torch.arange(S) // params.block_size
    budgets = plan.budgets[row_of_token]  # [S]
    out = TokenPlan(plan=plan, k_free=budgets.to(device), native_free=native_free[row_of_token],
                    k_free_max=int(budgets.max()) if S else 0)
    if cache is not None:
        if len(cache) >= 8:  # a few lengths at a time (a benchmark's, a padded batch's rows)
            cache.pop(next(iter(cache)))
        cache[key] = out
    return out


def stem_block_selection(sel_q: torch.Tensor, sel_k: torch.Tensor, v: torch.Tensor, params: InfLLMv2Params,
                         cfg: StemConfig, chunk: int, plan_cache: dict | None = None
                         ) -> tuple[BlockSelection, BudgetPlan, torch.Tensor]:
    """Steps 1-3 of a Stem prefill: the budget schedule, the OAM bias and the native selector with
    both inside. sel_q [B, Hq, S, D], sel_k / v [B, Hk, T, D] -> (blocks idx [B, Hk, S, K], the TPD
    plan over query blocks, the native free budget per query token [S]). `plan_cache`: a layer's
    cache of schedules by length (`token_plan`)."""
    S, T = sel_q.shape[2], sel_k.shape[2]
    # 1. the budget schedule: non-forced blocks per query token (rows of one query block share it)
    tp = token_plan(params, T, S, cfg, sel_q.device, plan_cache)
    budget_fn = mass_free_budgets(tp.native_free.to(sel_q.device), cfg.reduce) if cfg.schedule == "mass" else None
    # 2. OAM: the value-norm bias of every key block
    bias = block_bias(v, params.block_size, cfg) if cfg.beta > 0 else None  # [B, Hk, n_blocks]
    # 3. the native selector with Stem's bias and budgets: idx [B, Hk, S, K]
    blocks = infllmv2_select(sel_q, sel_k, params, q_offset=T - S, chunk_size=chunk, key_bias=bias,
                             k_free=tp.k_free, k_free_max=tp.k_free_max, free_budget_fn=budget_fn,
                             tile_rows=cfg.tile_tokens_for(sel_q.shape[1] // sel_k.shape[1]))
    return blocks, tp.plan, tp.native_free


def stem_sparse_forward(module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        params: InfLLMv2Params, *, q_nope: torch.Tensor | None = None,
                        k_nope: torch.Tensor | None = None, batch_row: BatchRow | None = None) -> torch.Tensor:
    """Stem's InfLLMv2 path of one attention module (see the module docstring); `batch_row` says
    which row of a padded batch this call runs.

    q [B, Hq, S, D] (RoPE applied), k / v [B, Hk, T, D] (the whole cache) -> [B, Hq, S, D]."""
    st: InfState = module._stem
    cfg = st.cfg
    if cfg.dense:  # the dense baseline: every causal key, no selector
        return dense_causal_attention(q, k, v, module.scaling)
    S, T = q.shape[2], k.shape[2]
    sel_q, sel_k = (q_nope, k_nope) if params.use_nope else (q, k)
    chunk = module.select_chunk_size or (1024 if q.is_cuda else 64)
    if S == 1 or cfg.is_identity:  # decode, or the identity configuration: the native selection
        blocks = infllmv2_select(sel_q, sel_k, params, q_offset=T - S, chunk_size=chunk)
        plan = native_free = None
    else:
        blocks, plan, native_free = stem_block_selection(sel_q, sel_k, v, params, cfg, chunk, st.plans)
    selection = blocks.to_selection()  # per-row counts and forced counts: what the stats count too
    if S > 1:
        record_stats(st, blocks, selection, plan, native_free, batch_row, S)
    # 4. attention over the selected blocks (the shared kernel on GPUs)
    return attend_blocks(q, k, v, selection, module.scaling, cfg.backend)


def record_stats(st: InfState, blocks: BlockSelection, selection: Selection, plan: BudgetPlan | None,
                 native_free: torch.Tensor | None, batch_row: BatchRow | None, seq_q: int) -> None:
    """Budget accounting of a prefill: free (non-forced) selected blocks per query token, native vs
    Stem, per batch row and in total. A padded batch arrives row by row: its first sparse row resets
    the layer's numbers, the others fill their slot (rows too short to be sparse keep 0). The counts
    stay on the device until the stats are read (`LayerStats.defer`: no host synchronisation here).
    `selection` is `blocks.to_selection()`: its per-row counts and forced counts give the free blocks
    without another pass over the [B, Hk, S, Kmax] lists. A selection with one row per group of
    tokens (`tile_tokens`) counts each row once for every token of its group."""
    free = selection.counts - selection.n_forced  # [B, Hk, R] free selected blocks per row
    n_forced = selection.n_forced
    if selection.query_block > 1:  # [B, Hk, R] -> [B, Hk, S]: per query token
        free = free.repeat_interleave(selection.query_block, dim=2)[:, :, :seq_q]
        n_forced = n_forced.repeat_interleave(selection.query_block, dim=2)[:, :, :seq_q]
    B, Hk = free.shape[:2]
    row_stem = free.sum(dim=(1, 2))  # [B] on the device
    forced = n_forced.sum()  # [] on the device
    fresh = batch_row is None or batch_row.first
    trace = None
    if fresh:  # a light per-position trace of the first row and head for plots
        per_token = free[0, 0]
        trace = per_token[::max(1, per_token.numel() // 512)].clone()  # a copy: [S] is not kept
    native_total = int(native_free.sum()) * Hk if native_free is not None else None  # native_free: host
    alpha = plan.alpha if plan is not None else 1.0
    slots = range(B) if batch_row is None else [batch_row.index]
    n = B if batch_row is None else batch_row.count
    seq_len = blocks.q_offset + seq_q
    reduce = st.cfg.reduce

    def update(s: LayerStats) -> None:
        stem = row_stem.tolist()
        if fresh:
            s.row_native_pairs, s.row_stem_pairs, s.row_alpha = [0] * n, [0] * n, [1.0] * n
            s.forced_pairs, s.seq_len = 0, 0
            s.budget_stem = trace.tolist()
            s.budget_native = list(s.budget_stem) if plan is None else []
        for i, b in enumerate(slots):
            s.row_native_pairs[b] = native_total if native_total is not None else stem[i]
            s.row_stem_pairs[b], s.row_alpha[b] = stem[i], alpha
        s.native_pairs, s.stem_pairs = sum(s.row_native_pairs), sum(s.row_stem_pairs)
        s.forced_pairs += int(forced)
        s.alpha = alpha
        s.reduce_requested = reduce
        s.seq_len = max(s.seq_len, seq_len)

    st.stats.defer(update, fresh=fresh)
    st.last_selection = blocks if st.cfg.keep_selections else None  # kept only on request (memory)


def wrap_modules(modules: list[torch.nn.Module], cfgs: list[StemConfig]) -> None:
    """Install Stem's sparse forward on MiniCPM-4 attention modules (cfgs: one per module)."""
    from . import infllmv2_remote

    if len(cfgs) != len(modules):
        raise ValueError(f"wrap_modules: {len(cfgs)} configurations for {len(modules)} modules")
    for m, cfg in zip(modules, cfgs):
        if not hasattr(m, "sparse_forward"):
            if not infllmv2_remote.is_remote_infllmv2_attention(m):
                raise ValueError(
                    f"{type(m).__name__} (layer {getattr(m, 'layer_idx', '?')}) has neither the InfLLMv2 hook point "
                    f"`sparse_forward` nor the remote-code attributes {infllmv2_remote.REMOTE_ATTRS}: load the "
                    "checkpoint with stem_boost.models.minicpm4 (no trust_remote_code) — it reads the official "
                    "config.json and safetensors as they are"
                )
            infllmv2_remote.install(m)  # trust_remote_code modules: the native hook point and forward
        m._stem = InfState(cfg=cfg, stats=LayerStats(layer=int(m.layer_idx), family="infllmv2"),
                           saved_forward=m.sparse_forward)
        m.sparse_forward = stem_sparse_forward


def unwrap_modules(modules: list[torch.nn.Module]) -> None:
    from . import infllmv2_remote

    for m in modules:
        m.sparse_forward = m._stem.saved_forward
        del m._stem
        if infllmv2_remote.is_installed(m):
            infllmv2_remote.uninstall(m)
