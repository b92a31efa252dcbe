"""Native MiniCPM-4 / MiniCPM-4.1 (``model_type = "minicpm"``) with InfLLMv2 sparse attention.

Importing this package registers the model with ``AutoConfig`` / ``AutoModel`` /
``AutoModelForCausalLM`` (transformers 5.17 has no ``"minicpm"`` type of its own). If another
``"minicpm"`` class is already registered, registration is skipped with a warning and
:func:`load_minicpm4` / ``MiniCPM4ForCausalLM.from_pretrained`` still load the official folder.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from .configuration_minicpm4 import MiniCPM4Config
from ...native.infllmv2 import (
    MINICPM41_SPARSE_CONFIG,
    BlockScores,
    BlockSelection,
    InfLLMv2Params,
    infllmv2_select,
    infllmv2_sparse_attention,
    iter_block_scores,
    topk_blocks,
)
from .modeling_minicpm4 import MiniCPM4Attention, MiniCPM4ForCausalLM, MiniCPM4Model, MiniCPM4PreTrainedModel

logger = logging.getLogger(__name__)

__all__ = [
    "MINICPM41_SPARSE_CONFIG",
    "BlockScores",
    "BlockSelection",
    "InfLLMv2Params",
    "MiniCPM4Attention",
    "MiniCPM4Config",
    "MiniCPM4ForCausalLM",
    "MiniCPM4Model",
    "MiniCPM4PreTrainedModel",
    "infllmv2_select",
    "infllmv2_sparse_attention",
    "iter_block_scores",
    "load_minicpm4",
    "register_minicpm4",
    "topk_blocks",
]


def register_minicpm4() -> bool:
    """Register ``"minicpm"`` -> MiniCPM4Config / MiniCPM4Model / MiniCPM4ForCausalLM with the Auto classes.

    Returns True when the Auto classes resolve to these classes afterwards, False when another
    ``"minicpm"`` registration was already there (it is left alone).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        existing = CONFIG_MAPPING[MiniCPM4Config.model_type]
    except KeyError:
        existing = None
    if existing is not None and existing is not MiniCPM4Config:
        logger.warning(
            "model_type %r is already registered to %s.%s; not overriding it. Load MiniCPM-4 checkpoints with "
            "stem_boost.models.minicpm4.load_minicpm4(path) or MiniCPM4ForCausalLM.from_pretrained(path).",
            MiniCPM4Config.model_type, existing.__module__, existing.__name__,
        )
        return False
    if existing is None:
        AutoConfig.register(MiniCPM4Config.model_type, MiniCPM4Config)
    AutoModel.register(MiniCPM4Config, MiniCPM4Model, exist_ok=True)
    AutoModelForCausalLM.register(MiniCPM4Config, MiniCPM4ForCausalLM, exist_ok=True)
    return True


def load_minicpm4(path: str | os.PathLike, **kwargs: Any) -> MiniCPM4ForCausalLM:
    """Load an official MiniCPM-4 / 4.1 folder (``config.json`` + safetensors) without remote code.

    ``kwargs`` go to ``from_pretrained`` (``dtype=``, ``device_map=``, ...), except the MiniCPM
    config keys (``sparse_config=``, ``rope_scaling=``, ...), which override ``config.json`` and are
    validated like it (``sparse_config=None`` makes the model dense).
    """
    config_keys = set(MiniCPM4Config.__annotations__)
    overrides = {key: kwargs.pop(key) for key in list(kwargs) if key in config_keys}
    config_dict, _ = MiniCPM4Config.get_config_dict(path)
    config_dict.update(overrides)
    config = MiniCPM4Config.from_dict(config_dict)
    return MiniCPM4ForCausalLM.from_pretrained(path, config=config, **kwargs)


REGISTERED = register_minicpm4()
