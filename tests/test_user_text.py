"""The user's own text: perplexity.text / fidelity.text / tasks.haystack as a local file."""

from __future__ import annotations

import json
import random

import pytest

from stem_boost.eval import tasks as T
from stem_boost.eval.config import ConfigError, load_config
from stem_boost.eval.textfile import TextFileError, read_text_file


def _excerpt(seed: int, n_chars: int) -> str:
    """A random stretch of real English text (the built-in haystack)."""
    text = T.english_text()[0]
    start = random.Random(seed).randrange(0, len(text) - n_chars)
    return text[start:start + n_chars]


def test_plain_and_jsonl_files_read_back(tmp_path):
    seed = random.randrange(10**6)
    print(f"seed {seed}")
    rng = random.Random(seed)
    parts = [_excerpt(seed + i, rng.randrange(50, 500)) for i in range(rng.randrange(1, 6))]
    plain = tmp_path / "my.txt"
    plain.write_text(parts[0], encoding="utf-8")
    assert read_text_file(str(plain)) == parts[0]
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": p, "id": i}) for i, p in enumerate(parts)) + "\n\n")
    assert read_text_file(str(jsonl)) == "\n\n".join(parts)
    sniffed = tmp_path / "corpus.data"  # JSON objects with "text" on every line, whatever the name
    sniffed.write_text(jsonl.read_text())
    assert read_text_file(str(sniffed)) == "\n\n".join(parts)


@pytest.mark.parametrize("content, match", [
    (None, "is not a file"),
    ("", "is empty"),
    ("  \n\n ", "holds no text"),
    ('{"text": "a"}\n{"body": "b"}\n', "line 2 has no 'text' string field"),
])
def test_bad_files_name_the_path_and_what_is_needed(tmp_path, content, match):
    path = tmp_path / ("c.jsonl" if content and "{" in content else "my.txt")
    if content is not None:
        path.write_text(content)
    with pytest.raises(TextFileError, match=match) as e:
        read_text_file(str(path), "perplexity.text")
    assert str(path) in str(e.value) and "perplexity.text" in str(e.value)


def test_config_accepts_a_file_and_rejects_a_bad_one(tmp_path):
    f = tmp_path / "my.txt"
    f.write_text(_excerpt(random.randrange(1000), 3000))
    cfg = load_config("tiny_dsa", [f"perplexity.text={f}", f"tasks.haystack={f}", f"fidelity.text={f}"])
    assert cfg["perplexity"]["text"] == str(f) and cfg["tasks"]["haystack"] == str(f)
    with pytest.raises(ConfigError, match=r"perplexity\.text: '.*missing\.txt' is not a file"):
        load_config("tiny_dsa", [f"perplexity.text={tmp_path / 'missing.txt'}"])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ConfigError, match=r"tasks\.haystack: the file '.*empty\.txt' is empty"):
        load_config("tiny_dsa", [f"tasks.haystack={tmp_path / 'empty.txt'}"])
    with pytest.raises(ConfigError, match=r"'tasks\.haystack' has 'licenses'; allowed: english, or a file path"):
        load_config("tiny_dsa", ["tasks.haystack=licenses"])


def test_perplexity_on_the_users_file_equals_perplexity_of_its_tokens(tmp_path):
    """`--set perplexity.text=my.txt`: the run scores the file's first tokens, exactly as
    `perplexity` on those tokens does."""
    from stem_boost.eval.perplexity import perplexity
    from stem_boost.eval.runner import load_model, run

    seed = random.randrange(1000)
    print(f"seed {seed}")
    f = tmp_path / "my.txt"
    f.write_text(_excerpt(seed, 1200))
    sets = [f"perplexity.text={f}", "perplexity.length=300", "perplexity.window=128", "perplexity.stride=64",
            "modes=[native]", "tasks.enabled=false", "fidelity.enabled=false", "latency.enabled=false",
            f"model.options={{family: deepseek_v32, seed: {seed}, num_hidden_layers: 2}}", "runtime.progress=false"]
    cfg = load_config("tiny_dsa", sets)
    loaded = load_model(cfg)
    res = run(cfg, loaded)
    ids = loaded.tokenizer.encode(f.read_text())[:300]
    import stem_boost

    stem_boost.wrap(loaded.model, reduce=0.0, beta=0.0)
    want = perplexity(loaded.model, ids, window=128, stride=64)
    stem_boost.unwrap(loaded.model)
    got = res["perplexity"]["native"]
    assert got["n_tokens"] == want.n_tokens == 299 and got["n_windows"] == want.n_windows
    assert got["mean_nll"] == pytest.approx(want.mean_nll, rel=1e-6)

    short = tmp_path / "short.txt"
    short.write_text(_excerpt(seed, 100))
    n_short = len(loaded.tokenizer.encode(short.read_text()))  # 100 characters: >= 100 byte tokens (UTF-8)
    with pytest.raises(TextFileError, match=rf"perplexity\.text: the file '.*short\.txt' from character 0 has {n_short} "
                                            r"tokens; 300 are needed"):
        run(load_config("tiny_dsa", [*sets[1:], f"perplexity.text={short}"]), loaded)


def test_haystack_comes_from_the_users_file(tmp_path):
    seed = random.randrange(10**6)
    print(f"seed {seed}")
    text = " ".join(f"word{i}." for i in range(2000))  # a haystack no built-in text contains
    f = tmp_path / "hay.jsonl"
    f.write_text(json.dumps({"text": text}) + "\n")
    samples = T.generate_task("niah_single_2", 2048, 2, seed=seed, haystack=str(f))
    default = T.generate_task("niah_single_2", 2048, 2, seed=seed)
    for s, d in zip(samples, default):
        assert "word17." in s.input and "word17." not in d.input
        assert all(o in s.input for o in s.outputs)  # the needle is there
        assert s.n_tokens + s.tokens_to_generate <= 2048
    short = tmp_path / "short.txt"
    short.write_text(" ".join(f"w{i}." for i in range(100)))
    with pytest.raises(T.HaystackTooShort, match=r"tasks\.haystack: the file '.*short\.txt' \(100 words\) is "
                                                  r"shorter than the 2048-token window"):
        T.generate_task("niah_single_2", 2048, 1, seed=seed, haystack=str(short))
