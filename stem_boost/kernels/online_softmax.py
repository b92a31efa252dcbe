"""The online softmax of the attention kernels (`block_union`, `triton_sparse`, `mla_token`), one
@triton.jit helper per step so that the three kernels share one definition (inlined: the same code
as written in place). Scores are in log2 units (the kernels fold log2(e) into the scale)."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["online_softmax_step", "natural_lse", "store_rows"]


@triton.jit
def online_softmax_step(qk, m_i, l_i):
    """One key tile: qk [M, N] scores (-inf where masked), running row max m_i and sum l_i [M] ->
    (p [M, N] unnormalised probabilities, alpha [M] the factor that rescales the accumulator so far,
    the new max, the new sum). A row with no finite score yet keeps max -inf, p = 0, sum 0."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_new = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_new


@triton.jit
def natural_lse(m_safe, l_i, l_div):
    """Row log-sum-exp in natural log from the log2-unit max m_safe (0 for an empty row), the sum l_i
    and its safe divisor l_div (1 for an empty row): -inf for a row that saw no key."""
    return tl.where(l_i == 0.0, float("-inf"), (m_safe + tl.math.log2(l_div)) * 0.6931471805599453)


@triton.jit
def store_rows(acc, m_safe, l_i, o_rows, lse_rows, row_ok, dv, DV: tl.constexpr, RETURN_LSE: tl.constexpr):
    """The epilogue: acc [M, DVP] divided by the row sums l_i, stored at o_rows [M] (pointers to
    each row's output, + dv [DVP] columns, the first DV real); with RETURN_LSE the natural-log lse
    (from the log2 max m_safe) at lse_rows [M]. Rows that saw no key get zeros and -inf."""
    l_div = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_div[:, None]
    tl.store(o_rows[:, None] + dv[None, :], out.to(o_rows.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < DV))
    if RETURN_LSE:
        tl.store(lse_rows, natural_lse(m_safe, l_i, l_div), mask=row_ok)
