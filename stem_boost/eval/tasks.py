"""RULER-style synthetic long-context tasks, generated in code, seeded and reproducible.

Source followed: NVIDIA RULER (Hsieh et al., 2024), ``scripts/synthetic.yaml`` (the task table),
``scripts/data/synthetic/constants.py`` (templates and answer prefixes),
``scripts/data/synthetic/{niah,variable_tracking,common_words_extraction}.py`` (generators and the
binary search for the haystack size) and ``scripts/eval/synthetic/constants.py`` (the metrics
``string_match_all`` / ``string_match_part``), read from the copy vendored in THUDM/LongBench
(``RULER/scripts/...``, commit 1fc6f41). What differs, and why:

- Haystack ("essay"): RULER uses Paul Graham's essays (a download). Here: real English text that
  ships with Python (``pydoc_data.topics``, the language reference's help topics) followed by
  Debian's ``/usr/share/common-licenses`` texts when present; if neither exists, the docstrings of
  a few standard-library modules (see `english_text`). Like RULER, every sample's haystack is the
  start of that text, cut to the size found by the binary search.
- Sentences are split with a regular expression (RULER: ``nltk.sent_tokenize``).
- Needle keys ("words"): adjective-noun pairs from a built-in list (RULER: the ``wonderwords``
  lists); common-words extraction draws its words from the haystack text's vocabulary.
- Randomness: one ``random.Random`` per sample, seeded by ``"{seed}:{task}:{length}:{index}"``
  (RULER: one global seed per run), so a sample never depends on which other samples were drawn.
- ``tokens_to_generate`` defaults to RULER's per-task value and may be lowered for small models;
  like RULER, a sample's ``length`` counts the prompt tokens plus ``tokens_to_generate`` and never
  exceeds the requested length.

The prompt a model sees is ``sample.input + sample.answer_prefix`` (RULER's "base" template).
The RULER QA tasks (qa_1 / qa_2) need SQuAD / HotpotQA and are not generated; their metric,
`string_match_part`, is provided for QA-style data.
"""

from __future__ import annotations

import functools
import re
import string
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from random import Random

from .textfile import TextFileError, read_text_file
from ..text.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer  # noqa: F401  (re-exported)

__all__ = [
    "TASKS",
    "TaskSample",
    "ByteTokenizer",
    "HFTokenizer",
    "english_text",
    "haystack_sources",
    "is_named_source",
    "text_source",
    "HaystackTooShort",
    "generate_task",
    "generate_sample",
    "postprocess_pred",
    "score_sample",
    "string_match_all",
    "string_match_part",
]

# ------------------------------------------------------------------ RULER constants
# scripts/data/synthetic/constants.py
TEMPLATES = {
    "niah": dict(
        tokens_to_generate=128,
        template=("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
                  "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
                  "{type_needle_v} for {query} mentioned in the provided text?"),
        answer_prefix=" The special magic {type_needle_v} for {query} mentioned in the provided text are",
    ),
    "variable_tracking": dict(
        tokens_to_generate=30,
        template=("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
                  "Question: Find all variables that are assigned the value {query} in the text above."),
        answer_prefix=(" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
                       "are assigned the value {query}, they are: "),
    ),
    "common_words_extraction": dict(
        tokens_to_generate=120,
        template=("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
                  "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above "
                  "list?"),
        answer_prefix=" Answer: The top 10 words that appear most often in the list are:",
    ),
}

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
# np.round(np.linspace(0, 100, num=40)).astype(int): the needle depths (percent of the sentences)
DEPTHS = [round(100 * i / 39) for i in range(40)]

# scripts/synthetic.yaml (the essay haystack is this module's English text, see the docstring)
TASKS: dict[str, tuple[str, dict]] = {
    "niah_single_1": ("niah", dict(type_haystack="noise", type_needle_k="words", type_needle_v="numbers",
                                   num_needle_k=1, num_needle_v=1, num_needle_q=1)),
    "niah_single_2": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers",
                                   num_needle_k=1, num_needle_v=1, num_needle_q=1)),
    "niah_single_3": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="uuids",
                                   num_needle_k=1, num_needle_v=1, num_needle_q=1)),
    "niah_multikey_1": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers",
                                     num_needle_k=4, num_needle_v=1, num_needle_q=1)),
    "niah_multikey_2": ("niah", dict(type_haystack="needle", type_needle_k="words", type_needle_v="numbers",
                                     num_needle_k=1, num_needle_v=1, num_needle_q=1)),
    "niah_multikey_3": ("niah", dict(type_haystack="needle", type_needle_k="uuids", type_needle_v="uuids",
                                     num_needle_k=1, num_needle_v=1, num_needle_q=1)),
    "niah_multivalue": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers",
                                     num_needle_k=1, num_needle_v=4, num_needle_q=1)),
    "niah_multiquery": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers",
                                     num_needle_k=1, num_needle_v=1, num_needle_q=4)),
    "vt": ("variable_tracking", dict(type_haystack="noise", num_chains=1, num_hops=4, fewshot=True)),
    "cwe": ("common_words_extraction", dict(freq_cw=30, freq_ucw=3, num_cw=10, num_fewshot=1)),
}

# scripts/eval/synthetic/constants.py: every synthetic task is scored with string_match_all,
# the QA tasks with string_match_part.
TASK_METRIC = {"niah": "string_match_all", "variable_tracking": "string_match_all",
               "common_words_extraction": "string_match_all", "qa": "string_match_part"}

# Needle keys of type "words": adjective-noun (RULER: wonderwords adjectives x nouns).
_ADJECTIVES = (
    "able ancient angry bitter black bold brave bright broad busy calm careful cheap clean clever cold cool "
    "crazy curious damp dark deep direct dry eager early easy empty equal exact fair famous fancy fast fierce "
    "flat fresh friendly funny gentle giant glad golden grand great green happy hard heavy hidden hollow honest "
    "huge humble hungry icy jolly kind large lazy light little lively lonely loud lucky mad modern narrow neat "
    "nervous noble odd old orange pale plain polite poor proud purple quick quiet rapid rare red rich rough "
    "round royal rude sad safe scarlet sharp shiny short shy silent silver simple slow small smooth soft solid "
    "sour spicy steep sticky strange strong sudden sweet swift tall tame tender thick thin tidy tiny tough "
    "ugly vast warm weak wet white wide wild wise wooden young"
).split()
_NOUNS = (
    "anchor apple arrow badge bakery banana basket beach bear bell bicycle bird blanket boat bottle bridge "
    "brush bucket butter button cabin camera candle canoe carpet castle cat chair cheese cherry chess cloud "
    "coach coat coffee comet compass cookie copper cotton crayon crown cup curtain daisy desk diamond dolphin "
    "dragon drum eagle engine feather fence fiddle flag flower forest fountain fox garden garlic ginger glove "
    "goat guitar hammer harbor helmet honey horse island jacket jelly kettle kite ladder lamp lemon library "
    "lion magnet mango maple marble meadow mirror monkey mountain needle nest ocean olive onion orchard otter "
    "owl paddle painter panda pepper piano pillow pirate planet pocket pony potato puzzle quilt rabbit radio "
    "river robot rocket saddle sailor salmon scarf shadow shell ship shovel spider spoon squirrel star statue "
    "sugar sweater table teapot tiger tomato tower tractor train trumpet tulip turtle umbrella valley violin "
    "wagon wallet whale whistle window wizard wolf zebra"
).split()
_KEY_WORDS = sorted({f"{a}-{n}" for a in _ADJECTIVES for n in _NOUNS})


# ------------------------------------------------------------------ the haystack text
_FALLBACK_MODULES = ("os", "re", "json", "random", "collections", "itertools", "functools", "pathlib",
                     "argparse", "subprocess", "threading", "logging", "string", "textwrap", "datetime")


@functools.lru_cache(maxsize=1)
def english_text() -> tuple[str, tuple[str, ...]]:
    """Real English text that needs no download: ``(text, sources)``.

    ``pydoc_data.topics`` (the help topics of the Python language reference, ~460K characters,
    in sorted topic order), then the regular files of ``/usr/share/common-licenses`` (Debian) in
    name order, when present. If neither is available, the docstrings of a few standard-library
    modules.
    """
    parts, sources = [], []
    try:
        from pydoc_data.topics import topics

        parts.extend(topics[k] for k in sorted(topics))
        sources.append("pydoc_data.topics")
    except ImportError:
        pass
    lic = Path("/usr/share/common-licenses")
    if lic.is_dir():
        seen = set()
        names = []
        for p in sorted(lic.iterdir()):
            real = p.resolve()
            if p.is_file() and real not in seen:
                seen.add(real)
                try:
                    parts.append(p.read_text(encoding="utf-8", errors="replace"))
                    names.append(p.name)
                except OSError:
                    continue
        if names:
            sources.append(f"/usr/share/common-licenses ({', '.join(names)})")
    if not parts:
        import importlib

        for name in _FALLBACK_MODULES:
            doc = importlib.import_module(name).__doc__
            if doc:
                parts.append(doc)
        sources.append("standard-library docstrings (" + ", ".join(_FALLBACK_MODULES) + ")")
    return "\n\n".join(parts), tuple(sources)


TEXT_SOURCES = ("english", "pydoc_heldout", "licenses", "heldout")
CALIBRATION_TEXTS = ("pydoc_train", "english")  # "pydoc_train": the pydoc topics that are not held out


def is_named_source(name: str) -> bool:
    """True for the built-in texts (`TEXT_SOURCES`, `CALIBRATION_TEXTS`); anything else is a file path."""
    return name in TEXT_SOURCES or name in CALIBRATION_TEXTS


def text_source(name: str, key: str = "text") -> str:
    """Text for perplexity / fidelity / the haystack: "english" (`english_text`), or the held-out
    parts of it that the SmolLM2 testbed's indexer was not trained on (`stem_boost.text.corpus`):
    "pydoc_heldout" (every 5th pydoc topic), "licenses" (Debian's license texts) and "heldout" (both); for
    calibration, "pydoc_train" (the other pydoc topics). Any other value is the path of the user's
    own file (`textfile.read_text_file`: plain text or JSONL with a "text" field); ``key`` names
    the config key in its errors."""
    if not is_named_source(name):
        return read_text_file(name, key)
    if name == "english":
        return english_text()[0]
    if name == "pydoc_train":  # calibration text (the *_cal modes): never the evaluation's
        from ..text.corpus import pydoc_split

        return pydoc_split()[0]
    if name not in TEXT_SOURCES:
        raise ValueError(f"text source {name!r}; allowed: {', '.join(TEXT_SOURCES + CALIBRATION_TEXTS[:1])}")
    from ..text.corpus import heldout_stream, heldout_texts

    texts = dict(heldout_texts(), heldout=heldout_stream())
    if name not in texts:
        raise ValueError(f"text source {name!r} is not available on this machine (no /usr/share/common-licenses)")
    return texts[name]


HAYSTACK_KEY = "tasks.haystack"


class HaystackTooShort(TextFileError):
    """The user's haystack file has fewer words than a sample needs (the built-in text is repeated
    instead, as before; a user's file never is)."""


def haystack_sources(haystack: str = "english") -> list[str]:
    """Where the haystack text comes from, for the report."""
    return list(english_text()[1]) if haystack == "english" else [haystack]


@functools.lru_cache(maxsize=4)
def _essay_words(haystack: str = "english") -> tuple[str, ...]:
    text = english_text()[0] if haystack == "english" else text_source(haystack, HAYSTACK_KEY)
    return tuple(re.sub(r"\s+", " ", text).strip().split(" "))


@functools.lru_cache(maxsize=4)
def _vocabulary(haystack: str = "english") -> tuple[str, ...]:
    """The common-words pool: the distinct lower-case words (3-12 letters) of the haystack text
    (~3,600 in the built-in English text)."""
    text = english_text()[0] if haystack == "english" else text_source(haystack, HAYSTACK_KEY)
    return tuple(sorted(set(re.findall(r"(?<![\w'-])[a-z]{3,12}(?![\w'-])", text))))


_SENT_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (split after ., ! or ? followed by white space)."""
    return [s for s in _SENT_END.split(text.strip()) if s]


# ------------------------------------------------------------------ samples
@dataclass
class TaskSample:
    """One generated sample. The model is given ``input + answer_prefix`` and should continue with
    the answers in ``outputs``."""

    task: str
    length: int  # requested length (prompt + tokens_to_generate), in tokens of the tokenizer
    index: int
    seed: int
    input: str
    answer_prefix: str
    outputs: list[str]
    n_tokens: int  # tokens of input + answer_prefix
    tokens_to_generate: int
    metric: str
    extra: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return self.input + self.answer_prefix

    def to_dict(self) -> dict:
        return asdict(self)


def _rand_number(rng: Random, num_digits: int = 7) -> str:
    return str(rng.randint(10 ** (num_digits - 1), 10**num_digits - 1))


def _rand(rng: Random, kind: str) -> str:
    if kind == "numbers":
        return _rand_number(rng)
    if kind == "words":
        return rng.choice(_KEY_WORDS)
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"needle type {kind!r}; allowed: numbers, words, uuids")


def _essay(n_words: int, haystack: str = "english") -> str:
    words = _essay_words(haystack)
    if n_words > len(words):
        if haystack != "english":
            raise HaystackTooShort(f"{HAYSTACK_KEY}: the file {haystack!r} has {len(words)} words; a sample "
                                   f"needs {n_words} (give a longer text or lower tasks.lengths)")
        words = words * (-(-n_words // len(words)))
    return " ".join(words[:n_words])


def _niah(rng: Random, size: int, type_haystack: str, type_needle_k: str, type_needle_v: str,
          num_needle_k: int, num_needle_v: int, num_needle_q: int, haystack: str = "english") -> tuple[str, str, list[str]]:
    num_needle_k = max(num_needle_k, num_needle_q)
    keys, values, needles = [], [], []
    for _ in range(num_needle_k):
        keys.append(_rand(rng, type_needle_k))
        value = []
        for _ in range(num_needle_v):
            value.append(_rand(rng, type_needle_v))
            needles.append(NEEDLE.format(type_needle_v=type_needle_v, key=keys[-1], value=value[-1]))
        values.append(value)
    rng.shuffle(needles)

    if type_haystack == "essay":
        sents = split_sentences(_essay(size, haystack))
        cuts = [0] + sorted(int(len(sents) * d / 100) for d in rng.sample(DEPTHS, len(needles))) + [len(sents)]
        pieces = []
        for i in range(1, len(cuts)):
            pieces.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
            if i - 1 < len(needles):
                pieces.append(needles[i - 1])
        context = " ".join(pieces)
    else:
        if type_haystack == "noise":
            sentences = [NOISE] * size
        elif type_haystack == "needle":
            sentences = [NEEDLE.format(type_needle_v=type_needle_v, key=_rand(rng, type_needle_k),
                                       value=_rand(rng, type_needle_v)) for _ in range(size)]
        else:
            raise ValueError(f"type_haystack={type_haystack!r}; allowed: noise, essay, needle")
        for index, needle in zip(sorted(rng.sample(range(size), len(needles)), reverse=True), needles):
            sentences.insert(index, needle)
        context = "\n".join(sentences)

    picked = rng.sample(range(num_needle_k), num_needle_q)
    queries = [keys[i] for i in picked]
    answers = [a for i in picked for a in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]

    t = TEMPLATES["niah"]
    template, prefix, type_v = t["template"], t["answer_prefix"], type_needle_v
    if num_needle_q * num_needle_v == 1:  # RULER's singular rewrite of the template
        def singular(s: str) -> str:
            return s.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")

        template, prefix, type_v = singular(template), singular(prefix), type_needle_v[:-1]
    return (template.format(type_needle_v=type_v, context=context, query=query),
            prefix.format(type_needle_v=type_v, query=query), answers)


def _vt_chains(rng: Random, num_chains: int, num_hops: int, is_icl: bool):
    k = 3 if is_icl else 5
    num_hops = min(10, num_hops) if is_icl else num_hops
    names = ["".join(rng.choices(string.ascii_uppercase, k=k)) for _ in range((num_hops + 1) * num_chains)]
    while len(set(names) - {"VAR"}) < num_chains * (num_hops + 1):
        names.append("".join(rng.choices(string.ascii_uppercase, k=k)))
    # RULER keeps duplicates (and could draw "VAR"); unique names keep the gold unambiguous
    names = [n for n in dict.fromkeys(names) if n != "VAR"]
    var_sets, chains = [], []
    for i in range(0, num_chains * (num_hops + 1), num_hops + 1):
        v = names[i:i + num_hops + 1]
        var_sets.append(v)
        chain = [f"VAR {v[0]} = {12345 if is_icl else rng.randint(10000, 99998)}"]
        chain += [f"VAR {v[j + 1]} = VAR {v[j]} " for j in range(num_hops)]
        chains.append(chain)
    return var_sets, chains


def _vt_one(rng: Random, size: int, num_chains: int, num_hops: int, is_icl: bool) -> tuple[str, str, list[str]]:
    var_sets, chains = _vt_chains(rng, num_chains, num_hops, is_icl)
    value = chains[0][0].split("=")[-1].strip()
    sentences = [NOISE] * size
    for chain in chains:
        positions = sorted(rng.sample(range(len(sentences)), len(chain)))
        for j, pos in enumerate(positions):
            sentences.insert(pos + j, chain[j])
    context = "\n".join(sentences).replace(". \n", ".\n")
    t = TEMPLATES["variable_tracking"]
    return (t["template"].format(context=context, query=value),
            t["answer_prefix"].format(num_v=num_hops + 1, query=value), var_sets[0])


def _vt(rng: Random, size: int, type_haystack: str, num_chains: int, num_hops: int, fewshot: bool,
        icl: str | None = None) -> tuple[str, str, list[str]]:
    if type_haystack != "noise":
        raise ValueError("variable tracking supports type_haystack='noise' only")
    inp, prefix, answer = _vt_one(rng, size, num_chains, num_hops, is_icl=False)
    if fewshot and icl:
        # RULER: the one-shot example (answers included, names and value re-drawn) precedes the task.
        example = icl
        for name in icl.strip().split()[-num_hops - 1:]:
            example = example.replace(name, "".join(rng.choices(string.ascii_uppercase, k=len(name))))
        example = example.replace("12345", str(rng.randint(10000, 99998)))
        inp = example + "\n" + inp
    return inp, prefix, answer


def _vt_icl(seed: int, num_chains: int, num_hops: int) -> str:
    """RULER's one-shot example: a short is_icl chain (value 12345, 3-letter names) in 5 noise
    sentences, followed by its answer."""
    inp, prefix, answer = _vt_one(Random(f"{seed}:vt-icl"), 5, num_chains, num_hops, is_icl=True)
    return inp + prefix + " " + " ".join(answer) + "\n"


def _cwe_example(rng: Random, num_words: int, common_repeats: int, uncommon_repeats: int, num_cw: int,
                 haystack: str = "english"):
    pool = _vocabulary(haystack)
    if num_words > len(pool):  # RULER likewise switches to a larger word list for long samples
        pool = pool + tuple(_KEY_WORDS)
    words = rng.sample(pool, num_words)
    common, uncommon = words[:num_cw], words[num_cw:]
    word_list = common * common_repeats + uncommon * uncommon_repeats
    rng.shuffle(word_list)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(word_list)), common


def _cwe(rng: Random, size: int, freq_cw: int, freq_ucw: int, num_cw: int, num_fewshot: int,
         long_form: bool, haystack: str = "english") -> tuple[str, str, list[str]]:
    t = TEMPLATES["common_words_extraction"]
    full = t["template"] + t["answer_prefix"]
    shots = []
    for _ in range(num_fewshot):
        ctx, ans = (_cwe_example(rng, 40, 10, 3, num_cw, haystack) if long_form
                    else _cwe_example(rng, 20, 3, 1, num_cw, haystack))
        shots.append(full.format(context=ctx) + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ans)))
    ctx, answer = (_cwe_example(rng, size, freq_cw, freq_ucw, num_cw, haystack) if long_form
                   else _cwe_example(rng, size, 6, 1, num_cw, haystack))
    inp = "\n".join(shots) + "\n" + t["template"].format(context=ctx)
    return inp, t["answer_prefix"], answer


# Smallest haystack unit count each generator accepts, and RULER's step when a sample is too long.
_MIN_SIZE = {"niah": 4, "variable_tracking": 5, "common_words_extraction": 11}
_STEP = {"niah": 25, "variable_tracking": 5, "common_words_extraction": 10}


def _make(task: str, size: int, rng: Random, seed: int, long_form: bool,
          haystack: str = "english") -> tuple[str, str, list[str]]:
    kind, args = TASKS[task]
    if kind == "niah":
        return _niah(rng, size, haystack=haystack, **args)
    if kind == "variable_tracking":
        icl = _vt_icl(seed, args["num_chains"], args["num_hops"]) if args["fewshot"] else None
        return _vt(rng, size, icl=icl, **args)
    if kind == "common_words_extraction":
        return _cwe(rng, size, long_form=long_form, haystack=haystack, **args)
    raise ValueError(kind)


def _rng(seed: int, task: str, length: int, index: int) -> Random:
    return Random(f"{seed}:{task}:{length}:{index}")


def _count(tokenizer: Tokenizer, inp: str, prefix: str) -> int:
    return len(tokenizer.encode(inp + prefix))


def _min_tokens(task: str, length: int, tokenizer: Tokenizer, seed: int, long_form: bool, haystack: str) -> int:
    inp, prefix, _ = _make(task, _MIN_SIZE[TASKS[task][0]], _rng(seed, task, length, 0), seed, long_form, haystack)
    return _count(tokenizer, inp, prefix)


def _essay_cap(task: str, haystack: str) -> int | None:
    """The most words a sample of ``task`` may take from the user's haystack file (None: no cap)."""
    kind, args = TASKS[task]
    if haystack == "english" or kind != "niah" or args["type_haystack"] != "essay":
        return None
    return len(_essay_words(haystack))


def _fit_size(task: str, length: int, tokenizer: Tokenizer, seed: int, budget: int,
              haystack: str = "english") -> tuple[int, bool]:
    """RULER's binary search: the largest haystack size whose sample 0 fits ``budget`` tokens.

    Also returns the common-words form: RULER uses the long form (30 / 3 repeats, a 40-word
    example) from 4096 tokens on; here only when it fits (a byte tokenizer needs ~4x the tokens).
    A user's haystack file too short to fill ``budget`` raises `HaystackTooShort`.
    """
    kind, _ = TASKS[task]
    lo = _MIN_SIZE[kind]
    long_form = kind == "common_words_extraction" and length >= 4096
    n_min = _min_tokens(task, length, tokenizer, seed, long_form, haystack)
    if n_min > budget and long_form:
        long_form = False
        n_min = _min_tokens(task, length, tokenizer, seed, long_form, haystack)
    if n_min > budget:
        raise ValueError(f"task {task!r} does not fit in {length} tokens with this tokenizer "
                         f"({n_min} prompt tokens at the smallest haystack, {budget} available)")
    cap = _essay_cap(task, haystack)
    if cap is not None and cap < lo:
        raise HaystackTooShort(f"{HAYSTACK_KEY}: the file {haystack!r} has {cap} words; at least {lo} are needed")
    probe = max(lo * 8, 64) if cap is None else max(lo + 1, min(max(lo * 8, 64), cap))
    inp, prefix, _ = _make(task, probe, _rng(seed, task, length, 0), seed, long_form, haystack)
    per_unit = max((_count(tokenizer, inp, prefix) - n_min) / max(probe - lo, 1), 1e-3)
    hi = max(lo, int(lo + (budget - n_min) / per_unit * 1.5) + 1)
    if cap is not None:
        hi = min(hi, cap)
    best = lo
    while lo <= hi:
        mid = (lo + hi) // 2
        inp, prefix, _ = _make(task, mid, _rng(seed, task, length, 0), seed, long_form, haystack)
        if _count(tokenizer, inp, prefix) <= budget:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    if cap is not None and best == cap:
        raise HaystackTooShort(f"{HAYSTACK_KEY}: the file {haystack!r} ({cap} words) is shorter than the "
                               f"{length}-token window of task {task!r}; a longer text is needed")
    return best, long_form


def generate_task(task: str, length: int, num_samples: int, tokenizer: Tokenizer | None = None, *,
                  seed: int = 42, tokens_to_generate: int | None = None,
                  haystack: str = "english") -> list[TaskSample]:
    """``num_samples`` samples of ``task`` (a key of `TASKS`) whose prompt plus
    ``tokens_to_generate`` (default: RULER's value for the task) fits ``length`` tokens of
    ``tokenizer`` (default: bytes). Deterministic in (task, length, index, seed, tokenizer, haystack).
    ``haystack``: "english" (the built-in text) or the path of the user's own text file (plain
    text or JSONL with a "text" field; the essay haystack and the common-words vocabulary).

    Raises ValueError when the task cannot fit ``length`` at all (the message gives the minimum),
    `HaystackTooShort` when the user's file cannot fill it.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; available: {', '.join(TASKS)}")
    tokenizer = tokenizer or ByteTokenizer()
    kind, _ = TASKS[task]
    gen = TEMPLATES[kind]["tokens_to_generate"] if tokens_to_generate is None else int(tokens_to_generate)
    budget = int(length) - gen
    size, long_form = _fit_size(task, length, tokenizer, seed, budget, haystack)
    out = []
    for index in range(num_samples):
        used = size
        while True:
            inp, prefix, answer = _make(task, used, _rng(seed, task, length, index), seed, long_form, haystack)
            n = _count(tokenizer, inp, prefix)
            if n <= budget or used <= _MIN_SIZE[kind]:
                break
            used = max(_MIN_SIZE[kind], used - _STEP[kind])
        if n > budget:
            raise ValueError(f"task {task!r} sample {index} does not fit in {length} tokens ({n + gen})")
        out.append(TaskSample(task=task, length=int(length), index=index, seed=seed, input=inp,
                              answer_prefix=prefix, outputs=list(answer), n_tokens=n, tokens_to_generate=gen,
                              metric=TASK_METRIC[kind], extra={"haystack_size": used, "long_form": long_form}))
    return out


def generate_sample(task: str, length: int, index: int, tokenizer: Tokenizer | None = None, *,
                    seed: int = 42, tokens_to_generate: int | None = None, haystack: str = "english") -> TaskSample:
    """Sample ``index`` of `generate_task` (the same text as in the full list)."""
    return generate_task(task, length, index + 1, tokenizer, seed=seed, tokens_to_generate=tokens_to_generate,
                         haystack=haystack)[index]


# ------------------------------------------------------------------ scoring (RULER's own)
_NON_PRINTABLE = re.compile(r"[\x00-\x1f]")


def postprocess_pred(pred: str) -> str:
    """RULER's ``postprocess_pred``: strip, control characters -> newline, strip."""
    return _NON_PRINTABLE.sub("\n", pred.strip()).strip()


def string_match_all(preds: list[str], refs: list[list[str]]) -> float:
    """RULER: mean over samples of the fraction of gold strings found (case-insensitive substring)
    in the prediction, x 100, rounded to 2 decimals."""
    score = sum(sum(1.0 if r.lower() in p.lower() else 0.0 for r in ref) / len(ref)
                for p, ref in zip(preds, refs)) / len(preds) * 100
    return round(score, 2)


def string_match_part(preds: list[str], refs: list[list[str]]) -> float:
    """RULER (QA tasks): mean over samples of 1 if any gold string is found in the prediction,
    x 100, rounded to 2 decimals."""
    score = sum(max(1.0 if r.lower() in p.lower() else 0.0 for r in ref)
                for p, ref in zip(preds, refs)) / len(preds) * 100
    return round(score, 2)


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}


def score_sample(pred: str, outputs: list[str], metric: str = "string_match_all") -> float:
    """One sample's score in [0, 1] under RULER's metric (after RULER's post-processing)."""
    return METRICS[metric]([postprocess_pred(pred)], [outputs]) / 100.0

