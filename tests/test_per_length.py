"""The per-length tables of `stem-boost compare` (the SmolLM2 tables): `perplexity.lengths` (the
perplexity text in windows of exactly L tokens, checked against a direct next-token NLL of the
same windows), `fidelity.lengths` (next-token KL per length) and the held-out text they use."""

from __future__ import annotations

import random

import pytest
import torch

from stem_boost.eval.config import ConfigError, load_config
from stem_boost.eval.report import write_report
from stem_boost.eval.runner import Mode, length_windows, load_model, run, use_mode
from stem_boost.eval.tasks import text_source


@pytest.mark.parametrize("bos", [[], [7]])
def test_length_windows_are_consecutive_and_exactly_long(bos):
    seed = random.randrange(10_000)
    print(f"seed {seed}")
    rng = random.Random(seed)
    ids = [rng.randrange(3, 256) for _ in range(rng.randrange(50, 400))]
    L = rng.randrange(8, 48)
    wins = length_windows(ids, L, bos)
    body = L - len(bos)
    assert len(wins) == len(ids) // body
    for i, w in enumerate(wins):
        assert len(w.seq) == L and list(w.seq) == bos + ids[i * body:(i + 1) * body]


def test_per_length_perplexity_is_the_nll_of_those_windows(tmp_path):
    seed = random.randrange(10_000)
    print(f"seed {seed}")
    cfg = load_config("tiny_dsa", ["modes=[dense, native, stem]", "tasks.enabled=false", "fidelity.enabled=false",
                                   "latency.enabled=false", "perplexity.length=300", "perplexity.lengths=[64, 128]",
                                   f"model.options={{family: deepseek_v32, seed: {seed}, num_hidden_layers: 2}}",
                                   "runtime.progress=false"])
    loaded = load_model(cfg)
    res = run(cfg, loaded)
    by_length = res["perplexity_by_length"]
    assert set(by_length) == {"dense", "native", "stem"} and set(by_length["dense"]) == {"64", "128"}
    text_ids = loaded.tokenizer.encode(text_source("english")[:4000])[:300]  # the perplexity text (bytes)
    model = loaded.model
    for L, n_windows in ((64, 300 // 64), (128, 300 // 128)):
        nll = []
        with use_mode(model, Mode("dense", "dense"), cfg["stem"]), torch.no_grad():
            for i in range(n_windows):
                x = torch.tensor([text_ids[i * L:(i + 1) * L]])
                lp = model(input_ids=x, use_cache=False).logits.float().log_softmax(-1)
                nll.append(-lp[0, :-1].gather(-1, x[0, 1:, None]).squeeze(-1))
        got = by_length["dense"][str(L)]
        assert got["n_windows"] == n_windows and got["n_tokens"] == n_windows * (L - 1)
        assert got["mean_nll"] == pytest.approx(float(torch.cat(nll).mean()), rel=1e-4)
    write_report(res, tmp_path)
    md = (tmp_path / "report.md").read_text()
    part = md.split("## Perplexity by length\n", 1)[1]
    rows = [ln for ln in part.splitlines() if ln.startswith("| 64 ") or ln.startswith("| 128 ")]
    assert len(rows) == 2 and all("%)" in r for r in rows)


def test_lengths_longer_than_the_text_are_an_error():
    with pytest.raises(ConfigError, match="perplexity.lengths"):
        load_config("tiny_dsa", ["perplexity.length=256", "perplexity.lengths=[512]"])


def test_heldout_text_holds_no_training_topic():
    """The "heldout" text (the SmolLM2 tables' perplexity text) holds every held-out pydoc topic and
    none of the topics the indexer was trained on (topics of 200+ characters, which are unique)."""
    from stem_boost.text.corpus import HOLDOUT_EVERY, pydoc_topics

    stream = text_source("heldout")
    for i, (name, text) in enumerate(pydoc_topics()):
        if len(text) < 200:
            continue
        held = i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
        assert (text in stream) == held, (name, held)


def test_kl_by_length_matches_the_fidelity_run_and_stays_in_its_bundle(tmp_path):
    """`fidelity.lengths`: per length, KL against dense / native of the fidelity text cut to L
    tokens; at L = fidelity.length it is the main fidelity run's KL; the references are exact (0);
    on several processes every fidelity unit stays on one rank with the references."""
    from stem_boost.eval.runner import Inputs, build_modes, plan_units, split_units

    seed = random.randrange(10_000)
    print(f"seed {seed}")
    cfg = load_config("tiny_dsa", ["modes=[dense, native, stem]", "tasks.enabled=false", "perplexity.enabled=false",
                                   "latency.enabled=false", "fidelity.length=256", "fidelity.max_rows=256",
                                   "fidelity.lengths=[128, 256]", "runtime.progress=false",
                                   f"model.options={{family: deepseek_v32, seed: {seed}, num_hidden_layers: 2}}"])
    res = run(cfg)
    kl = res["fidelity_by_length"]
    assert set(kl) == {"dense", "native", "stem"} and set(kl["stem"]) == {"128", "256"}
    assert kl["dense"]["128"]["kl_vs_dense"] == pytest.approx(0.0, abs=1e-9)
    assert kl["native"]["256"]["kl_vs_native"] == pytest.approx(0.0, abs=1e-9)
    assert kl["stem"]["128"]["kl_vs_native"] > 0
    for ref in ("dense", "native"):
        assert kl["stem"]["256"][f"kl_vs_{ref}"] == pytest.approx(res["fidelity"][f"kl_vs_{ref}"]["stem"], rel=1e-6)
    write_report(res, tmp_path)
    part = (tmp_path / "report.md").read_text().split("## Next-token KL by length\n", 1)[1]
    assert sum(ln.startswith(("| 128 ", "| 256 ")) for ln in part.splitlines()) == 2

    inp = Inputs(task_sets=[], ppl_windows=[], ppl_meta={}, fid_ids=torch.zeros(256, dtype=torch.long), lat_ids={},
                 lb_sets={}, bos=[], fid_by_length={L: torch.zeros(L, dtype=torch.long) for L in (128, 256)})
    units = plan_units(build_modes(cfg), inp, cfg)
    assert sum(u.kind == "fidelity_length" for u in units) == 6
    ranks = split_units(units, 3)
    assert len({r for u, r in zip(units, ranks) if u.kind.startswith("fidelity")}) == 1
