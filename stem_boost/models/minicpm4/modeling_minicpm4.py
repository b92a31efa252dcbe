"""Native MiniCPM-4 / MiniCPM-4.1 model: the official checkpoint's weights, no remote code.

Follows the official ``modeling_minicpm.py`` (OpenBMB MiniCPM4 / MiniCPM4.1 Hugging Face remote
code; read through ``LDLINGLINGLING/ParetoQ_for_MiniCPM4: models/modeling_minicpm.py`` for the
dense model and OpenBMB's MiniCPM-SALA ``modeling_minicpm_sala.py`` for the 4.1 InfLLMv2
attention), re-implemented on the transformers 5 API:

- weight names: ``model.embed_tokens``, ``model.layers.N.self_attn.{q,k,v,o}_proj``,
  ``model.layers.N.mlp.{gate,up,down}_proj``, ``model.layers.N.{input,post_attention}_layernorm``,
  ``model.norm``, ``lm_head`` (``bias=config.attention_bias`` on the attention projections);
- muP: ``embed_tokens(input_ids) * scale_emb`` (only when the model embeds ``input_ids``; given
  ``inputs_embeds`` are used as they are, as in the official code); every residual branch
  ``residual + out * (scale_depth / sqrt(num_hidden_layers))``; logits
  ``lm_head(hidden / (hidden_size / dim_model_base))`` returned as fp32;
- RMSNorm: ``(x * rsqrt(mean(x_fp32^2) + eps)).to(x.dtype) * weight``;
- RoPE (``MiniCPMRotaryEmbedding`` / ``MiniCPMLongRoPE`` / linear / dynamic): cos/sin tables in
  fp32 for ``max(max_position_embeddings, longest length seen)`` positions; LongRoPE divides the
  positions by ``long_factor`` when that table length exceeds ``original_max_position_embeddings``
  (else ``short_factor``) and multiplies cos/sin by ``sqrt(1 + log(max_pos / orig) / log(orig))``;
  q and k are rotated in fp32 and cast back;
- attention: dense (SDPA / eager via transformers' attention interface) while the key length is
  below ``sparse_config["dense_len"]``; InfLLMv2 block-sparse attention (see ``infllmv2.py``)
  from there on, prefill and one-token decode alike, with a transformers ``DynamicCache``.

Not reproduced: ``pretraining_tp > 1`` slicing (same maths up to summation order), and padded
batches on the sparse path (raises; the dense path supports padding masks).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel

from ...compat import cache_argument
from ...kernels import sparse_attention
from ...kernels.dense import dense_causal_attention
from ...native.infllmv2 import InfLLMv2Params, infllmv2_select
from ...rope import apply_rope_half
from ...selection import key_padding
from .configuration_minicpm4 import MiniCPM4Config

__all__ = ["MiniCPM4ForCausalLM", "MiniCPM4Model", "MiniCPM4PreTrainedModel"]


class MiniCPM4RMSNorm(nn.Module):
    """``rms_layernorm`` of the official code (normalise in fp32, cast back, then scale)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        old_dtype = hidden.dtype
        variance = hidden.to(torch.float32).pow(2).mean(dim=-1, keepdim=True)
        hidden = (hidden * torch.rsqrt(variance + self.variance_epsilon)).to(old_dtype)
        return hidden * self.weight


class MiniCPM4RoPE(nn.Module):
    """RoPE tables of the official MiniCPM code (default, ``linear``, ``dynamic``, ``longrope``).

    The official module builds its fp32 cos/sin cache for ``max_position_embeddings`` positions and
    rebuilds it (for the new length) whenever a longer sequence arrives; the LongRoPE factor set and
    the dynamic-NTK base depend on that cache length. Here the table is built lazily with the same
    rule (one table shared by all layers, which the official per-layer copies equal).
    """

    def __init__(self, config: MiniCPM4Config):
        super().__init__()
        self.dim = config.head_dim
        self.base = float(config.rope_theta)
        self.max_position_embeddings = config.max_position_embeddings
        rs = config.rope_scaling or {}
        self.rope_type = rs.get("rope_type", rs.get("type", "default")) if rs else "default"
        self.factor = rs.get("factor")
        if self.rope_type == "longrope":
            self.short_factor = [float(x) for x in rs["short_factor"]]
            self.long_factor = [float(x) for x in rs["long_factor"]]
            self.original_max_position_embeddings = int(rs["original_max_position_embeddings"])
            if len(self.short_factor) != self.dim // 2 or len(self.long_factor) != self.dim // 2:
                raise ValueError(
                    f"longrope factors must have head_dim / 2 = {self.dim // 2} entries, got "
                    f"{len(self.short_factor)} and {len(self.long_factor)}"
                )
            scale = self.max_position_embeddings / self.original_max_position_embeddings
            self.scaling_factor = math.sqrt(1 + math.log(scale) / math.log(self.original_max_position_embeddings))
        self.max_seq_len_cached = self.max_position_embeddings
        self._base_now = self.base
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def _inv_freq(self, base: float, device) -> torch.Tensor:
        return 1.0 / (base ** (torch.arange(0, self.dim, 2, device=device).float() / self.dim))

    def _build(self, seq_len: int, device) -> None:
        self.max_seq_len_cached = seq_len
        t = torch.arange(seq_len, device=device, dtype=torch.float32)
        scale = 1.0
        if self.rope_type == "longrope":
            ext = self.long_factor if seq_len > self.original_max_position_embeddings else self.short_factor
            ext_t = torch.tensor(ext, dtype=torch.float32, device=device)
            freqs = torch.mul(torch.outer(t, 1.0 / ext_t), self._inv_freq(self.base, device))
            scale = self.scaling_factor
        elif self.rope_type == "linear":
            freqs = torch.outer(t / self.factor, self._inv_freq(self.base, device))
        elif self.rope_type == "dynamic":
            if seq_len > self.max_position_embeddings:  # the official code also keeps the new base
                self._base_now = self.base * (
                    (self.factor * seq_len / self.max_position_embeddings) - (self.factor - 1)
                ) ** (self.dim / (self.dim - 2))
            freqs = torch.outer(t, self._inv_freq(self._base_now, device))
        else:
            freqs = torch.outer(t, self._inv_freq(self.base, device))
        emb = torch.cat((freqs, freqs), dim=-1)
        self._cos = emb.cos() * scale if scale != 1.0 else emb.cos()
        self._sin = emb.sin() * scale if scale != 1.0 else emb.sin()

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, S, head_dim] fp32 for ``position_ids`` [B, S]."""
        need = int(position_ids.max()) + 1
        device = position_ids.device
        if self._cos is None:
            self._build(max(self.max_seq_len_cached, need), device)
        elif need > self.max_seq_len_cached:
            self._build(need, device)
        elif self._cos.device != device:
            self._cos, self._sin = self._cos.to(device), self._sin.to(device)
        return self._cos[position_ids], self._sin[position_ids]


def apply_rotary_pos_emb(q, k, cos, sin):
    """Rotate q [B, Hq, S, D] and k [B, Hk, S, D] in fp32 (official ``apply_rotary_pos_emb``)."""
    return apply_rope_half(q, k, cos, sin, 1, compute_dtype=torch.float32)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    key = _repeat_kv(key, module.num_key_value_groups)
    value = _repeat_kv(value, module.num_key_value_groups)
    w = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            w = w.masked_fill(~attention_mask, float("-inf"))
        else:
            w = w + attention_mask[..., : key.shape[-2]]
    elif query.shape[2] > 1:
        S, T = query.shape[2], key.shape[2]
        causal = torch.arange(T, device=w.device) <= torch.arange(T - S, T, device=w.device).unsqueeze(-1)
        w = w.masked_fill(~causal, float("-inf"))
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    w = F.dropout(w, p=dropout, training=module.training)
    return torch.matmul(w, value).transpose(1, 2).contiguous(), w


#: ``sparse_forward(module, q, k, v, params, q_nope=, k_nope=, batch_row=) -> out``: the InfLLMv2 path
#: of one attention module on unpadded rows (``batch_row`` is a `BatchRow` when a padded batch runs row
#: by row, else None); `stem_boost.wrap` installs Stem's in place of the native one.
SparseForward = Callable[..., torch.Tensor]


class BatchRow(NamedTuple):
    """Which row of a padded batch a `sparse_forward` call runs: its index, the batch size, and
    whether it is the first sparse row of this batch (rows too short to be sparse run dense)."""

    index: int
    count: int
    first: bool


def infllmv2_sparse_forward(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            params: InfLLMv2Params, *, q_nope: torch.Tensor | None = None,
                            k_nope: torch.Tensor | None = None, batch_row: BatchRow | None = None
                            ) -> torch.Tensor:
    """The native InfLLMv2 sparse path: block selection, then block-sparse attention over it.

    q [B, Hq, S, D] (RoPE applied), k / v [B, Hk, T, D] (the whole cache); q_nope / k_nope:
    pre-RoPE copies for ``use_nope``. Returns [B, Hq, S, D]."""
    S, T = q.shape[2], k.shape[2]
    sel_q, sel_k = (q_nope, k_nope) if params.use_nope else (q, k)
    chunk = module.select_chunk_size or (1024 if q.is_cuda else 64)
    blocks = infllmv2_select(sel_q, sel_k, params, q_offset=T - S, chunk_size=chunk)  # idx [B, Hk, S, K]
    return attend_blocks(q, k, v, blocks.to_selection(), module.scaling)


def attend_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection, sm_scale: float,
                  backend: str = "auto") -> torch.Tensor:
    """`sparse_attention` in the HF layout: q [B, Hq, S, D], k / v [B, Hk, T, D] -> [B, Hq, S, D]."""
    out = sparse_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), selection, sm_scale=sm_scale,
                           backend=backend, check=not q.is_cuda)
    return out.transpose(1, 2)


def padded_sparse_forward(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          params: InfLLMv2Params, padding: torch.Tensor, *, q_nope: torch.Tensor | None = None,
                          k_nope: torch.Tensor | None = None) -> torch.Tensor:
    """InfLLMv2 on a padded batch, each row on its own tokens.

    InfLLMv2's compression windows and key blocks are aligned to the sequence start, so a row is
    cut to its real tokens (padding [B, T] bool, True = real; left or right padding) and runs alone:
    the sparse path of `module.sparse_forward` when its own length is sparse, dense causal
    attention otherwise. Padding query rows give zeros. Returns [B, Hq, S, D]."""
    B, _, S, _ = q.shape
    T = k.shape[2]
    out = torch.zeros_like(q)
    first = True
    for b in range(B):
        real = padding[b, -T:].nonzero().flatten()
        if real.numel() == 0:
            continue
        t0, t1 = int(real[0]), int(real[-1]) + 1  # the row's keys
        s0, s1 = max(t0 - (T - S), 0), t1 - (T - S)  # its queries (the last S of the T positions)
        if s1 <= s0:
            continue
        rows = slice(b, b + 1)
        qb, kb, vb = q[rows, :, s0:s1], k[rows, :, t0:t1], v[rows, :, t0:t1]
        if params.is_sparse(t1 - t0):
            qn = None if q_nope is None else q_nope[rows, :, s0:s1]
            kn = None if k_nope is None else k_nope[rows, :, t0:t1]
            out[rows, :, s0:s1] = module.sparse_forward(module, qb, kb, vb, params, q_nope=qn, k_nope=kn,
                                                        batch_row=BatchRow(b, B, first))
            first = False
        else:
            out[rows, :, s0:s1] = dense_causal_attention(qb, kb, vb, module.scaling)
    return out


class MiniCPM4Attention(nn.Module):
    """MiniCPM attention (``MiniCPMInfLLMv2Attention`` when ``sparse_config`` is set).

    Hook point: ``sparse_forward`` (default :func:`infllmv2_sparse_forward`, the native selection
    and block-sparse attention through ``stem_boost.sparse_attention``); ``stem_boost.wrap`` swaps
    in Stem's. Padded batches run each row on its own tokens (:func:`padded_sparse_forward`).
    ``select_chunk_size``: query rows scored per selection step of the PyTorch selection and of the
    mass schedule (``None``: 1024 on CUDA, 64 on the CPU; memory grows with it as ``B * Hk * chunk *
    n_blocks`` fp32 scores). The fused GPU selection otherwise keeps its own 16384-row chunks (faster:
    `kernels.infllmv2_select.infllmv2_select_fused`).
    """

    def __init__(self, config: MiniCPM4Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.infllmv2: InfLLMv2Params | None = config.infllmv2
        self.sparse_forward: SparseForward = infllmv2_sparse_forward
        self.select_chunk_size: int | None = None
        self.attn_chunk_size = 64

    def _nope_keys(self, cache: Cache | None, k_nope: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE keys of the whole sequence for ``use_nope`` (kept beside the KV cache)."""
        if cache is None:
            return k_nope
        store = getattr(cache, "_minicpm4_nope_keys", None)
        if store is None:
            store = {}
            cache._minicpm4_nope_keys = store
        prev = store.get(self.layer_idx)
        store[self.layer_idx] = k_nope if prev is None else torch.cat([prev, k_nope], dim=2)
        return store[self.layer_idx]

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        padding_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        B, S, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(B, S, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(B, S, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        params = self.infllmv2
        use_nope = params is not None and params.use_nope
        q_nope, k_nope = (q, k) if use_nope else (None, None)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        if use_nope:
            k_nope = self._nope_keys(past_key_values, k_nope)
        T = k.shape[2]

        if params is None or not params.is_sparse(T):
            impl = self.config._attn_implementation or "sdpa"
            fn = _eager_attention if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]
            out, _ = fn(self, q, k, v, attention_mask, scaling=self.scaling,
                        dropout=self.attention_dropout if self.training else 0.0)
        else:
            if padding_mask is not None:
                out = padded_sparse_forward(self, q, k, v, params, padding_mask, q_nope=q_nope, k_nope=k_nope)
            else:
                out = self.sparse_forward(self, q, k, v, params, q_nope=q_nope, k_nope=k_nope)
            out = out.transpose(1, 2)
        return self.o_proj(out.reshape(B, S, self.num_heads * self.head_dim))


class MiniCPM4MLP(nn.Module):
    def __init__(self, config: MiniCPM4Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MiniCPM4DecoderLayer(nn.Module):
    def __init__(self, config: MiniCPM4Config, layer_idx: int):
        super().__init__()
        self.self_attn = MiniCPM4Attention(config, layer_idx)
        self.mlp = MiniCPM4MLP(config)
        self.input_layernorm = MiniCPM4RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MiniCPM4RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.residual_scale = config.scale_depth / math.sqrt(config.num_hidden_layers)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None,
                padding_mask=None, **kwargs):
        residual = hidden_states
        h = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask,
                           past_key_values, padding_mask=padding_mask)
        hidden_states = residual + h * self.residual_scale
        residual = hidden_states
        h = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + h * self.residual_scale


class MiniCPM4PreTrainedModel(PreTrainedModel):
    config_class = MiniCPM4Config
    config: MiniCPM4Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["MiniCPM4DecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False


class MiniCPM4Model(MiniCPM4PreTrainedModel):
    """The decoder stack (``model.*`` weights of the official checkpoint)."""

    def __init__(self, config: MiniCPM4Config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([MiniCPM4DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = MiniCPM4RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MiniCPM4RoPE(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        past_key_values = cache_argument(past_key_values, kwargs)  # transformers >= 5.24: cache=
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_hidden_states = (self.config.output_hidden_states if output_hidden_states is None
                                else output_hidden_states)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids) * self.config.scale_emb
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        B, S = inputs_embeds.shape[:2]
        if position_ids is None:
            position_ids = (torch.arange(S, device=inputs_embeds.device) + past_seen).unsqueeze(0).expand(B, -1)
        padding_mask = (key_padding(attention_mask, attention_mask.shape[-1])  # [B, T], True = real token
                        if attention_mask is not None else None)
        params = self.config.infllmv2
        if params is not None and params.is_sparse(past_seen + S):
            causal_mask = None  # every layer takes the sparse path, which needs no S x T mask
        else:
            causal_mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                past_key_values=past_key_values,
                position_ids=position_ids,
            )
        position_embeddings = self.rotary_emb(position_ids)
        hidden_states = inputs_embeds
        all_hidden = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            hidden_states = layer(hidden_states, position_embeddings, causal_mask, past_key_values,
                                  padding_mask=padding_mask)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states,
                                       past_key_values=past_key_values if use_cache else None,
                                       hidden_states=all_hidden)


class MiniCPM4ForCausalLM(MiniCPM4PreTrainedModel, GenerationMixin):
    """Causal LM head on :class:`MiniCPM4Model` (official ``MiniCPMForCausalLM`` weights)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MiniCPM4Config):
        super().__init__(config)
        self.model = MiniCPM4Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_decoder(self):
        return self.model

    def set_decoder(self, decoder):
        self.model = decoder

    def attention_layers(self) -> list[MiniCPM4Attention]:
        """The attention modules (their ``sparse_forward`` is the hook point `stem_boost.wrap` uses)."""
        return [layer.self_attn for layer in self.model.layers]

    def set_sparse_config(self, sparse_config: dict | None) -> None:
        """Switch InfLLMv2 on (validated dict), change its parameters, or off (``None``)."""
        params = InfLLMv2Params.from_sparse_config(sparse_config)
        self.config.sparse_config = None if sparse_config is None else dict(sparse_config)
        for attn in self.attention_layers():
            attn.infllmv2 = params

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        past_key_values = cache_argument(past_key_values, kwargs)  # transformers >= 5.24: cache=
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        hidden_states = hidden_states[:, slice_indices, :]
        logits = self.lm_head(hidden_states / (self.config.hidden_size / self.config.dim_model_base)).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[..., :-1, :].reshape(-1, logits.shape[-1]),
                                   labels[..., 1:].reshape(-1).to(logits.device), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states)
