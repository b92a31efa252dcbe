"""Stem on the DSA family (DeepSeek-V3.2 `deepseek_v32`, GLM-MoE-DSA `glm_moe_dsa`, ...).

The wrapped attention forward follows transformers' `DeepseekV32Attention.forward` step by step
(MLA projections, interleaved RoPE, expanded K/V in the cache, the lightning indexer) and changes
three things:
  1. the indexer's top-k is computed chunk by chunk (`dsa_indexer.dsa_indexer_topk`): same
     selection, bounded memory, and it also returns the candidates' scores;
  2. prefill (more than one query): OAM rescoring of those candidates with the value norms of the
     layer (RMS over all heads: DSA shares one selection per layer) and TPD truncation under the
     `reduce` contract (`boost.stem_step`);
  3. attention runs on the selected token lists through the shared kernel: on CUDA without a past
     in the cache, the absorbed-MLA fast path (q_nope W_UK | q_rope against the 576-d latent, the
     512-d latent as V, W_UV afterwards); otherwise the expanded per-head form. On the CPU the
     PyTorch reference (gather + softmax), never a dense S x T mask.
Decode (one query) keeps the native selection (full budget).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from ..compat import cache_argument, mla_keys_values
from ..boost import ChunkedCut, RowPlans, stem_step
from ..config import StemConfig
from ..kernels import sparse_attention
from ..kernels.dense import dense_causal_attention
from ..native.dsa_indexer import IndexerTopK, dsa_indexer_topk
from ..oam import aggregate_heads, value_norms
from ..rope import is_stock_interleaved_rope
from ..selection import Selection, extents_from_padding, key_padding
from ..stats import LayerStats

try:  # the fused rotation and the value norms need Triton; the absorbed path (CUDA only) uses them
    from ..kernels.quadratic_form import quadratic_form_sqrt
    from ..kernels.rope import fused_interleaved_refuses, rope_interleaved_fused
    from ..kernels.warp_rows import interpreting
except ImportError:  # pragma: no cover
    fused_interleaved_refuses = rope_interleaved_fused = quadratic_form_sqrt = None

INDEXER_ATTRS = ("index_topk", "wq_b", "wk", "weights_proj")
ABSORBED_CHUNK = 16384  # query rows per absorbed-MLA attention call
MLA_ATTRS = ("kv_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "o_proj", "expand_kv")
# Where Stem cuts an unpadded prefill's candidates: "after" = all rows once the indexer is done
# (`boost.stem_step`, one launch), "chunks" = each indexer chunk's rows as soon as its top-k wrote them
# (`boost.ChunkedCut`, while they are in L2; on CUDA on a second stream, beside the next chunk's scores).
# The same set either way. On an H100 at 128K the chunks' cuts took 4.0 ms of kernel time against 2.75 in
# one launch (forty launches of about two waves each leave forty tails), the side stream hid about 1.5 ms
# of it, and the layer's time came out the same within its spread (BENCHMARKS.md, twenty-seventh session):
# "after" stays the default.
CUT_PLACES = ("after", "chunks")
CUT_PLACE = "after"
CUT_ON_SIDE_STREAM = True  # "chunks" on CUDA: each chunk's cut on a second stream, beside the next chunk's scores
_SIDE_STREAMS: dict = {}  # device -> the stream the chunks' cuts run on


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """One second CUDA stream per device for the chunks' cuts (created on first use, then kept)."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
    return _SIDE_STREAMS[device]


def is_dsa_attention(module: torch.nn.Module) -> bool:
    """An MLA attention that owns a lightning indexer (or reuses a previous layer's: GLM shared)."""
    if not all(hasattr(module, a) for a in MLA_ATTRS):
        return False
    indexer = getattr(module, "indexer", None)
    if indexer is not None:
        return all(hasattr(indexer, a) for a in INDEXER_ATTRS)
    return bool(getattr(module, "skip_topk", False))


@dataclass
class SharedTopK:
    """The last full indexer's candidates, for layers that reuse them (GLM-MoE-DSA "shared"). Only a
    model with such layers keeps them (`needed`): they are [B, S, top-k] indices and scores, 2 GiB
    at 128K tokens, held from one layer to the next and after the forward."""

    needed: bool = False
    last: IndexerTopK | None = None


@dataclass
class DSAState:
    cfg: StemConfig
    stats: LayerStats
    shared: SharedTopK
    returns_topk: bool  # GLM attention returns (out, weights, topk_indices)
    index_topk: int
    last_native: Selection | None = None  # the native selection of the last prefill (keep_selections=True)
    last_stem: Selection | None = None


def set_head_norm_reducer(module: torch.nn.Module, reducer) -> None:
    """Install `reducer(norms [B, H_local, T], how) -> [B, 1, T]`, which aggregates the value norms
    over the heads of all tensor-parallel ranks (`stem_boost.dist.tp`); None removes it."""
    module.stem_norm_reducer = reducer


def head_norm_reducer(module: torch.nn.Module):
    """The reducer installed by `set_head_norm_reducer`, or None (all heads are local)."""
    return getattr(module, "stem_norm_reducer", None)


def native_selection(top: IndexerTopK, q_offset: int, padding: torch.Tensor | None) -> Selection:
    """The native top-k as a Selection: idx [B, 1, S, K] (-1 tail kept), counts = valid entries
    (the select's own counts when it reported them: no pass over [B, S, K]), with each batch row's
    real-token extent from the [B, T] padding mask (True = real)."""
    seq_start, seq_len = extents_from_padding(padding)
    if top.counts is not None:
        return Selection(idx=top.indices.unsqueeze(1), counts=top.counts.unsqueeze(1), q_offset=q_offset,
                         seq_start=seq_start, seq_len=seq_len)
    return Selection.from_padded(top.indices.unsqueeze(1), q_offset=q_offset, seq_start=seq_start, seq_len=seq_len)


def stem_prefill(st: DSAState, native: Selection, top: IndexerTopK, key_norms: torch.Tensor | None,
                 seq_k: int, cut: ChunkedCut | None = None) -> Selection:
    """The Stem step of a DSA prefill (both attention layouts): OAM + per-row budgets + truncation,
    then the layer's budget accounting. key_norms [B, 1, T]; cut: the step already taken chunk by chunk
    inside the indexer (`cuts_by_chunk`). Returns the Stem Selection."""
    cfg = st.cfg
    if cfg.is_identity:
        sel, plans = native, None
    elif cut is not None:
        sel, plans = cut.result(native)
    else:
        sel, plans = stem_step(native, top.scores.unsqueeze(1), key_norms, st.index_topk, cfg, seq_k=seq_k,
                               candidates_ascending=top.ascending)
    record_stats(st, native, sel, plans, cfg, seq_k)
    # kept only on request (StemConfig.keep_selections): at 128K tokens each is 1 GiB a layer
    st.last_native, st.last_stem = (native, sel) if cfg.keep_selections else (None, None)
    return sel


def cuts_by_chunk(cfg: StemConfig, hidden_states: torch.Tensor, padding: torch.Tensor | None, owns_indexer: bool,
                  place: str | None = None) -> bool:
    """Whether this prefill's Stem cut runs chunk by chunk inside the indexer: `CUT_PLACE` "chunks", Stem
    on, a prefill of an unpadded batch, the layer's own indexer, a budget schedule that needs no other
    rows' scores."""
    place = CUT_PLACE if place is None else place
    if place not in CUT_PLACES:
        raise ValueError(f"CUT_PLACE={place!r}; allowed: {', '.join(map(repr, CUT_PLACES))}")
    return (place == "chunks" and not cfg.is_identity and hidden_states.shape[1] > 1 and padding is None
            and owns_indexer and cfg.schedule != "mass")


def layer_key_norms(self, cfg: StemConfig, latent: torch.Tensor, value_states: torch.Tensor | None,
                    absorbed: bool) -> torch.Tensor:
    """The value norms OAM ranks keys by, pooled over the heads that share the selection (all of the
    layer's: DSA selects once a layer). latent [B, 1, T, L] (absorbed) or value_states [B, H, T, Dv]
    -> [B, 1, T] fp32. Tensor parallelism (`stem_boost.dist.tp`) installs a reducer over the heads of
    all ranks."""
    reducer = head_norm_reducer(self)
    if absorbed:
        _, w_uv = absorbed_weights(self)  # [H, Dv, L]
        if reducer is None and cfg.head_agg == "rms":
            return latent_value_rms(latent[:, 0], w_uv, gram=cached_value_gram(self, w_uv))  # [B, 1, T]
    norms = (latent_value_norms(latent[:, 0], w_uv) if absorbed
             else value_norms(value_states.transpose(1, 2)))  # [B, H, T]
    return reducer(norms, cfg.head_agg) if reducer is not None else aggregate_heads(norms, 1, how=cfg.head_agg)


def latent_value_norms(latent: torch.Tensor, w_uv: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """||W_UV^h c_t|| for every head without keeping the expanded values.

    latent [B, T, L], w_uv [H, Dv, L] -> [B, H, T] fp32 (per chunk of T: [B, chunk, H, Dv]).
    """
    B, T, _ = latent.shape
    out = torch.empty(B, w_uv.shape[0], T, dtype=torch.float32, device=latent.device)
    for t0 in range(0, T, chunk):
        v = torch.einsum("btl,hvl->bthv", latent[:, t0:t0 + chunk], w_uv)
        out[:, :, t0:t0 + chunk] = v.float().norm(dim=-1).transpose(1, 2)
    return out


def value_gram(w_uv: torch.Tensor) -> torch.Tensor:
    """G = mean_h (W_UV^h)^T W_UV^h, fp32: w_uv [H, Dv, L] -> [L, L] (symmetric)."""
    w = w_uv.float()
    return torch.einsum("hvl,hvm->lm", w, w) / w.shape[0]


def cached_value_gram(module: torch.nn.Module, w_uv: torch.Tensor) -> torch.Tensor:
    """`value_gram(w_uv)`, computed once per weight: kept on the module, keyed by the weight's
    storage, shape and version counter (an in-place update of the weight computes it again). The
    product is an fp32 [H, Dv, L] x [H, Dv, L] contraction: 0.2 ms a prefill on an H200 at
    DeepSeek-V3.2's dims, a third of the value norms' time."""
    key = (w_uv.data_ptr(), tuple(w_uv.shape), tuple(w_uv.stride()), w_uv.dtype, w_uv.device, w_uv._version)
    cached = getattr(module, "stem_value_gram", None)
    if cached is None or cached[0] != key:
        cached = (key, value_gram(w_uv))
        module.stem_value_gram = cached
    return cached[1]


def latent_value_rms(latent: torch.Tensor, w_uv: torch.Tensor, chunk: int = 16384, *,
                     tensor_cores: bool = True, gram: torch.Tensor | None = None) -> torch.Tensor:
    """RMS over the heads of ||W_UV^h c_t||, from one L x L Gram matrix instead of every head's values.

    mean_h ||W_UV^h c||^2 = c^T G c with G = mean_h (W_UV^h)^T W_UV^h [L, L]: 2 L^2 FLOP a token
    instead of 2 H Dv L (32x fewer at DeepSeek-V3.2's L 512, 128 heads x Dv 128), in fp32; a
    half-precision latent on CUDA takes `kernels.quadratic_form` (G split into two half-precision
    parts on the tensor cores, 1e-6 relative from the fp32 product on an H200; tensor_cores=False: the
    fp32 product always).
    latent [B, T, L], w_uv [H, Dv, L] -> [B, 1, T] fp32 (per chunk of T: [B, chunk, L] fp32).
    gram: `value_gram(w_uv)` when the caller keeps it (`cached_value_gram`).
    """
    gram = value_gram(w_uv) if gram is None else gram  # [L, L], symmetric
    if tensor_cores and quadratic_form_sqrt is not None and latent.dtype in (torch.bfloat16, torch.float16) and (
            latent.is_cuda or interpreting()):
        return quadratic_form_sqrt(latent, gram)  # the same in one Triton pass on the tensor cores
    B, T, _ = latent.shape
    out = torch.empty(B, 1, T, dtype=torch.float32, device=latent.device)
    for t0 in range(0, T, chunk):
        c = latent[:, t0:t0 + chunk].float()  # [B, chunk, L]
        out[:, 0, t0:t0 + chunk] = ((c @ gram) * c).sum(-1).clamp_min(0).sqrt()
    return out


def attend_expanded(self, query_states, key_states, value_states, sel: Selection, backend: str):
    """Expanded MLA / GQA: q [B, Hq, S, Dqk], k [B, Hkv, T, Dqk], v [B, Hkv, T, Dv] -> [B, S, Hq, Dv]."""
    q = query_states.transpose(1, 2)
    k = key_states.transpose(1, 2)
    v = value_states.transpose(1, 2)
    return sparse_attention(q, k, v, sel, sm_scale=self.scaling, backend=backend, check=False)


def absorbed_queries(q_pass: torch.Tensor, q_rot: torch.Tensor, w_uk: torch.Tensor, s0: int, s1: int,
                     rotation: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The absorbed-MLA queries [q_nope W_UK | q_rope] of query rows s0:s1, without a concatenation.

    q_pass [B, H, S, nope], q_rot [B, H, S, rope], w_uk [H, nope, L] -> [B, s1 - s0, H, L + rope], a
    view of head-major storage [B, H, s1 - s0, L + rope]: the matmul writes each head's latent
    columns in place (its output row stride is L + rope) and the rope columns are written beside
    them. Concatenating the two parts instead copied every 576-wide query row once more, from
    strided inputs: about 8% of a DeepSeek-V3.2 layer's CUDA time at 64K tokens. `rotation` (cos,
    sin [B, S, rope]): q_rot is not rotated yet, and the interleaved rotation
    (`kernels.rope.rope_interleaved_fused`) writes the rope columns straight from it.
    """
    B, H, _, _ = q_pass.shape
    L, rope = w_uk.shape[-1], q_rot.shape[-1]
    q = q_pass.new_empty(B, H, s1 - s0, L + rope)
    for b in range(B):  # one batched matmul over the heads: [H, n, nope] @ [H, nope, L]
        torch.bmm(q_pass[b, :, s0:s1], w_uk, out=q[b, :, :, :L])
    if rotation is None:
        q[..., L:] = q_rot[:, :, s0:s1]
    else:
        cos, sin = rotation
        rope_interleaved_fused(q_rot[:, :, s0:s1], cos[:, s0:s1], sin[:, s0:s1], out=q[..., L:])
    return q.transpose(1, 2)


def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
    """W_UK [H, nope, L] and W_UV [H, Dv, L]: views of the MLA's kv_b_proj weight per head."""
    w = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
    return w[:, :self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]


def attend_absorbed(self, q_pass, q_rot, latent, k_rot, sel: Selection,
                    rotation: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Absorbed MLA: [q_nope W_UK | q_rope] . [c | k_rope], softmax, . c, then W_UV (the CUDA path).

    q_pass [B, H, S, nope], q_rot [B, H, S, rope], latent [B, 1, S, L], k_rot [B, 1, S, rope]
    -> [B, S, H, v_head_dim]. Query rows go ABSORBED_CHUNK at a time, which bounds the absorbed
    queries ([B, chunk, H, L + rope]) instead of [B, S, H, L + rope]. `rotation` (cos, sin): q_rot
    is still unrotated (`absorbed_queries` rotates it chunk by chunk).
    """
    H, L = self.num_heads, self.kv_lora_rank
    w_uk, w_uv = absorbed_weights(self)  # [H, nope, L], [H, Dv, L]
    kv = torch.cat([latent, k_rot], dim=-1).transpose(1, 2).contiguous()  # [B, T, 1, L + rope]
    B, _, S, _ = q_pass.shape
    out = q_pass.new_empty(B, S, H, self.v_head_dim)
    for s0 in range(0, S, ABSORBED_CHUNK):
        s1 = min(S, s0 + ABSORBED_CHUNK)
        q = absorbed_queries(q_pass, q_rot, w_uk, s0, s1, rotation)  # [B, n, H, L + rope]
        out_lat = sparse_attention(q, kv, kv[..., :L], sel.rows(s0, s1), sm_scale=self.scaling, check=False)
        for b in range(B):  # [H, n, L] @ [H, L, Dv], written straight into out's [H, n, Dv] view
            torch.bmm(out_lat[b].transpose(0, 1), w_uv.transpose(1, 2), out=out[b, s0:s1].transpose(0, 1))
    return out


def fused_rotation_applies(rope, q_rot: torch.Tensor, k_rot: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor) -> bool:
    """Whether the layer's interleaved RoPE may run as `rope_interleaved_fused` (the same bits): the
    model module's function is transformers' own and the kernel takes both tensors."""
    return (rope_interleaved_fused is not None and is_stock_interleaved_rope(rope)
            and fused_interleaved_refuses(q_rot, cos, sin) is None
            and fused_interleaved_refuses(k_rot, cos, sin) is None)


def uses_absorbed_path(hidden_states: torch.Tensor, cfg: StemConfig, past_key_values) -> bool:
    """The absorbed-MLA path runs a CUDA prefill without a past in the cache (the kernel backend);
    decode, cached continuations, the dense baseline and the CPU take the expanded form."""
    return (hidden_states.is_cuda and cfg.backend in ("auto", "triton") and past_key_values is None
            and hidden_states.shape[1] > 1 and not cfg.dense)


def stem_dsa_forward(
    self,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    past_key_values=None,
    position_ids: torch.Tensor | None = None,
    prev_topk_indices: torch.Tensor | None = None,
    **kwargs,
):
    """Drop-in for the DSA attention forward (see the module docstring)."""
    past_key_values = cache_argument(past_key_values, kwargs)  # transformers >= 5.24: cache=
    st: DSAState = self._stem
    cfg = st.cfg
    B, S, _ = hidden_states.shape
    rope = sys.modules[type(self).__module__].apply_rotary_pos_emb_interleave

    q_resid = self.q_a_layernorm(self.q_a_proj(hidden_states))
    q_states = self.q_b_proj(q_resid).view(B, S, -1, self.qk_head_dim).transpose(1, 2)
    q_pass, q_rot = torch.split(q_states, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
    compressed_kv = self.kv_a_proj_with_mqa(hidden_states)
    kv_pass, k_rot = torch.split(compressed_kv, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
    latent = self.kv_a_layernorm(kv_pass).view(B, 1, S, self.kv_lora_rank)
    k_rot = k_rot.view(B, 1, S, self.qk_rope_head_dim)
    cos, sin = position_embeddings
    # absorbed MLA: the kernel's fast path on GPUs (576-d latent keys, the latent as values)
    absorbed = uses_absorbed_path(hidden_states, cfg, past_key_values)
    rotation = None  # (cos, sin) when the queries' rotation is left to the absorbed-query build
    if absorbed and fused_rotation_applies(rope, q_rot, k_rot, cos, sin):
        k_rot = rope_interleaved_fused(k_rot, cos, sin)  # [B, 1, S, rope]; q_rot stays unrotated
        rotation = (cos, sin)
    else:
        q_rot, k_rot = rope(q_rot, k_rot, cos, sin)

    past_len = past_key_values.get_seq_length(self.layer_idx) if past_key_values is not None else 0
    key_states = value_states = None
    if not absorbed:
        key_states, value_states = mla_keys_values(self, latent, k_rot, past_key_values)
    T = past_len + S
    pad = key_padding(attention_mask, T)  # [B, T] True = real token, or None
    indexer_mask = attention_mask if (attention_mask is not None and attention_mask.dim() > 2) else pad

    # ---- native candidates (chunked, with scores)
    if cfg.dense:  # the dense baseline: every causal key, no indexer
        query_states = torch.cat((q_pass, q_rot), dim=-1)  # [B, H, S, Dqk]
        out = dense_causal_attention(query_states, key_states, value_states, self.scaling, pad).transpose(1, 2)
        attn_output = self.o_proj(out.reshape(B, S, -1).to(hidden_states.dtype))
        return (attn_output, None, None) if st.returns_topk else (attn_output, None)
    cut = key_norms = None
    if cuts_by_chunk(cfg, hidden_states, pad, self.indexer is not None):  # the Stem step inside the indexer's loop
        key_norms = layer_key_norms(self, cfg, latent, value_states, absorbed)  # [B, 1, T]
        stream = side_stream(hidden_states.device) if hidden_states.is_cuda and CUT_ON_SIDE_STREAM else None
        cut = ChunkedCut(B, S, min(st.index_topk, T), past_len, T, st.index_topk, cfg, key_norms,
                         hidden_states.device, stream)
    if self.indexer is not None:
        top = dsa_indexer_topk(self.indexer, hidden_states, q_resid, position_embeddings, indexer_mask,
                               position_ids, past_key_values=past_key_values, max_bytes=cfg.indexer_max_bytes,
                               score_dtype=cfg.indexer_score_dtype(hidden_states.device, self.indexer.head_dim),
                               on_chunk=cut)
        st.shared.last = top if st.shared.needed else None
    else:
        if st.shared.last is None:
            raise ValueError("a shared DSA layer needs the candidates of a previous full indexer layer")
        top = st.shared.last

    # ---- Stem: OAM rescoring + per-row budgets + truncation (prefill only)
    native = native_selection(top, q_offset=past_len, padding=pad)  # idx [B, 1, S, K]
    sel = native
    if S > 1:
        if not cfg.is_identity and cut is None:
            key_norms = layer_key_norms(self, cfg, latent, value_states, absorbed)  # [B, 1, T]
        sel = stem_prefill(st, native, top, key_norms, T, cut)

    # ---- attention on the selected token lists
    if absorbed:
        out = attend_absorbed(self, q_pass, q_rot, latent, k_rot, sel, rotation)
    else:
        query_states = torch.cat((q_pass, q_rot), dim=-1)
        out = attend_expanded(self, query_states, key_states, value_states, sel, cfg.backend)
    attn_output = self.o_proj(out.reshape(B, S, -1).to(hidden_states.dtype))
    if st.returns_topk:
        return attn_output, None, top.as_native_indices()
    return attn_output, None


def record_stats(st: DSAState, native: Selection, sel: Selection, plans: RowPlans | None, cfg: StemConfig,
                 T: int) -> None:
    """Pairs of the last prefill, per batch row and in total (token lists: no forced keys). The
    counts stay on the device until the stats are read (`LayerStats.defer`: no host synchronisation
    in the forward)."""
    # [B, 1, R]: padding query rows are not counted (the Stem step's plans already hold them)
    real = (plans.real_rows if plans is not None else native.real_rows(native.n_rows, T))[:, None]
    native_rows = (native.counts.long() * real).sum(dim=(1, 2))  # [B] on the device
    stem_rows = (sel.counts.long() * real).sum(dim=(1, 2))
    step = max(1, native.counts.shape[-1] // 512)  # a light per-position trace for plots
    # copies: the counts themselves ([B, 1, S]) are not kept until the stats are read
    trace_native, trace_stem = native.counts[0, 0, ::step].clone(), sel.counts[0, 0, ::step].clone()
    row_alpha = plans.alphas if plans is not None else [1.0] * native.batch

    def update(s: LayerStats) -> None:
        s.row_native_pairs, s.row_stem_pairs = native_rows.tolist(), stem_rows.tolist()
        s.native_pairs, s.stem_pairs = sum(s.row_native_pairs), sum(s.row_stem_pairs)
        s.row_alpha = row_alpha
        s.alpha = float(sum(row_alpha) / len(row_alpha)) if row_alpha else 1.0
        s.reduce_requested = cfg.reduce
        s.seq_len = T
        s.budget_native, s.budget_stem = trace_native.tolist(), trace_stem.tolist()

    st.stats.defer(update, fresh=True)
