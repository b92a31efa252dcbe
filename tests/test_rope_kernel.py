"""The one-pass RoPE kernel against `apply_rope_half(compute_dtype=torch.float32)` (Triton interpreter on CPU)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from stem_boost.kernels import HAS_TRITON
from stem_boost.rope import apply_rope_half

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_axis,B,H,S,D,cos_batch", [(1, 2, 5, 7, 16, 2), (2, 1, 3, 9, 8, 1), (1, 2, 12, 4, 32, 1)])
def test_fused_rope_matches_the_fp32_definition(seed, dtype, head_axis, B, H, S, D, cos_batch):
    """Same values as PyTorch's fp32 rotation (bf16: the same rounding but for fp32 near-ties: at
    most one unit in the last place), the input's strides kept (a transposed projection)."""
    from stem_boost.kernels.rope import rope_half_fused

    x = torch.randn(B, S, H, D).to(dtype)
    if head_axis == 1:
        x = x.transpose(1, 2)  # [B, H, S, D] view of a [B, S, H, D] projection, as the attention makes it
    pos = torch.randint(0, 4096, (cos_batch, S)).float()
    freqs = pos[..., None] * (10000.0 ** (-torch.arange(0, D, 2).float() / D))[None, None]
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos(), emb.sin()
    want, _ = apply_rope_half(x, x[:, :1] if head_axis == 1 else x[:, :, :1], cos, sin, head_axis,
                              compute_dtype=torch.float32)
    got = rope_half_fused(x, cos, sin, head_axis)
    assert got.dtype == dtype and got.shape == x.shape and got.stride() == x.stride()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:
        diff = (got.float() - want.float()).abs()
        ulp = want.float().abs().clamp_min(1e-30) * 2.0 ** -7
        assert bool((diff <= ulp).all()), f"seed={seed}"
        assert float((got == want).float().mean()) > 0.99, f"seed={seed}"


def test_fused_rope_names_what_it_takes():
    from stem_boost.kernels.rope import rope_half_fused

    x = torch.randn(1, 2, 3, 12)
    cos = torch.randn(1, 3, 12)
    with pytest.raises(ValueError, match="D = 2 x a power of two"):
        rope_half_fused(x, cos, cos)
    with pytest.raises(ValueError, match="cos / sin must be"):
        rope_half_fused(torch.randn(1, 2, 3, 16), torch.randn(1, 4, 16), torch.randn(1, 4, 16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,S,D,cos_batch", [(2, 5, 7, 64, 2), (1, 20, 3, 16, 1)])
def test_fused_interleaved_rope_equals_the_pytorch_ops_bit_for_bit(seed, dtype, B, H, S, D, cos_batch):
    """`rope_interleaved_fused` rounds each product and sum to the 16-bit dtype as PyTorch's ops do,
    so it equals `apply_rope_interleaved` exactly, from a strided view and into a strided `out`."""
    from stem_boost.kernels.rope import rope_interleaved_fused
    from stem_boost.rope import apply_rope_interleaved

    x = (torch.randn(B, S, H, D + 8) * 3).to(dtype).transpose(1, 2)[..., 8:]  # [B, H, S, D] strided view
    angles = torch.rand(cos_batch, S, D // 2) * 50.0
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(dtype)
    want, _ = apply_rope_interleaved(x, x[:, :1], cos, sin)
    assert torch.equal(rope_interleaved_fused(x, cos, sin), want)
    buf = torch.full((B, H, S, D + 5), 3.0, dtype=dtype)
    rope_interleaved_fused(x, cos, sin, out=buf[..., 5:])
    assert torch.equal(buf[..., 5:], want) and bool((buf[..., :5] == 3.0).all())


def test_fused_interleaved_rope_names_what_it_takes():
    from stem_boost.kernels.rope import rope_interleaved_fused

    x = torch.randn(1, 2, 3, 8, dtype=torch.bfloat16)
    cos = torch.randn(1, 3, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="x.dtype=torch.float32"):
        rope_interleaved_fused(x.float(), cos.float(), cos.float())
    with pytest.raises(ValueError, match="cos must be torch.bfloat16"):
        rope_interleaved_fused(x, cos.float(), cos)
    with pytest.raises(ValueError, match="D = 2 x a power of two"):
        rope_interleaved_fused(x[..., :6], cos[..., :6], cos[..., :6])
    with pytest.raises(ValueError, match="out must be"):
        rope_interleaved_fused(x, cos, cos, out=torch.empty(1, 2, 3, 8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_axis,B,H,S,cos_batch", [(2, 2, 5, 7, 2), (1, 1, 20, 3, 1)])
def test_fused_half_rope_in_the_tensor_dtype_equals_transformers_bit_for_bit(seed, dtype, head_axis, B, H, S, cos_batch):
    """`rope_half_rounded_fused` rounds each product and the sum to the 16-bit dtype as PyTorch's
    ops do, so it equals transformers' own `apply_rotary_pos_emb` (DeepSeek-V3.2's indexer rotation)
    exactly: from the rope channels of wider heads, in place, and the stock-function check holds."""
    from transformers.models.deepseek_v32 import modeling_deepseek_v32 as hf

    from stem_boost.kernels.rope import rope_half_rounded_fused
    from stem_boost.rope import is_stock_half_rope

    D = 64
    gen = torch.Generator().manual_seed(seed)
    shape = (B, S, H, D + 64) if head_axis == 2 else (B, H, S, D + 64)
    full = (torch.randn(*shape, generator=gen) * 3).to(dtype)
    x = full[..., :D]  # the rope channels first, as DeepSeek-V3.2's indexer has them
    angles = torch.rand(cos_batch, S, D // 2, generator=gen) * 50.0
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(dtype)
    assert is_stock_half_rope(hf.apply_rotary_pos_emb)
    want, _ = hf.apply_rotary_pos_emb(x, x, cos, sin, unsqueeze_dim=head_axis)
    assert torch.equal(rope_half_rounded_fused(x, cos, sin, head_axis=head_axis), want)
    rest = full[..., D:].clone()
    rope_half_rounded_fused(x, cos, sin, head_axis=head_axis, out=x)  # in place
    assert torch.equal(full[..., :D], want) and torch.equal(full[..., D:], rest)
    with pytest.raises(ValueError, match="x.dtype=torch.float32"):
        rope_half_rounded_fused(x.float(), cos.float(), sin.float(), head_axis=head_axis)
    with pytest.raises(ValueError, match="sin must be"):
        rope_half_rounded_fused(x, cos, sin.float(), head_axis=head_axis)


def rotate_half(x):  # not transformers' swap: (x2, -x1)
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((x2, -x1), dim=-1)


def swapped_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):  # transformers' body, this module's rotate_half
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def test_a_swapped_in_rotation_is_not_taken_for_the_stock_one():
    """A module whose `rotate_half` (or apply function) differs from transformers' keeps its own."""
    from stem_boost.rope import apply_rope_half, is_stock_half_rope

    assert not is_stock_half_rope(swapped_apply_rotary_pos_emb) and not is_stock_half_rope(apply_rope_half)
