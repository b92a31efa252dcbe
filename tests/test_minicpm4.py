"""Native MiniCPM-4 / 4.1 model and InfLLMv2 selection (tiny configs, CPU, fresh random inputs)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import stem_boost.models  # noqa: F401  (registers "minicpm" with the Auto classes)
from stem_boost.models.minicpm4 import (
    BlockScores,
    InfLLMv2Params,
    MiniCPM4Config,
    MiniCPM4ForCausalLM,
    infllmv2_select,
    infllmv2_sparse_attention,
    iter_block_scores,
    load_minicpm4,
)
from stem_boost.native.infllmv2 import compress_keys, kernel_causal_offset, pool_block_scores
from stem_boost.models.minicpm4.modeling_minicpm4 import MiniCPM4RoPE

from .infllmv2_naive import naive_infllmv2

# Scaled-down InfLLMv2: kernel 8 / stride 4 (coarse 32 / 16), 16-token blocks, 2 local blocks,
# topk 3 -> 5 blocks per row (1 init + 3 local forced, 1-2 chosen by score), sparse from 64 keys.
SC = dict(kernel_size=8, kernel_stride=4, init_blocks=1, block_size=16, window_size=32, topk=3,
          use_nope=False, dense_len=64)

OFFICIAL_NAMES_PER_LAYER = [
    "input_layernorm.weight", "mlp.down_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
    "post_attention_layernorm.weight", "self_attn.k_proj.weight", "self_attn.o_proj.weight",
    "self_attn.q_proj.weight", "self_attn.v_proj.weight",
]


def tiny_config(**overrides) -> MiniCPM4Config:
    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6,
              scale_emb=12, dim_model_base=16, scale_depth=1.4, initializer_range=0.1, tie_word_embeddings=False,
              sparse_config=dict(SC))
    kw.update(overrides)
    return MiniCPM4Config(**kw)


def tiny_model(**overrides) -> MiniCPM4ForCausalLM:
    model = MiniCPM4ForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():  # non-trivial norms so that a wrong weight mapping shows
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.uniform_(0.5, 1.5)
    return model


# ---------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------


def _check_against_naive(sel_idx, q, k, sc, *, decode=False, rel_tol=1e-5):
    """Compare selections row by row.

    Adjacent pooling windows share a compressed key, so exact ties between neighbouring blocks are
    common; the official top-k breaks them arbitrarily (torch.topk), ours by lower index. So the
    forced blocks must agree exactly and the chosen ones must have the same reference scores.
    """
    B, Hk = k.shape[0], k.shape[1]
    bs, local = sc["block_size"], sc["window_size"] // sc["block_size"]
    n_ties = 0
    for b in range(B):
        sets, pooled = naive_infllmv2(q[b], k[b], sc, decode=decode)
        for h in range(Hk):
            for r in range(q.shape[2]):
                got = {int(x) for x in sel_idx[b, h, r] if x >= 0}
                want = sets[h][r]
                if got == want:
                    continue
                n_ties += 1
                q_blk = (r + k.shape[2] - q.shape[2]) // bs
                forced = {x for x in range(q_blk + 1) if x < sc["init_blocks"] or x >= q_blk - local}
                assert forced <= got and forced <= want, (b, h, r, got, want)
                ref = pooled[h][r]
                s_got = sorted(float(ref[x]) for x in got - forced)
                s_want = sorted(float(ref[x]) for x in want - forced)
                assert len(s_got) == len(s_want), (b, h, r, got, want)
                for a, w in zip(s_got, s_want):
                    assert abs(a - w) <= rel_tol * abs(w) + 1e-12, (b, h, r, got, want, s_got, s_want)
    return n_ties


@pytest.mark.parametrize("N", [256, 255, 200])  # 255: N % 4 == 3 and N % 16 == 15 (kernel offset quirk)
def test_prefill_selection_matches_bruteforce(N):
    params = InfLLMv2Params.from_sparse_config(SC)
    B, Hk, G, D = 2, 2, 2, 16
    q = torch.randn(B, Hk * G, N, D)
    k = torch.randn(B, Hk, N, D)
    sel = infllmv2_select(q, k, params, chunk_size=37)
    _check_against_naive(sel.idx, q, k, SC)
    # pooled native scores equal the brute-force ones for every candidate block
    sets, pooled = naive_infllmv2(q[0], k[0], SC)
    for chunk in iter_block_scores(q, k, params, chunk_size=64):
        for i, r in enumerate(range(chunk.rows.start, chunk.rows.stop)):
            nb = int(chunk.candidate[i].sum())
            got = chunk.scores[0, 0, i, :nb].double()
            want = pooled[0][r][:nb]
            finite = torch.isfinite(want)
            assert torch.equal(finite, torch.isfinite(got))
            torch.testing.assert_close(got[finite], want[finite], rtol=2e-5, atol=1e-7)
    # budget: every row keeps min(topk + local, n_blocks) blocks among the causal ones
    k_total = min(SC["topk"] + SC["window_size"] // SC["block_size"], math.ceil(N / SC["block_size"]))
    q_blk = torch.arange(N) // SC["block_size"]
    assert torch.equal(sel.counts, torch.minimum(q_blk + 1, torch.tensor(k_total)).int().expand(B, Hk, N))
    assert int(sel.idx.max()) <= int(q_blk.max())
    assert sel.forced.sum(-1).ge(1).all()  # the diagonal block is always forced


def test_kernel_offset_quirk():
    # D = Kc - trunc((L - s + 1) / s): -1 exactly when L % s == s - 1 (fine s=16, coarse s=64)
    for L in range(200, 400):
        kc = (L - 32) // 16 + 1
        assert kernel_causal_offset(L, kc, 16) == (-1 if L % 16 == 15 else 0)
        kc2 = (L - 128) // 64 + 1
        assert kernel_causal_offset(L, kc2, 64) == (-1 if L % 64 == 63 else 0)


def test_decode_selection_matches_bruteforce():
    params = InfLLMv2Params.from_sparse_config(SC)
    N, Hk, G, D = 203, 2, 2, 16
    k = torch.randn(1, Hk, N, D)
    q = torch.randn(1, Hk * G, 1, D)
    sel = infllmv2_select(q, k, params)  # one token at position N - 1
    _check_against_naive(sel.idx, q, k, SC, decode=True)


def test_selection_chunking_and_compression():
    params = InfLLMv2Params.from_sparse_config(SC)
    q, k = torch.randn(1, 4, 160, 16), torch.randn(1, 2, 160, 16)
    a = infllmv2_select(q, k, params, chunk_size=1000)
    b = infllmv2_select(q, k, params, chunk_size=5)
    assert torch.equal(a.idx, b.idx) and torch.equal(a.counts, b.counts)
    # compression = means of complete windows
    c = compress_keys(k, 8, 4)
    assert c.shape[2] == (160 - 8) // 4 + 1
    torch.testing.assert_close(c[:, :, 3], k[:, :, 12:20].mean(2))
    # pooling windows [b*P - 1, b*P + P), clipped; existing-but-invisible keys score 0
    s = torch.arange(1.0, 11.0).view(1, 10)
    torch.testing.assert_close(pool_block_scores(s, 3, 4), torch.tensor([[4.0, 8.0, 10.0]]))
    torch.testing.assert_close(pool_block_scores(s[:, :2], 3, 4, n_existing=10), torch.tensor([[2.0, 0.0, 0.0]]))


def test_stem_inputs_bias_and_budgets():
    """The selector's Stem inputs: k_free = 0 keeps the forced blocks only; a block bias with
    k_free = 2 keeps the two best non-forced blocks by log(score) + bias (ties: lower block)."""
    params = InfLLMv2Params.from_sparse_config(SC)
    S = 192
    q, k = torch.randn(1, 4, S, 16), torch.randn(1, 2, S, 16)

    sel = infllmv2_select(q, k, params, k_free=torch.zeros(S, dtype=torch.long))
    assert sel.forced[sel.idx >= 0].all()

    native = infllmv2_select(q, k, params)
    forced_idx, cand_idx, cand_scores = native.split_forced()
    assert torch.equal(forced_idx, sel.idx)  # forced part = the forced-only selection
    merged = torch.cat([forced_idx, cand_idx], -1).sort(-1, descending=True).values
    assert torch.equal(merged[..., : native.idx.shape[-1]], native.idx.sort(-1, descending=True).values)
    assert torch.isfinite(cand_scores[cand_idx >= 0]).all() and (cand_scores[cand_idx >= 0] > 0).all()

    n_blocks = -(-S // params.block_size)
    bias = 5.0 * torch.rand(1, 2, n_blocks)
    biased = infllmv2_select(q, k, params, key_bias=bias, k_free=torch.full((S,), 2, dtype=torch.long))
    (chunk,) = list(iter_block_scores(q, k, params, chunk_size=S))
    for r in range(150, S):
        for h in range(2):
            free = chunk.candidate[r] & ~chunk.forced[r]
            score = chunk.scores[0, h, r].clamp_min(torch.finfo(torch.float32).tiny).log() + bias[0, h, : free.numel()]
            score = torch.where(free, score, float("-inf"))
            want = {int(b) for b in sorted(range(free.numel()), key=lambda b: (-float(score[b]), b))[:2]}
            got = {int(x) for x, f in zip(biased.idx[0, h, r], biased.forced[0, h, r]) if x >= 0 and not f}
            assert got == want, (r, h, got, want)


# ---------------------------------------------------------------------------------------------
# Sparse attention
# ---------------------------------------------------------------------------------------------


def _masked_sdpa_oracle(q, k, v, idx, block_size, q_offset):
    """Dense SDPA with a boolean mask built block by block from idx (+ causal)."""
    B, Hq, S, D = q.shape
    Hk, T = k.shape[1], k.shape[2]
    mask = torch.zeros(B, Hk, S, T, dtype=torch.bool)
    for b in range(B):
        for h in range(Hk):
            for r in range(S):
                for blk in idx[b, h, r].tolist():
                    if blk >= 0:
                        mask[b, h, r, blk * block_size : (blk + 1) * block_size] = True
    mask &= torch.arange(T) <= (torch.arange(S) + q_offset).unsqueeze(-1)
    G = Hq // Hk
    return F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1),
                                          attn_mask=mask.repeat_interleave(G, 1))


@pytest.mark.parametrize("S,T", [(201, 201), (1, 190), (40, 230)])
def test_sparse_attention_matches_masked_sdpa(S, T):
    params = InfLLMv2Params.from_sparse_config(SC)
    q, k, v = torch.randn(2, 4, S, 16), torch.randn(2, 2, T, 16), torch.randn(2, 2, T, 16)
    sel = infllmv2_select(q, k, params, q_offset=T - S)
    out = infllmv2_sparse_attention(q, k, v, sel.idx, params.block_size, q_offset=T - S, chunk_size=7,
                                    kv_tile_blocks=2)
    torch.testing.assert_close(out, _masked_sdpa_oracle(q, k, v, sel.idx, params.block_size, T - S),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def test_autoclasses_resolve():
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    assert CONFIG_MAPPING["minicpm"] is MiniCPM4Config
    assert AutoConfig.for_model("minicpm", hidden_size=64, num_attention_heads=4).__class__ is MiniCPM4Config
    assert isinstance(AutoModelForCausalLM.from_config(tiny_config()), MiniCPM4ForCausalLM)


def test_save_load_roundtrip_and_official_names(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model()
    ids = torch.randint(0, 96, (2, 90))
    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(tmp_path, safe_serialization=True)
    names = set(load_file(tmp_path / "model.safetensors"))
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    expected |= {f"model.layers.{i}.{n}" for i in range(2) for n in OFFICIAL_NAMES_PER_LAYER}
    assert names == expected
    for loaded in (AutoModelForCausalLM.from_pretrained(tmp_path), MiniCPM4ForCausalLM.from_pretrained(tmp_path)):
        with torch.no_grad():
            assert torch.equal(loaded.eval()(ids).logits, ref)


def test_loads_official_style_folder(tmp_path):
    """config.json as shipped (auto_map, MiniCPMForCausalLM, longrope, sparse_config) + official names."""
    from transformers import AutoConfig, AutoModelForCausalLM

    half = 8  # head_dim / 2 LongRoPE factors
    official = {
        "_name_or_path": "openbmb/MiniCPM4.1-8B",
        "architectures": ["MiniCPMForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_minicpm.MiniCPMConfig",
            "AutoModel": "modeling_minicpm.MiniCPMModel",
            "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM",
        },
        "bos_token_id": 1, "eos_token_id": [2, 73440], "pad_token_id": 2, "hidden_act": "silu",
        "hidden_size": 64, "initializer_range": 0.1, "intermediate_size": 96, "max_position_embeddings": 256,
        "model_type": "minicpm", "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"rope_type": "longrope", "long_factor": [1.0 + 0.5 * i for i in range(half)],
                         "short_factor": [1.0 + 0.1 * i for i in range(half)],
                         "original_max_position_embeddings": 128},
        "torch_dtype": "float32", "transformers_version": "4.56.0", "use_cache": True, "vocab_size": 96,
        "scale_emb": 12, "dim_model_base": 16, "scale_depth": 1.4, "mup_denominator": 32,
        "tie_word_embeddings": False, "rope_theta": 10000.0, "sparse_config": dict(SC),
    }
    (tmp_path / "config.json").write_text(json.dumps(official))
    cfg = MiniCPM4Config(**{k: v for k, v in official.items() if not k.startswith("_") and k != "torch_dtype"})
    src = MiniCPM4ForCausalLM(cfg).eval()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    ids = torch.randint(0, 96, (1, 100))  # >= dense_len: sparse path, rows past the LongRoPE original length
    with torch.no_grad():
        ref = src(ids).logits
    assert isinstance(AutoConfig.from_pretrained(tmp_path), MiniCPM4Config)
    for model in (AutoModelForCausalLM.from_pretrained(tmp_path), load_minicpm4(tmp_path),
                  MiniCPM4ForCausalLM.from_pretrained(tmp_path)):
        assert model.config.sparse_config == SC and model.config.rope_scaling["rope_type"] == "longrope"
        with torch.no_grad():
            assert torch.equal(model.eval()(ids).logits, ref)
    dense = load_minicpm4(tmp_path, sparse_config=None)
    src.set_sparse_config(None)
    with torch.no_grad():
        assert torch.equal(dense(ids).logits, src(ids).logits)
        assert not torch.equal(dense(ids).logits, ref)


def test_dense_below_dense_len_and_manual_forward():
    """Below dense_len the model is plain causal attention; muP scalings as the official code."""
    model = tiny_model()
    dense = MiniCPM4ForCausalLM(tiny_config(sparse_config=None)).eval()
    dense.load_state_dict(model.state_dict())
    ids = torch.randint(0, 96, (2, 63))
    with torch.no_grad():
        out = model(ids).logits
        assert torch.equal(out, dense(ids).logits)
        torch.testing.assert_close(out, _manual_forward(model, ids), rtol=1e-5, atol=1e-5)


def _manual_forward(model, ids):
    """Independent dense forward from the official formulas (default RoPE, no sparse)."""
    cfg = model.config
    sd = model.state_dict()
    S, D, H, Hk = ids.shape[1], cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads

    def rms(x, w):
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)) * w

    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2).float() / D))
    ang = torch.outer(torch.arange(S).float(), inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(x):
        x1, x2 = x[..., : D // 2], x[..., D // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = sd["model.embed_tokens.weight"][ids] * cfg.scale_emb
    res = cfg.scale_depth / math.sqrt(cfg.num_hidden_layers)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = rope((h @ sd[p + "self_attn.q_proj.weight"].T).view(-1, S, H, D).transpose(1, 2))
        k = rope((h @ sd[p + "self_attn.k_proj.weight"].T).view(-1, S, Hk, D).transpose(1, 2))
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(-1, S, Hk, D).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k.repeat_interleave(H // Hk, 1), v.repeat_interleave(H // Hk, 1),
                                           is_causal=True)
        x = x + (a.transpose(1, 2).reshape(-1, S, H * D) @ sd[p + "self_attn.o_proj.weight"].T) * res
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        m = (F.silu(h @ sd[p + "mlp.gate_proj.weight"].T) * (h @ sd[p + "mlp.up_proj.weight"].T))
        x = x + (m @ sd[p + "mlp.down_proj.weight"].T) * res
    x = rms(x, sd["model.norm.weight"])
    return (x / (cfg.hidden_size / cfg.dim_model_base)) @ sd["lm_head.weight"].T


def test_sparse_prefill_model_matches_masked_sdpa_oracle():
    model = tiny_model()
    ids = torch.randint(0, 96, (2, 150))
    seen = []

    def oracle_forward(module, q, k, v, params, *, q_nope=None, k_nope=None, batch_row=None):
        T, S = k.shape[2], q.shape[2]
        sel = infllmv2_select(q, k, params, q_offset=T - S)
        seen.append((module.layer_idx, tuple(sel.idx.shape)))
        return _masked_sdpa_oracle(q, k, v, sel.idx, params.block_size, T - S)

    with torch.no_grad():
        native = model(ids).logits
        for attn in model.attention_layers():
            attn.sparse_forward = oracle_forward
        via_oracle = model(ids).logits
    assert [s[0] for s in seen] == [0, 1] and seen[0][1][:3] == (2, 2, 150)
    torch.testing.assert_close(native, via_oracle, rtol=1e-5, atol=1e-5)
    dense = MiniCPM4ForCausalLM(tiny_config(sparse_config=None)).eval()
    dense.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (dense(ids).logits - native).abs().max() > 1e-4  # the sparse path really drops blocks


def test_generate_with_cache_matches_recomputation():
    model = tiny_model()
    prompt = torch.randint(0, 96, (1, 128))  # sparse (>= dense_len) prefill, then sparse decode
    with torch.no_grad():
        gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, pad_token_id=0)
        seq = gen.sequences
        assert seq.shape == (1, 131)
        for step, logits in enumerate(gen.logits):  # N = 128, 129, 130 keys (no kernel-offset lengths)
            full = model(seq[:, : 128 + step], use_cache=False).logits[:, -1]
            torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)


def test_longrope_tables():
    cfg = tiny_config(max_position_embeddings=64, rope_scaling={
        "rope_type": "longrope", "long_factor": [2.0] * 8, "short_factor": [1.5] * 8,
        "original_max_position_embeddings": 32})
    rope = MiniCPM4RoPE(cfg)
    pos = torch.arange(10).unsqueeze(0)
    cos, sin = rope(pos)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    ang = torch.outer(torch.arange(10).float() / 2.0, inv)  # 64 > 32: long factors
    mscale = math.sqrt(1 + math.log(64 / 32) / math.log(32))
    torch.testing.assert_close(cos[0], torch.cat([ang, ang], -1).cos() * mscale)
    torch.testing.assert_close(sin[0], torch.cat([ang, ang], -1).sin() * mscale)


@pytest.mark.parametrize("bad,match", [
    (dict(kernel_size=8, kernel_stride=3), "kernel_size"),
    (dict(block_size=18), "block_size"),
    (dict(window_size=40), "window_size"),
    (dict(topk=1, init_blocks=1), "init_blocks"),
    (dict(topk=0), "topk"),
    (dict(kernel_stride=0, kernel_size=0), "kernel_stride"),
    (dict(dense_len=-5), "dense_len"),
    (dict(topk=2.5), "topk"),
    (dict(use_nope="yes"), "use_nope"),
    (dict(init_blocks=-1), "init_blocks"),
])
def test_bad_sparse_config_raises(bad, match):
    with pytest.raises(ValueError, match=match):
        InfLLMv2Params.from_sparse_config({**SC, **bad})
    with pytest.raises(ValueError, match=match):
        tiny_config(sparse_config={**SC, **bad})


def test_use_nope_selection_uses_unrotated_keys():
    model = tiny_model(sparse_config={**SC, "use_nope": True})
    ids = torch.randint(0, 96, (1, 100))
    with torch.no_grad():
        logits = model(ids).logits
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, min_new_tokens=2, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, pad_token_id=0)
        full = model(gen.sequences[:, :101], use_cache=False).logits[:, -1]
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(gen.logits[1], full, rtol=1e-4, atol=1e-4)
