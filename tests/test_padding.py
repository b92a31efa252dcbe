"""A padded batch gives every row what it gets alone (issue: batched prefill with padding).

For both families, batches of three rows of different lengths, left- and right-padded, under the
identity configuration and Stem with each schedule: each row's logits on its real tokens equal
its solo run (fp32, <= 1e-4 max abs), `stats()` reports each row's own pairs, and `generate()` on
a left-padded batch gives each row's solo generation.
"""

from __future__ import annotations

import pytest
import torch

import stem_boost
from stem_boost.testbeds.tiny_minicpm4 import build_testbed
from tests.dsa_tiny import BUILDERS, save_and_reload

from .remote_minicpm import RemoteMiniCPMForCausalLM

TOPK = 16
DSA_LENGTHS = (4 * TOPK + 5, 3 * TOPK, 2 * TOPK + 3)
INF_LENGTHS = (700, 560, 300)  # the tiny InfLLMv2 testbed is sparse from 512 keys on: the short row runs dense
CONFIGS = {
    "identity": dict(reduce=0.0, beta=0.0),
    "tpd": dict(reduce=0.15),
    "uniform": dict(reduce=0.15, schedule="uniform"),
    "mass": dict(reduce=0.15, schedule="mass"),
}
# InfLLMv2 only: Stem's grouped ranking (4 tokens a row; DSA ignores tile_tokens)
INF_CONFIGS = {**CONFIGS, "tiles": dict(reduce=0.15, tile_tokens=4), "tiles_mass": dict(reduce=0.15, schedule="mass",
                                                                                        tile_tokens=4)}


def padded_batch(rows: list[torch.Tensor], side: str, pad_id: int = 0):
    """ids [B, L], attention_mask [B, L] (1 = real), position_ids [B, L] (each row from 0)."""
    L = max(r.numel() for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, r in enumerate(rows):
        span = slice(L - r.numel(), L) if side == "left" else slice(0, r.numel())
        ids[b, span], mask[b, span] = r, 1
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids, mask, position_ids


def real_span(mask_row: torch.Tensor) -> slice:
    real = mask_row.nonzero().flatten()
    return slice(int(real[0]), int(real[-1]) + 1)


def logits_of(model, device: str = "cpu"):
    """forward(ids, mask, position_ids) -> logits on the CPU, the model run on `device`."""
    def run(ids, mask, pos):
        to = (lambda t: None if t is None else t.to(device))
        return model(to(ids), attention_mask=to(mask), position_ids=to(pos), use_cache=False).logits.cpu()
    return run


def kept_keys(sel, b: int, span: slice) -> list[list[frozenset]]:
    """The kept key units of batch row b's real query rows (`span`), per selection head and row, as
    sets of positions relative to the row's first real token (token lists: unit = one key)."""
    idx, counts = sel.idx[b, :, span].tolist(), sel.counts[b, :, span].tolist()
    start = span.start
    return [[frozenset(k - start for k in row[:n]) for row, n in zip(rows, ns)] for rows, ns in zip(idx, counts)]


def near_tie_swaps(batch_keys: list[list[frozenset]], alone_keys: list[list[frozenset]]) -> int:
    """How many query rows keep other keys in the batch than alone, each by one swapped key (what a
    near tie at the row's cut does when the batch's BLAS rounds a score differently); any other
    difference (another count, several keys) fails."""
    swaps = 0
    for heads_b, heads_a in zip(batch_keys, alone_keys):
        for got, want in zip(heads_b, heads_a):
            if got != want:
                assert len(got - want) == len(want - got) == 1, f"not a near-tie swap: {sorted(got ^ want)}"
                swaps += 1
    return swaps


def check_rows_equal_solo(model, forward, rows, side, cfg, atol=1e-4, is_sparse=lambda n: True,
                          same_selections=False, max_swaps=0):
    """forward(ids, mask, position_ids) -> logits [B, L, V]; compares each row with its solo run
    (logits, and the row's pairs in `stats()`: 0 for a row too short to be sparse). same_selections:
    also every layer's kept keys of the row (`stem_boost.last_selections`, token lists), up to
    `max_swaps` near-tie swaps over all layers (`near_tie_swaps`); a row with a swap attends to
    another key, so its logits are not compared."""
    stem_boost.wrap(model, **cfg, **(dict(keep_selections=True) if same_selections else {}))
    ids, mask, pos = padded_batch(rows, side)
    with torch.no_grad():
        batch = forward(ids, mask, pos)
        batch_stats = stem_boost.stats(model)
        batch_sels = stem_boost.last_selections(model) if same_selections else []
        for b, r in enumerate(rows):
            alone = forward(r[None], None, None)
            alone_stats = stem_boost.stats(model)
            span = real_span(mask[b])
            alone_sels = stem_boost.last_selections(model) if same_selections else []
            swaps = sum(near_tie_swaps(kept_keys(sel_b, b, span), kept_keys(sel_a, 0, slice(0, r.numel())))
                        for sel_b, sel_a in zip(batch_sels, alone_sels))
            assert swaps <= max_swaps, f"row {b} ({side}, {cfg}): {swaps} near-tie swaps (allowed {max_swaps})"
            got = batch[b, span]
            diff = (got - alone[0]).abs().max().item()
            assert swaps or diff <= atol, f"row {b} ({side}, {cfg}): max |batch - alone| = {diff:.2e}"
            solo_rows = alone_stats["rows"] if is_sparse(r.numel()) else [dict(stem_pairs=0, native_pairs=0)]
            assert batch_stats["rows"][b]["stem_pairs"] == solo_rows[0]["stem_pairs"], (b, side, cfg)
            assert batch_stats["rows"][b]["native_pairs"] == solo_rows[0]["native_pairs"], (b, side, cfg)
    stem_boost.unwrap(model)


def check_generation_equals_solo(model, rows, cfg, new_tokens: int):
    """Greedy generate() on a left-padded batch gives each row its solo generation (a row that
    reaches the end-of-sequence token early is padded after it in the batch)."""
    ids, mask, _ = padded_batch(rows, "left")
    stem_boost.wrap(model, **cfg)
    gen = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    for b, r in enumerate(rows):
        solo = model.generate(r[None], max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[0, r.numel():]
        batch = gen[b, ids.shape[1]:]
        assert torch.equal(batch[: solo.numel()], solo), (b, batch, solo)
        assert (batch[solo.numel():] == 0).all(), (b, batch, solo)  # only padding after an early stop


# ------------------------------------------------------------------------------------------- DSA
@pytest.fixture(params=list(BUILDERS))
def dsa_model(request, tmp_path, seed):
    model = BUILDERS[request.param](seed=seed % 10_000, index_n_heads=16, index_topk=TOPK)
    return save_and_reload(model, tmp_path)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_dsa_padded_rows_equal_solo(dsa_model, side, cfg):
    rows = [torch.randint(3, 256, (n,)) for n in DSA_LENGTHS]
    check_rows_equal_solo(dsa_model, logits_of(dsa_model), rows, side, CONFIGS[cfg])


def test_dsa_fused_stem_cut_gives_the_exact_paths_logits_on_a_padded_batch(tmp_path, seed, monkeypatch):
    """The GPU's Stem step (`stem_step(method="fused")`, one Triton pass; here under the interpreter)
    gives a padded batch the logits of the CPU's exact path, which the tests above hold to each
    row's solo run (the mass schedule's fused cut: tests/test_select.py)."""
    cfg = "tpd"
    import functools

    from stem_boost.adapters import dsa as dsa_adapter

    model = save_and_reload(BUILDERS["deepseek_v32"](seed=seed % 10_000, index_n_heads=16, index_topk=TOPK), tmp_path)
    ids, mask, pos = padded_batch([torch.randint(3, 256, (n,)) for n in DSA_LENGTHS], "left")
    stem_boost.wrap(model, **CONFIGS[cfg])
    exact = logits_of(model)(ids, mask, pos)
    exact_rows = [r["stem_pairs"] for r in stem_boost.stats(model)["rows"]]
    monkeypatch.setattr(dsa_adapter, "stem_step", functools.partial(dsa_adapter.stem_step, method="fused"))
    assert torch.equal(logits_of(model)(ids, mask, pos), exact)
    assert [r["stem_pairs"] for r in stem_boost.stats(model)["rows"]] == exact_rows


def test_dsa_generate_on_a_left_padded_batch_equals_solo_generation(tmp_path, seed):
    model = save_and_reload(BUILDERS["deepseek_v32"](seed=seed % 10_000, index_n_heads=16, index_topk=TOPK), tmp_path)
    check_generation_equals_solo(model, [torch.randint(3, 256, (n,)) for n in DSA_LENGTHS], CONFIGS["tpd"], 4)


# -------------------------------------------------------------------------------------- InfLLMv2
@pytest.fixture()
def minicpm(seed):
    return build_testbed(seed=seed % 10_000, num_hidden_layers=2).model


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("cfg", ["identity", "tpd", "mass", "tiles", "tiles_mass"])
def test_infllmv2_padded_rows_equal_solo(minicpm, side, cfg):
    rows = [torch.randint(1, 256, (n,)) for n in INF_LENGTHS]
    check_rows_equal_solo(minicpm, logits_of(minicpm), rows, side, INF_CONFIGS[cfg],
                          is_sparse=minicpm.config.infllmv2.is_sparse)


def test_infllmv2_generate_on_a_left_padded_batch_equals_solo_generation(minicpm):
    check_generation_equals_solo(minicpm, [torch.randint(1, 256, (n,)) for n in INF_LENGTHS], dict(reduce=0.18), 3)


def test_infllmv2_remote_modules_padded_rows_equal_solo(minicpm):
    remote = RemoteMiniCPMForCausalLM(minicpm.config).eval()
    remote.load_state_dict(minicpm.state_dict(), strict=False)
    if minicpm.config.tie_word_embeddings:
        remote.lm_head.weight = remote.model.embed_tokens.weight

    def run(ids, mask, pos):
        return remote(ids, attention_mask=mask, position_ids=pos)

    rows = [torch.randint(1, 256, (n,)) for n in INF_LENGTHS]
    check_rows_equal_solo(remote, run, rows, "left", CONFIGS["tpd"], is_sparse=minicpm.config.infllmv2.is_sparse)


# ------------------------------------------------------------------------------ the kernel path (GPU)
@pytest.mark.gpu
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("index_head_dim", [16, 32])  # the default indexer: bf16 scores; fp8 on FP8 GPUs
def test_dsa_padded_rows_equal_solo_on_the_kernel_path(tmp_path, seed, side, index_head_dim):
    """On CUDA the DSA prefill runs the absorbed-MLA Triton path and the default indexer dtype (FP8
    where the GPU and the head dim take it); padded rows still equal solo runs."""
    model = save_and_reload(BUILDERS["deepseek_v32"](seed=seed % 10_000, index_n_heads=16, index_topk=TOPK,
                                                     index_head_dim=index_head_dim), tmp_path).cuda()
    rows = [torch.randint(3, 256, (n,)) for n in DSA_LENGTHS]

    check_rows_equal_solo(model, logits_of(model, "cuda"), rows, side, CONFIGS["tpd"], atol=1e-3)


@pytest.mark.gpu
def test_infllmv2_padded_rows_equal_solo_on_the_kernel_path(seed):
    model = build_testbed(seed=seed % 10_000, num_hidden_layers=2, device="cuda").model
    rows = [torch.randint(1, 256, (n,)) for n in INF_LENGTHS]

    check_rows_equal_solo(model, logits_of(model, "cuda"), rows, "left", CONFIGS["tpd"], atol=1e-3,
                          is_sparse=model.config.infllmv2.is_sparse)
