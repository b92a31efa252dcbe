"""`Selection`: which key units every query row attends to — the one type that flows from a
family's native selector through the Stem step into `sparse_attention`.

In the spirit of FlexAttention's `BlockMask`: a compact per-row index list that any executor
consumes (the Triton kernel, the masked PyTorch path, the gather reference), convertible to a
`BlockMask` (`to_block_mask`) and to a dense boolean mask (`to_dense_mask`, small shapes) for
oracles and benchmark peers. See docs/design.md for where it is produced and consumed.

Layout (B batch rows, Hsel selection heads, R query rows, Kmax list width):
    idx      int32 [B, Hsel, R, Kmax]  key units, ascending, -1 after the first `counts` entries
    counts   int32 [B, Hsel, R]        live entries per row
    block_size                         tokens per key unit: 1 = token lists (DSA), 64 = InfLLMv2 blocks
    query_block                        consecutive query positions that share one row (1 = per token)
    q_offset                           key position of query 0 (None: the queries are the last S of T keys)
    seq_start, seq_len  int32 [B]      the real (non-padding) tokens of each batch row are the key
                                       positions [seq_start, seq_start + seq_len); None = no padding
    n_forced int32 [B, Hsel, R]        live entries kept because the native method forces them (sinks,
                                       init / local / diagonal blocks): not counted by the reduce contract
    ordered                            True: the producer guarantees every row's live entries strictly
                                       ascending with -1 after them, so `sparse_attention`'s block path
                                       skips its check (a host synchronisation per call); False: checked,
                                       and rows that are not sorted and de-duplicated there
Hsel is 1 (one selection for all heads: DSA) or the number of KV heads (one per GQA group: InfLLMv2).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

__all__ = ["Selection", "key_padding", "extents_from_padding", "shared_units"]

_INT64_MAX = torch.iinfo(torch.int64).max


def key_padding(attention_mask: torch.Tensor | None, n_keys: int) -> torch.Tensor | None:
    """[B, n_keys] bool (True = real token) from a 2-D padding mask (its last `n_keys` columns);
    None when there is no 2-D mask or every token is real."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    m = attention_mask[:, -n_keys:].bool()
    return None if bool(m.all()) else m


def extents_from_padding(padding: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(seq_start, seq_len) int32 [B] of each batch row's real tokens from a [B, T] bool mask
    (True = real token; left or right padding: the real tokens must be contiguous); (None, None)
    when there is no padding mask."""
    if padding is None:
        return None, None
    padding = padding.bool()
    length = padding.sum(-1)
    start = padding.int().argmax(-1)
    end = torch.where(length > 0, start + length, start)
    positions = torch.arange(padding.shape[-1], device=padding.device)
    contiguous = (padding == ((positions >= start[:, None]) & (positions < end[:, None])))
    if not bool(contiguous.all()):
        bad = int((~contiguous).any(-1).nonzero()[0])
        raise ValueError(f"attention_mask row {bad} has padding between real tokens; allowed: left or right padding")
    return start.to(torch.int32), length.to(torch.int32)


def shared_units(idx_a: torch.Tensor, idx_b: torch.Tensor) -> tuple[int, int]:
    """(|a & b|, |b|) summed over the rows of two -1 padded unit lists [..., K] with the same leading
    shape: how many of b's units a keeps too (e.g. a fast selector's top-k against the exact one)."""
    a = idx_a.reshape(-1, idx_a.shape[-1]).long()
    b = idx_b.reshape(-1, idx_b.shape[-1]).long()
    n = int(max(int(a.max()), int(b.max()))) + 2  # the last column takes the -1 padding
    member = torch.zeros(a.shape[0], n, dtype=torch.bool, device=a.device)
    member.scatter_(1, torch.where(a >= 0, a, n - 1), True)
    member[:, n - 1] = False
    live = b >= 0
    hits = member.gather(1, torch.where(live, b, n - 1)) & live
    return int(hits.sum()), int(live.sum())


@dataclass(frozen=True)
class Selection:
    """Per-row key-unit lists (see the module docstring for every field)."""

    idx: torch.Tensor
    counts: torch.Tensor
    block_size: int = 1
    query_block: int = 1
    q_offset: int | None = None
    seq_start: torch.Tensor | None = None
    seq_len: torch.Tensor | None = None
    n_forced: torch.Tensor | None = None
    ordered: bool = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_padded(cls, idx: torch.Tensor, **fields) -> "Selection":
        """A Selection from a -1 padded index list whose live entries are the non-negative ones
        (e.g. a native top-k output), with counts derived once here."""
        counts = (idx >= 0).sum(-1).to(torch.int32)
        return cls(idx=idx.to(torch.int32), counts=counts, **fields)

    # ------------------------------------------------------------------ shape facts
    @property
    def batch(self) -> int:
        return self.idx.shape[0]

    @property
    def n_rows(self) -> int:
        return self.idx.shape[2]

    @property
    def kmax(self) -> int:
        return self.idx.shape[3]

    def offset_for(self, seq_q: int, seq_k: int) -> int:
        """Key position of query 0: `q_offset`, or seq_k - seq_q when it is None."""
        return seq_k - seq_q if self.q_offset is None else int(self.q_offset)

    def pairs(self) -> int:
        """Attended (query, key-unit) pairs: sum of counts x query_block (a ragged last row is
        counted whole)."""
        return int(self.counts.long().sum()) * self.query_block

    # ------------------------------------------------------------------ views
    def rows(self, r0: int, r1: int) -> "Selection":
        """Rows [r0, r1) as a Selection whose q_offset points at row r0's first query.

        Needs an explicit q_offset (a slice cannot know the full query length)."""
        if self.q_offset is None:
            raise ValueError("Selection.rows needs q_offset to be set (got None)")
        return replace(
            self,
            idx=self.idx[:, :, r0:r1],
            counts=self.counts[:, :, r0:r1],
            q_offset=int(self.q_offset) + r0 * self.query_block,
            n_forced=None if self.n_forced is None else self.n_forced[:, :, r0:r1],
        )

    # ------------------------------------------------------------------ checks
    def validate(self, seq_q: int, seq_k: int, causal: bool = True) -> None:
        """Raise ValueError if the selection is malformed for `seq_q` queries over `seq_k` keys.

        Checks shapes and dtypes, R == ceil(seq_q / query_block), 0 <= counts <= Kmax, live entries
        in [0, ceil(seq_k / block_size)), padding entries == -1, no duplicate unit in a row, and
        (causal) that a live unit starts at or before its row's last query position.
        """
        idx, counts = self.idx, self.counts
        if idx.dim() != 4:
            raise ValueError(f"idx must be [B, Hsel, R, Kmax], got shape {tuple(idx.shape)}")
        b, h, r, k = idx.shape
        if counts.shape != (b, h, r):
            raise ValueError(f"counts must have shape {(b, h, r)}, got {tuple(counts.shape)}")
        if idx.dtype != torch.int32 or counts.dtype != torch.int32:
            raise ValueError(f"idx and counts must be int32, got {idx.dtype} and {counts.dtype}")
        for name, value in (("block_size", self.block_size), ("query_block", self.query_block)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is outside [1, inf)")
        if seq_q < 0 or seq_k < 0:
            raise ValueError(f"seq_q={seq_q} and seq_k={seq_k} must be >= 0")
        offset = self.offset_for(seq_q, seq_k)
        if causal and offset < 0:
            raise ValueError(f"causal selection needs q_offset >= 0, got {offset} (seq_q={seq_q}, seq_k={seq_k})")
        n_rows = -(-seq_q // self.query_block)
        if r != n_rows:
            raise ValueError(f"idx has R={r} rows but seq_q={seq_q} with query_block={self.query_block} needs {n_rows}")
        for name, t in (("seq_start", self.seq_start), ("seq_len", self.seq_len)):
            if t is not None and tuple(t.shape) != (b,):
                raise ValueError(f"{name} must be [B={b}], got {tuple(t.shape)}")
        n_units = -(-seq_k // self.block_size)

        def fail(bad: torch.Tensor, what: str) -> None:
            if bool(bad.any()):
                loc = tuple(bad.nonzero()[0].tolist())
                raise ValueError(f"{what} at (b, head, row[, slot]) = {loc}")

        fail((counts < 0) | (counts > k), f"counts outside [0, Kmax={k}]")
        live = self.live()
        fail(live & ((idx < 0) | (idx >= n_units)), f"index outside [0, n_key_units={n_units})")
        fail(~live & (idx != -1), "padding entry (slot >= count) is not -1")
        if causal:
            last_q = self._row_last_query(seq_q, offset)
            fail(live & (idx.long() * self.block_size > last_q[:, None]), "acausal index (beyond its row's last query)")
        keys = torch.where(live, idx.long(), _INT64_MAX).sort(dim=-1).values
        fail((keys[..., 1:] == keys[..., :-1]) & (keys[..., 1:] != _INT64_MAX), "duplicate index in a row")

    def real_rows(self, seq_q: int, seq_k: int) -> torch.Tensor:
        """[B, R] bool: rows whose first query is a real token of its batch row (all True without
        padding)."""
        first_q = torch.arange(self.n_rows, device=self.idx.device) * self.query_block + self.offset_for(seq_q, seq_k)
        if self.seq_start is None:
            return torch.ones(self.batch, self.n_rows, dtype=torch.bool, device=self.idx.device)
        start = self.seq_start.to(self.idx.device).long()[:, None]
        end = start + self.seq_len.to(self.idx.device).long()[:, None]
        return (first_q >= start) & (first_q < end)

    def real_units(self, seq_k: int) -> torch.Tensor | None:
        """[B, n_units] bool: key units holding a real token of their batch row (None without
        padding)."""
        if self.seq_start is None:
            return None
        units = torch.arange(-(-seq_k // self.block_size), device=self.idx.device)
        first = self.seq_start.to(self.idx.device).long() // self.block_size
        last = (self.seq_start.to(self.idx.device).long() + self.seq_len.to(self.idx.device).long() - 1) // self.block_size
        return (units >= first[:, None]) & (units <= last[:, None])

    def live(self) -> torch.Tensor:
        """[B, Hsel, R, Kmax] bool: the slot holds a live entry."""
        return torch.arange(self.kmax, device=self.idx.device) < self.counts[..., None].long()

    def _row_last_query(self, seq_q: int, offset: int) -> torch.Tensor:
        rows = torch.arange(self.n_rows, device=self.idx.device)
        return ((rows + 1) * self.query_block).clamp(max=seq_q) - 1 + offset

    # ------------------------------------------------------------------ conversions
    def to_dense_mask(self, seq_q: int, seq_k: int, causal: bool = True) -> torch.Tensor:
        """[B, Hsel, seq_q, seq_k] bool: query s may attend to key t (small shapes only: oracles)."""
        b, h, r, _ = self.idx.shape
        n_units = -(-seq_k // self.block_size)
        slot = torch.where(self.live(), self.idx.long(), n_units)
        units = torch.zeros(b, h, r, n_units + 1, dtype=torch.bool, device=self.idx.device)
        units.scatter_(-1, slot, True)
        mask = units[..., :n_units].repeat_interleave(self.block_size, dim=-1)[..., :seq_k]
        mask = mask.repeat_interleave(self.query_block, dim=2)[:, :, :seq_q]
        if causal:
            q_pos = torch.arange(seq_q, device=mask.device) + self.offset_for(seq_q, seq_k)
            mask = mask & (torch.arange(seq_k, device=mask.device) <= q_pos[:, None])
        return mask

    def to_block_mask(self, seq_q: int, seq_k: int, n_heads: int):
        """FlexAttention `BlockMask` with the same (query, key) pairs, for `n_heads` query heads.

        Its tiles are (query_block, block_size): every query of a row shares the row's units, so a
        unit is a full block when all its keys precede the row's first query and a partial block
        (causal `mask_mod`) otherwise. Needs block_size and query_block >= 16 (FlexAttention's tile
        sizes); token lists have no block structure to express.
        """
        from torch.nn.attention.flex_attention import BlockMask

        if self.block_size < 16 or self.query_block < 16:
            raise ValueError(
                f"to_block_mask needs block_size >= 16 and query_block >= 16, got block_size={self.block_size}, "
                f"query_block={self.query_block}; use to_dense_mask for token lists"
            )
        b, h, r, _ = self.idx.shape
        if n_heads % h:
            raise ValueError(f"n_heads={n_heads} must be a multiple of the selection heads Hsel={h}")
        offset = self.offset_for(seq_q, seq_k)
        n_units = -(-seq_k // self.block_size)
        live = self.live()
        first_q = torch.arange(r, device=self.idx.device) * self.query_block + offset
        unit_end = (self.idx.long() + 1) * self.block_size - 1
        full = live & (unit_end <= first_q[:, None]) & (unit_end < seq_k)
        partial = live & ~full

        def compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # FlexAttention wants each row's block columns ascending (it transposes them in order)
            big = torch.iinfo(torch.int32).max
            ordered = torch.where(keep, self.idx, big).sort(dim=-1).values
            cols = torch.where(ordered != big, ordered, 0)
            width = max(n_units, cols.shape[-1])
            cols = torch.nn.functional.pad(cols, (0, width - cols.shape[-1]))
            rep = n_heads // h
            num = keep.sum(-1).to(torch.int32).repeat_interleave(rep, dim=1).contiguous()
            return num, cols.to(torch.int32).repeat_interleave(rep, dim=1).contiguous()

        full_num, full_idx = compact(full)
        part_num, part_idx = compact(partial)

        # the mask_mod is exact on its own too (row membership at unit granularity and causality):
        # FlexAttention's eager path evaluates it densely, the compiled kernels on partial blocks only
        member = torch.zeros(b, h, r, n_units + 1, dtype=torch.bool, device=self.idx.device)
        member.scatter_(-1, torch.where(live, self.idx.long(), n_units), True)
        member = member[..., :n_units]
        rep, qb, bs = n_heads // h, self.query_block, self.block_size

        def causal(b_, h_, q_idx, kv_idx):
            return member[b_, h_ // rep, q_idx // qb, kv_idx // bs] & (q_idx + offset >= kv_idx)

        return BlockMask.from_kv_blocks(part_num, part_idx, full_num, full_idx,
                                        BLOCK_SIZE=(self.query_block, self.block_size), mask_mod=causal,
                                        seq_lengths=(seq_q, seq_k))
