"""`scripts/tile_tokens_eval.py`: the mode names it takes."""

from __future__ import annotations

import pytest


def test_modes_parse_and_bad_ones_name_what_is_allowed(tile_tokens_eval):
    script = tile_tokens_eval
    assert script.wrap_kwargs("native", 0.18) == dict(reduce=0.0, beta=0.0)
    assert script.wrap_kwargs("mass:4", 0.18) == dict(reduce=0.18, schedule="mass", tile_tokens=4)
    cal = script.wrap_kwargs("mass_cal:4", 0.18)
    assert (cal["schedule"], cal["tile_tokens"], len(cal["layer_reduce"])) == ("mass", 4, 30)
    assert abs(sum(cal["layer_reduce"]) / 30 - 0.18) < 1e-6  # the allocation keeps the model-wide reduce
    with pytest.raises(SystemExit, match="is for reduce 0.18, the mode runs at 0.15"):
        script.wrap_kwargs("tpd_cal:4", 0.15)
    for bad in ("tpd", "tpd:0", "fast:4", "tpd:x"):
        with pytest.raises(SystemExit, match="allowed 'native' or SCHEDULE:TILE_TOKENS"):
            script.wrap_kwargs(bad, 0.18)


def test_beta_reaches_every_stem_mode_and_not_native(tile_tokens_eval):
    got = tile_tokens_eval.modes_kwargs(["native", "tpd:4", "mass_cal:4"], 0.18, beta=0.0)
    assert got["native"] == dict(reduce=0.0, beta=0.0)
    assert got["tpd:4"] == dict(reduce=0.18, schedule="tpd", tile_tokens=4, beta=0.0)
    assert got["mass_cal:4"]["beta"] == 0.0 and len(got["mass_cal:4"]["layer_reduce"]) == 30
    assert "beta" not in tile_tokens_eval.modes_kwargs(["tpd:4"], 0.18)["tpd:4"]  # the library's default
    with pytest.raises(SystemExit, match="allowed a number >= 0"):
        tile_tokens_eval.modes_kwargs(["tpd:4"], 0.18, beta=-0.1)
