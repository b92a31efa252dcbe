"""Gluon names that changed between the Triton releases we support (3.6 .. 3.9), resolved once at import.

    async_load         cp.async from a pointer tensor into shared memory (`async_copy_global_to_shared` in 3.6)
    cta_barrier        a barrier of the program's (or, inside `warp_specialize`, the partition's) threads
                       (`thread_barrier` in 3.6, `barrier` from 3.7)
    tma_load           a TMA copy of a tensor descriptor's box into shared memory, completing on an mbarrier
                       (`tma.async_copy_global_to_shared` in 3.6, `tma.async_load` from 3.9)
    PUBLIC_REINTERPRET True where a shared-memory view with another shape is `reinterpret` (3.7 on), False
                       where it is `_reinterpret` (3.6): pass it to a kernel as a constexpr

Only the module attribute is looked up here: naming a removed function inside a `@gluon.jit` body fails
even in a branch that is never taken.
"""

from __future__ import annotations

from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import tma

__all__ = ["async_load", "cta_barrier", "tma_load", "PUBLIC_REINTERPRET"]

async_load = getattr(cp, "async_load", None) or cp.async_copy_global_to_shared
cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
PUBLIC_REINTERPRET = hasattr(gl.shared_memory_descriptor, "reinterpret")
