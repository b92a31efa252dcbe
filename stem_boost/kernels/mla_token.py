"""Token-sparse attention on the absorbed-MLA shape (DeepSeek-V3.2 DSA prefill), in Triton.

    out = mla_token_attention(q, kv, idx, counts, q_offset=T - S, sm_scale=1 / sqrt(576))

    q      [B, S, H, Dqk]   Dqk = dv + rope (576 = 512 latent + 64 rope); H query heads (128 or 64)
    kv     [B, T, 1, Dqk]   one latent row per key; the values are its first dv channels
    idx    [B, 1, S, Kmax]  int32 key positions per query token (-1 padded; [B, S, Kmax] accepted)
    counts [B, 1, S]        live leading entries of each row ([B, S] accepted)
    out    [B, S, H, dv]    q's dtype;  lse [B, H, S] fp32 natural log (-inf for empty rows)

Same semantics as `sparse_attention(q, kv, kv[..., :dv], idx, counts, block_size=1)` (and its
oracle `sparse_attention_reference`): query s sits at position q_offset + s and, with causal=True,
keys after it are masked.

Program roles: axis 0 = (one query token, chunk of BLOCK_H heads or part of the value width),
the head chunk fastest (HEADS_INNER, the default: the programs of one token run side by side, so
the second one's gathers find the first one's latent rows in L2; with H = 128 two programs read
each selected row), axis 2 = batch. HEADS_INNER=False puts the head chunks on axis 1 (the
previous order: a token's second program ran a whole pass over the tokens later). All heads of a token share its selection, so heads go on M (64 per
program: one m64 wgmma tile per warpgroup row block). Inner loop over BLOCK_N selected keys: the
latent rows are gathered by index (`tl.range(num_stages=...)` pipelines the gather: the next
tiles are in flight while the current one is multiplied), S = Q K^T over the 576 channels, online
softmax in base 2, O += P V with V the first dv channels of the same gathered tile.
The value width is the register problem: a [64, 512] fp32 accumulator is 128 registers per thread
over 8 warps. DV_SPLIT = 2 gives each of two programs half of it ([64, 256]); both recompute S
(the QK^T part is split in the same two halves + rope, so the gathered tile is read once per
program and its value half is reused as V).

Key positions a step ahead (PREFETCH_IDX, the default): without it the pipeliner gives the load of
a tile's positions a stage of its own and waits for every copy in flight at the top of each step;
with the positions in registers a step early it issues the next gathered tile before the current
tile's products. Measured (H200, triton 3.6, BENCHMARKS.md): 231 TFLOP/s at 128 and at 64 heads
against 210 without (and against 211 / 197 for the generic `triton_sparse.py` token path). With
N = 32 and 3-4 stages the gather runs two tiles ahead, but the smaller products lose more (199).
DV_SPLIT 2, 16 warps and 128 heads per program were all slower. FlashMLA's producer warp group
(gathering tile i + 1 while two consumer groups multiply tile i) is what would close the rest;
Triton 3.6's automatic warp specialisation fails on this loop.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .online_softmax import natural_lse, online_softmax_step


@triton.jit
def _tile_positions(idx_row, slot0, count, BLOCK_N: tl.constexpr):
    """Key positions of selection slots slot0 .. slot0 + BLOCK_N - 1 ([BLOCK_N] int32, -1 past count)."""
    slot = slot0 + tl.arange(0, BLOCK_N)
    return tl.load(idx_row + slot, mask=slot < count, other=-1)


@triton.jit
def _gather_tile(kpos, T, qpos, kv_base, stride_kt, dv0, do0,
                 BLOCK_N: tl.constexpr, DVP: tl.constexpr, DV: tl.constexpr, DR: tl.constexpr,
                 DV_SPLIT: tl.constexpr, CAUSAL: tl.constexpr):
    """Gather the latent rows at key positions kpos [BLOCK_N]: the value part [BLOCK_N, DVP]
    (channels dv0..), the other latent half (DV_SPLIT 2, channels do0..; else the value part
    again), the rope part [BLOCK_N, DR] and the slot validity [BLOCK_N]. Invalid slots read row 0
    (a real row; masked in S), so the gathers need no predicate."""
    d_v = tl.arange(0, DVP)
    d_r = tl.arange(0, DR)
    k_ok = (kpos >= 0) & (kpos < T)
    if CAUSAL:
        k_ok = k_ok & (kpos <= qpos)
    k_row = kv_base + tl.where(k_ok, kpos, 0).to(tl.int64)[:, None] * stride_kt
    k_v = tl.load(k_row + dv0 + d_v[None, :])
    if DV_SPLIT == 2:
        k_o = tl.load(k_row + do0 + d_v[None, :])
    else:
        k_o = k_v
    k_r = tl.load(k_row + DV + d_r[None, :])
    return k_v, k_o, k_r, k_ok


@triton.jit
def _mla_token_fwd(
    Q, KV, IDX, CNT, O, LSE,
    qk_scale_log2, S, T, q_offset, H,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_kt,
    stride_ib, stride_ir, stride_cb,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, DV: tl.constexpr, DR: tl.constexpr,
    DV_SPLIT: tl.constexpr, NUM_STAGES: tl.constexpr, CAUSAL: tl.constexpr, RETURN_LSE: tl.constexpr,
    PREFETCH_IDX: tl.constexpr, HEADS_INNER: tl.constexpr,
):
    DVP: tl.constexpr = DV // DV_SPLIT  # value columns of this program
    if HEADS_INNER:  # axis 0 = token x head chunk, head chunk fastest: a token's programs run together
        n_h = tl.cdiv(H, BLOCK_H) * DV_SPLIT
        s = S - 1 - tl.program_id(0) // n_h  # late tokens (most keys) first
        pid_h = tl.program_id(0) % n_h
    else:
        s = tl.num_programs(0) - 1 - tl.program_id(0)
        pid_h = tl.program_id(1)
    b = tl.program_id(2)
    part = pid_h % DV_SPLIT
    h0 = (pid_h // DV_SPLIT) * BLOCK_H
    offs_h = h0 + tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    qpos = s + q_offset

    # ---- Q tile: the value part of the latent [BLOCK_H, DVP], the other part, the rope part [BLOCK_H, DR]
    dv0 = part * DVP
    d_v = tl.arange(0, DVP)
    d_r = tl.arange(0, DR)
    q_row = Q + b.to(tl.int64) * stride_qb + s.to(tl.int64) * stride_qs + offs_h[:, None] * stride_qh
    q_v = tl.load(q_row + dv0 + d_v[None, :], mask=h_ok[:, None], other=0.0)
    q_r = tl.load(q_row + DV + d_r[None, :], mask=h_ok[:, None], other=0.0)
    if DV_SPLIT == 2:
        do0 = DVP - dv0  # the other half of the latent
        q_o = tl.load(q_row + do0 + d_v[None, :], mask=h_ok[:, None], other=0.0)

    idx_row = IDX + b.to(tl.int64) * stride_ib + s.to(tl.int64) * stride_ir
    count = tl.load(CNT + b * stride_cb + s)
    kv_base = KV + b.to(tl.int64) * stride_kb

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, DVP], tl.float32)
    # PREFETCH_IDX: the next tile's key positions are loaded one step ahead into registers, so the
    # gather's addresses do not wait on a load of the same step and the pipeliner can issue the
    # gather NUM_STAGES - 1 steps ahead (else the index load takes a stage of its own)
    kpos_next = _tile_positions(idx_row, 0, count, BLOCK_N)
    for start in tl.range(0, count, BLOCK_N, num_stages=NUM_STAGES):
        if PREFETCH_IDX:
            kpos = kpos_next
            kpos_next = _tile_positions(idx_row, start + BLOCK_N, count, BLOCK_N)
        else:
            kpos = _tile_positions(idx_row, start, count, BLOCK_N)
        k_v, k_o, k_r, k_ok = _gather_tile(kpos, T, qpos, kv_base, stride_kt, dv0, DVP - dv0,
                                           BLOCK_N, DVP, DV, DR, DV_SPLIT, CAUSAL)
        qk = tl.dot(q_v, tl.trans(k_v))
        if DV_SPLIT == 2:
            qk = tl.dot(q_o, tl.trans(k_o), qk)
        qk = tl.dot(q_r, tl.trans(k_r), qk)
        qk = tl.where(k_ok[None, :], qk * qk_scale_log2, float("-inf"))
        p, alpha, m_new, l_i = online_softmax_step(qk, m_i, l_i)
        acc = tl.dot(p.to(k_v.dtype), k_v, acc * alpha[:, None])
        m_i = m_new

    l_div = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_div[:, None]
    o_row = O + b.to(tl.int64) * stride_ob + s.to(tl.int64) * stride_os + offs_h[:, None] * stride_oh
    tl.store(o_row + dv0 + d_v[None, :], out.to(O.dtype.element_ty), mask=h_ok[:, None])
    if RETURN_LSE and part == 0:
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        lse = natural_lse(m_safe, l_i, l_div)
        tl.store(LSE + b * stride_lb + offs_h * stride_lh + s, lse, mask=h_ok)


DEFAULT_TILES = dict(BLOCK_H=64, BLOCK_N=64, DV_SPLIT=1, NUM_STAGES=2, num_warps=8, PREFETCH_IDX=True,
                     HEADS_INNER=True)


class MLATokenCall(NamedTuple):
    """A checked token-sparse absorbed-MLA call, ready for any of the three kernels (this one,
    `mla_token_sm90.py`, `mla_token_ws.py`):
    q [B, S, H, Dqk], kv [B, T, Dqk], idx [B, S, Kmax] int32, counts [B, S] int32 (unit stride on the
    last dim), out [B, S, H, dv] and lse [B, H, S] fp32 (out itself without return_lse) allocated."""

    q: torch.Tensor
    kv: torch.Tensor
    idx: torch.Tensor
    counts: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor
    q_offset: int
    sm_scale: float
    return_lse: bool

    def kernel_args(self) -> tuple:
        """The positional arguments both kernels take: tensors, log2 scale, sizes, strides."""
        q, kv, idx, counts, out, lse = self.q, self.kv, self.idx, self.counts, self.out, self.lse
        B, S, H, _ = q.shape
        return (q, kv, idx, counts, out, lse,
                self.sm_scale * 1.4426950408889634, S, kv.shape[1], self.q_offset, H,
                q.stride(0), q.stride(1), q.stride(2),
                kv.stride(0), kv.stride(1),
                idx.stride(0), idx.stride(1), counts.stride(0),
                out.stride(0), out.stride(1), out.stride(2),
                lse.stride(0) if self.return_lse else 0, lse.stride(1) if self.return_lse else 0)

    def result(self):
        return (self.out, self.lse) if self.return_lse else self.out


def prepare_mla_token_call(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor, *,
                           q_offset: int | None, sm_scale: float | None, dv: int, return_lse: bool) -> MLATokenCall:
    """Check the shapes of a token-sparse absorbed-MLA call (see `mla_token_attention`), make the last
    dims unit-stride and the lists int32, resolve q_offset (T - S) and sm_scale (1 / sqrt(Dqk)), and
    allocate the outputs. Raises ValueError naming the argument and what is allowed."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, S, H, Dqk]; got {tuple(q.shape)}")
    if kv.dim() == 4:
        if kv.shape[2] != 1:
            raise ValueError(f"kv must have one kv head [B, T, 1, Dqk]; got {tuple(kv.shape)}")
        kv = kv[:, :, 0]
    B, S, H, Dqk = q.shape
    if kv.dim() != 3 or kv.shape[0] != B or kv.shape[2] != Dqk:
        raise ValueError(f"kv {tuple(kv.shape)} must be [B={B}, T, 1, Dqk={Dqk}]")
    if kv.dtype != q.dtype:
        raise ValueError(f"q and kv must share one dtype; got {q.dtype}, {kv.dtype}")
    T = kv.shape[1]
    if idx.dim() == 4:
        if idx.shape[1] != 1:
            raise ValueError(f"idx must hold one selection for all heads [B, 1, S, Kmax]; got {tuple(idx.shape)}")
        idx = idx[:, 0]
        counts = counts[:, 0]
    if idx.shape[:2] != (B, S) or counts.shape != (B, S):
        raise ValueError(f"idx {tuple(idx.shape)} / counts {tuple(counts.shape)} must be [B={B}, S={S}, Kmax] / [B, S]")
    offset = T - S if q_offset is None else int(q_offset)
    scale = 1.0 / math.sqrt(Dqk) if sm_scale is None else float(sm_scale)
    q = q if q.stride(-1) == 1 else q.contiguous()
    kv = kv if kv.stride(-1) == 1 else kv.contiguous()
    idx = idx.to(torch.int32)
    idx = idx if idx.stride(-1) == 1 else idx.contiguous()
    counts = counts.to(torch.int32).contiguous()
    out = torch.empty(B, S, H, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device) if return_lse else out
    return MLATokenCall(q, kv, idx, counts, out, lse, offset, scale, return_lse)


def mla_token_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    idx: torch.Tensor,
    counts: torch.Tensor,
    *,
    q_offset: int | None = None,
    sm_scale: float | None = None,
    dv: int = 512,
    return_lse: bool = False,
    causal: bool = True,
    tiles: dict | None = None,
):
    """Sparse attention of each query token's H heads over its selected latent rows (module docstring).

    q [B, S, H, Dqk] and kv [B, T, 1, Dqk] (or [B, T, Dqk]) share one dtype (bf16 / fp16; fp32 runs
    the same code); Dqk - dv and dv / DV_SPLIT must be powers of two >= 16. `q_offset` defaults to
    T - S, `sm_scale` to 1 / sqrt(Dqk). `tiles` overrides DEFAULT_TILES (benchmarks).
    Returns out [B, S, H, dv] and, with return_lse, lse [B, H, S] fp32.
    """
    call = prepare_mla_token_call(q, kv, idx, counts, q_offset=q_offset, sm_scale=sm_scale, dv=dv,
                                  return_lse=return_lse)
    B, S, H, Dqk = call.q.shape
    cfg = dict(DEFAULT_TILES)
    cfg.update(tiles or {})
    dr = Dqk - dv
    dvp = dv // cfg["DV_SPLIT"]
    for name, d in (("Dqk - dv", dr), ("dv / DV_SPLIT", dvp)):
        if d < 16 or d & (d - 1):
            raise ValueError(f"{name} = {d} must be a power of two >= 16")
    block_h = max(16, min(cfg["BLOCK_H"], triton.next_power_of_2(H)))
    n_h = triton.cdiv(H, block_h) * cfg["DV_SPLIT"]
    grid = (S * n_h, 1, B) if cfg["HEADS_INNER"] else (S, n_h, B)
    if S and B:
        _mla_token_fwd[grid](
            *call.kernel_args(),
            BLOCK_H=block_h, BLOCK_N=cfg["BLOCK_N"], DV=dv, DR=dr, DV_SPLIT=cfg["DV_SPLIT"],
            NUM_STAGES=cfg["NUM_STAGES"], CAUSAL=causal, RETURN_LSE=return_lse, PREFETCH_IDX=cfg["PREFETCH_IDX"],
            HEADS_INNER=cfg["HEADS_INNER"],
            num_warps=cfg["num_warps"],
        )
    return call.result()
