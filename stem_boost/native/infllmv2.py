"""InfLLMv2 block selection and block-sparse attention (MiniCPM-4.1) in pure PyTorch.

This reproduces, without the ``infllm_v2`` CUDA package, what the official MiniCPM-4.1 code does
for a sequence whose key length reaches ``dense_len``. Sources read (the algorithm is re-derived,
no code is copied):

- ``MiniCPMInfLLMv2Attention`` / ``compressed_attention`` / ``CompressK`` /
  ``calc_chunks_with_stride`` of the official remote code. The MiniCPM4.1-8B file itself
  (``huggingface.co/openbmb/MiniCPM4.1-8B: modeling_minicpm.py``, commit "Modify modeling_minicpm.py
  to use LSE compression") is not in the code index; the identical InfLLMv2 attention was read in
  OpenBMB's MiniCPM-SALA ``modeling_minicpm_sala.py`` (indexed copy, same ``compressed_attention``
  with ``k2``, ``compress_k2 = CompressK(kernel_size * 4, kernel_stride * 4)``, ``topk + window /
  block``), cross-checked with the SGLang MiniCPM4.1 backend (``compressed_attention(q, k, k2, ...)``,
  hard-coded ``kernel 32/16, coarse 128/64, topk = 64 + 2048 // 64``) and, for MiniCPM-4.0, with
  ``LDLINGLINGLING/ParetoQ_for_MiniCPM4: models/modeling_minicpm.py``.
- ``OpenBMB/infllmv2_cuda_impl`` (main): ``infllm_v2/infllmv2_sparse_attention.py``
  (``infllmv2_attn_stage1``, ``infllmv2_attn_varlen_func``), ``infllm_v2/max_pooling_1d.py``,
  ``csrc/max_pooling_1d.cuh``, ``csrc/topk_to_uint64.cuh``,
  ``csrc/flash_attn/src/flash_fwd_kernel.h`` (``compute_attn_1rowblock_splitkv_stage1``),
  ``csrc/flash_attn/src/mask.h`` (``apply_mask_stage1``), ``csrc/flash_attn/src/softmax.h``
  (``softmax_rescale_gt``), ``csrc/flash_attn/src/flash_blockmask.h``,
  ``csrc/flash_attn/flash_api.cpp`` (``mha_varlen_fwd_stage1``) and the kernel's own Python
  oracle ``tests/stage1/complse_online_softmax.py`` / ``tests/test_stage1_compressed_lse.py``.

The selection, per (batch, KV head, query token) -- one selection is shared by the G query heads of
a GQA group, and every query *token* has its own (the stage-2 kernel tiles 16 rows = the 16 heads
of ONE token per block-mask row):

1. Compression (``CompressK``): fine keys ``k1[c] = mean(k[c*s : c*s + 2s])`` (kernel 32, stride
   16), coarse keys ``k2[c] = mean(k[c*4s : c*4s + 8s])`` (kernel 128, stride 64); only complete
   windows.
2. Visibility (``apply_mask_stage1``): query at position p sees the compressed keys whose window
   ends at or before p: ``floor((p + 1) / s) - 1`` of them, plus the kernel's offset term
   ``D = Kc - trunc((L - s + 1) / s)`` of a fresh prefill of L tokens (D = -1 when
   ``L % s == s - 1``, else 0 -- a quirk of the kernel kept here, see ``emulate_kernel_offset``).
   A one-token decode call is non-causal: every complete compressed key is visible.
3. Score (stage 1, "LSE compression"): per query head h, ``lse_h = logsumexp_c2(q_h . k2[c2] *
   d^-0.5)`` over the visible coarse keys, then ``p_h[c] = exp(q_h . k1[c] * d^-0.5 - lse_h)`` for
   the visible fine keys (0 for the others), and ``score[c] = sum_h p_h[c]`` over the heads of the
   group (``hdim16_reduce``). Not a normalised softmax: the normaliser comes from the coarse level.
4. Pooling (``max_pooling_1d_varlen``): block b of ``block_size`` tokens gets the max of the
   scores of compressed keys ``[b*P - 1, b*P + P)`` (P = block_size / stride, clipped to the
   existing compressed keys; an empty window gives -inf). Forced to +inf: ``b < init_blocks`` and
   ``q_block - local_blocks <= b <= q_block`` (the diagonal block plus ``window_size /
   block_size`` blocks before it).
5. Top-k: ``topk + window_size // block_size`` blocks (``MiniCPMInfLLMv2Attention.topk``), capped
   at the number of blocks of the sequence, then sorted, and blocks after the query block set to
   -1. With the official config that is 96 = 34 forced (1 init + 33 local) + 62 chosen by score.
6. Attention (``infllmv2_attn_varlen_func``): dense attention over the tokens of the selected
   blocks, causal inside the diagonal block.

Structure (so a Stem rescoring layer can sit between the native scores and the top-k):
:func:`iter_block_scores` yields :class:`BlockScores` chunk by chunk (bounded memory);
:func:`topk_blocks` turns (possibly rescored) scores into a selection; :func:`infllmv2_select`
chains both (with Stem's optional block bias and per-row budgets in between) and returns a
:class:`BlockSelection` (``to_selection()`` gives the project's `Selection`). :func:`infllmv2_sparse_attention` runs the attention in PyTorch.

Tensor layout in this module is the Hugging Face one: ``q [B, Hq, S, D]``, ``k, v [B, Hkv, T, D]``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..kernels.infllmv2_geometry import (compress_keys, group_budgets, grouped_chunk_rows, groups_share_candidates,
                                         kernel_causal_offset, num_compressed, visible_compressed)
from ..oam import combine_scores
from ..selection import Selection

try:  # fused stage-1 kernel and the fused selection (CUDA); the CPU path uses the PyTorch definition below
    from ..kernels.infllmv2_scores import fused_stage1_scores
    from ..kernels.infllmv2_select import infllmv2_select_fused
except ImportError:  # pragma: no cover
    fused_stage1_scores = infllmv2_select_fused = None

logger = logging.getLogger(__name__)

__all__ = [
    "MINICPM41_SPARSE_CONFIG",
    "SPARSE_CONFIG_DEFAULTS",
    "BlockScores",
    "BlockSelection",
    "InfLLMv2Params",
    "compress_keys",
    "infllmv2_select",
    "infllmv2_sparse_attention",
    "iter_block_scores",
    "kernel_causal_offset",
    "num_compressed",
    "pool_block_scores",
    "selection_to_dense_mask",
    "topk_blocks",
    "visible_compressed",
]

#: Defaults of ``MiniCPMInfLLMv2Attention.__init__`` (``self.config.sparse_config.get(key, default)``).
SPARSE_CONFIG_DEFAULTS: dict[str, Any] = {
    "kernel_size": 32,
    "kernel_stride": 16,
    "init_blocks": 1,
    "block_size": 64,
    "window_size": 2048,
    "topk": 64,
    "use_nope": False,
    "dense_len": 8192,
}

#: The ``sparse_config`` of openbmb/MiniCPM4.1-8B (model card and OpenBMB/MiniCPM README).
MINICPM41_SPARSE_CONFIG: dict[str, Any] = dict(SPARSE_CONFIG_DEFAULTS)

#: The official code builds the coarse level as ``CompressK(kernel_size * 4, kernel_stride * 4)``.
COARSE_FACTOR = 4


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class InfLLMv2Params:
    """Validated InfLLMv2 hyper-parameters (the official ``sparse_config`` keys).

    ``coarse_factor`` is not a config key: the official code hard-codes 4 (coarse kernel 128 /
    stride 64). ``coarse_factor=1`` makes the normaliser the fine level itself, i.e. a plain softmax
    over the fine compressed keys (what the kernel computes when k2 == k1, as MiniCPM-4.0 called it).
    """

    kernel_size: int = 32
    kernel_stride: int = 16
    init_blocks: int = 1
    block_size: int = 64
    window_size: int = 2048
    topk: int = 64
    use_nope: bool = False
    dense_len: int = 8192
    coarse_factor: int = COARSE_FACTOR

    def __post_init__(self) -> None:
        for name in ("kernel_size", "kernel_stride", "init_blocks", "block_size", "window_size", "topk",
                     "dense_len", "coarse_factor"):
            value = getattr(self, name)
            if not _is_int(value):
                raise ValueError(f"sparse_config[{name!r}] must be an int, got {value!r}")
        if not isinstance(self.use_nope, bool):
            raise ValueError(f"sparse_config['use_nope'] must be a bool, got {self.use_nope!r}")
        if self.kernel_stride < 1:
            raise ValueError(f"sparse_config['kernel_stride'] must be >= 1, got {self.kernel_stride}")
        if self.kernel_size != 2 * self.kernel_stride:
            raise ValueError(
                f"sparse_config['kernel_size'] ({self.kernel_size}) must be 2 * kernel_stride "
                f"({2 * self.kernel_stride}): the InfLLMv2 causal rule and block pooling assume overlapping "
                "windows of two strides (the official kernels hard-code 32/16 and 128/64)"
            )
        if self.block_size < 1 or self.block_size % self.kernel_stride != 0:
            raise ValueError(
                f"sparse_config['block_size'] ({self.block_size}) must be a positive multiple of "
                f"kernel_stride ({self.kernel_stride})"
            )
        if self.init_blocks < 0:
            raise ValueError(f"sparse_config['init_blocks'] must be >= 0, got {self.init_blocks}")
        if self.window_size < 0 or self.window_size % self.block_size != 0:
            raise ValueError(
                f"sparse_config['window_size'] ({self.window_size}) must be a non-negative multiple of "
                f"block_size ({self.block_size})"
            )
        if self.topk < 1:
            raise ValueError(f"sparse_config['topk'] must be >= 1, got {self.topk}")
        if self.init_blocks >= self.topk:
            raise ValueError(
                f"sparse_config['init_blocks'] ({self.init_blocks}) must be smaller than topk ({self.topk}) "
                "so that the forced init and local blocks fit in the top-k budget"
            )
        if self.dense_len < -1:
            raise ValueError(f"sparse_config['dense_len'] must be -1 (always sparse) or >= 0, got {self.dense_len}")
        if self.coarse_factor < 1:
            raise ValueError(f"coarse_factor must be >= 1, got {self.coarse_factor}")

    # -- derived quantities, named as in the official code ------------------------------------------
    @property
    def local_blocks(self) -> int:
        """``window_size // block_size`` blocks before the diagonal block are forced."""
        return self.window_size // self.block_size

    @property
    def topk_total(self) -> int:
        """The k passed to the official ``compressed_attention``: ``topk + window_size // block_size``."""
        return self.topk + self.local_blocks

    @property
    def coarse_kernel_size(self) -> int:
        return self.kernel_size * self.coarse_factor

    @property
    def coarse_stride(self) -> int:
        return self.kernel_stride * self.coarse_factor

    @property
    def pool_size(self) -> int:
        """Compressed keys per selection block (``block_size // kernel_stride``)."""
        return self.block_size // self.kernel_stride

    def is_sparse(self, kv_len: int) -> bool:
        """The official switch: sparse when ``kv_seq_len >= dense_len`` (``dense_len=-1``: always)."""
        return kv_len >= self.dense_len

    def k_total(self, kv_len: int) -> int:
        """Native number of selected blocks (forced ones included) for ``kv_len`` keys."""
        return min(self.topk_total, -(-kv_len // self.block_size))

    @classmethod
    def from_sparse_config(cls, sparse_config: Mapping[str, Any] | None, **overrides: Any) -> InfLLMv2Params | None:
        """Build from a ``sparse_config`` dict (missing keys take the official defaults)."""
        if sparse_config is None:
            return None
        if not isinstance(sparse_config, Mapping):
            raise ValueError(f"sparse_config must be a dict, got {type(sparse_config).__name__}")
        unknown = sorted(set(sparse_config) - set(SPARSE_CONFIG_DEFAULTS))
        if unknown:
            logger.warning("sparse_config keys %s are not used by InfLLMv2 and are ignored", unknown)
        values = {key: sparse_config.get(key, default) for key, default in SPARSE_CONFIG_DEFAULTS.items()}
        values.update(overrides)
        return cls(**values)

    def to_sparse_config(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in SPARSE_CONFIG_DEFAULTS}


# ------------------------------------------------------------------------------------------------
# Compression and visibility
# ------------------------------------------------------------------------------------------------


def _group_compressed_scores(qg: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, vis1: torch.Tensor,
                             vis2: torch.Tensor, scale: float) -> torch.Tensor:
    """Stage-1 score of every visible fine compressed key, summed over the heads of a group.

    qg [B, Hk, G, C, D] fp32; k1 [B, Hk, K1, D], k2 [B, Hk, K2, D] fp32; vis1, vis2 [C].
    Returns [B, Hk, C, K1] fp32: ``sum_g exp(q.k1 * scale - logsumexp_visible(q.k2 * scale))``,
    0 for invisible keys and for rows that see no coarse key.
    """
    K1, K2 = k1.shape[2], k2.shape[2]
    s2 = torch.einsum("bhgcd,bhnd->bhgcn", qg, k2) * scale
    s2 = s2.masked_fill(~(torch.arange(K2, device=qg.device) < vis2.unsqueeze(-1)), float("-inf"))
    lse = torch.logsumexp(s2, dim=-1) if K2 > 0 else qg.new_full(qg.shape[:-1], float("-inf"))
    del s2
    s1 = torch.einsum("bhgcd,bhnd->bhgcn", qg, k1) * scale
    p = torch.exp(s1 - lse.unsqueeze(-1))
    keep = (torch.arange(K1, device=qg.device) < vis1.unsqueeze(-1)) & torch.isfinite(lse).unsqueeze(-1)
    p = torch.where(keep, p, torch.zeros((), dtype=p.dtype, device=p.device))
    return p.sum(dim=2)


def pool_block_scores(scores: torch.Tensor, n_blocks: int, pool: int, n_existing: int | None = None) -> torch.Tensor:
    """Max-pool compressed-key scores to selection blocks (``max_pooling_1d_varlen``).

    Block b takes the max over compressed keys ``[b*pool - 1, b*pool + pool)`` that exist
    (``< n_existing``); keys at index ``>= scores.shape[-1]`` but ``< n_existing`` score 0 (they exist
    but are invisible to these queries); a window with no existing key gives -inf.

    Args:
        scores: [..., K] compressed-key scores.
        n_blocks: number of output blocks.
        pool: ``block_size // kernel_stride``.
        n_existing: number of existing compressed keys (default ``scores.shape[-1]``).
    Returns:
        [..., n_blocks] pooled scores.
    """
    K = scores.shape[-1]
    n_existing = K if n_existing is None else n_existing
    L = n_blocks * pool + 1
    x = scores.new_full((*scores.shape[:-1], L), float("-inf"))
    n_zero = min(n_existing, L - 1)
    if n_zero > 0:
        x[..., 1 : 1 + n_zero] = 0.0
    n = min(K, L - 1)
    if n > 0:
        x[..., 1 : 1 + n] = scores[..., :n]
    return x.unfold(-1, pool + 1, pool).amax(dim=-1)


# ------------------------------------------------------------------------------------------------
# Candidate scores (chunked) -> top-k
# ------------------------------------------------------------------------------------------------


@dataclass
class BlockScores:
    """Native InfLLMv2 block scores for one chunk of query rows (the Stem hook point).

    Attributes:
        scores: [B, Hk, C, NB] fp32 pooled stage-1 score of every block up to the chunk's last query
            block (probability-like: a sum over the group's heads of exp(logit - coarse lse); use
            ``log`` for logit space). Not yet forced: forced blocks keep their raw score.
        forced: [C, NB] bool, blocks the native method always keeps (init + local incl. diagonal).
        candidate: [C, NB] bool, blocks a row may select at all (``b <= q_block``).
        q_pos: [C] long absolute query positions; ``rows`` their indices in ``q``.
        k_total: native budget per row, forced blocks included (``min(topk + local, n_blocks)``).
        k_free: optional budget of non-forced blocks ([C] or [B, Hk, C] long); when set it replaces
            ``k_total - n_forced`` (TPD-style per-row budgets).
        block_size: tokens per block.
    """

    scores: torch.Tensor
    forced: torch.Tensor
    candidate: torch.Tensor
    q_pos: torch.Tensor
    rows: slice
    k_total: int
    block_size: int
    k_free: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)

    @property
    def n_forced(self) -> torch.Tensor:
        """[C] number of forced candidate blocks per row."""
        return (self.forced & self.candidate).sum(-1)


def block_masks(q_pos: torch.Tensor, n_blocks: int, params: InfLLMv2Params) -> tuple[torch.Tensor, torch.Tensor]:
    """(candidate, forced) [C, n_blocks] bool for query positions q_pos [C]: the blocks a row may
    select (b <= its query block) and those it always keeps (init blocks, local blocks incl. diagonal)."""
    q_block = torch.div(q_pos, params.block_size, rounding_mode="floor")
    blk = torch.arange(n_blocks, device=q_pos.device)
    candidate = blk.unsqueeze(0) <= q_block.unsqueeze(1)
    forced = (blk.unsqueeze(0) < params.init_blocks) | (blk.unsqueeze(0) >= (q_block - params.local_blocks).unsqueeze(1))
    return candidate, forced & candidate


def iter_block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    params: InfLLMv2Params,
    *,
    q_offset: int | None = None,
    chunk_size: int = 64,
    emulate_kernel_offset: bool = True,
    score_dtype: torch.dtype | str | None = "auto",
) -> Iterator[BlockScores]:
    """Yield the native candidate scores chunk by chunk of ``chunk_size`` query rows.

    Args:
        q: [B, Hq, S, D] selection queries (post-RoPE, or pre-RoPE with ``use_nope``).
        k: [B, Hk, T, D] all keys of the sequence so far (same RoPE choice as ``q``).
        q_offset: absolute position of ``q[:, :, 0]`` (default ``T - S``).
        emulate_kernel_offset: apply the stage-1 kernel's offset quirk on a fresh prefill
            (``q_offset == 0`` and ``S == T > 1``); see :func:`kernel_causal_offset`.
        score_dtype: round the compressed scores to this dtype before pooling, as the kernel stores
            them in the input dtype; ``"auto"``: q's dtype if it is fp16/bf16, else no rounding.

    Memory per chunk: O(B * Hq * chunk * T / kernel_stride) fp32.
    """
    B, Hq, S, D = q.shape
    Hk, T = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head dim")
    if Hq % Hk != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key heads ({Hk})")
    G = Hq // Hk
    offset = T - S if q_offset is None else int(q_offset)
    if offset < 0 or offset + S > T:
        raise ValueError(f"queries [{offset}, {offset + S}) must lie inside the {T} keys")
    if score_dtype == "auto":
        score_dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else None

    p = params
    k1_half = compress_keys(k, p.kernel_size, p.kernel_stride)
    k2_half = compress_keys(k, p.coarse_kernel_size, p.coarse_stride)
    k1, k2 = k1_half.float(), k2_half.float()
    fused = (fused_stage1_scores is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
             and G & (G - 1) == 0 and D & (D - 1) == 0 and D >= 16)
    K1, K2 = k1.shape[2], k2.shape[2]
    fresh_prefill = emulate_kernel_offset and offset == 0 and S == T and S > 1
    d1 = kernel_causal_offset(S, K1, p.kernel_stride) if fresh_prefill else 0
    d2 = kernel_causal_offset(S, K2, p.coarse_stride) if fresh_prefill else 0
    scale = D ** -0.5
    k_total = p.k_total(T)
    device = q.device

    for s0 in range(0, S, chunk_size):
        s1 = min(S, s0 + chunk_size)
        C = s1 - s0
        q_pos = torch.arange(s0 + offset, s1 + offset, device=device)
        vis1 = visible_compressed(q_pos, K1, p.kernel_size, p.kernel_stride, d1)
        vis2 = visible_compressed(q_pos, K2, p.coarse_kernel_size, p.coarse_stride, d2)
        n1, n2 = int(vis1.max()), int(vis2.max())  # only columns someone in the chunk can see
        if fused:  # Triton: group sum in registers, bf16/fp16 products with fp32 accumulation
            comp = fused_stage1_scores(q[:, :, s0:s1], k1_half[:, :, :n1], k2_half[:, :, :n2], vis1, vis2, scale)
        else:
            qg = q[:, :, s0:s1].float().reshape(B, Hk, G, C, D)
            comp = _group_compressed_scores(qg, k1[:, :, :n1], k2[:, :, :n2], vis1, vis2, scale)  # [B,Hk,C,n1]
        if score_dtype is not None:
            comp = comp.to(score_dtype).float()
        nb = int(q_pos[-1]) // p.block_size + 1
        pooled = pool_block_scores(comp, nb, p.pool_size, n_existing=K1)  # [B,Hk,C,nb]
        candidate, forced = block_masks(q_pos, nb, p)
        yield BlockScores(
            scores=pooled,
            forced=forced,
            candidate=candidate,
            q_pos=q_pos,
            rows=slice(s0, s1),
            k_total=k_total,
            block_size=p.block_size,
        )


def topk_blocks(
    scores: torch.Tensor,
    forced: torch.Tensor,
    candidate: torch.Tensor,
    *,
    k_total: int | torch.Tensor | None = None,
    k_free: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep every forced candidate block plus the best-scoring non-forced candidates.

    The native rule is ``topk(k_total)`` over scores where forced blocks are +inf; this is the same
    selection written so that budgets may vary per row: ``k_free`` non-forced blocks are kept
    (default ``k_total - n_forced``, at least 0). Ties go to the lower block index.

    Args:
        scores: [B, Hk, C, NB] block scores (NaN counts as -inf).
        forced, candidate: [C, NB] or [B, Hk, C, NB] bool.
        k_total: int or [C] / [B, Hk, C] budgets including forced blocks.
        k_free: int or [C] / [B, Hk, C] budgets of non-forced blocks (overrides ``k_total``).
    Returns:
        idx [B, Hk, C, Kmax] int32 ascending, -1 padded; sel_scores [B, Hk, C, Kmax] fp32 (NaN
        padded); sel_forced [B, Hk, C, Kmax] bool; counts [B, Hk, C] int32.
    """
    B, H, C, NB = scores.shape
    forced = (forced & candidate).expand(B, H, C, NB)
    candidate = candidate.expand(B, H, C, NB)
    n_forced = forced.sum(-1)
    if k_free is None:
        if k_total is None:
            raise ValueError("give k_total or k_free")
        k_free = torch.as_tensor(k_total, device=scores.device) - n_forced
    k_free = torch.as_tensor(k_free, device=scores.device).clamp(min=0).expand(B, H, C)
    free = candidate & ~forced
    key = torch.nan_to_num(scores.float(), nan=float("-inf"), posinf=float("inf"))
    # Order: non-forced candidates first, by score descending, ties by lower index (two stable sorts).
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    order = order.gather(-1, torch.sort(free.gather(-1, order).to(torch.int8), dim=-1, descending=True,
                                        stable=True).indices)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(NB, device=scores.device).expand_as(order))
    selected = forced | (free & (rank < k_free.unsqueeze(-1)))
    counts = selected.sum(-1)
    kmax = int(counts.max()) if counts.numel() else 0
    pos = torch.sort(selected.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :kmax]
    valid = torch.arange(kmax, device=scores.device) < counts.unsqueeze(-1)
    idx = torch.where(valid, pos, torch.full_like(pos, -1)).to(torch.int32)
    sel_scores = scores.float().gather(-1, pos).masked_fill(~valid, float("nan"))
    sel_forced = forced.gather(-1, pos) & valid
    return idx, sel_scores, sel_forced, counts.to(torch.int32)


@dataclass
class BlockSelection:
    """Selected key blocks per (batch, KV head, query row).

    Attributes:
        idx: [B, Hk, S, Kmax] int32 block numbers, ascending, -1 padded.
        counts: [B, Hk, S] int32 valid leading entries.
        scores: [B, Hk, S, Kmax] fp32 native (or rescored) block score of each selected block, NaN
            where padded. Forced blocks keep their raw pooled score (may be -inf). None from the
            fused GPU selection (it keeps no scores).
        forced: [B, Hk, S, Kmax] bool, the block was kept because it is an init/local block.
        block_size: tokens per block; q_offset: absolute position of row 0.
        query_block: consecutive query tokens that share one row (Stem's `tile_rows` groups when
            every group's tokens share their candidates: then there are ceil(S / query_block) rows).
    """

    idx: torch.Tensor
    counts: torch.Tensor
    scores: torch.Tensor | None
    forced: torch.Tensor
    block_size: int
    q_offset: int
    query_block: int = 1

    def to_selection(self) -> Selection:
        """The project's `Selection` (rows of `query_block` tokens; `n_forced` from the forced flags)."""
        idx = self.idx if self.idx.shape[-1] else torch.full((*self.idx.shape[:3], 1), -1, dtype=torch.int32,
                                                              device=self.idx.device)
        return Selection(idx=idx, counts=self.counts, block_size=self.block_size, query_block=self.query_block,
                         q_offset=self.q_offset, n_forced=(self.forced & (self.idx >= 0)).sum(-1).to(torch.int32),
                         ordered=True)  # both selectors write each row ascending (the class's contract)

    def split_forced(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(forced_idx, cand_idx, cand_scores)`` for Stem's ``stem_select``.

        forced_idx [B, Hk, S, F] and cand_idx [B, Hk, S, Kc] int32 ascending, -1 padded;
        cand_scores [B, Hk, S, Kc] fp32 native scores (probability-like: ``score_space="prob"``),
        NaN where padded.
        """
        valid = self.idx >= 0
        out = []
        for keep in (valid & self.forced, valid & ~self.forced):
            n = int(keep.sum(-1).max()) if keep.numel() else 0
            order = torch.sort(keep.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :n]
            live = keep.gather(-1, order)
            out.append((torch.where(live, self.idx.gather(-1, order), -1),
                        self.scores.gather(-1, order).masked_fill(~live, float("nan"))))
        return out[0][0], out[1][0], out[1][1]


def group_block_scores(scores: torch.Tensor, tile_rows: int) -> torch.Tensor:
    """The score by which a group of ``tile_rows`` consecutive query rows ranks its blocks: the sum over
    the group's rows of each row's probability-like score (NaN and values <= 0 count as 0), i.e. the
    group's InfLLMv2 mass on the block. Rows are grouped from the first row of ``scores``; a last,
    partial group sums the rows it has.

    scores [B, Hk, C, NB] -> [B, Hk, ceil(C / tile_rows), NB] fp32."""
    B, H, C, NB = scores.shape
    x = scores.float()
    x = torch.where(x > 0, x, 0.0)
    n_groups = -(-C // tile_rows)
    pad = n_groups * tile_rows - C
    if pad:
        x = torch.cat([x, x.new_zeros(B, H, pad, NB)], dim=2)
    x = x.view(B, H, n_groups, tile_rows, NB)
    total = x[:, :, :, 0]
    for t in range(1, tile_rows):  # row by row, in the order the fused selection adds them (bit-equal sums)
        total = total + x[:, :, :, t]
    return total


def _pad_last(t: torch.Tensor, width: int, value: float | int | bool) -> torch.Tensor:
    if t.shape[-1] == width:
        return t
    pad = t.new_full((*t.shape[:-1], width - t.shape[-1]), value)
    return torch.cat([t, pad], dim=-1)


#: per-chunk budget of non-forced blocks computed from the chunk's scores ([C] or [B, Hk, C] long)
FreeBudgetFn = Callable[[BlockScores], torch.Tensor]


def infllmv2_select(
    q: torch.Tensor,
    k: torch.Tensor,
    params: InfLLMv2Params,
    *,
    q_offset: int | None = None,
    chunk_size: int = 64,
    key_bias: torch.Tensor | None = None,
    k_free: torch.Tensor | None = None,
    free_budget_fn: FreeBudgetFn | None = None,
    emulate_kernel_offset: bool = True,
    score_dtype: torch.dtype | str | None = "auto",
    use_fused: bool | None = None,
    k_free_max: int | None = None,
    tile_rows: int = 1,
) -> BlockSelection:
    """InfLLMv2 block selection for queries ``q`` over keys ``k``; native unless Stem's inputs are given.

    Stem's inputs (all optional; the Stem step computes them, see ``stem_boost.adapters.infllmv2``):
        key_bias: [B, Hk, n_blocks] OAM bias per key block, added in log space to the pooled score of
            every non-forced block (``combine_scores(..., space="prob")``).
        k_free: [S] or [B, Hk, S] long, non-forced blocks to keep per query row (replaces the
            native ``k_total - n_forced``).
        free_budget_fn: computes ``k_free`` of a chunk from its native scores (the mass schedule).
    k_free_max: max(k_free) when the caller knows it on the host (the fused selection's list width
        then needs no device-to-host read).
    tile_rows: Stem's rows that rank together: consecutive groups of ``tile_rows`` query rows (by row
        index from the first) rank their non-forced blocks by the group's summed score
        (:func:`group_block_scores`) before the bias, each keeping the group's budget
        (`group_budgets`; natively its own k_total minus its forced blocks) of its own candidates,
        and its own forced blocks. When the groups share their candidates
        (`groups_share_candidates`) the selection has one row per group (``query_block =
        tile_rows``), the list a union tile of the kernel walks once. 1 (default): every row ranks
        alone (native InfLLMv2).
    use_fused: the fused Triton selection (`kernels.infllmv2_select`; default: on CUDA with fp16 /
        bf16 queries, unless an explicit `score_dtype` asks for the PyTorch path); it returns the
        same blocks (ties: the smaller block) without their scores. `free_budget_fn` runs there on
        each chunk's pooled scores (three launches per chunk instead of two).
    See :func:`iter_block_scores` for the other arguments; memory is bounded by the chunk size.
    """
    B, Hk, S = q.shape[0], k.shape[1], q.shape[2]
    offset = k.shape[2] - S if q_offset is None else int(q_offset)
    chunk_size = grouped_chunk_rows(chunk_size, tile_rows)  # whole groups (and budget windows) a chunk
    shared = tile_rows > 1 and groups_share_candidates(offset, params.block_size, tile_rows)
    if use_fused is None:
        use_fused = (infllmv2_select_fused is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
                     and score_dtype == "auto")
    if use_fused:  # the fused Triton selection: two launches per chunk, Stem's bias and budgets inside
        chunk_budgets = None
        if free_budget_fn is not None:
            def chunk_budgets(pooled: torch.Tensor, s0: int, s1: int) -> torch.Tensor:  # [B, Hk, C, NB] -> [B, Hk, C]
                q_pos = torch.arange(s0 + offset, s1 + offset, device=q.device)
                candidate, forced = block_masks(q_pos, pooled.shape[-1], params)
                return free_budget_fn(BlockScores(scores=pooled, forced=forced, candidate=candidate, q_pos=q_pos,
                                                  rows=slice(s0, s1), k_total=params.k_total(k.shape[2]),
                                                  block_size=params.block_size))
        idx, counts, _ = infllmv2_select_fused(q, k, params, q_offset=offset, key_bias=key_bias,
                                               budgets=None if chunk_budgets else k_free, budgets_max=k_free_max,
                                               chunk_budgets=chunk_budgets,
                                               emulate_kernel_offset=emulate_kernel_offset,
                                               # the mass schedule's budgets depend on the chunk: the same rows as
                                               # the PyTorch path; otherwise the kernel's own (larger) chunks
                                               tile_rows=tile_rows,
                                               **(dict(chunk_size=chunk_size) if chunk_budgets else {}))
        row_block = tile_rows if shared else 1
        q_block = (torch.arange(idx.shape[2], device=q.device) * row_block + offset) // params.block_size  # [R]
        forced = (idx >= 0) & ((idx < params.init_blocks) | (idx >= (q_block - params.local_blocks)[:, None]))
        return BlockSelection(idx=idx, counts=counts, scores=None, forced=forced, block_size=params.block_size,
                              q_offset=offset, query_block=row_block)
    parts: list[tuple[torch.Tensor, ...]] = []
    for bs in iter_block_scores(q, k, params, q_offset=offset, chunk_size=chunk_size,
                                emulate_kernel_offset=emulate_kernel_offset, score_dtype=score_dtype):
        if free_budget_fn is not None:
            bs.k_free = free_budget_fn(bs)
        elif k_free is not None:
            bs.k_free = k_free[..., bs.rows]
        if tile_rows > 1:  # rank by the group's summed score, with the group's budget
            bs = group_ranking(bs, tile_rows, one_row_per_group=shared)
        if key_bias is not None:
            nb = bs.scores.shape[-1]
            rescored = combine_scores(bs.scores, key_bias[..., :nb].unsqueeze(2).expand_as(bs.scores), space="prob")
            bs.scores = torch.where(bs.forced & bs.candidate, bs.scores, rescored)
        parts.append(topk_blocks(bs.scores, bs.forced, bs.candidate, k_total=bs.k_total, k_free=bs.k_free))
    kmax = max((p[0].shape[-1] for p in parts), default=0)
    idx = torch.cat([_pad_last(p[0], kmax, -1) for p in parts], dim=2) if parts else q.new_empty(B, Hk, 0, 0, dtype=torch.int32)
    scores = torch.cat([_pad_last(p[1], kmax, float("nan")) for p in parts], dim=2) if parts else q.new_empty(B, Hk, 0, 0)
    forced = torch.cat([_pad_last(p[2], kmax, False) for p in parts], dim=2) if parts else q.new_empty(B, Hk, 0, 0, dtype=torch.bool)
    counts = torch.cat([p[3] for p in parts], dim=2) if parts else q.new_empty(B, Hk, 0, dtype=torch.int32)
    return BlockSelection(idx=idx, counts=counts, scores=scores, forced=forced, block_size=params.block_size,
                          q_offset=offset, query_block=tile_rows if shared else 1)


def group_ranking(bs: BlockScores, tile_rows: int, *, one_row_per_group: bool) -> BlockScores:
    """A chunk's scores and budgets for Stem's grouped ranking (`infllmv2_select(tile_rows=...)`): every
    row's non-forced blocks take its group's summed score (`group_block_scores`) and, when budgets
    are set, every row the group's budget (`group_budgets`; natively each row keeps k_total minus its
    forced blocks); forced blocks keep the row's own score. one_row_per_group: the groups share their
    candidates (`groups_share_candidates`), so the result has one row per group (its first row's
    masks). bs.scores [B, Hk, C, NB] -> [B, Hk, C or ceil(C / tile_rows), NB]."""
    C = bs.scores.shape[2]
    grouped = group_block_scores(bs.scores, tile_rows)  # [B, Hk, C / tile_rows, NB]
    k_free = None if bs.k_free is None else group_budgets(torch.as_tensor(bs.k_free, device=bs.scores.device),
                                                          tile_rows)  # [..., C / tile_rows]
    if one_row_per_group:
        first = slice(0, C, tile_rows)
        free = bs.candidate[first] & ~bs.forced[first]
        return BlockScores(scores=torch.where(free, grouped, bs.scores[:, :, first].float()), forced=bs.forced[first],
                           candidate=bs.candidate[first], q_pos=bs.q_pos[first], rows=bs.rows, k_total=bs.k_total,
                           block_size=bs.block_size, k_free=k_free)
    free = bs.candidate & ~bs.forced
    spread = grouped.repeat_interleave(tile_rows, dim=2)[:, :, :C]
    return BlockScores(scores=torch.where(free, spread, bs.scores.float()), forced=bs.forced, candidate=bs.candidate,
                       q_pos=bs.q_pos, rows=bs.rows, k_total=bs.k_total, block_size=bs.block_size,
                       k_free=None if k_free is None else k_free.repeat_interleave(tile_rows, dim=-1)[..., :C])


# ------------------------------------------------------------------------------------------------
# Block-sparse attention (PyTorch; the shared Triton kernel replaces it on GPU)
# ------------------------------------------------------------------------------------------------


def selection_to_dense_mask(idx: torch.Tensor, block_size: int, n_keys: int, q_offset: int,
                            causal: bool = True) -> torch.Tensor:
    """[B, Hk, S, T] bool mask of the keys a selection lets each query see (small S, T only)."""
    B, H, S, K = idx.shape
    nb = -(-n_keys // block_size)
    blk = torch.zeros(B, H, S, nb + 1, dtype=torch.bool, device=idx.device)
    blk.scatter_(-1, torch.where(idx >= 0, idx.long(), nb), True)
    mask = blk[..., :nb].repeat_interleave(block_size, dim=-1)[..., :n_keys]
    if causal:
        qpos = torch.arange(S, device=idx.device) + q_offset
        mask = mask & (torch.arange(n_keys, device=idx.device) <= qpos.unsqueeze(-1))
    return mask


def infllmv2_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    block_size: int,
    *,
    q_offset: int | None = None,
    sm_scale: float | None = None,
    chunk_size: int = 64,
    kv_tile_blocks: int = 64,
) -> torch.Tensor:
    """Attention restricted to the selected key blocks, causal inside the diagonal block.

    The semantics of ``infllmv2_attn_varlen_func(..., causal=True, topk_idx=idx)``: query i of a
    GQA group attends, with one fp32 softmax, to every key j <= its position inside the blocks of
    ``idx[b, h_kv, i]``. Computed per chunk of ``chunk_size`` query rows over the union of their
    blocks, ``kv_tile_blocks`` blocks at a time with an online softmax: memory is
    O(B * Hq * chunk * kv_tile_blocks * block_size), never an S x T mask.

    Args:
        q: [B, Hq, S, D]; k: [B, Hk, T, D]; v: [B, Hk, T, Dv].
        idx: [B, Hk, S, K] int block numbers, -1 padded.
    Returns:
        [B, Hq, S, Dv] in q's dtype.
    """
    B, Hq, S, D = q.shape
    Hk, T, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hk
    offset = T - S if q_offset is None else int(q_offset)
    scale = D ** -0.5 if sm_scale is None else sm_scale
    nb_total = -(-T // block_size)
    device = q.device
    out = torch.empty(B, Hq, S, Dv, dtype=q.dtype, device=device)
    tok_in_blk = torch.arange(block_size, device=device)
    for s0 in range(0, S, chunk_size):
        s1 = min(S, s0 + chunk_size)
        C = s1 - s0
        sel = idx[:, :, s0:s1].long()
        member = torch.zeros(B, Hk, C, nb_total + 1, dtype=torch.bool, device=device)
        member.scatter_(-1, torch.where(sel >= 0, sel, nb_total), True)
        member = member[..., :nb_total]
        union = member.any(dim=2).any(dim=1).any(dim=0).nonzero().flatten()  # ascending block ids
        qg = q[:, :, s0:s1].float().reshape(B, Hk, G, C, D)
        qpos = torch.arange(s0 + offset, s1 + offset, device=device)
        m = torch.full((B, Hk, G, C), float("-inf"), device=device)
        l = torch.zeros(B, Hk, G, C, device=device)
        acc = torch.zeros(B, Hk, G, C, Dv, device=device)
        for u0 in range(0, union.numel(), kv_tile_blocks):
            blocks = union[u0 : u0 + kv_tile_blocks]
            tok = (blocks.unsqueeze(-1) * block_size + tok_in_blk).flatten()  # [N]
            tok_ok = tok < T
            tok_c = tok.clamp(max=T - 1)
            kt = k[:, :, tok_c].float()  # [B,Hk,N,D]
            vt = v[:, :, tok_c].float()
            allowed = member[..., blocks].repeat_interleave(block_size, dim=-1)  # [B,Hk,C,N]
            allowed = allowed & tok_ok & (tok.unsqueeze(0) <= qpos.unsqueeze(-1))
            s = torch.einsum("bhgcd,bhnd->bhgcn", qg, kt) * scale
            s = s.masked_fill(~allowed.unsqueeze(2), float("-inf"))
            m_new = torch.maximum(m, s.amax(dim=-1))
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_safe.unsqueeze(-1))
            corr = torch.exp(m - m_safe)
            l = l * corr + p.sum(dim=-1)
            acc = acc * corr.unsqueeze(-1) + torch.einsum("bhgcn,bhnd->bhgcd", p, vt)
            m = m_new
        o = acc / torch.where(l > 0, l, torch.ones_like(l)).unsqueeze(-1)
        out[:, :, s0:s1] = o.reshape(B, Hq, C, Dv).to(q.dtype)
    return out
