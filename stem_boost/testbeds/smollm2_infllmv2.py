"""SmolLM2-135M with InfLLMv2 sparse attention, training-free: the same weights in the native
MiniCPM-4.1 class (`stem_boost.models.minicpm4`), so the real MiniCPM code path selects its blocks.

    from stem_boost.testbeds.smollm2_infllmv2 import load_smollm2_infllmv2
    model, tok = load_smollm2_infllmv2()              # MiniCPM4ForCausalLM, InfLLMv2 on from 1K tokens
    model = stem_boost.wrap(model, reduce=0.18)       # Stem through stem_boost.adapters.infllmv2

Why: InfLLMv2 adds no parameters (its key compression is mean pooling, its scores are q . k of
the model's own heads), so any GQA model can run it without training. MiniCPM-4's architecture is
Llama's plus three muP scalings; with ``scale_emb = 1``, ``scale_depth = sqrt(num_layers)`` (residual
branches x 1) and ``dim_model_base = hidden_size`` (logits / 1) it *is* Llama, and SmolLM2's
state dict loads into it key for key (:func:`minicpm4_from_llama`; tested equal to the Llama model
when sparse attention is off).

The sparse_config (``SPARSE``) keeps MiniCPM-4.1's key compression (kernel 32, stride 16, blocks of
64, one forced init block) and scales its budget down to SmolLM2's 8K context. MiniCPM-4.1 attends
``topk + window / block`` = 64 + 32 = 96 blocks (6,144 keys, ~1/5 of 32K); here 12 + 4 = 16 blocks
(1,024 keys: 1/8 of 8K, 1/4 of 4K, 1/2 of 2K), with the local window a quarter of the budget, and
sparse attention from 1,024 tokens on (MiniCPM-4.1: dense below 8,192) so that 2K-8K prompts are
genuinely sparse.
"""

from __future__ import annotations

import math

import torch

from .smollm2_gguf import load_smollm2

SPARSE = dict(kernel_size=32, kernel_stride=16, init_blocks=1, block_size=64, window_size=256, topk=12,
              use_nope=False, dense_len=1024)

__all__ = ["SPARSE", "minicpm4_from_llama", "load_smollm2_infllmv2", "build_testbed"]


def minicpm4_from_llama(llama: torch.nn.Module, sparse_config: dict | None = None):
    """A ``MiniCPM4ForCausalLM`` with the weights of a transformers ``LlamaForCausalLM`` (muP scalings
    set to the identity), InfLLMv2 configured by ``sparse_config`` (``None``: dense attention).

    Raises ValueError for Llama variants the MiniCPM-4 architecture cannot express (biases, a RoPE
    scaling other than the default, another activation), naming the field.
    """
    from ..models.minicpm4 import MiniCPM4Config, MiniCPM4ForCausalLM

    c = llama.config
    if getattr(c, "model_type", None) != "llama":
        raise ValueError(f"minicpm4_from_llama needs a Llama model, got model_type={getattr(c, 'model_type', None)!r}")
    rope = getattr(c, "rope_parameters", None) or {"rope_type": "default", "rope_theta": getattr(c, "rope_theta", 1e4)}
    checks = {"attention_bias": (getattr(c, "attention_bias", False), False),
              "mlp_bias": (getattr(c, "mlp_bias", False), False), "hidden_act": (c.hidden_act, "silu"),
              "rope_type": (rope.get("rope_type", "default"), "default"),
              "pretraining_tp": (getattr(c, "pretraining_tp", 1), 1)}
    for name, (got, allowed) in checks.items():
        if got != allowed:
            raise ValueError(f"minicpm4_from_llama: {name}={got!r} is not supported (allowed: {allowed!r})")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    cfg = MiniCPM4Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=head_dim, hidden_act="silu",
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_theta=float(rope["rope_theta"]), tie_word_embeddings=bool(c.tie_word_embeddings),
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        scale_emb=1.0, dim_model_base=float(c.hidden_size), scale_depth=math.sqrt(c.num_hidden_layers),
        sparse_config=None if sparse_config is None else dict(sparse_config),
    )
    p = next(llama.parameters())
    model = MiniCPM4ForCausalLM(cfg)
    state = llama.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"Llama -> MiniCPM4 weights do not line up: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device=p.device, dtype=p.dtype).eval()


def load_smollm2_infllmv2(sparse_config: dict | None = None, dtype: torch.dtype = torch.float32,
                          device: str | torch.device = "cpu"):
    """(model, tokenizer): SmolLM2-135M-Instruct as a ``MiniCPM4ForCausalLM`` with InfLLMv2 on.
    ``sparse_config`` entries override ``SPARSE`` (pass ``{"topk": 32}`` for a larger budget)."""
    sparse = dict(SPARSE)
    sparse.update(sparse_config or {})
    llama, tok = load_smollm2(dtype=dtype, device=device)
    return minicpm4_from_llama(llama, sparse), tok


def build_testbed(dtype: str = "float32", device: str = "cpu", sparse_config: dict | None = None, **unknown):
    """`stem_boost.testbeds` entry point (config: ``testbed: smollm2_infllmv2``)."""
    if unknown:
        raise ValueError(f"smollm2_infllmv2 testbed: unknown options {sorted(unknown)}; allowed: dtype, device, "
                         f"sparse_config")
    from ..text.tokenizers import HFTokenizer
    from . import Testbed

    model, tok = load_smollm2_infllmv2(sparse_config, dtype=getattr(torch, dtype), device=device)
    s = model.config.sparse_config
    desc = (f"SmolLM2-135M-Instruct (real weights, GGUF Q4_1) in the native MiniCPM-4.1 class, training-free "
            f"InfLLMv2: blocks of {s['block_size']}, top-{s['topk']} blocks incl. {s['init_blocks']} init + "
            f"{s['window_size']}-token window, sparse from {s['dense_len']} tokens")
    tokenizer = HFTokenizer(tok)
    tokenizer.bos_id = None  # SmolLM2 adds no BOS (its "bos" is <|im_start|>)
    return Testbed(model=model, tokenizer=tokenizer, name="smollm2_infllmv2", description=desc,
                   random_weights=False, family="infllmv2")
