"""Stem on InfLLMv2 (MiniCPM-4 / MiniCPM-4.1, `stem_boost.models.minicpm4`).

The native attention (`MiniCPM4Attention`) exposes three hook points that the wrap installs:
  rescore(block_scores)      OAM + TPD between the native block scores and the top-k: the native
                             score (a softmax mass summed over the GQA group, probability-like) is
                             combined in log space with beta * relu(z(log max_{t in block} ||v_t||));
                             the TPD budget of non-forced blocks replaces the native `k_total - forced`.
  selection_hook(selection)  budget accounting (`stem_boost.stats`).
  sparse_attention_fn(...)   the shared Triton kernel in block mode (block lists per query token,
                             the 16 heads of a GQA group tiled together); on the CPU the native
                             PyTorch block attention.
Forced blocks (init blocks, the local window and the diagonal block) are always kept and are not
counted against the budget. TPD runs over query blocks (rows of `block_size` query tokens share
one budget; pairs are counted per token). Decode steps (one query) keep the native selection.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..boost import plan_for
from ..config import StemConfig
from ..mass import mass_budgets
from ..models.minicpm4.modeling_minicpm4 import kernel_block_attention
from ..oam import block_max, combine_scores, oam_bias, value_norms
from ..stats import LayerStats
from ..tpd import BudgetPlan, block_available

HOOKS = ("rescore", "selection_hook", "sparse_attention_fn")


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
    saved: tuple
    plan: BudgetPlan | None = None
    native_rows: torch.Tensor | None = None  # [R] native free blocks per query-block row
    budgets: torch.Tensor | None = None  # plan.budgets on the model's device
    native_dev: torch.Tensor | None = None  # native_rows on the model's device
    bias_key: tuple | None = None
    bias: torch.Tensor | None = None
    last_selection: object | None = None


def _plan(state: InfState, params, T: int, S: int) -> BudgetPlan:
    """TPD plan over the query blocks of a prefill of S tokens (T keys): rows are query blocks,
    `available` their non-forced causal key blocks, k_native the native free budget
    (k_total - init - local - diagonal)."""
    bs = params.block_size
    n_rows = -(-S // bs)
    available = block_available(n_rows, -(-T // bs), query_block=bs, block_size=bs, n_init=params.init_blocks,
                                n_local=params.local_blocks + 1, seq_q=S)
    k_native = max(1, params.k_total(T) - params.init_blocks - params.local_blocks - 1)
    state.native_rows = torch.clamp(available, max=k_native)
    return plan_for(available, k_native, state.cfg)


def _block_bias(state: InfState, v: torch.Tensor, block_size: int) -> torch.Tensor:
    """OAM bias per (batch, kv head, key block) from v [B, Hk, T, D] (cached per forward)."""
    key = (v.data_ptr(), tuple(v.shape))
    if state.bias_key != key:
        norms = value_norms(v.transpose(1, 2))  # [B, Hk, T]: the group's query heads share this v head
        state.bias = oam_bias(block_max(norms, block_size), beta=state.cfg.beta, norm=state.cfg.oam_norm)
        state.bias_key = key
    return state.bias


def _rescore(state: InfState, bs, *, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, module):
    """The Stem hook on one chunk of native block scores (see the module docstring)."""
    S, T = q.shape[2], k.shape[2]
    cfg = state.cfg
    if S == 1 or cfg.is_identity:
        return bs
    params = module.infllmv2
    if bs.rows.start == 0:
        state.plan = _plan(state, params, T, S)
        # one host-to-device copy per forward: a pageable copy per chunk would stall the launches
        state.budgets = state.plan.budgets.to(q.device)
        state.native_dev = state.native_rows.to(q.device)
    rows = torch.div(bs.q_pos - (T - S), params.block_size, rounding_mode="floor")
    k_free = state.budgets[rows]
    if cfg.schedule == "mass":  # this chunk's cut goes to the native free blocks of least predicted mass
        k_free = _mass_k_free(bs, state.native_dev[rows], cfg.reduce)
    if cfg.beta > 0:
        nb = bs.scores.shape[-1]
        bias = _block_bias(state, v, params.block_size)[..., :nb].unsqueeze(2)  # [B, Hk, 1, nb]
        scores = combine_scores(bs.scores, bias.expand_as(bs.scores), space="prob")
        bs.scores = torch.where(bs.forced & bs.candidate, bs.scores, scores)
    bs.k_free = k_free
    return bs


def _mass_k_free(bs, native_free: torch.Tensor, reduce: float) -> torch.Tensor:
    """[B, Hk, C] budgets of non-forced blocks for `schedule="mass"`: the native free selection of each
    token row (its top `native_free[c]` non-forced candidates by native score) minus the `reduce`
    fraction of this chunk's pairs with the lowest mass (`stem_boost.mass`)."""
    free = (bs.candidate & ~bs.forced).expand_as(bs.scores)  # [C, NB] -> [B, Hk, C, NB]
    ranked = bs.scores.masked_fill(~free, float("-inf")).sort(dim=-1, descending=True)
    arange = torch.arange(free.shape[-1], device=free.device).expand_as(free)
    rank = torch.empty_like(ranked.indices).scatter_(-1, ranked.indices, arange)
    native_sel = free & (rank < native_free.view(1, 1, -1, 1))
    return mass_budgets(bs.scores, native_sel, reduce, space="prob")


def _on_selection(state: InfState, layer_idx: int, selection) -> None:
    """Budget accounting of a prefill: free (non-forced) selected blocks, per query token."""
    if selection.idx.shape[2] <= 1:
        return
    valid = selection.idx >= 0
    free = valid & ~selection.forced
    forced = valid & selection.forced
    B, Hk = selection.idx.shape[:2]
    s = state.stats
    s.stem_pairs = int(free.sum())
    s.forced_pairs = int(forced.sum())
    if state.plan is not None and not state.cfg.is_identity:
        S = selection.idx.shape[2]
        rows = torch.div(torch.arange(S), selection.block_size, rounding_mode="floor")
        s.native_pairs = int(state.native_rows[rows].sum()) * B * Hk
        s.alpha = state.plan.alpha
    else:
        s.native_pairs = s.stem_pairs
        s.alpha = 1.0
    s.reduce_requested = state.cfg.reduce
    s.seq_len = selection.q_offset + selection.idx.shape[2]
    per_token = free[0, 0].sum(-1)
    step = max(1, per_token.numel() // 512)
    s.budget_stem = per_token[::step].tolist()
    s.budget_native = per_token[::step].tolist() if state.cfg.is_identity else []
    state.last_selection = selection


def _attend(state: InfState, native_fn, q, k, v, idx, block_size, *, q_offset: int, sm_scale: float):
    """Block-sparse attention through the shared kernel. q [B, Hq, S, D] (HF layout) -> [B, Hq, S, D]."""
    use_triton = state.cfg.backend == "triton" or (state.cfg.backend == "auto" and q.is_cuda)
    if not use_triton:
        return native_fn(q, k, v, idx, block_size, q_offset=q_offset, sm_scale=sm_scale)
    return kernel_block_attention(q, k, v, idx, block_size, q_offset=q_offset, sm_scale=sm_scale)


def wrap_modules(modules: list[torch.nn.Module], cfgs: list[StemConfig]) -> None:
    """Install the Stem hooks on native MiniCPM-4 attention modules (cfgs: one per module)."""
    from . import infllmv2_remote

    if len(cfgs) != len(modules):
        raise ValueError(f"wrap_modules: {len(cfgs)} configurations for {len(modules)} modules")
    for m, cfg in zip(modules, cfgs):
        if not all(hasattr(m, h) for h in HOOKS):
            if not infllmv2_remote.is_remote_infllmv2_attention(m):
                raise ValueError(
                    f"{type(m).__name__} (layer {getattr(m, 'layer_idx', '?')}) has neither the InfLLMv2 hook points "
                    f"nor the remote-code attributes {infllmv2_remote.REMOTE_ATTRS}: load the checkpoint with "
                    "stem_boost.models.minicpm4 (no trust_remote_code) — it reads the official config.json and "
                    "safetensors as they are"
                )
            infllmv2_remote.install(m)  # trust_remote_code modules: native hook points and forward
        state = InfState(cfg=cfg, stats=LayerStats(layer=int(m.layer_idx), family="infllmv2"),
                         saved=tuple(getattr(m, h) for h in HOOKS))
        m._stem = state
        m.rescore = functools.partial(_rescore, state, module=m)
        m.selection_hook = functools.partial(_on_selection, state)
        m.sparse_attention_fn = functools.partial(_attend, state, state.saved[2])


def unwrap_modules(modules: list[torch.nn.Module]) -> None:
    for m in modules:
        for h, fn in zip(HOOKS, m._stem.saved):
            setattr(m, h, fn)
        del m._stem
        if getattr(m, "_stem_remote", False):
            from . import infllmv2_remote

            infllmv2_remote.uninstall(m)
