"""The radix-select top-k (`kernels/dsa_topk.py`) against its PyTorch definition (Triton interpreter on CPU).

Every case draws fresh random scores (seed logged) with ties, -inf (masked / acausal) keys, -0.0 and
+0.0, an OAM key bias, per-row budgets and causal limits, and checks the kept positions exactly.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from stem_boost.kernels import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")


def _scores(B: int, R: int, T: int, gen: torch.Generator, ties: bool) -> torch.Tensor:
    s = torch.randn(B, R, T, generator=gen)
    if ties:  # few distinct values: many exact ties, both zero signs
        s = torch.round(s * 2) / 2
        s[torch.rand(B, R, T, generator=gen) < 0.1] = -0.0
    s[torch.rand(B, R, T, generator=gen) < 0.15] = float("-inf")
    return s


@pytest.mark.parametrize("case", [  # B, R, T, k, ties, bias, budgets, valid_len, bits, block
    (1, 5, 37, 8, False, False, False, False, 11, 16),
    (2, 4, 100, 16, True, False, False, False, 11, 32),
    (2, 6, 130, 20, True, True, True, True, 8, 64),
    (1, 7, 64, 64, True, True, False, True, 11, 16),      # k >= #valid in many rows
    (1, 3, 50, 80, False, False, True, False, 8, 16),     # k > T
    (2, 5, 300, 24, False, True, True, True, 12, 128),
])
def test_topk_rows_matches_definition(case):
    from stem_boost.kernels.dsa_topk import topk_rows, topk_rows_reference

    B, R, T, k, ties, bias, budgets, valid_len, bits, block = case
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    print(f"seed={seed}")
    gen = torch.Generator().manual_seed(seed)
    s = _scores(B, R, T, gen, ties)
    kb = torch.round(torch.randn(B, T, generator=gen) * 2) / 4 if bias else None
    bud = torch.randint(0, k + 3, (B, R), generator=gen, dtype=torch.int32) if budgets else None
    vl = torch.randint(0, T + 1, (B, R), generator=gen, dtype=torch.int32) if valid_len else None
    want_idx, want_n = topk_rows_reference(s, k, key_bias=kb, budgets=bud, valid_len=vl)
    got_idx, got_n = topk_rows(s, k, key_bias=kb, budgets=bud, valid_len=vl, bits=bits, block=block)
    assert torch.equal(got_n, want_n), f"seed={seed}"
    assert torch.equal(got_idx, want_idx), f"seed={seed}"


def test_topk_rows_pipelined_passes_match_definition(seed):
    """`stages` > 1 (the pass loops software-pipelined on a GPU) selects exactly as the default."""
    from stem_boost.kernels.dsa_topk import topk_rows, topk_rows_reference

    gen = torch.Generator().manual_seed(seed)
    B, R, T, k = 2, 5, 150, 20
    s = _scores(B, R, T, gen, ties=True)
    kb = torch.round(torch.randn(B, T, generator=gen) * 2) / 4
    vl = torch.randint(0, T + 1, (B, R), generator=gen, dtype=torch.int32)
    want = topk_rows_reference(s, k, key_bias=kb, valid_len=vl)
    for stages in (2, 3):
        got = topk_rows(s, k, key_bias=kb, valid_len=vl, block=32, stages=stages)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), stages


def test_topk_rows_bf16_and_all_masked_rows():
    from stem_boost.kernels.dsa_topk import topk_rows, topk_rows_reference

    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    print(f"seed={seed}")
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 4, 90, generator=gen).to(torch.bfloat16)  # bf16: many ties
    s[0, 1] = float("-inf")  # a row with nothing valid
    want = topk_rows_reference(s, 12)
    got = topk_rows(s, 12, block=32)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), f"seed={seed}"
    assert int(got[1][0, 1]) == 0 and bool((got[0][0, 1] == -1).all())


def test_reference_is_torch_topk_on_distinct_scores():
    """The oracle itself: on distinct scores the kept set is torch.topk's set."""
    from stem_boost.kernels.dsa_topk import topk_rows_reference

    s = torch.randn(2, 3, 200, dtype=torch.float64).float()
    idx, n = topk_rows_reference(s, 17)
    want = s.topk(17, dim=-1).indices.sort(dim=-1).values.to(torch.int32)
    assert torch.equal(idx, want) and bool((n == 17).all())


@pytest.mark.parametrize("dtype", ["float32", "fp8", "bfloat16"])
def test_indexer_topk_chunked_equals_whole(dtype):
    """Chunked scoring + topk_rows (masked tails never written) == the definition on the whole matrix."""
    from stem_boost.kernels.dsa_topk import indexer_topk, topk_rows_reference
    from stem_boost.kernels.indexer_scores import fp8_index_scores, fused_index_scores

    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    print(f"seed={seed}")
    torch.manual_seed(seed)
    B, S, T, H, D, k = 2, 24, 40, 2, 16, 9
    q, kk, w = torch.randn(B, S, H, D), torch.randn(B, T, D), torch.randn(B, S, H)
    bias = torch.randn(B, T) * 0.1
    budgets = torch.randint(0, k + 2, (B, S), dtype=torch.int32)
    got = indexer_topk(q, kk, w, 0.25, k, dtype=dtype, key_bias=bias, budgets=budgets, chunk_rows=7)
    if dtype == "fp8":
        full = fp8_index_scores(q, kk, w, 0.25, causal_offset=T - S, block_s=64, block_t=128)
    elif dtype == "bfloat16":
        full = fused_index_scores(q.to(torch.bfloat16), kk, w, 0.25, causal_offset=T - S)
    else:
        full = torch.einsum("bsh,bsht->bst", w, torch.relu(torch.einsum("bshd,btd->bsht", q, kk) * 0.25))
        visible = torch.arange(T)[None, :] <= torch.arange(S)[:, None] + T - S
        full = full.masked_fill(~visible, float("-inf"))
    want = topk_rows_reference(full, k, key_bias=bias, budgets=budgets)
    assert torch.equal(got[1], want[1]), f"seed={seed}"
    if dtype == "float32":  # per-head fp32 sums in another order: compare the kept sets' scores, not positions
        ref_scores = (full + bias[:, None, :]).gather(-1, want[0].clamp(min=0).long()).masked_fill(want[0] < 0, 0)
        got_scores = (full + bias[:, None, :]).gather(-1, got[0].clamp(min=0).long()).masked_fill(got[0] < 0, 0)
        torch.testing.assert_close(got_scores.sort(-1).values, ref_scores.sort(-1).values, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got[0], want[0]), f"seed={seed}"


CUT_VARIANTS = [dict(method="block", search="bisect", skip_prefix=False),
                dict(method="block", search="bisect", skip_prefix=True),
                dict(method="block", search="interpolate", skip_prefix=False), dict(method="warp", num_warps=1),
                dict(method="warp", num_warps=4, out_chunks=1), dict(method="warp", num_warps=2, skip_prefix=True),
                dict(method="warp", num_warps=1, skip_prefix=True, stash=True), dict()]  # dict(): the defaults


@pytest.mark.parametrize("variant", CUT_VARIANTS, ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()))
@pytest.mark.parametrize("B,H,R,K,N,bias_heads", [(2, 1, 9, 24, 60, 1), (1, 3, 7, 40, 50, 3), (2, 2, 5, 17, 30, 1),
                                                  (1, 1, 3, 130, 400, 1)])
def test_candidate_cut_matches_the_tie_rule(seed, B, H, R, K, N, bias_heads, variant):
    """Stem's one-pass cut keeps, per row, its budget of candidates by score + gathered bias (higher
    first, equal -> smaller key), with ties, -0.0, -inf and NaN scores, -1 holes, budgets above the
    valid count and 0; one row a program by bisection (from the top or below the shared prefix) and
    by interpolation, one row a warp (rows that end inside a chunk of 32, a program's last rows
    beyond the tensor, several writing steps a row)."""
    from stem_boost.kernels.dsa_topk import candidate_cut

    gen = torch.Generator().manual_seed(seed)
    cand = torch.stack([torch.randperm(N, generator=gen)[:K].sort().values for _ in range(B * H * R)]).view(B, H, R, K)
    holes = torch.rand(B, H, R, K, generator=gen) < 0.15
    cand = torch.where(holes, -1, cand).int()
    scores = torch.round(torch.randn(B, H, R, K, generator=gen) * 2) / 2  # many ties
    scores[torch.rand(B, H, R, K, generator=gen) < 0.1] = -0.0
    scores[torch.rand(B, H, R, K, generator=gen) < 0.1] = float("-inf")
    scores[torch.rand(B, H, R, K, generator=gen) < 0.03] = float("nan")
    bias = torch.randint(0, 3, (B, bias_heads, N), generator=gen).float() * 0.5
    budgets = torch.randint(0, K + 3, (B, H, R), generator=gen)
    budgets[0, 0, 0] = 0
    idx, counts = candidate_cut(cand, scores, budgets, key_bias=bias, **variant)
    for b in range(B):
        for h in range(H):
            for r in range(R):
                c = cand[b, h, r]
                s = scores[b, h, r] + bias[b, min(h, bias_heads - 1)].gather(0, c.clamp_min(0).long()) + 0.0
                ok = (c >= 0) & (s > float("-inf"))
                order = sorted((-float(s[j]), int(c[j])) for j in range(K) if ok[j])
                want = sorted(key for _, key in order[: max(0, int(budgets[b, h, r]))])
                n = int(counts[b, h, r])
                assert n == len(want), (b, h, r)
                assert idx[b, h, r, :n].tolist() == want, (b, h, r)
                assert (idx[b, h, r, n:] == -1).all()


@pytest.mark.parametrize("variant", CUT_VARIANTS[1:], ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()))
@pytest.mark.parametrize("spread", ["narrow", "equal", "mixed signs", "huge", "tail"])
def test_candidate_cut_searches_keep_the_full_bisections_set(seed, spread, variant):
    """The bisection started below the bits a row's candidates share (`skip_prefix`), the
    interpolation search and the one-row-a-warp kernel keep exactly what the full bisection keeps: rows
    whose scores sit in one binade (a long shared prefix), rows of one repeated score (no bit to
    bisect), scores of both signs (no shared prefix), magnitudes near the float range's ends, the top
    of a larger row (a skewed tail: interpolation's slow case); with a row without any valid
    candidate and one with a single one."""
    from stem_boost.kernels.dsa_topk import candidate_cut

    gen = torch.Generator().manual_seed(seed)
    B, H, R, K, N = 1, 1, 12, 48, 200
    cand = torch.stack([torch.randperm(N, generator=gen)[:K].sort().values for _ in range(R)]).view(B, H, R, K).int()
    base = {"narrow": 3.0 + torch.rand(B, H, R, K, generator=gen) * 0.01,
            "equal": torch.full((B, H, R, K), 1.5),
            "mixed signs": torch.randn(B, H, R, K, generator=gen),
            "huge": torch.randn(B, H, R, K, generator=gen) * 1e37,
            "tail": torch.randn(B, H, R, 40 * K, generator=gen).topk(K, dim=-1).values}[spread]
    scores = base.clone()
    scores[0, 0, 0] = float("-inf")  # no valid candidate
    scores[0, 0, 1, 1:] = float("-inf")  # one
    budgets = torch.randint(0, K + 2, (B, H, R), generator=gen)
    got = candidate_cut(cand, scores, budgets, **variant)
    full = candidate_cut(cand, scores, budgets, method="block", skip_prefix=False)
    assert torch.equal(got[1], full[1]) and torch.equal(got[0], full[0]), f"seed={seed}"
    for r in range(R):  # and both the definition: higher score first, equal -> smaller key
        s, c = scores[0, 0, r], cand[0, 0, r]
        ok = s > float("-inf")
        order = sorted((-float(s[j]), int(c[j])) for j in range(K) if ok[j])
        want = sorted(key for _, key in order[: int(budgets[0, 0, r])])
        n = int(got[1][0, 0, r])
        assert got[0][0, 0, r, :n].tolist() == want, (r, f"seed={seed}")


@pytest.mark.parametrize("kwargs,message", [
    (dict(search="radix"), "search='radix'; allowed: 'bisect', 'interpolate'"),
    (dict(method="sort"), "method='sort'; allowed: 'block', 'warp'"),
    (dict(method="warp", search="interpolate"), "method=.warp. finds a row.s threshold by bisection"),
    (dict(method="warp", num_warps=3), "num_warps=3; allowed for method='warp'"),
    (dict(method="warp", out_chunks=3), "out_chunks=3; allowed: a power of two"),
    (dict(method="warp", out_chunks=0), "out_chunks=0; allowed: a power of two"),
    (dict(method="warp", maxnreg=16), "maxnreg=16; allowed: 0 .the compiler's choice. or 32..255"),
    (dict(method="warp", maxnreg=True), "maxnreg=True; allowed"),
])
def test_candidate_cut_names_what_it_refuses(kwargs, message):
    """A search, method or tiling the kernels do not have is refused before any launch, naming the value."""
    from stem_boost.kernels.dsa_topk import candidate_cut

    cand = torch.arange(128, dtype=torch.int32).view(1, 1, 1, 128)
    with pytest.raises(ValueError, match=message):
        candidate_cut(cand, torch.randn(1, 1, 1, 128), torch.ones(1, 1, 1, dtype=torch.int32), **kwargs)


@pytest.mark.parametrize("method", ["sampled", "warp"])
@pytest.mark.parametrize("T,k,capacity,path", [
    (20000, 64, 2048, "buffer"),    # the sample's threshold holds: every row takes the buffer
    (700, 30, 1024, "buffer"),      # the whole row fits the buffer: no sample at all
    (700, 650, 1024, "buffer"),     # ... and keeps all its valid keys where they are fewer than k
    (4000, 300, 256, "radix"),      # k > capacity: every row takes the radix select
])
def test_topk_rows_sampled_is_exact_on_both_paths(seed, T, k, capacity, path, method):
    """`method="sampled"` (one row a program) and `"warp"` (one row a warp, here 4 rows a program
    over 6 rows: the second program half empty) keep the reference's set (ties, -inf, OAM bias,
    budgets, causal limits), through the buffer or, when the sample misses, through the radix
    select (`fell_back` says which)."""
    from stem_boost.kernels.dsa_topk import topk_rows, topk_rows_reference

    gen = torch.Generator().manual_seed(seed)
    B, R = 2, 3
    s = _scores(B, R, T, gen, ties=True)
    kw = dict(key_bias=torch.round(torch.randn(B, T, generator=gen) * 2) / 4,
              budgets=torch.randint(k // 2, k + 3, (B, R), generator=gen, dtype=torch.int32),
              valid_len=torch.randint(T // 2, T + 1, (B, R), generator=gen, dtype=torch.int32))
    for args in (dict(), kw):
        fell_back = torch.full((B, R), -1, dtype=torch.int32)
        tiles = dict(block=256) if method == "sampled" else dict(block=256, num_warps=4)
        got = topk_rows(s, k, method=method, capacity=capacity, fell_back=fell_back, **tiles, **args)
        want = topk_rows_reference(s, k, **args)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
        assert bool((fell_back == (1 if path == "radix" else 0)).all()), fell_back
    with pytest.raises(ValueError, match="method='heap'"):
        topk_rows(s, k, method="heap")


@pytest.mark.parametrize("margin", [0.0, 5.0])
def test_warp_topk_margin_moves_the_threshold_not_the_set(seed, margin):
    """The sample's threshold margin (standard deviations) changes how many keys the buffer takes
    and how often a row falls back, never the kept set; the default capacity grows with it; a
    negative margin is refused."""
    from stem_boost.kernels.dsa_topk import topk_rows, topk_rows_reference, warp_topk_capacity

    gen = torch.Generator().manual_seed(seed)
    B, R, T, k = 1, 6, 20000, 64
    s = _scores(B, R, T, gen, ties=True)
    got = topk_rows(s, k, method="warp", margin=margin)
    want = topk_rows_reference(s, k)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert warp_topk_capacity(2048, 1 / 128, 4.0) > warp_topk_capacity(2048, 1 / 128, 3.0)
    with pytest.raises(ValueError, match="margin=-1"):
        topk_rows(s, k, method="warp", margin=-1)


def test_warp_fallback_walks_many_rows_a_program(seed, monkeypatch):
    """The radix launch over the rows whose sample missed runs a few programs that walk all rows
    (here 2 programs over 7 rows, every row flagged: k above the buffer), with the reference's set."""
    from stem_boost.kernels import dsa_topk

    monkeypatch.setattr(dsa_topk, "FALLBACK_PROGRAMS", 2)
    gen = torch.Generator().manual_seed(seed)
    B, R, T, k = 1, 7, 3000, 300
    s = _scores(B, R, T, gen, ties=True)
    valid_len = torch.randint(T // 2, T + 1, (B, R), generator=gen, dtype=torch.int32)
    fell_back = torch.zeros(B, R, dtype=torch.int32)
    got = dsa_topk.topk_rows(s, k, method="warp", capacity=256, valid_len=valid_len, fell_back=fell_back)
    want = dsa_topk.topk_rows_reference(s, k, valid_len=valid_len)
    assert bool(fell_back.all()) and torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


@pytest.mark.parametrize("method", ["radix", "sampled", "warp"])
@pytest.mark.parametrize("bias", [True, False])
def test_topk_rows_writes_into_slices_with_scores(seed, method, bias):
    """`out=` / `out_scores=` slices of larger tensors get the reference's indices and each kept
    key's score without the bias (-inf after the count); the entries outside the slice stay. Without a
    bias the warp kernel writes each score from its key (negative, zero and signed-zero scores among them)."""
    from stem_boost.kernels.dsa_topk import topk_rows, topk_rows_reference

    gen = torch.Generator().manual_seed(seed)
    B, R, T, k = 2, 5, 3000, 40
    s = _scores(B, R, T, gen, ties=True)
    kw = dict(budgets=torch.randint(k // 2, k + 3, (B, R), generator=gen, dtype=torch.int32),
              valid_len=torch.randint(T // 2, T + 1, (B, R), generator=gen, dtype=torch.int32))
    if bias:
        kw["key_bias"] = torch.round(torch.randn(B, T, generator=gen) * 2) / 4
    else:  # few positive scores, so that each row's top k reaches +0.0 / -0.0 ties and negative scores,
        # the largest of them tiny (subnormal ones among them)
        neg = -(torch.rand(B, R, T, generator=gen) + 1e-3) * torch.where(torch.rand(B, R, T, generator=gen) < 0.5,
                                                                         1.0, 1e-35)
        s = torch.where((s > 2.6) | (s == float("-inf")), s, neg)
        s[:, :, 7::499] = -0.0
        s[:, :, 5::503] = 0.0
    idx_all = torch.full((B, R + 3, k + 4), 7, dtype=torch.int32)
    scores_all = torch.full((B, R + 3, k + 4), 7.0)
    out, out_scores = idx_all[:, 2:2 + R, :k], scores_all[:, 2:2 + R, :k]
    _, n = topk_rows(s, k, method=method, out=out, out_scores=out_scores, **kw)
    want_idx, want_n = topk_rows_reference(s, k, **kw)
    assert torch.equal(n, want_n) and torch.equal(out, want_idx)
    want_scores = torch.where(want_idx >= 0, s.gather(-1, want_idx.clamp_min(0).long()), float("-inf"))
    assert torch.equal(out_scores, want_scores)
    outside = torch.ones_like(idx_all, dtype=torch.bool)
    outside[:, 2:2 + R, :k] = False
    assert bool((idx_all[outside] == 7).all()) and bool((scores_all[outside] == 7.0).all())
    with pytest.raises(ValueError, match="out_scores must be"):
        topk_rows(s, k, method=method, out=out, out_scores=torch.empty(B, R, k))


def test_the_warp_vote_is_used_only_on_one_row_a_warp():
    """`lanes_on_first_axis` reads where the compiler put the vote's lanes: the layout Triton 3.6
    makes (32 lanes on the first axis) passes; Triton 3.9's (lanes over rows and chunks) and a TTGIR
    without the vote do not, so the kernel then scans instead."""
    from stem_boost.kernels.warp_rows import lanes_on_first_axis

    vote = ('%r:2 = tt.elementwise_inline_asm "{ vote.sync.ballot.b32 m, p, 0xffffffff; }" {constraints = "=r,=r,r"} '
            '%t : tensor<32x4x8xi32, {layout}> -> tensor<32x4x8xi32, {layout}>')
    good = ("#blocked = #ttg.blocked<{sizePerThread = [1, 1, 1], threadsPerWarp = [32, 1, 1], warpsPerCTA = [1, 4, 1], "
            "order = [0, 1, 2]}>\n")
    bad = ("#blocked1 = #ttg.blocked<{sizePerThread = [1, 1, 1], threadsPerWarp = [1, 4, 8], warpsPerCTA = [4, 1, 1], "
           "order = [2, 1, 0]}>\n")
    assert lanes_on_first_axis(good + bad + vote.replace("{layout}", "#blocked"))
    assert not lanes_on_first_axis(good + bad + vote.replace("{layout}", "#blocked1"))
    assert not lanes_on_first_axis(good + bad)


def test_warp_kernel_compiles_once_for_a_prefills_chunks():
    """The chunks of a causal prefill have row lengths T = c, 2c, ... up to 128K: the warp top-k's
    compile-time parameters take at most a few values over them (one per power-of-two sample size),
    so a first long prefill compiles the kernel a few times, not once per chunk (the sample spacing
    and the buffer's capacity, which follow T, are run-time arguments)."""
    from stem_boost.kernels.dsa_topk import warp_kernel_constexprs, warp_topk_capacity, warp_topk_sample

    lengths = range(3584, 131072 + 1, 3584)
    variants = {tuple(sorted(warp_kernel_constexprs(T).items())) for T in lengths}
    assert len(variants) <= 4, f"{len(variants)} compiled variants for {len(lengths)} chunk lengths"
    spacings = {warp_topk_sample(T)[1] for T in lengths}
    capacities = {warp_topk_capacity(2048, 8 / warp_topk_sample(T)[1]) for T in lengths}
    assert len(spacings) > 10 and len(capacities) > 5  # what would have been a compile each


@pytest.mark.parametrize("maxnreg", [8, 16, 300, "auto"])
def test_warp_register_cap_is_checked(maxnreg):
    """A register cap outside 32..255 (or a word other than "default") is refused with the value and
    what is allowed (the GPU test `test_gpu_warp_topk_register_caps_keep_the_set` checks that a valid
    cap keeps the set)."""
    from stem_boost.kernels.dsa_topk import topk_rows

    with pytest.raises(ValueError, match=rf"maxnreg={maxnreg!r}; allowed: 'default', None or 32\.\.255"):
        topk_rows(torch.randn(1, 4, 64), 8, method="warp", maxnreg=maxnreg)
    with pytest.raises(ValueError, match="method='warp' only; got method='radix'"):
        topk_rows(torch.randn(1, 4, 64), 8, method="radix", maxnreg=64)


def test_warp_register_cap_default_follows_the_triton_release(monkeypatch):
    """The default cap is the one measured for the installed Triton release: 72 on 3.6, none (the
    compiler's choice) on a release it was not measured on, such as 3.9, whose build spills at 72."""
    from stem_boost.kernels import dsa_topk

    monkeypatch.setattr(dsa_topk.triton, "__version__", "3.6.0")
    assert dsa_topk.warp_maxnreg_default() == 72
    monkeypatch.setattr(dsa_topk.triton, "__version__", "3.9.1+git1234")
    assert dsa_topk.warp_maxnreg_default() is None
