"""Block-sparse attention over per-token block lists, one program per (query tile x GQA group).

InfLLMv2 selects key blocks per query *token*: a kernel that gives each token its own row holds
1 token x G heads = 16 rows (MiniCPM-4.1: G = 16), a quarter of a 64-row tensor-core tile. Here a
program takes QT consecutive tokens x the G heads that share a kv head (M = QT * G rows; G need
not be a power of two: row m is (token m // G, head m % G), and only the last rows up to the next
power of two are padding), walks the UNION of its tokens' block lists in ascending order and
masks, per row, the blocks that the row's token did not select (and the keys after it). The
result is exactly per-token block-sparse attention: a row's softmax runs over the keys of its own
token's blocks and no others.

Two launches:
  1. `union_block_lists` (`_union_lists_kernel`): one program per (query tile, batch, selection
     head) merges the tile's QT sorted lists (a QT-way merge, one union entry per step) and writes
     the union `uidx [B, Hsel, n_tiles, Umax]` (ascending, -1 padded), per entry a token bit mask
     `umask` (bit t: token t0 + t of the tile selected the block), and `ucount [B, Hsel, n_tiles]`.
     Umax = min(QT * Kmax, key blocks) is known from the shapes: no host synchronisation.
  2. `_block_union_fwd`: axis 0 = query tile (heaviest, i.e. last, tiles first), axis 1 = batch x
     kv head. Per union entry: one contiguous [BLOCK_N, D] K tile and V tile (a TMA descriptor
     load on CUDA by default, else a pointer load), QK^T on the [M, D] query tile, the [M, N] mask only
     where some row of the tile did not select the block or the block crosses the diagonal, online
     softmax in base 2 with fp32 accumulation. Blocks longer than BLOCK_N take SUB steps.

Flat tiles (lists of several tokens a row, query_block * G a multiple of BLOCK_M): a program takes
BLOCK_M consecutive (token, head) rows of one kv head, token-major, which may split a token's
heads across two tiles. Every tile lies in one selection row, so it walks that row with no mask
but the causal one, and no row is padding whatever G is (G = 6 with token tiles: 10 tokens fill
60 of 64 rows and a tile can straddle two rows). BLOCK_M 64 with 4 warps and three stages
(`FLAT_BLOCK_M`, `FLAT_STAGES`): BLOCK_M 128 with 8 warps halves the K / V loads per query row,
yet ran 1-6% slower on an H200.

Contract (as `sparse_attention` in block mode):
    q [B, S, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv], Hq = G * Hkv; fp16 / bf16 / fp32.
    idx [B, Hsel, R, Kmax] int32, Hsel in {1, Hkv}, R = ceil(S / query_block): key-block numbers,
    first `counts` entries live, strictly ascending, the rest -1; counts [B, Hsel, R]. InfLLMv2
    has query_block = 1 (a row per token); with query_block a multiple of QT every tile lies in
    one row and the kernel walks that row directly (the union step is skipped, no token mask).
    Query s sits at key position q_offset + s; causal=True masks keys after it.
    Returns out [B, S, Hq, Dv] (q's dtype) and with return_lse lse [B, Hq, S] fp32 (natural log;
    -inf and a zero output for rows that attend to nothing).
Oracle: `stem_boost.kernels.reference.sparse_attention_reference` (query_block = 1).

On Hopper the same tiles and lists run by default through `block_union_sm90.py` (Gluon: the scores of
step j and the P V of step j - 1 issued together, step j's softmax written between their waits; `kernel="triton"` keeps
this module's kernel, which every other device runs).

Measured (H200, bf16, MiniCPM-4.1 shapes, benchmarks/log_infllmv2_2026-12-02.md): 64-row tiles with
TMA loads run 2.2x faster than 1 token x 16 heads at 32K and 1.6x at 128K (G = 16), 3-6x at
G = 4 / 6 / 8; 128-row tiles lose (a larger union). The cost is the union's inflation: union
entries x QT / per-token entries, 1.2 at QT = 4 on real InfLLMv2 lists (SmolLM2 testbed).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .aot import compiling
from .online_softmax import online_softmax_step, store_rows

__all__ = ["block_union_attention", "tile_entries", "union_block_lists", "union_block_lists_torch",
           "union_tile_config"]

_BIG = 1 << 30  # larger than any key-block number


def _next_pow2(x: int) -> int:
    return 1 << (max(1, x) - 1).bit_length()


@triton.jit
def _union_lists_kernel(
    IDX, CNT, UIDX, UMASK, UCNT, S,
    stride_ib, stride_ih, stride_ir,
    stride_cb, stride_ch,
    stride_ub, stride_uh, stride_ut,
    stride_nb, stride_nh,
    HSEL,
    QT: tl.constexpr, QTP: tl.constexpr, QUERY_BLOCK: tl.constexpr,
):
    """Program: one query tile of QT tokens of one (batch, selection head); one warp.

    A QT-way merge of the tile's ascending lists: each step takes the smallest head element u of
    the QT lists, records u and the bit mask of the lists whose head equals u, and advances those
    lists. The lists live in L1 (QT x Kmax int32), so a step costs one small gather.
    """
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HSEL
    h = bh % HSEL
    t = tl.arange(0, QTP)
    tok = tile * QT + t
    ok = (t < QT) & (tok < S)
    r = tok // QUERY_BLOCK  # the selection row of each token
    cnt = tl.load(CNT + b * stride_cb + h * stride_ch + r, mask=ok, other=0)
    row = IDX + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih + r.to(tl.int64) * stride_ir
    cur = tl.zeros([QTP], tl.int32)
    head = tl.load(row + cur, mask=cur < cnt, other=1 << 30)
    u = tl.min(head, 0)
    out_i = UIDX + b.to(tl.int64) * stride_ub + h.to(tl.int64) * stride_uh + tile.to(tl.int64) * stride_ut
    out_m = UMASK + b.to(tl.int64) * stride_ub + h.to(tl.int64) * stride_uh + tile.to(tl.int64) * stride_ut
    bit = tl.where(ok, 1 << t, 0)
    n = 0
    while u < (1 << 30):
        hit = head == u
        tl.store(out_i + n, u)
        tl.store(out_m + n, tl.sum(tl.where(hit, bit, 0), 0))
        cur = cur + hit.to(tl.int32)
        head = tl.load(row + cur, mask=cur < cnt, other=1 << 30)
        u = tl.min(head, 0)
        n += 1
    tl.store(UCNT + b * stride_nb + h * stride_nh + tile, n)


def union_block_lists(idx: torch.Tensor, counts: torch.Tensor, tokens_per_tile: int, n_units: int | None = None,
                      *, query_block: int = 1, seq_q: int | None = None):
    """Union of the block lists of every tile of `tokens_per_tile` consecutive query rows (Triton).

    Args:
        idx: [B, Hsel, R, Kmax] int32, live entries strictly ascending (-1 padded after counts);
            R = ceil(S / query_block): token s uses row s // query_block.
        counts: [B, Hsel, R] int32.
        tokens_per_tile: QT in [1, 32].
        n_units: number of key blocks, if known (caps Umax; memory only).
        query_block, seq_q: tokens per selection row and the number of query tokens S (default
            R * query_block).
    Returns:
        uidx [B, Hsel, n_tiles, Umax] int32 ascending union (-1 after ucount; entries past ucount
        are not written when returned by this function: read only the first ucount),
        umask [B, Hsel, n_tiles, Umax] int32 token bit masks, ucount [B, Hsel, n_tiles] int32,
        with n_tiles = ceil(S / QT) and Umax = min(QT * Kmax, n_units).
    """
    B, H, R, kmax = idx.shape
    S = R * query_block if seq_q is None else int(seq_q)
    qt = int(tokens_per_tile)
    if not 1 <= qt <= 32:
        raise ValueError(f"tokens_per_tile={qt}; allowed: 1..32 (one int32 bit mask per union entry)")
    n_tiles = -(-S // qt)
    umax = max(1, qt * kmax if n_units is None else min(qt * kmax, n_units))
    idx = idx.to(torch.int32).contiguous()
    counts = counts.to(torch.int32).contiguous()
    uidx = torch.empty(B, H, n_tiles, umax, dtype=torch.int32, device=idx.device)
    umask = torch.empty_like(uidx)
    ucount = torch.empty(B, H, n_tiles, dtype=torch.int32, device=idx.device)
    _union_lists_kernel[(n_tiles, B * H)](
        idx, counts, uidx, umask, ucount, S,
        idx.stride(0), idx.stride(1), idx.stride(2),
        counts.stride(0), counts.stride(1),
        uidx.stride(0), uidx.stride(1), uidx.stride(2),
        ucount.stride(0), ucount.stride(1),
        H, QT=qt, QTP=_next_pow2(qt), QUERY_BLOCK=query_block, num_warps=1,
    )
    return uidx, umask, ucount


def union_inflation(ucount: torch.Tensor, counts: torch.Tensor, tokens_per_tile: int) -> float:
    """The union tiles' work against the per-token work: union entries x QT / per-token entries.

    ucount [B, H, n_tiles] from `union_block_lists` (or its PyTorch definition) with QT =
    `tokens_per_tile`, counts [B, H, R] the per-token list lengths. 1 = the QT tokens of every tile
    chose the same blocks; QT = independent lists."""
    return float(ucount.double().sum() * tokens_per_tile / counts.double().sum().clamp_min(1))


def union_block_lists_torch(idx: torch.Tensor, counts: torch.Tensor, tokens_per_tile: int, *, query_block: int = 1,
                            seq_q: int | None = None):
    """PyTorch definition of `union_block_lists` (same outputs; -1 / 0 after ucount)."""
    if query_block > 1:  # one row per token
        S = idx.shape[2] * query_block if seq_q is None else int(seq_q)
        rows = torch.arange(S, device=idx.device) // query_block
        idx, counts = idx[:, :, rows], counts[:, :, rows]
    B, H, S, kmax = idx.shape
    qt = int(tokens_per_tile)
    n_tiles = -(-S // qt)
    pad = n_tiles * qt - S
    live = torch.arange(kmax, device=idx.device) < counts.unsqueeze(-1)
    key = torch.where(live, idx.long(), -1)
    if pad:
        key = torch.nn.functional.pad(key, (0, 0, 0, pad), value=-1)
    key = key.view(B, H, n_tiles, qt, kmax)
    tok = torch.arange(qt, device=idx.device).view(1, 1, 1, qt, 1)
    comp = torch.where(key >= 0, key * 64 + tok, _BIG * 64).flatten(-2).sort(dim=-1).values  # [B,H,nt,qt*kmax]
    val, bit = comp // 64, comp % 64
    alive = val < _BIG
    new = alive.clone()
    new[..., 1:] &= val[..., 1:] != val[..., :-1]
    pos = torch.cumsum(new.long(), dim=-1) - 1
    dump = qt * kmax  # entries that are not alive go to an extra column
    pos = torch.where(alive, pos, dump)
    uidx = torch.full((B, H, n_tiles, dump + 1), -1, dtype=torch.long, device=idx.device)
    uidx.scatter_(-1, pos, torch.where(alive, val, -1))
    umask = torch.zeros_like(uidx).scatter_add_(-1, pos, torch.where(alive, 1 << bit, 0))
    ucount = new.sum(-1).to(torch.int32)
    return uidx[..., :dump].to(torch.int32), umask[..., :dump].to(torch.int32), ucount


def tile_entries(idx: torch.Tensor, counts: torch.Tensor, tokens_per_tile: int, *, query_block: int = 1,
                 seq_q: int | None = None) -> int:
    """Entries the kernel's tiles of `tokens_per_tile` tokens walk on a selection's lists (idx [B, H, R,
    Kmax], counts [B, H, R], rows of `query_block` tokens): the union of each tile's lists, or, where a
    row holds the tile's tokens already (query_block == tokens_per_tile), the row's list once. The
    kernel's time follows it (the PyTorch union: any device)."""
    if query_block == tokens_per_tile:
        return int(counts.long().sum())
    return int(union_block_lists_torch(idx, counts, tokens_per_tile, query_block=query_block, seq_q=seq_q)[2].sum())


@triton.jit
def _block_union_fwd(
    Q, K, V, UIDX, UMASK, UCNT, O, LSE,
    qk_scale_log2, S, T, q_offset,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ub, stride_uh, stride_ut,
    stride_nb, stride_nh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    HKV,
    HSEL_SHARED: tl.constexpr, G: tl.constexpr, QT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SUB: tl.constexpr,
    D: tl.constexpr, DP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
    CAUSAL: tl.constexpr, RETURN_LSE: tl.constexpr, USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr, ROW_LISTS: tl.constexpr, QUERY_BLOCK: tl.constexpr,
    FLAT_ROWS: tl.constexpr = False,
):
    """Program: query tile of QT tokens x the G heads of kv head `kvh` (M = QT * G live rows of
    BLOCK_M), over the union of the tile's block lists; with FLAT_ROWS (row lists only), BLOCK_M
    consecutive (token, head) rows of the kv head, which may split a token's heads across two
    tiles. See the module docstring."""
    pid_t = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest tiles (last queries) first
    pid_bh = tl.program_id(1)
    kvh = pid_bh % HKV
    b = pid_bh // HKV

    offs_m = tl.arange(0, BLOCK_M)
    if FLAT_ROWS:  # rows pid_t * BLOCK_M + m of the kv head's (token, head) rows, token-major
        flat = pid_t * BLOCK_M + offs_m
        t0 = (pid_t * BLOCK_M) // G
        tok = flat // G
        tin = tok - t0
        head = kvh * G + flat % G
        row_ok = tok < S
    else:  # QT whole tokens x G heads
        t0 = pid_t * QT
        tin = offs_m // G  # token of the row inside the tile
        tok = t0 + tin
        head = kvh * G + offs_m % G
        row_ok = (offs_m < QT * G) & (tok < S)
    qpos = tok + q_offset
    # bits of the tile's tokens that exist: a union entry with all of them set needs no token mask
    n_tok = tl.minimum(S - t0, QT)
    full_bits = ((tl.full([], 1, tl.int64) << n_tok) - 1).to(tl.int32)

    d = tl.arange(0, DP)
    q_row = Q + b.to(tl.int64) * stride_qb + tok.to(tl.int64) * stride_qs + head * stride_qh
    q = tl.load(q_row[:, None] + d[None, :], mask=row_ok[:, None] & (d[None, :] < D), other=0.0)

    if HSEL_SHARED:
        sel_h = 0
    else:
        sel_h = kvh
    if ROW_LISTS:  # every token of the tile shares one selection row: walk it, no token mask
        urow = t0 // QUERY_BLOCK
    else:
        urow = pid_t
    u_off = b.to(tl.int64) * stride_ub + sel_h * stride_uh + urow.to(tl.int64) * stride_ut
    ucount = tl.load(UCNT + b * stride_nb + sel_h * stride_nh + urow)

    k_base = K + b.to(tl.int64) * stride_kb + kvh * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kvh * stride_vh
    dv = tl.arange(0, DVP)
    offs_n = tl.arange(0, BLOCK_N)
    if USE_TMA:
        k_desc = tl.make_tensor_descriptor(k_base, shape=[T, D], strides=[stride_kt, 1], block_shape=[BLOCK_N, DP])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[T, DV], strides=[stride_vt, 1], block_shape=[BLOCK_N, DVP])

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DVP], tl.float32)
    for it in tl.range(0, ucount * SUB, warp_specialize=WARP_SPECIALIZE):
        blk = tl.load(UIDX + u_off + it // SUB)
        if ROW_LISTS:
            bits = full_bits
        else:
            bits = tl.load(UMASK + u_off + it // SUB)
        kstart = blk * BLOCK_SIZE + (it % SUB) * BLOCK_N
        kpos = kstart + offs_n
        if USE_TMA:
            k = k_desc.load([kstart, 0])
        else:
            k = tl.load(k_base + kpos.to(tl.int64)[:, None] * stride_kt + d[None, :],
                        mask=(kpos[:, None] < T) & (d[None, :] < D), other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        k_last = kstart + BLOCK_N - 1
        if CAUSAL:
            crosses = k_last > t0 + q_offset  # also covers keys past T (every query is < T)
        else:
            crosses = k_last >= T
        if crosses | ((bits & full_bits) != full_bits):
            if ROW_LISTS:  # every row of the tile selected the block
                keep = tl.broadcast_to((kpos < T)[None, :], [BLOCK_M, BLOCK_N])
            else:
                keep = (((bits >> tin) & 1) != 0)[:, None] & (kpos[None, :] < T)
            if CAUSAL:
                keep = keep & (kpos[None, :] <= qpos[:, None])
            qk = tl.where(keep, qk, float("-inf"))
        p, alpha, m_new, l_i = online_softmax_step(qk, m_i, l_i)
        if USE_TMA:
            v = v_desc.load([kstart, 0])
        else:
            v = tl.load(v_base + kpos.to(tl.int64)[:, None] * stride_vt + dv[None, :],
                        mask=(kpos[:, None] < T) & (dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    store_rows(acc, m_safe, l_i, O + b.to(tl.int64) * stride_ob + tok.to(tl.int64) * stride_os + head * stride_oh,
               LSE + b.to(tl.int64) * stride_lb + head * stride_lh + tok, row_ok, dv, DV, RETURN_LSE)


def union_tile_config(G: int, block_m: int = 64) -> dict:
    """Tile for a GQA group of G heads: QT = block_m // G tokens (at least 1, at most 32), so
    M = QT * G live rows of BLOCK_M = next_pow2(QT * G) (G = 6: 10 tokens, 60 of 64 rows).
    Three pipeline stages: 7-8% faster than two on MiniCPM-4.1's 128K lists on an H200, four
    20-30% slower (BENCHMARKS.md)."""
    qt = max(1, min(32, block_m // G))
    rows = max(16, _next_pow2(qt * G))
    return dict(tokens_per_tile=qt, BLOCK_M=rows, BLOCK_N=64, num_warps=4 if rows <= 64 else 8, num_stages=3)


#: rows of a flat tile (`block_union_attention(flat_rows=...)`) and its pipeline depth. Measured on
#: an H200 at G = 4 / 6 / 8 / 16 (BENCHMARKS.md): 3 stages beat 2 by 5-9% (M 128) and M 64 with 4
#: warps beat M 128 with 8 by 1-6%, at 0.81-0.85 of dense SDPA's rate at 128K.
FLAT_BLOCK_M = 64
FLAT_STAGES = 3

#: the executor of the block walk on per-token lists where the Gluon kernels run (`block_union_attention(
#: kernel=None)`): "sm90" (block_union_sm90.py), "sm90_ws" or "triton". Measured on an H200 (BENCHMARKS.md):
#: 33.7 against 35.8 ms on MiniCPM-4.1's 128K lists, 0.77-0.79 of dense SDPA's rate in block mode against
#: 0.72-0.75; the warp-specialised kernel 1.02x slower than "sm90" on those lists (34.4 / 33.7 ms).
UNION_KERNEL = "sm90"


#: the executor of row lists (block mode) where the Gluon kernels run: "sm90_ws" (where query_block * G is a
#: multiple of 128: 128-row tiles, a producer warpgroup and two consumers sharing each K / V block), "sm90" or
#: "triton". Measured on an H200 in block mode (density 0.2, G 4 / 6 / 8 / 16, BENCHMARKS.md): 0.82-0.85 of
#: dense SDPA's rate at 32K and 0.90-0.91 at 128K, against the 64-row kernel's 0.77-0.81 and 0.83-0.87
ROWS_KERNEL = "sm90_ws"


def _gluon_route(kernel: str | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int,
                 rows: int, ws_fits: bool, default: str) -> str | None:
    """The Gluon kernel `block_union_attention` runs ("sm90", "sm90_ws") or None (Triton): asked for by name
    (an error where it cannot run) or by default (`default`: `UNION_KERNEL` or `ROWS_KERNEL`) where it can.
    rows: the live rows of a 64-row tile; ws_fits: the lists fit the warp-specialised kernel's two halves."""
    if kernel not in (None, "triton", "sm90", "sm90_ws"):
        raise ValueError(f"kernel={kernel!r}; allowed: None, 'triton', 'sm90', 'sm90_ws'")
    want = default if kernel is None else kernel
    if want == "triton":
        return None
    from .block_union_sm90 import supports_block_union_sm90

    hopper = supports_block_union_sm90(q, k, v, block_size)
    if kernel == "sm90_ws" and not (hopper and ws_fits):
        raise ValueError(f"kernel='sm90_ws' needs CUDA on compute capability 9.x, bf16 / fp16 q, k, v, head dims 64 or "
                         f"128 (Dv = D), blocks of 64 keys, and row lists with query_block * G a multiple of 128 or "
                         f"per-token lists of tiles of at most 16 tokens in 64 rows; got {q.dtype}, D {q.shape[-1]}, "
                         f"Dv {v.shape[-1]}, block_size {block_size}, device {q.device}, ws_fits={ws_fits}")
    if want == "sm90_ws" and hopper and ws_fits:
        return "sm90_ws"
    fits = rows <= 64 and hopper
    if kernel == "sm90" and not fits:
        raise ValueError(f"kernel='sm90' needs CUDA on compute capability 9.x, bf16 / fp16 q, k, v, head dims 64 or "
                         f"128 (Dv = D), blocks of 64 keys and tiles of <= 64 rows; got {q.dtype}, D {q.shape[-1]}, "
                         f"Dv {v.shape[-1]}, block_size {block_size}, {rows} rows, device {q.device}")
    return "sm90" if fits else None

_ALLOCATOR_SET = False


def _ensure_tma_allocator() -> None:
    """In-kernel tensor descriptors need a global scratch allocator (Triton >= 3.4)."""
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET:
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _ALLOCATOR_SET = True


def block_union_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    counts: torch.Tensor,
    *,
    block_size: int,
    query_block: int = 1,
    q_offset: int | None = None,
    sm_scale: float | None = None,
    causal: bool = True,
    return_lse: bool = False,
    tokens_per_tile: int | None = None,
    block_m: int | None = None,
    flat_rows: bool | None = None,
    use_tma: bool | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    warp_specialize: bool = False,
    union: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    kernel: str | None = None,
    tile: dict | None = None,
):
    """Per-token block-sparse attention with union tiles (see the module docstring).

    Args:
        q [B, S, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv]; idx [B, Hsel, R, Kmax] int32
            (ascending, -1 padded), counts [B, Hsel, R]; R = ceil(S / query_block) (InfLLMv2:
            query_block = 1, a row per token); block_size: tokens per key block (a power of two
            >= 16); q_offset: key position of query 0 (default T - S). When QT divides
            query_block, a tile's tokens share one row: the kernel walks it directly (no union).
        tokens_per_tile / block_m: QT tokens per program (default `union_tile_config(G, block_m)`,
            block_m 64).
        flat_rows: tiles of block_m consecutive (token, head) rows of a kv head (default block_m
            `FLAT_BLOCK_M`) instead of whole tokens; needs query_block > 1 with query_block * G a
            multiple of block_m, so that a tile lies in one selection row and no row is padding
            whatever G is. None: on whenever that holds.
        use_tma: load K/V blocks through tensor descriptors (default: on CUDA when the head dims
            are powers of two; measured 12% faster on an H200, benchmarks/log_infllmv2_2026-12-02.md).
        num_warps, num_stages: override the tile's (token tiles `union_tile_config`, flat tiles 4 warps
            at M 64, 8 above, and `FLAT_STAGES`).
        warp_specialize: Triton's warp specialisation of the block loop (experimental).
        union: a precomputed `union_block_lists(idx, counts, QT)` (e.g. shared by several layers).
        kernel: "triton" (this module's kernel, any device), "sm90" (`block_union_sm90`, the Gluon
            kernel for Hopper: bf16 / fp16, head dims 64 / 128, blocks of 64, tiles of at most 64 rows),
            "sm90_ws" (`block_sm90_ws`: warp-specialised, two 64-row halves sharing each K / V block, on row
            lists whose 128-row flat tiles each lie in one selection row, i.e. query_block * G a multiple of
            128, or on the union of 2 QT tokens' lists, QT <= 16)
            or None: `UNION_KERNEL` / `ROWS_KERNEL` where they run, else Triton.
        tile: options of the Gluon kernel's tile (`SM90_UNION_TILE`, `SM90_WS_TILE`). num_warps / num_stages /
            warp_specialize / use_tma are the Triton kernel's knobs: given with kernel=None they
            select it, with kernel="sm90" they are refused.
    Returns out [B, S, Hq, Dv] (and lse [B, Hq, S] fp32 with return_lse).
    No index checks: the caller guarantees the contract (ascending, causally valid lists).
    """
    B, S, Hq, D = q.shape
    T, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    triton_knobs = {name: value for name, value in (("num_warps", num_warps), ("num_stages", num_stages),
                                                    ("use_tma", use_tma), ("warp_specialize", warp_specialize or None))
                    if value is not None}
    if triton_knobs and kernel in ("sm90", "sm90_ws"):
        raise ValueError(f"{triton_knobs} tune the Triton kernel; kernel={kernel!r} takes none of them")
    if triton_knobs and kernel is None:
        kernel = "triton"
    R = -(-S // query_block)
    if idx.dim() != 4 or idx.shape[0] != B or idx.shape[2] != R or idx.shape[1] not in (1, Hkv):
        raise ValueError(f"idx {tuple(idx.shape)} must be [B={B}, Hsel in (1, {Hkv}), R=ceil(S/query_block)={R}, Kmax]")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size={block_size}; allowed: a power of two >= 16")
    G = Hq // Hkv
    flat_m = FLAT_BLOCK_M if block_m is None else int(block_m)
    flat_pow2 = flat_m >= 16 and not flat_m & (flat_m - 1)
    if flat_rows and not flat_pow2:
        raise ValueError(f"block_m={flat_m} with flat_rows; allowed: a power of two >= 16")
    flat_fits = flat_pow2 and query_block > 1 and tokens_per_tile is None and (query_block * G) % flat_m == 0
    if flat_rows and not flat_fits:
        raise ValueError(f"flat_rows needs query_block * G ({query_block} * {G}) to be a multiple of block_m ({flat_m}) "
                         f"and tokens_per_tile unset (got {tokens_per_tile})")
    flat = flat_fits if flat_rows is None else bool(flat_rows)
    cfg = union_tile_config(G, 64 if block_m is None else block_m)
    if flat:
        cfg.update(BLOCK_M=flat_m, num_warps=4 if flat_m <= 64 else 8, num_stages=FLAT_STAGES)
    if tokens_per_tile is not None:
        cfg["tokens_per_tile"] = int(tokens_per_tile)
        cfg["BLOCK_M"] = max(16, _next_pow2(cfg["tokens_per_tile"] * G))
        cfg["num_warps"] = 4 if cfg["BLOCK_M"] <= 64 else 8
    if num_warps is not None:
        cfg["num_warps"] = num_warps
    if num_stages is not None:
        cfg["num_stages"] = num_stages
    qt = cfg["tokens_per_tile"]
    offset = (T - S) if q_offset is None else int(q_offset)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    row_lists = flat or (query_block > 1 and query_block % qt == 0)
    n_tiles = -(-S * G // cfg["BLOCK_M"]) if flat else -(-S // qt)
    out = torch.empty(B, S, Hq, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, S, dtype=torch.float32, device=q.device) if return_lse else out
    # the warp-specialised kernel's two halves: 128-row flat tiles in one selection row, or 2 QT tokens' union
    ws_fits = tokens_per_tile is None and (
        (row_lists and query_block > 1 and block_m in (None, 128) and flat_rows is not False
         and (query_block * G) % 128 == 0)
        or (not row_lists and union is None and qt <= 16 and qt * G <= 64))
    route = _gluon_route(kernel, q, k, v, block_size, cfg["BLOCK_M"] if flat else qt * G, ws_fits,
                         ROWS_KERNEL if row_lists else UNION_KERNEL)
    if tile is not None and route is None:
        raise ValueError(f"tile={tile} sets a Gluon kernel's tile; this call runs the Triton kernel")
    if row_lists:
        uidx, umask, ucount = idx.to(torch.int32).contiguous(), None, counts.to(torch.int32).contiguous()
    else:
        if union is None:
            union = union_block_lists(idx, counts, qt if route != "sm90_ws" else 2 * qt, n_units=-(-T // block_size),
                                      query_block=query_block, seq_q=S)
        uidx, umask, ucount = union
    if route == "sm90_ws":
        from .block_union_sm90 import block_sm90_ws

        block_sm90_ws(q, k, v, uidx, umask, ucount, out, lse if return_lse else None,
                      scale_log2=scale * 1.4426950408889634, q_offset=offset, causal=causal, row_lists=row_lists,
                      query_block=query_block, qt=qt, tile=tile)
        return (out, lse) if return_lse else out
    block_n = min(block_size, cfg["BLOCK_N"])
    dp, dvp = max(16, _next_pow2(D)), max(16, _next_pow2(Dv))
    on_gpu = q.is_cuda or compiling()  # compiling(): an ahead-of-time build of the GPU path (aot.py)
    use_tma = (on_gpu if use_tma is None else bool(use_tma)) and on_gpu and dp == D and dvp == Dv
    if route == "sm90":
        from .block_union_sm90 import block_union_sm90

        block_union_sm90(q, k, v, uidx, umask, ucount, out, lse if return_lse else None, n_tiles=n_tiles, G=G,
                         qt=qt, scale_log2=scale * 1.4426950408889634, q_offset=offset, causal=causal,
                         hsel_shared=idx.shape[1] == 1, row_lists=row_lists, query_block=query_block, flat=flat,
                         tile=tile)
        return (out, lse) if return_lse else out
    if use_tma:
        _ensure_tma_allocator()
    _block_union_fwd[(n_tiles, B * Hkv)](
        q, k, v, uidx, umask if umask is not None else uidx, ucount, out, lse,
        scale * 1.4426950408889634, S, T, offset,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        uidx.stride(0), uidx.stride(1), uidx.stride(2),
        ucount.stride(0), ucount.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0) if return_lse else 0, lse.stride(1) if return_lse else 0,
        Hkv,
        HSEL_SHARED=idx.shape[1] == 1, G=G, QT=qt, BLOCK_M=cfg["BLOCK_M"],
        BLOCK_SIZE=block_size, BLOCK_N=block_n, SUB=block_size // block_n,
        D=D, DP=dp, DV=Dv, DVP=dvp, CAUSAL=causal, RETURN_LSE=return_lse, USE_TMA=use_tma,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", WARP_SPECIALIZE=bool(warp_specialize),
        ROW_LISTS=row_lists, QUERY_BLOCK=query_block, FLAT_ROWS=flat,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return (out, lse) if return_lse else out
