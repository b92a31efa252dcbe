"""Half-split RoPE of one tensor in one Triton pass (MiniCPM-4's prefill rotation).

    y = rope_half_fused(x, cos, sin, head_axis=1)

x [B, H, S, D] (head_axis 1) or [B, S, H, D] (head_axis 2), any strides with unit stride on D;
cos / sin [B or 1, S, D]. y has x's shape, dtype and strides, and is

    y = (x * cos + rotate_half(x) * sin) computed in fp32, cast to x's dtype

which is `stem_boost.rope.apply_rope_half(..., compute_dtype=torch.float32)` for one tensor. PyTorch
runs that as seven passes over fp32 copies of x (upcast, two products, the half swap's cat and
negation, the sum, the downcast): at 128K tokens x 32 heads x 128 that is ~10 ms of a MiniCPM-4.1
layer on an H200. Here each element is read once and written once.

`rope_half_rounded_fused` is the same rotation as transformers' `apply_rotary_pos_emb` computes it
on 16-bit tensors (each product and the sum rounded to the dtype: the same bits), in place if asked
(DeepSeek-V3.2's indexer queries); `rope_interleaved_fused` is its interleaved MLA rotation.

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
                      HALF: tl.constexpr, BLOCK_H: tl.constexpr, ROUND_EACH_OP: tl.constexpr = False):
    """Program: one token s of batch row b, every head (BLOCK_H a step). ROUND_EACH_OP: each product
    and the sum rounded to the output dtype, as transformers' `apply_rotary_pos_emb` on 16-bit
    tensors does; else fp32 throughout, one rounding at the end (MiniCPM-4's fp32 rotation). Y may
    be X (in place): a program reads its heads' elements before it writes them."""
    s = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, HALF)
    dt = Y.dtype.element_ty
    cos1 = tl.load(COS + b * stride_cb + s * stride_cs + d).to(tl.float32)[None, :]
    cos2 = tl.load(COS + b * stride_cb + s * stride_cs + HALF + d).to(tl.float32)[None, :]
    sin1 = tl.load(SIN + b * stride_sb + s * stride_ss + d).to(tl.float32)[None, :]
    sin2 = tl.load(SIN + b * stride_sb + s * stride_ss + HALF + d).to(tl.float32)[None, :]
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        ok = (h < H)[:, None]
        x_row = X + b * stride_xb + s * stride_xs + h[:, None].to(tl.int64) * stride_xh
        x1 = tl.load(x_row + d[None, :], mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + HALF + d[None, :], mask=ok, other=0.0).to(tl.float32)
        # rotate_half(x) = (-x2, x1): the first half is x1 cos - x2 sin, the second x2 cos + x1 sin
        if ROUND_EACH_OP:
            y1 = _to_output(_to_output(x1 * cos1, dt).to(tl.float32) + _to_output(-x2 * sin1, dt).to(tl.float32), dt)
            y2 = _to_output(_to_output(x2 * cos2, dt).to(tl.float32) + _to_output(x1 * sin2, dt).to(tl.float32), dt)
        else:
            # The multiply-adds are explicit: left to the compiler, the contraction it picks can differ
            # between specialisations of this kernel (a batch of one vs several), and a padded row must
            # get the values it gets alone
            y1 = _to_output(tl.fma(x1, cos1, -(x2 * sin1)), dt)
            y2 = _to_output(tl.fma(x2, cos2, x1 * sin2), dt)
        y_row = Y + b * stride_yb + s * stride_ys + h[:, None].to(tl.int64) * stride_yh
        tl.store(y_row + d[None, :], y1, mask=ok)
        tl.store(y_row + HALF + d[None, :], y2, mask=ok)


def rope_half_rounded_fused(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_axis: int = 2,
                            out: torch.Tensor | None = None, block_h: int = 16) -> torch.Tensor:
    """transformers' `apply_rotary_pos_emb` of one tensor in its own 16-bit dtype, bit for bit, in
    one pass: x [B, H, S, D] (head_axis 1) or [B, S, H, D] (head_axis 2), any strides with a unit
    last stride (e.g. the rope channels of DeepSeek-V3.2's indexer queries, a slice of each head);
    cos / sin [B or 1, S, D] in x's dtype. PyTorch runs it as five elementwise passes and the half
    swap's concatenation (at 128K tokens x 64 indexer heads x 64 rope channels about 6 ms of an
    H200 layer). `out`: where to write (x's shape and dtype, unit last stride; x itself for an
    in-place rotation); None: a new tensor."""
    refusal = rounded_rope_refuses(x, cos, sin, head_axis)
    if refusal:
        raise ValueError(refusal)
    return _rotate_rounded(_rope_half_kernel, x, cos, sin, out, head_axis, block_h, ROUND_EACH_OP=True)


def rounded_rope_refuses(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_axis: int) -> str | None:
    """Why `rope_half_rounded_fused` cannot take x (with this cos / sin and head axis), or None."""
    refusal = fused_rope_refuses(x, cos, head_axis)
    if refusal is None and x.dtype not in (torch.bfloat16, torch.float16):
        refusal = f"x.dtype={x.dtype}; allowed: bfloat16, float16 (each op rounds to it, as PyTorch's do)"
    for name, t in (("cos", cos), ("sin", sin)):
        if refusal is None and (t.dtype != x.dtype or t.shape != cos.shape):
            refusal = f"{name} must be {x.dtype} {tuple(cos.shape)}; got {t.dtype} {tuple(t.shape)}"
    return refusal


def _rotate_rounded(kernel, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None,
                    head_axis: int, block_h: int, **constexprs) -> torch.Tensor:
    """Launch a one-token-a-program rotation `kernel` (X, COS, SIN, Y, H, x / y strides (b, h, s), cos
    / sin strides (b, s), HALF, BLOCK_H) on checked inputs: x [B, H, S, D] or [B, S, H, D] (head_axis
    1 or 2) into `out` (validated) or a new tensor."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {x.dtype} {tuple(x.shape)} with a unit last stride; got "
                         f"{out.dtype} {tuple(out.shape)} strides {out.stride()}")
    B, D = x.shape[0], x.shape[-1]
    H, S = x.shape[head_axis], x.shape[3 - head_axis]
    if x.numel():
        kernel[(S, B)](
            x, cos, sin, out, H, x.stride(0), x.stride(head_axis), x.stride(3 - head_axis),
            out.stride(0), out.stride(head_axis), out.stride(3 - head_axis),
            cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1),
            sin.stride(0) if sin.shape[0] > 1 else 0, sin.stride(1),
            HALF=D // 2, BLOCK_H=min(block_h, triton.next_power_of_2(H)), num_warps=4, **constexprs,
        )
    return out


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


@triton.jit
def _rope_interleaved_kernel(X, COS, SIN, Y, H,
                             stride_xb, stride_xh, stride_xs, stride_yb, stride_yh, stride_ys,
                             stride_cb, stride_cs, stride_sb, stride_ss,
                             HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program: one token s of batch row b, every head. Pairs (x[2i], x[2i+1]) turn by cos[i], sin[i];
    the output is de-interleaved: y[i] = x[2i] cos - x[2i+1] sin, y[HALF + i] = x[2i+1] cos + x[2i] sin,
    each product and each sum rounded to the output dtype, as the PyTorch ops on 16-bit tensors do."""
    s = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, HALF)
    dt = Y.dtype.element_ty
    c = tl.load(COS + b * stride_cb + s * stride_cs + d).to(tl.float32)[None, :]
    sn = tl.load(SIN + b * stride_sb + s * stride_ss + d).to(tl.float32)[None, :]
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        ok = (h < H)[:, None]
        x_row = X + b * stride_xb + s * stride_xs + h[:, None].to(tl.int64) * stride_xh
        x1 = tl.load(x_row + 2 * d[None, :], mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + 2 * d[None, :] + 1, mask=ok, other=0.0).to(tl.float32)
        y1 = _to_output(_to_output(x1 * c, dt).to(tl.float32) - _to_output(x2 * sn, dt).to(tl.float32), dt)
        y2 = _to_output(_to_output(x2 * c, dt).to(tl.float32) + _to_output(x1 * sn, dt).to(tl.float32), dt)
        y_row = Y + b * stride_yb + s * stride_ys + h[:, None].to(tl.int64) * stride_yh
        tl.store(y_row + d[None, :], y1, mask=ok)
        tl.store(y_row + HALF + d[None, :], y2, mask=ok)


def fused_interleaved_refuses(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> str | None:
    """Why `rope_interleaved_fused` cannot take x [B, H, S, D] with this cos / sin, or None."""
    if x.dim() != 4:
        return f"x must be [B, H, S, D]; got {tuple(x.shape)}"
    B, _, S, D = x.shape
    half = D // 2
    if D % 2 or half < 2 or half & (half - 1):
        return f"the fused rotation takes D = 2 x a power of two >= 4; got D={D}"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"x.dtype={x.dtype}; allowed: bfloat16, float16 (each op rounds to it, as PyTorch's do)"
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype != x.dtype or t.dim() != 3 or t.shape[0] not in (1, B) or tuple(t.shape[1:]) != (S, D):
            return f"{name} must be {x.dtype} [B={B} or 1, S={S}, D={D}]; got {t.dtype} {tuple(t.shape)}"
    return None


def rope_interleaved_fused(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None,
                           block_h: int = 16) -> torch.Tensor:
    """`stem_boost.rope.apply_rope_interleaved` of one tensor x [B, H, S, D] (bf16 / fp16, any
    strides with a unit last stride) in one pass, bit for bit: PyTorch runs it as six elementwise
    passes and a concatenation (at 128K tokens x 128 heads x 64 that is about 2 GB read and written
    seven times). `out` [B, H, S, D] (unit last stride; a view into a larger buffer, e.g. the rope
    columns of the absorbed-MLA queries) receives the result; None: a new contiguous tensor."""
    refusal = fused_interleaved_refuses(x, cos, sin)
    if refusal:
        raise ValueError(refusal)
    return _rotate_rounded(_rope_interleaved_kernel, x, cos, sin, out, 1, block_h)
