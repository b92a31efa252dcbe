"""GPU checks of the InfLLMv2 kernels at MiniCPM-4.1 shapes (run on the device: pytest -m gpu).

Union-tile stage 2 (`kernels/block_union.py`) against the fp64 reference on fresh random inputs
(seeds in the assertion messages), the union lists against their PyTorch definition.
"""

from __future__ import annotations

import inspect

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _reference(q, k, v, idx, counts, block_size, q_offset):
    from stem_boost.kernels import sparse_attention_reference

    if "selection" in inspect.signature(sparse_attention_reference).parameters:
        from stem_boost.selection import Selection

        sel = Selection(idx=idx, counts=counts, block_size=block_size, query_block=1, q_offset=q_offset)
        return sparse_attention_reference(q, k, v, sel, return_lse=True)
    return sparse_attention_reference(q, k, v, idx, counts, block_size=block_size, q_offset=q_offset, return_lse=True)


def _lists(B, H, S, T, kmax, seed, jitter=0.5, block=64):
    """InfLLMv2-like per-token lists on the GPU: forced block 0 + local window, the rest by a
    per-query-block base score + per-token noise; ascending, -1 padded."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    nb = -(-T // block)
    pos = torch.arange(S, device="cuda") + (T - S)
    qb = pos // block
    blk = torch.arange(nb, device="cuda")
    base = torch.rand(B, H, nb, nb, device="cuda", generator=g)[:, :, qb]  # per query block
    score = base + jitter * torch.rand(B, H, S, nb, device="cuda", generator=g)  # + per token
    causal = blk <= qb[:, None]
    forced = causal & ((blk < 1) | (blk >= qb[:, None] - 4))
    score = torch.where(forced, 3.0, torch.where(causal, score, -1.0))
    top = score.topk(min(kmax, nb), dim=-1)
    sel = torch.where(top.values >= 0, top.indices, nb + 1).sort(dim=-1).values
    idx = torch.where(sel > nb, -1, sel).to(torch.int32)
    return idx.contiguous(), (idx >= 0).sum(-1).to(torch.int32)


def _row_lists(B, H, S, T, query_block, kmax, causal, keep_last):
    """Random lists of one row per query_block queries on the GPU (blocks of 64): kmax blocks a row, only
    blocks the row's last query sees where causal, that block always kept with keep_last; ascending, -1
    padded. Returns (idx [B, H, R, kmax] int32, counts [B, H, R])."""
    R, nb = -(-S // query_block), -(-T // 64)
    last = torch.clamp((torch.arange(R, device="cuda") * query_block + query_block - 1) // 64, max=nb - 1)
    score = torch.rand(B, H, R, nb, device="cuda")
    blk = torch.arange(nb, device="cuda")
    if causal:
        score = torch.where(blk <= last[:, None], score, -1.0)
    if keep_last:
        score = torch.where(blk == last[:, None], 2.0, score)
    top = score.topk(kmax, dim=-1)
    idx = torch.where(top.values >= 0, top.indices, nb + 1).sort(dim=-1).values
    idx = torch.where(idx > nb, -1, idx).to(torch.int32)
    return idx, (idx >= 0).sum(-1).to(torch.int32)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 1e-2), (torch.float32, 1e-4)])
@pytest.mark.parametrize("G,Hkv,S,T,block_m,use_tma", [
    (16, 2, 700, 700, 64, False), (16, 2, 700, 900, 128, True), (6, 4, 513, 513, 64, False),
    (4, 8, 300, 300, 64, True), (8, 4, 400, 450, 128, False), (1, 2, 257, 257, 64, False),
])
def test_gpu_block_union_matches_reference(G, Hkv, S, T, block_m, use_tma, dtype, tol):
    from stem_boost.kernels.block_union import block_union_attention

    seed = 9000 + S + G
    torch.manual_seed(seed)
    q = torch.randn(2, S, Hkv * G, 128, device="cuda").to(dtype)
    k = torch.randn(2, T, Hkv, 128, device="cuda").to(dtype)
    v = torch.randn(2, T, Hkv, 128, device="cuda").to(dtype)
    idx, counts = _lists(2, Hkv, S, T, 9, seed)
    out, lse = block_union_attention(q, k, v, idx, counts, block_size=64, return_lse=True, block_m=block_m,
                                     use_tma=use_tma and dtype != torch.float32)
    ref, ref_lse = _reference(q.double(), k.double(), v.double(), idx, counts, 64, T - S)
    assert not torch.isnan(out).any(), f"seed {seed}"
    ok = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), ok), f"seed {seed}"
    assert _rel_err(out, ref) < tol, f"seed {seed}"
    assert _rel_err(lse[ok], ref_lse[ok]) < tol, f"seed {seed}"


@pytest.mark.parametrize("qt", [4, 8, 10])
def test_gpu_union_lists_match_definition(qt):
    from stem_boost.kernels.block_union import union_block_lists, union_block_lists_torch

    seed = 77 + qt
    idx, counts = _lists(2, 2, 3000, 3000, 40, seed)
    uidx, umask, ucount = union_block_lists(idx, counts, qt)
    ridx, rmask, rcount = union_block_lists_torch(idx, counts, qt)
    assert torch.equal(ucount, rcount), f"seed {seed}"
    live = torch.arange(uidx.shape[-1], device="cuda") < ucount.unsqueeze(-1)
    assert torch.equal(torch.where(live, uidx, -1), ridx[..., : uidx.shape[-1]]), f"seed {seed}"
    assert torch.equal(torch.where(live, umask, 0), rmask[..., : uidx.shape[-1]]), f"seed {seed}"


@pytest.mark.parametrize("score_dtype", [None, torch.bfloat16])
def test_gpu_block_topk_interpolation_search_writes_the_same_lists(score_dtype):
    """The block top-k with the interpolation search equals the bisection on 2048 rows of 2048
    blocks (a 128K MiniCPM-4.1 prefill's last rows): rounded scores with ties, -inf, natively and
    with Stem's bias and budgets."""
    from stem_boost.kernels.infllmv2_select import block_topk

    seed = 777 + (score_dtype is not None)
    torch.manual_seed(seed)
    C, NB, Hk = 2048, 2048, 2
    scores = torch.randn(1, Hk, C, NB, device="cuda").to(torch.bfloat16).float()
    scores[torch.rand_like(scores) < 0.02] = float("-inf")
    common = dict(q_pos0=NB * 64 - C, block_size=64, init_blocks=1, local_blocks=32, k_total=96, kmax=96,
                  score_dtype=score_dtype)
    stem = dict(key_bias=0.2 * torch.randn(1, Hk, NB, device="cuda"),
                budgets=torch.randint(0, 64, (1, Hk, C), device="cuda", dtype=torch.int32))
    for kw in ({}, stem):
        one = block_topk(scores, search="bisect", **common, **kw)
        two = block_topk(scores, search="interpolate", **common, **kw)
        for name, a, b in zip(("idx", "counts", "n_forced"), two, one):
            assert torch.equal(a, b), f"seed {seed}: {name} (Stem: {bool(kw)})"


@pytest.mark.parametrize("S,stem,fuse_topk,tiles", [(8192, False, True, 1), (8192, True, True, 1), (12000, False, True, 1),
                                                    (8192, True, False, 1), (8192, True, False, 4),
                                                    (12001, True, False, 4)])
def test_gpu_fused_selection_agrees_with_pytorch(S, stem, fuse_topk, tiles):
    """MiniCPM-4.1 sparse_config, bf16: >= 99.9% of the selected blocks equal the PyTorch selection's
    (tiles 4: Stem's grouped ranking, one row per 4 tokens)."""
    from stem_boost.kernels.infllmv2_select import infllmv2_select_fused
    from stem_boost.native.infllmv2 import MINICPM41_SPARSE_CONFIG, InfLLMv2Params, infllmv2_select

    seed = 4242 + S + stem + 2 * fuse_topk + 4 * tiles
    torch.manual_seed(seed)
    p = InfLLMv2Params.from_sparse_config(MINICPM41_SPARSE_CONFIG)
    q = torch.randn(1, 32, S, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, S, 128, device="cuda", dtype=torch.bfloat16)
    nb = -(-S // 64)
    kw, ref_kw = {}, {}
    if stem:
        bias = 0.2 * torch.randn(1, 2, nb, device="cuda")
        budgets = torch.randint(0, 62, (S,), device="cuda", dtype=torch.int32)
        kw, ref_kw = dict(key_bias=bias, budgets=budgets), dict(key_bias=bias, k_free=budgets)
    idx, counts, _ = infllmv2_select_fused(q, k, p, fuse_topk=fuse_topk, tile_rows=tiles, **kw)
    ref = infllmv2_select(q, k, p, chunk_size=1024, use_fused=False, tile_rows=tiles, **ref_kw)
    assert idx.shape[2] == -(-S // tiles) and ref.query_block == tiles, f"seed {seed}"

    def member(t):
        m = torch.zeros(*t.shape[:-1], nb + 1, dtype=torch.bool, device="cuda")
        return m.scatter_(-1, torch.where(t >= 0, t.long(), nb), True)[..., :nb]

    a, b = member(idx), member(ref.idx)
    assert torch.equal(counts, ref.counts), f"seed {seed}"
    assert float((a & b).sum()) / float(b.sum()) >= 0.999, f"seed {seed}"


def test_minicpm_rope_on_cuda_is_the_fp32_definition(seed):
    """MiniCPM-4's rotation on CUDA (the one-pass kernel) against PyTorch's fp32 ops on the same GPU,
    at MiniCPM-4.1 shapes: bf16 values equal but for fp32 near-ties (at most one unit in the last place)
    and cancelling pairs (the fp32 residual that the kernel's fused multiply-add keeps)."""
    from stem_boost.models.minicpm4.modeling_minicpm4 import apply_rotary_pos_emb
    from stem_boost.rope import rotate_half

    B, S, D = 2, 4096, 128
    q = torch.randn(B, S, 32, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(B, S, 2, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    pos = torch.randint(0, 131072, (B, S), device="cuda").float()
    freqs = pos[..., None] * (10000.0 ** (-torch.arange(0, D, 2, device="cuda").float() / D))
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos(), emb.sin()
    got_q, got_k = apply_rotary_pos_emb(q, k, cos, sin)
    for x, got in ((q, got_q), (k, got_k)):
        xf = x.float()
        want = (xf * cos[:, None] + rotate_half(xf) * sin[:, None]).to(x.dtype)
        diff = (got.float() - want.float()).abs()
        # one bf16 unit, or the fp32 residual of a cancelling pair (the kernel's fused multiply-add
        # keeps what PyTorch's separate products round away: x1 cos = x2 sin gives 0 there)
        residual = xf.abs().amax(-1, keepdim=True) * 2.0 ** -22
        assert bool((diff <= want.float().abs() * 2.0 ** -7 + residual).all()), f"seed={seed}"
        assert float((got == want).float().mean()) > 0.999, f"seed={seed}"
        assert got.stride() == x.stride()


def test_minicpm_rope_on_cuda_gives_a_row_its_solo_values(seed):
    """The RoPE kernel compiled for a batch and for one row (another specialisation: batch stride 0)
    gives bit-identical values: a padded batch's row must see what the row sees alone."""
    from stem_boost.models.minicpm4.modeling_minicpm4 import apply_rotary_pos_emb

    B, S, D = 3, 1000, 128
    q = torch.randn(B, S, 32, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(B, S, 2, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    pos = torch.arange(S, device="cuda").float().expand(B, S)
    freqs = pos[..., None] * (10000.0 ** (-torch.arange(0, D, 2, device="cuda").float() / D))
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos(), emb.sin()
    batch_q, batch_k = apply_rotary_pos_emb(q, k, cos, sin)
    for b in range(B):
        solo_q, solo_k = apply_rotary_pos_emb(q[b:b + 1], k[b:b + 1], cos[:1], sin[:1])
        assert torch.equal(batch_q[b:b + 1], solo_q) and torch.equal(batch_k[b:b + 1], solo_k), f"seed={seed} row {b}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("G,Hkv,S,T,D,layout", [
    (16, 2, 700, 700, 128, "head"),    # MiniCPM-4.1's group, K / V [B, Hkv, T, D] in memory (the layer's)
    (16, 2, 500, 900, 128, "token"),   # q_offset 400, [B, T, Hkv, D]
    (6, 4, 513, 513, 128, "mixed"),    # 10 tokens a tile (60 of 64 rows), K head-major and V token-major
    (4, 8, 300, 333, 64, "token"),     # head dim 64, T not a multiple of 64
    (1, 2, 257, 257, 128, "head"),     # G = 1: 32 tokens a tile
])
def test_gpu_block_union_sm90_matches_reference(G, Hkv, S, T, D, layout, dtype):
    """The Gluon union kernel (kernel="sm90") against the fp64 reference and the Triton kernel, per-token
    lists with rows that select nothing."""
    from stem_boost.kernels.block_union import block_union_attention

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel is for compute capability 9.x")
    seed = 9100 + S + G
    torch.manual_seed(seed)
    B = 2

    def kv():
        if layout == "head" or (layout == "mixed" and kv.first):
            kv.first = False
            return torch.randn(B, Hkv, T, D, device="cuda").to(dtype).transpose(1, 2)  # [B, T, Hkv, D] view
        return torch.randn(B, T, Hkv, D, device="cuda").to(dtype)
    kv.first = True
    q = torch.randn(B, S, Hkv * G, D, device="cuda").to(dtype)
    k, v = kv(), kv()
    idx, counts = _lists(B, Hkv, S, T, 9, seed)
    counts[:, :, 5:9] = 0  # rows with no block: zeros and lse -inf
    idx[:, :, 5:9] = -1
    out, lse = block_union_attention(q, k, v, idx, counts, block_size=64, return_lse=True, kernel="sm90")
    ref, ref_lse = _reference(q.double(), k.double(), v.double(), idx, counts, 64, T - S)
    tri, tri_lse = block_union_attention(q, k, v, idx, counts, block_size=64, return_lse=True, kernel="triton")
    assert not torch.isnan(out).any(), f"seed {seed}"
    ok = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), ok), f"seed {seed}"
    assert _rel_err(out, ref) < 1e-2, f"seed {seed}"
    assert _rel_err(lse[ok], ref_lse[ok]) < 1e-2, f"seed {seed}"
    assert _rel_err(out, tri) < 1e-2, f"seed {seed}: against the Triton kernel"
    assert torch.all(out.permute(0, 2, 1, 3)[~ok] == 0), f"seed {seed}: empty rows give zeros"


@pytest.mark.parametrize("G,query_block,causal", [(16, 64, True), (4, 64, True), (8, 16, False), (16, 3, True)])
def test_gpu_block_union_sm90_row_lists(G, query_block, causal):
    """The Gluon kernel on lists of one row per query_block tokens equals the Triton kernel, causal or
    not: flat tiles of 64 (token, head) rows (the bench's block mode) and, with query_block = 3 (no
    tile lies in one row), the union over the rows of a tile's tokens."""
    from stem_boost.kernels.block_union import block_union_attention

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel is for compute capability 9.x")
    seed = 9200 + G + query_block
    torch.manual_seed(seed)
    B, Hkv, S, D = 1, 2, 1000, 128
    T = S
    idx, counts = _row_lists(B, Hkv, S, T, query_block, 6, causal, keep_last=causal)
    q = torch.randn(B, S, Hkv * G, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, T, Hkv, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, T, Hkv, D, device="cuda", dtype=torch.bfloat16)
    out = block_union_attention(q, k, v, idx, counts, block_size=64, query_block=query_block, causal=causal,
                                kernel="sm90")
    tri = block_union_attention(q, k, v, idx, counts, block_size=64, query_block=query_block, causal=causal,
                                kernel="triton")
    assert not torch.isnan(out).any(), f"seed {seed}"
    assert _rel_err(out, tri) < 1e-2, f"seed {seed}"


@pytest.mark.parametrize("G,S,query_block,causal,tile,hsel,dtype,head_major", [
    (16, 1000, 64, True, None, 2, torch.bfloat16, False),     # block mode at MiniCPM-4.1's group
    (6, 1000, 64, True, None, 2, torch.bfloat16, True),       # G = 6: a 128-row tile splits tokens' heads
    (4, 1000, 64, True, None, 1, torch.float16, False),       # the last tile's second consumer past S; Hsel = 1
    (8, 700, 16, False, dict(PINGPONG=False), 2, torch.bfloat16, True),
    (16, 1000, 64, True, dict(NUM_BUF=2), 2, torch.bfloat16, False),  # the shallowest ring: every slot reused
    (16, 1000, 64, True, dict(NUM_BUF=4, CONSUMER_REGS=216), 2, torch.bfloat16, False),
])
def test_gpu_block_rows_sm90_ws(G, S, query_block, causal, tile, hsel, dtype, head_major):
    """The warp-specialised Gluon kernel (kernel="sm90_ws": 128-row tiles, two consumers sharing each K / V
    block) on row lists against the fp64 reference and the 64-row Gluon kernel, with rows that select
    nothing (zeros, lse -inf), causal or not, ping-pong on and off, ring depths 2-5."""
    from stem_boost.kernels.block_union import block_union_attention

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel is for compute capability 9.x")
    seed = 9500 + G + S + query_block + int(causal)
    torch.manual_seed(seed)
    B, Hkv, D = 2, 2, 128
    T = S
    idx, _ = _row_lists(B, hsel, S, T, query_block, 5, causal, keep_last=False)
    idx[:, :, 2] = -1  # a row (query_block tokens) that selects nothing
    counts = (idx >= 0).sum(-1).to(torch.int32)
    q = torch.randn(B, S, Hkv * G, D, device="cuda").to(dtype)
    kv_shape = (B, Hkv, T, D) if head_major else (B, T, Hkv, D)
    k, v = (torch.randn(*kv_shape, device="cuda").to(dtype) for _ in range(2))
    if head_major:
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    out, lse = block_union_attention(q, k, v, idx, counts, block_size=64, query_block=query_block, causal=causal,
                                     return_lse=True, kernel="sm90_ws", tile=tile)
    m64, lse64 = block_union_attention(q, k, v, idx, counts, block_size=64, query_block=query_block, causal=causal,
                                       return_lse=True, kernel="sm90")
    rows = torch.arange(S, device="cuda") // query_block
    tok_idx = idx[:, :, rows].expand(B, Hkv, S, -1).contiguous()
    tok_counts = counts[:, :, rows].expand(B, Hkv, S).contiguous()
    if causal:
        ref, ref_lse = _reference(q.double(), k.double(), v.double(), tok_idx, tok_counts, 64, T - S)
        ok = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), ok), f"seed {seed}"
        assert _rel_err(out, ref) < 1e-2 and _rel_err(lse[ok], ref_lse[ok]) < 1e-2, f"seed {seed}"
        assert torch.all(out.permute(0, 2, 1, 3)[~ok] == 0), f"seed {seed}: empty rows give zeros"
    assert not torch.isnan(out).any(), f"seed {seed}"
    assert _rel_err(out, m64) < 1e-2, f"seed {seed}: against the 64-row Gluon kernel"
    fin = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse), fin) and _rel_err(lse[fin], lse64[fin]) < 1e-2, f"seed {seed}"


@pytest.mark.parametrize("G,Hkv,S,T,D,layout,dtype", [
    (16, 2, 700, 700, 128, "head", torch.bfloat16),    # MiniCPM-4.1: 8-token programs, the last half past S
    (16, 2, 500, 900, 128, "token", torch.float16),    # q_offset 400
    (6, 4, 513, 513, 128, "mixed", torch.bfloat16),    # 10 tokens a half (60 of 64 rows)
    (4, 8, 300, 333, 64, "token", torch.bfloat16),     # 16 tokens a half, head dim 64
])
def test_gpu_block_union_sm90_ws_per_token_lists(G, Hkv, S, T, D, layout, dtype):
    """The warp-specialised kernel on per-token lists (two halves of QT tokens on the union of 2 QT tokens'
    lists, each computing only its own tokens' entries) against the fp64 reference and the 64-row Gluon
    kernel, with a whole half of tokens that selects nothing (zeros, lse -inf); G = 1 (32 tokens a tile) is
    refused by name."""
    from stem_boost.kernels.block_union import block_union_attention

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel is for compute capability 9.x")
    seed = 9600 + S + G
    torch.manual_seed(seed)
    B, qt = 2, 64 // G

    def kv():
        if layout == "head" or (layout == "mixed" and kv.first):
            kv.first = False
            return torch.randn(B, Hkv, T, D, device="cuda").to(dtype).transpose(1, 2)
        return torch.randn(B, T, Hkv, D, device="cuda").to(dtype)
    kv.first = True
    q = torch.randn(B, S, Hkv * G, D, device="cuda").to(dtype)
    k, v = kv(), kv()
    idx, counts = _lists(B, Hkv, S, T, 9, seed, jitter=2.0)  # tokens' lists differ: halves skip entries
    counts[:, :, qt:2 * qt] = 0  # the second half of the first program selects nothing
    idx[:, :, qt:2 * qt] = -1
    out, lse = block_union_attention(q, k, v, idx, counts, block_size=64, return_lse=True, kernel="sm90_ws")
    ref, ref_lse = _reference(q.double(), k.double(), v.double(), idx, counts, 64, T - S)
    m64 = block_union_attention(q, k, v, idx, counts, block_size=64, kernel="sm90")
    ok = torch.isfinite(ref_lse)
    assert not torch.isnan(out).any(), f"seed {seed}"
    assert torch.equal(torch.isfinite(lse), ok), f"seed {seed}"
    assert _rel_err(out, ref) < 1e-2 and _rel_err(lse[ok], ref_lse[ok]) < 1e-2, f"seed {seed}"
    assert _rel_err(out, m64) < 1e-2, f"seed {seed}: against the 64-row Gluon kernel"
    assert torch.all(out.permute(0, 2, 1, 3)[~ok] == 0), f"seed {seed}: empty rows give zeros"
    q1 = torch.randn(B, S, Hkv, D, device="cuda").to(dtype)  # G = 1: 32 tokens a half do not fit the bits
    with pytest.raises(ValueError, match=r"kernel='sm90_ws' needs .*ws_fits=False"):
        block_union_attention(q1, k, v, idx, counts, block_size=64, kernel="sm90_ws")


@pytest.mark.parametrize("num_buf", [2, 5])
def test_gpu_block_union_sm90_ws_long_gaps(num_buf):
    """Union lists where one half's next entry lies a whole ring (or more) past its last: that half retires its
    pending P V before the ring can pass (else the producer waits for its V slot and the half for the producer:
    a deadlock). Half 0 of every program selects blocks {0, 12, 60}, half 1 blocks 1-11 and five of 13-59."""
    from stem_boost.kernels.block_union import block_union_attention

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel is for compute capability 9.x")
    seed = 9700 + num_buf
    torch.manual_seed(seed)
    B, Hkv, G, D, S, T = 1, 2, 16, 128, 256, 4096
    qt = 64 // G
    idx = torch.full((B, Hkv, S, 16), -1, dtype=torch.int32, device="cuda")
    half = (torch.arange(S, device="cuda") // qt) % 2
    last = (T - S) // 64  # the block of the first query: every later one sees it (causally valid lists)
    first = torch.tensor([0, 12, last], device="cuda", dtype=torch.int32)
    idx[:, :, half == 0, :3] = first
    second = torch.cat([torch.arange(1, 12, device="cuda", dtype=torch.int32),
                        torch.randperm(last - 13, device="cuda")[:5].to(torch.int32).sort().values + 13])
    idx[:, :, half == 1, :16] = second
    counts = (idx >= 0).sum(-1).to(torch.int32)
    q = torch.randn(B, S, Hkv * G, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, T, Hkv, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, T, Hkv, D, device="cuda", dtype=torch.bfloat16)
    out, lse = block_union_attention(q, k, v, idx, counts, block_size=64, return_lse=True, kernel="sm90_ws",
                                     tile=dict(NUM_BUF=num_buf, PINGPONG=False))
    torch.cuda.synchronize()
    ref, ref_lse = _reference(q.double(), k.double(), v.double(), idx, counts, 64, T - S)
    assert _rel_err(out, ref) < 1e-2 and _rel_err(lse, ref_lse) < 1e-2, f"seed {seed}"


def test_gpu_sparse_attention_takes_the_gluon_walk_on_hopper(monkeypatch):
    """sparse_attention's block lists run the Gluon walk by default on compute capability 9.x (a silent
    fallback to the Triton kernel would cost 6-8%), and the Triton walk when asked for by name."""
    from stem_boost.kernels import block_union_sm90, sparse_attention
    from stem_boost.selection import Selection

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel is for compute capability 9.x")
    calls = []
    real = block_union_sm90.block_union_sm90

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(block_union_sm90, "block_union_sm90", counted)
    seed = 9300
    torch.manual_seed(seed)
    S, Hkv, G = 300, 2, 16
    q = torch.randn(1, S, Hkv * G, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, S, Hkv, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, S, Hkv, 128, device="cuda", dtype=torch.bfloat16)
    idx, counts = _lists(1, Hkv, S, S, 5, seed)
    sel = Selection(idx=idx, counts=counts, block_size=64, query_block=1, ordered=True)
    out = sparse_attention(q, k, v, sel, check=False)
    assert calls == [1], "the default block walk on Hopper is the Gluon kernel"
    ref, _ = _reference(q.double(), k.double(), v.double(), idx, counts, 64, 0)
    assert _rel_err(out, ref) < 1e-2, f"seed {seed}"


def test_gpu_block_union_sm90_shared_selection_head():
    """One selection row shared by every kv head (Hsel = 1): the Gluon kernel equals the fp64 reference."""
    from stem_boost.kernels.block_union import block_union_attention

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel is for compute capability 9.x")
    seed = 9400
    torch.manual_seed(seed)
    B, S, Hkv, G = 2, 400, 4, 6
    q = torch.randn(B, S, Hkv * G, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, S, Hkv, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, S, Hkv, 128, device="cuda", dtype=torch.bfloat16)
    idx, counts = _lists(B, 1, S, S, 5, seed)
    out, lse = block_union_attention(q, k, v, idx, counts, block_size=64, return_lse=True, kernel="sm90")
    ref, ref_lse = _reference(q.double(), k.double(), v.double(), idx.expand(-1, Hkv, -1, -1).contiguous(),
                              counts.expand(-1, Hkv, -1).contiguous(), 64, 0)
    assert _rel_err(out, ref) < 1e-2, f"seed {seed}"
    ok = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), ok) and _rel_err(lse[ok], ref_lse[ok]) < 1e-2, f"seed {seed}"
