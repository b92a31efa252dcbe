"""Stem on the DSA family (DeepSeek-V3.2 `deepseek_v32`, GLM-MoE-DSA `glm_moe_dsa`, ...).

The wrapped attention forward follows transformers' `DeepseekV32Attention.forward` step by step
(MLA projections, interleaved RoPE, expanded K/V in the cache, the lightning indexer) and changes
three things:
  1. the indexer's top-k is computed chunk by chunk (`dsa_indexer.dsa_indexer_topk`): same
     selection, bounded memory, and it also returns the candidates' scores;
  2. prefill (more than one query): OAM rescoring of those candidates with the value norms of the
     layer (RMS over all heads: DSA shares one selection per layer) and TPD truncation under the
     `reduce` contract (`boost.boost_candidates`);
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

from ..boost import boost_candidates
from ..config import StemConfig
from ..kernels import sparse_attention, sparse_attention_cpu
from ..oam import aggregate_heads, value_norms
from ..select import Selection
from ..stats import LayerStats
from .dsa_indexer import IndexerTopK, dsa_indexer_topk

INDEXER_ATTRS = ("index_topk", "wq_b", "wk", "weights_proj")
ABSORBED_CHUNK = 16384  # query rows per absorbed-MLA attention call
MLA_ATTRS = ("kv_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "o_proj", "expand_kv")


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
    """The last full indexer's candidates, for layers that reuse them (GLM-MoE-DSA "shared")."""

    last: IndexerTopK | None = None


@dataclass
class DSAState:
    cfg: StemConfig
    stats: LayerStats
    shared: SharedTopK
    returns_topk: bool  # GLM attention returns (out, weights, topk_indices)
    index_topk: int
    last_native: Selection | None = None  # the native selection of the last prefill (for checks, reports)
    last_stem: Selection | None = None


def _padding_mask(attention_mask: torch.Tensor | None, B: int, T: int) -> torch.Tensor | None:
    """[B, T] bool (True = real token) from the 2-D mask our mask function yields, else None."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    m = attention_mask[:, -T:].bool()
    return None if bool(m.all()) else m


def _compact(top: IndexerTopK) -> Selection:
    """The native top-k as a Selection: idx [B, 1, S, K] (-1 tail kept), counts = valid entries."""
    idx = top.indices.unsqueeze(1)
    return Selection(idx=idx, counts=(idx >= 0).sum(-1).to(torch.int32), block_size=1, query_block=1)


def _latent_value_norms(latent: torch.Tensor, w_uv: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """||W_UV^h c_t|| for every head without keeping the expanded values.

    latent [B, T, L], w_uv [H, Dv, L] -> [B, H, T] fp32 (per chunk of T: [B, chunk, H, Dv]).
    """
    B, T, _ = latent.shape
    out = torch.empty(B, w_uv.shape[0], T, dtype=torch.float32, device=latent.device)
    for t0 in range(0, T, chunk):
        v = torch.einsum("btl,hvl->bthv", latent[:, t0:t0 + chunk], w_uv)
        out[:, :, t0:t0 + chunk] = v.float().norm(dim=-1).transpose(1, 2)
    return out


def _use_triton(cfg: StemConfig, device: torch.device) -> bool:
    if cfg.backend == "reference":
        return False
    if cfg.backend == "triton":
        return True
    return device.type == "cuda"


def _attend_expanded(self, query_states, key_states, value_states, sel: Selection, triton_ok: bool):
    """Expanded MLA: q/k [B, H, *, Dqk], v [B, H, T, Dv] -> [B, S, H, Dv]; one selection for all heads."""
    q = query_states.transpose(1, 2)
    k = key_states.transpose(1, 2)
    v = value_states.transpose(1, 2)
    if triton_ok:
        return sparse_attention(q, k, v, sel.idx, sel.counts, block_size=1, sm_scale=self.scaling,
                                check_indices=False)
    return sparse_attention_cpu(q, k, v, sel.idx, sel.counts, block_size=1, sm_scale=self.scaling)


def _attend_absorbed(self, q_pass, q_rot, latent, k_rot, sel: Selection):
    """Absorbed MLA on CUDA: [q_nope W_UK | q_rope] . [c | k_rope], softmax, . c, then W_UV.

    q_pass [B, H, S, nope], q_rot [B, H, S, rope], latent [B, 1, S, L], k_rot [B, 1, S, rope].
    """
    H, nope, L = self.num_heads, self.qk_nope_head_dim, self.kv_lora_rank
    w = self.kv_b_proj.weight.view(H, nope + self.v_head_dim, L)
    w_uk, w_uv = w[:, :nope], w[:, nope:]
    kv = torch.cat([latent, k_rot], dim=-1).transpose(1, 2).contiguous()  # [B, T, 1, L + rope]
    B, _, S, _ = q_pass.shape
    T = kv.shape[1]
    out = q_pass.new_empty(B, S, H, self.v_head_dim)
    # query chunks bound the absorbed queries ([B, chunk, H, 576]) instead of [B, S, H, 576]
    for s0 in range(0, S, ABSORBED_CHUNK):
        s1 = min(S, s0 + ABSORBED_CHUNK)
        q_lat = torch.einsum("bhsd,hdl->bshl", q_pass[:, :, s0:s1], w_uk)
        q = torch.cat([q_lat, q_rot[:, :, s0:s1].transpose(1, 2).to(q_lat.dtype)], dim=-1)
        out_lat = sparse_attention(q, kv, kv[..., :L], sel.idx[:, :, s0:s1], sel.counts[:, :, s0:s1],
                                   block_size=1, sm_scale=self.scaling, q_offset=T - S + s0, check_indices=False)
        out[:, s0:s1] = torch.einsum("bshl,hvl->bshv", out_lat, w_uv)
    return out


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
    q_rot, k_rot = rope(q_rot, k_rot, cos, sin)

    past_len = past_key_values.get_seq_length(self.layer_idx) if past_key_values is not None else 0
    triton_ok = _use_triton(cfg, hidden_states.device)
    absorbed = triton_ok and past_key_values is None and S > 1 and hidden_states.is_cuda
    key_states = value_states = None
    if not absorbed:
        key_states, value_states = self.expand_kv(latent, k_rot)
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
    T = past_len + S
    pad = _padding_mask(attention_mask, B, T)
    indexer_mask = attention_mask if (attention_mask is not None and attention_mask.dim() > 2) else pad

    # ---- native candidates (chunked, with scores)
    fast_indexer = cfg.indexer_dtype == "bfloat16"
    if self.indexer is not None:
        top = dsa_indexer_topk(self.indexer, hidden_states, q_resid, position_embeddings, indexer_mask,
                               position_ids, past_key_values=past_key_values, max_bytes=cfg.indexer_max_bytes,
                               score_dtype=torch.bfloat16 if fast_indexer else None,
                               tie_break="none" if fast_indexer else "position")
        st.shared.last = top
    else:
        if st.shared.last is None:
            raise ValueError("a shared DSA layer needs the candidates of a previous full indexer layer")
        top = st.shared.last

    # ---- Stem: OAM rescoring + TPD truncation (prefill only)
    native = _compact(top)
    if S > 1 and not cfg.is_identity:
        if absorbed:
            w_uv = self.kv_b_proj.weight.view(self.num_heads, -1, self.kv_lora_rank)[:, self.qk_nope_head_dim:]
            norms = _latent_value_norms(latent[:, 0], w_uv)
        else:
            norms = value_norms(value_states.transpose(1, 2))  # [B, H, T]
        # tensor parallelism (stem_boost.dist.tp) sets `stem_norm_reducer`: the heads of all ranks
        reducer = getattr(self, "stem_norm_reducer", None)
        key_norms = (reducer(norms, cfg.head_agg) if reducer is not None
                     else aggregate_heads(norms, 1, how=cfg.head_agg))  # [B, 1, T]
        available = torch.arange(S) + past_len + 1
        sel, plan = boost_candidates(native.idx, top.scores.unsqueeze(1), key_norms, available, st.index_topk, cfg,
                                     key_valid=pad)
        alpha = plan.alpha
    else:
        sel, alpha = native, 1.0
    if S > 1:
        _record(st, native, sel, alpha, cfg, T)
        st.last_native, st.last_stem = native, sel

    # ---- attention on the selected token lists
    if absorbed:
        out = _attend_absorbed(self, q_pass, q_rot, latent, k_rot, sel)
    else:
        query_states = torch.cat((q_pass, q_rot), dim=-1)
        out = _attend_expanded(self, query_states, key_states, value_states, sel, triton_ok)
    attn_output = self.o_proj(out.reshape(B, S, -1).to(hidden_states.dtype))
    if st.returns_topk:
        return attn_output, None, top.as_native_indices()
    return attn_output, None


def _record(st: DSAState, native: Selection, sel: Selection, alpha: float, cfg: StemConfig, T: int) -> None:
    s = st.stats
    s.native_pairs = int(native.counts.long().sum())
    s.stem_pairs = int(sel.counts.long().sum())
    s.alpha = float(alpha)
    s.reduce_requested = cfg.reduce
    s.seq_len = T
    n_rows = native.counts.shape[-1]
    step = max(1, n_rows // 512)  # keep a light per-position trace for plots
    s.budget_native = native.counts[0, 0, ::step].tolist()
    s.budget_stem = sel.counts[0, 0, ::step].tolist()
