"""MiniCPM-4 / 4.1 loaded with ``trust_remote_code``: the official attention modules, duck-typed.

OpenBMB's remote code (``modeling_minicpm.py`` of the MiniCPM4 / MiniCPM4.1 repositories; read
through the copy of the MiniCPM-SALA variant in the search corpus, whose ``MiniCPMInfLLMv2Attention``
is the same module) runs InfLLMv2 through the CUDA package ``infllm_v2`` and flash-attn. Its
attention module exposes what this adapter needs:

    q_proj, k_proj, v_proj, o_proj           the projections (GQA: num_heads, num_key_value_heads, head_dim)
    config.sparse_config                      kernel_size, kernel_stride, init_blocks, block_size,
                                              window_size, topk, use_nope, dense_len
    rotary_emb(value_states, seq_len=) -> (cos, sin) tables [seq_len, head_dim], indexed by position_ids
                                              (``apply_rotary_pos_emb(q, k, cos, sin, position_ids)``)
    forward(hidden_states, attention_mask, position_ids, past_key_value, output_attentions, use_cache)
        -> (attn_output, attn_weights, past_key_value); attention_mask is the 2-D padding mask;
        ``past_key_value.update(k, v, layer_idx, cache_kwargs)`` returns the whole K / V [B, Hk, T, D]
    optional: config.attn_use_rope (False: no RoPE), use_output_gate + o_gate (MiniCPM-SALA)

`install` gives such a module the hook point of the native class (``infllmv2``, ``sparse_forward``,
``select_chunk_size``) and a forward with the same
signature and return value that runs the native InfLLMv2 definition of `stem_boost.models.minicpm4`
(the PyTorch selection, the shared Triton kernel on CUDA): no ``infllm_v2`` and no flash-attn needed.
`stem_boost.wrap` then installs Stem exactly as on the native class; `unwrap` restores the module.
The compressed-key caches of the remote cache class are not used: the selection recomputes the
compression from the cached keys at each step (same result, more work per decode step).
"""

from __future__ import annotations

import math
import types

import torch

from ..native.infllmv2 import InfLLMv2Params
from ..selection import key_padding
from ..kernels.dense import dense_causal_attention
from ..models.minicpm4.modeling_minicpm4 import apply_rotary_pos_emb, infllmv2_sparse_forward, padded_sparse_forward

REMOTE_ATTRS = ("q_proj", "k_proj", "v_proj", "o_proj", "num_heads", "num_key_value_heads", "head_dim", "layer_idx",
                "rotary_emb")
ADDED = ("infllmv2", "sparse_forward", "select_chunk_size", "scaling", "forward", "_stem_remote")

__all__ = ["is_remote_infllmv2_attention", "is_installed", "install", "uninstall", "remote_forward"]


def is_remote_infllmv2_attention(module: torch.nn.Module) -> bool:
    """The official remote-code attention: its projections, ``rotary_emb`` and a ``sparse_config``,
    without the native class's hook points."""
    cfg = getattr(module, "config", None)
    return (all(hasattr(module, a) for a in REMOTE_ATTRS) and getattr(cfg, "sparse_config", None) is not None
            and not hasattr(module, "sparse_forward"))


def is_installed(module: torch.nn.Module) -> bool:
    """`install` gave this module the native hook point and forward."""
    return bool(module.__dict__.get("_stem_remote", False))


def install(module: torch.nn.Module) -> None:
    """Give a remote-code attention module the native hook points and forward (see module docstring)."""
    clash = [a for a in ADDED if a in module.__dict__]
    if clash:
        raise ValueError(f"{type(module).__name__} already has {clash}: not the remote-code module this adapter knows")
    module.infllmv2 = InfLLMv2Params.from_sparse_config(dict(module.config.sparse_config))
    module.sparse_forward = infllmv2_sparse_forward
    module.select_chunk_size = None
    module.scaling = module.head_dim ** -0.5
    module.forward = types.MethodType(remote_forward, module)
    module._stem_remote = True


def uninstall(module: torch.nn.Module) -> None:
    for a in ADDED:
        module.__dict__.pop(a, None)


def padding_from_mask(attention_mask: torch.Tensor | None, B: int, T: int) -> torch.Tensor | None:
    """[B, T] bool (True = real token) from the remote model's mask: a 2-D padding mask, or the 4-D
    additive / boolean causal mask its model builds (a key is real when the last query may see it);
    None when every token is real."""
    if attention_mask is None or attention_mask.dim() not in (2, 4):
        return None
    if attention_mask.dim() == 4:
        last = attention_mask[:, 0, -1]
        attention_mask = last if last.dtype == torch.bool else last == 0
    return key_padding(attention_mask, T)


def remote_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   position_ids: torch.LongTensor | None = None, past_key_value=None, output_attentions: bool = False,
                   use_cache: bool = False, **kwargs):
    """Same signature and return value as the remote ``MiniCPMInfLLMv2Attention.forward``:
    hidden_states [B, S, hidden] -> (attn_output [B, S, hidden], None, past_key_value)."""
    B, S, _ = hidden_states.shape
    Hq, Hk, D = self.num_heads, self.num_key_value_heads, self.head_dim
    q = self.q_proj(hidden_states).view(B, S, Hq, D).transpose(1, 2)
    k = self.k_proj(hidden_states).view(B, S, Hk, D).transpose(1, 2)
    v = self.v_proj(hidden_states).view(B, S, Hk, D).transpose(1, 2)
    params: InfLLMv2Params = self.infllmv2
    if params.use_nope and past_key_value is not None:
        raise NotImplementedError("use_nope with a KV cache is not supported on remote-code modules; load the "
                                  "checkpoint with stem_boost.models.minicpm4 (it keeps the pre-RoPE keys)")
    q_nope, k_nope = (q, k) if params.use_nope else (None, None)
    past = past_key_value.get_seq_length(self.layer_idx) if past_key_value is not None else 0
    if position_ids is None:
        position_ids = torch.arange(past, past + S, device=hidden_states.device).unsqueeze(0)
    cache_kwargs = {}
    if getattr(self.config, "attn_use_rope", True):
        cos, sin = self.rotary_emb(v.to(torch.float32), seq_len=int(position_ids.max()) + 1)
        # the remote tables are [seq_len, D], indexed by position_ids; the products run in fp32
        q, k = apply_rotary_pos_emb(q, k, cos[position_ids].float(), sin[position_ids].float())
        cache_kwargs = {"sin": sin, "cos": cos}
    if past_key_value is not None:
        k, v = past_key_value.update(k, v, self.layer_idx, cache_kwargs)
    T = k.shape[2]
    padding = padding_from_mask(attention_mask, B, T)
    if padding is not None:  # each row on its own tokens, sparse or dense by its own length
        out = padded_sparse_forward(self, q, k, v, params, padding, q_nope=q_nope, k_nope=k_nope)
    elif params.is_sparse(T):
        out = self.sparse_forward(self, q, k, v, params, q_nope=q_nope, k_nope=k_nope)
    else:  # dense, causal with the queries at the end of the keys
        out = dense_causal_attention(q, k, v, 1 / math.sqrt(D))
    out = out.transpose(1, 2).reshape(B, S, Hq * D)
    if getattr(self, "use_output_gate", False):
        out = out * torch.sigmoid(self.o_gate(hidden_states))
    return self.o_proj(out), None, past_key_value
