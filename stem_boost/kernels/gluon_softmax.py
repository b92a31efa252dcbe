"""Online-softmax pieces shared by the Gluon attention kernels (`mla_token_ws`, `block_union_sm90`); the
Triton kernels share theirs through `online_softmax` (a Gluon kernel cannot call a Triton function)."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

__all__ = ["finite_max"]


@gluon.jit
def finite_max(m):
    """The running max with -inf (nothing seen yet) as 0, so that exp2(x - m) stays defined."""
    return gl.where(m == float("-inf"), 0.0, m)
