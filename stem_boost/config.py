"""StemConfig: every knob of the boost, validated once, with the defaults of the paper."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

OAM_NORMS = ("zscore", "raw")
HEAD_AGGREGATIONS = ("rms", "max", "mean")
BACKENDS = ("auto", "triton", "masked", "reference")  # the executors of `sparse_attention`
INDEXER_DTYPES = ("auto", "float32", "bfloat16", "fp8")
FP8_INDEXER_HEAD_DIMS = (32, 64, 128)  # one e4m3 block per row (<= 128), a Hadamard size, FP8 MMA's K >= 32
SCHEDULES = ("tpd", "uniform", "mass")
MAX_REDUCE = 0.9
LAYER_REDUCE_TOL = 1e-4


@dataclass(frozen=True)
class StemConfig:
    """What `stem_boost.wrap` applies to each sparse-attention layer.

    reduce:     fraction of the native (query, key) pairs to drop, in [0, 0.9] (docs/design.md).
    beta:       OAM weight of the value-norm bias, >= 0 (paper: 0.2; 0 = native order).
    oam_norm:   "zscore" (normalise log||v|| per head over the sequence, AngelSlim) or "raw" (paper).
    head_agg:   how per-head value norms are pooled over the heads sharing one selection.
    alpha_min:  lowest TPD end ratio the reduce solver may use; below it the achieved reduction is
                reported as is (never silently claimed).
    backend:    `sparse_attention`'s executor: "auto" (Triton on CUDA, PyTorch on the CPU), "triton",
                "masked" or "reference".
    indexer_max_bytes: memory bound of the chunked native selection (fp32 score chunks).
    indexer_dtype: "float32" reproduces the native selection exactly; "bfloat16" scores the
                indexer on tensor cores (4-6x faster on GPUs, selection equal up to near-ties: its
                top-k overlap with float32 is in BENCHMARKS.md); "fp8": e4m3 operands after a
                Hadamard rotation, as DeepSeek's inference code (faster still on FP8 tensor cores,
                lower overlap: BENCHMARKS.md; on the CPU the same quantised operands in fp32, for
                evaluating its accuracy); "auto" (default): fp8 on GPUs with FP8 tensor cores
                (compute capability >= 8.9) for indexer head dims of 32, 64 or 128 (DeepSeek-V3.2:
                128), bfloat16 on other CUDA GPUs, float32 elsewhere.
    dense:      True runs full causal attention with no selector at all (the dense baseline that
                sparse attention is compared with; the other knobs are ignored).
    budget_step: the quantum of TPD budgets on token lists (DSA), in keys: each row's budget is
                rounded to a multiple of it, so the kernel's last step over a decayed row is full.
                None (default): the token kernels' key step (128) when the native budget is at least
                16 of them (DeepSeek-V3.2's 2048), else 1; 1: the exact schedule. The reduction
                solve still meets `reduce` over all rows. Block selections (InfLLMv2) ignore it:
                every block is a whole kernel step already.
    keep_selections: True keeps each sparse layer's native and Stem selection of the last prefill on
                its device, for `stem_boost.last_selections` and the distributed digests. Off by
                default: a DeepSeek-V3.2 layer's top-2048 lists at 128K tokens are 1 GiB each.
    schedule:   "tpd" (Token Position-Decay, the paper) or "uniform" (the TPD-off ablation: every
                row keeps the same fraction of its native budget, solved so that the same total
                number of pairs is removed; see `tpd.plan_uniform`) or "mass" (this project's
                variant: the cut goes to the candidate pairs with the lowest probability that the
                native scores predict, over all rows at once; see `stem_boost.mass`).
    tile_tokens: block selections (InfLLMv2) only: how many consecutive query tokens rank their
                non-forced blocks together, by the sum of their native scores (their shared attention
                mass on the block), before the OAM bias and the budget (the group's mean). The
                attention kernel computes a few consecutive tokens together over the union of their
                lists (4 tokens x 16 heads at MiniCPM-4.1's group of 16); tokens that rank together keep
                the same blocks, so the cut shortens that union as much as each list, and the top-k runs
                once a group. 1 ranks every token alone, as the native selector does. "auto" (default):
                4 tokens (fewer when 4 x the GQA group exceeds the kernel's 64-row tile) whenever the
                configuration changes the selection (reduce or beta > 0), else 1, so that reduce 0 and
                beta 0 stay the native selection. Token selections (DSA) ignore it: their kernel computes
                one token a program.
    layer_reduce: None (every sparse layer drops `reduce`) or one fraction per sparse layer, in the
                order `wrap` finds them, whose mean is `reduce` (this project's calibrated
                allocation, `stem_boost.calibrate`): every sparse layer of one model has the same
                native budget, so the model-wide reduction is still `reduce` while the cut moves to
                the layers where it costs least.
    """

    reduce: float = 0.15
    beta: float = 0.2
    oam_norm: str = "zscore"
    head_agg: str = "rms"
    alpha_min: float = 0.0
    backend: str = "auto"
    indexer_max_bytes: int = 2 * 2**30
    indexer_dtype: str = "auto"
    schedule: str = "tpd"
    layer_reduce: tuple[float, ...] | None = None
    dense: bool = False
    keep_selections: bool = False
    budget_step: int | None = None
    tile_tokens: int | str = "auto"

    def __post_init__(self):
        if not isinstance(self.reduce, (int, float)) or not 0.0 <= self.reduce <= MAX_REDUCE:
            raise ValueError(f"reduce={self.reduce!r} is outside [0, {MAX_REDUCE}]")
        if not isinstance(self.beta, (int, float)) or self.beta < 0:
            raise ValueError(f"beta={self.beta!r} must be a number >= 0")
        if self.oam_norm not in OAM_NORMS:
            raise ValueError(f"oam_norm={self.oam_norm!r}; allowed: {', '.join(OAM_NORMS)}")
        if self.head_agg not in HEAD_AGGREGATIONS:
            raise ValueError(f"head_agg={self.head_agg!r}; allowed: {', '.join(HEAD_AGGREGATIONS)}")
        if not 0.0 <= self.alpha_min <= 1.0:
            raise ValueError(f"alpha_min={self.alpha_min!r} is outside [0, 1]")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}; allowed: {', '.join(BACKENDS)}")
        if self.indexer_max_bytes < 1:
            raise ValueError(f"indexer_max_bytes={self.indexer_max_bytes!r} must be >= 1")
        if self.indexer_dtype not in INDEXER_DTYPES:
            raise ValueError(f"indexer_dtype={self.indexer_dtype!r}; allowed: {', '.join(INDEXER_DTYPES)}")
        if not isinstance(self.dense, bool):
            raise ValueError(f"dense={self.dense!r} must be True or False")
        if not isinstance(self.keep_selections, bool):
            raise ValueError(f"keep_selections={self.keep_selections!r} must be True or False")
        if self.budget_step is not None and (isinstance(self.budget_step, bool) or not isinstance(self.budget_step, int)
                                             or self.budget_step < 1):
            raise ValueError(f"budget_step={self.budget_step!r}; allowed: None (automatic) or an int >= 1")
        if self.tile_tokens != "auto" and (isinstance(self.tile_tokens, bool) or not isinstance(self.tile_tokens, int)
                                           or self.tile_tokens < 1):
            raise ValueError(f"tile_tokens={self.tile_tokens!r}; allowed: 'auto' or an int >= 1 (1 = every token ranks "
                             "alone)")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}; allowed: {', '.join(SCHEDULES)}")
        if self.layer_reduce is not None:
            self._check_layer_reduce()

    def _check_layer_reduce(self) -> None:
        lr = self.layer_reduce
        if isinstance(lr, (str, bytes)) or not hasattr(lr, "__len__") or len(lr) == 0:
            raise ValueError(f"layer_reduce={lr!r} must be a non-empty sequence of fractions (one per sparse layer)")
        vals = tuple(float(x) for x in lr)
        bad = [(i, x) for i, x in enumerate(vals) if not 0.0 <= x <= MAX_REDUCE or math.isnan(x)]
        if bad:
            raise ValueError(f"layer_reduce[{bad[0][0]}]={bad[0][1]!r} is outside [0, {MAX_REDUCE}]")
        mean = sum(vals) / len(vals)
        if abs(mean - self.reduce) > LAYER_REDUCE_TOL:
            raise ValueError(f"layer_reduce has mean {mean:.6f} but reduce={self.reduce!r}: the per-layer fractions "
                             f"must average to the model-wide reduction (tolerance {LAYER_REDUCE_TOL:g})")
        object.__setattr__(self, "layer_reduce", vals)

    def for_layer(self, i: int, n_layers: int) -> "StemConfig":
        """The configuration of sparse layer `i` of `n_layers`: `reduce` replaced by
        `layer_reduce[i]` when an allocation is set (its length must be `n_layers`)."""
        if self.layer_reduce is None:
            return self
        if len(self.layer_reduce) != n_layers:
            raise ValueError(f"layer_reduce has {len(self.layer_reduce)} fractions but the model has {n_layers} "
                             "sparse-attention layers: one fraction per layer, in model order")
        return replace(self, reduce=self.layer_reduce[i], layer_reduce=None)

    def per_layer(self, n_layers: int) -> list["StemConfig"]:
        """`for_layer` of every sparse layer, in model order."""
        return [self.for_layer(i, n_layers) for i in range(n_layers)]

    @property
    def is_identity(self) -> bool:
        """True when the boost keeps the native selection unchanged (reduce 0 and beta 0)."""
        return not self.dense and self.reduce == 0 and self.beta == 0 and self.tile_tokens in (1, "auto")

    def tile_tokens_for(self, group_size: int) -> int:
        """The tokens that rank together (`tile_tokens`) in a layer whose GQA groups have `group_size`
        query heads: "auto" is 1 for the identity configuration, else min(4, 64 // group_size)."""
        if self.tile_tokens != "auto":
            return int(self.tile_tokens)
        return 1 if self.is_identity else max(1, min(4, 64 // max(1, group_size)))

    def indexer_dtype_on(self, device, head_dim: int) -> str:
        """The indexer dtype that runs on `device` (a torch.device) for indexer heads of `head_dim`:
        "auto" is fp8 on GPUs with FP8 tensor cores (compute capability 8.9 and up: Ada, Hopper,
        Blackwell) when the FP8 scorer takes the head dim (FP8_INDEXER_HEAD_DIMS: DeepSeek-V3.2's is
        128), bfloat16 on other CUDA GPUs and float32 elsewhere."""
        if self.indexer_dtype != "auto":
            return self.indexer_dtype
        if device.type != "cuda":
            return "float32"
        import torch

        fp8 = torch.cuda.get_device_capability(device) >= (8, 9) and head_dim in FP8_INDEXER_HEAD_DIMS
        return "fp8" if fp8 else "bfloat16"

    def indexer_score_dtype(self, device, head_dim: int):
        """What the chunked indexer takes as `score_dtype` on `device`: None (float32), torch.bfloat16
        or "fp8"."""
        import torch

        name = self.indexer_dtype_on(device, head_dim)
        return {"float32": None, "bfloat16": torch.bfloat16, "fp8": "fp8"}[name]

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["layer_reduce"] is not None:
            d["layer_reduce"] = list(d["layer_reduce"])
        return d
