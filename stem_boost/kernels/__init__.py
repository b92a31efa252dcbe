"""The shared sparse-attention kernel (Triton), its PyTorch reference and the CPU executors."""

from .reference import sparse_attention_reference
from .masked import sparse_attention_masked
from .dispatch import HAS_TRITON, check_index_range, check_inputs, sparse_attention, sparse_attention_cpu

__all__ = ["sparse_attention", "sparse_attention_reference", "sparse_attention_masked", "sparse_attention_cpu",
           "check_inputs", "check_index_range", "HAS_TRITON"]
