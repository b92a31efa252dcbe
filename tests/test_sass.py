"""`stem_boost.bench.sass`: the tensor-core pipeline read from machine code (waits, epilogue beside a product).

Oracle: hand-written SASS snippets whose counts follow from the module's stated rules; and on a real
sm_90 build (compiled on this CPU), the rule the head loops were rewritten for: the pooled stage-1
kernel's default schedule (ptxas note C7514) waits for every product, the STEP schedule leaves one running
while the previous head's exponentials are taken."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from stem_boost.bench.sass import read_pipeline

SERIAL = """
        /*0100*/   WARPGROUP.ARRIVE ;
        /*0110*/   HGMMA.64x128x16.F32.BF16 R88, gdesc[UR12], RZ, !UPT, gsb0 ;
        /*0120*/   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0130*/   MUFU.EX2 R1, R1 ;
        /*0140*/   HGMMA.64x128x16.F32.BF16 R88, gdesc[UR36], R88, gsb0 ;
        /*0150*/   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0160*/   FMNMX R2, R3, R4, !PT ;
"""

OVERLAPPED = """
        /*0100*/   QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR16], RZ, !UPT ;
        /*0110*/   MUFU.EX2 R1, R1 ;
        /*0120*/   QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR4], R24, gsb0 ;
        /*0130*/   HGMMA.64x128x16.F32.BF16 R88, gdesc[UR8], RZ, !UPT, gsb0 ;
        /*0140*/   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0150*/   MUFU.EX2 R2, R2 ;
        /*0160*/   FMNMX R5, R6, R7, !PT ;
        /*0170*/   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0180*/   MUFU.EX2 R3, R3 ;
        /*0190*/   FFMA R4, R4, R4, R4 ;
"""


def test_serialised_products_leave_nothing_running_between_them():
    r = read_pipeline(SERIAL)
    assert (r.products, r.groups, r.waits, r.epilogue, r.beside) == (2, 2, {0: 2}, 2, 0)
    assert r.beside_share == 0.0


def test_epilogue_counts_while_a_chain_is_issued_or_a_group_is_left_running():
    r = read_pipeline(OVERLAPPED)
    # the first MUFU runs under a chain being issued; the MUFU and FMNMX after "<= 1 left" run beside a
    # product; the MUFU after the full wait does not; FFMA is not an epilogue instruction here
    assert (r.products, r.groups, r.waits, r.epilogue, r.beside) == (3, 2, {0: 1, 1: 1}, 4, 3)
    assert read_pipeline("").beside_share is None


@pytest.mark.parametrize("tile,waits", [("", " 0:1 1:1 "), ("step0", None), ("step4 num_buf3", " 0:1 1:3 ")])
def test_pooled_stage1_schedules_read_from_their_sm90_build(tile, waits):
    """`stem-boost build --sass` on the pooled stage-1 kernel: the serialised pairs (STEP 0) wait for every
    one of its 32 products (gsb0 0 after each, note C7514); a STEP schedule waits with one product left
    running (<= 1) STEP - 1 times a trip of STEP heads (the default, STEP 2: once)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    case = "select pooled sm90" + (f" {tile}" if tile else "")
    out = subprocess.run([sys.executable, "-m", "stem_boost.bench.build", "--cases", case, "--sass"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith(case + "  ")]
    assert len(rows) == 1, out.stdout
    if waits is None:
        assert " 0:32 " in rows[0] and "C7514" in rows[0], rows[0]
    else:
        assert waits in rows[0] and "C7514" not in rows[0], rows[0]
