"""`kernels.ptx_hints`: the L2 prefetch size added to a kernel's cp.async copies, and the compile hook that
does it only for the named kernel and only inside its `with` block."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

from stem_boost.kernels.ptx_hints import add_l2_prefetch, l2_prefetch_on_copies, patched_ptx  # noqa: E402

PTX = """\
\tcp.async.cg.shared.global [ %r1 + 0 ], [ %rd1 + 0 ], 0x10, 0x10;
\tcp.async.cg.shared.global.L2::cache_hint [ %r2 + 0 ], [ %rd2 + 0 ], 0x10, 0x10, %rd9;
\tcp.async.ca.shared.global [ %r3 + 0 ], [ %rd3 + 0 ], 0x4, 0x4;
\tcp.async.mbarrier.arrive.noinc.shared.b64 [global_smem+231808];
"""


def test_prefetch_size_goes_on_every_16_byte_copy_and_nowhere_else():
    out = add_l2_prefetch(PTX, 128).splitlines()
    assert out[0] == "\tcp.async.cg.shared.global.L2::128B [ %r1 + 0 ], [ %rd1 + 0 ], 0x10, 0x10;"
    # after the eviction-policy qualifier, as PTX orders them
    assert out[1] == "\tcp.async.cg.shared.global.L2::cache_hint.L2::128B [ %r2 + 0 ], [ %rd2 + 0 ], 0x10, 0x10, %rd9;"
    assert out[2:] == PTX.splitlines()[2:]  # 4-byte copies (through L1) and the barrier arrive unchanged
    assert add_l2_prefetch(PTX, 0) == PTX


@pytest.mark.parametrize("size", [32, 512, -1, "128"])
def test_unknown_prefetch_sizes_are_refused_by_name(size):
    with pytest.raises(ValueError, match=f"L2 prefetch size {size!r} not in"):
        add_l2_prefetch(PTX, size)
    with pytest.raises(ValueError, match="not in \\(0, 64, 128, 256\\)"):
        l2_prefetch_on_copies("k", size)


class FakeStages(dict):
    """A backend's stage table with a PTX stage that returns PTX and names the kernel in the metadata."""

    def __init__(self, name: str):
        super().__init__(ptx=lambda src, metadata: (metadata.__setitem__("name", name), PTX)[1])


def test_the_hook_patches_the_named_kernel_inside_the_block_only():
    knobs = triton.knobs.runtime
    seen = []

    def earlier(*args):  # a hook someone installed before: kept, called, restored
        if not args:
            return "earlier", "0"
        seen.append(args[2])

    knobs.add_stages_inspection_hook = earlier
    try:
        with patched_ptx("mine", lambda ptx: ptx.upper(), "upper"):
            hook = knobs.add_stages_inspection_hook
            assert hook is not earlier
            key, digest = hook()  # Triton >= 3.9 asks for the pipeline's cache key
            assert "earlier" in key and "mine" in key and "upper" in key and len(digest) == 64
            for name, patched in (("mine", True), ("other", False)):
                stages = FakeStages(name)
                hook(None, stages, "opts", "lang", 90)
                ptx = stages["ptx"]("src", {})
                assert (ptx == PTX.upper()) is patched and (ptx == PTX) is not patched
            assert seen == ["opts", "opts"]
        assert knobs.add_stages_inspection_hook is earlier
        with pytest.raises(RuntimeError):
            with l2_prefetch_on_copies("mine", 256):
                raise RuntimeError("a failed launch")
        assert knobs.add_stages_inspection_hook is earlier  # restored on the way out of an error too
        with l2_prefetch_on_copies("mine", 0):  # size 0: no hook at all
            assert knobs.add_stages_inspection_hook is earlier
    finally:
        knobs.add_stages_inspection_hook = None


BUILD = """
import torch
from stem_boost.kernels.aot import compile_only
from stem_boost.kernels.mla_token_ws import mla_token_attention_ws
torch.manual_seed({seed})
q = torch.randn(1, 4, 128, 576, dtype=torch.bfloat16)
kv = torch.randn(1, 256, 576, dtype=torch.bfloat16)
idx = torch.randint(0, 256, (1, 4, 128), dtype=torch.int32)
cnt = torch.full((1, 4), 128, dtype=torch.int32)
for size in (0, 128, 0):  # the size-0 build after the patched one: from its own cache entry, unpatched
    with compile_only(90, keep_asm=True) as builds:
        mla_token_attention_ws(q, kv, idx, cnt, q_offset=252, tiles=dict(L2_PREFETCH=size))
    ptx = builds[0].asm["ptx"]
    print(size, ptx.count("cp.async.cg.shared.global"), ptx.count(".L2::128B"), builds[0].spill_bytes)
"""


def test_the_mla_kernel_builds_with_the_prefetch_size_in_its_copies(tmp_path):
    seed = int.from_bytes(os.urandom(2), "little")
    print("seed", seed)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    res = subprocess.run([sys.executable, "-c", BUILD.format(seed=seed)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [tuple(map(int, line.split())) for line in res.stdout.split("\n") if line.strip()]
    (s0, copies0, pf0, spill0), (s1, copies1, pf1, spill1), (s2, copies2, pf2, _) = rows
    assert copies0 == copies1 == copies2 > 100  # Q and every gathered quarter
    assert pf0 == 0 and pf2 == 0 and pf1 == copies1
    assert spill0 == spill1 == 0  # the step's views rebuilt each step: nothing hoisted and spilled
