"""Stem on DSA with GQA attention (a lightning indexer on a Llama-style q/k/v/o attention).

`stem_boost.adapters.dsa` is written for MLA (DeepSeek-V3.2 and its relatives). This module is
the same Stem path for an attention whose main branch is plain grouped-query attention, e.g.
`stem_boost.testbeds.smollm2_dsa.SmolDSAAttention` (SmolLM2-135M with a distilled indexer):

  1. q, k, v from q_proj / k_proj / v_proj, half-split RoPE on q and k (the model module's own
     `apply_rotary_pos_emb`), K/V appended to the cache;
  2. the indexer's candidates, computed chunk by chunk with scores
     (`dsa_indexer.indexer_qk` + `chunked_index_topk`: DeepSeek-V3.2 score, bounded memory);
  3. prefill: OAM rescoring with the layer's value norms (RMS over the KV heads, which is the RMS
     over all query heads since each KV head serves G of them; DSA shares one selection per layer)
     and TPD truncation under the `reduce` contract (`boost.stem_step`);
  4. attention over the selected token lists, one list shared by all heads (Hsel = 1): the shared
     Triton kernel on CUDA (`sparse_attention`, G = Hq / Hkv query heads tiled per KV head),
     the masked PyTorch executor on the CPU. Never a dense S x T mask.
Decode (one query) keeps the native selection (full budget), as in `dsa`.

Structure the detector looks for (`is_dsa_gqa_attention`): q_proj, k_proj, v_proj, o_proj,
head_dim, scaling, layer_idx and an `indexer` with index_topk, wq_b, wk, weights_proj, n_heads,
head_dim, qk_rope_head_dim, softmax_scale, and no MLA projections. Optional indexer hooks:
  indexer.q_resid(x)          the low-rank query input of wq_b (DeepSeek: q_a_layernorm(q_a_proj(x)),
                              owned by the MLA attention); default: x (the normed hidden state);
  indexer.rope_embeddings(pe) the layer's (cos, sin) mapped to the indexer's rope dims; default: pe.
The indexer keys are cached per layer next to the K/V (`update_indexer` when the cache layer has
it, else an attribute on the cache layer).
"""

from __future__ import annotations

import sys

import torch

from ..compat import cache_argument
from ..kernels.dense import dense_causal_attention
from ..native.dsa_indexer import DEEPSEEK_V32, IndexerTopK, chunked_index_topk, indexer_qk, indexer_weights
from ..oam import aggregate_heads, value_norms
from ..rope import apply_rope_half
from ..selection import key_padding
from .dsa import INDEXER_ATTRS, MLA_ATTRS, DSAState, attend_expanded, native_selection, stem_prefill

GQA_ATTRS = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx")
INDEXER_GQA_ATTRS = INDEXER_ATTRS + ("n_heads", "head_dim", "qk_rope_head_dim", "softmax_scale")

__all__ = ["is_dsa_gqa_attention", "stem_dsa_gqa_forward", "gqa_qkv", "gqa_indexer_topk", "gqa_attend"]


def is_dsa_gqa_attention(module: torch.nn.Module) -> bool:
    """A q/k/v/o (GQA) attention that owns a lightning indexer, and is not MLA."""
    if any(hasattr(module, a) for a in MLA_ATTRS[:3]):
        return False
    if not all(hasattr(module, a) for a in GQA_ATTRS):
        return False
    indexer = getattr(module, "indexer", None)
    return indexer is not None and all(hasattr(indexer, a) for a in INDEXER_GQA_ATTRS)


def _rope(module):
    """The model module's own `apply_rotary_pos_emb` when it has one, else the half-split helper."""
    fn = getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)
    return fn if fn is not None else apply_rope_half


def gqa_qkv(self, hidden_states, position_embeddings, past_key_values=None):
    """q [B, Hq, S, D], k / v [B, Hkv, T, D] (cache updated), past length."""
    B, S, _ = hidden_states.shape
    shape = (B, S, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
    k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
    v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = _rope(self)(q, k, cos, sin)
    past_len = 0
    if past_key_values is not None:
        past_len = past_key_values.get_seq_length(self.layer_idx)
        k, v = past_key_values.update(k, v, self.layer_idx)
    return q, k, v, past_len


def _indexer_cache(past_key_values, layer_idx: int, k: torch.Tensor) -> torch.Tensor:
    """Append the indexer keys [B, S, D] of this step to the layer's cache; return all of them."""
    layers = getattr(past_key_values, "layers", None)
    if layers is None:
        raise TypeError(f"{type(past_key_values).__name__} has no per-layer storage for the indexer keys")
    layer = layers[layer_idx]
    if hasattr(layer, "update_indexer"):
        return layer.update_indexer(k)
    prev = getattr(layer, "_stem_indexer_keys", None)
    full = k if prev is None else torch.cat([prev, k], dim=1)
    layer._stem_indexer_keys = full
    return full


def gqa_indexer_topk(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, *,
                     max_bytes: int = 256 * 2**20, score_dtype=None) -> IndexerTopK:
    """The indexer's top-k (and scores) of this step; the indexer key cache is updated."""
    ix = self.indexer
    q_resid = ix.q_resid(hidden_states) if hasattr(ix, "q_resid") else hidden_states
    pe = ix.rope_embeddings(position_embeddings) if hasattr(ix, "rope_embeddings") else position_embeddings
    q, k = indexer_qk(ix, hidden_states, q_resid, pe, None, DEEPSEEK_V32)
    if past_key_values is not None:
        k = _indexer_cache(past_key_values, self.layer_idx, k)
    w = indexer_weights(ix, hidden_states, DEEPSEEK_V32)
    return chunked_index_topk(q, k, w, attention_mask, ix.index_topk, ix.softmax_scale, max_bytes=max_bytes,
                              score_dtype=score_dtype)


def _indexer_mask(attention_mask, B: int, T: int):
    """What the indexer masks with: a 4-D mask as is, a 2-D padding mask, or None (plain causal)."""
    if attention_mask is not None and attention_mask.dim() > 2:
        return attention_mask
    return key_padding(attention_mask, T)


# q [B, Hq, S, D], k / v [B, Hkv, T, D] -> [B, S, Hq, D] with one selection for all heads: the
# same call as the expanded-MLA path of the DSA adapter.
gqa_attend = attend_expanded


def stem_dsa_gqa_forward(
    self,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    past_key_values=None,
    **kwargs,
):
    """Drop-in for a GQA DSA attention forward (see the module docstring); returns (out, None)."""
    past_key_values = cache_argument(past_key_values, kwargs)  # transformers >= 5.24: cache=
    st: DSAState = self._stem
    cfg = st.cfg
    B, S, _ = hidden_states.shape
    q, k, v, past_len = gqa_qkv(self, hidden_states, position_embeddings, past_key_values)
    T = past_len + S
    pad = key_padding(attention_mask, T)
    if cfg.dense:  # the dense baseline: every causal key, no indexer
        out = dense_causal_attention(q, k, v, self.scaling, pad).transpose(1, 2)  # [B, S, Hq, D]
        return self.o_proj(out.reshape(B, S, -1).to(hidden_states.dtype)), None
    top = gqa_indexer_topk(self, hidden_states, position_embeddings, _indexer_mask(attention_mask, B, T),
                           past_key_values, max_bytes=cfg.indexer_max_bytes,
                           score_dtype=cfg.indexer_score_dtype(q.device, self.indexer.head_dim))
    st.shared.last = top if st.shared.needed else None
    sel = native = native_selection(top, q_offset=past_len, padding=pad)  # idx [B, 1, S, K]
    if S > 1:
        key_norms = None
        if not cfg.is_identity:
            norms = value_norms(v.transpose(1, 2))  # [B, Hkv, T]
            key_norms = aggregate_heads(norms, 1, how=cfg.head_agg)  # [B, 1, T]
        sel = stem_prefill(st, native, top, key_norms, T)
    out = gqa_attend(self, q, k, v, sel, cfg.backend)  # [B, S, Hq, D]
    return self.o_proj(out.reshape(B, S, -1).to(hidden_states.dtype)), None
