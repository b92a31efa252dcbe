"""Budget accounting of the last forward pass, per layer (what `stem_boost.stats` returns)."""

from __future__ import annotations

from dataclasses import dataclass, field


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
