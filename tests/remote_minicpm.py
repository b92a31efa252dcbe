"""A stand-in for OpenBMB's remote-code MiniCPM-4.1 model (``trust_remote_code``), for the adapter
tests: the module structure, attribute names, call signatures and return values of
``modeling_minicpm.py`` (``MiniCPMInfLLMv2Attention``, ``MiniCPMDecoderLayer``, ``MiniCPMModel``),
as `stem_boost.adapters.infllmv2_remote` documents them. Like the real module on a machine without
OpenBMB's CUDA package, its own forward attends densely below ``dense_len`` and cannot run the
sparse path above it. Parameter names equal the official checkpoint's, so the native
`stem_boost.models.minicpm4` weights load into it unchanged."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RemoteRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class RemoteRotaryEmbedding(nn.Module):
    """forward(x, seq_len) -> (cos, sin) tables [seq_len, dim] (the remote code's legacy API)."""

    def __init__(self, dim: int, base: float):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, dim, 2).float() / dim), persistent=False)

    def forward(self, x, seq_len: int):
        t = torch.arange(seq_len, device=x.device, dtype=torch.float32)
        emb = torch.cat([torch.outer(t, self.inv_freq)] * 2, dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class RemoteInfLLMv2Attention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads, self.num_key_value_heads, self.head_dim = (config.num_attention_heads,
                                                                   config.num_key_value_heads, config.head_dim)
        self.q_proj = nn.Linear(self.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(self.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(self.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, self.hidden_size, bias=False)
        self.rotary_emb = RemoteRotaryEmbedding(self.head_dim, config.rope_theta)
        self.dense_len = config.sparse_config.get("dense_len", 8192)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, **kwargs):
        B, S, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(B, S, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(B, S, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        kv_seq_len = int(position_ids.max()) + 1
        cos, sin = self.rotary_emb(v.to(torch.float32), seq_len=kv_seq_len)
        c, s = cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)
        rot = lambda x: torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), -1)  # noqa: E731
        q, k = (q.float() * c + rot(q.float()) * s).to(q.dtype), (k.float() * c + rot(k.float()) * s).to(k.dtype)
        if past_key_value is not None:
            k, v = past_key_value.update(k, v, self.layer_idx, {"sin": sin, "cos": cos})
        T = k.shape[2]
        if kv_seq_len >= self.dense_len:
            raise ImportError("infllm_v2 (OpenBMB's CUDA package) is needed for sparse attention")
        causal = torch.arange(T) <= torch.arange(T - S, T).unsqueeze(-1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1)), None, past_key_value


class RemoteDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.self_attn = RemoteInfLLMv2Attention(config, layer_idx)
        self.mlp = nn.ModuleDict(dict(
            gate_proj=nn.Linear(config.hidden_size, config.intermediate_size, bias=False),
            up_proj=nn.Linear(config.hidden_size, config.intermediate_size, bias=False),
            down_proj=nn.Linear(config.intermediate_size, config.hidden_size, bias=False)))
        self.input_layernorm = RemoteRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RemoteRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.scale = config.scale_depth / math.sqrt(config.num_hidden_layers)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, **kwargs):
        h, _, past_key_value = self.self_attn(hidden_states=self.input_layernorm(hidden_states),
                                              attention_mask=attention_mask, position_ids=position_ids,
                                              past_key_value=past_key_value, output_attentions=output_attentions,
                                              use_cache=use_cache)
        hidden_states = hidden_states + h * self.scale
        x = self.post_attention_layernorm(hidden_states)
        m = self.mlp["down_proj"](F.silu(self.mlp["gate_proj"](x)) * self.mlp["up_proj"](x))
        return hidden_states + m * self.scale, past_key_value


class RemoteMiniCPMForCausalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(RemoteDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.model.norm = RemoteRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids, past_key_values=None, attention_mask=None, position_ids=None):
        B, S = input_ids.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + S).unsqueeze(0)
        # the 2-D padding mask flash-attn wants
        mask = torch.ones(B, past + S, dtype=torch.long) if attention_mask is None else attention_mask
        h = self.model.embed_tokens(input_ids) * self.config.scale_emb
        for layer in self.model.layers:
            h, past_key_values = layer(h, attention_mask=mask, position_ids=position_ids,
                                       past_key_value=past_key_values, use_cache=past_key_values is not None)
        h = self.model.norm(h)
        return self.lm_head(h / (self.config.hidden_size / self.config.dim_model_base)).float()
