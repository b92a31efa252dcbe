"""sqrt(c^T G c) for every row c of a half-precision matrix, on the tensor cores (Triton).

    rms = quadratic_form_sqrt(latent, gram)    # latent [B, T, L] bf16/fp16, gram [L, L] fp32 -> [B, 1, T] fp32

The DSA Stem step needs, for every key t, the RMS over the heads of ||W_UV^h c_t|| (the OAM value
norm, `adapters.dsa.latent_value_rms`): c_t^T G c_t with G = mean_h (W_UV^h)^T W_UV^h. In fp32
PyTorch that is a [T, L] x [L, L] fp32 product (2.2 ms at 128K tokens on an H200, about 1% of
the layer). Here G is split into two half-precision matrices, G = G_hi + G_lo (G_lo the rounding
rest of G_hi, so together they hold about 16 bits of G's mantissa), and y = c G_hi + c G_lo
accumulates in fp32 on the tensor cores; the latent rows are exact in their own dtype, so the result
matches the fp32 product to about 1e-6 relative (9.3e-7 at 128K tokens on an H200), in 0.5 ms.
Program roles: axis 0 = BLOCK_T rows of one batch row (axis 1); the program walks G's column tiles
(BLOCK_N) and, inside, the reduction tiles (BLOCK_K), and sums y * c over each column tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["quadratic_form_sqrt", "split_hi_lo"]


@triton.jit
def _quadratic_form_kernel(
    C, G_HI, G_LO, OUT, T,
    stride_cb, stride_ct, stride_ob,
    L: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = t < T
    c_rows = C + b.to(tl.int64) * stride_cb + t[:, None].to(tl.int64) * stride_ct  # [BLOCK_T, 1]
    acc = tl.zeros([BLOCK_T], tl.float32)
    for n0 in tl.static_range(0, L, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        y = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
        for k0 in tl.static_range(0, L, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            c = tl.load(c_rows + k[None, :], mask=ok[:, None], other=0.0)  # [BLOCK_T, BLOCK_K]
            g_off = k[:, None] * L + n[None, :]  # [BLOCK_K, BLOCK_N]
            y = tl.dot(c, tl.load(G_HI + g_off), y)
            y = tl.dot(c, tl.load(G_LO + g_off), y)
        c_n = tl.load(c_rows + n[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        acc += tl.sum(y * c_n, 1)
    tl.store(OUT + b.to(tl.int64) * stride_ob + t, tl.sqrt(tl.maximum(acc, 0.0)), mask=ok)


def split_hi_lo(g: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """g (fp32) as hi + lo in `dtype`: hi = g rounded, lo = the rest rounded (about twice the bits)."""
    hi = g.to(dtype)
    return hi, (g - hi.float()).to(dtype)


def quadratic_form_sqrt(c: torch.Tensor, gram: torch.Tensor, *, block_t: int = 128, block_n: int = 128,
                        block_k: int = 64, num_warps: int = 8) -> torch.Tensor:
    """sqrt(max(c_t^T G c_t, 0)) for every row: c [B, T, L] bf16/fp16 (unit last stride), gram [L, L]
    fp32 -> [B, 1, T] fp32. L a power of two >= 16 (DeepSeek-V3.2: 512)."""
    if c.dim() != 3 or c.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"c must be bfloat16 / float16 [B, T, L]; got {c.dtype} {tuple(c.shape)}")
    B, T, L = c.shape
    if gram.shape != (L, L):
        raise ValueError(f"gram must be [L={L}, L={L}]; got {tuple(gram.shape)}")
    if L < 16 or L & (L - 1):
        raise ValueError(f"L={L}; allowed: a power of two >= 16")
    c = c if c.stride(-1) == 1 else c.contiguous()
    g_hi, g_lo = split_hi_lo(gram.float().contiguous(), c.dtype)
    out = torch.empty(B, 1, T, dtype=torch.float32, device=c.device)
    bn, bk = min(block_n, L), min(block_k, L)
    _quadratic_form_kernel[(triton.cdiv(T, block_t), B)](
        c, g_hi, g_lo, out, T, c.stride(0), c.stride(1), out.stride(0),
        L=L, BLOCK_T=block_t, BLOCK_N=bn, BLOCK_K=bk, num_warps=num_warps,
    )
    return out
