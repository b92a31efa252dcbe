"""Fidelity signals: how far a sparse mode's computation is from the dense (and native) one.

    ref = capture(model, ids)                  # in dense mode (see `dense_mode`)
    run = capture(model, ids)                  # in another mode, same ids
    layer_errors(run, ref)                     # per layer: ||O - O_ref|| / ||O_ref||
    kl_divergence(ref, run)                    # mean over positions of KL(p_ref || p_run)

- Attention output: forward hooks on every attention module (``model.model.layers[i].self_attn``)
  record its output (before ``o_proj``'s residual add, i.e. what the attention contributes). The
  modes run end to end, so layer L's error includes what earlier layers' errors did to its input:
  the compounding through depth that Stem's TPD is designed around.
- Next-token distributions: log-softmax of the logits, KL(p_ref || p_run) per position (nats).
- To bound memory at long context, `capture` keeps ``max_rows`` query positions (evenly spaced,
  the last one included) of the attention outputs and the log-probabilities, on the CPU in fp32.
- Dense for DSA: ``stem_boost.wrap(model, dense=True)`` for the duration of the block: every
  causal key through SDPA and no indexer at all (`dense_mode`), so the dense baseline fits at any
  length the attention itself fits.
  InfLLMv2 models with ``set_sparse_config`` (stem_boost.models.minicpm4): ``sparse_config=None``.
- Budgets per layer and per query position come from ``stem_boost.layer_stats`` (`budget_traces`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..api import is_wrapped, layer_stats, unwrap, wrap

__all__ = ["Capture", "attention_modules", "budget_traces", "capture", "dense_mode", "error_by_position",
           "kl_divergence", "layer_errors"]



def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention module of every decoder layer, in layer order."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no .model.layers to hook")
    mods = [getattr(layer, "self_attn", None) for layer in layers]
    if any(m is None for m in mods):
        raise ValueError(f"{type(model).__name__}: a decoder layer has no self_attn")
    return mods


@contextlib.contextmanager
def dense_mode(model: torch.nn.Module):
    """Run the native (unwrapped) model densely for the duration of the block (module docstring)."""
    if is_wrapped(model):
        raise ValueError("dense_mode needs the unwrapped model (stem_boost.unwrap it first)")
    indexers = [m for m in model.modules() if hasattr(m, "index_topk") and hasattr(m, "weights_proj")]
    if indexers:
        wrap(model, dense=True)
        try:
            yield "dsa: full causal attention, no indexer (stem_boost.wrap(dense=True))"
        finally:
            unwrap(model)
        return
    if hasattr(model, "set_sparse_config") and getattr(model.config, "sparse_config", None) is not None:
        saved = dict(model.config.sparse_config)
        try:
            model.set_sparse_config(None)
            model._dense_mode_sparse_config = saved  # what the model runs again afterwards (budget units)
            yield "infllmv2: sparse_config=None"
        finally:
            model.set_sparse_config(saved)
            model.__dict__.pop("_dense_mode_sparse_config", None)
        return
    raise NotImplementedError(f"dense mode is not implemented for {type(model).__name__}")


@dataclass
class Capture:
    rows: torch.Tensor  # [R] the query positions kept
    logprobs: torch.Tensor  # [R, V] fp32 log-softmax of the logits at those positions
    attn: list[torch.Tensor] = field(default_factory=list)  # per layer [R, hidden] fp32


def _rows(seq_len: int, max_rows: int | None) -> torch.Tensor:
    if max_rows is None or seq_len <= max_rows:
        return torch.arange(seq_len)
    return torch.linspace(0, seq_len - 1, max_rows).round().long().unique()


@torch.no_grad()
def capture(model: torch.nn.Module, ids: torch.Tensor, *, max_rows: int | None = 4096) -> Capture:
    """One prefill of ``ids`` [1, S] recording the attention outputs and next-token log-probs."""
    ids = ids.reshape(1, -1).to(model.device)
    rows = _rows(ids.shape[1], max_rows)
    rows_dev = rows.to(ids.device)
    outs: dict[int, torch.Tensor] = {}
    hooks = []
    for i, mod in enumerate(attention_modules(model)):
        def hook(_m, _args, output, i=i):
            o = output[0] if isinstance(output, tuple) else output
            outs[i] = o[0].index_select(0, rows_dev).float().cpu()
        hooks.append(mod.register_forward_hook(hook))
    try:
        logits = model(input_ids=ids, use_cache=False).logits[0]
    finally:
        for h in hooks:
            h.remove()
    logprobs = torch.log_softmax(logits.index_select(0, rows_dev).float(), dim=-1).cpu()
    return Capture(rows=rows, logprobs=logprobs, attn=[outs[i] for i in sorted(outs)])


def layer_errors(run: Capture, ref: Capture) -> list[float]:
    """Per layer: ||O_run - O_ref||_F / ||O_ref||_F over the captured positions."""
    return [float((o - r).norm() / r.norm().clamp(min=1e-30)) for o, r in zip(run.attn, ref.attn)]


def error_by_position(run: Capture, ref: Capture, n_bins: int = 16) -> dict:
    """Relative attention-output error (all layers pooled) in ``n_bins`` bins of query position."""
    num = torch.stack([(o - r).square().sum(-1) for o, r in zip(run.attn, ref.attn)]).sum(0)  # [R]
    den = torch.stack([r.square().sum(-1) for r in ref.attn]).sum(0)
    bins = torch.tensor_split(torch.arange(run.rows.numel()), min(n_bins, run.rows.numel()))
    return dict(position=[float(run.rows[b].float().mean()) for b in bins],
                rel_err=[float((num[b].sum() / den[b].sum().clamp(min=1e-30)).sqrt()) for b in bins])


def kl_divergence(ref: Capture, run: Capture) -> float:
    """Mean over positions of KL(p_ref || p_run), nats."""
    p = ref.logprobs.exp()
    return float((p * (ref.logprobs - run.logprobs)).sum(-1).mean())


def budget_traces(model: torch.nn.Module) -> dict:
    """Per-layer budget accounting of the wrapped model's last prefill, and its per-query-position
    budget traces averaged over layers: ``native`` (empty when the adapter records only the
    wrapped mode's) and ``stem`` (the keys the mode attends; the native budget in the identity
    mode). Positions assume the adapters' subsampling: every ``max(1, S // 512)``-th query."""
    stats = layer_stats(model)

    def mean_trace(attr: str) -> list[float]:
        lists = [getattr(s, attr) for s in stats if getattr(s, attr)]
        if not lists:
            return []
        n = min(len(x) for x in lists)
        return [sum(x[i] for x in lists) / len(lists) for i in range(n)]

    native, stem = mean_trace("budget_native"), mean_trace("budget_stem")
    seq_len = max((s.seq_len for s in stats), default=0)
    step = max(1, seq_len // 512)
    return dict(layers=[s.to_dict() for s in stats], positions=[i * step for i in range(max(len(native), len(stem)))],
                native=native, stem=stem)
