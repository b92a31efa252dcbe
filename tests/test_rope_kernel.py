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
