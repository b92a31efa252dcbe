"""Stem's cut taken chunk by chunk inside the DSA indexer's loop (`boost.ChunkedCut`, the adapter's
`CUT_PLACE`) keeps exactly the selection of the one cut after the loop (`boost.stem_step`), on random
candidate lists and through a whole wrapped tiny DSA model (Triton interpreter on the CPU)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import random

import pytest
import torch

import stem_boost
from stem_boost.kernels import HAS_TRITON
from tests.dsa_tiny import BUILDERS, save_and_reload

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")


def ascending_candidates(B: int, S: int, K: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S, K] lists as the Triton top-k writes them: row s holds min(K, offset + s + 1) distinct keys
    of 0..offset + s, ascending, then -1; scores [B, S, K] with ties, -inf after the count."""
    cand = torch.full((B, S, K), -1, dtype=torch.int32)
    for b in range(B):
        for s in range(S):
            n = min(K, offset + s + 1)
            cand[b, s, :n] = torch.randperm(offset + s + 1)[:n].sort().values.int()
    scores = torch.round(torch.randn(B, S, K) * 4) / 4  # coarse values: ties at the budget edge
    return cand, torch.where(cand >= 0, scores, float("-inf"))


@pytest.mark.parametrize("schedule,beta,offset", [("tpd", 0.2, 0), ("uniform", 0.2, 7), ("tpd", 0.0, 3)])
def test_chunked_cut_equals_the_cut_after_the_loop(schedule, beta, offset, seed):
    """Random chunkings of the rows, ascending (the GPU's top-k) or not (the CPU's sort), give the
    idx and counts of `stem_step(method="fused")`, and the same plans."""
    from stem_boost.boost import ChunkedCut, stem_step
    from stem_boost.config import StemConfig
    from stem_boost.selection import Selection

    rng = random.Random(seed)
    B, S, K = 2, 48, 16
    T = offset + S
    cfg = StemConfig(reduce=0.3, schedule=schedule, beta=beta)
    cand, scores = ascending_candidates(B, S, K, offset)
    norms = torch.rand(B, 1, T) * 3 + 0.05
    native = Selection.from_padded(cand[:, None], q_offset=offset)
    want, want_plans = stem_step(native, scores[:, None], norms, K, cfg, seq_k=T, method="fused",
                                 candidates_ascending=True)
    for ascending in (True, False):
        cut = ChunkedCut(B, S, K, offset, T, K, cfg, norms, "cpu")
        bounds = sorted(rng.sample(range(1, S), 3)) + [S]
        s0 = 0
        for s1 in bounds:
            c, sc = cand[:, s0:s1], scores[:, s0:s1]
            if not ascending:  # the same lists in another order (by descending score, as torch.topk gives)
                order = torch.argsort(torch.where(c >= 0, sc, float("-inf")), dim=-1, descending=True, stable=True)
                c, sc = c.gather(-1, order), sc.gather(-1, order)
            cut(s0, s1, c, sc, ascending)
            s0 = s1
        got, plans = cut.result(native)
        assert torch.equal(got.counts, want.counts) and torch.equal(got.idx, want.idx), (ascending, bounds)
        assert torch.equal(plans.budgets, want_plans.budgets)
        assert got.q_offset == native.q_offset


def test_chunked_cut_names_what_it_refuses():
    from stem_boost.boost import ChunkedCut
    from stem_boost.config import StemConfig
    from stem_boost.selection import Selection

    B, S, K = 1, 20, 8
    cand, scores = ascending_candidates(B, S, K, 0)
    with pytest.raises(ValueError, match="schedule='mass'"):
        ChunkedCut(B, S, K, 0, S, K, StemConfig(reduce=0.2, schedule="mass"), None, "cpu")
    cut = ChunkedCut(B, S, K, 0, S, K, StemConfig(reduce=0.2), torch.rand(B, 1, S) + 0.1, "cpu")
    with pytest.raises(ValueError, match=r"rows \[0, 30\)"):
        cut(0, 30, cand, scores, True)
    cut(0, 12, cand[:, :12], scores[:, :12], True)
    with pytest.raises(ValueError, match=r"8 of 20\) were never cut"):
        cut.result(Selection.from_padded(cand[:, None], q_offset=0))
    with pytest.raises(ValueError, match="key_norms must be"):
        ChunkedCut(B, S, K, 0, S, K, StemConfig(reduce=0.2), torch.rand(B, 1, S + 1), "cpu")


@pytest.mark.parametrize("family", list(BUILDERS))
def test_wrapped_model_cuts_inside_the_indexer_loop_as_after_it(family, tmp_path, monkeypatch):
    """A wrapped tiny DSA model with several indexer chunks: the cut inside the loop ("chunks") gives
    the selections, logits and pair counts of the cut after it ("after"); a padded batch, a layer
    without its own indexer and the "mass" schedule keep the cut after the loop."""
    from stem_boost.adapters import dsa
    from stem_boost.boost import ChunkedCut

    model = save_and_reload(BUILDERS[family](seed=int(torch.randint(0, 10_000, (1,))), index_n_heads=16,
                                             index_topk=16), tmp_path)
    ids = torch.randint(3, 256, (2, 64))
    # 16 indexer heads x 64 keys x 4 bytes x ~20 rows: chunks of about 20 query rows
    stem_boost.wrap(model, reduce=0.15, keep_selections=True, indexer_max_bytes=16 * 64 * 4 * 20)
    results = {}
    calls = []
    real_call = ChunkedCut.__call__
    monkeypatch.setattr(ChunkedCut, "__call__", lambda self, s0, s1, *a: (calls.append((s0, s1)),
                                                                          real_call(self, s0, s1, *a))[1])
    for place in ("after", "chunks"):
        monkeypatch.setattr(dsa, "CUT_PLACE", place)
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
        results[place] = (logits, stem_boost.last_selections(model), stem_boost.stats(model)["stem_pairs"])
    n_layers = model.config.num_hidden_layers
    assert len(calls) >= 2 * n_layers and {s1 for _, s1 in calls} >= {64}, calls  # several chunks a layer
    (want, want_sel, want_pairs), (got, got_sel, got_pairs) = results["after"], results["chunks"]
    assert got_pairs == want_pairs
    for a, b in zip(want_sel, got_sel):
        assert torch.equal(a.counts, b.counts) and torch.equal(a.idx, b.idx)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    calls.clear()  # padding: the cut after the loop, the same selection as before for the real tokens
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        model(ids, attention_mask=mask, use_cache=False)
    assert not calls
    with pytest.raises(ValueError, match="CUT_PLACE='inside'"):
        dsa.cuts_by_chunk(model._stem_wrap.modules[0]._stem.cfg, torch.zeros(1, 4, 8), None, True, place="inside")
