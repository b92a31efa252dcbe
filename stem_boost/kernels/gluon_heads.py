"""Gluon helpers of the Hopper kernels that loop over attention heads with one query tile per head
against one key tile held in shared memory (`infllmv2_pooled_sm90`, `indexer_scores_sm90`): the heads'
query tiles stream through NUM_BUF shared buffers by cp.async, NUM_BUF - 2 heads ahead of the
product, and each head's product is issued asynchronously so that the previous head's epilogue runs
beside it (`head_sums`).

Where the waits go decides whether that overlap exists at all (read in the sm_90 SASS of
`stem-boost build --dump`, compiled by the ptxas Triton ships):
- a run-time head loop that leaves the next head's product running across its back edge (the wait
  for one product before each epilogue): ptxas serialises every wgmma of the kernel (note C7514, "non
  wgmma instructions reading accumulator registers ... between start and end of the pipeline stage"):
  a wait after each k-step, the epilogue squeezed between them;
- each product retired by a full wait right after the previous head's epilogue (nothing in flight at
  the back edge): no note, but ptxas is then free to schedule the epilogue before the next product's
  issue, and does for the FP8 scorer's ReLU-weighted sums (about 56 of 64 a head land before it);
- the heads written out STEP at a time inside a run-time loop (`head_sums(STEP=...)`), each epilogue
  after a wait that leaves the next product running and only the trip's last head waiting alone: no
  note, and the epilogue cannot move above the next issue, as it needs the wait that follows it.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from .gluon_shims import async_load as _async_load
from .gluon_shims import cta_barrier as _cta_barrier

__all__ = ["load_head", "issue_head_product", "head_sums", "head_trips", "merge_tile"]


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


def head_trips(n_heads: int, step: int) -> int:
    """The run-time trip count `head_sums` takes for n_heads heads at this STEP (0, or >= 2)."""
    if step != 0 and step < 2:
        raise ValueError(f"STEP={step}; allowed: 0 (pairs of heads, the serialised schedule) or >= 2 heads a trip")
    return (n_heads - 1) // 2 if step == 0 else n_heads // step


@gluon.jit
def head_sums(acc, q_smem, k_t, zero, Q, q_rows, d, stride_qh, v_row, stride_vh, v_ok, v_other, c, n_trips,
              SUM: gl.constexpr, N_HEADS: gl.constexpr, AHEAD: gl.constexpr, NUM_BUF: gl.constexpr,
              STEP: gl.constexpr):
    """acc + sum over the N_HEADS heads h of SUM(acc, q_h k^T, v_h, c), each head's product issued before
    the previous head's SUM, which waits for its own product only (`warpgroup_mma_wait(1)`): the SUM runs
    while the next product is on the tensor cores. v_h = v_row + h * stride_vh, loaded where v_ok (v_other
    elsewhere): the per-row value a head's epilogue takes (a log-sum-exp, a weight). SUM(acc, qk, v, c) ->
    acc: the epilogue, a `@gluon.jit` function.

    n_trips: `head_trips(N_HEADS, STEP)`, a run-time value (a constant one-trip loop fails to lower on
    Triton 3.6). STEP >= 2: n_trips = N_HEADS // STEP trips of STEP heads written out (the last head of a
    trip waits for its product alone: nothing in flight at the back edge), then the N_HEADS % STEP left.
    STEP 0: n_trips = (N_HEADS - 1) // 2 trips over pairs of heads, the next product left running
    across the back edge (two product tiles alternate in the registers), the schedule ptxas serialises
    (see the module's note), kept to be measured against."""
    if STEP == 0:
        qk_a, v_a = _issue_head(0, q_smem, k_t, zero, Q, q_rows, d, stride_qh, v_row, stride_vh, v_ok, v_other,
                                N_HEADS, AHEAD, NUM_BUF)
        for i in range(n_trips):
            qk_b, v_b = _issue_head(2 * i + 1, q_smem, k_t, zero, Q, q_rows, d, stride_qh, v_row, stride_vh, v_ok,
                                    v_other, N_HEADS, AHEAD, NUM_BUF)
            acc = _head_sum(acc, qk_a, v_a, c, SUM, 1)
            qk_a, v_a = _issue_head(2 * i + 2, q_smem, k_t, zero, Q, q_rows, d, stride_qh, v_row, stride_vh, v_ok,
                                    v_other, N_HEADS, AHEAD, NUM_BUF)
            acc = _head_sum(acc, qk_b, v_b, c, SUM, 1)
        if N_HEADS % 2 == 0:  # the last head, an odd one, goes through b
            qk_b, v_b = _issue_head(N_HEADS - 1, q_smem, k_t, zero, Q, q_rows, d, stride_qh, v_row, stride_vh, v_ok,
                                    v_other, N_HEADS, AHEAD, NUM_BUF)
            acc = _head_sum(acc, qk_a, v_a, c, SUM, 1)
            acc = _head_sum(acc, qk_b, v_b, c, SUM, 0)
        else:
            acc = _head_sum(acc, qk_a, v_a, c, SUM, 0)
    else:
        for t in range(n_trips):
            acc = _chained_heads(acc, t * STEP, q_smem, k_t, zero, Q, q_rows, d, stride_qh, v_row, stride_vh, v_ok,
                                 v_other, c, SUM, STEP, N_HEADS, AHEAD, NUM_BUF)
        if N_HEADS % STEP:
            acc = _chained_heads(acc, N_HEADS - N_HEADS % STEP, q_smem, k_t, zero, Q, q_rows, d, stride_qh, v_row,
                                 stride_vh, v_ok, v_other, c, SUM, N_HEADS % STEP, N_HEADS, AHEAD, NUM_BUF)
    return acc


@gluon.jit
def _chained_heads(acc, h0, q_smem, k_t, zero, Q, q_rows, d, stride_qh, v_row, stride_vh, v_ok, v_other, c,
                   SUM: gl.constexpr, COUNT: gl.constexpr, N_HEADS: gl.constexpr, AHEAD: gl.constexpr,
                   NUM_BUF: gl.constexpr):
    """Heads h0 .. h0 + COUNT - 1 written out: each head's product issued, then the previous head's SUM
    after a wait that leaves the new product running; the last SUM waits for everything."""
    prev, v_prev = _issue_head(h0, q_smem, k_t, zero, Q, q_rows, d, stride_qh, v_row, stride_vh, v_ok, v_other,
                               N_HEADS, AHEAD, NUM_BUF)
    for j in gl.static_range(1, COUNT):
        cur, v_cur = _issue_head(h0 + j, q_smem, k_t, zero, Q, q_rows, d, stride_qh, v_row, stride_vh, v_ok, v_other,
                                 N_HEADS, AHEAD, NUM_BUF)
        acc = _head_sum(acc, prev, v_prev, c, SUM, 1)
        prev = cur
        v_prev = v_cur
    return _head_sum(acc, prev, v_prev, c, SUM, 0)


@gluon.jit
def _issue_head(h, q_smem, k_t, zero, Q, q_rows, d, stride_qh, v_row, stride_vh, v_ok, v_other,
                N_HEADS: gl.constexpr, AHEAD: gl.constexpr, NUM_BUF: gl.constexpr):
    """Head h's product issued (`issue_head_product`) and its per-row epilogue value loaded: (the product in
    flight, v_h)."""
    qk = issue_head_product(h, q_smem, k_t, zero, Q, q_rows, d, stride_qh, N_HEADS, AHEAD, NUM_BUF)
    return qk, gl.load(v_row + h * stride_vh, mask=v_ok, other=v_other)


@gluon.jit
def _head_sum(acc, qk, v, c, SUM: gl.constexpr, IN_FLIGHT: gl.constexpr):
    """SUM(acc, qk, v, c) once qk's product is done, leaving IN_FLIGHT later products running."""
    qk = warpgroup_mma_wait(IN_FLIGHT, deps=(qk,))
    return SUM(acc, qk, v, c)
