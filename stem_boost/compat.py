"""Where transformers' API moved inside the supported range (5.17 - 5.24), in one place.

- 5.24 renamed the KV cache argument of every forward from ``past_key_values`` to ``cache`` (its
  own models still accept the old name, ours are called with the new one): `cache_argument`
  accepts either. (The model outputs' ``past_key_values=`` / ``.past_key_values`` still work.)
- 5.24 keeps DeepSeek-V3.2 / GLM-MoE-DSA's MLA cache compressed (the normed latent and the rotary
  key, expanded after the update); 5.17 caches the expanded keys and values: `mla_keys_values`.
- 5.24 wraps the attention forwards in a deprecation decorator, so the names of a forward's
  parameters come from its signature, not its code object: `forward_parameters`.
Triton's interpreter differences are in `stem_boost.kernels._interpreter_compat`.
"""

from __future__ import annotations

import inspect

import torch

__all__ = ["LATENT_MLA_CACHE", "cache_argument", "forward_parameters", "mla_keys_values", "transformers_version"]


def transformers_version() -> tuple[int, int]:
    """(major, minor) of the installed transformers."""
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


LATENT_MLA_CACHE = transformers_version() >= (5, 24)  # MLA caches (latent, rotary key), not (keys, values)


def cache_argument(past_key_values, kwargs: dict):
    """The KV cache a forward was given, under either name; ``cache`` is taken out of ``kwargs``."""
    cache = kwargs.pop("cache", None)
    if past_key_values is not None and cache is not None and cache is not past_key_values:
        raise ValueError("both past_key_values= and cache= were given (transformers >= 5.24 calls it cache)")
    return past_key_values if past_key_values is not None else cache


def forward_parameters(cls: type) -> set[str]:
    """The parameter names of ``cls.forward`` (through decorators that keep ``__wrapped__``)."""
    return set(inspect.signature(cls.forward).parameters)


def mla_keys_values(module: torch.nn.Module, latent: torch.Tensor, k_rot: torch.Tensor,
                    cache) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of an MLA attention ``module`` over the whole sequence, updating ``cache`` the
    way the installed transformers does (so a native forward can continue from it): latent
    [B, 1, S, kv_lora_rank] and k_rot [B, 1, S, rope_dim] of the new tokens."""
    if cache is None:
        return module.expand_kv(latent, k_rot)
    if LATENT_MLA_CACHE:
        latent, k_rot = cache.update(latent, k_rot, module.layer_idx)
        return module.expand_kv(latent, k_rot)
    key_states, value_states = module.expand_kv(latent, k_rot)
    return cache.update(key_states, value_states, module.layer_idx)
