"""FP8 lightning-indexer scores for Hopper (sm_90), written in Gluon: the contract of
`indexer_scores.fp8_index_scores`, with the next head's product running while this head's
ReLU-weighted sum is taken.

    I = fp8_index_scores_sm90(q, k, w, scale, causal_offset=T - S)

    q [B, S, H, D], k [B, T, D] (any float dtype; quantised to e4m3 as `fp8_operands` does), w [B, S, H]
    fp32 -> I [B, S, T] fp32.

Why a second kernel. The Triton kernel (`_index_scores_kernel`) waits for each head's product before
its sum: its compiled TTGIR has `warp_group_dot_wait {pendings = 0}` right after every product, also
when the product is issued a head ahead (Triton 3.6 defers the wait only for accumulator chains).
There the tensor cores idle during a program's epilogue, and only other programs on the SM fill the
gap (4 warps a program, three an SM, was the fastest: about 1 PFLOP/s on an H200). Here the schedule
is written out (`gluon_heads.head_sums`): head h's product is issued asynchronously and head h - 1's
ReLU-weighted sum runs beside it. The first version of this kernel left the product running across
the head loop's back edge, which ptxas answers by serialising every wgmma (note C7514), and it
measured no faster than the Triton one; it now takes the heads STEP at a time, each sum after a wait
that leaves the next product running (`head_sums(STEP=3)`), and builds without the note.

Program roles: axis 0 = query tile (BLOCK_S rows), axis 1 = key tile (BLOCK_T keys), axis 2 = batch;
one warpgroup. The key tile goes to shared memory once; the H query-head tiles stream through
NUM_BUF shared buffers by cp.async, NUM_BUF - 2 heads ahead of the product (a buffer is refilled
once the product that read it is complete in every warp). Tiles wholly after the diagonal compute
nothing. Only for CUDA on compute capability 9.x (Gluon has no CPU interpreter); the Triton kernel is
the oracle for it on the GPU (`tests/test_gpu_indexer_sm90.py`) and `stem-boost build` compiles it on
any machine. Opt-in (`indexer_scores.FP8_SCORER = "sm90"`): timed by `scripts/bench_dsa.py --sections indexer`
beside the Triton kernel, the layer's path only once measured faster there.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp

from .gluon_heads import head_sums, head_trips, load_head, merge_tile
from .gluon_shims import async_load as _async_load
from .indexer_scores import fp8_operands
from .tile_order import tile_grid
from .warp_rows import interpreting

__all__ = ["fp8_index_scores_sm90", "supports_fp8_scores_sm90", "SM90_SCORE_TILE"]

# one warpgroup (M = 64 is one wgmma's rows); MAXNREG: a register cap (None: the compiler's choice,
# two programs an SM; 168 would fit three); KEYS_FAST: key tiles on the grid's fast axis (`tile_order`, as
# the Triton kernel); STEP: heads written out a trip of the head loop (`gluon_heads.head_sums`; 0: the
# schedule ptxas serialises). sm_90 builds (Triton 3.6): STEP 3 252 registers, no spill, two of three sums
# beside a product; STEP 4 spills 384 bytes at 128 keys a tile, none at 64 (138 registers, three programs
# an SM); STEP 2 225 registers, one sum of two beside a product
SM90_SCORE_TILE = dict(BLOCK_S=64, BLOCK_T=128, NUM_BUF=4, MAXNREG=None, KEYS_FAST=True, STEP=3)


@gluon.jit
def _relu_weighted_sum(acc, qk, w, unused):
    """acc + w * relu(qk): a head's share of the index score; `gluon_heads.head_sums`'s epilogue."""
    return acc + w[:, None] * gl.maximum(qk, 0.0)


@gluon.jit(do_not_specialize=["n_trips"])  # a constant one-trip loop fails to lower (Triton 3.6)
def _index_scores_sm90_fwd(
    Q, K, W, KSCALE, OUT, S, T, causal_offset, n_trips,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_kt,
    stride_wb, stride_ws,
    stride_ob, stride_os,
    stride_ksb,
    H: gl.constexpr, D: gl.constexpr, BLOCK_S: gl.constexpr, BLOCK_T: gl.constexpr, NUM_BUF: gl.constexpr,
    CAUSAL: gl.constexpr, WRITE_MASKED: gl.constexpr, KEYS_FAST: gl.constexpr, STEP: gl.constexpr,
):
    gl.static_assert(gl.num_warps() == 4, "one warpgroup")
    gl.static_assert(NUM_BUF >= 3, "a head in flight beside the one being summed needs three buffers")
    dtype: gl.constexpr = Q.dtype.element_ty
    AHEAD: gl.constexpr = NUM_BUF - 2  # query-head loads in flight beyond the head being multiplied
    # ---- layouts: 16-byte cp.async per thread (8 threads a 128-byte row), the product, the store
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0])
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_T, 32])
    st_layout: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [4, 1], [1, 0])  # a warp writes 512 B of a row
    q_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_S, D], dtype)
    k_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_T, D], dtype)
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)

    pid_s = gl.program_id(1) if KEYS_FAST else gl.program_id(0)  # see `tile_order`
    pid_t = gl.program_id(0) if KEYS_FAST else gl.program_id(1)
    b = gl.program_id(2)
    # a tile wholly after the diagonal of its last query row needs no product (all -inf)
    live = True
    if CAUSAL:
        live = pid_t * BLOCK_T <= pid_s * BLOCK_S + BLOCK_S - 1 + causal_offset

    acc = gl.zeros([BLOCK_S, BLOCK_T], gl.float32, layout=s_layout)
    if live:
        q_smem = gl.allocate_shared_memory(dtype, [NUM_BUF, BLOCK_S, D], q_smem_layout)
        k_smem = gl.allocate_shared_memory(dtype, [BLOCK_T, D], k_smem_layout)
        d = gl.arange(0, D, layout=gl.SliceLayout(0, ld_layout))
        # rows past S or T read the last row (finite values; their outputs are never stored)
        q_rows = gl.minimum(pid_s * BLOCK_S + gl.arange(0, BLOCK_S, layout=gl.SliceLayout(1, ld_layout)), S - 1)
        q_rows = b.to(gl.int64) * stride_qb + q_rows.to(gl.int64) * stride_qs
        k_rows = gl.minimum(pid_t * BLOCK_T + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, ld_layout)), T - 1)
        _async_load(k_smem, K + b.to(gl.int64) * stride_kb + k_rows[:, None].to(gl.int64) * stride_kt + d[None, :])
        for j in gl.static_range(AHEAD):  # heads 0 .. AHEAD - 1 (the key tile rides with head 0's group)
            load_head(q_smem.index(j), Q, q_rows, d, j, H, stride_qh)
            cp.commit_group()
        offs_s = pid_s * BLOCK_S + gl.arange(0, BLOCK_S, layout=rows_s)
        s_ok = offs_s < S
        w_row = W + b.to(gl.int64) * stride_wb + offs_s.to(gl.int64) * stride_ws
        k_t = k_smem.permute((1, 0))  # [D, BLOCK_T], K-major: the e4m3 wgmma's B operand
        zero = gl.zeros([BLOCK_S, BLOCK_T], gl.float32, layout=s_layout)  # use_acc=False: a placeholder

        acc = head_sums(acc, q_smem, k_t, zero, Q, q_rows, d, stride_qh, w_row, 1, s_ok, 0.0, 0.0, n_trips,
                        _relu_weighted_sum, H, AHEAD, NUM_BUF, STEP)
        cp.wait_group(0)

    # ---- key scales, the causal mask, one store
    acc = gl.convert_layout(acc, st_layout)
    offs_s = pid_s * BLOCK_S + gl.arange(0, BLOCK_S, layout=gl.SliceLayout(1, st_layout))
    offs_t = pid_t * BLOCK_T + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, st_layout))
    t_ok = offs_t < T
    acc = acc * gl.load(KSCALE + b.to(gl.int64) * stride_ksb + offs_t, mask=t_ok, other=0.0)[None, :]
    if CAUSAL:
        acc = gl.where(offs_t[None, :] <= offs_s[:, None] + causal_offset, acc, float("-inf"))
    write = (offs_s < S)[:, None] & t_ok[None, :]
    if not WRITE_MASKED:  # the caller reads only keys before each row's limit: skipped tiles stay unwritten
        write = write & live
    gl.store(OUT + b.to(gl.int64) * stride_ob + offs_s[:, None].to(gl.int64) * stride_os + offs_t[None, :], acc,
             mask=write)


def supports_fp8_scores_sm90(q: torch.Tensor) -> bool:
    """True where this kernel runs: CUDA tensors on compute capability 9.x, index heads 32-128 wide
    (a power of two: the e4m3 wgmma's K is 32)."""
    D = q.shape[-1]
    return (q.is_cuda and not interpreting() and torch.cuda.get_device_capability(q.device)[0] == 9
            and D in (32, 64, 128))


def fp8_index_scores_sm90(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, scale: float | None,
                          causal_offset: int | None = None, *, rotate: bool = True, write_masked: bool = True,
                          k_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
                          tile: dict | None = None) -> torch.Tensor:
    """`indexer_scores.fp8_index_scores` (same arguments, result and masking) by the Gluon kernel
    above. q [B, S, H, D], k [B, T, D], w [B, S, H] -> [B, S, T] fp32; `tile` overrides
    `SM90_SCORE_TILE` (BLOCK_S = 64, BLOCK_T, NUM_BUF >= 3, MAXNREG, KEYS_FAST, STEP 0 or >= 2)."""
    B, S, H, D = q.shape
    T = k.shape[1]
    if D not in (32, 64, 128):
        raise ValueError(f"index head dim {D}; allowed for the sm_90 FP8 kernel: 32, 64, 128")
    cfg = merge_tile(SM90_SCORE_TILE, tile)
    if cfg["BLOCK_S"] != 64 or cfg["NUM_BUF"] < 3:
        raise ValueError(f"tile {cfg}: BLOCK_S must be 64 (one warpgroup's rows) and NUM_BUF >= 3")
    trips = head_trips(H, cfg["STEP"])
    q8, k8, w8, k_scale = fp8_operands(q, k, w, scale, rotate, k_fp8)
    q8 = q8 if q8.stride(-1) == 1 else q8.contiguous()
    k8 = k8 if k8.stride(-1) == 1 else k8.contiguous()
    w8 = w8.float().contiguous()
    k_scale = k_scale.float().contiguous()
    out = torch.empty(B, S, T, dtype=torch.float32, device=q.device)
    if S and T and B:
        grid = tile_grid(triton.cdiv(S, cfg["BLOCK_S"]), triton.cdiv(T, cfg["BLOCK_T"]), B, cfg["KEYS_FAST"])
        _index_scores_sm90_fwd[grid](
            q8, k8, w8, k_scale, out, S, T, 0 if causal_offset is None else int(causal_offset),
            trips,
            q8.stride(0), q8.stride(1), q8.stride(2), k8.stride(0), k8.stride(1),
            w8.stride(0), w8.stride(1), out.stride(0), out.stride(1), k_scale.stride(0),
            H=H, D=D, BLOCK_S=cfg["BLOCK_S"], BLOCK_T=cfg["BLOCK_T"], NUM_BUF=cfg["NUM_BUF"],
            CAUSAL=causal_offset is not None, WRITE_MASKED=write_masked or causal_offset is None,
            KEYS_FAST=cfg["KEYS_FAST"], STEP=cfg["STEP"], num_warps=4,
            **({} if cfg["MAXNREG"] is None else dict(maxnreg=cfg["MAXNREG"])),
        )
    return out
