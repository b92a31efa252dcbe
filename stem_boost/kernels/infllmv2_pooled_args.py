"""The launch arguments shared by InfLLMv2's two pooled stage-1 kernels (the Triton one in
`infllmv2_select`, the Gluon one for Hopper in `infllmv2_pooled_sm90`): one list, so that the two
kernels cannot drift apart in what they are given."""

from __future__ import annotations

import torch

from .infllmv2_scores import LOG2E

__all__ = ["pooled_launch_args"]


def pooled_launch_args(q: torch.Tensor, k1: torch.Tensor, lse: torch.Tensor, vis1: torch.Tensor, n_blocks: int,
                       scale: float, *, q_pos0: int, n_existing: int | None, lo1: torch.Tensor | None,
                       key_bias: torch.Tensor | None) -> tuple[torch.Tensor, tuple]:
    """The result [B, Hk, C, n_blocks] fp32 (empty) and the run-time arguments of a pooled stage-1
    kernel (`_pooled_scores_kernel` and its Gluon twin take the same ones, in this order): tensors,
    scale in log2 units, sizes, strides, kv heads. Checks key_bias's shape."""
    B, Hq, C, D = q.shape
    Hk, K1 = k1.shape[1], k1.shape[2]
    n_existing = K1 if n_existing is None else int(n_existing)
    k1 = k1.to(q.dtype).contiguous()
    vis1 = vis1.to(torch.int32)
    vis1 = (vis1.unsqueeze(0) if vis1.dim() == 1 else vis1).contiguous()
    out = torch.empty(B, Hk, C, n_blocks, dtype=torch.float32, device=q.device)
    if key_bias is not None:
        key_bias = key_bias.float().contiguous()
        if key_bias.dim() != 3 or key_bias.shape[:2] != (B, Hk) or key_bias.shape[2] < n_blocks:
            raise ValueError(f"key_bias must be [B={B}, Hk={Hk}, >= {n_blocks}]; got {tuple(key_bias.shape)}")
    args = (q, k1, lse, vis1, lo1 if lo1 is not None else vis1, out, key_bias if key_bias is not None else out,
            float(scale) * LOG2E, C, n_existing, n_blocks, q_pos0,
            q.stride(0), q.stride(1), q.stride(2),
            k1.stride(0), k1.stride(1), k1.stride(2),
            lse.stride(0), lse.stride(1),
            vis1.stride(0) if vis1.shape[0] > 1 else 0,
            out.stride(0), out.stride(1), out.stride(2),
            key_bias.stride(0) if key_bias is not None else 0, key_bias.stride(1) if key_bias is not None else 0,
            Hk)
    return out, args
