"""Launch order of a 2-D tile grid (query tiles x key tiles), shared by the score kernels.

A score program reads one query tile and one key tile. CUDA starts programs in grid order, axis 0
fastest, so the programs running at once differ in their axis-0 tile and share their axis-1 tile.
With query tiles on axis 0, every wave of programs streams all the chunk's query tiles once per key
tile (tens of MB for an InfLLMv2 chunk: more than L2 holds, so from HBM again for each key tile);
with key tiles on axis 0 (`keys_fast`), the programs at once share a query tile and read key tiles,
which are few and stay in L2.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["tile_grid", "tile_ids"]


def tile_grid(n_query_tiles: int, n_key_tiles: int, n_outer: int, keys_fast: bool) -> tuple[int, int, int]:
    """The launch grid: (query tiles, key tiles, outer) or, keys_fast, (key tiles, query tiles, outer)."""
    if keys_fast:
        return (n_key_tiles, n_query_tiles, n_outer)
    return (n_query_tiles, n_key_tiles, n_outer)


@triton.jit
def tile_ids(KEYS_FAST: tl.constexpr):
    """(query tile, key tile) of this program in a `tile_grid(..., KEYS_FAST)` launch."""
    if KEYS_FAST:
        return tl.program_id(1), tl.program_id(0)
    return tl.program_id(0), tl.program_id(1)
