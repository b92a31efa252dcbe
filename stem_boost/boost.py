"""The Stem step shared by every adapter: native candidates -> OAM rescoring -> TPD truncation.

    selection, plan = boost_candidates(cand_idx, cand_scores, key_norms, available, k_native, cfg)

cand_idx / cand_scores [B, Hsel, R, Kc]: the native method's candidates (before its own cut, or
its top-k list) and their native scores; key_norms [B, Hsel, N]: value norms per key unit,
already pooled over the heads that share a selection (and max-pooled over blocks); available [R]:
non-forced causally valid key units per row (what the `reduce` contract counts).
"""

from __future__ import annotations

import functools

import torch

from .config import StemConfig
from .mass import mass_budgets
from .oam import combine_scores, oam_bias
from .select import Selection, stem_select, truncate_by_score
from .tpd import BudgetPlan, plan_budgets, plan_uniform


@functools.lru_cache(maxsize=64)
def _cached_plan(available_key: tuple, k_native: int, reduce: float, alpha_min: float,
                 schedule: str = "tpd") -> BudgetPlan:
    kind, a, b = available_key
    if kind == "arange":  # available_i = a + i + 1 for i < b (token rows, queries at offset a)
        available = torch.arange(b, dtype=torch.long) + a + 1
    else:
        available = torch.tensor(a, dtype=torch.long)
    if schedule in ("uniform", "mass"):  # mass: the per-row budgets come from the scores (boost_candidates)
        return plan_uniform(available, k_native, reduce)
    return plan_budgets(available, k_native, reduce, alpha_min=alpha_min)


def plan_for(available: torch.Tensor, k_native: int, cfg: StemConfig) -> BudgetPlan:
    """Budget plan for these rows under ``cfg.schedule`` ("tpd": Token Position-Decay;
    "uniform": the same fraction of every row, the TPD-off ablation), cached per row structure
    (a sequence length is solved once)."""
    a = available.detach().cpu().long()
    n = a.numel()
    if n and bool((a == torch.arange(n) + a[0]).all()):
        key = ("arange", int(a[0]) - 1, n)
    else:
        key = ("list", tuple(a.tolist()), n)
    return _cached_plan(key, int(k_native), float(cfg.reduce), float(cfg.alpha_min), cfg.schedule)


def boost_candidates(
    cand_idx: torch.Tensor,
    cand_scores: torch.Tensor,
    key_norms: torch.Tensor | None,
    available: torch.Tensor,
    k_native: int,
    cfg: StemConfig,
    *,
    forced_idx: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
    score_space: str = "logit",
    block_size: int = 1,
    query_block: int = 1,
    row_chunk: int = 4096,
) -> tuple[Selection, BudgetPlan]:
    """Rescore the candidates with OAM and keep the TPD budget of each row.

    key_valid [B, N] marks real (non-padding) key units for the z-score statistics. Rows are
    processed `row_chunk` at a time so that the sort buffers stay bounded at long context.
    Returns the Selection (idx [B, Hsel, R, Kmax] -1 padded, counts) and the TPD plan.
    """
    plan = plan_for(available, k_native, cfg)
    bias = None
    if cfg.beta > 0 and key_norms is not None:
        bias = oam_bias(key_norms, beta=cfg.beta, norm=cfg.oam_norm, valid=key_valid)
    budgets = plan.budgets.to(cand_idx.device)
    if cfg.schedule == "mass":  # [B, Hsel, R]: the cut where the native scores predict the least mass
        budgets = mass_budgets(cand_scores, cand_idx >= 0, cfg.reduce, space=score_space)
    B, Hsel, R, Kc = cand_idx.shape
    if forced_idx is None and score_space == "logit" and cand_idx.is_cuda:
        # GPU fast path (no forced keys: DSA): OAM score then two sorts per row, in row chunks
        return _truncate_in_chunks(cand_idx, cand_scores, bias, budgets, block_size, query_block, row_chunk), plan
    if R <= row_chunk:
        sel = stem_select(cand_idx, cand_scores, budgets, key_bias=bias, score_space=score_space,
                          forced_idx=forced_idx, block_size=block_size, query_block=query_block)
        return sel, plan
    F = forced_idx.shape[-1] if forced_idx is not None else 0
    idx = torch.full((B, Hsel, R, Kc + F), -1, dtype=torch.int32, device=cand_idx.device)
    counts = torch.zeros((B, Hsel, R), dtype=torch.int32, device=cand_idx.device)
    kmax = 1
    for r0 in range(0, R, row_chunk):
        r1 = min(R, r0 + row_chunk)
        part = stem_select(
            cand_idx[:, :, r0:r1], cand_scores[:, :, r0:r1], budgets[..., r0:r1], key_bias=bias,
            score_space=score_space, forced_idx=None if forced_idx is None else forced_idx[:, :, r0:r1],
            block_size=block_size, query_block=query_block,
        )
        w = part.idx.shape[-1]
        idx[:, :, r0:r1, :w] = part.idx
        counts[:, :, r0:r1] = part.counts
        kmax = max(kmax, w)
    return Selection(idx=idx[..., :kmax].contiguous(), counts=counts, block_size=block_size,
                     query_block=query_block), plan


def _truncate_in_chunks(cand_idx, cand_scores, bias, budgets, block_size, query_block, row_chunk) -> Selection:
    """`truncate_by_score` over row chunks; the OAM bias [B, Hsel|1, N] is gathered per candidate."""
    B, Hsel, R, Kc = cand_idx.shape
    idx = torch.full((B, Hsel, R, Kc), -1, dtype=torch.int32, device=cand_idx.device)
    counts = torch.zeros((B, Hsel, R), dtype=torch.int32, device=cand_idx.device)
    kmax = 1
    for r0 in range(0, R, row_chunk):
        r1 = min(R, r0 + row_chunk)
        ci, cs = cand_idx[:, :, r0:r1], cand_scores[:, :, r0:r1]
        if bias is not None:
            b = bias.expand(B, Hsel, -1)
            gathered = b.gather(-1, ci.clamp_min(0).long().flatten(-2)).view_as(ci)
            cs = combine_scores(cs, gathered, space="logit")
        part = truncate_by_score(ci, cs, budgets[..., r0:r1], block_size=block_size, query_block=query_block)
        w = part.idx.shape[-1]
        idx[:, :, r0:r1, :w] = part.idx
        counts[:, :, r0:r1] = part.counts
        kmax = max(kmax, w)
    return Selection(idx=idx[..., :kmax].contiguous(), counts=counts, block_size=block_size, query_block=query_block)
