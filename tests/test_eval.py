"""The evaluation suite: task generators and RULER scoring, LongBench loader and metrics,
perplexity, fidelity helpers, configs, and the uniform / no-OAM ablation schedules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import stem_boost
from stem_boost.eval import longbench as lb
from stem_boost.eval import tasks as T
from stem_boost.eval.config import ConfigError, load_config, packaged_configs
from stem_boost.eval.fidelity import capture, dense_mode, kl_divergence, layer_errors
from stem_boost.eval.perplexity import perplexity
from stem_boost.tpd import plan_budgets, plan_uniform, token_available
from tests.dsa_tiny import build_deepseek_v32

LENGTH = 2048  # bytes: every task fits (vt and cwe carry few-shot examples)


# ------------------------------------------------------------------ task generators
@pytest.mark.parametrize("task", list(T.TASKS))
def test_generators_are_deterministic_per_seed(task):
    a = T.generate_task(task, LENGTH, 2, seed=7, tokens_to_generate=16)
    b = T.generate_task(task, LENGTH, 2, seed=7, tokens_to_generate=16)
    c = T.generate_task(task, LENGTH, 2, seed=8, tokens_to_generate=16)
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    assert [s.prompt for s in a] != [s.prompt for s in c]
    assert a[0].outputs != a[1].outputs  # samples differ from each other
    assert T.generate_sample(task, LENGTH, 1, seed=7, tokens_to_generate=16).to_dict() == a[1].to_dict()


@pytest.mark.parametrize("task", list(T.TASKS))
def test_samples_fit_the_length_and_hold_their_answers(task):
    tok = T.ByteTokenizer()
    for s in T.generate_task(task, LENGTH, 2, tok, seed=3, tokens_to_generate=16):
        n = len(tok.encode(s.prompt))
        assert n == s.n_tokens and n + 16 <= LENGTH
        assert n + 16 >= 0.8 * LENGTH  # the binary search filled the haystack
        assert s.outputs and all(isinstance(o, str) and o for o in s.outputs)
        kind = T.TASKS[task][0]
        if kind == "niah":
            for value in s.outputs:
                assert f"is: {value}." in s.input
        elif kind == "variable_tracking":
            value = s.answer_prefix.split("the value ")[1].split(",")[0]
            chain = s.input.split(f"= {value}")[-2:]  # the task's own chain (after the example's)
            assert f"VAR {s.outputs[0]} = {value}" in s.input and chain
            for prev, cur in zip(s.outputs, s.outputs[1:]):
                assert f"VAR {cur} = VAR {prev}" in s.input
        else:  # common words: every gold word is more frequent in the task's list than any other word
            words = s.input.rsplit("Memorize the ones that appear most often.\n", 1)[1].split("\nQuestion")[0]
            counts = {}
            for w in words.split()[1::2]:
                counts[w] = counts.get(w, 0) + 1
            gold = min(counts[w] for w in s.outputs)
            assert all(c < gold for w, c in counts.items() if w not in s.outputs)


def test_task_too_long_for_the_length_is_an_error():
    with pytest.raises(ValueError, match="does not fit in 512 tokens"):
        T.generate_task("vt", 512, 1, seed=0)


def test_haystack_text_is_real_english():
    text, sources = T.english_text()
    assert len(text) > 100_000 and "pydoc_data.topics" in sources[0]
    assert " the " in text


# ------------------------------------------------------------------ RULER scoring
@pytest.mark.parametrize("task", list(T.TASKS))
def test_scorers_give_gold_100_and_wrong_0(task):
    samples = T.generate_task(task, LENGTH, 2, seed=11, tokens_to_generate=16)
    gold = [" " + ", ".join(s.outputs) + "." for s in samples]
    refs = [s.outputs for s in samples]
    assert T.string_match_all(gold, refs) == 100.0
    assert T.string_match_all(["I do not know."] * 2, refs) == 0.0
    for s, g in zip(samples, gold):
        assert T.score_sample(g, s.outputs, s.metric) == 1.0
        assert T.score_sample("\x00 nothing \x01", s.outputs, s.metric) == 0.0


def test_string_match_all_and_part_are_rulers():
    refs = [["apple", "PEAR", "plum"]]
    assert T.string_match_all(["Apple and pear"], refs) == 66.67  # fraction found, x100, 2 decimals
    assert T.string_match_part(["Apple and pear"], refs) == 100.0  # any found
    assert T.string_match_part(["banana"], refs) == 0.0
    assert T.string_match_all(["apple", "x"], [["apple"], ["y"]]) == 50.0
    assert T.postprocess_pred("  a\x00b\tc  ") == "a\nb\nc"


# ------------------------------------------------------------------ LongBench
def _lb_row(**overrides):
    row = dict(input="Who wrote it?", context="It was written by Ada Lovelace.", answers=["Ada Lovelace"], length=7,
               dataset="hotpotqa", language="en", all_classes=None, _id="x1")
    row.update(overrides)
    return row


def _write(path: Path, rows) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_longbench_loader_reads_the_published_format(tmp_path):
    f = _write(tmp_path / "hotpotqa.jsonl", [_lb_row(), _lb_row(_id="x2")])
    samples = lb.load_jsonl(f)
    assert [s._id for s in samples] == ["x1", "x2"] and samples[1].source.endswith("hotpotqa.jsonl:2")
    assert "Ada Lovelace" in lb.build_prompt(samples[0])
    assert list(lb.load_dir(tmp_path)) == ["hotpotqa"]


@pytest.mark.parametrize("bad, line, field", [
    ("{not json", 2, None),
    (_lb_row(answers="Ada"), 2, "answers"),
    (_lb_row(length="7"), 2, "length"),
    (_lb_row(all_classes="a"), 2, "all_classes"),
    ({k: v for k, v in _lb_row().items() if k != "context"}, 2, "context"),
    (_lb_row(answers=[]), 2, "answers"),
    ([1, 2], 2, None),
])
def test_longbench_loader_errors_name_file_line_and_field(tmp_path, bad, line, field):
    f = _write(tmp_path / "bad.jsonl", [_lb_row(), bad, _lb_row()])
    with pytest.raises(lb.LongBenchFormatError) as e:
        lb.load_jsonl(f)
    msg = str(e.value)
    assert f"{f}:{line}" in msg and e.value.line == line
    if field:
        assert f"'{field}'" in msg and e.value.field == field


def test_longbench_metrics_follow_longbench():
    assert lb.qa_f1_score("The Ada Lovelace.", "ada lovelace") == 1.0
    assert lb.qa_f1_score("Charles Babbage", "Ada Lovelace") == 0.0
    assert lb.qa_f1_score("Ada", "Ada Lovelace") == pytest.approx(2 / 3)
    assert lb.count_score("There are 12 paragraphs", "12") == 1.0
    assert lb.count_score("12 or 13", "12") == 0.5
    assert lb.retrieval_score("Paragraph 4", "Paragraph 4") == 1.0
    assert lb.retrieval_score("Paragraph 5", "Paragraph 4") == 0.0
    assert lb.code_sim_score("x = compute(a, b)\n", "x = compute(a, b)") == 1.0
    assert lb.code_sim_score("# comment\nreturn y", "return y") == 1.0
    assert lb.classification_score("Type: LOC", "LOC", all_classes=["LOC", "HUM", "NUM"]) == 1.0
    assert lb.classification_score("HUM", "LOC", all_classes=["LOC", "HUM", "NUM"]) == 0.0
    assert lb.classification_score("LOC or HUM", "LOC", all_classes=["LOC", "HUM"]) == 0.5
    # the scorer: first line only for trec/triviaqa/samsum/lsht, max over answers, x100 rounded
    assert lb.scorer("triviaqa", ["Paris\nLondon", "Rome"], [["paris"], ["Madrid", "rome"]]) == 100.0
    assert lb.scorer("hotpotqa", ["Ada", "nope"], [["Ada Lovelace"], ["yes"]]) == 33.33
    with pytest.raises(NotImplementedError, match="ROUGE"):
        lb.scorer("gov_report", ["x"], [["y"]])


# ------------------------------------------------------------------ perplexity and fidelity (tiny model)
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_deepseek_v32(seed=1, index_topk=8, index_n_heads=16)  # 16 heads: few exact score ties


def test_perplexity_single_and_sliding_windows(tiny):
    # dense: a prefix's NLL must not depend on the window's length (the native top-k may break
    # exact score ties differently for different lengths)
    with dense_mode(tiny):
        _check_windows(tiny)


def _check_windows(tiny):
    ids = torch.randint(3, 256, (96,))
    one = perplexity(tiny, ids, window=96)
    assert one.n_tokens == 95 and one.n_windows == 1
    assert math.isclose(one.ppl, math.exp(one.mean_nll))
    slid = perplexity(tiny, ids, window=40, stride=24)
    assert slid.n_tokens == 95  # every token after the first scored exactly once
    assert torch.allclose(slid.nll[:39], one.nll[:39], atol=1e-5)  # the first window is the same prefix
    whole = perplexity(tiny, ids, window=96, stride=96)
    assert torch.allclose(whole.nll, one.nll, atol=1e-6)
    with_bos = perplexity(tiny, ids, window=41, stride=20, bos_id=1)
    assert with_bos.n_tokens == 96  # the BOS is context only, every text token is scored


def test_fidelity_dense_native_and_kl(tiny):
    ids = torch.randint(3, 256, (1, 64))
    topk = [m.indexer.index_topk for m in (layer.self_attn for layer in tiny.model.layers)]
    with dense_mode(tiny):
        dense = capture(tiny, ids)
        dense2 = capture(tiny, ids)
    assert [m.indexer.index_topk for m in (layer.self_attn for layer in tiny.model.layers)] == topk  # restored
    native = capture(tiny, ids)
    assert layer_errors(dense2, dense) == [0.0] * len(dense.attn)
    assert kl_divergence(dense, dense2) == pytest.approx(0.0, abs=1e-7)
    assert min(layer_errors(native, dense)) > 0  # top-8 of 64 keys is not dense
    assert kl_divergence(dense, native) > 0
    stem_boost.wrap(tiny, reduce=0.0, beta=0.0)
    try:
        wrapped = capture(tiny, ids)
        with pytest.raises(ValueError, match="unwrapped"):
            with dense_mode(tiny):
                pass
    finally:
        stem_boost.unwrap(tiny)
    assert kl_divergence(native, wrapped) < 1e-3  # the identity wrap is the native selection
    few = capture(tiny, ids, max_rows=10)
    assert few.rows.numel() == 10 and int(few.rows[-1]) == 63


# ------------------------------------------------------------------ ablation schedules
@pytest.mark.parametrize("seq_len, k", [(1024, 64), (4096, 64), (16384, 2048), (2048, 16), (300, 128)])
@pytest.mark.parametrize("reduce", [0.15, 0.3])
def test_uniform_schedule_equal_rows_same_total_as_tpd(seq_len, k, reduce):
    avail = token_available(seq_len)
    tpd = plan_budgets(avail, k, reduce)
    uni = plan_uniform(avail, k, reduce)
    assert abs(uni.stem_pairs - tpd.stem_pairs) <= 0.01 * tpd.stem_pairs
    assert uni.native_pairs == tpd.native_pairs
    after = uni.budgets[avail >= k]  # rows past the stem: the same budget (integer dithering: +-1)
    assert int(after.max()) - int(after.min()) <= 1
    assert abs(after.double().mean().item() - uni.alpha * k) < 0.02 * k
    # no position trend: the first and the second half of the rows keep the same mean budget
    half = after.numel() // 2
    assert abs(after[:half].double().mean() - after[half:].double().mean()) < 0.05
    # TPD, by contrast, decays
    tpd_after = tpd.budgets[avail >= k]
    assert int(tpd_after[0]) > int(tpd_after[-1]) + 1
    # inside the stem the uniform rows keep the same fraction of their (smaller) native budget
    inside = (avail < k) & (avail >= 8)
    ratio = uni.budgets[inside].double() / avail[inside].double()
    assert (ratio - uni.alpha).abs().max() <= 1 / 8 + 1e-9


def test_uniform_and_no_oam_modes_on_a_wrapped_model():
    model = build_deepseek_v32(seed=2, index_topk=16)
    ids = torch.randint(3, 256, (1, 256))
    out = {}
    for name, kw in {"stem": dict(reduce=0.15), "uniform": dict(reduce=0.15, schedule="uniform"),
                     "no_oam": dict(reduce=0.15, beta=0.0)}.items():
        stem_boost.wrap(model, **kw)
        with torch.no_grad():
            model(ids)
        # copies: the LayerStats objects are updated in place by the next forward
        out[name] = (stem_boost.stats(model), [list(s.budget_stem) for s in stem_boost.layer_stats(model)])
        assert stem_boost.stats(model)["config"]["schedule"] == kw.get("schedule", "tpd")
    stem_boost.unwrap(model)
    tpd_pairs = out["stem"][0]["stem_pairs"]
    assert abs(out["uniform"][0]["stem_pairs"] - tpd_pairs) <= 0.01 * tpd_pairs
    assert out["no_oam"][0]["stem_pairs"] == tpd_pairs  # OAM changes which keys, not how many
    for uniform, tpd in zip(out["uniform"][1], out["stem"][1]):
        assert max(uniform[16:]) - min(uniform[16:]) <= 1  # rows past the stem: equal (+-1 dither)
        assert tpd[16] - tpd[-1] >= 3  # TPD decays from 16 to ~0.7 * 16
    with pytest.raises(ValueError, match="schedule"):
        stem_boost.StemConfig(schedule="linear")


# ------------------------------------------------------------------ configs
def test_packaged_configs_load_by_name_and_by_path():
    shipped = packaged_configs()
    assert {"tiny_dsa", "deepseek_v32", "minicpm4", "smollm2"} <= set(shipped)
    for name, path in shipped.items():
        cfg = load_config(path)
        assert cfg["name"] == name
    assert load_config()["name"] == "smollm2_cpu"  # the embedded default: the real-weights testbed
    assert load_config()["model"]["testbed"] == "smollm2"
    assert load_config("configs/deepseek_v32.yaml")["model"]["source"] == "local"  # a packaged config by its old path
    assert load_config("stem_boost/configs/deepseek_v32.yaml")["model"]["source"] == "local"


def test_unknown_config_keys_name_the_key_and_the_file(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("name: x\ntasks:\n  lenghts: [1024]\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "tasks.lenghts" in str(e.value) and str(f) in str(e.value)
    f.write_text("name: x\nmodle: {}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'modle'"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"--set stem\.betta=0\.1: unknown key 'stem\.betta'"):
        load_config(None, ["stem.betta=0.1"])
    with pytest.raises(ConfigError, match=r"'tasks.samples' must be int"):
        load_config(None, ["tasks.samples=two"])
    with pytest.raises(ConfigError, match=r"'modes' has 'sparse'"):
        load_config(None, ["modes=[native,sparse]"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_config_overrides_are_yaml_values():
    cfg = load_config(None, ["tasks.lengths=[512, 1024]", "stem.reduce=0.3", "model.options={seed: 3}",
                             "perplexity.stride=null"])
    assert cfg["tasks"]["lengths"] == [512, 1024]
    assert cfg["stem"]["reduce"] == [0.3]
    assert cfg["model"]["options"] == {"seed": 3}
    assert cfg["_overrides"][0] == "tasks.lengths=[512, 1024]"


def test_tile_tokens_reaches_the_stem_modes_only():
    """`stem.tile_tokens` goes to every mode that changes the selection, never to native (which must stay
    the native selection); bad values name the key."""
    from stem_boost.eval.runner import build_modes

    cfg = load_config("tiny_minicpm4", ["stem.tile_tokens=1", "modes=[native, stem, mass]"])
    kws = {m.name: m.wrap_kwargs(cfg["stem"]) for m in build_modes(cfg)}
    assert "tile_tokens" not in kws["native"] and kws["stem"]["tile_tokens"] == 1 and kws["mass"]["tile_tokens"] == 1
    assert load_config("tiny_minicpm4")["stem"]["tile_tokens"] == "auto"
    for bad in ("0", "four", "true"):
        with pytest.raises(ConfigError, match="stem.tile_tokens"):
            load_config("tiny_minicpm4", [f"stem.tile_tokens={bad}"])


def test_report_without_the_fidelity_run_says_so(tmp_path):
    from stem_boost.eval.report import write_report
    from stem_boost.eval.runner import run

    cfg = load_config("tiny_minicpm4", ["modes=[native, stem]", "tasks.enabled=false", "perplexity.length=256",
                                        "fidelity.enabled=false", "latency.enabled=false", "runtime.progress=false"])
    write_report(run(cfg), tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "None tokens" not in text and "fidelity run (budget, KL, attention error) is disabled" in text


def test_modes_per_reduce_value():
    from stem_boost.eval.runner import build_modes

    cfg = load_config("tiny_dsa", ["stem.reduce=[0.15, 0.3]", "modes=[stem, native, no_oam]"])
    modes = build_modes(cfg)
    assert [m.name for m in modes] == ["native", "stem@0.15", "no_oam@0.15", "stem@0.3", "no_oam@0.3"]
    kw = modes[2].wrap_kwargs(cfg["stem"])
    assert kw["beta"] == 0.0 and kw["reduce"] == 0.15 and kw["schedule"] == "tpd"
    assert modes[0].wrap_kwargs(cfg["stem"])["reduce"] == 0.0
    single = build_modes(load_config())
    assert [m.name for m in single] == ["dense", "native", "stem", "uniform", "no_oam", "mass", "mass_cal"]
    assert single[3].wrap_kwargs(load_config()["stem"])["schedule"] == "uniform"
    assert single[5].wrap_kwargs(load_config()["stem"])["schedule"] == "mass"


@pytest.mark.parametrize("topk", [6, 4096])
def test_infllmv2_dense_pairs_are_counted_in_the_contracts_unit(topk):
    """The report's dense row for InfLLMv2 counts (token, non-forced block) pairs per kv head, as the
    native / Stem rows do: equal to native when the native top-k takes every block, above it otherwise."""
    from stem_boost.eval import fidelity as fid
    from stem_boost.eval.runner import Mode, _pairs
    from stem_boost.testbeds.tiny_minicpm4 import build_testbed

    model = build_testbed(seed=int(torch.randint(0, 1000, (1,))), num_hidden_layers=2,
                          sparse_config=dict(topk=topk)).model
    S = 700
    with fid.dense_mode(model):
        dense, _ = _pairs(model, Mode("dense", "dense"), S, 2)
    stem_boost.wrap(model, reduce=0.0, beta=0.0)
    with torch.no_grad():
        model(torch.randint(0, 256, (1, S)))
    native = stem_boost.stats(model)["native_pairs"]
    stem_boost.unwrap(model)
    assert dense == native if topk == 4096 else dense > native


def test_calibrated_modes_measure_their_allocation_and_keep_the_contract(tmp_path):
    """`stem-boost compare` with mass_cal / stem_cal: each mode's per-layer allocation is calibrated on
    the calibration text (mean = reduce), the run attends reduce fewer pairs model-wide, each layer
    cuts about its own fraction, and the report plots the allocation."""
    from stem_boost.eval.report import write_report
    from stem_boost.eval.runner import Mode, run

    seed = int(torch.randint(0, 100, (1,)))
    cfg = load_config("tiny_dsa", ["modes=[native, mass_cal, stem_cal]", "tasks.enabled=false", "perplexity.length=256",
                                   "fidelity.length=256", "fidelity.max_rows=256", "latency.enabled=false",
                                   "calibration.lengths=[256]", f"model.options={{family: deepseek_v32, seed: {seed}}}",
                                   "runtime.progress=false"])
    res = run(cfg)
    assert set(res["calibration"]) == {"mass_cal", "stem_cal"}
    for name, cal in res["calibration"].items():
        lr = cal["layer_reduce"]
        assert abs(sum(lr) / len(lr) - 0.15) < 1e-9 and len(set(lr)) > 1, (name, lr)
        assert cal["text"] == "pydoc_train" and cal["lengths"] == [256]
        assert abs(res["summary"][name]["reduce_achieved"] - 0.15) < 0.02
        for layer, want in zip(res["budget"][name]["layers"], lr):
            assert abs(layer["reduce_achieved"] - want) < 0.05, (name, layer["reduce_achieved"], want)
    files = write_report(res, tmp_path)
    assert (tmp_path / "layer_allocation.png").stat().st_size > 0 and files
    with pytest.raises(ValueError, match="mode mass_cal: its per-layer allocation is not calibrated"):
        Mode("mass_cal", "mass_cal", 0.15).wrap_kwargs(cfg["stem"])


def test_calibration_config_is_validated():
    with pytest.raises(ConfigError, match="calibration.windows"):
        load_config("tiny_dsa", ["calibration.windows=0"])
    with pytest.raises(ConfigError, match="calibration.text"):
        load_config("tiny_dsa", ["calibration.text=pydoc_heldout"])
    with pytest.raises(ConfigError, match="calibration.objective"):
        load_config("tiny_dsa", ["calibration.objective=loss"])


def test_budget_table_is_one_row_per_mode_with_layer_mean_min_max():
    """The report's budget section: one row per mode; the per-layer reduction and alpha as mean /
    min / max over the layers, the pairs summed (oracle: the same numbers computed here)."""
    from stem_boost.eval.report import budget_row, fmt

    seed = int(torch.randint(0, 10**6, (1,)))
    print(f"seed {seed}")
    g = torch.Generator().manual_seed(seed)
    n_layers = int(torch.randint(2, 40, (1,), generator=g))
    native = torch.randint(1000, 5000, (n_layers,), generator=g)
    kept = (native * torch.rand(n_layers, generator=g)).long()
    alpha = torch.rand(n_layers, generator=g).tolist()
    layers = [dict(layer=i, native_pairs=int(n), stem_pairs=int(k), reduce_achieved=1 - int(k) / int(n), alpha=a)
              for i, (n, k, a) in enumerate(zip(native, kept, alpha))]
    red = [s["reduce_achieved"] for s in layers]
    row = budget_row("stem", layers)
    assert row[:3] == ["stem", str(int(native.sum())), str(int(kept.sum()))]
    assert row[3] == fmt(1 - int(kept.sum()) / int(native.sum()), "pct")
    assert row[4] == " / ".join(fmt(v, "pct") for v in (sum(red) / n_layers, min(red), max(red)))
    assert row[5] == " / ".join(fmt(v, "ratio") for v in (sum(alpha) / n_layers, min(alpha), max(alpha)))
    assert budget_row("dense", [dict(layers[0], alpha=None)])[5] == "–"
