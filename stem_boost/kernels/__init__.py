"""The shared sparse-attention kernel (Triton) and its PyTorch reference."""

from .reference import sparse_attention_reference
from .dispatch import HAS_TRITON, check_index_range, check_inputs, sparse_attention

__all__ = ["sparse_attention", "sparse_attention_reference", "check_inputs", "check_index_range", "HAS_TRITON"]
