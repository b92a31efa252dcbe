"""Gluon helpers of the Hopper kernels that loop over attention heads with one query tile per head
against one key tile held in shared memory (today `infllmv2_pooled_sm90`; a Gluon FP8 indexer scorer
used them too until it measured no faster than the Triton one): the heads'
query tiles stream through NUM_BUF shared buffers by cp.async, NUM_BUF - 2 heads ahead of the
product, and each head's product is issued asynchronously so that the previous head's epilogue runs
beside it (`warpgroup_mma_wait(1)` in the caller).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma

from .gluon_shims import async_load as _async_load
from .gluon_shims import cta_barrier as _cta_barrier

__all__ = ["load_head", "issue_head_product", "merge_tile"]


def merge_tile(defaults: dict, tile: dict | None) -> dict:
    """A kernel's tile options: `defaults` updated with `tile`, whose keys must be among the defaults'."""
    unknown = set(tile or {}) - set(defaults)
    if unknown:
        raise ValueError(f"unknown tile options {sorted(unknown)}; allowed: {sorted(defaults)}")
    return {**defaults, **(tile or {})}


@gluon.jit
def load_head(q_buf, Q, q_rows, d, head, N_HEADS: gl.constexpr, stride_qh):
    """cp.async head `head`'s query tile (Q + q_rows[:, None] + head * stride_qh + d[None, :], rows
    already clamped into range) into q_buf; nothing past the last head (the commit that follows
    keeps the group count)."""
    if head < N_HEADS:
        _async_load(q_buf, Q + q_rows[:, None] + head * stride_qh + d[None, :])


@gluon.jit
def issue_head_product(h, q_smem, k_t, zero, Q, q_rows, d, stride_qh, N_HEADS: gl.constexpr,
                       AHEAD: gl.constexpr, NUM_BUF: gl.constexpr):
    """Head h's query tile landed in every thread and every warp is past head h - 2's epilogue (its
    buffer is free): refill that buffer with head h + AHEAD and issue head h's product q_h k^T
    asynchronously (use_acc=False: `zero` only gives the result's layout). Returns the product in flight."""
    cp.wait_group(AHEAD - 1)
    fence_async_shared()
    _cta_barrier()
    load_head(q_smem.index((h + AHEAD) % NUM_BUF), Q, q_rows, d, h + AHEAD, N_HEADS, stride_qh)
    cp.commit_group()
    return warpgroup_mma(q_smem.index(h % NUM_BUF), k_t, zero, use_acc=False, is_async=True)
