"""Tiny random DSA models (DeepSeek-V3.2 and GLM-MoE-DSA): the CPU tests' models and the embedded
default testbed of ``stem-boost compare``.

The models are built from configs with random weights (fixed seed). ``save_and_reload`` writes
them with safetensors and loads them back through ``AutoModelForCausalLM.from_pretrained(folder)``:
the same loading path a user runs on the real checkpoint (so e.g. ``_keep_in_fp32_modules =
["indexer.weights_proj"]`` is honoured when a ``dtype`` is requested).

Random weights mean the model cannot read: task accuracy is ~0 in every mode. What the testbed
does show is real: the native lightning indexer's selection, Stem's budgets per query position,
the reduction achieved, the attention-output error per layer, and the next-token KL.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Shared shape parameters of the test models (tests/dsa_tiny.py re-exports them).
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=1.0,
    kv_lora_rank=32,
    q_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    index_n_heads=4,
    index_head_dim=16,
    index_topk=16,
    max_position_embeddings=512,
    # layer 0 dense MLP, layer 1 MoE: both MLP kinds are exercised.
    first_k_dense_replace=1,
    mlp_layer_types=["dense", "sparse"],
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
    # Larger than the HF default (0.02) so the random indexer scores are well spread (few near-ties).
    initializer_range=0.2,
)

# The report testbed: 4 layers (a per-layer error curve), a 64-token native budget and room for a
# few thousand byte tokens.
TESTBED = dict(
    num_hidden_layers=4,
    mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
    index_topk=64,
    max_position_embeddings=8192,
)


def _finish(config, attn_implementation: str):
    config._attn_implementation = attn_implementation
    return config


def deepseek_v32_config(attn_implementation: str = "sdpa", **overrides):
    from transformers import DeepseekV32Config

    kw = dict(TINY)
    kw.update(overrides)
    return _finish(DeepseekV32Config(**kw), attn_implementation)


def glm_moe_dsa_config(attn_implementation: str = "sdpa", indexer_types=None, **overrides):
    """GLM-MoE-DSA: `indexer_types` decides per layer whether it runs its own indexer ("full") or
    reuses the previous full layer's top-k ("shared"). Default: every layer runs an indexer."""
    from transformers import GlmMoeDsaConfig

    kw = dict(TINY)
    kw.update(overrides)
    kw["indexer_types"] = list(indexer_types) if indexer_types is not None else ["full"] * kw["num_hidden_layers"]
    return _finish(GlmMoeDsaConfig(**kw), attn_implementation)


def build_deepseek_v32(seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    from transformers import DeepseekV32ForCausalLM

    torch.manual_seed(seed)
    cfg = deepseek_v32_config(attn_implementation, **overrides)
    return DeepseekV32ForCausalLM(cfg).eval()


def build_glm_moe_dsa(seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    from transformers import GlmMoeDsaForCausalLM

    torch.manual_seed(seed)
    cfg = glm_moe_dsa_config(attn_implementation, **overrides)
    return GlmMoeDsaForCausalLM(cfg).eval()


BUILDERS = {
    "deepseek_v32": build_deepseek_v32,
    "glm_moe_dsa": build_glm_moe_dsa,
}


def save_and_reload(model, tmp_path, dtype=None, attn_implementation: str = "sdpa"):
    """Save ``model`` with safetensors into ``tmp_path/<model_type>`` and load it back with
    ``AutoModelForCausalLM.from_pretrained`` (the user's loading code). ``dtype`` (e.g.
    ``torch.bfloat16``) is passed to ``from_pretrained``."""
    from transformers import AutoModelForCausalLM

    folder = Path(tmp_path) / model.config.model_type
    model.save_pretrained(folder, safe_serialization=True)
    kwargs = {"attn_implementation": attn_implementation}
    if dtype is not None:
        kwargs["dtype"] = dtype
    reloaded = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    return reloaded.eval()


def indexers(model):
    """(layer_idx, indexer module) for every layer that runs its own indexer."""
    out = []
    for i, layer in enumerate(model.model.layers):
        idx = getattr(layer.self_attn, "indexer", None)
        if idx is not None:
            out.append((i, idx))
    return out


def build_testbed(family: str = "deepseek_v32", seed: int = 0, dtype: str = "float32", device: str = "cpu",
                  **overrides):
    """The embedded default of ``stem-boost compare``: a tiny random-weight DSA model with a byte
    tokenizer (vocabulary 256 = bytes). ``overrides`` change the model config (e.g.
    ``index_topk=32``, ``num_hidden_layers=2``)."""
    from . import Testbed
    from ..text.tokenizers import ByteTokenizer

    if family not in BUILDERS:
        raise ValueError(f"tiny_dsa: family={family!r}; allowed: {', '.join(BUILDERS)}")
    kw = dict(TESTBED)
    kw.update(overrides)
    if "num_hidden_layers" in overrides and "mlp_layer_types" not in overrides:
        n = int(kw["num_hidden_layers"])
        kw["mlp_layer_types"] = ["dense"] + ["sparse"] * (n - 1)
    model = BUILDERS[family](seed=seed, **kw).to(device=device, dtype=getattr(torch, dtype))
    c = model.config
    desc = (f"tiny random-weight {c.model_type} (seed {seed}): {c.num_hidden_layers} layers, hidden "
            f"{c.hidden_size}, {c.num_attention_heads} MLA heads, lightning indexer {c.index_n_heads} heads x "
            f"{c.index_head_dim}, index_topk {c.index_topk}, byte tokenizer")
    return Testbed(model=model, tokenizer=ByteTokenizer(), name="tiny_dsa", description=desc,
                   random_weights=True, family="dsa")
