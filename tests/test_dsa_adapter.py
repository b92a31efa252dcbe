"""stem_boost.wrap on tiny DSA models (DeepSeek-V3.2, GLM-MoE-DSA), saved and reloaded from disk.

The models use 16 indexer heads so that exact score ties at the top-k boundary (where the native
torch.topk and our deterministic tie-break may legitimately differ) are rare; the identity test
checks that the selections match as sets before it compares logits, and redraws inputs if a tie
made them differ.
"""

from __future__ import annotations

import pytest
import torch

import stem_boost
from tests.dsa_tiny import BUILDERS, save_and_reload

FAMILIES = list(BUILDERS)
TOPK = 16


def load(family: str, tmp_path, dtype=None):
    """A tiny model whose weights come from the test's seed (tests/conftest.py seeds torch)."""
    model = BUILDERS[family](seed=int(torch.randint(0, 10_000, (1,))), index_n_heads=16, index_topk=TOPK)
    return save_and_reload(model, tmp_path, dtype=dtype)


def native_selections(model, ids, attention_mask=None):
    """Per DSA layer: the native indexer's top-k [B, S, K] from an unwrapped forward."""
    out, hooks = [], []
    for layer in model.model.layers:
        if getattr(layer.self_attn, "indexer", None) is not None:
            hooks.append(layer.self_attn.indexer.register_forward_hook(lambda m, a, o: out.append(o.clone())))
    with torch.no_grad():
        logits = model(ids, attention_mask=attention_mask, use_cache=False).logits
    for h in hooks:
        h.remove()
    return logits, out


def same_sets(native_idx: torch.Tensor, ours, valid_q: torch.Tensor) -> bool:
    """Native top-k (masked slots included) vs our Selection, as sets of causally valid keys."""
    B, S, _ = native_idx.shape
    for b in range(B):
        for s in range(S):
            if not valid_q[b, s]:
                continue
            nat = {int(t) for t in native_idx[b, s] if int(t) <= s and valid_q[b, int(t)]}
            mine = {int(t) for t in ours.idx[b, 0, s, : int(ours.counts[b, 0, s])]}
            if nat != mine:
                return False
    return True


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_config_reproduces_native_logits(family, tmp_path):
    model = load(family, tmp_path)
    for _attempt in range(5):
        ids = torch.randint(3, 256, (2, 4 * TOPK))
        ref, nat_sel = native_selections(model, ids)
        stem_boost.wrap(model, reduce=0.0, beta=0.0, keep_selections=True)
        with torch.no_grad():
            out = model(ids, use_cache=False).logits
        ours = [m._stem.last_native for m in model._stem_wrap.modules]
        stem_boost.unwrap(model)
        valid = torch.ones_like(ids, dtype=torch.bool)
        if all(same_sets(n, o, valid) for n, o in zip(nat_sel, ours)):
            assert (out - ref).abs().max().item() <= 1e-4
            return
    pytest.fail("the selections differed from the native ones in 5 fresh draws (not only by ties)")


@pytest.mark.parametrize("family", FAMILIES)
def test_reduce_contract_and_unwrap(family, tmp_path):
    model = load(family, tmp_path)
    ids = torch.randint(3, 256, (1, 6 * TOPK))
    with torch.no_grad():
        ref = model(ids).logits
        stem_boost.wrap(model, reduce=0.15, keep_selections=True)
        out = model(ids).logits
    # the forward left its accounting as device tensors (no host synchronisation): read here
    assert all(len(m._stem.stats._pending) == 1 for m in model._stem_wrap.modules)
    st = stem_boost.stats(model)
    assert st["family"] == "dsa" and len(st["layers"]) == model.config.num_hidden_layers
    for layer in st["layers"]:
        assert abs(layer["reduce_achieved"] - 0.15) <= 0.005, layer
        assert layer["stem_pairs"] < layer["native_pairs"]
    assert torch.isfinite(out).all()
    assert not torch.equal(out, ref)  # the boost changed the attended keys
    # every Stem selection is a subset of the native candidates of its row
    for m in model._stem_wrap.modules:
        nat, stem = m._stem.last_native, m._stem.last_stem
        K = stem.idx.shape[-1]
        slot = torch.arange(K)
        stem_keys = torch.where(slot < stem.counts.unsqueeze(-1), stem.idx, -2)
        member = (stem_keys.unsqueeze(-1) == nat.idx.unsqueeze(-2)).any(-1) | (stem_keys == -2)
        assert member.all()
    stem_boost.unwrap(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_wrap_twice_reconfigures_without_double_patch(tmp_path):
    model = load("deepseek_v32", tmp_path)
    ids = torch.randint(3, 256, (1, 5 * TOPK))
    stem_boost.wrap(model, reduce=0.15)
    forward = model.model.layers[0].self_attn.forward
    stem_boost.wrap(model, reduce=0.3)
    assert model.model.layers[0].self_attn.forward.__func__ is forward.__func__
    with torch.no_grad():
        model(ids)
    assert abs(stem_boost.stats(model)["reduce_achieved"] - 0.3) < 0.01
    stem_boost.unwrap(model)
    assert "forward" not in model.model.layers[0].self_attn.__dict__


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_batch(family, tmp_path):
    """Batch 2, one row left-padded: the padded row's real tokens get the same logits as alone, boosted
    and under the identity configuration (tests/test_padding.py covers more shapes and schedules)."""
    model = load(family, tmp_path)
    L, pad = 4 * TOPK, 7
    ids = torch.randint(3, 256, (2, L))
    ids[1, :pad] = 0
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1, :pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    for cfg in (dict(reduce=0.15), dict(reduce=0.0, beta=0.0)):
        stem_boost.wrap(model, **cfg)
        with torch.no_grad():
            both = model(ids, attention_mask=mask, position_ids=pos).logits
            alone = model(ids[1:, pad:]).logits
        assert torch.isfinite(both[mask.bool()]).all()
        torch.testing.assert_close(both[1, pad:], alone[0], atol=1e-4, rtol=1e-4)


def next_token_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean KL(p || q) of the next-token distributions, in fp64."""
    p = torch.log_softmax(p_logits.double(), -1)
    q = torch.log_softmax(q_logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_runs_and_tracks_fp32(family, tmp_path):
    """Stem in bf16 tracks Stem in fp32 about as well as the native model's own bf16 run tracks fp32:
    KL(fp32 || bf16) of the next-token distribution within 5x native's drift + 0.02, as means over
    four sequences. On these tiny random models native's own drift is 0.003-0.04 and Stem's 0.6-4x
    of it (selection flips at near-ties of the bf16 scores add to the rounding), measured over seeds
    2026-12-02; one sequence alone exceeded the bound on about 1 seed in 16 (0.033 vs 0.002), four
    passed 48 of 48 draws."""
    fp32 = load(family, tmp_path)
    bf16 = save_and_reload(fp32, tmp_path / "bf16", dtype=torch.bfloat16)
    ids = torch.randint(3, 256, (4, 4 * TOPK))  # four sequences: the drifts are means over all their tokens
    with torch.no_grad():
        native_drift = next_token_kl(fp32(ids).logits, bf16(ids).logits.float())
        stem_boost.wrap(fp32, reduce=0.15)
        stem_boost.wrap(bf16, reduce=0.15)
        ref = fp32(ids).logits
        out = bf16(ids).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert abs(stem_boost.stats(bf16)["reduce_achieved"] - 0.15) <= 0.005
    stem_drift = next_token_kl(ref, out.float())
    assert stem_drift <= 5 * native_drift + 0.02, (stem_drift, native_drift)


def test_generate_end_to_end_decode_keeps_native_path(tmp_path):
    model = load("deepseek_v32", tmp_path)
    ids = torch.randint(3, 256, (1, 4 * TOPK))
    stem_boost.wrap(model, reduce=0.15)
    gen = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)  # no early EOS
    assert gen.shape == (1, 4 * TOPK + 6)
    # decode steps record no prefill statistics: the prefill's accounting stays
    assert abs(stem_boost.stats(model)["reduce_achieved"] - 0.15) <= 0.005
    # one cached decode step (native selection over the cache) equals the last row of a full
    # recomputation when the configuration keeps the native selection
    stem_boost.wrap(model, reduce=0.0, beta=0.0)
    from transformers import DynamicCache

    with torch.no_grad():
        full = model(gen, use_cache=False).logits[:, -1]
        cache = DynamicCache(config=model.config)
        model(gen[:, :-1], past_key_values=cache, use_cache=True)
        step = model(gen[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(reduce=1.0), "reduce=1.0"),
        (dict(reduce=-0.1), "reduce=-0.1"),
        (dict(beta=-1.0), "beta=-1.0"),
        (dict(oam_norm="l2"), "oam_norm='l2'"),
        (dict(head_agg="median"), "head_agg='median'"),
        (dict(backend="cuda"), "backend='cuda'"),
    ],
)
def test_bad_arguments(kwargs, match, tmp_path):
    model = load("deepseek_v32", tmp_path)
    with pytest.raises(ValueError, match=match):
        stem_boost.wrap(model, **kwargs)


def test_unsupported_model_lists_supported_families():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match="Supported: DSA"):
        stem_boost.wrap(model)
    with pytest.raises(ValueError, match="not wrapped"):
        stem_boost.unwrap(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_baseline_needs_no_indexer(family, tmp_path):
    """wrap(dense=True): full causal attention without the indexer equals the native model with a
    top-k that covers the sequence (transformers' own path, small enough here), padded rows too."""
    model = load(family, tmp_path)
    L = 3 * TOPK
    ids = torch.randint(3, 256, (2, L))
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1, :5] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    indexers = [m for m in model.modules() if hasattr(m, "index_topk") and hasattr(m, "weights_proj")]
    for m in indexers:
        m.index_topk = 4 * L
    with torch.no_grad():
        want = model(ids, attention_mask=mask, position_ids=pos).logits
    for m in indexers:
        m.index_topk = TOPK
    calls = []
    hooks = [m.wk.register_forward_hook(lambda *a: calls.append(1)) for m in indexers]  # the indexer's keys
    stem_boost.wrap(model, reduce=0.15)
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=pos)
    assert calls  # the hook sees the indexer of a sparse forward ...
    calls.clear()
    stem_boost.wrap(model, dense=True)
    with torch.no_grad():
        got = model(ids, attention_mask=mask, position_ids=pos).logits
    for h in hooks:
        h.remove()
    assert not calls  # ... and the dense baseline never runs it
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)


def test_selections_are_kept_only_on_request(tmp_path):
    """By default no layer keeps its last selections (at 128K tokens each is 1 GiB a layer):
    `last_selections` and the distributed digests say how to keep them; with keep_selections=True
    they are the ones the layers attended with, and wrapping again without it drops them."""
    from stem_boost.dist import selection_digest

    model = load("deepseek_v32", tmp_path)
    ids = torch.randint(3, 256, (1, 4 * TOPK))
    stem_boost.wrap(model, reduce=0.15)
    with torch.no_grad():
        model(ids, use_cache=False)
    assert all(m._stem.last_stem is None and m._stem.last_native is None for m in model._stem_wrap.modules)
    for call in (stem_boost.last_selections, selection_digest):
        with pytest.raises(ValueError, match="keep_selections=True"):
            call(model)
    stem_boost.wrap(model, reduce=0.15, keep_selections=True)
    with torch.no_grad():
        model(ids, use_cache=False)
    sels = stem_boost.last_selections(model)
    assert len(sels) == model.config.num_hidden_layers
    for sel, layer in zip(sels, stem_boost.stats(model)["layers"]):
        assert int(sel.counts.sum()) == layer["stem_pairs"]
    assert len(selection_digest(model)) > 0
    stem_boost.wrap(model, reduce=0.15)
    with torch.no_grad():
        model(ids, use_cache=False)
    assert all(m._stem.last_stem is None for m in model._stem_wrap.modules)


def test_glm_shared_layers_reuse_the_previous_indexers_candidates(tmp_path):
    """GLM-MoE-DSA "shared" layers (no indexer of their own) attend with the previous full layer's
    candidates: the identity configuration reproduces the native logits, Stem cuts them like any
    layer's, and only a model with shared layers keeps the candidates between layers."""
    model = BUILDERS["glm_moe_dsa"](seed=int(torch.randint(0, 10_000, (1,))), index_n_heads=16, index_topk=TOPK,
                                    indexer_types=["full", "shared"])
    model = save_and_reload(model, tmp_path)
    assert model.model.layers[1].self_attn.indexer is None
    for _attempt in range(5):  # redraw when a score tie at the top-k edge makes the sets differ
        ids = torch.randint(3, 256, (1, 4 * TOPK))
        ref, nat_sel = native_selections(model, ids)  # one indexer: layer 0's
        stem_boost.wrap(model, reduce=0.0, beta=0.0, keep_selections=True)
        with torch.no_grad():
            out = model(ids, use_cache=False).logits
        ours = [m._stem.last_native for m in model._stem_wrap.modules]
        assert len(nat_sel) == 1 and torch.equal(ours[0].idx, ours[1].idx)  # the shared layer took layer 0's
        if same_sets(nat_sel[0], ours[0], torch.ones_like(ids, dtype=torch.bool)):
            assert (out - ref).abs().max().item() <= 1e-4
            break
        stem_boost.unwrap(model)
    else:
        pytest.fail("the selections differed from the native ones in 5 fresh draws (not only by ties)")
    stem_boost.wrap(model, reduce=0.15)
    with torch.no_grad():
        model(ids, use_cache=False)
    for layer in stem_boost.stats(model)["layers"]:
        assert abs(layer["reduce_achieved"] - 0.15) <= 0.005, layer
    assert model._stem_wrap.modules[0]._stem.shared.last is not None  # needed by the shared layer
    stem_boost.unwrap(model)
    full = save_and_reload(BUILDERS["glm_moe_dsa"](seed=1, index_n_heads=16, index_topk=TOPK), tmp_path / "full")
    stem_boost.wrap(full, reduce=0.15)
    with torch.no_grad():
        full(ids, use_cache=False)
    assert full._stem_wrap.modules[0]._stem.shared.last is None  # every layer has its own indexer


def random_causal_selection(B: int, S: int, K: int) -> "Selection":
    """Each query row s keeps up to K random keys of 0..s, ascending, -1 padded: [B, 1, S, K]."""
    from stem_boost.selection import Selection

    idx = torch.full((B, 1, S, K), -1, dtype=torch.int32)
    for b in range(B):
        for s in range(S):
            keys = torch.randperm(s + 1)[:K].sort().values
            idx[b, 0, s, :keys.numel()] = keys.to(torch.int32)
    return Selection.from_padded(idx, q_offset=0)


def test_absorbed_attention_equals_the_expanded_form(monkeypatch):
    """The CUDA path's absorbed MLA ([q_nope W_UK | q_rope] against the latent, W_UV after) gives the
    expanded per-head attention's output on the same token lists (fp32, CPU executors), across
    query chunks and batch rows."""
    from stem_boost.adapters import dsa

    model = BUILDERS["deepseek_v32"](seed=0)
    attn = model.model.layers[0].self_attn
    B, S, K = 2, 11, 5
    H, nope, rope, L = attn.num_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.kv_lora_rank
    q_pass, q_rot = torch.randn(B, H, S, nope), torch.randn(B, H, S, rope)
    latent, k_rot = torch.randn(B, 1, S, L), torch.randn(B, 1, S, rope)
    sel = random_causal_selection(B, S, K)

    keys, values = attn.expand_kv(latent, k_rot)  # [B, H, T, nope + rope], [B, H, T, Dv]
    want = dsa.attend_expanded(attn, torch.cat([q_pass, q_rot], dim=-1), keys, values, sel, "reference")
    monkeypatch.setattr(dsa, "ABSORBED_CHUNK", 4)  # three query chunks, the last one ragged
    with torch.no_grad():
        got = dsa.attend_absorbed(attn, q_pass, q_rot, latent, k_rot, sel)
    assert got.shape == want.shape == (B, S, H, attn.v_head_dim)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_latent_value_rms_equals_the_rms_of_the_per_head_norms():
    """The Gram-matrix RMS of the absorbed path (one L x L matrix, no per-head values) equals the
    RMS over the heads of ||W_UV^h c_t|| computed head by head (fp32), across chunks."""
    from stem_boost.adapters import dsa
    from stem_boost.oam import aggregate_heads

    B, T, H, Dv, L = 2, 37, 6, 8, 24
    latent, w_uv = torch.randn(B, T, L), torch.randn(H, Dv, L)
    want = aggregate_heads(dsa.latent_value_norms(latent, w_uv, chunk=10), 1, how="rms")  # [B, 1, T]
    got = dsa.latent_value_rms(latent, w_uv, chunk=10)
    assert got.shape == (B, 1, T)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_value_gram_is_kept_until_the_weight_changes(seed):
    """`cached_value_gram` returns the Gram matrix of the current weight: computed once, reused while
    the weight is unchanged, computed again after an in-place update (the version counter) or for
    another weight; the RMS from the kept matrix equals the one computed afresh."""
    from stem_boost.adapters import dsa

    gen = torch.Generator().manual_seed(seed)
    H, Dv, L = 4, 6, 10
    layer = torch.nn.Linear(L, H * 2 * Dv, bias=False)
    w_uv = layer.weight.detach().view(H, 2 * Dv, L)[:, Dv:]  # a view, as `absorbed_weights` gives it
    first = dsa.cached_value_gram(layer, w_uv)
    assert dsa.cached_value_gram(layer, w_uv) is first
    torch.testing.assert_close(first, dsa.value_gram(w_uv))
    latent = torch.randn(2, 9, L, generator=gen)
    torch.testing.assert_close(dsa.latent_value_rms(latent, w_uv, gram=first), dsa.latent_value_rms(latent, w_uv))
    with torch.no_grad():
        layer.weight.mul_(2.0)  # in place: the view's values change, its storage does not
    second = dsa.cached_value_gram(layer, w_uv)
    assert second is not first
    torch.testing.assert_close(second, 4.0 * first)
    other = torch.randn(H, Dv, L, generator=gen)
    torch.testing.assert_close(dsa.cached_value_gram(layer, other), dsa.value_gram(other))


@pytest.mark.parametrize("family", FAMILIES)
def test_absorbed_layer_path_gives_the_expanded_paths_logits(family, tmp_path, monkeypatch):
    """The whole wrapped forward on the CUDA path's absorbed form (in-place absorbed queries, the
    Gram-matrix value norms, W_UV into the output), forced on the CPU, equals the expanded form's
    logits and keeps the same Stem selections (fp32, reduce 0.15, a left-padded batch)."""
    from stem_boost.adapters import dsa
    from stem_boost.dist import selection_digest

    model = load(family, tmp_path)
    ids = torch.randint(3, 256, (2, 4 * TOPK))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    stem_boost.wrap(model, reduce=0.15, keep_selections=True)
    with torch.no_grad():
        want = model(ids, attention_mask=mask, use_cache=False).logits
    want_digest = selection_digest(model)
    calls = []

    def absorbed_on_cpu(hidden_states, cfg, past_key_values):
        calls.append(hidden_states.shape[1])
        return past_key_values is None and hidden_states.shape[1] > 1 and not cfg.dense

    monkeypatch.setattr(dsa, "uses_absorbed_path", absorbed_on_cpu)
    monkeypatch.setattr(dsa, "ABSORBED_CHUNK", 24)  # two query chunks of 64 tokens (the last ragged)
    with torch.no_grad():
        got = model(ids, attention_mask=mask, use_cache=False).logits
    assert calls, "the forward never asked for the absorbed path"
    assert selection_digest(model) == want_digest
    real = mask.bool()
    assert (got - want)[real].abs().max().item() <= 1e-4


def test_absorbed_queries_rotate_in_place_bit_for_bit(seed):
    """With `rotation=`, the absorbed queries' rope columns are written by the fused interleaved
    rotation straight from the unrotated q_rot (bf16, a strided view as the layer's projection
    gives it), and equal bit for bit transformers' `apply_rotary_pos_emb_interleave` then a copy;
    that function is recognised as the stock one (and a different one is not)."""
    from transformers.models.deepseek_v32 import modeling_deepseek_v32 as mod

    from stem_boost.adapters import dsa
    from stem_boost.rope import apply_rope_half

    B, H, S, nope, rope, L = 2, 3, 9, 8, 64, 16
    gen = torch.Generator().manual_seed(seed)
    q_states = torch.randn(B, S, H, nope + rope, generator=gen).to(torch.bfloat16).transpose(1, 2)
    q_pass, q_rot = q_states[..., :nope], q_states[..., nope:]  # [B, H, S, *] views, as in the layer
    k_rot = torch.randn(B, 1, S, rope, generator=gen).to(torch.bfloat16)
    angles = torch.rand(B, S, rope // 2, generator=gen) * 6.0
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(torch.bfloat16)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(torch.bfloat16)
    w_uk = torch.randn(H, nope, L, generator=gen).to(torch.bfloat16)
    q_ref, k_ref = mod.apply_rotary_pos_emb_interleave(q_rot, k_rot, cos, sin)
    assert dsa.fused_rotation_applies(mod.apply_rotary_pos_emb_interleave, q_rot, k_rot, cos, sin)
    assert not dsa.fused_rotation_applies(apply_rope_half, q_rot, k_rot, cos, sin)
    assert not dsa.fused_rotation_applies(mod.apply_rotary_pos_emb_interleave, q_rot.float(), k_rot.float(),
                                          cos.float(), sin.float())
    for s0, s1 in ((0, 4), (4, S)):
        want = dsa.absorbed_queries(q_pass, q_ref, w_uk, s0, s1)
        got = dsa.absorbed_queries(q_pass, q_rot, w_uk, s0, s1, rotation=(cos, sin))
        assert torch.equal(got, want), (s0, s1)
    assert torch.equal(dsa.rope_interleaved_fused(k_rot, cos, sin), k_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_latent_value_rms_in_half_precision_equals_the_fp32_gram_product(dtype, seed):
    """A half-precision latent takes the tensor-core quadratic form (G as hi + lo halves, under the
    interpreter here): equal to the fp32 Gram product on the same (rounded) latent to 2e-5
    relative, for ragged T, two batch rows and a latent of DeepSeek-V3.2's width."""
    from stem_boost.adapters import dsa
    from stem_boost.kernels.quadratic_form import quadratic_form_sqrt

    gen = torch.Generator().manual_seed(seed)
    B, T, H, Dv, L = 2, 37, 4, 8, 512
    latent = torch.randn(B, T, L, generator=gen).to(dtype)
    w_uv = torch.randn(H, Dv, L, generator=gen) * 0.05
    w = w_uv.float()
    gram = torch.einsum("hvl,hvm->lm", w, w) / H
    want = ((latent.float() @ gram) * latent.float()).sum(-1).clamp_min(0).sqrt()[:, None]  # [B, 1, T]
    got = dsa.latent_value_rms(latent, w_uv)
    assert got.shape == (B, 1, T) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)
    with pytest.raises(ValueError, match="L=24; allowed: a power of two"):
        quadratic_form_sqrt(torch.randn(1, 3, 24, dtype=dtype), torch.eye(24))
