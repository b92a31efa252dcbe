"""Configuration of the native MiniCPM-4 / MiniCPM-4.1 model (``model_type = "minicpm"``).

The fields, their names and their defaults are the ones the official remote code reads, so the
official ``config.json`` loads as it is (no ``trust_remote_code``):

- ``configuration_minicpm.py`` of the OpenBMB MiniCPM4 / MiniCPM4.1 Hugging Face repositories
  (read through the copy in ``LDLINGLINGLING/ParetoQ_for_MiniCPM4:models/configuration_minicpm.py``):
  ``vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
  num_attention_heads=32, num_key_value_heads=None (-> num_attention_heads), hidden_act="silu",
  max_position_embeddings=2048, initializer_range=0.02, rms_norm_eps=1e-6, use_cache=True,
  pad_token_id=None, bos_token_id=1, eos_token_id=2, pretraining_tp=1, tie_word_embeddings=True,
  rope_theta=10000.0, rope_scaling=None, attention_bias=False, attention_dropout=0.0,
  scale_emb=1, dim_model_base=1, scale_depth=1, mup_denominator=None, sparse_config=None``.
- ``sparse_config`` is read key by key with ``.get`` and these defaults in
  ``MiniCPMInfLLMv2Attention.__init__`` (MiniCPM4.1 / MiniCPM-SALA ``modeling_*.py``):
  ``kernel_size=32, kernel_stride=16, init_blocks=1, block_size=64, window_size=2048, topk=64,
  use_nope=False, dense_len=8192``. It is validated here (see
  :func:`stem_boost.models.minicpm4.infllmv2.InfLLMv2Params.from_sparse_config`).

The official MiniCPM4.1-8B values (``config.json`` of ``openbmb/MiniCPM4.1-8B``) are recorded in
``docs/infllmv2.md``.
"""

from __future__ import annotations

from typing import Any

from transformers.configuration_utils import PreTrainedConfig

from ...native.infllmv2 import InfLLMv2Params

__all__ = ["MiniCPM4Config"]


class MiniCPM4Config(PreTrainedConfig):
    r"""Configuration of :class:`~stem_boost.models.minicpm4.MiniCPM4ForCausalLM`.

    Same keys as the official ``MiniCPMConfig`` (``model_type="minicpm"``). Beyond the official
    keys, ``head_dim`` may be given (default ``hidden_size // num_attention_heads``, which is what
    the official code always uses).

    ``sparse_config`` (dict or ``None``) switches on InfLLMv2 sparse attention for sequences whose
    key length reaches ``sparse_config["dense_len"]`` (``-1``: always sparse). Invalid values raise
    ``ValueError`` when the config is built.
    """

    model_type = "minicpm"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pretraining_tp: int = 1
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    scale_emb: float = 1
    dim_model_base: float = 1
    scale_depth: float = 1
    mup_denominator: int | None = None
    sparse_config: dict | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                    f"({self.num_attention_heads}) when head_dim is not given"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        _check_rope_scaling(self.rope_scaling)
        # Validates sparse_config (raises ValueError with the offending key) and keeps it a plain
        # dict so that save_pretrained() writes it back unchanged.
        if self.sparse_config is not None:
            if not isinstance(self.sparse_config, dict):
                raise ValueError(f"sparse_config must be a dict or None, got {type(self.sparse_config).__name__}")
            InfLLMv2Params.from_sparse_config(self.sparse_config)
        super().__post_init__(**kwargs)

    @property
    def infllmv2(self) -> InfLLMv2Params | None:
        """The validated InfLLMv2 parameters, or ``None`` when ``sparse_config`` is ``None``."""
        return InfLLMv2Params.from_sparse_config(self.sparse_config)

    @property
    def logits_scaling(self) -> float:
        """The official LM head divides the hidden states by ``hidden_size / dim_model_base``."""
        return self.hidden_size / self.dim_model_base

    @property
    def residual_scaling(self) -> float:
        """Each residual branch is multiplied by ``scale_depth / sqrt(num_hidden_layers)``."""
        return self.scale_depth / self.num_hidden_layers**0.5


_ROPE_TYPES = ("default", "linear", "dynamic", "longrope")


def _check_rope_scaling(rope_scaling: dict | None) -> None:
    if rope_scaling is None:
        return
    if not isinstance(rope_scaling, dict):
        raise ValueError(f"rope_scaling must be a dict or None, got {type(rope_scaling).__name__}")
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if rope_type not in _ROPE_TYPES:
        raise ValueError(f"rope_scaling rope_type={rope_type!r} is not supported; allowed: {_ROPE_TYPES}")
    if rope_type == "longrope":
        for key in ("short_factor", "long_factor", "original_max_position_embeddings"):
            if key not in rope_scaling:
                raise ValueError(f"rope_scaling of type 'longrope' needs the key {key!r}")
    if rope_type in ("linear", "dynamic") and rope_scaling.get("factor") is None:
        raise ValueError(f"rope_scaling of type {rope_type!r} needs a 'factor'")
