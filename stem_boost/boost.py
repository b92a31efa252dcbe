"""The Stem step shared by every family: native candidates -> OAM rescoring -> budget schedule ->
truncation, giving the `Selection` that `sparse_attention` runs (docs/design.md, "The Stem step").

    selection, rows = stem_step(native, scores, key_norms, k_native, cfg)

native: the family's native `Selection` (its candidate lists, with the query offset and the
per-batch-row extents [seq_start, seq_start + seq_len) of the real tokens); scores [B, Hsel, R, K]
the candidates' native scores (logit space); key_norms [B, Hsel, T] value norms per key unit,
already pooled over the heads that share a selection. Every batch row is planned on its own
length and positions, so a sequence gets the same selection alone and inside a padded batch.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, replace

import torch

from .config import StemConfig
from .kernels.dispatch import TOKEN_KEY_STEP
from .mass import mass_budgets
from .oam import combine_scores, oam_bias
from .select import candidates_by_index, stem_select, truncate_by_score
from .selection import Selection
from .tpd import BudgetPlan, plan_budgets, plan_uniform

try:  # the Triton paths (CUDA, or the CPU under TRITON_INTERPRET=1)
    from .kernels.dsa_topk import candidate_cut, topk_rows
except ImportError:  # pragma: no cover
    candidate_cut = topk_rows = None

__all__ = ["ChunkedCut", "plan_for", "RowPlans", "row_budgets", "stem_step", "token_budget_step", "TRUNCATE_METHODS"]

TRUNCATE_METHODS = ("auto", "fused", "radix", "sort", "exact")
SORT_PATH_MIN_ENTRIES = 1 << 20  # "auto": candidate tensors at least this large take the sort path


@functools.lru_cache(maxsize=64)
def _cached_plan(available_key: tuple, k_native: int, reduce: float, alpha_min: float,
                 schedule: str = "tpd", step: int = 1) -> BudgetPlan:
    kind, a, b = available_key
    if kind == "arange":  # available_i = a + i + 1 for i < b (token rows, queries at offset a)
        available = torch.arange(b, dtype=torch.long) + a + 1
    else:
        available = torch.tensor(a, dtype=torch.long)
    if schedule in ("uniform", "mass"):  # mass: the per-row budgets come from the scores (stem_step)
        return plan_uniform(available, k_native, reduce)
    return plan_budgets(available, k_native, reduce, alpha_min=alpha_min, step=step)


def token_budget_step(k_native: int, cfg: StemConfig) -> int:
    """The TPD budget quantum of token rows: ``cfg.budget_step``, or by default the token
    executors' key step (`TOKEN_KEY_STEP`, 128) when the native budget spans at least 16 such steps
    (DeepSeek-V3.2's 2048: a budget moves by at most 3.1%), else 1 (the exact schedule)."""
    if cfg.budget_step is not None:
        return cfg.budget_step
    return TOKEN_KEY_STEP if k_native >= 16 * TOKEN_KEY_STEP else 1


def plan_for(available: torch.Tensor, k_native: int, cfg: StemConfig, step: int = 1) -> BudgetPlan:
    """Budget plan for these rows under ``cfg.schedule`` ("tpd": Token Position-Decay;
    "uniform": the same fraction of every row, the TPD-off ablation), cached per row structure
    (a sequence length is solved once). step: the TPD budget quantum (`tpd.plan_budgets`)."""
    a = available.detach().cpu().long()
    n = a.numel()
    if n and bool((a == torch.arange(n) + a[0]).all()):
        key = ("arange", int(a[0]) - 1, n)
    else:
        key = ("list", tuple(a.tolist()), n)
    return _cached_plan(key, int(k_native), float(cfg.reduce), float(cfg.alpha_min), cfg.schedule, int(step))


@dataclass
class RowPlans:
    """The budget schedule of one Stem step, per batch row.

    budgets: long [B, R] non-forced units to keep per query row (0 on padding rows);
    plans: the solved plan of each batch row (None for a row without real queries);
    real_rows: bool [B, R], the query rows holding a real token.
    """

    budgets: torch.Tensor
    plans: list[BudgetPlan | None]
    real_rows: torch.Tensor

    @property
    def alphas(self) -> list[float]:
        return [p.alpha if p is not None else 1.0 for p in self.plans]


@functools.lru_cache(maxsize=8)
def _unpadded_row_plans(B: int, R: int, offset: int, k_native: int, reduce: float, alpha_min: float, schedule: str,
                        step: int, device: torch.device) -> RowPlans:
    """`row_budgets` of B unpadded rows of R queries from key position `offset` on: the plan of keys
    offset + 1 .. offset + R, the budgets [B, R] and real rows (all) on `device`, built once per
    shape (the tensors are shared: read-only). A prefill then plans without a host synchronisation
    or a host-to-device copy (about 3 ms of an idle GPU at 128K tokens)."""
    plan = _cached_plan(("arange", offset, R), k_native, reduce, alpha_min, schedule, step)
    budgets = plan.budgets.to(device=device, dtype=torch.long).expand(B, R)
    return RowPlans(budgets=budgets, plans=[plan] * B, real_rows=torch.ones(B, R, dtype=torch.bool, device=device))


def _unpadded_budgets(B: int, R: int, offset: int, k_native: int, cfg: StemConfig,
                      device: torch.device | str) -> RowPlans:
    """`row_budgets` of B unpadded batch rows of R token queries at key positions offset .. offset + R - 1
    (cached per shape: the tensors are shared, read-only)."""
    return _unpadded_row_plans(B, R, int(offset), int(k_native), float(cfg.reduce), float(cfg.alpha_min),
                               cfg.schedule, int(token_budget_step(k_native, cfg)), torch.device(device))


def _key_bias(key_norms: torch.Tensor | None, cfg: StemConfig,
              valid: torch.Tensor | None = None) -> torch.Tensor | None:
    """The OAM bias [B, Hs, N] of `cfg` from value norms [B, Hs, N] (valid: [B, N], False for padding
    keys), or None when OAM is off (beta 0) or there are no norms."""
    if cfg.beta > 0 and key_norms is not None:
        return oam_bias(key_norms, beta=cfg.beta, norm=cfg.oam_norm, valid=valid)
    return None


def row_budgets(native: Selection, seq_q: int, seq_k: int, k_native: int, cfg: StemConfig) -> RowPlans:
    """TPD / uniform budgets of token rows (query_block = 1, unit = 1 token), each batch row planned
    on its own positions: a real query at own position p (0 = the row's first real token) has
    p + 1 causally valid keys. TPD budgets are multiples of `token_budget_step` (below the
    causal limit)."""
    B, R = native.batch, native.n_rows
    if native.seq_start is None:  # no padding: one plan for every batch row, its tensors cached on the device
        return _unpadded_budgets(B, R, native.offset_for(seq_q, seq_k), k_native, cfg, native.idx.device)
    step = token_budget_step(k_native, cfg)
    q_pos = torch.arange(R) + native.offset_for(seq_q, seq_k)  # key position of each query row
    starts = native.seq_start.tolist()
    real = native.real_rows(seq_q, seq_k).cpu()  # [B, R]
    budgets = torch.zeros(B, R, dtype=torch.long)
    plans: list[BudgetPlan | None] = []
    for b in range(B):
        rows = real[b]
        if not bool(rows.any()):
            plans.append(None)
            continue
        plan = plan_for(q_pos[rows] - starts[b] + 1, k_native, cfg, step)
        budgets[b, rows] = plan.budgets
        plans.append(plan)
    device = native.idx.device
    return RowPlans(budgets=budgets.to(device), plans=plans, real_rows=real.to(device))


def _mass_row_budgets(scores: torch.Tensor, cand_idx: torch.Tensor, real_rows: torch.Tensor,
                      reduce: float) -> torch.Tensor:
    """[B, Hsel, R] budgets of `schedule="mass"`, one threshold per batch row over its real rows."""
    out = torch.zeros(cand_idx.shape[:3], dtype=torch.long, device=cand_idx.device)
    for b in range(cand_idx.shape[0]):
        rows = real_rows[b].nonzero().flatten()
        if rows.numel():
            valid = cand_idx[b][:, rows] >= 0
            out[b][:, rows] = mass_budgets(scores[b][:, rows], valid, reduce, space="logit")
    return out


def with_oam_bias(cand_idx: torch.Tensor, scores: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """OAM scores of token candidates: scores [B, H, R, K] (logits) + bias [B, H|1, N] gathered at
    cand_idx [B, H, R, K] (-1 padding gathers key 0; callers mask it). None: the scores as they are."""
    if bias is None:
        return scores
    B, H = cand_idx.shape[:2]
    gathered = bias.expand(B, H, -1).gather(-1, cand_idx.clamp_min(0).long().flatten(-2)).view_as(cand_idx)
    return combine_scores(scores, gathered, space="logit")


def _ascending_candidates(cand_idx: torch.Tensor, scores: torch.Tensor,
                          row_chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidates in ascending key order with the -1 padding at the end (checked `row_chunk` rows
    at a time, one host sync; a no-op for the native radix top-k, which writes them so), so that a
    per-row select's tie rule (the smaller column) is the project's (the smaller key index)."""
    ascending = torch.ones((), dtype=torch.bool, device=cand_idx.device)
    for r0 in range(0, cand_idx.shape[2], row_chunk):
        c = cand_idx[:, :, r0:r0 + row_chunk]
        live = c >= 0
        ascending &= (((c[..., 1:] >= c[..., :-1]) | ~live[..., 1:]) & (live[..., :-1] | ~live[..., 1:])).all()
    if not bool(ascending):
        cand_idx, scores = candidates_by_index(cand_idx, scores)
    return cand_idx, scores


def _fused_truncate(cand_idx: torch.Tensor, scores: torch.Tensor, bias: torch.Tensor | None,
                    budgets: torch.Tensor, row_chunk: int, ascending: bool) -> Selection:
    """Keep each row's budget of candidates by OAM score in one Triton pass over all rows
    (`kernels.dsa_topk.candidate_cut`: bias gathered, 32-step bisection, kept keys written). The
    lists keep the candidates' width (-1 after each row's count): no host sync for a narrower one."""
    if not ascending:
        cand_idx, scores = _ascending_candidates(cand_idx, scores, row_chunk)
    idx, counts = candidate_cut(cand_idx, scores, budgets, key_bias=bias)
    return Selection(idx=idx, counts=counts)


def _radix_truncate(cand_idx: torch.Tensor, scores: torch.Tensor, bias: torch.Tensor | None,
                    budgets: torch.Tensor) -> Selection:
    """Keep each row's budget of candidates by OAM score with one radix select per row over the
    gathered OAM scores (`topk_rows`). cand_idx / scores [B, H, R, K], bias [B, H|1, N] or None,
    budgets [B, H, R]."""
    B, H, R, K = cand_idx.shape
    cand_idx, scores = _ascending_candidates(cand_idx, scores)
    scores = torch.where(cand_idx >= 0, with_oam_bias(cand_idx, scores, bias).float(), float("-inf"))
    cols, counts = topk_rows(scores.reshape(B * H, R, K).contiguous(), K, budgets=budgets.reshape(B * H, R))
    cols, counts = cols.view(B, H, R, K), counts.view(B, H, R)
    kmax = max(1, int(counts.max())) if counts.numel() else 1
    cols = cols[..., :kmax]
    idx = torch.where(cols >= 0, cand_idx.gather(-1, cols.clamp_min(0).long()), -1).to(torch.int32)
    return Selection(idx=idx.contiguous(), counts=counts)


class ChunkedCut:
    """The Stem step of `stem_step(method="fused")` on unpadded token rows, taken chunk by chunk as the
    native selector finishes them (`native.dsa_indexer.chunked_index_topk(on_chunk=)`): the same
    budgets, OAM bias and cut (`kernels.dsa_topk.candidate_cut`), so the same set. The cut of a chunk
    then reads its candidates and scores while they are still in L2 (the top-k writes a 128K prefill's
    chunk of 3328 rows, 54 MB, at the end of its one wave) instead of 2 GB from HBM after the loop. It
    measured no faster than the one cut after the loop: forty launches of about two waves each spend
    in their tails what the L2 saves (docs/design.md, "Where the DSA cut runs"); the DSA adapter takes it
    with `CUT_PLACE = "chunks"`.

        cut = ChunkedCut(B, R, K, q_offset, seq_k, k_native, cfg, key_norms, device)
        top = chunked_index_topk(..., on_chunk=cut)     # calls cut(s0, s1, idx, scores, ascending)
        selection, plans = cut.result(native)

    B batch rows of R query rows (no padding: every row real), K candidates a row, the queries at key
    positions q_offset .. q_offset + R - 1; key_norms [B, 1, seq_k] (value norms pooled over heads) or
    None. The budget schedule "mass" needs every row's scores at once: not taken here.
    stream: a CUDA stream to cut on (None: the current one). Each chunk's cut waits there for the work
    queued so far (its top-k), so the next chunk's scorer need not wait for it and fills the SMs the cut's
    tail leaves idle. `result` makes the current stream wait for it.
    """

    def __init__(self, batch: int, n_rows: int, width: int, q_offset: int, seq_k: int, k_native: int,
                 cfg: StemConfig, key_norms: torch.Tensor | None, device: torch.device | str,
                 stream: torch.cuda.Stream | None = None):
        if cfg.schedule == "mass":
            raise ValueError("schedule='mass' takes its budgets from every row's scores: use stem_step")
        if candidate_cut is None:  # pragma: no cover
            raise ValueError("ChunkedCut needs Triton (CUDA, or TRITON_INTERPRET=1 on the CPU)")
        if key_norms is not None and key_norms.shape != (batch, 1, seq_k):
            raise ValueError(f"key_norms must be [B={batch}, 1, seq_k={seq_k}]; got {tuple(key_norms.shape)}")
        self.plans = _unpadded_budgets(batch, n_rows, q_offset, k_native, cfg, device)
        self.bias = _key_bias(key_norms, cfg)  # [B, 1, seq_k] or None
        self.idx = torch.empty(batch, 1, n_rows, width, dtype=torch.int32, device=device)
        self.counts = torch.empty(batch, 1, n_rows, dtype=torch.int32, device=device)
        self.rows_cut = torch.zeros(n_rows, dtype=torch.bool)  # host-side bookkeeping: every row once
        self.stream = stream

    def __call__(self, s0: int, s1: int, cand_idx: torch.Tensor, scores: torch.Tensor, ascending: bool) -> None:
        """Cut query rows [s0, s1): cand_idx int [B, s1 - s0, K] (-1 after the live ones), scores [B, s1 - s0, K]."""
        B, _, R, K = self.idx.shape
        if cand_idx.shape != (B, s1 - s0, K) or scores.shape != cand_idx.shape or not 0 <= s0 <= s1 <= R:
            raise ValueError(f"rows [{s0}, {s1}) of [B={B}, R={R}, K={K}] candidates; got cand_idx "
                             f"{tuple(cand_idx.shape)}, scores {tuple(scores.shape)}")
        cand, sc = cand_idx[:, None], scores[:, None]  # [B, 1, c, K]
        if not ascending:
            cand, sc = _ascending_candidates(cand, sc)
        budgets = self.plans.budgets[:, None, s0:s1]  # [B, 1, c]
        where = contextlib.nullcontext()
        if self.stream is not None:  # after the chunk's top-k, beside the next chunk's scores (its inputs outlive `result`)
            self.stream.wait_stream(torch.cuda.current_stream(self.idx.device))
            where = torch.cuda.stream(self.stream)
        with where:
            _, counts = candidate_cut(cand, sc, budgets, key_bias=self.bias, out=self.idx[:, :, s0:s1])
            self.counts[:, :, s0:s1] = counts
        self.rows_cut[s0:s1] = True

    def result(self, native: Selection) -> tuple[Selection, RowPlans]:
        """The Stem Selection (native's offset and extents) and the plans, once every row was cut."""
        if not bool(self.rows_cut.all()):
            missing = (~self.rows_cut).nonzero().flatten()
            raise ValueError(f"rows {missing[:4].tolist()}... ({missing.numel()} of {self.rows_cut.numel()}) "
                             f"were never cut: on_chunk must see every row")
        if native.seq_start is not None or native.idx.shape != self.idx.shape:
            raise ValueError(f"native selection must be unpadded with idx {tuple(self.idx.shape)}; got "
                             f"{tuple(native.idx.shape)}, padded={native.seq_start is not None}")
        if self.stream is not None:  # the cuts on the side stream are done before anything reads them
            torch.cuda.current_stream(self.idx.device).wait_stream(self.stream)
        sel = Selection(idx=self.idx, counts=self.counts, q_offset=native.q_offset, seq_start=native.seq_start,
                        seq_len=native.seq_len)
        return sel, self.plans


def stem_step(
    native: Selection,
    scores: torch.Tensor,
    key_norms: torch.Tensor | None,
    k_native: int,
    cfg: StemConfig,
    *,
    seq_k: int,
    method: str = "auto",
    row_chunk: int = 4096,
    candidates_ascending: bool = False,
) -> tuple[Selection, RowPlans]:
    """Rescore the native token candidates with OAM and keep each row's budget.

    native: token lists (block_size = query_block = 1) of B batch rows, R = seq_q query rows;
    scores [B, Hsel, R, K] native logit-space scores of native.idx; key_norms [B, Hsel|1, seq_k].
    method: "fused" (one Triton program per row over its candidates in registers,
    `kernels.dsa_topk.candidate_cut`: the GPU path), "radix" (the OAM scores gathered, then one
    radix select per row, `kernels.dsa_topk.topk_rows`), "sort" (three sorts per row), "exact"
    (`stem_select`'s composite-key ranking) or "auto" (fused on CUDA, else sort when the candidate
    tensor has >= 2^20 entries, else exact). All keep the same set: higher OAM score first, ties to
    the smaller key index. Rows are processed `row_chunk` at a time ("fused": one launch for all,
    its order check `row_chunk` rows at a time). candidates_ascending: the caller guarantees each
    row's live candidates ascending by key with the -1 slots after them (`IndexerTopK.ascending`),
    so "fused" skips its order check.
    Returns the Stem Selection (same offset and extents as `native`) and the per-row plans.
    """
    if method not in TRUNCATE_METHODS:
        raise ValueError(f"method={method!r}; allowed: {', '.join(TRUNCATE_METHODS)}")
    if native.block_size != 1 or native.query_block != 1:
        raise ValueError(f"stem_step takes token lists (block_size = query_block = 1), got block_size="
                         f"{native.block_size}, query_block={native.query_block}")
    cand_idx = native.idx
    if scores.shape != cand_idx.shape:
        raise ValueError(f"scores {tuple(scores.shape)} must have the shape of the candidates {tuple(cand_idx.shape)}")
    B, Hsel, R, K = cand_idx.shape
    plans = row_budgets(native, R, seq_k, k_native, cfg)
    bias = _key_bias(key_norms, cfg, valid=native.real_units(seq_k))
    budgets = plans.budgets[:, None].expand(B, Hsel, R)
    if cfg.schedule == "mass":  # the cut goes to the candidates of least predicted mass, per batch row
        budgets = _mass_row_budgets(scores, cand_idx, plans.real_rows, cfg.reduce)
    if method == "auto":
        if cand_idx.is_cuda and candidate_cut is not None:
            method = "fused"
        else:
            method = "sort" if cand_idx.numel() >= SORT_PATH_MIN_ENTRIES else "exact"
    if method in ("fused", "radix") and topk_rows is None:
        raise ValueError(f"method={method!r} needs Triton (CUDA, or TRITON_INTERPRET=1 on the CPU)")
    if method == "fused":
        sel = _fused_truncate(cand_idx, scores, bias, budgets, row_chunk, candidates_ascending)
        return replace(sel, q_offset=native.q_offset, seq_start=native.seq_start, seq_len=native.seq_len), plans
    idx = torch.full((B, Hsel, R, max(K, 1)), -1, dtype=torch.int32, device=cand_idx.device)
    counts = torch.zeros((B, Hsel, R), dtype=torch.int32, device=cand_idx.device)
    kmax = 1
    for r0 in range(0, R, row_chunk):
        r1 = min(R, r0 + row_chunk)
        ci, cs = cand_idx[:, :, r0:r1], scores[:, :, r0:r1]
        if method == "radix":
            part = _radix_truncate(ci, cs, bias, budgets[..., r0:r1])
        elif method == "sort":
            part = truncate_by_score(ci, with_oam_bias(ci, cs, bias), budgets[..., r0:r1])
        else:
            part = stem_select(ci, cs, budgets[..., r0:r1], key_bias=bias, score_space="logit")
        w = part.idx.shape[-1]
        idx[:, :, r0:r1, :w] = part.idx
        counts[:, :, r0:r1] = part.counts
        kmax = max(kmax, w)
    sel = Selection(idx=idx[..., :kmax].contiguous(), counts=counts, block_size=1, query_block=1,
                    q_offset=native.q_offset, seq_start=native.seq_start, seq_len=native.seq_len)
    return sel, plans
