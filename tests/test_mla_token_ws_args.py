"""The warp-specialised Hopper MLA kernel's argument checks run before any launch, so they are tested on
the CPU (the kernel itself runs in `test_mla_token_ws.py`, on a GPU): unknown tile options and SWEEP
values outside 0 / N > 0 are refused, naming the value and what is allowed."""

from __future__ import annotations

import pytest
import torch

from stem_boost.kernels.mla_token_ws import mla_token_attention_ws


@pytest.mark.parametrize("sweep", [-1, 1.5, True, "66"])
def test_sweep_must_be_a_whole_number_of_tokens(seed, sweep):
    q = torch.randn(1, 4, 64, 576).to(torch.bfloat16)
    kv = torch.randn(1, 16, 1, 576).to(torch.bfloat16)
    idx = torch.randint(0, 16, (1, 4, 8), dtype=torch.int32)
    counts = torch.full((1, 4), 8, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"SWEEP=.*allowed: 0 \(every list ascending\) or N > 0"):
        mla_token_attention_ws(q, kv, idx, counts, tiles=dict(SWEEP=sweep))
    with pytest.raises(ValueError, match="unknown tile options"):
        mla_token_attention_ws(q, kv, idx, counts, tiles=dict(SWEEEP=2))
