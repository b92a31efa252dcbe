"""What a kernel's machine code (SASS) says about its tensor-core pipeline, read without a GPU.

ptxas decides where a Hopper kernel waits for its warpgroup products (`wgmma`), and that decides
whether the epilogue of one product (a softmax's exponentials, a ReLU-weighted sum) runs while the
next product is on the tensor cores. The PTX cannot show it: ptxas may serialise every product
(note C7514), move a wait above independent work, or move the work below it. This module reads the
SASS of a compiled kernel (`nvdisasm`, shipped with Triton, of the cubin Triton built) in program order:

    HGMMA / QGMMA ... gsb0      the last product of a chain: one more group in flight
    HGMMA / QGMMA (no gsb0)     a chain being issued: its products already run
    WARPGROUP.DEPBAR.LE gsb0, N at most N groups left in flight

and counts the epilogue instructions (exponentials MUFU.EX2, max / ReLU FMNMX) issued while some
group is in flight. It is a count over the code, not over the run: a loop body counts once, and a
kernel whose products are serialised (a wait after each k-step) still shows its epilogue between
the k-steps. Read it with ptxas's notes (`KernelBuild.ptxas_notes`).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PipelineReading", "read_pipeline", "disassemble"]

EPILOGUE = re.compile(r"\b(MUFU\.EX2|FMNMX)\b")
_WAIT = re.compile(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*(0x[0-9a-fA-F]+|\d+)")
_PRODUCT = re.compile(r"\b[HQ]GMMA\.")


@dataclass(frozen=True)
class PipelineReading:
    """products: HGMMA / QGMMA instructions; groups: those that close a group (gsb0); waits: {N: count}
    of `WARPGROUP.DEPBAR.LE gsb0, N`; epilogue: MUFU.EX2 + FMNMX instructions, of which `beside` are
    issued while a group is in flight."""

    products: int
    groups: int
    waits: dict
    epilogue: int
    beside: int

    @property
    def beside_share(self) -> float | None:
        """beside / epilogue (None for a kernel without epilogue instructions)."""
        return self.beside / self.epilogue if self.epilogue else None


def read_pipeline(sass: str) -> PipelineReading:
    """Read `sass` (nvdisasm text, one instruction a line) in program order; see the module's note."""
    products = groups = epilogue = beside = 0
    in_flight = 0  # closed groups not yet waited for
    chain = False  # a chain's first products issued, its closing one not yet
    waits: dict[int, int] = {}
    for line in sass.splitlines():
        if _PRODUCT.search(line):
            products += 1
            if "gsb0" in line:
                groups += 1
                in_flight += 1
                chain = False
            else:
                chain = True
            continue
        wait = _WAIT.search(line)
        if wait:
            n = int(wait.group(1), 0)
            waits[n] = waits.get(n, 0) + 1
            in_flight = min(in_flight, n)
            continue
        if EPILOGUE.search(line):
            epilogue += 1
            beside += in_flight > 0 or chain
    return PipelineReading(products, groups, dict(sorted(waits.items())), epilogue, beside)


def disassemble(cubin: bytes) -> str:
    """The SASS of a cubin (`KernelBuild.cubin`: what Triton built for the GPU), by the `nvdisasm` that
    ships with Triton."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        return subprocess.run([knobs.nvidia.nvdisasm.path, "-c", str(path)], capture_output=True, text=True,
                              check=True).stdout
