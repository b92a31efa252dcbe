"""Perplexity on long text: the negative log-likelihood of every predicted token.

    res = perplexity(model, ids, window=4096)              # one window (ids cut to 4096 tokens)
    res = perplexity(model, ids, window=4096, stride=2048) # sliding windows over all of ids
    res.nll          # [n] float32, NLL (nats) of each predicted token, in text order
    res.mean_nll, res.ppl
    windows, stride = plan_windows(ids, window=4096, stride=2048)   # the same, one prefill at a time
    res = combine([window_nll(model, w) for w in windows], window=4096, stride=stride)

Sliding windows follow the usual recipe (transformers' perplexity guide): each window of
``window`` tokens starts ``stride`` after the previous one, and only its tokens not scored by an
earlier window count, so every token after the first is scored exactly once, with up to
``window - stride`` tokens of context before it. The windows are separate prefills (no KV cache
between them), which is what a sparse prefill is measured on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class PerplexityResult:
    nll: torch.Tensor  # [n_tokens] float32, per predicted token
    n_windows: int
    window: int
    stride: int

    @property
    def n_tokens(self) -> int:
        return int(self.nll.numel())

    @property
    def mean_nll(self) -> float:
        return float(self.nll.double().mean()) if self.n_tokens else float("nan")

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll) if self.n_tokens else float("nan")

    def to_dict(self) -> dict:
        return dict(mean_nll=self.mean_nll, ppl=self.ppl, n_tokens=self.n_tokens, n_windows=self.n_windows,
                    window=self.window, stride=self.stride)


@torch.no_grad()
def token_nll(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """NLL of tokens 1..S-1 of ``ids`` [S] or [1, S] given their prefix: [S - 1] float32."""
    ids = ids.reshape(1, -1)
    logits = model(input_ids=ids.to(model.device), use_cache=False).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:].to(logits.device), reduction="none").cpu()


@dataclass(frozen=True)
class Window:
    """One prefill of a perplexity run: ``seq`` goes to the model, ``nll[offset:]`` of it counts."""

    seq: tuple[int, ...]
    offset: int


def plan_windows(ids, *, window: int, stride: int | None = None,
                 bos_id: int | None = None) -> tuple[list[Window], int]:
    """The prefills of `perplexity` and the stride it records: ``(windows, stride)``. Each window is
    independent of the others, so they can run in any order or on different processes."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).tolist()
    if window < 2:
        raise ValueError(f"window={window} must be >= 2")
    prefix = [] if bos_id is None else [int(bos_id)]
    body = window - len(prefix)
    if stride is None:  # scores ids[0:body] after a BOS, ids[1:body] without
        return [Window(seq=tuple(prefix + ids[:body]), offset=0)], body
    if not 1 <= stride <= body:
        raise ValueError(f"stride={stride} must be in [1, window - {len(prefix)}]")
    out, scored_to = [], 0 if prefix else 1  # tokens before scored_to are scored
    for start in range(0, max(1, len(ids) - 1), stride):
        end = min(start + body, len(ids))
        first_new = max(scored_to, start + (0 if prefix else 1))  # index in ids of the first unscored token
        out.append(Window(seq=tuple(prefix + ids[start:end]), offset=len(prefix) - 1 + (first_new - start)))
        scored_to = end
        if end >= len(ids):
            break
    return out, stride


def window_nll(model: torch.nn.Module, w: Window) -> torch.Tensor:
    """The NLL of the tokens ``w`` scores: [n] float32."""
    return token_nll(model, torch.tensor(w.seq, dtype=torch.long))[w.offset:]


def combine(parts: list[torch.Tensor], *, window: int, stride: int) -> PerplexityResult:
    """The result of the windows' NLLs ``parts`` (in window order)."""
    return PerplexityResult(nll=torch.cat(parts), n_windows=len(parts), window=window, stride=stride)


def perplexity(model: torch.nn.Module, ids, *, window: int, stride: int | None = None,
               bos_id: int | None = None) -> PerplexityResult:
    """Per-token NLL of ``ids`` (list or 1-D tensor of token ids).

    ``stride=None``: a single window, the first ``window`` tokens. Otherwise sliding windows
    (see the module docstring) over the whole sequence. ``bos_id`` is prepended to every window
    (it is context only, never scored).
    """
    windows, stride = plan_windows(ids, window=window, stride=stride, bos_id=bos_id)
    return combine([window_nll(model, w) for w in windows], window=window, stride=stride)
