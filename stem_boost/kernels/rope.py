"""Half-split RoPE of one tensor in one Triton pass (MiniCPM-4's prefill rotation).

    y = rope_half_fused(x, cos, sin, head_axis=1)

x [B, H, S, D] (head_axis 1) or [B, S, H, D] (head_axis 2), any strides with unit stride on D;
cos / sin [B or 1, S, D]. y has x's shape, dtype and strides, and is

    y = (x * cos + rotate_half(x) * sin) computed in fp32, cast to x's dtype

which is `stem_boost.rope.apply_rope_half(..., compute_dtype=torch.float32)` for one tensor. PyTorch
runs that as seven passes over fp32 copies of x (upcast, two products, the half swap's cat and
negation, the sum, the downcast): at 128K tokens x 32 heads x 128 that is ~10 ms of a MiniCPM-4.1
layer on an H200. Here each element is read once and written once.

Program roles: axis 0 = one token s, axis 1 = batch row b; the program rotates every head of that
token (BLOCK_H heads per step) with the token's cos / sin loaded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _to_output(y, dtype: tl.constexpr):
    """fp32 -> the output dtype, rounding to nearest even. For bfloat16 the rounding is done on the
    bits here, so the cast after it is exact: the same values compiled and under the CPU
    interpreter, whose own fp32 -> bf16 cast truncates."""
    if dtype == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        y = bits.to(tl.float32, bitcast=True)
    return y.to(dtype)


@triton.jit
def _rope_half_kernel(X, COS, SIN, Y, H,
                      stride_xb, stride_xh, stride_xs, stride_yb, stride_yh, stride_ys,
                      stride_cb, stride_cs, stride_sb, stride_ss,
                      HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, HALF)
    cos1 = tl.load(COS + b * stride_cb + s * stride_cs + d).to(tl.float32)
    cos2 = tl.load(COS + b * stride_cb + s * stride_cs + HALF + d).to(tl.float32)
    sin1 = tl.load(SIN + b * stride_sb + s * stride_ss + d).to(tl.float32)
    sin2 = tl.load(SIN + b * stride_sb + s * stride_ss + HALF + d).to(tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        ok = (h < H)[:, None]
        x_row = X + b * stride_xb + s * stride_xs + h[:, None].to(tl.int64) * stride_xh
        x1 = tl.load(x_row + d[None, :], mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + HALF + d[None, :], mask=ok, other=0.0).to(tl.float32)
        # rotate_half(x) = (-x2, x1): the first half is x1 cos - x2 sin, the second x2 cos + x1 sin.
        # The multiply-adds are explicit: left to the compiler, the contraction it picks can differ
        # between specialisations of this kernel (a batch of one vs several), and a padded row must
        # get the values it gets alone
        y1 = tl.fma(x1, cos1[None, :], -(x2 * sin1[None, :]))
        y2 = tl.fma(x2, cos2[None, :], x1 * sin2[None, :])
        y_row = Y + b * stride_yb + s * stride_ys + h[:, None].to(tl.int64) * stride_yh
        tl.store(y_row + d[None, :], _to_output(y1, Y.dtype.element_ty), mask=ok)
        tl.store(y_row + HALF + d[None, :], _to_output(y2, Y.dtype.element_ty), mask=ok)


def fused_rope_refuses(x: torch.Tensor, cos: torch.Tensor, head_axis: int) -> str | None:
    """Why `rope_half_fused` cannot take x (with this cos and head axis), or None when it can."""
    if x.dim() != 4 or head_axis not in (1, 2):
        return f"x must be 4-D with the head axis 1 or 2; got {tuple(x.shape)}, head_axis={head_axis}"
    D = x.shape[-1]
    half = D // 2
    if D % 2 or half < 2 or half & (half - 1):
        return f"the fused rotation takes D = 2 x a power of two >= 4; got D={D}"
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"x.dtype={x.dtype}; allowed: float32, bfloat16, float16"
    B, S = x.shape[0], x.shape[3 - head_axis]
    if cos.dim() != 3 or cos.shape[0] not in (1, B) or tuple(cos.shape[1:]) != (S, D):
        return f"cos / sin must be [B={B} or 1, S={S}, D={D}]; got {tuple(cos.shape)}"
    return None


def rope_half_fused(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_axis: int = 1,
                    block_h: int = 8) -> torch.Tensor:
    """The half-split rotation of x in fp32, cast back to x's dtype (module docstring for shapes)."""
    refusal = fused_rope_refuses(x, cos, head_axis) or (None if sin.shape == cos.shape else
                                                        f"sin {tuple(sin.shape)} must match cos {tuple(cos.shape)}")
    if refusal:
        raise ValueError(refusal)
    x = x if x.stride(-1) == 1 else x.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    y = torch.empty_like(x)  # x's strides (a transposed projection stays transposed)
    B, D = x.shape[0], x.shape[-1]
    H, S = x.shape[head_axis], x.shape[3 - head_axis]
    xb, xh, xs = x.stride(0), x.stride(head_axis), x.stride(3 - head_axis)
    yb, yh, ys = y.stride(0), y.stride(head_axis), y.stride(3 - head_axis)
    if x.numel():
        _rope_half_kernel[(S, B)](
            x, cos, sin, y, H, xb, xh, xs, yb, yh, ys,
            cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1),
            sin.stride(0) if sin.shape[0] > 1 else 0, sin.stride(1),
            HALF=D // 2, BLOCK_H=min(block_h, triton.next_power_of_2(H)), num_warps=4,
        )
    return y
