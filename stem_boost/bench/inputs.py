"""Benchmark inputs shared by the scripts: hidden states whose neighbouring positions agree as much
as neighbouring tokens of real text do, and the random-weight DeepSeek-V3.2 attention layer that the
layer benchmark and the list analyses both build."""

from __future__ import annotations

import torch

__all__ = ["dsa_bench_layer", "smooth_hidden_states"]


def smooth_hidden_states(S: int, width: int, window: int, device, dtype=torch.bfloat16) -> torch.Tensor:
    """[1, S, width] hidden states, N(0, 1) at every position. window <= 1: i.i.d. across positions
    (random weights then give near-independent block lists for neighbouring tokens, the worst case for
    union tiles). window W > 1: each position is the normalised sum of W consecutive i.i.d. draws, so
    neighbours share W - 1 of them, as neighbouring tokens of real text share most of their context."""
    if window <= 1:
        return torch.randn(1, S, width, device=device, dtype=dtype)
    e = torch.randn(1, S + window, width, device=device, dtype=torch.float32)
    c = torch.cumsum(e, dim=1)
    return ((c[:, window:] - c[:, :-window]) / window ** 0.5).to(dtype)


def dsa_bench_layer(device, dtype=torch.bfloat16, seed: int = 0):
    """(attention, config, rotary): one DeepSeek-V3.2 attention layer at the real dims (128 heads, the
    576-wide latent, a 64 x 128 lightning indexer with top-2048), weights N(0, 0.02) from `seed`, norms
    at one; the layer of `scripts/bench_layers.py --family dsa`."""
    from transformers import DeepseekV32Config
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32Attention, DeepseekV32RotaryEmbedding

    cfg = DeepseekV32Config(num_hidden_layers=1, n_routed_experts=8, max_position_embeddings=163840,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    attn = DeepseekV32Attention(cfg, layer_idx=0).to(device=device, dtype=dtype).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.02)
    for name, mod in attn.named_modules():
        if "norm" in name and hasattr(mod, "weight"):
            torch.nn.init.ones_(mod.weight)
    return attn, cfg, DeepseekV32RotaryEmbedding(cfg).to(device)
