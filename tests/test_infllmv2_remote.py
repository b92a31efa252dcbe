"""stem_boost.wrap on MiniCPM-4.1 attention modules of the remote-code kind (trust_remote_code),
duck-typed: against the native class with the same weights (tests/remote_minicpm.py is the
stand-in for OpenBMB's modeling_minicpm.py)."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache

import stem_boost
from stem_boost.testbeds.tiny_minicpm4 import build_testbed

from .remote_minicpm import RemoteMiniCPMForCausalLM


@pytest.fixture()
def pair():
    native = build_testbed(seed=int(torch.randint(0, 10_000, (1,))), num_hidden_layers=2).model
    remote = RemoteMiniCPMForCausalLM(native.config).eval()
    missing, unexpected = remote.load_state_dict(native.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if native.config.tie_word_embeddings:
        remote.lm_head.weight = remote.model.embed_tokens.weight
    return native, remote


def test_stand_in_matches_the_native_model_below_dense_len(pair):
    native, remote = pair
    ids = torch.randint(0, 256, (1, native.config.sparse_config["dense_len"] - 10))
    with torch.no_grad():
        torch.testing.assert_close(remote(ids), native(ids).logits, rtol=1e-4, atol=1e-4)


def test_wrap_runs_native_infllmv2_and_stem_on_remote_modules(pair):
    native, remote = pair
    ids = torch.randint(0, 256, (1, 1024))
    with torch.no_grad(), pytest.raises(ImportError, match="infllm_v2"):
        remote(ids)  # unwrapped: the sparse path needs OpenBMB's CUDA package
    with torch.no_grad():
        want_native = native(ids).logits
        stem_boost.wrap(remote, reduce=0.0, beta=0.0)
        torch.testing.assert_close(remote(ids), want_native, rtol=1e-4, atol=1e-4)
        stem_boost.unwrap(remote)
        stem_boost.wrap(native, reduce=0.18)
        want_stem = native(ids).logits
        want_stats = stem_boost.stats(native)
        stem_boost.unwrap(native)
        stem_boost.wrap(remote, reduce=0.18)
        got_stem = remote(ids)
        got_stats = stem_boost.stats(remote)
    torch.testing.assert_close(got_stem, want_stem, rtol=1e-4, atol=1e-4)
    assert got_stats["stem_pairs"] == want_stats["stem_pairs"] and got_stats["family"] == "infllmv2"
    assert abs(got_stats["reduce_achieved"] - 0.18) < 0.01
    stem_boost.unwrap(remote)
    attn = remote.model.layers[0].self_attn
    assert not any(a in attn.__dict__ for a in ("rescore", "forward", "infllmv2", "_stem"))
    with torch.no_grad(), pytest.raises(ImportError):
        remote(ids)  # the original module is back


def test_prefill_and_decode_with_the_remote_cache_calling_convention(pair):
    native, remote = pair
    ids = torch.randint(0, 256, (1, 700))
    stem_boost.wrap(remote, reduce=0.18)
    stem_boost.wrap(native, reduce=0.18)
    with torch.no_grad():
        c_remote, c_native = DynamicCache(), DynamicCache()
        remote(ids[:, :-1], past_key_values=c_remote)
        native(ids[:, :-1], past_key_values=c_native, use_cache=True)
        got = remote(ids[:, -1:], past_key_values=c_remote)
        want = native(ids[:, -1:], past_key_values=c_native, use_cache=True).logits
    stem_boost.unwrap(remote)
    stem_boost.unwrap(native)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
