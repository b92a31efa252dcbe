"""`sparse_attention(q, k, v, selection)`: the one entry point of the sparse-attention contract, and
the only place that picks an executor (the Triton kernel, masked dense PyTorch, the gather reference).

Contract (every executor follows it; `sparse_attention_reference` is the oracle):
    q [B, S, Hq, Dqk], k [B, T, Hkv, Dqk], v [B, T, Hkv, Dv]; Hq = G * Hkv; fp16 / bf16 / fp32.
    selection: `stem_boost.selection.Selection` — idx [B, Hsel, R, Kmax] int32 (-1 padded, R =
        ceil(S / query_block), Hsel = 1 or Hkv), counts [B, Hsel, R], block_size (tokens per key unit:
        1 or a power of two >= 16), query_block (a power of two), q_offset.
    Query position s sits at key position q_offset + s (default T - S); causal=True masks keys after
    it, also inside the diagonal block. Rows with 0 entries give zeros and lse = -inf. Units entirely
    after the row's last query position are an input error (wasted work), rejected when `check=True`.
    Returns out [B, S, Hq, Dv] (q's dtype) and, with return_lse, lse [B, Hq, S] fp32 (natural log).
MLA absorbed shapes (Dqk 576, Dv 512, Hkv 1, v = k[..., :512]) with token lists take
`mla_token_ws.py`'s warp-specialised Gluon kernel on Hopper GPUs and `mla_token.py`'s Triton kernel
elsewhere (heads on M; each gathered key is read once for both products).

Executors (`backend=`): "triton" (CUDA tensors, or the CPU under TRITON_INTERPRET=1: block lists
take the union-tile walk of `block_union.py` (on Hopper its Gluon kernel `block_union_sm90.py` where
the tile fits: bf16 / fp16, head dims 64 / 128, 64-key blocks), absorbed-MLA token lists `mla_token.py`, other token
lists and sinks `triton_sparse.py`), "masked"
(dense matmuls under the selection's mask, chunked: fast on CPUs), "reference" (gather + fp32
softmax). "auto": Triton on CUDA; on the CPU masked when the selection covers at least 1/64 of the
keys, else the gather (whose cost follows the selection, not the key length).
"""

from __future__ import annotations

import math
import os

import torch

from ..selection import Selection
from .masked import sparse_attention_masked
from .reference import sparse_attention_reference

try:  # Triton is optional on the CPU; required for CUDA tensors.
    import triton

    from .aot import compiling
    from .block_union import block_union_attention
    from .mla_token import mla_token_attention
    from .triton_sparse import sparse_attn_fwd

    HAS_TRITON = True
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        from . import _interpreter_compat

        _interpreter_compat.apply()
except Exception:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False

try:  # the Hopper MLA kernel is Gluon code: an API change in a later Triton costs only this route
    from .mla_token_sm90 import supports_sm90
    from .mla_token_ws import mla_token_attention_ws
except Exception:  # pragma: no cover - Triton without a Gluon that this kernel compiles with
    supports_sm90 = None

# Selection entries the Triton token-list kernels take per step of their key loop (`mla_token.py` and
# `triton_sparse.py` both run BLOCK_N = 64).
TOKEN_TILE_N = 64
# The step that every token-list executor's steps divide: the Hopper MLA kernel (`mla_token_ws.py`)
# takes 128 keys a step, so a row of 128 m + 1 entries costs m + 1 full steps there. TPD budgets on
# token lists are rounded to it (`boost.token_budget_step`).
TOKEN_KEY_STEP = 128

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CPU_DTYPES = _DTYPES + (torch.float64,)  # the PyTorch executors also run fp64 (exactness checks on the CPU)
BACKENDS = ("auto", "triton", "masked", "reference")


def _triton_on_host() -> bool:
    """Triton launches with CPU tensors: the interpreter, or an ahead-of-time build (aot.compile_only)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1" or (HAS_TRITON and compiling())


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def _next_pow2(x: int) -> int:
    return 1 << (max(1, x) - 1).bit_length()


def choose_executor(q: torch.Tensor, k: torch.Tensor, selection: Selection, backend: str = "auto") -> str:
    """The executor that runs this call: "triton", "masked" or "reference" (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs Triton (pip install triton)")
        if not q.is_cuda and not _triton_on_host():
            raise ValueError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 on the CPU")
        if q.dtype not in _DTYPES:
            raise ValueError(f"backend='triton' runs float16, bfloat16, float32; got {q.dtype}")
        return "triton"
    if backend != "auto":
        return backend
    if q.is_cuda:
        if not HAS_TRITON:
            raise RuntimeError("CUDA tensors need Triton for sparse_attention; install triton (pip install triton)")
        return "triton"
    dense_enough = k.shape[1] <= 64 * selection.kmax * selection.block_size
    return "masked" if dense_enough else "reference"


def check_inputs(q, k, v, selection: Selection, sinks=None) -> None:
    """Raise ValueError naming the argument and what is allowed, for any malformed input."""
    if not isinstance(selection, Selection):
        raise ValueError(f"selection must be a stem_boost.Selection, got {type(selection).__name__}")
    idx, counts = selection.idx, selection.counts
    block_size, query_block = selection.block_size, selection.query_block
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, S|T, H, D]; got {getattr(t, 'shape', type(t))}")
        if t.dtype not in (_DTYPES if t.is_cuda else _CPU_DTYPES):
            raise ValueError(f"{name}.dtype={t.dtype} is not supported; allowed: float16, bfloat16, float32"
                             + ("" if t.is_cuda else ", float64 (CPU, masked / reference)"))
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    B, S, Hq, Dqk = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree on [B, T, Hkv]")
    if k.shape[3] != Dqk:
        raise ValueError(f"q head dim {Dqk} != k head dim {k.shape[3]}")
    Hkv = k.shape[2]
    if Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if block_size < 1 or (block_size > 1 and (block_size < 16 or block_size & (block_size - 1))):
        raise ValueError(f"block_size={block_size}; allowed: 1 (token lists) or a power of two >= 16")
    if query_block < 1 or query_block & (query_block - 1):
        raise ValueError(f"query_block={query_block}; allowed: a power of two >= 1")
    if idx.dim() != 4 or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"idx must be int32/int64 [B, Hsel, R, Kmax]; got {idx.dtype} {tuple(idx.shape)}")
    R = -(-S // query_block)
    if idx.shape[0] != B or idx.shape[1] not in (1, Hkv) or idx.shape[2] != R:
        raise ValueError(
            f"idx shape {tuple(idx.shape)} must be [B={B}, Hsel in (1, {Hkv}), R=ceil(S/query_block)={R}, Kmax]"
        )
    if counts.shape != idx.shape[:3] or counts.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"counts must be int32/int64 of shape {tuple(idx.shape[:3])}; got {counts.dtype} {tuple(counts.shape)}")
    if sinks is not None and (sinks.dim() != 1 or sinks.shape[0] != Hq):
        raise ValueError(f"sinks must have shape [Hq={Hq}]; got {tuple(sinks.shape)}")
    devices = {t.device for t in (q, k, v, idx, counts)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device; got {sorted(map(str, devices))}")


def check_index_range(selection: Selection, *, seq_q: int, seq_k: int, causal: bool) -> None:
    """Reject counts outside [0, Kmax] and valid entries outside the key range or after the row."""
    idx, counts = selection.idx, selection.counts
    block_size, query_block = selection.block_size, selection.query_block
    q_offset = selection.offset_for(seq_q, seq_k)
    kmax = idx.shape[-1]
    if counts.numel() and (int(counts.min()) < 0 or int(counts.max()) > kmax):
        raise ValueError(f"counts must lie in [0, Kmax={kmax}]; got [{int(counts.min())}, {int(counts.max())}]")
    valid = torch.arange(kmax, device=idx.device) < counts.unsqueeze(-1).long()
    n_units = -(-seq_k // block_size)
    bad = valid & ((idx < 0) | (idx >= n_units))
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        raise ValueError(
            f"idx{tuple(where)}={int(idx[tuple(where)])} is outside [0, {n_units}) key units "
            f"(block_size={block_size}, T={seq_k}); entries before counts must be valid"
        )
    if causal:
        R = idx.shape[2]
        last_q = torch.clamp(torch.arange(R, device=idx.device) * query_block + query_block - 1, max=seq_q - 1) + q_offset
        bad = valid & (idx.long() * block_size > last_q.view(1, 1, R, 1))
        if bool(bad.any()):
            where = bad.nonzero()[0].tolist()
            raise ValueError(
                f"idx{tuple(where)}={int(idx[tuple(where)])} starts after the last query position of its row "
                f"({int(last_q[where[2]])}): beyond the causal range"
            )


def _tiles(G: int, Dqk: int, Dv: int, block_size: int, query_block: int, elem_bytes: int = 2) -> dict:
    """Pick the program tile: M = BLOCK_T tokens x BLOCK_H heads, BLOCK_N keys per step.

    Defaults are the fastest measured on an H100 (scripts/bench_kernel.py, BENCHMARKS.md):
    block lists M = 64 rows, N = 64, 4 warps; MLA token lists 64 heads x 1 token, N = 64, 8 warps.
    """
    big = max(Dqk, Dv) > 256
    m_target = 64
    block_h = min(_next_pow2(G), m_target)
    block_t = max(1, min(query_block, m_target // block_h))
    block_h = max(block_h, 16 // block_t)  # tl.dot needs M >= 16 (padded head rows are masked)
    block_n = TOKEN_TILE_N if block_size == 1 else min(block_size, 64)
    num_warps = 8 if big else 4
    if big and elem_bytes == 4:  # fp32 MLA (a correctness path): keep the Q and K tiles in shared memory
        block_h, block_t, block_n = min(block_h, 32), 1, 16
        return dict(BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_N=block_n, num_warps=4, num_stages=1,
                    MASK_ONLY_WHERE_NEEDED=True)
    return dict(BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_N=block_n, num_warps=num_warps, num_stages=2,
                MASK_ONLY_WHERE_NEEDED=True)


def _v_is_k_prefix(k: torch.Tensor, v: torch.Tensor) -> bool:
    """True when v is a view of k's first Dv channels (MLA absorbed form)."""
    return (
        v.data_ptr() == k.data_ptr()
        and v.stride() == k.stride()
        and v.shape[3] == _pow2_floor(k.shape[3])
    )


def ascending_lists(idx: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with strictly ascending live entries, as the union-tile kernel's merge needs them.

    idx [B, Hsel, R, Kmax], counts [B, Hsel, R]. A selection that is already so (every native and
    Stem selector of this project writes its rows ascending) costs one check; any other row is
    sorted and de-duplicated here."""
    live = torch.arange(idx.shape[-1], device=idx.device) < counts[..., None].long()
    unordered = (idx[..., 1:] <= idx[..., :-1]) & live[..., 1:]
    if not bool(unordered.any() | (live & (idx < 0)).any()):  # one host sync
        return idx, counts
    big = torch.iinfo(torch.int32).max
    keys = torch.where(live & (idx >= 0), idx, big).sort(dim=-1).values
    dup = torch.zeros_like(live)
    dup[..., 1:] = keys[..., 1:] == keys[..., :-1]
    keys = torch.where(dup, big, keys).sort(dim=-1).values
    return torch.where(keys == big, -1, keys).to(torch.int32).contiguous(), (keys != big).sum(-1).to(torch.int32)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: Selection,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    return_lse: bool = False,
    sinks: torch.Tensor | None = None,
    backend: str = "auto",
    check: bool = True,
    tiles: dict | None = None,
):
    """Attention of every query row over its selected keys (see the module docstring for shapes).

    `backend` picks the executor ("auto" by default); `check=False` skips the index-range pass when
    the caller built the selection itself; `tiles` overrides the kernel's tile choice (benchmarks).
    """
    check_inputs(q, k, v, selection, sinks)
    S, T = q.shape[1], k.shape[1]
    offset = selection.offset_for(S, T)
    if offset < 0:
        raise ValueError(f"q_offset={offset} must be >= 0 (queries sit inside the key range)")
    if check:
        check_index_range(selection, seq_q=S, seq_k=T, causal=causal)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[3])
    executor = choose_executor(q, k, selection, backend)
    if executor == "masked":
        return sparse_attention_masked(q, k, v, selection, causal=causal, sm_scale=scale, return_lse=return_lse,
                                       sinks=sinks)
    if executor == "reference":
        return sparse_attention_reference(q, k, v, selection, causal=causal, sm_scale=scale,
                                          return_lse=return_lse, sinks=sinks)
    if selection.block_size > 1 and sinks is None and tiles is None:
        # block lists (block_union.py): per-token lists take query tiles of several tokens x a GQA group
        # (M = 64 rows for any group size) over the union of their lists, a per-token mask keeping them
        # exact; lists of several tokens a row take tiles of 64 (token, head) rows inside one row. On
        # Hopper the walk runs the Gluon kernel (block_union_sm90.py) where it fits, else Triton
        idx, counts = selection.idx.to(torch.int32), selection.counts.to(torch.int32)
        if not selection.ordered:  # a host synchronisation: ~0.2 ms a call at 32K (BENCHMARKS.md)
            idx, counts = ascending_lists(idx, counts)
        return block_union_attention(q, k, v, idx, counts, block_size=selection.block_size,
                                     query_block=selection.query_block, q_offset=offset,
                                     sm_scale=scale, causal=causal, return_lse=return_lse)
    if sinks is None and tiles is None and takes_mla_token_kernel(q, k, v, selection):
        # one latent kv head whose first Dv channels are the values, one token list per query for all
        # heads (DeepSeek-V3.2's DSA): heads on M; on Hopper the warp-specialised Gluon kernel
        # (mla_token_ws.py: a producer warpgroup gathers while two consumers compute), elsewhere mla_token.py
        mla = mla_token_attention_ws if supports_sm90 is not None and supports_sm90(q, v.shape[3]) \
            else mla_token_attention
        return mla(q, k, selection.idx[:, 0], selection.counts[:, 0], q_offset=offset,
                   sm_scale=scale, dv=v.shape[3], return_lse=return_lse, causal=causal)
    return _run_triton(q, k, v, selection, offset=offset, causal=causal, scale=scale, return_lse=return_lse,
                       sinks=sinks, tiles=tiles)


def takes_mla_token_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: Selection) -> bool:
    """True for the absorbed-MLA token shape that `mla_token_attention` runs: 16-bit q / k, one kv head
    with v its first Dv channels, per-token lists shared by all heads, Dv and Dqk - Dv powers of two >= 16."""
    dv, dr = v.shape[3], q.shape[3] - v.shape[3]
    return (selection.block_size == 1 and selection.query_block == 1 and selection.idx.shape[1] == 1
            and k.shape[2] == 1 and q.dtype in (torch.bfloat16, torch.float16) and _v_is_k_prefix(k, v)
            and dv >= 16 and dv & (dv - 1) == 0 and dr >= 16 and dr & (dr - 1) == 0)


def _run_triton(q, k, v, selection: Selection, *, offset: int, causal: bool, scale: float, return_lse: bool,
                sinks, tiles: dict | None):
    """Launch the Triton kernel (`triton_sparse.sparse_attn_fwd`): one program per (query tile, head tile)."""
    B, S, Hq, Dqk = q.shape
    T, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    block_size, query_block = selection.block_size, selection.query_block
    # The kernel needs unit stride on the last dim; anything else is copied once here.
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    v_from_k = _v_is_k_prefix(k, v) and Dv >= 16
    if not v_from_k and v.stride(-1) != 1:
        v = v.contiguous()
    idx = selection.idx
    idx = idx.to(torch.int32) if idx.dtype != torch.int32 else idx
    idx = idx.contiguous() if idx.stride(-1) != 1 else idx
    counts = selection.counts.to(torch.int32).contiguous()
    G = Hq // Hkv
    cfg = _tiles(G, Dqk, Dv, block_size, query_block, q.element_size())
    if tiles:
        cfg.update(tiles)
    d1 = _pow2_floor(Dqk)
    d2 = Dqk - d1
    out = torch.empty(B, S, Hq, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, S, dtype=torch.float32, device=q.device) if return_lse else out
    n_head_chunks = -(-G // cfg["BLOCK_H"])
    grid = (triton.cdiv(S, cfg["BLOCK_T"]), B * Hkv * n_head_chunks)
    sparse_attn_fwd[grid](
        q, k, v, idx, counts, out, lse, sinks if sinks is not None else q,
        scale * 1.4426950408889634, S, T, offset, G,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        idx.stride(0), idx.stride(1), idx.stride(2),
        counts.stride(0), counts.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0) if return_lse else 0, lse.stride(1) if return_lse else 0,
        n_head_chunks, Hkv,
        HSEL_SHARED=idx.shape[1] == 1, MASK_ONLY_WHERE_NEEDED=cfg["MASK_ONLY_WHERE_NEEDED"],
        BLOCK_T=cfg["BLOCK_T"], BLOCK_H=cfg["BLOCK_H"], QUERY_BLOCK=query_block,
        BLOCK_SIZE=block_size, BLOCK_N=cfg["BLOCK_N"],
        D1=d1, D2=d2, D2P=max(16, _next_pow2(d2)) if d2 else 1,  # tl.dot needs K >= 16
        DV=Dv, DVP=max(16, _next_pow2(Dv)),
        GATHER=block_size == 1 or cfg["BLOCK_N"] > block_size,
        UNITS=max(1, cfg["BLOCK_N"] // block_size), SUB=max(1, block_size // cfg["BLOCK_N"]), V_FROM_K=v_from_k, CAUSAL=causal,
        RETURN_LSE=return_lse, HAS_SINKS=sinks is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return (out, lse) if return_lse else out
