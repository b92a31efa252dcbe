"""Output-Aware Metric (OAM) (docs/design.md, "OAM").

A key whose value vector is near zero adds nothing to the output even with a large q.k, so Stem
ranks the native candidates by

    M_ij = s_ij + beta * bias_j,     bias_j = relu(z(log ||v_j||))   ("zscore", AngelSlim)
                                     bias_j = max(0, log ||v_j||)    ("raw", the paper)

where s_ij is the native selection score in logit space. Block-level selection max-pools the
token norms over each key block; a selection shared by several heads aggregates their norms
(root-mean-square by default).
"""

from __future__ import annotations

import numbers

import torch

__all__ = ["aggregate_heads", "block_max", "combine_scores", "oam_bias", "value_norms"]

_HEAD_AGGREGATES = ("rms", "max", "mean")
_BIAS_NORMS = ("zscore", "raw")
_SCORE_SPACES = ("logit", "prob")


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype OAM computes in for t: float32 for 16- and 32-bit floats, float64 for float64 (a
    float64 model, e.g. a test that needs a batch row to match its solo run beyond fp32 rounding,
    keeps its precision through the rescoring)."""
    return torch.promote_types(t.dtype, torch.float32)


def value_norms(v: torch.Tensor) -> torch.Tensor:
    """L2 norm of every value vector.

    Args:
        v: [B, T, H, Dv] value states (any float dtype).

    Returns:
        [B, H, T] norms in float32 (float64 for float64 values).
    """
    if v.dim() != 4:
        raise ValueError(f"v must be [B, T, H, Dv], got shape {tuple(v.shape)}")
    # fp32 accumulation for 16- and 32-bit values; fp64 values keep fp64
    norms = torch.linalg.vector_norm(v, dim=-1, dtype=work_dtype(v))  # [B, T, H]
    return norms.transpose(1, 2).contiguous()


def block_max(norms: torch.Tensor, block_size: int) -> torch.Tensor:
    """Max-pool token norms over key blocks (the paper's block value norm).

    Args:
        norms: [B, H, T].
        block_size: tokens per block, >= 1; the last block may be partial.

    Returns:
        [B, H, ceil(T / block_size)].
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} is outside [1, inf)")
    if norms.dim() != 3:
        raise ValueError(f"norms must be [B, H, T], got shape {tuple(norms.shape)}")
    b, h, t = norms.shape
    n_blocks = -(-t // block_size)
    pad = n_blocks * block_size - t
    if pad:
        norms = torch.nn.functional.pad(norms, (0, pad), value=float("-inf"))
    return norms.view(b, h, n_blocks, block_size).amax(dim=-1)


def aggregate_heads(norms: torch.Tensor, n_sel: int, how: str = "rms") -> torch.Tensor:
    """Aggregate per-head norms for selections shared by consecutive head groups.

    Args:
        norms: [B, H, N] per-head norms.
        n_sel: number of selection heads Hsel; head h belongs to group h // (H // n_sel).
        how: "rms" (root-mean-square, default), "max" or "mean".

    Returns:
        [B, n_sel, N] in float32 (float64 for float64 norms).
    """
    if norms.dim() != 3:
        raise ValueError(f"norms must be [B, H, N], got shape {tuple(norms.shape)}")
    b, h, n = norms.shape
    if isinstance(n_sel, bool) or not isinstance(n_sel, int) or not 1 <= n_sel <= h or h % n_sel:
        raise ValueError(f"n_sel={n_sel!r} must divide the number of heads H={h} (1 <= n_sel <= H)")
    if how not in _HEAD_AGGREGATES:
        raise ValueError(f"how={how!r} is not one of {_HEAD_AGGREGATES}")
    grouped = norms.to(work_dtype(norms)).view(b, n_sel, h // n_sel, n)
    if how == "rms":
        return grouped.square().mean(dim=2).sqrt()
    if how == "max":
        return grouped.amax(dim=2)
    return grouped.mean(dim=2)


def oam_bias(
    norms: torch.Tensor,
    *,
    beta: float = 0.2,
    norm: str = "zscore",
    valid: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-key OAM bias ``beta * relu(.)`` to add to native logit-space scores.

    Args:
        norms: [B, Hs, N] value norms (per selection head, per key token or block).
        beta: bias weight, >= 0 (0.2 in the paper; 0 disables OAM).
        norm: "zscore" (default): l = log(max(n, eps)), z = (l - mean) / (std + eps) with the mean
            and the population std taken over the valid positions of each (b, head);
            bias = beta * relu(z). "raw": bias = beta * max(0, log(max(n, eps))) (paper formula).
        valid: optional [B, N] bool, False for padding keys; they get bias 0 and are left out of
            the z-score statistics.
        eps: floor for the norms before the log and added to the std.

    Returns:
        [B, Hs, N] float32 (float64 for float64 norms), >= 0.

    Note: with "raw" a key's bias depends only on its own norm, so raising its norm never lowers
    its rank. With "zscore" that holds for keys at or above the mean log-norm; raising a key that
    sits far below the mean shrinks the std and can lift the other keys' z-scores.
    """
    if norms.dim() != 3:
        raise ValueError(f"norms must be [B, Hs, N], got shape {tuple(norms.shape)}")
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not beta >= 0:
        raise ValueError(f"beta={beta!r} is outside [0, inf)")
    if norm not in _BIAS_NORMS:
        raise ValueError(f"norm={norm!r} is not one of {_BIAS_NORMS}")
    b, _, n = norms.shape
    if valid is None:
        valid = torch.ones(b, n, dtype=torch.bool, device=norms.device)
    elif valid.shape != (b, n) or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor [B, N] = {(b, n)}, got {valid.dtype} {tuple(valid.shape)}")
    mask = valid[:, None, :]  # [B, 1, N]
    log_n = norms.to(work_dtype(norms)).clamp(min=eps).log()
    if norm == "raw":
        score = log_n
    else:
        weight = mask.to(log_n.dtype)
        count = weight.sum(dim=-1, keepdim=True).clamp(min=1.0)
        mean = (log_n * weight).sum(dim=-1, keepdim=True) / count
        var = ((log_n - mean).square() * weight).sum(dim=-1, keepdim=True) / count
        score = (log_n - mean) / (var.sqrt() + eps)
    bias = beta * score.clamp(min=0.0)
    return bias.masked_fill(~mask, 0.0)


def combine_scores(native: torch.Tensor, bias: torch.Tensor, space: str = "logit") -> torch.Tensor:
    """OAM score of native candidates: native score (in logit space) + bias.

    Args:
        native: native selection scores, any shape. "logit": logits (e.g. the DSA indexer score),
            -inf = masked. "prob": probability-like scores (e.g. InfLLMv2 softmax mass), <= 0 =
            masked; they are mapped to log(score) first, which keeps the native order.
        bias: broadcastable to ``native`` (e.g. `oam_bias` gathered at the candidates).
        space: "logit" or "prob".

    Returns:
        scores of the broadcast shape in float32 (float64 when either input is); masked native
        entries are -inf.
    """
    if space not in _SCORE_SPACES:
        raise ValueError(f"space={space!r} is not one of {_SCORE_SPACES}")
    dtype = torch.promote_types(work_dtype(native), work_dtype(bias))
    native = native.to(dtype)
    if space == "logit":
        logit, masked = native, native == float("-inf")
    else:
        logit = native.clamp(min=torch.finfo(dtype).tiny).log()
        masked = native <= 0
    return (logit + bias.to(dtype)).masked_fill(masked, float("-inf"))
