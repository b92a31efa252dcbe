"""`wrap`, `unwrap`, `stats`: the user-facing entry points.

    model = stem_boost.wrap(model, reduce=0.15)    # patch a loaded DSA / InfLLMv2 model in place
    model(input_ids)                               # prefill attends to 15% fewer (query, key) pairs
    stem_boost.stats(model)                        # per-layer native vs Stem pairs of the last forward
    stem_boost.unwrap(model)                       # exactly the native model again

Families are detected by structure, not class name: an MLA attention owning a lightning indexer
(`index_topk`, `wq_b`, `wk`, `weights_proj`) is DSA; an attention with an InfLLMv2 `sparse_config`
and q/k/v/o projections is InfLLMv2.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch

from .adapters import dsa, dsa_gqa
from .compat import forward_parameters
from .config import StemConfig
from .selection import Selection
from .stats import LayerStats, summarize

ATTN_IMPLEMENTATION = "stem_sparse"
SUPPORTED = (
    "DSA: DeepSeek-V3.2 (deepseek_v32), GLM-MoE-DSA (glm_moe_dsa) and other transformers models whose "
    "attention owns a lightning indexer (index_topk, wq_b, wk, weights_proj), MLA or GQA; "
    "InfLLMv2: MiniCPM-4 / MiniCPM-4.1 (stem_boost.models.minicpm4, or remote code with sparse_config)"
)


@dataclass
class _WrapInfo:
    family: str
    cfg: StemConfig
    modules: list[torch.nn.Module]
    original_attn: str | None


NOT_KEPT = ("{what}: the model was wrapped without keep_selections=True, so no selection is kept "
            "(stem_boost.wrap(model, ..., keep_selections=True) keeps the last prefill's, one index tensor per layer)")


def _register_attention() -> None:
    """Register the implementation name and a mask function that yields at most a [B, T] padding
    mask (never a dense [B, 1, S, T] one): the wrapped forwards handle causality themselves."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    def _not_called(*args, **kwargs):  # the wrapped forwards never dispatch through the interface
        raise RuntimeError(f"'{ATTN_IMPLEMENTATION}' is only valid on a model wrapped by stem_boost.wrap")

    if ATTN_IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_IMPLEMENTATION, _not_called)
    if ATTN_IMPLEMENTATION not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, flash_attention_mask)


def detect_family(model: torch.nn.Module) -> tuple[str, list[torch.nn.Module]]:
    from .adapters import infllmv2

    dsa_mods = [m for m in model.modules() if dsa.is_dsa_attention(m) or dsa_gqa.is_dsa_gqa_attention(m)]
    if dsa_mods:
        return "dsa", dsa_mods
    inf_mods = [m for m in model.modules() if infllmv2.is_infllmv2_attention(m)]
    if inf_mods:
        return "infllmv2", inf_mods
    raise ValueError(f"{type(model).__name__} has no supported sparse-attention layer. Supported: {SUPPORTED}")


def _set_attn(model: torch.nn.Module, name: str | None) -> None:
    model.config._attn_implementation = name


def wrap(
    model: torch.nn.Module,
    reduce: float = 0.15,
    *,
    beta: float = 0.2,
    oam_norm: str = "zscore",
    head_agg: str = "rms",
    alpha_min: float = 0.0,
    backend: str = "auto",
    indexer_dtype: str = "auto",
    indexer_max_bytes: int = 2 * 2**30,
    schedule: str = "tpd",
    layer_reduce=None,
    dense: bool = False,
    keep_selections: bool = False,
    budget_step: int | None = None,
    tile_tokens: int | str = "auto",
) -> torch.nn.Module:
    """Patch `model` in place so its sparse prefill runs Stem; returns the same model.

    Wrapping a wrapped model re-configures it (never patches twice).
    See `StemConfig` for the arguments; `layer_reduce` (one fraction per sparse layer, mean
    `reduce`) usually comes from `stem_boost.calibrate`; `dense=True` gives the dense baseline
    (every causal key, no selector); `keep_selections=True` keeps the last prefill's selections for
    `last_selections` (memory: one index tensor per layer).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"wrap expects a torch.nn.Module (a loaded transformers model); got {type(model).__name__}")
    cfg = StemConfig(reduce=reduce, beta=beta, oam_norm=oam_norm, head_agg=head_agg, alpha_min=alpha_min,
                     backend=backend, indexer_dtype=indexer_dtype, indexer_max_bytes=indexer_max_bytes,
                     schedule=schedule, layer_reduce=layer_reduce, dense=dense, keep_selections=keep_selections,
                     budget_step=budget_step, tile_tokens=tile_tokens)
    info: _WrapInfo | None = getattr(model, "_stem_wrap", None)
    if info is not None:  # re-configuration
        layer_cfgs = cfg.per_layer(len(info.modules))
        info.cfg = cfg
        for m, c in zip(info.modules, layer_cfgs):
            m._stem.cfg = c  # in place: the installed hooks hold this state object
        return model
    family, modules = detect_family(model)
    layer_cfgs = cfg.per_layer(len(modules))  # validates the length before anything is patched
    if family == "dsa":
        _register_attention()
        original = model.config._attn_implementation
        shared = dsa.SharedTopK(needed=any(getattr(m, "indexer", None) is None for m in modules))
        for m, layer_cfg in zip(modules, layer_cfgs):
            layer = getattr(m, "layer_idx", len([x for x in modules if x is not m]))
            returns_topk = "prev_topk_indices" in forward_parameters(type(m))
            index_topk = (m.indexer.index_topk if m.indexer is not None else m.config.index_topk)
            m._stem = dsa.DSAState(cfg=layer_cfg, stats=LayerStats(layer=int(layer), family="dsa"), shared=shared,
                                   returns_topk=returns_topk, index_topk=int(index_topk))
            gqa = dsa_gqa.is_dsa_gqa_attention(m)  # an indexer on a GQA attention (SmolLM2 testbed)
            m.forward = types.MethodType(dsa_gqa.stem_dsa_gqa_forward if gqa else dsa.stem_dsa_forward, m)
        _set_attn(model, ATTN_IMPLEMENTATION)
    else:
        from .adapters import infllmv2

        original = None
        infllmv2.wrap_modules(modules, layer_cfgs)
    model._stem_wrap = _WrapInfo(family=family, cfg=cfg, modules=modules, original_attn=original)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the native forwards and attention implementation; returns the same model."""
    info: _WrapInfo | None = getattr(model, "_stem_wrap", None)
    if info is None:
        raise ValueError("unwrap: this model is not wrapped by stem_boost.wrap")
    if info.family == "dsa":
        for m in info.modules:
            m.__dict__.pop("forward", None)
            m.__dict__.pop("_stem", None)
        _set_attn(model, info.original_attn)
    else:
        from .adapters import infllmv2

        infllmv2.unwrap_modules(info.modules)
    del model._stem_wrap
    return model


def is_wrapped(model: torch.nn.Module) -> bool:
    return getattr(model, "_stem_wrap", None) is not None


def stats(model: torch.nn.Module) -> dict:
    """Budget accounting of the last prefill: per layer native / Stem pairs and the achieved
    reduction, plus totals (`native_pairs`, `stem_pairs`, `reduce_achieved`)."""
    info: _WrapInfo | None = getattr(model, "_stem_wrap", None)
    if info is None:
        raise ValueError("stats: this model is not wrapped by stem_boost.wrap")
    out = summarize([m._stem.stats for m in info.modules])
    out.update(family=info.family, config=info.cfg.to_dict())
    return out


def last_selections(model: torch.nn.Module) -> list[Selection | None]:
    """The Selection each sparse layer attended with in the last prefill (None before the first),
    in model order: for checks and analysis (e.g. comparing two runs row by row)."""
    info: _WrapInfo | None = getattr(model, "_stem_wrap", None)
    if info is None:
        raise ValueError("last_selections: this model is not wrapped by stem_boost.wrap")
    if not info.cfg.keep_selections:
        raise ValueError(NOT_KEPT.format(what="last_selections"))
    out = []
    for m in info.modules:
        st = m._stem
        if info.family == "dsa":
            out.append(st.last_stem)
        else:
            out.append(None if st.last_selection is None else st.last_selection.to_selection())
    return out


def layer_stats(model: torch.nn.Module) -> list[LayerStats]:
    """The LayerStats objects themselves (with the per-position budget traces), for reports."""
    info: _WrapInfo | None = getattr(model, "_stem_wrap", None)
    if info is None:
        raise ValueError("layer_stats: this model is not wrapped by stem_boost.wrap")
    return [m._stem.stats for m in info.modules]
