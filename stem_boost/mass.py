"""Mass-aware budgets (``StemConfig(schedule="mass")``): spend the `reduce` cut where the native
scores predict the least attention mass, instead of by query position (TPD) or evenly (uniform).

Both native selectors are trained or built to predict the attention distribution: DeepSeek-V3.2's
lightning indexer is distilled with a KL loss towards it (so a row's softmax over the indexer
logits estimates the attention probabilities), and InfLLMv2's block scores are softmax masses
summed over the GQA group. Dropping the candidate pairs with the lowest estimated probability,
across all rows at once, removes the least mass for a given number of pairs; rows whose
distribution is flat (many small probabilities, typically late queries with long contexts — the
case TPD encodes as a prior) lose more, peaked rows lose little.
"""

from __future__ import annotations

import math

import torch


def mass_budgets(scores: torch.Tensor, valid: torch.Tensor, reduce: float, *, space: str = "logit") -> torch.LongTensor:
    """Per-row budgets that remove the `reduce` fraction of all valid candidates with the lowest
    estimated attention probability.

    scores [..., K] native scores of the candidates (space "logit": softmax over the row's valid
    candidates; "prob": non-negative masses, normalised by the row sum); valid [..., K] bool.
    Returns budgets [...] (long): valid candidates per row minus the removed ones, at least 1 where
    the row has any. One threshold on log-probability for the whole tensor (a k-th value, two
    host syncs); pairs tied at the threshold are taken from the last rows first,
    so that exactly floor(reduce * n_valid) pairs go (fewer only where the floor of 1 per row binds).
    """
    if not 0.0 <= reduce < 1.0:
        raise ValueError(f"reduce={reduce!r} must lie in [0, 1)")
    if space not in ("logit", "prob"):
        raise ValueError(f"space={space!r}; allowed: logit, prob")
    s = scores.float()
    if space == "logit":
        logp = torch.log_softmax(s.masked_fill(~valid, float("-inf")), dim=-1)
    else:
        m = s.clamp_min(0).masked_fill(~valid, 0.0)
        logp = torch.log(m) - torch.log(m.sum(-1, keepdim=True).clamp_min(1e-30))
    logp = torch.nan_to_num(logp, nan=float("inf")).masked_fill(~valid, float("inf"))  # invalid: never removed
    n_row = valid.sum(-1)
    target = math.floor(reduce * int(n_row.sum()))
    if target == 0:
        return n_row.long()
    vals = logp[valid]
    # the target-th lowest log-probability: a full sort on CUDA (torch.kthvalue runs one thread block
    # per slice there, slow for one slice of millions), quickselect on the CPU
    tau = vals.sort().values[target - 1] if vals.is_cuda else torch.kthvalue(vals, target).values
    removed = logp < tau
    need = target - int(removed.sum())
    if need > 0:  # pairs tied at the threshold (e.g. relu-zero indexer scores): the last rows give them up
        band = (logp == tau).flatten()
        from_end = band.flip(0).cumsum(0).flip(0)
        removed = removed | (band & (from_end <= need)).view_as(removed)
    budgets = n_row - removed.sum(-1)
    return torch.maximum(budgets, n_row.clamp(max=1)).long()
