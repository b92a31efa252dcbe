"""A tiny random-weight MiniCPM-4.1 (InfLLMv2) testbed for `stem-boost compare`.

The architecture of `stem_boost.models.minicpm4` (muP scalings, GQA, InfLLMv2 selection with two
compression levels, forced init block + local window) at toy width, with the sparse_config scaled
down so that a few thousand byte tokens are genuinely sparse: blocks of 32 tokens, 4 local blocks,
top-16 blocks. Random weights: task accuracy means nothing; budgets, achieved reduction, per-layer
attention error and next-token KL are real measurements of Stem on the native InfLLMv2 selection.
"""

from __future__ import annotations

import torch

SPARSE = dict(kernel_size=16, kernel_stride=8, init_blocks=1, block_size=32, window_size=128, topk=16,
              use_nope=False, dense_len=512)


def build_testbed(seed: int = 0, dtype: str = "float32", device: str = "cpu", **overrides):
    """Tiny MiniCPM-4.1: 4 layers, hidden 128, 8 query / 2 kv heads (d 16), byte tokenizer.
    `overrides` change the config (e.g. ``num_hidden_layers=2``); ``sparse_config`` merges into SPARSE."""
    from ..text.tokenizers import ByteTokenizer
    from ..models.minicpm4 import MiniCPM4Config, MiniCPM4ForCausalLM
    from . import Testbed

    sparse = dict(SPARSE)
    sparse.update(overrides.pop("sparse_config", {}) or {})
    kw = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=16384, scale_emb=12, dim_model_base=32,
              scale_depth=1.4, initializer_range=0.1, tie_word_embeddings=False, sparse_config=sparse)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = MiniCPM4ForCausalLM(MiniCPM4Config(**kw)).eval().to(device=device, dtype=getattr(torch, dtype))
    c = model.config
    desc = (f"tiny random-weight MiniCPM-4.1 (seed {seed}): {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
            f"{c.num_attention_heads} q / {c.num_key_value_heads} kv heads, InfLLMv2 block {sparse['block_size']}, "
            f"top-{sparse['topk']} + {sparse['window_size'] // sparse['block_size']} local blocks, byte tokenizer")
    return Testbed(model=model, tokenizer=ByteTokenizer(), name="tiny_minicpm4", description=desc,
                   random_weights=True, family="infllmv2")
