"""The sparse-attention executors behind `sparse_attention(q, k, v, selection)`: the shared Triton
kernel, masked dense PyTorch, and the gather reference (the oracle)."""

from .dispatch import BACKENDS, HAS_TRITON, check_index_range, check_inputs, choose_executor, sparse_attention
from .masked import sparse_attention_masked
from .reference import sparse_attention_reference

__all__ = ["sparse_attention", "sparse_attention_reference", "sparse_attention_masked", "choose_executor",
           "check_inputs", "check_index_range", "BACKENDS", "HAS_TRITON"]
