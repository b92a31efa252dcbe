"""stem_boost.compat: the shims over transformers' API changes within the supported range."""

from __future__ import annotations

import functools
import random

import pytest
import torch

from stem_boost.compat import cache_argument, forward_parameters, transformers_version


def test_cache_argument_takes_either_name():
    seed = random.randrange(10**6)
    print(f"seed {seed}")
    cache = object()
    kwargs = {"cache": cache, "other": seed}
    assert cache_argument(None, kwargs) is cache and kwargs == {"other": seed}  # taken out of kwargs
    kwargs = {"other": seed}
    assert cache_argument(cache, kwargs) is cache and kwargs == {"other": seed}
    assert cache_argument(cache, {"cache": cache}) is cache
    assert cache_argument(None, {}) is None
    with pytest.raises(ValueError, match="both past_key_values= and cache= were given"):
        cache_argument(cache, {"cache": object()})


def test_forward_parameters_see_through_decorators():
    def deprecate(fn):  # like transformers' deprecate_kwarg: functools.wraps keeps __wrapped__
        @functools.wraps(fn)
        def wrapper(*a, **k):
            return fn(*a, **k)
        return wrapper

    class Attention(torch.nn.Module):
        @deprecate
        def forward(self, hidden_states, cache=None, prev_topk_indices=None, **kwargs):
            return hidden_states

    assert {"hidden_states", "cache", "prev_topk_indices"} <= forward_parameters(Attention)
    assert "prev_topk_indices" not in Attention.forward.__code__.co_varnames  # why the code object is not enough


def test_installed_transformers_is_in_the_supported_range():
    assert (5, 17) <= transformers_version() <= (5, 24)
