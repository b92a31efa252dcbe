"""Block-sparse attention over union tiles for Hopper (sm_90), written in Gluon: the contract of
`block_union._block_union_fwd` (the same tiles, lists and masks) with the schedule written out.

    out, lse = block_union_attention(q, k, v, idx, counts, block_size=64, kernel="sm90", return_lse=True)

Why a second kernel. Triton compiles the block walk into: load K_j, V_j (pipelined), S_j = Q K_j^T,
wait for S_j, softmax, P_j V_j, wait for it, next step; the tensor cores stand idle while a program
takes its exponentials, and the two programs an SM overlap only by chance (0.72-0.75 of dense SDPA's
rate on the computed pairs, H200). Here each step runs in FlashAttention-3's intra-warpgroup order:
S_j = Q K_j^T and P_{j-1} V_{j-1} are issued together (P from registers, wgmma's A operand), step j's
softmax is written between the wait for S_j and the wait for P V, and both products are retired before
the next step. (ptxas moves the P V wait above the exponentials: in the sm_90 machine code the softmax
runs after P V, `stem-boost build --sass`; the gain measured below is the issue order and the TMA rings.) K and V blocks come through TMA into rings of NUM_BUF buffers each,
their block numbers read a step ahead. Measured (H200, BENCHMARKS.md): 33.7 against the Triton
kernel's 35.8 ms on MiniCPM-4.1's 128K lists, 0.77-0.79 of dense SDPA's rate in block mode against
0.72-0.75. Two first versions taught what to avoid: a product left in flight across the loop's back
edge makes ptxas serialise every wgmma of the kernel (note C7514 in `ptxas -v`; 1.17x slower than
Triton), and a block number loaded right before its TMA puts the load's latency in front of every
issue (5%).

Program roles (as the Triton kernel): axis 0 = query tile, heaviest (last) tiles first; axis 1 =
batch x kv head. A tile is QT whole tokens x the G heads of one kv head (row m = token m // G, head
m % G; a union list with a token bit mask per entry), or with FLAT_ROWS 64 consecutive (token, head)
rows of one selection row (no token mask). One warpgroup (4 warps), M = 64 rows, 64-key blocks;
head dims 64 or 128, bf16 / fp16. Only for CUDA on compute capability 9.x (Gluon has no CPU
interpreter); the Triton kernel is its oracle on the GPU (`tests/test_gpu_infllmv2.py`, the `sm90` tests) and
`stem-boost build` compiles it on any machine.

The warp-specialised kernel (`_block_ws_fwd`, `kernel="sm90_ws"`, the default for row lists). Two
64-row programs on an SM each stream their own copy of every K / V block from L2: at 460 TFLOP/s that is
about 7 TB/s, 64 FLOP a byte. Here a program holds two 64-row halves that walk one list (12 warps):

  producer (default partition, 4 warps)   every entry's K and V blocks by TMA into rings of NUM_BUF
                                          slots, as soon as both halves have released a slot
  consumer c = 0, 1 (4 warps each)        half c: the walk above on the shared rings (wait for the TMA,
                                          release K_j once S_j is retired, V_{j-1} once P V is), with
                                          PINGPONG the two halves taking turns to issue their products

so each block is read once per 128 rows. Row lists: flat tiles of 128 (token, head) rows in one selection
row (query_block * G a multiple of 128). Measured in block mode on an H200 (BENCHMARKS.md): 0.82-0.85 of
dense SDPA's rate at 32K and 0.90-0.92 at 128K, against the 64-row kernel's 0.77-0.81 / 0.83-0.87;
ping-pong 0.82-0.85 at every G where without it G = 6 fell to 0.79; a ring of 4 lost 5%.
Per-token lists (opt-in): a program of 2 QT tokens walks the union of their lists, each half computing
only the entries its own QT tokens selected and passing over the others (it waits for their landing, which
keeps it on every phase of a slot's barrier, and releases them); a half stops a whole ring past its last
entry even where it selected nothing there (scores all masked), or the producer would wait for that
entry's V slot while the half waits for the producer. On MiniCPM-4.1's 128K lists it was 1.02x slower than
the 64-row kernel (the union of 8 tokens is 1.39 of their lists against 1.20 for 4), so per-token lists
keep the 64-row kernel.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .aot import compiling
from .gluon_shims import cta_barrier as _cta_barrier
from .gluon_shims import tma_load as _tma_load
from .gluon_softmax import finite_max
from .warp_rows import interpreting

__all__ = ["block_union_sm90", "block_sm90_ws", "supports_block_union_sm90", "SM90_UNION_TILE", "SM90_WS_TILE", "WS_ROWS"]

SM90_UNION_TILE = dict(NUM_BUF=3)  # K / V ring depth (3 x 2 x 16 KB + Q 16 KB at d 128: two programs an SM)
# the warp-specialised tile (`_block_ws_fwd`): ring depth (5 x 32 KB + Q 2 x 16 KB at d 128: one program an
# SM; 4 measured 5% slower, 6 does not fit), registers of a consumer thread (the producer warpgroup gets the
# rest of 64K: 48 at 232), and whether the consumers take turns issuing their products (FlashAttention-3's
# ping-pong; row lists only)
SM90_WS_TILE = dict(NUM_BUF=5, CONSUMER_REGS=232, PINGPONG=True)
WS_ROWS = 128  # rows of a warp-specialised program: two consumer warpgroups of 64
ROWS, KEYS = 64, 64  # rows a program (one warpgroup), keys a step (one key block)
BLOCK_M = gl.constexpr(ROWS)
BLOCK_N = gl.constexpr(KEYS)


@gluon.jit
def _tile_rows(m, pid_t, t0, kvh, S, G: gl.constexpr, QT: gl.constexpr, FLAT_ROWS: gl.constexpr):
    """Rows m (in any layout) of query tile pid_t -> (token, query head, whether the row is stored): whole
    tokens from t0 (row m = token t0 + m // G, head m % G; rows past QT tokens are padding), or with
    FLAT_ROWS the tile's consecutive (token, head) rows of the kv head."""
    if FLAT_ROWS:
        flat = pid_t * BLOCK_M + m
        tok = flat // G
        head = kvh * G + flat % G
        ok = tok < S
    else:
        tok = t0 + m // G
        head = kvh * G + m % G
        ok = (m < QT * G) & (tok < S)
    return tok, head, ok


@gluon.jit
def _program_tile(HKV, HSEL_SHARED: gl.constexpr):
    """This program's (query tile, batch, kv head, selection head): axis 0 = query tile, the last (heaviest)
    first; axis 1 = batch x kv head; the selection head is 0 where every kv head shares one list."""
    pid_t = gl.num_programs(0) - 1 - gl.program_id(0)
    pid_bh = gl.program_id(1)
    kvh = pid_bh % HKV
    b = pid_bh // HKV
    if HSEL_SHARED:
        sel_h = 0
    else:
        sel_h = kvh
    return pid_t, b, kvh, sel_h


@gluon.jit
def _entry(LIST, u_off, e, n):
    """Entry e of a list (its key block, or its token bits; 0 past the list: e >= n)."""
    return gl.load(LIST + u_off + e, mask=e < n, other=0)


@gluon.jit
def _issue_kv(desc, ring, ready, e, blk, n, b, kvh, T, HKV, D: gl.constexpr, HEAD_MAJOR: gl.constexpr,
              NUM_BUF: gl.constexpr):
    """TMA of union entry e (key block blk) into ring slot e % NUM_BUF (nothing for e >= n), at
    [row, column] of the 2-D view of K or V: [B * Hkv * T, D] (HEAD_MAJOR, a [B, Hkv, T, D] tensor)
    or [B * T, Hkv * D] ([B, T, Hkv, D])."""
    live = e < n
    if HEAD_MAJOR:
        row = (b * HKV + kvh) * T + blk * BLOCK_N
        col = 0
    else:
        row = b * T + blk * BLOCK_N
        col = kvh * D
    slot = e % NUM_BUF
    mbarrier.expect(ready.index(slot), BLOCK_N * D * 2, pred=live)  # bytes: 16-bit elements
    _tma_load(desc, [row, col], ready.index(slot), ring.index(slot), pred=live)


@gluon.jit
def _softmax_step(qk, m_i, l_i, UIDX, UMASK, u_off, j, n, full_bits, tin, qpos, offs_n, t0, q_offset, T, qk_scale_log2,
                  dtype: gl.constexpr, p_layout: gl.constexpr, CAUSAL: gl.constexpr, ROW_LISTS: gl.constexpr):
    """Step j's online softmax (`_softmax_masked`) with entry j's block and token bits read here (every score
    masked for j >= n)."""
    live = j < n
    blk = gl.load(UIDX + u_off + j, mask=live, other=0)
    if ROW_LISTS:
        bits = gl.where(live, full_bits, 0)
    else:
        bits = gl.load(UMASK + u_off + j, mask=live, other=0)
    return _softmax_masked(qk, m_i, l_i, blk, bits, full_bits, tin, qpos, offs_n, t0, q_offset, T, qk_scale_log2,
                           dtype, p_layout, CAUSAL, ROW_LISTS)


@gluon.jit
def _softmax_masked(qk, m_i, l_i, blk, bits, full_bits, tin, qpos, offs_n, t0, q_offset, T, qk_scale_log2,
                    dtype: gl.constexpr, p_layout: gl.constexpr, CAUSAL: gl.constexpr, ROW_LISTS: gl.constexpr):
    """The online softmax (log2 units) of the scores qk [M, BLOCK_N] of key block blk: the token / causal /
    range mask only where some row's token is not in `bits` (bit t: the tile's token t0 + t selected the
    block) or the keys cross the diagonal or T. Returns (P [M, BLOCK_N] in registers as wgmma's A operand,
    the factor that rescales O so far, the new row max, the new row sum)."""
    s = qk  # scaled inside the exponent: one FMA a score
    kstart = blk * BLOCK_N
    if CAUSAL:
        crosses = kstart + BLOCK_N - 1 > t0 + q_offset
    else:
        crosses = kstart + BLOCK_N - 1 >= T
    if crosses | ((bits & full_bits) != full_bits):
        kpos = kstart + offs_n
        if ROW_LISTS:
            keep = gl.expand_dims(kpos < T, 0) & gl.expand_dims((tin >= 0) & (bits != 0), 1)
        else:
            keep = gl.expand_dims(((bits >> tin) & 1) != 0, 1) & gl.expand_dims(kpos < T, 0)
        if CAUSAL:
            keep = keep & (gl.expand_dims(kpos, 0) <= gl.expand_dims(qpos, 1))
        s = gl.where(keep, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale_log2)  # the scale is > 0
    m_safe = finite_max(m_new)
    p = gl.exp2(s * qk_scale_log2 - gl.expand_dims(m_safe, 1))
    alpha = gl.exp2(m_i - m_safe)
    l_new = l_i * alpha + gl.sum(p, axis=1)
    return gl.convert_layout(p.to(dtype), p_layout), alpha, m_new, l_new


@gluon.jit
def _load_q_rows(Q, q_tile, pid_t, t0, kvh, b, S, stride_qb, stride_qs, stride_qh, G: gl.constexpr,
                 QT: gl.constexpr, FLAT_ROWS: gl.constexpr, D: gl.constexpr):
    """Query tile pid_t's 64 rows [64, D] (`_tile_rows`) into shared memory, fenced for wgmma (rows past S read
    row S - 1, never stored)."""
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])  # 16-byte loads
    tok_ld, head_ld, _ = _tile_rows(gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld_layout)), pid_t, t0, kvh, S,
                                    G, QT, FLAT_ROWS)
    tok_ld = gl.minimum(tok_ld, S - 1)
    d_ld = gl.arange(0, D, layout=gl.SliceLayout(0, ld_layout))
    q_rows = Q + b.to(gl.int64) * stride_qb + tok_ld.to(gl.int64) * stride_qs + head_ld.to(gl.int64) * stride_qh
    q_tile.store(gl.load(q_rows[:, None] + d_ld[None, :]))
    fence_async_shared()


@gluon.jit
def _store_rows(acc, m_i, l_i, O, LSE, pid_t, t0, kvh, b, S, tok_s, head_s, ok_s, stride_ob, stride_os, stride_oh,
                stride_lb, stride_lh, G: gl.constexpr, QT: gl.constexpr, FLAT_ROWS: gl.constexpr, DV: gl.constexpr,
                RETURN_LSE: gl.constexpr, rows_o: gl.constexpr):
    """Query tile pid_t's epilogue: O = acc / l (rows that saw no key: zeros) and lse in natural log, its live
    rows (tok_s, head_s, ok_s: `_tile_rows` in the score layout)."""
    l_div = gl.where(l_i == 0.0, 1.0, l_i)
    out = (acc / gl.expand_dims(gl.convert_layout(l_div, rows_o), 1)).to(O.dtype.element_ty)
    st_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    out = gl.convert_layout(out, st_layout)
    tok_st, head_st, ok_st = _tile_rows(gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, st_layout)), pid_t, t0, kvh,
                                        S, G, QT, FLAT_ROWS)
    dv = gl.arange(0, DV, layout=gl.SliceLayout(0, st_layout))
    o_rows = O + b.to(gl.int64) * stride_ob + tok_st.to(gl.int64) * stride_os + head_st.to(gl.int64) * stride_oh
    gl.store(o_rows[:, None] + dv[None, :], out, mask=gl.expand_dims(ok_st, 1))
    if RETURN_LSE:
        lse = gl.where(l_i == 0.0, float("-inf"), (finite_max(m_i) + gl.log2(l_div)) * 0.6931471805599453)
        gl.store(LSE + b.to(gl.int64) * stride_lb + head_s.to(gl.int64) * stride_lh + tok_s, lse, mask=ok_s)


@gluon.jit
def _block_union_sm90_fwd(
    Q, k_desc, v_desc, UIDX, UMASK, UCNT, O, LSE,
    qk_scale_log2, S, T, q_offset,
    stride_qb, stride_qs, stride_qh,
    stride_ub, stride_uh, stride_ut,
    stride_nb, stride_nh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    HKV,
    HSEL_SHARED: gl.constexpr, G: gl.constexpr, QT: gl.constexpr, D: gl.constexpr, DV: gl.constexpr,
    CAUSAL: gl.constexpr, RETURN_LSE: gl.constexpr, ROW_LISTS: gl.constexpr, QUERY_BLOCK: gl.constexpr,
    FLAT_ROWS: gl.constexpr, K_HEAD_MAJOR: gl.constexpr, V_HEAD_MAJOR: gl.constexpr, NUM_BUF: gl.constexpr,
):
    gl.static_assert(gl.num_warps() == 4, "one warpgroup")
    gl.static_assert(NUM_BUF >= 3, "the tested depth: each load issued two steps before its product")
    dtype: gl.constexpr = Q.dtype.element_ty
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, DV, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)  # P as wgmma's A
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    cols_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    q_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], dtype)

    # ---- program -> (query tile, batch, kv head, selection head); heaviest tiles first
    pid_t, b, kvh, sel_h = _program_tile(HKV, HSEL_SHARED)
    if FLAT_ROWS:
        t0 = (pid_t * BLOCK_M) // G
    else:
        t0 = pid_t * QT
    n_tok = gl.minimum(S - t0, QT)
    full_bits = gl.where(n_tok >= 32, -1, (1 << gl.minimum(n_tok, 31)) - 1)  # the bits of the tile's tokens
    if ROW_LISTS:
        urow = t0 // QUERY_BLOCK
    else:
        urow = pid_t
    u_off = b.to(gl.int64) * stride_ub + sel_h * stride_uh + urow.to(gl.int64) * stride_ut
    n = gl.load(UCNT + b * stride_nb + sel_h * stride_nh + urow)

    # ---- shared memory and barriers: Q, the K and V rings
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, D], q_smem_layout)
    k_ring = gl.allocate_shared_memory(dtype, [NUM_BUF, BLOCK_N, D], k_desc.layout)
    v_ring = gl.allocate_shared_memory(dtype, [NUM_BUF, BLOCK_N, DV], v_desc.layout)
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_BUF):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
    fence_async_shared()
    for e in gl.static_range(NUM_BUF):  # K_0 .. K_{NUM_BUF-1}, V_0 .. V_{NUM_BUF-1}
        blk_e = _entry(UIDX, u_off, e, n)
        _issue_kv(k_desc, k_ring, k_ready, e, blk_e, n, b, kvh, T, HKV, D, K_HEAD_MAJOR, NUM_BUF)
        _issue_kv(v_desc, v_ring, v_ready, e, blk_e, n, b, kvh, T, HKV, DV, V_HEAD_MAJOR, NUM_BUF)
    # the blocks of the next K and V loads, read one step before their TMA (the load's latency off the path)
    k_blk = _entry(UIDX, u_off, NUM_BUF, n)
    v_blk = _entry(UIDX, u_off, NUM_BUF, n)

    # ---- the tile's query rows [BLOCK_M, D] (rows past the tile's tokens read a real row, never stored)
    _load_q_rows(Q, q_smem, pid_t, t0, kvh, b, S, stride_qb, stride_qs, stride_qh, G, QT, FLAT_ROWS, D)

    # ---- each row's token (inside the tile) and key position, in the score layout
    tok_s, head_s, ok_s = _tile_rows(gl.arange(0, BLOCK_M, layout=rows_s), pid_t, t0, kvh, S, G, QT, FLAT_ROWS)
    tin = tok_s - t0
    qpos = tok_s + q_offset
    offs_n = gl.arange(0, BLOCK_N, layout=cols_s)

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=rows_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=rows_s)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    acc = gl.zeros([BLOCK_M, DV], gl.float32, layout=o_layout)

    # ---- step 0's scores and softmax (with no entry, n = 0: every score masked, P = 0)
    mbarrier.wait(k_ready.index(0), 0, pred=n > 0)
    qk = warpgroup_mma(q_smem, k_ring.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    qk = warpgroup_mma_wait(0, deps=(qk,))
    _issue_kv(k_desc, k_ring, k_ready, NUM_BUF, k_blk, n, b, kvh, T, HKV, D, K_HEAD_MAJOR, NUM_BUF)
    k_blk = _entry(UIDX, u_off, NUM_BUF + 1, n)
    p_regs, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, UIDX, UMASK, u_off, 0, n, full_bits, tin, qpos, offs_n,
                                            t0, q_offset, T, qk_scale_log2, dtype, p_layout, CAUSAL, ROW_LISTS)
    # ---- step j (FlashAttention-3's order): S_j and P_{j-1} V_{j-1} issued together, step j's softmax
    # under P V, both retired before the next step (no product in flight across the loop's back edge,
    # which ptxas would answer by serialising every product, C7514)
    for j in range(1, n):
        slot = j % NUM_BUF
        prev = (j - 1) % NUM_BUF
        mbarrier.wait(k_ready.index(slot), (j // NUM_BUF) & 1)
        qk = warpgroup_mma(q_smem, k_ring.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, rows_o), 1)
        mbarrier.wait(v_ready.index(prev), ((j - 1) // NUM_BUF) & 1)
        acc = warpgroup_mma(p_regs, v_ring.index(prev), acc, is_async=True)
        qk = warpgroup_mma_wait(1, deps=(qk,))  # S_j done
        p_regs, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, UIDX, UMASK, u_off, j, n, full_bits, tin, qpos,
                                                offs_n, t0, q_offset, T, qk_scale_log2, dtype, p_layout, CAUSAL, ROW_LISTS)
        acc = warpgroup_mma_wait(0, deps=(acc,))  # P V_{j-1} done
        # K_j's slot takes K_{j+NUM_BUF}, V_{j-1}'s V_{j-1+NUM_BUF} (side by side: one set of CTA barriers)
        _issue_kv(k_desc, k_ring, k_ready, j + NUM_BUF, k_blk, n, b, kvh, T, HKV, D, K_HEAD_MAJOR, NUM_BUF)
        k_blk = _entry(UIDX, u_off, j + NUM_BUF + 1, n)
        _issue_kv(v_desc, v_ring, v_ready, j - 1 + NUM_BUF, v_blk, n, b, kvh, T, HKV, DV, V_HEAD_MAJOR, NUM_BUF)
        v_blk = _entry(UIDX, u_off, j + NUM_BUF, n)
    if n > 0:  # the last step's P V
        last = (n - 1) % NUM_BUF
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, rows_o), 1)
        mbarrier.wait(v_ready.index(last), ((n - 1) // NUM_BUF) & 1)
        acc = warpgroup_mma(p_regs, v_ring.index(last), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc,))
    for i in gl.static_range(NUM_BUF):
        mbarrier.invalidate(k_ready.index(i))
        mbarrier.invalidate(v_ready.index(i))

    # ---- epilogue: O = acc / l (rows that saw no key: zeros), lse in natural log
    _store_rows(acc, m_i, l_i, O, LSE, pid_t, t0, kvh, b, S, tok_s, head_s, ok_s, stride_ob, stride_os, stride_oh,
                stride_lb, stride_lh, G, QT, FLAT_ROWS, DV, RETURN_LSE, rows_o)


@gluon.jit
def _ws_producer(k_desc, v_desc, k_ring, v_ring, k_ready, v_ready, k_free, v_free, UIDX, u_off, n, b, kvh, T, HKV,
                 D: gl.constexpr, DV: gl.constexpr, K_HEAD_MAJOR: gl.constexpr, V_HEAD_MAJOR: gl.constexpr,
                 NUM_BUF: gl.constexpr):
    """Default partition (4 warps, few registers): entry e's K and V blocks by TMA into ring slot e % NUM_BUF
    as soon as both consumers have released the slot's previous block (K after its scores, V after its P V).
    The next entry's block number is read under this entry's waits."""
    blk = _entry(UIDX, u_off, 0, n)
    for e in range(n):
        upcoming = _entry(UIDX, u_off, e + 1, n)
        slot = e % NUM_BUF
        free_phase = ((e // NUM_BUF) & 1) ^ 1  # the first pass over the ring finds every slot free
        mbarrier.wait(k_free.index(slot), free_phase)
        _issue_kv(k_desc, k_ring, k_ready, e, blk, n, b, kvh, T, HKV, D, K_HEAD_MAJOR, NUM_BUF)
        mbarrier.wait(v_free.index(slot), free_phase)
        _issue_kv(v_desc, v_ring, v_ready, e, blk, n, b, kvh, T, HKV, DV, V_HEAD_MAJOR, NUM_BUF)
        blk = upcoming


@gluon.jit
def _release(bar):
    """Every thread of this consumer is past its reads of a slot (one partition barrier), then one arrival."""
    _cta_barrier()
    mbarrier.arrive(bar, count=1)


@gluon.jit
def _take_turn(turn, c: gl.constexpr, step, PINGPONG: gl.constexpr):
    """Ping-pong: consumer c waits until the other consumer has issued its products of the step before
    (consumer 0 goes first), so that one consumer's softmax runs under the other's products."""
    if PINGPONG:
        mbarrier.wait(turn.index(c), (step & 1) ^ (1 - c))


@gluon.jit
def _pass_turn(turn, c: gl.constexpr, PINGPONG: gl.constexpr):
    """Ping-pong: this consumer's products of the step are issued; the other consumer's turn."""
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - c), count=1)


@gluon.jit
def _ws_consumer(c: gl.constexpr, Q, O, LSE, q_smem, k_ring, v_ring, k_ready, v_ready, k_free, v_free, turn,
                 UIDX, UMASK, u_off, n, pid_t, b, kvh, S, T, q_offset, qk_scale_log2,
                 stride_qb, stride_qs, stride_qh, stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
                 G: gl.constexpr, QT: gl.constexpr, D: gl.constexpr, DV: gl.constexpr, CAUSAL: gl.constexpr,
                 RETURN_LSE: gl.constexpr, ROW_LISTS: gl.constexpr, NUM_BUF: gl.constexpr, PINGPONG: gl.constexpr):
    """Consumer c (4 warps): the 64-row half c of the program's tile, walked in `_block_union_sm90_fwd`'s order
    (S_j and P_{j-1} V_{j-1} issued together, step j's softmax under P V) on the shared K / V rings: it waits
    for each block's TMA and releases K_j once S_j is retired, V_{j-1} once P V is.
    Row lists (flat rows [64 c, 64 c + 64) of 128): every entry for every row, optionally in turns with the
    other consumer (PINGPONG). Union lists (tokens [QT c, QT c + QT) of 2 QT): the products only for the
    entries one of this half's tokens selected (and one a whole ring past the last such), the others waited
    for and released unread."""
    dtype: gl.constexpr = Q.dtype.element_ty
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, DV, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    cols_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    half = pid_t * 2 + c  # this consumer's 64-row tile
    if ROW_LISTS:
        t0 = (half * BLOCK_M) // G
    else:
        t0 = half * QT
    q_own = q_smem.index(c)
    _load_q_rows(Q, q_own, half, t0, kvh, b, S, stride_qb, stride_qs, stride_qh, G, QT, ROW_LISTS, D)
    _cta_barrier()  # every thread's rows stored before this half's first product

    tok_s, head_s, ok_s = _tile_rows(gl.arange(0, BLOCK_M, layout=rows_s), half, t0, kvh, S, G, QT, ROW_LISTS)
    tin = tok_s - t0
    qpos = tok_s + q_offset
    offs_n = gl.arange(0, BLOCK_N, layout=cols_s)
    if ROW_LISTS:
        full_bits = gl.where(t0 < S, 1, 0)  # a live entry holds for every row (bit 0), none past S
    else:
        n_tok = gl.maximum(gl.minimum(S - t0, QT), 0)
        full_bits = (1 << n_tok) - 1  # this half's tokens (QT <= 16)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=rows_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=rows_s)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    acc = gl.zeros([BLOCK_M, DV], gl.float32, layout=o_layout)

    if ROW_LISTS:
        # ---- step 0: S_0 and its softmax
        if n > 0:
            mbarrier.wait(k_ready.index(0), 0)
            _take_turn(turn, c, 0, PINGPONG)
            qk = warpgroup_mma(q_own, k_ring.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            _pass_turn(turn, c, PINGPONG)
            qk = warpgroup_mma_wait(0, deps=(qk,))
            _release(k_free.index(0))
        else:
            qk = s_zero
        p_regs, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, UIDX, UMASK, u_off, 0, n, full_bits, tin, qpos, offs_n,
                                                t0, q_offset, T, qk_scale_log2, dtype, p_layout, CAUSAL, True)
        # ---- step j: S_j and P_{j-1} V_{j-1} (in this consumer's turn), step j's softmax under P V
        for j in range(1, n):
            slot = j % NUM_BUF
            prev = (j - 1) % NUM_BUF
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, rows_o), 1)
            mbarrier.wait(k_ready.index(slot), (j // NUM_BUF) & 1)
            mbarrier.wait(v_ready.index(prev), ((j - 1) // NUM_BUF) & 1)
            _take_turn(turn, c, j, PINGPONG)
            qk = warpgroup_mma(q_own, k_ring.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            acc = warpgroup_mma(p_regs, v_ring.index(prev), acc, is_async=True)
            _pass_turn(turn, c, PINGPONG)
            qk = warpgroup_mma_wait(1, deps=(qk,))  # S_j done
            _release(k_free.index(slot))
            p_regs, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, UIDX, UMASK, u_off, j, n, full_bits, tin, qpos,
                                                    offs_n, t0, q_offset, T, qk_scale_log2, dtype, p_layout, CAUSAL,
                                                    True)
            acc = warpgroup_mma_wait(0, deps=(acc,))  # P V_{j-1} done
            _release(v_free.index(prev))
        last_e = n - 1
    else:
        # ---- this half's first entry (usually entry 0: InfLLMv2 forces the first blocks): S and its softmax
        # (no entry at all: every score masked, P = 0)
        first, mine = _next_own_entry(UMASK, u_off, -1, n, c * QT, full_bits, n, k_ready, v_ready, k_free, v_free,
                                      NUM_BUF)
        if first < n:
            slot0 = first % NUM_BUF
            mbarrier.wait(k_ready.index(slot0), (first // NUM_BUF) & 1)
            qk = warpgroup_mma(q_own, k_ring.index(slot0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            qk = warpgroup_mma_wait(0, deps=(qk,))
            _release(k_free.index(slot0))
        else:
            qk = s_zero
        p_regs, alpha, m_i, l_i = _softmax_masked(qk, m_i, l_i, _entry(UIDX, u_off, first, n), mine, full_bits,
                                                  tin, qpos, offs_n, t0, q_offset, T, qk_scale_log2, dtype, p_layout,
                                                  CAUSAL, False)
        # ---- this half's next entry e: S_e and the P V of its previous one, pe, together (no branch around the
        # products: a product under a branch inside the loop makes ptxas serialise them, note C7513). The walk
        # stops a whole ring past pe even where no token of the half selected that entry (its scores all
        # masked): the producer needs V_pe's slot back to load it, and the half could not wait for it otherwise.
        pe = first
        e, mine = _next_own_entry(UMASK, u_off, first, n, c * QT, full_bits, first + NUM_BUF, k_ready, v_ready,
                                  k_free, v_free, NUM_BUF)
        while e < n:
            slot = e % NUM_BUF
            prev = pe % NUM_BUF
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, rows_o), 1)
            mbarrier.wait(k_ready.index(slot), (e // NUM_BUF) & 1)
            mbarrier.wait(v_ready.index(prev), (pe // NUM_BUF) & 1)
            qk = warpgroup_mma(q_own, k_ring.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            acc = warpgroup_mma(p_regs, v_ring.index(prev), acc, is_async=True)
            qk = warpgroup_mma_wait(1, deps=(qk,))  # S_e done
            _release(k_free.index(slot))
            p_regs, alpha, m_i, l_i = _softmax_masked(qk, m_i, l_i, gl.load(UIDX + u_off + e), mine, full_bits, tin,
                                                      qpos, offs_n, t0, q_offset, T, qk_scale_log2, dtype, p_layout,
                                                      CAUSAL, False)
            acc = warpgroup_mma_wait(0, deps=(acc,))  # P V_pe done
            _release(v_free.index(prev))
            pe = e
            e, mine = _next_own_entry(UMASK, u_off, e, n, c * QT, full_bits, e + NUM_BUF, k_ready, v_ready, k_free,
                                      v_free, NUM_BUF)
        last_e = gl.where(first < n, pe, -1)
    if last_e >= 0:  # the last entry's P V
        last = last_e % NUM_BUF
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, rows_o), 1)
        mbarrier.wait(v_ready.index(last), (last_e // NUM_BUF) & 1)
        _take_turn(turn, c, n, PINGPONG)
        acc = warpgroup_mma(p_regs, v_ring.index(last), acc, is_async=True)
        _pass_turn(turn, c, PINGPONG)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        _release(v_free.index(last))
    _store_rows(acc, m_i, l_i, O, LSE, half, t0, kvh, b, S, tok_s, head_s, ok_s, stride_ob, stride_os, stride_oh,
                stride_lb, stride_lh, G, QT, ROW_LISTS, DV, RETURN_LSE, rows_o)


@gluon.jit
def _next_own_entry(UMASK, u_off, e, n, shift, full_bits, limit, k_ready, v_ready, k_free, v_free,
                    NUM_BUF: gl.constexpr):
    """(The first union entry after e that one of this half's tokens selected, n, or `limit` if that comes
    first; its token bits shifted to this half's: 0 where the walk stops at `limit` on an entry none of its
    tokens selected). The entries passed over are waited for and released (`_pass_entry`)."""
    e += 1
    mine = (_entry(UMASK, u_off, e, n) >> shift) & full_bits
    while (e < n) & (mine == 0) & (e < limit):
        _pass_entry(k_ready, v_ready, k_free, v_free, e, NUM_BUF)
        e += 1
        mine = (_entry(UMASK, u_off, e, n) >> shift) & full_bits
    return e, mine


@gluon.jit
def _pass_entry(k_ready, v_ready, k_free, v_free, e, NUM_BUF: gl.constexpr):
    """Release entry e's K and V slots unread, once both have landed. Waiting keeps this half on every phase of
    every slot (a wait by parity is only right one phase behind) and keeps it from arriving twice on a slot's
    barrier before the other half arrives once."""
    slot = e % NUM_BUF
    phase = (e // NUM_BUF) & 1
    mbarrier.wait(k_ready.index(slot), phase)
    mbarrier.arrive(k_free.index(slot), count=1)
    mbarrier.wait(v_ready.index(slot), phase)
    mbarrier.arrive(v_free.index(slot), count=1)


@gluon.jit
def _block_ws_fwd(
    Q, k_desc, v_desc, UIDX, UMASK, UCNT, O, LSE,
    qk_scale_log2, S, T, q_offset,
    stride_qb, stride_qs, stride_qh,
    stride_ub, stride_uh, stride_ut,
    stride_nb, stride_nh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    HKV,
    HSEL_SHARED: gl.constexpr, G: gl.constexpr, QT: gl.constexpr, D: gl.constexpr, DV: gl.constexpr,
    CAUSAL: gl.constexpr, RETURN_LSE: gl.constexpr, ROW_LISTS: gl.constexpr, QUERY_BLOCK: gl.constexpr,
    K_HEAD_MAJOR: gl.constexpr, V_HEAD_MAJOR: gl.constexpr, NUM_BUF: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, PINGPONG: gl.constexpr,
):
    """Two 64-row halves a program, warp-specialised: a producer warpgroup streams one list's K and V blocks
    by TMA into rings shared by two consumer warpgroups, so each block is read from L2 once per two halves.
    ROW_LISTS: flat tiles of 128 (token, head) rows of one selection row. Else: 2 QT tokens x G heads on the
    union of their lists (`union_block_lists` with 2 QT tokens a tile), each half computing only the entries
    its own QT tokens selected."""
    gl.static_assert(NUM_BUF >= 2, "a ring of at least two slots")
    dtype: gl.constexpr = Q.dtype.element_ty
    q_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], dtype)
    # ---- program -> (tile of two halves, batch, kv head, selection head); heaviest tiles first
    pid_t, b, kvh, sel_h = _program_tile(HKV, HSEL_SHARED)
    if ROW_LISTS:
        urow = ((pid_t * 2 * BLOCK_M) // G) // QUERY_BLOCK  # the tile's 128 rows lie in one selection row
    else:
        urow = pid_t  # the union of the tile's 2 QT tokens
    u_off = b.to(gl.int64) * stride_ub + sel_h * stride_uh + urow.to(gl.int64) * stride_ut
    n = gl.load(UCNT + b * stride_nb + sel_h * stride_nh + urow)

    q_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, D], q_smem_layout)
    k_ring = gl.allocate_shared_memory(dtype, [NUM_BUF, BLOCK_N, D], k_desc.layout)
    v_ring = gl.allocate_shared_memory(dtype, [NUM_BUF, BLOCK_N, DV], v_desc.layout)
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    k_free = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    v_free = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_BUF):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_free.index(i), count=2)  # one arrival per consumer
        mbarrier.init(v_free.index(i), count=2)
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    fence_async_shared()

    # The argument tuples are written inline: a tuple held in a variable turns its constexprs into runtime values.
    gl.warp_specialize([
        (_ws_producer, (k_desc, v_desc, k_ring, v_ring, k_ready, v_ready, k_free, v_free, UIDX, u_off, n, b, kvh, T,
                        HKV, D, DV, K_HEAD_MAJOR, V_HEAD_MAJOR, NUM_BUF)),
        (_ws_consumer, (0, Q, O, LSE, q_smem, k_ring, v_ring, k_ready, v_ready, k_free, v_free, turn, UIDX, UMASK,
                        u_off, n, pid_t, b, kvh, S, T, q_offset, qk_scale_log2, stride_qb, stride_qs, stride_qh,
                        stride_ob, stride_os, stride_oh, stride_lb, stride_lh, G, QT, D, DV, CAUSAL, RETURN_LSE,
                        ROW_LISTS, NUM_BUF, PINGPONG)),
        (_ws_consumer, (1, Q, O, LSE, q_smem, k_ring, v_ring, k_ready, v_ready, k_free, v_free, turn, UIDX, UMASK,
                        u_off, n, pid_t, b, kvh, S, T, q_offset, qk_scale_log2, stride_qb, stride_qs, stride_qh,
                        stride_ob, stride_os, stride_oh, stride_lb, stride_lh, G, QT, D, DV, CAUSAL, RETURN_LSE,
                        ROW_LISTS, NUM_BUF, PINGPONG)),
    ], [4, 4], [CONSUMER_REGS, CONSUMER_REGS])


def supports_block_union_sm90(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> bool:
    """Whether `block_union_sm90` runs these tensors: CUDA on compute capability 9.x (not the
    interpreter; or an ahead-of-time sm_90 build, `aot.compiling`), bf16 / fp16, q / k / v of one dtype,
    head dims 64 or 128 (Dv = D), key blocks of 64."""
    on_hopper = compiling() or (q.is_cuda and not interpreting()
                                and torch.cuda.get_device_capability(q.device)[0] == 9)
    return (on_hopper and q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype and v.dtype == q.dtype
            and q.shape[-1] in (64, 128) and v.shape[-1] == q.shape[-1] and block_size == KEYS)


def _kv_view(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A 2-D view of K or V [B, T, Hkv, D] for TMA: ([B * Hkv * T, D], True) when the memory is
    [B, Hkv, T, D]-contiguous (a transposed HF tensor), else ([B * T, Hkv * D], False) (copied to
    contiguous first if it is not)."""
    B, T, H, D = t.shape
    if t.stride(3) == 1 and t.stride(2) == T * D and t.stride(1) == D and t.stride(0) == H * T * D:
        return t.transpose(1, 2).reshape(B * H * T, D), True
    t = t.contiguous()
    return t.view(B * T, H * D), False


def _walk_args(q, k_desc, v_desc, uidx, umask, ucount, out, lse, scale_log2: float, q_offset: int, T: int,
               Hkv: int) -> tuple:
    """The positional arguments both block walks take, in their order (tensors, scalars, strides, Hkv)."""
    return (q, k_desc, v_desc, uidx, umask if umask is not None else uidx, ucount, out, lse if lse is not None else out,
            scale_log2, q.shape[1], T, q_offset,
            q.stride(0), q.stride(1), q.stride(2),
            uidx.stride(0), uidx.stride(1), uidx.stride(2),
            ucount.stride(0), ucount.stride(1),
            out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0) if lse is not None else 0, lse.stride(1) if lse is not None else 0,
            Hkv)


def _tile_config(default: dict, tile: dict | None) -> dict:
    """`default` with the options of `tile`; an unknown option is refused by name."""
    unknown = set(tile or {}) - set(default)
    if unknown:
        raise ValueError(f"unknown tile options {sorted(unknown)}; allowed: {sorted(default)}")
    return dict(default, **(tile or {}))


def _kv_descriptors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """TMA descriptors of 64-key blocks of K and V (`_kv_view`): (k_desc, k head-major, v_desc, v head-major)."""
    D, Dv = k.shape[3], v.shape[3]
    k2, k_head_major = _kv_view(k)
    v2, v_head_major = _kv_view(v)
    dt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    k_desc = TensorDescriptor.from_tensor(k2, [KEYS, D], gl.NVMMASharedLayout.get_default_for([KEYS, D], dt))
    v_desc = TensorDescriptor.from_tensor(v2, [KEYS, Dv], gl.NVMMASharedLayout.get_default_for([KEYS, Dv], dt))
    return k_desc, k_head_major, v_desc, v_head_major


def block_sm90_ws(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, uidx: torch.Tensor, umask: torch.Tensor | None,
                  ucount: torch.Tensor, out: torch.Tensor, lse: torch.Tensor | None, *, scale_log2: float,
                  q_offset: int, causal: bool, row_lists: bool, query_block: int, qt: int = 0,
                  tile: dict | None = None) -> None:
    """Launch the warp-specialised kernel and write out [B, S, Hq, Dv] (and lse [B, Hq, S]).

    row_lists: uidx / ucount are the row lists idx [B, Hsel, R, Kmax] / counts [B, Hsel, R] (R = ceil(S /
    query_block)) with query_block * G a multiple of `WS_ROWS`, so that each 128-row flat tile lies in one row.
    Else uidx / umask / ucount are `union_block_lists(idx, counts, 2 * qt)`: programs of 2 qt tokens, a half of
    qt tokens x G heads (at most 64 rows, qt at most 16) each. `tile` overrides `SM90_WS_TILE`; ping-pong
    needs row lists (the halves of a union tile take different numbers of steps)."""
    B, S, Hq, D = q.shape
    T, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    cfg = _tile_config(SM90_WS_TILE, tile)
    if row_lists and (query_block * G) % WS_ROWS:
        raise ValueError(f"query_block * G = {query_block} * {G} must be a multiple of {WS_ROWS} rows")
    if not row_lists and not (1 <= qt <= 16 and qt * G <= ROWS):
        raise ValueError(f"union tiles need 1 <= qt <= 16 tokens of G heads in {ROWS} rows; got qt {qt}, G {G}")
    if not row_lists and (tile or {}).get("PINGPONG"):
        raise ValueError("PINGPONG needs row lists: the halves of a union tile take different numbers of steps")
    if cfg["NUM_BUF"] < 2:
        raise ValueError(f"tile {cfg}: NUM_BUF must be >= 2")
    k_desc, k_head_major, v_desc, v_head_major = _kv_descriptors(q, k, v)
    n_tiles = -(-S * G // WS_ROWS) if row_lists else -(-S // (2 * qt))
    if n_tiles == 0 or B * Hkv == 0:
        return
    _block_ws_fwd[(n_tiles, B * Hkv)](
        *_walk_args(q, k_desc, v_desc, uidx, umask, ucount, out, lse, scale_log2, q_offset, T, Hkv),
        HSEL_SHARED=uidx.shape[1] == 1, G=G, QT=max(qt, 1), D=D, DV=Dv, CAUSAL=causal, RETURN_LSE=lse is not None,
        ROW_LISTS=row_lists, QUERY_BLOCK=query_block, K_HEAD_MAJOR=k_head_major, V_HEAD_MAJOR=v_head_major,
        NUM_BUF=cfg["NUM_BUF"], CONSUMER_REGS=cfg["CONSUMER_REGS"], PINGPONG=bool(cfg["PINGPONG"]) and row_lists,
        num_warps=4,
    )


def block_union_sm90(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, uidx: torch.Tensor,
                     umask: torch.Tensor | None, ucount: torch.Tensor, out: torch.Tensor, lse: torch.Tensor | None, *,
                     n_tiles: int, G: int, qt: int, scale_log2: float, q_offset: int, causal: bool,
                     hsel_shared: bool, row_lists: bool, query_block: int, flat: bool,
                     tile: dict | None = None) -> None:
    """Launch the Gluon kernel on the lists `block_union_attention` prepared (its union or row lists,
    its tiles) and write out [B, S, Hq, Dv] (and lse [B, Hq, S]). `tile` overrides `SM90_UNION_TILE`."""
    B, S, Hq, D = q.shape
    T, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    cfg = _tile_config(SM90_UNION_TILE, tile)
    if cfg["NUM_BUF"] < 3:
        raise ValueError(f"tile {cfg}: NUM_BUF must be >= 3")
    k_desc, k_head_major, v_desc, v_head_major = _kv_descriptors(q, k, v)
    if n_tiles == 0 or B * Hkv == 0:
        return
    _block_union_sm90_fwd[(n_tiles, B * Hkv)](
        *_walk_args(q, k_desc, v_desc, uidx, umask, ucount, out, lse, scale_log2, q_offset, T, Hkv),
        HSEL_SHARED=hsel_shared, G=G, QT=qt, D=D, DV=Dv, CAUSAL=causal, RETURN_LSE=lse is not None,
        ROW_LISTS=row_lists, QUERY_BLOCK=query_block, FLAT_ROWS=flat, K_HEAD_MAJOR=k_head_major,
        V_HEAD_MAJOR=v_head_major,
        NUM_BUF=cfg["NUM_BUF"], num_warps=4,
    )
