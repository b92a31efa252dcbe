"""Fused lightning-indexer scores (DSA): I[b, s, t] = sum_h w[b, s, h] * relu(scale * q[b, s, h] . k[b, t]).

The unfused computation writes the fp32 [B, S, H, T] per-head scores to memory and reads them back
for the weighted head sum: H times more traffic than the result. Here one program owns a
[BLOCK_S, BLOCK_T] tile of I and loops over the H heads, keeping the running sum in registers
(the product q_h k^T on tensor cores, relu and the weight in fp32), so only I is written.
Program roles: axis 0 = query tile, axis 1 = key tile (swapped by `keys_fast`, see `tile_order`),
axis 2 = batch.

FP8 (`fp8_index_scores`), as DeepSeek-V3.2's own inference code scores its indexer: q and k are
rotated by the orthonormal Hadamard matrix H_D (q.k is unchanged, but outlier channels are spread
over all D channels, so a per-row scale loses less), then quantised to e4m3 with one fp32 scale per
row of D <= 128 channels (amax / 448). relu(sq * sk * q8.k8) = sq * sk * relu(q8.k8) for positive
scales, so the query scale is folded into the head weight and the key scale multiplies the head
sum once: the kernel runs the same loop on e4m3 tensor cores (Hopper and later) with two extra
fp32 multiplies per output.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .tile_order import tile_grid, tile_ids


@triton.jit
def _relu_scaled(qk, scale, HAS_SCALE: tl.constexpr):
    """relu(scale * qk); without HAS_SCALE the host folded a positive scale into the head weights
    (relu(c x) = c relu(x) for c > 0), which saves one multiply per score and head."""
    if HAS_SCALE:
        qk = qk * scale
    return tl.maximum(qk, 0.0)


@triton.jit
def _index_scores_kernel(
    Q, K, W, KSCALE, OUT, scale, S, T, causal_offset,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_kt,
    stride_wb, stride_ws,
    stride_ob, stride_os,
    stride_ksb,
    H: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KSCALE: tl.constexpr, WRITE_MASKED: tl.constexpr, HPS: tl.constexpr, HAS_SCALE: tl.constexpr,
    PIPELINE: tl.constexpr, KEYS_FAST: tl.constexpr,
):
    pid_s, pid_t = tile_ids(KEYS_FAST)
    b = tl.program_id(2)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, D)
    s_ok = offs_s < S
    t_ok = offs_t < T
    k = tl.load(K + b.to(tl.int64) * stride_kb + offs_t[:, None].to(tl.int64) * stride_kt + offs_d[None, :],
                mask=t_ok[:, None], other=0.0)
    q_base = Q + b.to(tl.int64) * stride_qb + offs_s[:, None].to(tl.int64) * stride_qs + offs_d[None, :]
    w_base = W + b.to(tl.int64) * stride_wb + offs_s.to(tl.int64) * stride_ws
    acc = tl.zeros([BLOCK_S, BLOCK_T], tl.float32)
    n_heads = H
    write = s_ok[:, None] & t_ok[None, :]
    if CAUSAL:  # a tile wholly after the tile's last query needs no product: it is all -inf
        if pid_t * BLOCK_T > pid_s * BLOCK_S + BLOCK_S - 1 + causal_offset:
            n_heads = 0
    if not WRITE_MASKED:  # the caller reads only keys before each row's limit: skipped tiles stay unwritten
        write = write & (n_heads > 0)
    kt = tl.trans(k)
    if PIPELINE:
        # the next head's weights are loaded a head ahead: their latency hides behind this head's product
        w_h = tl.load(w_base, mask=s_ok & (n_heads > 0), other=0.0)
        for h in range(0, n_heads):
            w_next = tl.load(w_base + h + 1, mask=s_ok & (h + 1 < n_heads), other=0.0)
            qk = tl.dot(tl.load(q_base + h * stride_qh, mask=s_ok[:, None], other=0.0), kt)
            acc += w_h[:, None] * _relu_scaled(qk, scale, HAS_SCALE)
            w_h = w_next
    else:
        # HPS heads per step (products written before the epilogues; whether they overlap is the compiler's call)
        for h in range(0, n_heads, HPS):
            qk0 = tl.dot(tl.load(q_base + h * stride_qh, mask=s_ok[:, None], other=0.0), kt)
            if HPS >= 2:
                qk1 = tl.dot(tl.load(q_base + (h + 1) * stride_qh, mask=s_ok[:, None], other=0.0), kt)
            if HPS >= 4:
                qk2 = tl.dot(tl.load(q_base + (h + 2) * stride_qh, mask=s_ok[:, None], other=0.0), kt)
                qk3 = tl.dot(tl.load(q_base + (h + 3) * stride_qh, mask=s_ok[:, None], other=0.0), kt)
            acc += tl.load(w_base + h, mask=s_ok, other=0.0)[:, None] * _relu_scaled(qk0, scale, HAS_SCALE)
            if HPS >= 2:
                acc += tl.load(w_base + h + 1, mask=s_ok, other=0.0)[:, None] * _relu_scaled(qk1, scale, HAS_SCALE)
            if HPS >= 4:
                acc += tl.load(w_base + h + 2, mask=s_ok, other=0.0)[:, None] * _relu_scaled(qk2, scale, HAS_SCALE)
                acc += tl.load(w_base + h + 3, mask=s_ok, other=0.0)[:, None] * _relu_scaled(qk3, scale, HAS_SCALE)
    if HAS_KSCALE:
        acc = acc * tl.load(KSCALE + b.to(tl.int64) * stride_ksb + offs_t, mask=t_ok, other=0.0)[None, :]
    if CAUSAL:
        acc = tl.where(offs_t[None, :] <= offs_s[:, None] + causal_offset, acc, float("-inf"))
    out = OUT + b.to(tl.int64) * stride_ob + offs_s[:, None].to(tl.int64) * stride_os + offs_t[None, :]
    tl.store(out, acc, mask=write)


def default_warps(dtype: torch.dtype, block_s: int, block_t: int) -> int:
    """Warps of a score program: 4 for e4m3 (H200, the 64 x 128 tile, 8192 query rows at the end of
    64K keys: 9.7 ms against 10.9 at 8 warps, 854 vs 754 TFLOP/s; 2, 4 or 5 pipeline stages were
    slower than the default 3), else 8 from 8192 outputs a tile."""
    if dtype == torch.float8_e4m3fn:
        return 4
    return 8 if block_s * block_t >= 8192 else 4


def fused_index_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, scale: float | None,
                       causal_offset: int | None = None, block_s: int | None = None, block_t: int = 128,
                       *, write_masked: bool = True, k_scale: torch.Tensor | None = None,
                       num_warps: int | None = None, heads_per_step: int | None = None,
                       pipeline: bool | None = None, fold_scale: bool = True,
                       num_stages: int | None = None, keys_fast: bool = True) -> torch.Tensor:
    """q [B, S, H, D] (bf16/fp16, or e4m3 with k e4m3), k [B, T, D], w [B, S, H] fp32 -> I [B, S, T] fp32.

    `scale=None` means the scale is already folded into w (scores relu(q.k) are then weighted).
    `causal_offset=o`: key t is visible to query s iff t <= s + o; others get -inf (and tiles
    wholly after the diagonal skip the products). None: no mask. `write_masked=False` (causal
    only): tiles wholly after the diagonal are not written either (their content is undefined), for
    a caller that reads only keys t <= s + o (e.g. `dsa_topk.topk_rows(..., valid_len=)`).
    `k_scale` fp32 [B, T] or None multiplies each key's head sum (the FP8 path's key scales).
    `block_s` None: 128 query rows a program for 16-bit q, 64 for e4m3 (the faster of each, H200).
    `heads_per_step` (1, 2 or 4, dividing H; default 1): head products written back to back (a tuning
    knob; Triton 3.6 still waits for each product before the next, see the DSA GPU log).
    `pipeline`: load each head's weights a head ahead, so that their latency hides behind the
    previous head's product (heads_per_step is then ignored). Default off: with the key tiles on the
    grid's fast axis the weights are in L1 and the extra registers cost more than the load (H200, 8192
    rows at the end of 64K keys: e4m3 8.26 ms off against 8.79 on; 16-bit 15.6 against 15.9).
    A positive `scale` is folded into the head weights (relu(c x) = c relu(x)): one multiply less
    per score and head (`fold_scale=False` keeps the multiply: the benchmark's before).
    `num_stages`: the software pipeline's depth over the head loop (None: Triton's default, 3).
    `keys_fast`: key tiles on the grid's fastest axis (`tile_order`; H200, e4m3, 8192 rows at the end of
    64K keys: 8.7 ms against 9.5 with query tiles there).
    """
    B, S, H, D = q.shape
    T = k.shape[1]
    if block_s is None:  # measured on an H200: 128 query rows for 16-bit operands, 64 for e4m3
        block_s = 64 if q.dtype == torch.float8_e4m3fn else 128
    if D & (D - 1) or D < 16:
        raise ValueError(f"index head dim {D} must be a power of two >= 16 for the fused kernel")
    if q.dtype != torch.float8_e4m3fn:
        k = k.to(q.dtype)
    elif k.dtype != q.dtype:
        raise ValueError(f"e4m3 q needs e4m3 k; got {k.dtype}")
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    scale = None if scale is None else float(scale)
    # the multiply stays in the kernel for a scale relu does not commute with (<= 0), or on request
    in_kernel = not fold_scale or (scale is not None and scale <= 0.0)
    w = (w.float() * scale if scale is not None and not in_kernel else w.float()).contiguous()
    kernel_scale = scale if scale is not None and in_kernel else 1.0
    out = torch.empty(B, S, T, dtype=torch.float32, device=q.device)
    grid = tile_grid(triton.cdiv(S, block_s), triton.cdiv(T, block_t), B, keys_fast)
    hps = heads_per_step or 1
    if hps not in (1, 2, 4) or H % hps:
        raise ValueError(f"heads_per_step={hps} must be 1, 2 or 4 and divide the {H} heads")
    if k_scale is not None:
        k_scale = k_scale.float().contiguous()
    _index_scores_kernel[grid](
        q, k, w, k_scale if k_scale is not None else w, out, kernel_scale, S, T,
        0 if causal_offset is None else int(causal_offset),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
        w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        k_scale.stride(0) if k_scale is not None else 0,
        H=H, D=D, BLOCK_S=block_s, BLOCK_T=block_t, CAUSAL=causal_offset is not None,
        HAS_KSCALE=k_scale is not None, WRITE_MASKED=write_masked or causal_offset is None,
        HPS=hps, HAS_SCALE=in_kernel, PIPELINE=bool(pipeline),
        KEYS_FAST=keys_fast,
        num_warps=num_warps or default_warps(q.dtype, block_s, block_t),
        **({} if num_stages is None else dict(num_stages=num_stages)),
    )
    return out


FP8_MAX = 448.0  # largest finite float8_e4m3fn


@functools.lru_cache(maxsize=16)
def _sylvester_signs(n: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """The +-1 Sylvester-Hadamard matrix [n, n] on `device` (cached: built once per size and device)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h.to(device=device, dtype=dtype)


def hadamard_matrix(n: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix [n, n] (n a power of two): entries +-1/sqrt(n)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"the Hadamard rotation needs a power-of-two size; got {n}")
    return (_sylvester_signs(n, "cpu", torch.float64) / n**0.5).to(device=device, dtype=dtype)


@triton.jit
def _quantize_rows_kernel(X, SIGNS, Y, SCALE, N, stride_x, stride_y, inv_sqrt_d,
                          D: tl.constexpr, BLOCK_R: tl.constexpr, ROTATE: tl.constexpr):
    """Program: BLOCK_R rows of x [N, D] (16-bit floats). The rotation x @ H (H = +-1 signs, exact
    products, fp32 sums) / sqrt(D) on tensor cores, the row's amax scale, the e4m3 cast: one read of
    x, one write of the e4m3 rows and their fp32 scales."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < N
    cols = tl.arange(0, D)
    x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=ok[:, None], other=0.0)
    if ROTATE:
        y = tl.dot(x, tl.load(SIGNS + cols[:, None] * D + cols[None, :])) * inv_sqrt_d
    else:
        y = x.to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(y), 1), 1e-12) / 448.0
    v = tl.minimum(tl.maximum(y / scale[:, None], -448.0), 448.0)
    # round to the e4m3 grid here (3 mantissa bits, exponent >= -6, ties to even), so the cast below
    # is exact: the same codes on the GPU and under the interpreter, whose own cast mishandles a
    # mantissa that rounds up into the next binade
    exponent = tl.maximum(((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(exponent - 3), exact
    v = ((v / step + 12582912.0) - 12582912.0) * step  # 1.5 * 2^23: round to an integer, ties to even
    tl.store(Y + rows[:, None].to(tl.int64) * stride_y + cols[None, :], v.to(tl.float8e4nv), mask=ok[:, None])
    tl.store(SCALE + rows, scale, mask=ok)


def quantize_fp8_rows(x: torch.Tensor, rotation: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] (D <= 128: one block per row) -> (e4m3 [..., D], fp32 scale [...]) with x ~ q8 * scale.

    `rotation` [D, D] (e.g. `hadamard_matrix(D)`) is applied first, in fp32. scale = amax / 448 per
    row (at least 1e-12, so all-zero rows quantise to zeros). This is the definition; the FP8 scorer
    on CUDA runs `quantize_fp8_rows_fused`, the same up to the order of the rotation's fp32 sums.
    """
    if x.shape[-1] > 128:
        raise ValueError(f"one fp8 block per row: D={x.shape[-1]} must be <= 128")
    x = x.float()
    if rotation is not None:
        x = x @ rotation.to(device=x.device, dtype=torch.float32)
    scale = x.abs().amax(-1).clamp(min=1e-12) / FP8_MAX
    q8 = (x / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q8, scale


def fused_quantiser_refuses(x: torch.Tensor) -> str | None:
    """Why `quantize_fp8_rows_fused` cannot take x [..., D], or None when it can."""
    D = x.shape[-1]
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"the fused quantiser takes bfloat16 / float16 rows; got {x.dtype}"
    if D > 128 or D < 16 or D & (D - 1):
        return f"the fused quantiser takes a power-of-two D in 16..128; got {D}"
    return None


def quantize_fp8_rows_fused(x: torch.Tensor, rotate: bool = True, block_rows: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_fp8_rows(x, hadamard_matrix(D) if rotate else None)` in one Triton pass.

    x [..., D] bf16 / fp16 (D a power of two, 16..128) -> (e4m3 [..., D], fp32 scale [...]). The
    PyTorch definition makes five passes over an fp32 copy of x (upcast, rotation, amax, divide,
    cast); here each row is read once as 16-bit and written once as 8-bit.
    """
    refusal = fused_quantiser_refuses(x)
    if refusal:
        raise ValueError(refusal)
    D = x.shape[-1]
    lead = x.shape[:-1]
    rows = x.reshape(-1, D)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    N = rows.shape[0]
    q8 = torch.empty(N, D, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(N, dtype=torch.float32, device=x.device)
    if N:
        signs = _sylvester_signs(D, str(x.device), x.dtype)
        _quantize_rows_kernel[(triton.cdiv(N, block_rows),)](
            rows, signs, q8, scale, N, rows.stride(0), q8.stride(0), D ** -0.5,
            D=D, BLOCK_R=block_rows, ROTATE=rotate, num_warps=4)
    return q8.view(*lead, D), scale.view(lead)


def fp8_index_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, scale: float | None,
                     causal_offset: int | None = None, block_s: int | None = None, block_t: int = 128,
                     *, rotate: bool = True, write_masked: bool = True, num_warps: int | None = None,
                     heads_per_step: int | None = None, pipeline: bool | None = None, fold_scale: bool = True,
                     k_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
                     num_stages: int | None = None, keys_fast: bool = True) -> torch.Tensor:
    """The lightning-indexer scores of `fused_index_scores`, computed with FP8 (e4m3) operands.

    q [B, S, H, D], k [B, T, D] any float dtype (D a power of two <= 128), w [B, S, H]; same result
    layout and masking as `fused_index_scores`. With `rotate` (default, DeepSeek-V3.2's recipe) q and
    k are Hadamard-rotated before the per-row quantisation. `k_fp8` = (e4m3 [B, T, D], fp32 [B, T]):
    keys already quantised (`quantize_fp8`, once per sequence instead of once per query chunk).
    Needs FP8 tensor cores on CUDA (compute capability >= 8.9); runs under the Triton interpreter on
    the CPU.
    """
    q8, k8, w8, k_scale = fp8_operands(q, k, w, scale, rotate, k_fp8)
    return fused_index_scores(q8, k8, w8, None, causal_offset, block_s, block_t, write_masked=write_masked,
                              k_scale=k_scale, num_warps=num_warps, heads_per_step=heads_per_step,
                              pipeline=pipeline, fold_scale=fold_scale, num_stages=num_stages, keys_fast=keys_fast)


def fp8_operands(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, scale: float | None, rotate: bool = True,
                 k_fp8: tuple[torch.Tensor, torch.Tensor] | None = None):
    """The FP8 scorers' operands: e4m3 q [B, S, H, D] and k [B, T, D] (`quantize_fp8`, or the keys
    already quantised: `k_fp8`), the head weights with the query scales and `scale` folded in
    (fp32 [B, S, H]) and the key scales (fp32 [B, T]): relu(sq sk q8.k8) = sq sk relu(q8.k8)."""
    q8, q_scale = quantize_fp8(q, rotate)  # [B, S, H, D], [B, S, H]
    k8, k_scale = k_fp8 if k_fp8 is not None else quantize_fp8(k, rotate)  # [B, T, D], [B, T]
    w8 = w.float() * q_scale * (1.0 if scale is None else float(scale))
    return q8, k8, w8, k_scale


def quantize_fp8(x: torch.Tensor, rotate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8 scorer's operand quantisation: the fused Triton pass for 16-bit CUDA rows, else the
    PyTorch definition (`quantize_fp8_rows`). x [..., D] -> (e4m3 [..., D], fp32 scale [...])."""
    if x.is_cuda and fused_quantiser_refuses(x) is None:
        return quantize_fp8_rows_fused(x, rotate)
    return quantize_fp8_rows(x, hadamard_matrix(x.shape[-1], x.device) if rotate else None)


def fp8_index_scores_reference(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, scale: float | None,
                               *, rotate: bool = True, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """PyTorch definition of `fp8_index_scores` without the mask: the same quantised operands, and
    their products exact (two e4m3 mantissas fit in fp32's). Returns [B, S, T] in `dtype`: fp64
    (the oracle) or fp32 (the CPU's emulation of the FP8 indexer: the kernel's arithmetic up to
    the order of its fp32 sums). Intermediate: [B, S, H, T] in `dtype`."""
    D = q.shape[-1]
    rot = hadamard_matrix(D, q.device) if rotate else None
    q8, q_scale = quantize_fp8_rows(q, rot)
    k8, k_scale = quantize_fp8_rows(k, rot)
    per_head = torch.relu(torch.einsum("bshd,btd->bsht", q8.to(dtype), k8.to(dtype)))
    w8 = w.to(dtype) * q_scale.to(dtype) * (1.0 if scale is None else float(scale))
    return torch.einsum("bsh,bsht->bst", w8, per_head) * k_scale.to(dtype).unsqueeze(1)
