"""Benchmark inputs shared by the scripts: hidden states whose neighbouring positions agree as much
as neighbouring tokens of real text do."""

from __future__ import annotations

import torch

__all__ = ["smooth_hidden_states"]


def smooth_hidden_states(S: int, width: int, window: int, device, dtype=torch.bfloat16) -> torch.Tensor:
    """[1, S, width] hidden states, N(0, 1) at every position. window <= 1: i.i.d. across positions
    (random weights then give near-independent block lists for neighbouring tokens, the worst case for
    union tiles). window W > 1: each position is the normalised sum of W consecutive i.i.d. draws, so
    neighbours share W - 1 of them, as neighbouring tokens of real text share most of their context."""
    if window <= 1:
        return torch.randn(1, S, width, device=device, dtype=dtype)
    e = torch.randn(1, S + window, width, device=device, dtype=torch.float32)
    c = torch.cumsum(e, dim=1)
    return ((c[:, window:] - c[:, :-window]) / window ** 0.5).to(dtype)
