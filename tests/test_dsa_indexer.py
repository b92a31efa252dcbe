"""Chunked DSA indexer top-k vs the native transformers indexer (DeepSeek-V3.2, GLM-MoE-DSA).

The tiny models are saved with safetensors and reloaded with AutoModelForCausalLM.from_pretrained.
The indexer inputs are captured during a real model forward (batch 2, left padding, with a cache:
prefill then 1-token decode), then replayed through the native forward and the chunked one.
"""

from __future__ import annotations

import copy
import inspect
import os
import random

import pytest
import torch

from stem_boost.compat import cache_argument
from stem_boost.native import dsa_indexer as dsa

try:  # tests/ may or may not become a package
    from .dsa_tiny import BUILDERS, indexers, save_and_reload
except ImportError:  # pragma: no cover
    from dsa_tiny import BUILDERS, indexers, save_and_reload

FAMILIES = ["deepseek_v32", "glm_moe_dsa"]
PAD = 7  # left padding of row 1
PREFILL = 40  # > index_topk (16): rows past position 15 have more valid keys than topk


def _fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


# --------------------------------------------------------------------------------------------------
# capture of the indexer's inputs / outputs during a real forward
# --------------------------------------------------------------------------------------------------
class SnapshotCache:
    """Stand-in for the model's cache: a copy of this layer's cache layer (DynamicIndexedLayer or
    StaticIndexedLayer) taken *before* the forward, so the captured call can be replayed any number
    of times; each replay updates a fresh copy (concatenation / in-place write at the current
    position, exactly as the real layer)."""

    def __init__(self, layer):
        self.layer = layer

    def update_indexer(self, k, layer_idx):
        return copy.deepcopy(self.layer).update_indexer(k)


class Recorder:
    def __init__(self, model):
        self.calls = {}  # layer_idx -> list of dict(args, snapshot, cached, out)
        self.handles = []
        for layer_idx, ix in indexers(model):
            self.handles.append(ix.register_forward_pre_hook(self._pre(layer_idx), with_kwargs=True))
            self.handles.append(ix.register_forward_hook(self._post(layer_idx)))

    def _pre(self, layer_idx):
        def hook(module, args, kwargs):
            pkv = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers >= 5.24: cache=
            snap = copy.deepcopy(pkv.layers[layer_idx]) if pkv is not None else None
            self.calls.setdefault(layer_idx, []).append(
                dict(args=tuple(a.clone() if torch.is_tensor(a) else a for a in args), snapshot=snap, cached=pkv is not None)
            )

        return hook

    def _post(self, layer_idx):
        def hook(module, args, output):
            self.calls[layer_idx][-1]["out"] = output.clone()

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def replay(ix, call, fn, **kw):
    pkv = SnapshotCache(call["snapshot"]) if call["cached"] else None
    return fn(ix, *call["args"], past_key_values=pkv, **kw)


# --------------------------------------------------------------------------------------------------
# comparison
# --------------------------------------------------------------------------------------------------
def _valid3d(mask3d, B, S, T):
    m = mask3d.expand(B, S, T)
    return dsa.valid_key_mask(m)


def assert_same_selection(native: dsa.NativeTopK, ours: dsa.IndexerTopK, mask3d, topk, ctx=""):
    B, S, K = native.indices.shape
    T = native.index_scores.shape[-1]
    assert ours.indices.shape == (B, S, K) and ours.indices.dtype == torch.int32, ctx
    assert ours.scores.shape == (B, S, K) and ours.scores.dtype == torch.float32, ctx
    assert K == min(topk, T)
    valid = _valid3d(mask3d, B, S, T)
    n_valid = valid.sum(-1)
    full = native.index_scores.float()
    ties = 0
    full_rows = 0
    for b in range(B):
        for s in range(S):
            nv = int(n_valid[b, s])
            o_idx = ours.indices[b, s]
            o_sc = ours.scores[b, s]
            ok = o_idx >= 0
            # our valid picks are valid keys; -1 slots have -inf; scores sorted descending
            assert int(ok.sum()) == min(nv, K), (ctx, b, s)
            assert bool(valid[b, s, o_idx[ok].long()].all()), (ctx, b, s)
            assert torch.all(torch.isneginf(o_sc[~ok])), (ctx, b, s)
            assert torch.all(o_sc[ok][:-1] >= o_sc[ok][1:]), (ctx, b, s)
            # our scores = native scores at our indices
            ref = full[b, s, o_idx[ok].long()]
            torch.testing.assert_close(o_sc[ok], ref, rtol=1e-5, atol=1e-5, msg=f"{ctx} scores b={b} s={s}")
            if nv < K:
                # native pads with arbitrary masked keys; ours lists exactly the valid ones
                assert set(o_idx[ok].tolist()) == set(torch.nonzero(valid[b, s]).flatten().tolist()), (ctx, b, s)
                continue
            full_rows += 1
            n_sorted = torch.sort(native.indices[b, s].long()).values
            o_sorted = torch.sort(o_idx.long()).values
            if torch.equal(n_sorted, o_sorted):
                continue
            # allowed only for ties at the boundary: exchanged keys score within 1e-5 of the k-th score
            kth = native.scores[b, s].min()
            diff = set(n_sorted.tolist()) ^ set(o_sorted.tolist())
            for t in diff:
                assert abs(float(full[b, s, t]) - float(kth)) <= 1e-5 * max(1.0, abs(float(kth))), (
                    f"{ctx} b={b} s={s}: key {t} exchanged but not tied ({float(full[b, s, t])} vs k-th {float(kth)})"
                )
            ties += 1
    return full_rows, ties


# --------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """family -> fp32 reloaded model (a fresh random seed per test session)."""
    seed = _fresh_seed()
    out = {}
    for fam in FAMILIES:
        m = BUILDERS[fam](seed=seed)
        out[fam] = (m, tmp_path_factory.mktemp(fam), seed)
    return out


def _reloaded(tiny_models, fam, dtype, attn="sdpa"):
    m, path, seed = tiny_models[fam]
    return save_and_reload(m, path / f"{dtype}_{attn}", dtype=dtype, attn_implementation=attn), seed


def _run_prefill_decode(model, seed, n_new=1, cache=None):
    g = torch.Generator().manual_seed(seed)
    B = 2
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (B, PREFILL), generator=g)
    am = torch.ones(B, PREFILL, dtype=torch.long)
    am[1, :PAD] = 0
    ids[1, :PAD] = model.config.pad_token_id
    rec = Recorder(model)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=am, past_key_values=cache, use_cache=True)
            new = torch.randint(3, vocab, (B, n_new), generator=g)
            am2 = torch.cat([am, torch.ones(B, n_new, dtype=torch.long)], dim=1)
            model(input_ids=new, attention_mask=am2, past_key_values=out.past_key_values, use_cache=True)
    finally:
        rec.close()
    return rec.calls


# --------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_matches_native(tiny_models, family, dtype):
    model, seed = _reloaded(tiny_models, family, dtype)
    calls = _run_prefill_decode(model, seed)
    assert calls, "no indexer ran"
    topk = model.config.index_topk
    total_full = 0
    for layer_idx, layer_calls in calls.items():
        ix = model.model.layers[layer_idx].self_attn.indexer
        assert len(layer_calls) == 2  # prefill + decode
        for step, call in enumerate(layer_calls):
            mask3d = call["args"][3]
            assert mask3d.dim() == 3  # the layer passes attention_mask[:, 0, :, :]
            native = replay(ix, call, dsa.native_indexer_topk)
            # the replay reproduces what the model computed
            assert torch.equal(native.indices, call["out"]), (family, layer_idx, step)
            results = []
            for budget in (1, 20_000, dsa.DEFAULT_MAX_BYTES):  # 1 row/chunk, a few rows, one chunk
                ours = replay(ix, call, dsa.dsa_indexer_topk, max_bytes=budget)
                ctx = f"{family} {dtype} layer={layer_idx} step={step} budget={budget} seed={seed}"
                n_full, _ = assert_same_selection(native, ours, mask3d, topk, ctx)
                total_full += n_full
                results.append(ours)
            # position tie-break: the result does not depend on the chunking
            for other in results[1:]:
                assert torch.equal(other.indices, results[0].indices), (family, dtype, layer_idx, step, seed)
                torch.testing.assert_close(other.scores, results[0].scores, rtol=1e-6, atol=1e-6)
            plain = replay(ix, call, dsa.dsa_indexer_topk, chunk_rows=5, tie_break="none")
            assert_same_selection(native, plain, mask3d, topk, f"tie_break=none {family} {dtype} seed={seed}")
    assert total_full > 0  # some rows really had more valid keys than topk


def test_eager_float_mask(tiny_models):
    """eager attention: the indexer gets an additive float mask (0 / finfo.min)."""
    for family in FAMILIES:
        model, seed = _reloaded(tiny_models, family, torch.float32, attn="eager")
        calls = _run_prefill_decode(model, seed, n_new=3)
        for layer_idx, layer_calls in calls.items():
            ix = model.model.layers[layer_idx].self_attn.indexer
            for step, call in enumerate(layer_calls):
                mask3d = call["args"][3]
                assert mask3d.dtype == torch.float32
                native = replay(ix, call, dsa.native_indexer_topk)
                ours = replay(ix, call, dsa.dsa_indexer_topk, chunk_rows=3)
                assert_same_selection(native, ours, mask3d, model.config.index_topk, f"eager {family} {step} seed={seed}")


def test_sdpa_mask_is_bool(tiny_models):
    model, seed = _reloaded(tiny_models, "deepseek_v32", torch.float32)
    calls = _run_prefill_decode(model, seed)
    mask3d = calls[0][0]["args"][3]
    assert mask3d.dtype == torch.bool and mask3d.shape == (2, PREFILL, PREFILL)
    # left padding: row 1 never sees its first PAD keys; causal: no key after the query
    assert not mask3d[1, :, :PAD].any()
    assert not torch.triu(mask3d[0].to(torch.int8), diagonal=1).any()


def boundary_ties(native: dsa.NativeTopK, mask3d) -> int:
    """Rows (with >= topk valid keys) whose k-th score is shared by a key outside the top-k."""
    K = native.indices.shape[-1]
    B, S, T = native.index_scores.shape
    valid = _valid3d(mask3d, B, S, T)
    kth = native.scores.min(-1).values
    at_or_above = ((native.index_scores >= kth[..., None]) & valid).sum(-1)
    return int(((at_or_above > K) & (valid.sum(-1) >= K)).sum())


def _forward_prefill_decode(model, ids, am, new):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=am, use_cache=True)
        am2 = torch.cat([am, torch.ones_like(new)], dim=1)
        out2 = model(input_ids=new, attention_mask=am2, past_key_values=out.past_key_values, use_cache=True)
    return out.logits, out2.logits


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_model_same_logits(tiny_models, family):
    """The model run with the chunked indexer (as_native_indices) in place of the native one gives
    the native logits, for a padded prefill and a 1-token decode step with the real DynamicCache.

    Exact ties at the top-k boundary are frequent in a 4-head tiny model (a key's score is exactly
    0 when relu(q.k) = 0 for every head) and the native topk breaks them arbitrarily, so inputs are
    redrawn until the native run has no boundary tie (short sequences: most draws qualify)."""
    model, seed = _reloaded(tiny_models, family, torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    L = 24
    for attempt in range(20):
        ids = torch.randint(3, model.config.vocab_size, (2, L), generator=g)
        new = torch.randint(3, model.config.vocab_size, (2, 1), generator=g)
        am = torch.ones_like(ids)
        am[0, :5] = 0
        rec = Recorder(model)
        try:
            ref = _forward_prefill_decode(model, ids, am, new)
        finally:
            rec.close()
        n_ties = 0
        for layer_idx, layer_calls in rec.calls.items():
            ix = model.model.layers[layer_idx].self_attn.indexer
            for call in layer_calls:
                n_ties += boundary_ties(replay(ix, call, dsa.native_indexer_topk), call["args"][3])
        if n_ties == 0:
            break
    else:
        pytest.skip(f"no tie-free draw in 20 (seed={seed})")

    originals = []
    for _, ix in indexers(model):
        originals.append((ix, ix.forward))

        def fwd(*a, _ix=ix, **k):
            k["past_key_values"] = cache_argument(k.get("past_key_values"), k)  # transformers >= 5.24: cache=
            return dsa.dsa_indexer_topk(_ix, *a, max_bytes=1, **k).as_native_indices()

        ix.forward = fwd
    try:
        got = _forward_prefill_decode(model, ids, am, new)
    finally:
        for ix, f in originals:
            ix.forward = f
    keep = am.bool()
    msg = f"seed={seed} attempt={attempt}"
    torch.testing.assert_close(got[0][keep], ref[0][keep], rtol=1e-5, atol=1e-5, msg=msg)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5, msg=msg)


def test_position_tie_break():
    s = torch.tensor([[0.0, 1.0, -0.0, 1.0, 0.0, -2.0, float("-inf"), 1.0]])
    idx = dsa._topk_position_ties(s, 5)
    assert idx.tolist() == [[1, 3, 7, 0, 2]]
    r = torch.randn(3, 7, 50)
    r[..., 10:20] = 0.25  # a block of ties
    idx = dsa._topk_position_ties(r, 20)
    ref = torch.sort(r, dim=-1, descending=True, stable=True).indices[..., :20]
    assert torch.equal(idx, ref)


def test_variant_detection():
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32Indexer
    from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaIndexer

    dsv = object.__new__(DeepseekV32Indexer)
    glm = object.__new__(GlmMoeDsaIndexer)
    assert dsa.detect_variant(dsv) == dsa.DEEPSEEK_V32 and dsa.DEEPSEEK_V32.rope == "half"
    assert dsa.detect_variant(glm) == dsa.GLM_MOE_DSA and dsa.GLM_MOE_DSA.rope == "interleave"

    # the source check (used for unknown classes) agrees with the table on every known class
    import importlib

    for modname, clsname in [
        ("deepseek_v32.modeling_deepseek_v32", "DeepseekV32Indexer"),
        ("glm_moe_dsa.modeling_glm_moe_dsa", "GlmMoeDsaIndexer"),
        ("hy_v4.modeling_hy_v4", "HYV4Indexer"),
        ("axk2.modeling_axk2", "AXK2Indexer"),
    ]:
        try:
            cls = getattr(importlib.import_module(f"transformers.models.{modname}"), clsname)
        except (ImportError, AttributeError):
            continue
        inferred = dsa._variant_from_source(inspect.getsource(cls.forward))
        table = dsa._KNOWN_FORWARDS[clsname]
        assert inferred is not None, clsname
        assert (inferred.rope, inferred.rope_first, inferred.k_norm_fp32, inferred.scale_in_weights) == (
            table.rope,
            table.rope_first,
            table.k_norm_fp32,
            table.scale_in_weights,
        ), clsname

    # a subclass overriding forward is not silently matched by its parent's entry
    class Custom(DeepseekV32Indexer):
        def forward(self, *a, **k):  # noqa: D401
            return None

    with pytest.raises(ValueError):
        dsa.detect_variant(object.__new__(Custom))


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_variant_matters(tiny_models, family):
    """Guard against a vacuous comparison: the other RoPE layout gives different q/k."""
    model, seed = _reloaded(tiny_models, family, torch.float32)
    calls = _run_prefill_decode(model, seed)
    call = calls[0][0]
    ix = model.model.layers[0].self_attn.indexer
    hs, q_resid, pe = call["args"][:3]
    right = dsa.detect_variant(ix)
    wrong = dsa.IndexerVariant("interleave" if right.rope == "half" else "half")
    q1, k1 = dsa.indexer_qk(ix, hs, q_resid, pe, variant=right)
    q2, k2 = dsa.indexer_qk(ix, hs, q_resid, pe, variant=wrong)
    assert not torch.allclose(q1, q2) and not torch.allclose(k1, k2)


def test_no_mask_is_causal():
    """attention_mask=None means plain causal (queries at the end of the keys)."""
    g = torch.Generator().manual_seed(_fresh_seed())
    B, S, P, H, D = 2, 11, 5, 3, 8
    T = S + P
    q = torch.randn(B, S, H, D, generator=g)
    k = torch.randn(B, T, D, generator=g)
    w = torch.randn(B, S, H, generator=g)
    causal = torch.arange(T)[None, :] <= (torch.arange(S)[:, None] + P)
    a = dsa.chunked_index_topk(q, k, w, None, 6, 0.3, chunk_rows=4)
    b = dsa.chunked_index_topk(q, k, w, causal.expand(B, S, T), 6, 0.3, chunk_rows=S)
    # different chunk shapes -> different GEMM shapes: scores may differ in the last bit
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-6, atol=1e-6)
    # rows with fewer than topk valid keys: -1 padding
    c = dsa.chunked_index_topk(q, k[:, : S], w, None, 6, 0.3, chunk_rows=2)
    assert (c.indices[:, 0, 1:] == -1).all() and (c.indices[:, 0, 0] == 0).all()
    assert (c.indices[:, 5:] >= 0).all()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the radix select runs under the interpreter on CPUs")
def test_radix_topk_equals_the_position_tie_topk():
    """The GPU's radix select (`kernels.dsa_topk.topk_rows`, here under the interpreter; and its
    sampled and warp methods) keeps the same keys and scores as the exact position-tie top-k, with
    ties, a padding mask, a causal tail, and a [B, S, T] mask that hides every row's first keys (the
    chunks then score from key t0 > 0 and the indices are shifted back)."""
    g = torch.Generator().manual_seed(_fresh_seed())
    B, S, P, H, D = 2, 9, 4, 2, 8
    T = S + P
    q = torch.randn(B, S, H, D, generator=g)
    k = torch.randn(B, T, D, generator=g)
    k[:, 3:6] = k[:, 2:3]  # equal keys: tied scores
    w = torch.randn(B, S, H, generator=g)
    pad = torch.ones(B, T, dtype=torch.bool)
    pad[1, :3] = False
    later = torch.arange(T)[None, :] <= torch.arange(S)[:, None] + P  # causal, queries at the end
    later = (later & (torch.arange(T)[None, :] >= 2)).expand(B, S, T)  # and keys 0, 1 hidden from all
    for mask, method in [(m, meth) for m in (None, pad, later) for meth in ("radix", "sampled", "warp")]:
        want = dsa.chunked_index_topk(q, k, w, mask, 5, 0.3, chunk_rows=4, radix_topk=False)
        got = dsa.chunked_index_topk(q, k, w, mask, 5, 0.3, chunk_rows=4, radix_topk=True, topk_method=method)
        assert want.counts is None and torch.equal(got.counts, (got.indices >= 0).sum(-1).int())
        for b in range(B):
            for s in range(S):
                pairs = lambda t: sorted((int(i), float(v)) for i, v in zip(t.indices[b, s], t.scores[b, s]) if i >= 0)
                assert pairs(got) == pairs(want), (b, s, mask is None, method)


def test_chunked_topk_writes_every_slot_of_its_result(monkeypatch):
    """The result is allocated without a fill: every chunk writes all its rows' slots (-1 / -inf past
    the candidates), also for a chunk whose rows are all masked and for fewer keys than top-k. Every
    fresh allocation here is filled with a sentinel, so a slot nobody wrote would show."""
    g = torch.Generator().manual_seed(_fresh_seed())
    B, S, H, D, topk = 2, 12, 2, 8, 20  # 12 keys < top-k 20: every row has columns past its keys
    q, k, w = torch.randn(B, S, H, D, generator=g), torch.randn(B, S, D, generator=g), torch.randn(B, S, H, generator=g)
    pad = torch.ones(B, S, dtype=torch.bool)
    pad[0, :4], pad[1, :8] = False, False  # the first chunk (rows 0-3) sees no real key in either batch row
    mask = (torch.arange(S)[None, :] <= torch.arange(S)[:, None])[None] & pad[:, None, :]  # [B, S, T] bool
    clean = {radix: dsa.chunked_index_topk(q, k, w, mask, topk, 0.3, chunk_rows=4, radix_topk=radix)
             for radix in (False, True)}
    real_empty = torch.empty

    def sentinel_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(12345) if not t.is_floating_point() else t.fill_(float("nan"))

    monkeypatch.setattr(torch, "empty", sentinel_empty)
    for radix in (False, True):
        got = dsa.chunked_index_topk(q, k, w, mask, topk, 0.3, chunk_rows=4, radix_topk=radix)
        assert torch.equal(got.indices, clean[radix].indices), radix
        assert torch.equal(got.scores.isnan(), torch.zeros_like(got.scores, dtype=torch.bool)), radix
        assert torch.equal(got.scores, clean[radix].scores), radix
        assert bool((got.indices[:, :4] == -1).all()) and bool((got.scores[:, :4] == float("-inf")).all())
        assert bool(((got.indices >= -1) & (got.indices < S)).all())


def test_chunk_rows_for_budget():
    assert dsa.chunk_rows_for_budget(1, 64, 131072, dsa.DEFAULT_MAX_BYTES) == 7  # 128K keys, 64 heads
    assert dsa.chunk_rows_for_budget(2, 4, 40, 1) == 1
    # the fp32 [B, rows, H, T] intermediate stays under the budget
    rows = dsa.chunk_rows_for_budget(1, 64, 131072, dsa.DEFAULT_MAX_BYTES)
    assert rows * 64 * 131072 * 4 <= dsa.DEFAULT_MAX_BYTES
    # the fused scores + Triton top-k keep [B, rows, T] fp32 and the per-row buffers: 7x the rows
    fused = dsa.chunk_rows_for_budget(1, 0, 131072, 2 * 2**30, per_key_bytes=4, per_row_bytes=8 * 4096 + 20 * 2048)
    assert fused * (131072 * 4 + 8 * 4096 + 20 * 2048) <= 2 * 2**30 < (fused + 1) * (131072 * 4 + 8 * 4096 + 20 * 2048)
    assert fused >= 7 * dsa.chunk_rows_for_budget(1, 0, 131072, 2 * 2**30)


@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache(tiny_models, family):
    """StaticCache: update_indexer returns the whole [B, max_cache_len, D] buffer; the unfilled
    slots are masked (and skipped by the key-range check)."""
    from transformers import StaticCache

    model, seed = _reloaded(tiny_models, family, torch.float32)
    cache = StaticCache(config=model.config, max_cache_len=PREFILL + 24)
    calls = _run_prefill_decode(model, seed, n_new=2, cache=cache)
    for layer_idx, layer_calls in calls.items():
        ix = model.model.layers[layer_idx].self_attn.indexer
        for step, call in enumerate(layer_calls):
            mask3d = call["args"][3]
            assert mask3d.shape[-1] == PREFILL + 24
            native = replay(ix, call, dsa.native_indexer_topk)
            assert torch.equal(native.indices, call["out"])
            ours = replay(ix, call, dsa.dsa_indexer_topk, chunk_rows=6)
            assert_same_selection(native, ours, mask3d, model.config.index_topk, f"static {family} {step} seed={seed}")
            assert int(ours.indices.max()) < PREFILL + 2 * step + 2  # nothing from the unfilled slots


class _PeakStorage(torch.overrides.TorchFunctionMode):
    """Largest storage produced by any op (views of the given tensors ignored)."""

    def __init__(self, *ignore):
        super().__init__()
        self.peak = 0
        self.ignore = {t.untyped_storage().data_ptr() for t in ignore}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in self.ignore:
                self.peak = max(self.peak, t.untyped_storage().nbytes())
        return out


def test_budget_bounds_largest_tensor():
    """No tensor allocated while scoring exceeds the budget (outputs aside)."""
    g = torch.Generator().manual_seed(_fresh_seed())
    B, S, H, D = 1, 128, 8, 16
    q = torch.randn(B, S, H, D, generator=g, dtype=torch.bfloat16)
    k = torch.randn(B, S, D, generator=g, dtype=torch.bfloat16)
    w = torch.randn(B, S, H, generator=g)
    mask = torch.ones(S, S, dtype=torch.bool).tril()[None]
    out_bytes = B * S * 16 * 4  # the [B, S, topk] fp32 / int32 outputs
    for budget in (16 * 1024, 128 * 1024):
        mode = _PeakStorage(q, k, w, mask)
        with mode:
            small = dsa.chunked_index_topk(q, k, w, mask, 16, 0.25, max_bytes=budget)
        assert mode.peak <= max(budget, out_bytes), (budget, mode.peak)
    full = dsa.chunked_index_topk(q, k, w, mask, 16, 0.25, chunk_rows=S)
    assert torch.equal(small.indices, full.indices)


@pytest.mark.parametrize("rope_first", [True, False])
def test_with_rotated_part_equals_the_concatenation_with_and_without_autograd(rope_first):
    """The indexer's rope channels replaced in place (inference) or by concatenation (autograd, as in
    the indexer's training): the same tensor as the native [rot | pass] / [pass | rot] either way,
    and gradients flow through the concatenation."""
    B, S, H, D, R = 2, 5, 3, 16, 4
    rope_slice = slice(0, R) if rope_first else slice(D - R, D)
    x = torch.randn(B, S, H, D)
    x_rot = torch.randn(B, S, H, R)
    x_pass = x[..., R:] if rope_first else x[..., : D - R]
    want = torch.cat([x_rot, x_pass] if rope_first else [x_pass, x_rot], dim=-1)
    with torch.no_grad():
        got = dsa.with_rotated_part(x.clone(), x_rot, rope_slice)
    assert torch.equal(got, want)
    leaf = x.clone().requires_grad_(True)
    out = dsa.with_rotated_part(leaf, x_rot, rope_slice)
    assert torch.equal(out.detach(), want)
    out.sum().backward()
    keep = torch.ones(D)
    keep[rope_slice] = 0  # the rotated channels do not come from x
    assert torch.equal(leaf.grad, keep.expand_as(x))


def test_fp8_indexer_on_the_cpu_keeps_the_top_k_of_the_quantised_definition():
    """score_dtype="fp8" on the CPU: the FP8 kernel's quantised operands (Hadamard rotation, e4m3 per
    row) in fp32, whose top-k equals that of the fp64 definition (`fp8_index_scores_reference`),
    causal, across query chunks, with the position tie rule; and it differs from the fp32 indexer's
    scores by the quantisation, not by nothing."""
    from stem_boost.kernels.indexer_scores import fp8_index_scores_reference

    B, S, H, D, topk = 2, 24, 4, 32, 7
    q, k = torch.randn(B, S, H, D), torch.randn(B, S, D)
    w = torch.rand(B, S, H)
    got = dsa.chunked_index_topk(q, k, w, None, topk, 0.3, score_dtype="fp8", chunk_rows=5)
    ref = fp8_index_scores_reference(q, k, w, 0.3)  # [B, S, T] fp64
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    ref = ref.masked_fill(~causal, float("-inf"))
    for b in range(B):
        for s in range(S):
            n = min(topk, s + 1)
            chosen = got.indices[b, s, :n]
            assert len(set(chosen.tolist())) == n and bool((chosen <= s).all())
            assert (got.indices[b, s, n:] == -1).all()
            # each chosen key's score is its fp64 definition's (fp32 rounding apart) ...
            torch.testing.assert_close(got.scores[b, s, :n].double(), ref[b, s, chosen],
                                       rtol=1e-5, atol=1e-5)
            # ... and none of them falls below the definition's n-th best by more than that
            # rounding: fp32 may order two keys whose fp64 scores differ in the 7th digit either way.
            nth_best = torch.topk(ref[b, s], n).values[-1]
            assert ref[b, s, chosen].min() >= nth_best - 1e-5 * (1 + nth_best.abs())
    exact = dsa.chunked_index_topk(q, k, w, None, topk, 0.3)
    assert not torch.allclose(got.scores, exact.scores)


def test_fp8_indexer_names_the_head_dims_it_takes():
    """An indexer head dim the FP8 scorer cannot take (FP8 MMA needs K >= 32; one e4m3 block per row
    of at most 128) is refused with the allowed dims, on every device alike."""
    q, k, w = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 16), torch.rand(1, 8, 2)
    with pytest.raises(ValueError, match=r"head dims \(32, 64, 128\); got 16"):
        dsa.chunked_index_topk(q, k, w, None, 4, 0.3, score_dtype="fp8")


@pytest.mark.parametrize("capability, head_dim, want", [
    ((9, 0), 128, "fp8"),        # Hopper, DeepSeek-V3.2's indexer
    ((8, 9), 64, "fp8"),         # Ada
    ((9, 0), 16, "bfloat16"),    # a head dim the FP8 scorer cannot take
    ((8, 0), 128, "bfloat16"),   # Ampere: no FP8 tensor cores
])
def test_auto_indexer_dtype_follows_the_gpu_and_the_head_dim(monkeypatch, capability, head_dim, want):
    """indexer_dtype="auto": fp8 where the GPU has FP8 tensor cores and the scorer takes the head dim,
    bfloat16 on other GPUs, float32 on the CPU; an explicit dtype is kept as given."""
    from stem_boost.config import StemConfig

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda", 0)
    assert StemConfig().indexer_dtype_on(cuda, head_dim) == want
    assert StemConfig().indexer_dtype_on(torch.device("cpu"), head_dim) == "float32"
    assert StemConfig(indexer_dtype="float32").indexer_dtype_on(cuda, head_dim) == "float32"
    assert StemConfig().indexer_score_dtype(cuda, head_dim) == ("fp8" if want == "fp8" else torch.bfloat16)


def test_fused_indexer_rope_gives_the_models_q_and_k_bit_for_bit(tiny_models, monkeypatch):
    """The indexer's half-split rotation in place by one Triton pass (`fused_rope=True`, the CUDA
    default; here under the interpreter) gives transformers' q and k exactly (bf16 DeepSeek-V3.2)."""
    calls_fused = []
    fused = dsa.rope_half_rounded_fused
    monkeypatch.setattr(dsa, "rope_half_rounded_fused", lambda *a, **k: calls_fused.append(1) or fused(*a, **k))
    model, seed = _reloaded(tiny_models, "deepseek_v32", torch.bfloat16)
    calls = _run_prefill_decode(model, seed)
    ix = model.model.layers[0].self_attn.indexer
    hs, q_resid, pe = calls[0][0]["args"][:3]
    with torch.no_grad():
        q_ref, k_ref = dsa.indexer_qk(ix, hs, q_resid, pe, fused_rope=False)
        q, k = dsa.indexer_qk(ix, hs, q_resid, pe, fused_rope=True)
    assert len(calls_fused) == 2  # q and k, by the kernel
    assert q.dtype == torch.bfloat16 and torch.equal(q, q_ref) and torch.equal(k, k_ref)
