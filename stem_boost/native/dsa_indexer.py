"""Memory-bounded DSA lightning-indexer top-k (docs/design.md, "Native selectors").

The native transformers indexer (``DeepseekV32Indexer``, ``GlmMoeDsaIndexer``, ...) materialises the
fp32 score tensor ``[B, S, H, T]`` (64 heads x 128K x 128K x 4 B = 4 TiB at 128K context) before
reducing it over the heads. This module computes the same selection chunk by chunk over the query
positions so that the fp32 ``[B, chunk, H, T_chunk]`` intermediate stays under a byte budget.

Score (identical to the native forward)::

    I[b, s, t] = sum_h w[b, s, h] * relu(softmax_scale * q[b, s, h, :] . k[b, t, :])
    w          = weights_proj(x).float() * n_heads ** -0.5                     (fp32)
    I         += mask     (float additive mask)   or   I[~mask] = -inf      (bool mask)
    top-k over t with k = min(index_topk, T)

q and k are produced with the very same ops and dtypes as the module's own forward (same
projections, same RoPE function taken from the model's own module, ``q.float()`` / ``k.float()``
before the product), including the indexer key-cache update ``past_key_values.update_indexer``.

Differences from the native output, by design:

* Rows of the native top-k that have fewer than ``topk`` valid (unmasked) keys are padded by the
  native ``topk`` with *masked* positions (arbitrary ones; their score is ``-inf`` or
  ``finfo.min + x``); the masked sparse attention ignores them. Here those slots are ``-1`` with
  score ``-inf``. Use :meth:`IndexerTopK.as_native_indices` to get indices that can be fed back to
  the model's ``scatter`` (``-1`` replaced by a valid index of the same row).
* The selection is "bit-compatible up to ties": the per-element fp32 values are computed with the
  same ops but by GEMMs of different shapes, which a BLAS may round differently in the last bit.
  Keys whose scores are (near-)tied at the top-k boundary may then be exchanged.

Variants of the indexer (``detect_variant``):

=====================  ============  ==========  =============================================
class                  RoPE          rope dims   other
=====================  ============  ==========  =============================================
DeepseekV32Indexer     half-split    first       (the "NON-interleaved" RoPE, unlike its MLA)
AXK2Indexer            half-split    first       same forward as DeepSeek-V3.2
GlmMoeDsaIndexer       interleaved   first
HYV4Indexer            half-split    last        k_norm in fp32, softmax_scale folded into w
=====================  ============  ==========  =============================================

``Glm5NextTextIndexer`` (k-pool compression) and ``DeepseekV4Indexer`` (compressed keys) are
different algorithms and are rejected.
"""

from __future__ import annotations

import inspect
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch

from ..config import FP8_INDEXER_HEAD_DIMS
from ..rope import apply_rope_half, apply_rope_interleaved, is_stock_half_rope

try:  # the fused score kernels and the radix top-k need Triton (CUDA); the CPU path never calls them
    from ..kernels.dsa_topk import topk_buffer_bytes, topk_rows
    from ..kernels.indexer_scores import fp8_index_scores, fp8_index_scores_reference, fused_index_scores, quantize_fp8
    from ..kernels.rope import rope_half_rounded_fused, rounded_rope_refuses
except ImportError:  # pragma: no cover
    fused_index_scores = fp8_index_scores = fp8_index_scores_reference = quantize_fp8 = topk_rows = None
    topk_buffer_bytes = rounded_rope_refuses = rope_half_rounded_fused = None
try:  # the Hopper FP8 scorer is Gluon code: an API change in a later Triton costs only this route
    from ..kernels.indexer_scores_sm90 import fp8_index_scores_sm90, supports_fp8_scores_sm90
except ImportError:  # pragma: no cover
    fp8_index_scores_sm90 = supports_fp8_scores_sm90 = None
from torch.overrides import TorchFunctionMode

__all__ = [
    "IndexerVariant",
    "IndexerTopK",
    "NativeTopK",
    "DEEPSEEK_V32",
    "GLM_MOE_DSA",
    "HY_V4",
    "DEFAULT_MAX_BYTES",
    "detect_variant",
    "indexer_qk",
    "indexer_weights",
    "valid_key_mask",
    "chunked_index_topk",
    "dsa_indexer_topk",
    "native_indexer_topk",
    "chunk_rows_for_budget",
]

DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # fp32 [B, chunk, H, T] intermediate budget


# --------------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexerVariant:
    """How one model family's indexer forward builds q, k and w.

    rope: ``"half"`` (``rotate_half``, non-interleaved) or ``"interleave"`` (pairs (x0, x1), ...).
    rope_first: the rotary slice is the first ``qk_rope_head_dim`` dims of each head (else the last).
    k_norm_fp32: ``k_norm(wk(x).to(k_norm.weight.dtype)).to(x.dtype)`` instead of ``k_norm(wk(x))``.
    scale_in_weights: ``softmax_scale`` multiplies w (after the relu) instead of q.k (before it).
    """

    rope: str
    rope_first: bool = True
    k_norm_fp32: bool = False
    scale_in_weights: bool = False
    family: str = ""

    def __post_init__(self):
        if self.rope not in ("half", "interleave"):
            raise ValueError(f"rope must be 'half' or 'interleave', got {self.rope!r}")


DEEPSEEK_V32 = IndexerVariant("half", family="deepseek_v32")
GLM_MOE_DSA = IndexerVariant("interleave", family="glm_moe_dsa")
HY_V4 = IndexerVariant("half", rope_first=False, k_norm_fp32=True, scale_in_weights=True, family="hy_v4")

# Keyed by the name of the class that *defines* `forward` (a subclass that overrides forward is
# not matched by its parent's entry and goes through the source check instead).
_KNOWN_FORWARDS = {
    "DeepseekV32Indexer": DEEPSEEK_V32,
    "AXK2Indexer": IndexerVariant("half", family="axk2"),
    "GlmMoeDsaIndexer": GLM_MOE_DSA,
    "HYV4Indexer": HY_V4,
}
_UNSUPPORTED = {
    "Glm5NextTextIndexer": "k-pool compressed indexer (selects pools, not tokens)",
    "DeepseekV4Indexer": "indexes compressed keys (CSA), not tokens",
    "MiniMaxM3VLIndexer": "block indexer with per-head selections",
}


def _forward_owner(indexer) -> type:
    for cls in type(indexer).__mro__:
        if "forward" in cls.__dict__:
            return cls
    raise TypeError(f"{type(indexer).__name__} has no forward")


def _variant_from_source(src: str) -> IndexerVariant | None:
    """Infer the variant from the forward's source (used for unknown classes only)."""
    s = re.sub(r"\s+", "", src)
    needed = ("update_indexer", ".topk(", "weights_proj", "F.relu(scores)")
    if not all(n in s for n in needed) or "kpool" in s:
        return None
    if "apply_rotary_pos_emb_interleave(q_rot,k_rot" in s:
        rope = "interleave"
    elif "apply_rotary_pos_emb(q_rot,k_rot" in s:
        rope = "half"
    else:
        return None
    if "q_rot,q_pass=torch.split(q," in s and "torch.cat([q_rot,q_pass]" in s:
        rope_first = True
    elif "q_pass,q_rot=torch.split(q," in s and "torch.cat([q_pass,q_rot]" in s:
        rope_first = False
    else:
        return None
    if "self.k_norm(self.wk(hidden_states).to(self.k_norm.weight.dtype)).to(hidden_states.dtype)" in s:
        k_norm_fp32 = True
    elif "self.k_norm(self.wk(hidden_states))" in s:
        k_norm_fp32 = False
    else:
        return None
    if "k.transpose(-1,-2).float().unsqueeze(1))*self.softmax_scale" in s:
        scale_in_weights = False
    elif "*(self.n_heads**-0.5)*self.softmax_scale" in s:
        scale_in_weights = True
    else:
        return None
    return IndexerVariant(rope, rope_first, k_norm_fp32, scale_in_weights, family="inferred")


def detect_variant(indexer) -> IndexerVariant:
    """The RoPE layout etc. of ``indexer``'s forward.

    Known classes (matched on the class that defines ``forward``) come from a table; any other
    class is accepted only if its forward's source matches one of the known patterns exactly
    (else ``ValueError``: pass ``variant=`` explicitly, after checking with ``native_indexer_topk``).
    """
    owner = _forward_owner(indexer)
    name = owner.__name__
    if name in _UNSUPPORTED:
        raise ValueError(f"{name} is not a token-level DSA lightning indexer: {_UNSUPPORTED[name]}")
    if name in _KNOWN_FORWARDS:
        return _KNOWN_FORWARDS[name]
    try:
        src = inspect.getsource(owner.forward)
    except (OSError, TypeError):
        src = ""
    v = _variant_from_source(src)
    if v is None:
        raise ValueError(
            f"cannot tell the indexer variant of {type(indexer).__module__}.{type(indexer).__name__}; "
            "pass variant=IndexerVariant(...) explicitly"
        )
    return v


# --------------------------------------------------------------------------------------------------
# RoPE: the model's own functions when available
# --------------------------------------------------------------------------------------------------
def _rope_fn(indexer, variant: IndexerVariant):
    """The model module's own apply function (so a hub kernel swapped in there is used too)."""
    mod = sys.modules.get(type(indexer).__module__)
    name = "apply_rotary_pos_emb" if variant.rope == "half" else "apply_rotary_pos_emb_interleave"
    fn = getattr(mod, name, None) if mod is not None else None
    if fn is None:
        fn = apply_rope_half if variant.rope == "half" else apply_rope_interleaved
    return fn


# --------------------------------------------------------------------------------------------------
# q, k, w exactly as the native forward
# --------------------------------------------------------------------------------------------------
def indexer_qk(
    indexer,
    hidden_states: torch.Tensor,
    q_resid: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    past_key_values: Any = None,
    variant: IndexerVariant | None = None,
    fused_rope: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``[B, S, H, D]`` and k ``[B, T, D]`` (model dtype) as the native forward builds them.

    ``fused_rope`` (None: on CUDA): transformers' own half-split rotation in a 16-bit dtype is
    applied in place by one Triton pass (`kernels.rope.rope_half_rounded_fused`, the same bits)
    instead of the model function's six PyTorch passes; any other rotation, dtype or an autograd
    graph keeps the model's function.

    With ``past_key_values`` the new keys are appended through
    ``past_key_values.update_indexer(k, indexer.layer_idx)`` and the full cached keys are returned
    (T = past + S for a dynamic cache, T = max_cache_len for a static one). This mutates the cache,
    exactly once, like the native forward.
    """
    variant = variant or detect_variant(indexer)
    B, S, _ = hidden_states.shape
    H, D, R = indexer.n_heads, indexer.head_dim, indexer.qk_rope_head_dim
    cos, sin = position_embeddings
    rope = _rope_fn(indexer, variant)

    q = indexer.wq_b(q_resid).view(B, S, H, D)
    if variant.k_norm_fp32:
        k = indexer.k_norm(indexer.wk(hidden_states).to(indexer.k_norm.weight.dtype)).to(hidden_states.dtype)
    else:
        k = indexer.k_norm(indexer.wk(hidden_states))
    k = k.unsqueeze(2)  # [B, S, 1, D]

    rope_slice = slice(0, R) if variant.rope_first else slice(D - R, D)
    if fused_rope is None:
        fused_rope = q.is_cuda
    if fused_rope and _rotates_in_place(rope, variant, q[..., rope_slice], k[..., rope_slice], cos, sin):
        rope_half_rounded_fused(q[..., rope_slice], cos, sin, head_axis=2, out=q[..., rope_slice])
        rope_half_rounded_fused(k[..., rope_slice], cos, sin, head_axis=2, out=k[..., rope_slice])
        k = k.squeeze(2)
    else:
        q_rot, k_rot = rope(q[..., rope_slice], k[..., rope_slice], cos, sin, unsqueeze_dim=2)
        q = with_rotated_part(q, q_rot, rope_slice)  # [B, S, H, D]
        k = with_rotated_part(k, k_rot, rope_slice).squeeze(2)  # [B, S, D]

    if past_key_values is not None:
        k = past_key_values.update_indexer(k, indexer.layer_idx)
    return q, k


def _rotates_in_place(rope, variant: IndexerVariant, q_rope: torch.Tensor, k_rope: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether `rope_half_rounded_fused` may rotate these rope channels in place for the model's
    function `rope`: transformers' stock half-split rotation, Triton, no autograd graph, and shapes
    and dtypes the kernel takes."""
    if rope_half_rounded_fused is None or variant.rope != "half" or not is_stock_half_rope(rope):
        return False
    if torch.is_grad_enabled() and (q_rope.requires_grad or k_rope.requires_grad):
        return False
    return all(rounded_rope_refuses(x, cos, sin, 2) is None for x in (q_rope, k_rope))


def with_rotated_part(x: torch.Tensor, x_rot: torch.Tensor, rope_slice: slice) -> torch.Tensor:
    """x with its rope channels (last dim, `rope_slice`) replaced by their rotation x_rot.

    Without autograd and with one dtype the rotation is written into x in place: the native
    forward's concatenation of [rot | pass] copies the whole query tensor once more (1 GB at 64K
    tokens for DeepSeek-V3.2's 64 x 128 indexer heads). Otherwise the concatenation, as native.
    """
    if x_rot.dtype == x.dtype and not (torch.is_grad_enabled() and x.requires_grad):
        x[..., rope_slice] = x_rot
        return x
    D = x.shape[-1]
    parts = [x[..., :rope_slice.start], x_rot, x[..., rope_slice.stop:D]]
    return torch.cat([p for p in parts if p.shape[-1]], dim=-1)


def indexer_weights(indexer, hidden_states: torch.Tensor, variant: IndexerVariant | None = None) -> torch.Tensor:
    """Per-head weights w ``[B, S, H]`` fp32, as the native forward (``softmax_scale`` included for
    variants that fold it into w)."""
    variant = variant or detect_variant(indexer)
    w = indexer.weights_proj(hidden_states.to(indexer.weights_proj.weight.dtype)).float() * (indexer.n_heads**-0.5)
    if variant.scale_in_weights:
        w = w * indexer.softmax_scale
    return w


# --------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------
def _mask_3d(attention_mask: torch.Tensor | None, B: int, S: int, T: int) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    m = attention_mask
    if m.dim() == 4:  # [B, 1, S, T] as the decoder layer receives it
        m = m[:, 0]
    while m.dim() < 3:
        m = m.unsqueeze(0)
    return m.expand(B, S, T)  # view, no copy


def valid_key_mask(mask_slice: torch.Tensor) -> torch.Tensor:
    """Which keys a mask slice allows: bool masks as is; additive float masks: value above
    ``finfo(dtype).min / 2`` (transformers' masks hold 0 or ``finfo(dtype).min``; ``-inf`` too)."""
    if mask_slice.dtype == torch.bool:
        return mask_slice
    return mask_slice > torch.finfo(mask_slice.dtype).min / 2


def chunk_rows_for_budget(batch: int, n_heads: int, n_keys: int, max_bytes: int, *, per_key_bytes: int = 32,
                          per_row_bytes: int = 0) -> int:
    """Query rows per chunk so that the fp32 ``[B, rows, H, T]`` scores plus the ``[B, rows, T]``
    per-row tensors stay under ``max_bytes``: `per_key_bytes` per row and key (32 for the PyTorch
    top-k: fp32 index scores and their int32 image, int64 sort keys and positions, mask and
    validity; 4 for the fused scores read by the Triton top-k) and `per_row_bytes` per row (the
    Triton top-k's candidate buffers and the [rows, k] outputs)."""
    per_row = batch * (max(n_keys, 1) * (4 * n_heads + per_key_bytes) + per_row_bytes)
    return max(1, int(max_bytes // per_row))


# The FP8 score kernel of the chunked top-k on CUDA: "triton" (`indexer_scores.fp8_index_scores`, every GPU
# with FP8 tensor cores) or "sm90" (`indexer_scores_sm90.fp8_index_scores_sm90`, Hopper: the next head's product
# beside this head's sum; the same scores up to the order of fp32 sums; elsewhere the Triton kernel). The Triton
# kernel stays the default until the Gluon one is measured faster in the layer (`bench_layers.py --fp8-scorer`).
FP8_SCORERS = ("triton", "sm90")
FP8_SCORER = "triton"


def fp8_scorer(q: torch.Tensor):
    """The FP8 score function `FP8_SCORER` names, for these queries [B, S, H, D] on CUDA (the Gluon kernel
    where `supports_fp8_scores_sm90` says it runs, else the Triton one)."""
    if FP8_SCORER not in FP8_SCORERS:
        raise ValueError(f"dsa_indexer.FP8_SCORER={FP8_SCORER!r}; allowed: {', '.join(map(repr, FP8_SCORERS))}")
    if FP8_SCORER == "sm90" and supports_fp8_scores_sm90 is not None and supports_fp8_scores_sm90(q):
        return fp8_index_scores_sm90
    return fp8_index_scores


# --------------------------------------------------------------------------------------------------
# The chunked top-k
# --------------------------------------------------------------------------------------------------
class IndexerTopK(NamedTuple):
    """indices: int32 ``[B, S, topk]``, -1 where the row has fewer valid keys than topk.
    scores: fp32 ``[B, S, topk]`` index scores at those indices (mask included), -inf at -1 slots.
    ascending: True when each row's valid indices come ascending by key position with the -1 slots
    after them (the per-row Triton select on CUDA); False: by descending score (ties: earlier key
    first, unless ``tie_break="none"``). Consumers that need key order skip their sort when True.
    counts: int32 ``[B, S]`` valid indices per row when the select reported them (the Triton path),
    else None (count the non-negative indices)."""

    indices: torch.Tensor
    scores: torch.Tensor
    ascending: bool = False
    counts: torch.Tensor | None = None

    def as_native_indices(self) -> torch.Tensor:
        """Indices safe for the model's ``scatter``: every -1 replaced by the row's best index (a
        valid key, so duplicates are harmless), or 0 in rows without any valid key (those rows are
        fully masked in the attention anyway)."""
        idx = self.indices
        first = idx[..., :1].clamp_min(0)
        return torch.where(idx < 0, first, idx)


# on_chunk(s0, s1, indices [B, s1 - s0, topk], scores [B, s1 - s0, topk], ascending) of `chunked_index_topk`
ChunkConsumer = Callable[[int, int, torch.Tensor, torch.Tensor, bool], None]


class NativeTopK(NamedTuple):
    indices: torch.Tensor  # int32 [B, S, topk] (the module's own output)
    scores: torch.Tensor  # fp32 [B, S, topk] the native scores at those indices
    index_scores: torch.Tensor  # fp32 [B, S, T] the full native score matrix (mask applied)


def _no_candidates(out_idx: torch.Tensor, out_scores: torch.Tensor, s0: int, s1: int, col: int) -> None:
    """Rows [s0, s1) of the top-k result [B, S, topk] hold no candidate from column `col` on:
    -1 indices, -inf scores."""
    if col < out_idx.shape[-1]:
        out_idx[:, s0:s1, col:] = -1
        out_scores[:, s0:s1, col:] = float("-inf")


def _topk_position_ties(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the top-k of fp32 ``scores`` along the last dim, descending, ties broken by
    position (earlier first): one exact int64 top-k on (order-preserving int32 image of the score,
    reversed position). -0.0 and +0.0 are treated as equal (as by ``torch.topk``)."""
    n = scores.shape[-1]
    bits = (scores.float() + 0.0).contiguous().view(torch.int32)  # + 0.0 maps -0.0 to +0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    rev_pos = torch.arange(n - 1, -1, -1, device=scores.device, dtype=torch.int64)
    key = ordered * (1 << 32) + rev_pos
    return key.topk(k, dim=-1).indices


@torch.no_grad()
def chunked_index_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    attention_mask: torch.Tensor | None,
    index_topk: int,
    softmax_scale: float | None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    chunk_rows: int | None = None,
    tie_break: str = "position",
    score_dtype: torch.dtype | str | None = None,
    radix_topk: bool | None = None,
    topk_method: str = "warp",
    on_chunk: ChunkConsumer | None = None,
) -> IndexerTopK:
    """Top-k of ``I = sum_h w * relu(scale * q.k) (+ mask)`` chunk by chunk over queries.

    q: ``[B, S, H, D]`` any float dtype (upcast to fp32 per chunk as the native ``q.float()``).
    k: ``[B, T, D]``. weights: fp32 ``[B, S, H]``. attention_mask: bool (True = keep) or additive
    float, broadcastable to ``[B, S, T]`` (4D ``[B, 1, S, T]`` accepted); ``None`` = plain causal with
    the queries at the end (query s sees keys ``t <= s + T - S``). ``softmax_scale=None`` when the
    scale is already folded into ``weights`` (HY-V4 variant).

    ``tie_break="position"`` (default): equal scores are ordered by key position, earlier first
    (the project-wide tie rule), so the result is deterministic and independent of the chunking; ``"none"``:
    plain ``torch.topk`` (arbitrary order among ties, as the native forward).

    ``score_dtype``: None / torch.float32 (exact), torch.bfloat16 / torch.float16 (the fused Triton
    score kernel on CUDA) or ``"fp8"`` (e4m3 operands after a Hadamard rotation, as DeepSeek's own
    inference code; CUDA GPUs with FP8 tensor cores; on the CPU the same quantised operands in fp32,
    so the FP8 selection's accuracy can be evaluated without a GPU). ``radix_topk`` (default: on CUDA with Triton):
    the per-row radix select `kernels.dsa_topk.topk_rows`, which reads each score row once and only
    up to the row's causal limit (the position tie rule; indices come out ascending by position).
    ``topk_method``: that select's method (`topk_rows(method=)`, the same set from each): "warp"
    (default: one read of each row, one row a warp; the radix select for the rare row whose sample
    misses), "sampled" (the same steps, one row a program) or "radix".

    For each chunk only the key range ``[first, last]`` allowed by the mask for *some* row of the
    chunk is scored (causal prefix, left padding, unfilled static-cache slots are skipped).

    ``on_chunk(s0, s1, idx, scores, ascending)``: called once the rows [s0, s1) are final, with views
    of their indices int32 ``[B, s1 - s0, topk]`` and scores fp32 (the same shape) and whether their
    indices come ascending: a consumer can take them while the chunk's output (54 MB at 128K keys) is
    still in L2 (Stem's `boost.ChunkedCut`, the DSA adapter's opt-in `CUT_PLACE = "chunks"`).
    """
    if tie_break not in ("position", "none"):
        raise ValueError(f"tie_break must be 'position' or 'none', got {tie_break!r}")
    B, S, H, D = q.shape
    T = k.shape[1]
    topk = min(int(index_topk), T)
    device = q.device
    # every chunk writes all of its rows' columns (the select's -1 / -inf tail, or the fills below):
    # no [B, S, topk] pre-fill (two 1 GiB writes at 128K tokens)
    out_idx = torch.empty((B, S, topk), dtype=torch.int32, device=device)
    out_scores = torch.empty((B, S, topk), dtype=torch.float32, device=device)
    out_counts = torch.zeros(B, S, dtype=torch.int32, device=device)  # rows the select reaches overwrite theirs
    if S == 0 or topk == 0:
        return IndexerTopK(out_idx, out_scores)

    pad = None
    if attention_mask is not None and attention_mask.dim() == 2:
        # [B, T] padding mask (True = real token), combined with the plain causal rule
        pad, attention_mask = attention_mask.bool(), None
    mask = _mask_3d(attention_mask, B, S, T)
    fp8 = score_dtype == "fp8"
    if isinstance(score_dtype, str) and not fp8:
        raise ValueError(f"score_dtype={score_dtype!r}; allowed: None, a torch float dtype, 'fp8'")
    if fp8 and fp8_index_scores is None:
        raise ValueError("score_dtype='fp8' needs Triton (its quantiser and kernel live in stem_boost.kernels)")
    if fp8 and D not in FP8_INDEXER_HEAD_DIMS:
        raise ValueError(f"score_dtype='fp8' takes indexer head dims {FP8_INDEXER_HEAD_DIMS}; got {D} "
                         f"(use torch.bfloat16 or None)")
    # FP8 on CUDA: the e4m3 tensor-core kernel; elsewhere its arithmetic emulated in fp32
    fused = (fp8 and q.is_cuda) or (score_dtype in (torch.bfloat16, torch.float16) and q.is_cuda
                                    and fused_index_scores is not None)
    if radix_topk is None:
        radix_topk = q.is_cuda and topk_rows is not None and tie_break == "position"
    skip_tail = radix_topk and fused and mask is None and pad is None  # the top-k reads rows only up to the diagonal
    # the fused kernel keeps the per-head scores in registers: only [B, rows, T] tensors remain
    if skip_tail:  # fp32 scores only ([B, rows, T]); per row the top-k's candidate buffers and
        # its [rows, k] results (indices, counts, gathered scores, masks: about 20 bytes per slot)
        rows = chunk_rows or chunk_rows_for_budget(B, 0, T, max_bytes, per_key_bytes=4,
                                                   per_row_bytes=topk_buffer_bytes(T, topk, topk_method) + 20 * topk)
        rows = rows if chunk_rows or rows < 128 else rows // 128 * 128  # whole 128-row score tiles
    else:
        rows = chunk_rows or chunk_rows_for_budget(B, 0 if fused else H, T, max_bytes)
    # FP8 on CUDA: the keys are quantised once per sequence, each query chunk reads its key range
    k_fp8 = quantize_fp8(k) if (fp8 and q.is_cuda) else None  # (e4m3 [B, T, D], fp32 [B, T])
    scorer = fp8_scorer(q) if fp8 and fused else None  # the FP8 score kernel, chosen once for every chunk
    offset = T - S  # only used when mask is None

    def select_chunk(s0: int, s1: int) -> None:
        """The top-k of query rows [s0, s1) into out_idx / out_scores (/ out_counts)."""
        c = s1 - s0
        # ---- key range needed by this chunk
        if mask is None:
            t0, t1 = 0, min(T, s1 + offset)
            m = None
        else:
            m_full = mask[:, s0:s1]
            any_valid = valid_key_mask(m_full).any(dim=1).any(dim=0)  # [T]
            nz = torch.nonzero(any_valid)
            if nz.numel() == 0:
                _no_candidates(out_idx, out_scores, s0, s1, 0)  # every row fully masked
                return
            t0, t1 = int(nz[0]), int(nz[-1]) + 1
            m = m_full[:, :, t0:t1]
        tc = t1 - t0
        if tc <= 0:
            _no_candidates(out_idx, out_scores, s0, s1, 0)
            return

        # ---- fp32 scores [B, c, H, tc] (the only big intermediate; in-place ops after the GEMM)
        if fused:
            # fused Triton kernel: tensor-core q.k, relu and head sum in registers (no [B,c,H,tc]);
            # the plain causal rule is applied inside (tiles after the diagonal are skipped, and not
            # even written when the radix top-k reads each row only up to its diagonal)
            causal = s0 + offset - t0 if m is None else None
            if fp8:
                idx_scores = scorer(q[:, s0:s1], k[:, t0:t1], weights[:, s0:s1], softmax_scale,
                                    causal_offset=causal, write_masked=not skip_tail,
                                    k_fp8=(k_fp8[0][:, t0:t1], k_fp8[1][:, t0:t1]))
            else:
                idx_scores = fused_index_scores(q[:, s0:s1].to(score_dtype), k[:, t0:t1], weights[:, s0:s1],
                                                softmax_scale, causal_offset=causal, write_masked=not skip_tail)
        elif fp8:  # the CPU: the FP8 kernel's quantised operands, products exact, sums in fp32
            idx_scores = fp8_index_scores_reference(q[:, s0:s1], k[:, t0:t1], weights[:, s0:s1], softmax_scale,
                                                    dtype=torch.float32)
        else:
            dt = score_dtype or torch.float32
            qc = q[:, s0:s1].to(dt).reshape(B, c * H, D)
            kc = k[:, t0:t1].to(dt)
            scores = torch.matmul(qc, kc.transpose(-1, -2)).view(B, c, H, tc).float()
            del qc, kc
            if softmax_scale is not None:
                scores.mul_(softmax_scale)
            scores.relu_()
            idx_scores = torch.matmul(weights[:, s0:s1].unsqueeze(-2), scores).squeeze(-2)  # [B, c, tc]
            del scores

        # ---- mask exactly as the native forward
        if m is None and fused and pad is None:
            valid = None  # the kernel already wrote -inf after the diagonal
        elif m is None:
            s_pos = torch.arange(s0, s1, device=device) + offset
            t_pos = torch.arange(t0, t1, device=device)
            valid = (t_pos[None, :] <= s_pos[:, None]).unsqueeze(0).expand(B, c, tc)
            if pad is not None:
                valid = valid & pad[:, None, t0:t1]
            idx_scores = idx_scores.masked_fill(~valid, float("-inf"))
        elif m.dtype == torch.bool:
            valid = m
            idx_scores = idx_scores.masked_fill(~m, float("-inf"))
        else:
            valid = valid_key_mask(m)
            idx_scores = idx_scores + m

        kk = min(topk, tc)
        _no_candidates(out_idx, out_scores, s0, s1, kk)  # the columns past the scored keys, if any
        if radix_topk:  # one select per row (Triton): indices ascending, -1 / -inf after the count,
            # written with their scores straight into the chunk's rows of the result
            valid_len = None
            if skip_tail:
                s_pos = torch.arange(s0, s1, device=device) + offset - t0 + 1
                valid_len = s_pos.clamp(max=tc).to(torch.int32).expand(B, c)
            chunk_idx = out_idx[:, s0:s1, :kk]
            _, chunk_counts = topk_rows(idx_scores, kk, valid_len=valid_len, method=topk_method, out=chunk_idx,
                                        out_scores=out_scores[:, s0:s1, :kk])
            out_counts[:, s0:s1] = chunk_counts
            if t0:  # key positions of the scored range [t0, t1) -> of the sequence
                chunk_idx.copy_(torch.where(chunk_idx >= 0, chunk_idx + t0, -1))
            return
        if tie_break == "position":
            top_i = _topk_position_ties(idx_scores, kk)
            top_v = idx_scores.gather(-1, top_i)
        else:
            top_v, top_i = idx_scores.topk(kk, dim=-1)
        sel_valid = valid.gather(-1, top_i) if valid is not None else torch.isfinite(top_v)
        out_idx[:, s0:s1, :kk] = torch.where(sel_valid, top_i + t0, -1).to(torch.int32)
        out_scores[:, s0:s1, :kk] = torch.where(sel_valid, top_v, float("-inf"))

    for s0 in range(0, S, rows):
        s1 = min(S, s0 + rows)
        select_chunk(s0, s1)
        if on_chunk is not None:  # the chunk's rows are final: a consumer may take them while they are in L2
            on_chunk(s0, s1, out_idx[:, s0:s1], out_scores[:, s0:s1], bool(radix_topk))

    return IndexerTopK(out_idx, out_scores, ascending=bool(radix_topk), counts=out_counts if radix_topk else None)


@torch.no_grad()
def dsa_indexer_topk(
    indexer,
    hidden_states: torch.Tensor,
    q_resid: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    past_key_values: Any = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    chunk_rows: int | None = None,
    variant: IndexerVariant | None = None,
    tie_break: str = "position",
    score_dtype: torch.dtype | str | None = None,
    radix_topk: bool | None = None,
    topk_method: str = "warp",
    on_chunk: ChunkConsumer | None = None,
) -> IndexerTopK:
    """Drop-in (same positional arguments as ``indexer.forward``) memory-bounded top-k.

    Returns ``IndexerTopK(indices int32 [B, S, min(index_topk, T)], scores fp32 [B, S, same])``.
    ``position_ids`` is unused (as in the native forward, kept for BC). With ``past_key_values`` the
    indexer key cache is updated, like the native forward: call it *instead of* the native one.
    """
    variant = variant or detect_variant(indexer)
    q, k = indexer_qk(indexer, hidden_states, q_resid, position_embeddings, past_key_values, variant)
    w = indexer_weights(indexer, hidden_states, variant)
    scale = None if variant.scale_in_weights else indexer.softmax_scale
    return chunked_index_topk(
        q, k, w, attention_mask, indexer.index_topk, scale, max_bytes=max_bytes, chunk_rows=chunk_rows,
        tie_break=tie_break, score_dtype=score_dtype, radix_topk=radix_topk, topk_method=topk_method,
        on_chunk=on_chunk,
    )


class _CaptureTopkInput(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.captured = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.topk or func is torch.topk:
            self.captured = args[0]
        return func(*args, **kwargs)


@torch.no_grad()
def native_indexer_topk(
    indexer,
    hidden_states: torch.Tensor,
    q_resid: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    past_key_values: Any = None,
) -> NativeTopK:
    """Run the module's own forward (O(B*S*H*T) memory!) and also return its scores.

    The full score matrix is the tensor the native forward calls ``.topk`` on (captured with a
    ``TorchFunctionMode``, the computation is untouched). Updates the indexer cache like the
    model would: give it a copy of the cache when comparing with ``dsa_indexer_topk``.
    """
    mode = _CaptureTopkInput()
    with mode:
        idx = indexer(
            hidden_states, q_resid, position_embeddings, attention_mask, position_ids, past_key_values=past_key_values
        )
    full = mode.captured
    if full is None:
        raise RuntimeError(f"{type(indexer).__name__}.forward did not call topk")
    scores = full.float().gather(-1, idx.long())
    return NativeTopK(idx, scores, full)
