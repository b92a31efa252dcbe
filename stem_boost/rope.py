"""Rotary position embeddings, one helper per layout.

Two layouts occur in the supported models:
- "half" (`rotate_half`): the first and second halves of the rotary dims form the pairs
  (Llama, MiniCPM-4, DeepSeek-V3.2's lightning indexer);
- "interleaved": adjacent dims (x0, x1), (x2, x3), ... form the pairs (DeepSeek-V3.2's MLA rope
  part, transformers' `apply_rotary_pos_emb_interleave`), returned de-interleaved as transformers does.

cos / sin are [B, S, D] (or broadcastable); `unsqueeze_dim` inserts the head axis: 1 for
q [B, H, S, D], 2 for q [B, S, H, D].
"""

from __future__ import annotations

import functools

import torch

__all__ = ["rotate_half", "apply_rope_half", "apply_rope_interleaved", "is_stock_half_rope", "is_stock_interleaved_rope"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [..., D]: (x1, x2) -> (-x2, x1) with x1, x2 the two halves of the last dim."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_half(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    unsqueeze_dim: int = 1, *, compute_dtype: torch.dtype | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-split RoPE on q and k; `compute_dtype=torch.float32` rotates in fp32 and casts back
    (MiniCPM-4's official code does so). On CUDA that fp32 rotation runs as one Triton pass per
    tensor (`kernels.rope.rope_half_fused`: the same arithmetic, seven PyTorch passes fewer)."""
    if compute_dtype == torch.float32 and q.is_cuda and unsqueeze_dim in (1, 2):
        from .kernels import HAS_TRITON

        if HAS_TRITON:
            from .kernels.rope import fused_rope_refuses, rope_half_fused

            if fused_rope_refuses(q, cos, unsqueeze_dim) is None and fused_rope_refuses(k, cos, unsqueeze_dim) is None \
                    and sin.shape == cos.shape:
                return rope_half_fused(q, cos, sin, unsqueeze_dim), rope_half_fused(k, cos, sin, unsqueeze_dim)
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    qc = q if compute_dtype is None else q.to(compute_dtype)
    kc = k if compute_dtype is None else k.to(compute_dtype)
    q_embed = qc * cos + rotate_half(qc) * sin
    k_embed = kc * cos + rotate_half(kc) * sin
    if compute_dtype is not None:
        q_embed, k_embed = q_embed.to(q.dtype), k_embed.to(k.dtype)
    return q_embed, k_embed


def apply_rope_interleaved(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleaved RoPE: pairs (x[2i], x[2i+1]) rotated by the first half of cos / sin; the output
    is de-interleaved ([rotated evens | rotated odds]), as transformers' DeepSeek-V3.2 returns it."""
    cos = cos[..., : cos.shape[-1] // 2].unsqueeze(unsqueeze_dim)
    sin = sin[..., : sin.shape[-1] // 2].unsqueeze(unsqueeze_dim)
    q1, q2 = q[..., 0::2], q[..., 1::2]
    k1, k2 = k[..., 0::2], k[..., 1::2]
    q_embed = torch.cat([q1 * cos - q2 * sin, q2 * cos + q1 * sin], dim=-1)
    k_embed = torch.cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], dim=-1)
    return q_embed, k_embed


_INTERLEAVED_BODY = (  # its statements as `ast.unparse` writes them, without whitespace
    "cos=cos[...,:cos.shape[-1]//2].unsqueeze(unsqueeze_dim)",
    "sin=sin[...,:sin.shape[-1]//2].unsqueeze(unsqueeze_dim)",
    "q1,q2=(q[...,0::2],q[...,1::2])",
    "k1,k2=(k[...,0::2],k[...,1::2])",
    "q_embed=torch.cat([q1*cos-q2*sin,q2*cos+q1*sin],dim=-1)",
    "k_embed=torch.cat([k1*cos-k2*sin,k2*cos+k1*sin],dim=-1)",
    "return(q_embed,k_embed)",
)


_HALF_BODY = (  # transformers' `apply_rotary_pos_emb` (DeepSeek-V3.2's indexer, Llama, ...), as for the above
    "cos=cos.unsqueeze(unsqueeze_dim)",
    "sin=sin.unsqueeze(unsqueeze_dim)",
    "q_embed=q*cos+rotate_half(q)*sin",
    "k_embed=k*cos+rotate_half(k)*sin",
    "return(q_embed,k_embed)",
)
_ROTATE_HALF_BODY = (  # transformers' `rotate_half`
    "x1=x[...,:x.shape[-1]//2]",
    "x2=x[...,x.shape[-1]//2:]",
    "returntorch.cat((-x2,x1),dim=-1)",
)


def _statements(fn) -> tuple[str, ...] | None:
    """The statements of function `fn` as `ast.unparse` writes them, without whitespace, its
    docstring left out; None when its source cannot be read."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef):
        return None
    body = tree.body[0].body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]  # the docstring
    return tuple("".join(ast.unparse(node).split()) for node in body)


@functools.lru_cache(maxsize=64)
def is_stock_interleaved_rope(fn) -> bool:
    """True when `fn` is transformers' `apply_rotary_pos_emb_interleave` as written in its
    DeepSeek-V3.2 modeling file (5.17-5.24): the same statements, whitespace, comments and
    docstring aside. Only then may a layer's rotation be replaced by `apply_rope_interleaved`'s
    fused kernel; a model module that swapped in its own function keeps it. Cached per function:
    every layer's forward asks, and the answer needs its source parsed."""
    return _statements(fn) == _INTERLEAVED_BODY


@functools.lru_cache(maxsize=64)
def is_stock_half_rope(fn) -> bool:
    """True when `fn` is transformers' `apply_rotary_pos_emb` (the half-split rotation in the
    tensors' own dtype) and the `rotate_half` it calls (from its module) is transformers' too: only
    then may `kernels.rope.rope_half_rounded_fused` replace it (the same bits, one pass)."""
    rotate = getattr(fn, "__globals__", {}).get("rotate_half")
    return _statements(fn) == _HALF_BODY and rotate is not None and _statements(rotate) == _ROTATE_HALF_BODY
