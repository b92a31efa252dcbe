"""Random inputs for the sparse-attention kernel tests and benchmarks (fresh on every call)."""

from __future__ import annotations

import torch


def random_selection(
    B: int, Hsel: int, S: int, T: int, *, block_size: int, query_block: int, kmax: int,
    full: bool = False, device="cpu", generator: torch.Generator | None = None,
):
    """A ragged, causally valid selection: idx [B, Hsel, R, Kmax] (-1 padded), counts [B, Hsel, R].

    Each row keeps a random number (0..all) of the key units whose first token is at or before the
    row's last query position (queries are the last S of T positions), in random order; `full=True`
    keeps every valid unit (then Kmax must cover them).
    """
    R = -(-S // query_block)
    n_units = -(-T // block_size)
    offset = T - S
    idx = torch.full((B, Hsel, R, kmax), -1, dtype=torch.int32)
    counts = torch.zeros((B, Hsel, R), dtype=torch.int32)
    for r in range(R):
        last_q = min(S - 1, r * query_block + query_block - 1) + offset
        n_valid = min(n_units, last_q // block_size + 1)
        for b in range(B):
            for h in range(Hsel):
                perm = torch.randperm(n_valid, generator=generator)
                n = n_valid if full else int(torch.randint(0, min(kmax, n_valid) + 1, (1,), generator=generator))
                n = min(n, kmax)
                idx[b, h, r, :n] = perm[:n].to(torch.int32)
                counts[b, h, r] = n
    return idx.to(device), counts.to(device)


def random_qkv(B, S, T, Hq, Hkv, Dqk, Dv, dtype, device="cpu", mla_absorbed=False):
    """q [B, S, Hq, Dqk], k [B, T, Hkv, Dqk], v [B, T, Hkv, Dv] ~ N(0, 1); MLA: v = k[..., :Dv]."""
    q = torch.randn(B, S, Hq, Dqk, device=device).to(dtype)
    k = torch.randn(B, T, Hkv, Dqk, device=device).to(dtype)
    v = k[..., :Dv] if mla_absorbed else torch.randn(B, T, Hkv, Dv, device=device).to(dtype)
    return q, k, v
