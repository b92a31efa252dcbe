"""PTX qualifiers that Triton's language does not expose, added to one kernel's PTX while it compiles.

    with l2_prefetch_on_copies("_mla_token_ws_fwd", 256):
        kernel[grid](..., L2_PREFETCH=256)   # the launch that compiles this specialisation

`cp.async.cg.shared.global` copies become `cp.async.cg.shared.global.L2::256B`: on an L2 miss the
cache fetches the whole 256-byte-aligned piece around the copied 16 bytes from HBM in one request,
instead of the 32-byte sectors asked for. For gathered rows (a 1152-byte latent row read as 16-byte
pieces by many threads, some of its halves a quarter of a step later) that is fewer, larger DRAM
requests and the rest of the row already in L2 when its copies come.

Why this way. Gluon's `async_copy` emits the copy without a prefetch size and takes none; Triton's
compiler calls `knobs.runtime.add_stages_inspection_hook` with its stage table for every build, so
the hook wraps the PTX stage of the kernel named here, for the builds made inside the `with` only.
The kernel must carry the option as a constexpr (its cache key then differs from the build without
it, so a cached unpatched binary is never taken for a patched one, nor the reverse).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from typing import Callable, Iterator

import triton

__all__ = ["L2_PREFETCH_SIZES", "add_l2_prefetch", "l2_prefetch_on_copies", "patched_ptx"]

L2_PREFETCH_SIZES = (0, 64, 128, 256)  # bytes; 0: the copies as Triton emits them
# cp.async with 16 bytes that bypass L1, optionally with an L2 eviction-policy operand (.L2::cache_hint)
_CP_ASYNC_CG = re.compile(r"cp\.async\.cg\.shared\.global(\.L2::cache_hint)?(?=\s)")


def _check_prefetch_size(size: int) -> None:
    if size not in L2_PREFETCH_SIZES:
        raise ValueError(f"L2 prefetch size {size!r} not in {L2_PREFETCH_SIZES} (bytes)")


def add_l2_prefetch(ptx: str, size: int) -> str:
    """`ptx` with every `cp.async.cg.shared.global` copy given the `.L2::<size>B` prefetch size."""
    _check_prefetch_size(size)
    if size == 0:
        return ptx
    return _CP_ASYNC_CG.sub(lambda m: m.group(0) + f".L2::{size}B", ptx)


@contextlib.contextmanager
def patched_ptx(kernel_name: str, transform: Callable[[str], str], tag: str) -> Iterator[None]:
    """Inside the block, builds of the kernel named `kernel_name` pass their PTX through `transform`
    before ptxas; other kernels and builds outside the block are untouched. `tag` names the transform
    (Triton 3.9 and later put the hook's key into the cache key of builds made with it). Chains any
    hook already installed."""
    knobs = triton.knobs.runtime
    previous = knobs.add_stages_inspection_hook

    def hook(*args):
        if not args:  # Triton >= 3.9: the (key, hash) of the custom pipeline, for the cache key
            key = f"patched_ptx:{kernel_name}:{tag}"
            if previous is not None:
                key = f"{previous()[0]}|{key}"
            return key, hashlib.sha256(key.encode()).hexdigest()
        backend, stages, options, language, capability = args
        if previous is not None:
            previous(backend, stages, options, language, capability)
        make_ptx = stages.get("ptx")
        if make_ptx is None:  # a backend without a PTX stage (not NVIDIA): nothing to patch
            return

        def ptx_stage(src, metadata):
            ptx = make_ptx(src, metadata)
            return transform(ptx) if metadata.get("name") == kernel_name else ptx

        stages["ptx"] = ptx_stage

    knobs.add_stages_inspection_hook = hook
    try:
        yield
    finally:
        knobs.add_stages_inspection_hook = previous


def l2_prefetch_on_copies(kernel_name: str, size: int):
    """`patched_ptx` that gives the kernel's cp.async copies the `.L2::<size>B` prefetch size (0: no
    change, no hook). The size is checked here, before the launch, not only when a build runs the patch."""
    _check_prefetch_size(size)
    if size == 0:
        return contextlib.nullcontext()
    return patched_ptx(kernel_name, lambda ptx: add_l2_prefetch(ptx, size), f"L2::{size}B")
