"""Geometry of InfLLMv2's key compression (MiniCPM-4.1): windows, their count, what a query sees.

Pure PyTorch, shared by the native selector (`stem_boost.native.infllmv2`) and the fused Triton
selection (`kernels.infllmv2_select`). The official model's names: ``CompressK``,
``calc_chunks_with_stride``, ``apply_mask_stage1``.
"""

from __future__ import annotations

import torch

__all__ = ["num_compressed", "compress_keys", "kernel_causal_offset", "visible_compressed", "group_budgets",
           "budget_window_rows", "grouped_chunk_rows", "groups_share_candidates"]


def num_compressed(n_keys: int, kernel_size: int, stride: int) -> int:
    """Number of complete compression windows (``calc_chunks_with_stride``)."""
    return 0 if n_keys < kernel_size else (n_keys - kernel_size) // stride + 1


def compress_keys(k: torch.Tensor, kernel_size: int, stride: int, *, max_windows_per_step: int = 4096) -> torch.Tensor:
    """Mean-pool keys over windows ``[c*stride, c*stride + kernel_size)`` (``CompressK``).

    Args:
        k: [B, H, T, D] keys.
    Returns:
        [B, H, Nc, D] in ``k.dtype`` (mean accumulated in fp32), ``Nc = num_compressed(T, ...)``.
    A kernel that is a multiple of the stride (MiniCPM-4.1: 32 / 16 and 128 / 64) reads k once:
    fp32 sums of stride-wide chunks, then r = kernel / stride of them per window (the same mean,
    summed in another order).
    """
    B, H, T, D = k.shape
    n = num_compressed(T, kernel_size, stride)
    if n > 0 and kernel_size % stride == 0:
        # a window is kernel_size / stride consecutive chunks of `stride` keys: sum each chunk once in
        # fp32 (one read of k, no [.., n, D, kernel] temporary), then add r shifted chunk sums
        r = kernel_size // stride
        chunks = k[:, :, : (n + r - 1) * stride].unflatten(2, (n + r - 1, stride)).sum(3, dtype=torch.float32)
        total = chunks[:, :, :n].clone()
        for j in range(1, r):
            total += chunks[:, :, j : j + n]
        return (total / kernel_size).to(k.dtype)
    out = k.new_empty(B, H, n, D)
    for c0 in range(0, n, max_windows_per_step):  # bounded fp32 temporaries
        c1 = min(n, c0 + max_windows_per_step)
        span = k[:, :, c0 * stride : (c1 - 1) * stride + kernel_size]
        out[:, :, c0:c1] = span.unfold(2, kernel_size, stride).float().mean(-1).to(k.dtype)
    return out


def _c_div(a: int, b: int) -> int:
    """C integer division (truncation toward zero), as in the CUDA kernel."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def kernel_causal_offset(n_queries: int, n_compressed: int, stride: int) -> int:
    """Offset term of ``apply_mask_stage1`` for a fresh prefill of ``n_queries`` tokens.

    The kernel lets row r see ``(r + 1) / s - 1 + Kc - (Lq - s + 1) / s`` compressed keys. For a
    fresh prefill (queries = keys = L tokens, windows of 2s) this is the exact causal count plus
    ``D = Kc - trunc((L - s + 1) / s)``, which is -1 when ``L % s == s - 1`` and 0 otherwise.
    """
    return n_compressed - _c_div(n_queries - stride + 1, stride)


def visible_compressed(q_pos: torch.Tensor, n_compressed: int, kernel_size: int, stride: int,
                       offset: int = 0) -> torch.Tensor:
    """Number of leading compressed keys visible to queries at absolute positions ``q_pos``.

    A window ``[c*s, c*s + kernel)`` is visible to position p when it ends at or before p, i.e.
    ``count = floor((p + 1 - kernel) / s) + 1``; ``offset`` adds the kernel's quirk term (see
    :func:`kernel_causal_offset`). Clamped to ``[0, n_compressed]``.
    """
    cnt = torch.div(q_pos + 1 - kernel_size, stride, rounding_mode="floor") + 1 + offset
    return cnt.clamp(0, n_compressed)


BUDGET_WINDOW_ROWS = 64  # rows over which `group_budgets` carries its rounding (a query block of MiniCPM-4.1)


def budget_window_rows(tile_rows: int) -> int:
    """Rows of one window of `group_budgets`: the whole groups of `tile_rows` rows that fit in
    BUDGET_WINDOW_ROWS (at least one). A selection's chunks hold whole windows, so the budgets do not
    depend on how the rows are chunked."""
    return max(1, BUDGET_WINDOW_ROWS // tile_rows) * tile_rows


def grouped_chunk_rows(chunk_size: int, tile_rows: int) -> int:
    """A selection's query-chunk size for groups of `tile_rows` rows (checked: an int >= 1): rounded up
    to whole windows of `group_budgets` (and so to whole groups); unchanged for 1."""
    if isinstance(tile_rows, bool) or not isinstance(tile_rows, int) or tile_rows < 1:
        raise ValueError(f"tile_rows={tile_rows!r}; allowed: an int >= 1 (query rows that rank blocks together)")
    if tile_rows == 1:
        return chunk_size
    window = budget_window_rows(tile_rows)
    return -(-chunk_size // window) * window


def group_budgets(k_free: torch.Tensor, tile_rows: int) -> torch.Tensor:
    """The non-forced budget of each group of ``tile_rows`` consecutive rows: the mean of its rows'
    budgets, rounded so that the rounding does not add up: within each window of
    `budget_window_rows(tile_rows)` rows (from row 0) the groups' budgets sum to the rounded sum of
    their means (each group's running total rounded half to even, minus the one before it). Every
    budget is within 1 of its group's mean; equal budgets, as TPD's within a query block, stay as
    they are. k_free [..., C] -> [..., ceil(C / tile_rows)] long."""
    C = k_free.shape[-1]
    n_groups = -(-C // tile_rows)
    x = k_free.double()
    pad = n_groups * tile_rows - C
    if pad:
        x = torch.cat([x, x.new_zeros(*x.shape[:-1], pad)], dim=-1)
    rows = (C - torch.arange(n_groups, device=x.device) * tile_rows).clamp(max=tile_rows)  # a last group's rows
    means = x.view(*x.shape[:-1], n_groups, tile_rows).sum(-1) / rows  # [..., n_groups]
    per_window = budget_window_rows(tile_rows) // tile_rows
    n_windows = -(-n_groups // per_window)
    means = torch.cat([means, means.new_zeros(*means.shape[:-1], n_windows * per_window - n_groups)], dim=-1)
    running = means.view(*means.shape[:-1], n_windows, per_window).cumsum(-1).round()
    budgets = torch.diff(running, dim=-1, prepend=running.new_zeros(*running.shape[:-1], 1))
    return budgets.reshape(*means.shape[:-1], n_windows * per_window)[..., :n_groups].long()


def groups_share_candidates(q_offset: int, block_size: int, tile_rows: int) -> bool:
    """True when every group of ``tile_rows`` consecutive query rows lies in one query block, so its
    rows have the same candidate and forced blocks and one list serves them all."""
    return block_size % tile_rows == 0 and q_offset % tile_rows == 0
