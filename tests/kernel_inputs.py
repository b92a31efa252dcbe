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


def check_mla_token_kernel(kernel, B: int, S: int, T: int, H: int, kmax: int, dtype: torch.dtype, tiles, *,
                           same_without_lse: bool = False) -> None:
    """A Hopper MLA token kernel (`kernel(q, kv, idx, counts, ...)`, the `mla_token.py` contract) on fresh
    random inputs (seed printed) against `sparse_attention_reference` in fp64: the output, the lse and
    an empty row (zeros, lse -inf); ragged rows of 0..kmax causal keys. same_without_lse: the call
    without lse gives the same output bit for bit."""
    from stem_boost.kernels import sparse_attention_reference
    from stem_boost.selection import Selection

    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    print(f"seed={seed}")
    torch.manual_seed(seed)
    q = torch.randn(B, S, H, 576, device="cuda").to(dtype)
    kv = torch.randn(B, T, 1, 576, device="cuda").to(dtype)
    idx, counts = random_selection(B, 1, S, T, block_size=1, query_block=1, kmax=kmax, device="cuda")
    counts[0, 0, 0] = 0  # an empty row: zeros, lse -inf
    idx[0, 0, 0] = -1
    sel = Selection(idx=idx, counts=counts)
    want, want_lse = sparse_attention_reference(q.double(), kv.double(), kv[..., :512].double(), sel,
                                                sm_scale=576 ** -0.5, return_lse=True)
    got, got_lse = kernel(q, kv, idx[:, 0], counts[:, 0], sm_scale=576 ** -0.5, return_lse=True, tiles=tiles)
    torch.cuda.synchronize()
    assert got.shape == (B, S, H, 512) and got.dtype == dtype
    err = float((got.double() - want).norm() / want.norm())
    assert err < 1e-2, f"seed={seed} rel err {err}"
    live = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(got_lse), live), f"seed={seed}"
    assert float((got_lse[live].double() - want_lse[live]).abs().max()) < 1e-2, f"seed={seed}"
    assert bool((got[0, 0] == 0).all())
    if same_without_lse:
        again = kernel(q, kv, idx[:, 0], counts[:, 0], sm_scale=576 ** -0.5, tiles=tiles)
        assert torch.equal(again, got), f"seed={seed}"
