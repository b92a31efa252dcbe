"""Ahead-of-time builds: compile the Triton kernels for a GPU architecture on a machine without a GPU.

Inside `compile_only(arch=90)`, every `kernel[grid](...)` launch made by the host wrappers (with CPU
tensors) compiles the kernel for that architecture — the same specialisation and constexprs a GPU
launch would build — and returns without running it. Each build is recorded as a `KernelBuild`:
registers, spill bytes, shared memory and ptxas's performance notes (C7514: every wgmma of a loop
serialised), the tensor-core and TMA instructions in its PTX, and the compile time. This catches what the CPU interpreter cannot (a constexpr the interpreter
accepts and the compiler rejects, register spills, a dot that falls back to Ampere MMA on Hopper) on
CI machines. Outputs of a compile-only launch are left uninitialised: call each host wrapper on its
own, never on another's results.

    with compile_only(90) as builds:
        block_union_attention(q, k, v, idx, counts, block_size=64, use_tma=True)
    print(builds[0].registers, builds[0].spill_bytes, builds[0].wgmma)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterator

__all__ = ["KernelBuild", "compile_only", "compiling", "ptxas_performance_notes", "resident_warps"]

_ACTIVE = False


def compiling() -> bool:
    """True inside `compile_only`: host wrappers may take their GPU paths with CPU tensors."""
    return _ACTIVE


@dataclass
class KernelBuild:
    """One kernel specialisation compiled for `arch` (sm_XX)."""

    name: str
    arch: int
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 0
    num_stages: int = 0
    shared_bytes: int = 0
    registers: int = 0
    spill_bytes: int = 0  # spill stores + loads (ptxas -v); 0 for a healthy kernel
    wgmma: int = 0  # Hopper warp-group MMA instructions in the PTX
    tcgen05: int = 0  # Blackwell tensor-core MMA instructions (sm_100)
    mma_sync: int = 0  # Ampere-style MMA (what a dot falls back to when WGMMA cannot be used)
    tma: int = 0  # bulk tensor copies (TMA loads / stores)
    # ptxas's "Potential Performance Loss" notes by code, e.g. C7514: wgmma.mma_async serialised because other
    # instructions touch a product's accumulator registers while it runs (a wait after every wgmma)
    ptxas_notes: tuple[str, ...] = ()
    seconds: float = 0.0
    code_hash: str = ""  # the PTX without debug lines: equal hashes = the same machine code (refactors)
    asm: dict | None = field(default=None, repr=False)  # {"ttgir": ..., "ptx": ...} with compile_only(keep_asm=True)
    cubin: bytes | None = field(default=None, repr=False)  # the machine code Triton built, with keep_asm

    @property
    def warps_per_sm(self) -> int:
        """Warps of this kernel resident on one SM (64K registers, the arch's shared memory, 64 warps,
        32 blocks per SM): latency-bound kernels need many, tensor-core tiles few."""
        return resident_warps(self.registers, self.num_warps, self.shared_bytes,
                              smem_per_sm=SHARED_PER_SM.get(self.arch, 228 * 1024))

    def row(self) -> dict:
        keys = ("name", "num_warps", "num_stages", "registers", "spill_bytes", "shared_bytes", "wgmma", "tcgen05",
                "mma_sync", "tma", "seconds", "code_hash")
        return ({k: getattr(self, k) for k in keys} | {"warps_per_sm": self.warps_per_sm}
                | {"ptxas_notes": list(self.ptxas_notes)})


#: shared memory per SM by compute capability x10 (the CUDA occupancy tables); others: Hopper's
SHARED_PER_SM = {80: 164 * 1024, 86: 100 * 1024, 89: 100 * 1024, 90: 228 * 1024, 100: 228 * 1024}


def resident_warps(registers: int, num_warps: int, shared_bytes: int, *, regs_per_sm: int = 65536,
                   smem_per_sm: int = 228 * 1024, max_warps: int = 64, max_blocks: int = 32) -> int:
    """Warps resident on one SM for a block of `num_warps` warps (defaults: sm_90). Registers are
    allocated per warp in units of 256 (per thread rounded up to 8); each block reserves 1 KB of
    shared memory."""
    if registers <= 0 or num_warps <= 0:
        return 0
    per_warp = -(-(-(-registers // 8) * 8 * 32) // 256) * 256
    blocks = min(regs_per_sm // (per_warp * num_warps), max_warps // num_warps, max_blocks)
    if shared_bytes > 0:
        blocks = min(blocks, smem_per_sm // (shared_bytes + 1024))
    return blocks * num_warps


class _CompileOnlyDriver:
    """The three driver calls a JIT launch makes before it compiles, answered for a GPU that is absent."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        return self.target


def _code_hash(ptx: str) -> str:
    """sha256 (16 hex digits) of the PTX instructions: debug locations and labels, DWARF sections and
    comments dropped, so moving source lines does not change it. Folding code into an inlined
    helper may reorder instructions (a new hash for the same registers and instruction counts)."""
    code = ptx.split("\t.section\t.debug", 1)[0]  # the DWARF sections hold line numbers
    keep = [ln for ln in code.splitlines()
            if ln.strip() and not ln.lstrip().startswith((".loc", ".file", "//", "$L__tmp"))]
    return hashlib.sha256("\n".join(keep).encode()).hexdigest()[:16]


def _ptxas_stats(ptx: str, arch: int) -> tuple[int, int, tuple[str, ...]]:
    """(registers, spill bytes, performance-note codes) of `ptx` from `ptxas -v` (the ptxas that ships
    with Triton)."""
    from triton.backends.nvidia.compiler import get_ptxas

    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}", src, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True, check=True)
    log = res.stdout + res.stderr
    regs = max((int(m) for m in re.findall(r"Used (\d+) registers", log)), default=0)
    spills = sum(int(m) for m in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return regs, spills, ptxas_performance_notes(log)


def ptxas_performance_notes(log: str) -> tuple[str, ...]:
    """The codes of ptxas's "Potential Performance Loss" notes in its output `log`, sorted, each once."""
    return tuple(sorted(set(re.findall(r"\((C\d+)\) Potential Performance Loss", log))))


@contextlib.contextmanager
def compile_only(arch: int = 90, *, keep_asm: bool = False) -> Iterator[list[KernelBuild]]:
    """Compile launches for sm_`arch` instead of running them; yields the list of builds made
    (with `keep_asm`, each keeps its TTGIR and PTX, where a pipeliner did or did not overlap a load, and the
    cubin Triton built from them).

    Needs compiled Triton (not TRITON_INTERPRET=1, whose kernels are Python functions)."""
    global _ACTIVE
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_only needs compiled Triton kernels: unset TRITON_INTERPRET "
                           "(it is read when the kernels are imported)")
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    builds: list[KernelBuild] = []
    original_run = JITFunction.run
    previous_driver = driver._active  # triton has set_active but no getter; restored as it was

    def build(self, *args, grid, warmup, **kwargs):
        t0 = time.perf_counter()
        compiled = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        seconds = time.perf_counter() - t0
        ptx = compiled.asm["ptx"]
        regs, spills, notes = _ptxas_stats(ptx, arch)
        consts = {k: v for k, v in kwargs.items() if k.isupper()}
        md = compiled.metadata
        builds.append(KernelBuild(
            name=self.fn.__name__, arch=arch, constexprs=consts, num_warps=md.num_warps,
            num_stages=md.num_stages, shared_bytes=md.shared, registers=regs, spill_bytes=spills,
            wgmma=ptx.count("wgmma.mma_async"), tcgen05=ptx.count("tcgen05.mma"),
            mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
            tma=ptx.count("cp.async.bulk.tensor"), ptxas_notes=notes, seconds=seconds, code_hash=_code_hash(ptx),
            asm={"ttgir": compiled.asm["ttgir"], "ptx": ptx} if keep_asm else None,
            cubin=compiled.asm["cubin"] if keep_asm else None))
        return compiled

    driver.set_active(_CompileOnlyDriver(arch))
    JITFunction.run = build
    _ACTIVE = True
    try:
        yield builds
    finally:
        _ACTIVE = False
        JITFunction.run = original_run
        driver._active = previous_driver
