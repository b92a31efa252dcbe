"""Budget accounting of the last forward pass, per layer (what `stem_boost.stats` returns).

A forward records its accounting without asking the GPU for numbers: the adapters reduce the
selection to a few small device tensors and `defer` an update that turns them into Python numbers.
The first read of any field runs the pending updates (one host synchronisation then, none in the
forward: a synchronisation there drains the GPU's queue, and it idles while Python launches the next
kernels)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class LayerStats:
    """Attended (query, key-unit) pairs of one layer's last prefill, native vs Stem.

    Pairs count only the budgeted keys (forced keys such as init blocks / local windows excluded,
    as the reduce contract says) and only causally valid ones.
    """

    layer: int
    family: str
    native_pairs: int = 0
    stem_pairs: int = 0
    forced_pairs: int = 0
    alpha: float = 1.0
    reduce_requested: float = 0.0
    seq_len: int = 0
    budget_native: list[int] = field(default_factory=list, repr=False)  # per query row (subsampled)
    budget_stem: list[int] = field(default_factory=list, repr=False)
    row_native_pairs: list[int] = field(default_factory=list)  # per batch row
    row_stem_pairs: list[int] = field(default_factory=list)
    row_alpha: list[float] = field(default_factory=list)
    _pending: list = field(default_factory=list, repr=False, compare=False)  # deferred updates, in order
    _flushing: bool = field(default=False, repr=False, compare=False)

    def defer(self, update: Callable[["LayerStats"], None], *, fresh: bool) -> None:
        """Queue `update(self)` (it reads its device tensors then); `fresh`: it rewrites the whole
        accounting (a new forward), so the updates still pending are dropped (a model that is never
        asked for its stats keeps at most one forward's)."""
        if fresh:
            self._pending.clear()
        self._pending.append(update)

    def __getattribute__(self, name: str):
        # any public field or method read (but `defer`: the forward's own call) first applies the
        # pending updates, in the order recorded
        if (name[0] != "_" and name != "defer" and object.__getattribute__(self, "_pending")
                and not object.__getattribute__(self, "_flushing")):
            object.__setattr__(self, "_flushing", True)
            try:
                pending = object.__getattribute__(self, "_pending")
                while pending:
                    pending.pop(0)(self)
            finally:
                object.__setattr__(self, "_flushing", False)
        return object.__getattribute__(self, name)

    @property
    def reduce_achieved(self) -> float:
        return 1.0 - self.stem_pairs / self.native_pairs if self.native_pairs else 0.0

    def to_dict(self) -> dict:
        return dict(layer=self.layer, family=self.family, native_pairs=self.native_pairs,
                    stem_pairs=self.stem_pairs, forced_pairs=self.forced_pairs,
                    reduce_requested=self.reduce_requested, reduce_achieved=self.reduce_achieved,
                    alpha=self.alpha, seq_len=self.seq_len, row_native_pairs=list(self.row_native_pairs),
                    row_stem_pairs=list(self.row_stem_pairs), row_alpha=list(self.row_alpha))


def summarize(layers: list[LayerStats]) -> dict:
    """Totals over layers: pairs and the achieved reduction, for the batch and per batch row."""
    native = sum(s.native_pairs for s in layers)
    stem = sum(s.stem_pairs for s in layers)
    n_rows = max((len(s.row_native_pairs) for s in layers), default=0)
    rows = []
    for b in range(n_rows):
        nat = sum(s.row_native_pairs[b] for s in layers if b < len(s.row_native_pairs))
        st = sum(s.row_stem_pairs[b] for s in layers if b < len(s.row_stem_pairs))
        rows.append(dict(native_pairs=nat, stem_pairs=st, reduce_achieved=(1 - st / nat) if nat else 0.0))
    return dict(native_pairs=native, stem_pairs=stem, reduce_achieved=(1 - stem / native) if native else 0.0,
                rows=rows, layers=[s.to_dict() for s in layers])
