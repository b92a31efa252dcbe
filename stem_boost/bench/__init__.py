"""Benchmarks that `stem-boost bench` runs: `kernel` (the shared sparse-attention kernel against
dense SDPA, FlexAttention and masked SDPA, with a correctness check against the reference first).
"""
