"""Stem truncation of the native candidates (docs/design.md, "The Stem step").

The native method proposes candidate keys per query row (DSA: token indices, InfLLMv2: key-block
indices) and may force some keys (sinks / init blocks, local window, diagonal block). Stem keeps
the forced keys plus the top ``budgets[r]`` candidates by OAM score (ties: earlier key first) and
hands the result to the sparse-attention kernel as a -1 padded index list with per-row counts.
"""

from __future__ import annotations

import torch

from .oam import combine_scores
from .selection import Selection

__all__ = ["stem_select", "truncate_by_score", "candidates_by_index"]

_INT64_MIN = torch.iinfo(torch.int64).min
_INT64_MAX = torch.iinfo(torch.int64).max
_INT32_MAX = torch.iinfo(torch.int32).max


def _sortable_int(x: torch.Tensor) -> torch.Tensor:
    """Map float32 to int64 in [-2^31, 2^31) with the same order (-0.0 == +0.0; no NaN)."""
    bits = (x.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    return torch.where(bits >= 0, bits, bits ^ _INT32_MAX).long()


def _check_int_tensor(name: str, t: torch.Tensor, ndim: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != ndim:
        raise ValueError(f"{name} must be a {ndim}-D tensor, got {getattr(t, 'shape', type(t))}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")


def _expand_budgets(budgets: torch.Tensor | int, b: int, h: int, r: int, device: torch.device) -> torch.Tensor:
    """Budgets as int64 [B, Hsel, R] from an int, [R], [B, R] or [B, Hsel, R]."""
    budgets = torch.as_tensor(budgets, device=device)
    if budgets.is_floating_point() or budgets.is_complex() or budgets.dtype == torch.bool:
        raise ValueError(f"budgets must be integers, got {budgets.dtype}")
    budgets = budgets.long()
    if budgets.dim() == 1:
        budgets = budgets[None, None]
    elif budgets.dim() == 2:
        budgets = budgets[:, None]
    if budgets.dim() > 3 or (budgets.dim() == 3 and budgets.shape[-1] != r and budgets.numel() != 1):
        raise ValueError(f"budgets must be an int, [R], [B, R] or [B, Hsel, R] with R={r}, got {tuple(budgets.shape)}")
    try:
        budgets = budgets.expand(b, h, r)
    except RuntimeError as err:
        raise ValueError(
            f"budgets of shape {tuple(budgets.shape)} does not broadcast to [B, Hsel, R] = {(b, h, r)}"
        ) from err
    if budgets.numel() and int(budgets.min()) < 0:
        raise ValueError(f"budgets must be >= 0, got min {int(budgets.min())}")
    return budgets


def stem_select(
    cand_idx: torch.Tensor,
    cand_scores: torch.Tensor,
    budgets: torch.Tensor | int,
    *,
    key_bias: torch.Tensor | None = None,
    score_space: str = "logit",
    forced_idx: torch.Tensor | None = None,
    block_size: int = 1,
    query_block: int = 1,
    sort_by_position: bool = True,
) -> Selection:
    """Keep the forced keys plus the top ``budgets[r]`` native candidates by OAM score.

    Args:
        cand_idx: int [B, Hsel, R, Kc] native candidate key units; negative entries (-1) are
            padding and may appear anywhere.
        cand_scores: [B, Hsel, R, Kc] native selection scores (see ``score_space``).
        budgets: candidates to keep per row, not counting forced keys: int [R], [B, R] or
            [B, Hsel, R] (e.g. `BudgetPlan.budgets`), or a Python int.
        key_bias: optional [B, Hsel, Nk] OAM bias per key unit (`oam_bias`), gathered at each
            candidate; Hsel may be 1 (shared). None = no bias (native order).
        score_space: "logit" or "prob", see `combine_scores`. Candidates whose native score is
            masked (-inf logit, prob <= 0) or NaN are treated as padding.
        forced_idx: optional int [B, Hsel, R, F], -1 padded: always kept, not counted against the
            budget. Candidates equal to a forced key are removed from the pool before the top-k;
            duplicate candidates are collapsed to the copy with the highest score.
        block_size, query_block: stored in the returned `Selection`.
        sort_by_position: True: each row's keys ascending by position (memory locality for the
            kernel). False: the forced keys (ascending) then the kept candidates by descending OAM
            score (ties: earlier key first).

    Returns:
        Selection with Kmax = max(1, the largest row count), so Kmax <= F + Kc. Reading Kmax costs
        one device sync.

    Ranking: descending OAM score, ties broken by the smaller key index, implemented with one exact
    int64 composite key (order-preserving int image of the float32 score, then the index), so the
    result is deterministic on every device.
    """
    _check_int_tensor("cand_idx", cand_idx, 4)
    b, h, r, kc = cand_idx.shape
    if cand_scores.shape != cand_idx.shape:
        raise ValueError(
            f"cand_scores must have the shape of cand_idx {tuple(cand_idx.shape)}, got {tuple(cand_scores.shape)}"
        )
    for name, value in (("block_size", block_size), ("query_block", query_block)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is outside [1, inf)")
    device = cand_idx.device
    budgets = _expand_budgets(budgets, b, h, r, device)
    cand = cand_idx.long()
    cand_live = cand >= 0

    # 1. OAM score of every candidate; masked / NaN scores become padding.
    if key_bias is None:
        bias = torch.zeros((), device=device)
    else:
        if key_bias.dim() != 3 or key_bias.shape[0] != b or key_bias.shape[1] not in (1, h):
            raise ValueError(f"key_bias must be [B, Hsel, Nk] with B={b}, Hsel={h} (or 1), got {tuple(key_bias.shape)}")
        n_keys = key_bias.shape[-1]
        if bool((cand >= n_keys).any()):
            raise ValueError(f"cand_idx has entries >= key_bias.shape[-1] = {n_keys} (number of key units)")
        gather_at = cand.clamp(min=0).reshape(b, h, r * kc)
        bias = key_bias.expand(b, h, n_keys).gather(-1, gather_at).view(b, h, r, kc)
    score = combine_scores(cand_scores, bias, score_space)
    cand_live = cand_live & (score > float("-inf"))  # False for -inf and NaN

    # 2. Forced keys in front, with a +inf score (they win every de-duplication).
    if forced_idx is not None:
        _check_int_tensor("forced_idx", forced_idx, 4)
        if forced_idx.shape[:3] != (b, h, r):
            raise ValueError(f"forced_idx must be [B, Hsel, R, F] with {(b, h, r)}, got {tuple(forced_idx.shape)}")
        forced = forced_idx.long()
    else:
        forced = cand.new_empty(b, h, r, 0)
    n_forced_slots = forced.shape[-1]
    keys = torch.cat([forced, cand], dim=-1)  # [B, H, R, n]
    live = torch.cat([forced >= 0, cand_live], dim=-1)
    score = torch.cat([torch.full(forced.shape, float("inf"), device=device), score], dim=-1)
    is_forced = torch.zeros_like(live)
    is_forced[..., :n_forced_slots] = True
    if bool((keys >= _INT32_MAX).any()):
        raise ValueError(f"key indices must be < {_INT32_MAX}")

    # 3. De-duplicate: sort by (index, score descending); the first copy of an index survives. A
    #    stable sort keeps a forced copy ahead of a candidate with an equal (+inf) score.
    score_key = _sortable_int(score)
    safe_keys = torch.where(live, keys, _INT32_MAX)  # padding sorts last
    order = torch.sort((safe_keys << 32) + (_INT32_MAX - score_key), dim=-1, stable=True).indices
    keys, live, is_forced, score_key = (t.gather(-1, order) for t in (keys, live, is_forced, score_key))
    first = torch.ones_like(live)
    first[..., 1:] = keys[..., 1:] != keys[..., :-1]
    unique = live & first
    keep_forced = unique & is_forced
    pool = unique & ~is_forced

    # 4. Counts, then rank: forced first (by position), then the pool by (score desc, index asc).
    counts = keep_forced.sum(-1) + torch.minimum(pool.sum(-1), budgets)  # [B, H, R]
    k_max = max(int(counts.max()) if counts.numel() else 0, 1)
    rank_key = torch.where(keep_forced, _INT64_MAX - keys, (score_key << 32) + (_INT32_MAX - keys))
    rank_key = torch.where(unique, rank_key, _INT64_MIN)
    if rank_key.shape[-1] < k_max:  # only when F + Kc == 0
        rank_key = torch.nn.functional.pad(rank_key, (0, k_max - rank_key.shape[-1]), value=_INT64_MIN)
        keys = torch.nn.functional.pad(keys, (0, k_max - keys.shape[-1]), value=-1)
    top = torch.topk(rank_key, k_max, dim=-1, sorted=True).indices
    selected = keys.gather(-1, top)  # [B, H, R, Kmax]
    slot_live = torch.arange(k_max, device=device) < counts[..., None]
    if sort_by_position:
        selected = torch.where(slot_live, selected, _INT64_MAX).sort(dim=-1).values
    selected = torch.where(slot_live, selected, -1)
    return Selection(
        idx=selected.to(torch.int32),
        counts=counts.to(torch.int32),
        block_size=block_size,
        query_block=query_block,
    )


def candidates_by_index(cand_idx: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates in ascending key order, padding last: cand_idx [..., K] (-1 anywhere) and their
    scores [..., K] -> (int32 indices ascending then -1, the scores in the same order). Put first,
    the ranking's stable sorts break ties by the smaller key index (the project's tie rule)."""
    big = torch.iinfo(torch.int32).max
    order = torch.where(cand_idx >= 0, cand_idx.to(torch.int32), big).sort(dim=-1)
    return torch.where(order.values == big, -1, order.values), scores.gather(-1, order.indices)


def truncate_by_score(
    cand_idx: torch.Tensor,
    oam_scores: torch.Tensor,
    budgets: torch.Tensor,
    *,
    block_size: int = 1,
    query_block: int = 1,
) -> Selection:
    """Fast path of `stem_select` for candidates without forced keys (DSA): three sorts per row.

    cand_idx [B, Hsel, R, Kc] (-1 padded, no duplicates, as a native top-k returns them),
    oam_scores [B, Hsel, R, Kc] (native score + OAM bias; -inf / NaN where padded), budgets [R] or
    [B, Hsel, R]. Keeps the budgets[r] best candidates of each row by OAM score and returns them
    ascending by position. Ties go to the smaller key index (the candidates are put in index order
    first, then stably sorted by score), the rule of `stem_select`, so both give the same set.
    """
    B, H, R, K = cand_idx.shape
    big = torch.iinfo(torch.int32).max
    cand_sorted, key = candidates_by_index(cand_idx, oam_scores.float())
    valid = cand_sorted >= 0
    key = torch.where(valid, torch.nan_to_num(key, nan=float("-inf")), float("-inf"))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    ranked = cand_sorted.gather(-1, order)
    ranked_valid = valid.gather(-1, order) & (key.gather(-1, order) > float("-inf"))
    budgets = budgets.to(cand_idx.device)
    budgets = budgets.view(1, 1, R, 1) if budgets.dim() == 1 else budgets.unsqueeze(-1)
    keep = ranked_valid & (torch.arange(K, device=cand_idx.device) < budgets)
    kept = torch.where(keep, ranked, big).sort(dim=-1).values
    counts = keep.sum(-1).to(torch.int32)
    kmax = max(1, int(counts.max())) if counts.numel() else 1
    kept = kept[..., :kmax]
    idx = torch.where(kept == big, -1, kept).contiguous()
    return Selection(idx=idx, counts=counts, block_size=block_size, query_block=query_block)
