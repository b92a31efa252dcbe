"""Tensor parallelism for DSA models (DeepSeek-V3.2 MLA + lightning indexer), with or without Stem.

    rank, world, device = stem_boost.dist.init_from_env()
    model = stem_boost.wrap(model, reduce=0.15, keep_selections=True)  # before or after sharding
    shard_dsa_model(model)                               # in place; the default process group
    logits = model(input_ids).logits                     # identical on every rank
    selection_digest(model)                              # same string on every rank

What each rank holds (H query heads, W ranks, rank r owns heads [r*H/W, (r+1)*H/W)):

=============================  =====================================================================
module                         sharding
=============================  =====================================================================
self_attn.q_b_proj (q_proj)    column (output rows) by head: [H*(nope+rope), q_lora] -> its heads
self_attn.kv_b_proj            column by head: [H*(nope+v), kv_lora] -> its heads
self_attn.o_proj               row (input columns) by head: [hidden, H*v] -> its heads; forward
                               = partial product, all_reduce(SUM), + bias
self_attn.num_heads            H / W (the wrapped and the native forwards view heads with -1 or it)
self_attn.indexer              REPLICATED (small: ~14M params per layer on DeepSeek-V3.2): every
                               rank computes the same top-k from the same (all-reduced) input
q_a_proj, kv_a_proj_with_mqa,  replicated (low-rank projections feeding norms over the full rank)
norms, router (mlp.gate)
mlp (dense MLP, shared         intermediate dim split (gate/up rows, down columns; the fused
experts, routed experts)       experts.gate_up_proj [E, 2I, D] keeps [gate | up] per rank); one
                               all_reduce(SUM) at the output of the decoder layer's `mlp`
embed_tokens, lm_head, norm    replicated
=============================  =====================================================================

Stem (OAM) needs the value norms of *all* heads aggregated per key (RMS over heads by default).
Each rank only has its heads' values, so the wrapped forward calls `adapters.dsa.head_norm_reducer(attn)(norms,
how)`, installed here: rms -> all_reduce(SUM) of the per-head sum of squares, then
sqrt(sum / H); mean -> all_reduce(SUM) / H; max -> all_reduce(MAX). An all_reduce returns the
same bits on every rank, so the OAM scores, the TPD budgets and the Stem selection are identical
on every rank (`selection_digest` checks it). Versus the unsharded model the norms differ only by
float summation order (~1e-7 relative in fp32).

Communication per layer in prefill: 3 all_reduces (attention output [B, S, hidden], MLP output
[B, S, hidden], value norms [B, 1, T] fp32).

`shard_dsa_model` also works on a model whose parameters are on the meta device (it only slices
them), which is how `stem_boost.dist.loading` builds a rank's model before reading its slices of
the checkpoint; the per-parameter slice plan is kept in `model._stem_tp.plan`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.dsa import is_dsa_attention, set_head_norm_reducer
from ..api import NOT_KEPT

__all__ = [
    "TPInfo",
    "ParamShard",
    "shard_dsa_model",
    "selection_digest",
    "layer_selection_digests",
    "gather_digests",
    "RowParallelLinear",
]


@dataclass(frozen=True)
class ParamShard:
    """Which part of the full parameter a rank holds: along `dim`, the ranges (src_start, src_stop)
    of the full tensor, concatenated in this order into the local tensor."""

    full_shape: tuple[int, ...]
    dim: int
    ranges: tuple[tuple[int, int], ...]

    @property
    def local_shape(self) -> tuple[int, ...]:
        shape = list(self.full_shape)
        shape[self.dim] = sum(b - a for a, b in self.ranges)
        return tuple(shape)

    def pieces(self):
        """(src_index, dst_index): tuples of slices over the full / local tensor."""
        off = 0
        for a, b in self.ranges:
            src = [slice(None)] * len(self.full_shape)
            dst = [slice(None)] * len(self.full_shape)
            src[self.dim] = slice(a, b)
            dst[self.dim] = slice(off, off + b - a)
            off += b - a
            yield tuple(src), tuple(dst)

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's local tensor from the full one (works on the meta device)."""
        parts = [full[src] for src, _ in self.pieces()]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)


@dataclass
class TPInfo:
    rank: int
    world: int
    group: object | None  # torch.distributed ProcessGroup (None: the default group, or no communication)
    shard_mlp: bool
    plan: dict[str, ParamShard] = field(default_factory=dict)  # local parameter name -> its slices
    hooks: list = field(default_factory=list)

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.world == 1:
            return t
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError(f"this model is sharded over {self.world} ranks but torch.distributed is not "
                               "initialised (stem_boost.dist.init_from_env())")
        rop = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
        if t.is_cuda and dist.get_backend(self.group) == "gloo":  # gloo on GPUs (tests): through the host
            host = t.cpu()
            dist.all_reduce(host, op=rop, group=self.group)
            return t.copy_(host)
        dist.all_reduce(t, op=rop, group=self.group)
        return t


class RowParallelLinear(nn.Linear):
    """nn.Linear holding the input columns of its rank: y = all_reduce(x W_r^T) + b (b replicated)."""

    _tp: TPInfo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._tp.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class _NormReducer:
    """The reducer installed with `set_head_norm_reducer`: `(norms [B, H_local, T], how) -> [B, 1, T]`: aggregate over all heads."""

    def __init__(self, tp: TPInfo, total_heads: int):
        self.tp, self.total_heads = tp, total_heads

    def __call__(self, norms: torch.Tensor, how: str = "rms") -> torch.Tensor:
        n = norms.float()
        if how == "rms":
            s = self.tp.all_reduce(n.square().sum(dim=1, keepdim=True).contiguous())
            return (s / self.total_heads).sqrt()
        if how == "mean":
            return self.tp.all_reduce(n.sum(dim=1, keepdim=True).contiguous()) / self.total_heads
        if how == "max":
            return self.tp.all_reduce(n.amax(dim=1, keepdim=True).contiguous(), op="max")
        raise ValueError(f"head_agg={how!r} is not one of ('rms', 'max', 'mean')")


def _resolve_group(group, rank, world):
    import torch.distributed as dist

    if world is not None and int(world) == 1 and group is None:  # explicitly unsharded (e.g. a TP=1 reference)
        if rank not in (None, 0):
            raise ValueError(f"rank={rank} is outside [0, world=1)")
        return None, 0, 1
    if dist.is_available() and dist.is_initialized():
        g_rank, g_world = dist.get_rank(group), dist.get_world_size(group)
        if rank is not None and rank != g_rank or world is not None and world != g_world:
            raise ValueError(f"rank/world ({rank}, {world}) disagree with the process group ({g_rank}, {g_world})")
        return group, g_rank, g_world
    if group is not None:
        raise ValueError("a process group was given but torch.distributed is not initialised")
    rank = 0 if rank is None else int(rank)
    world = 1 if world is None else int(world)
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} is outside [0, world={world})")
    return None, rank, world


def _split(n: int, world: int, rank: int, what: str) -> tuple[int, int]:
    if n % world:
        raise ValueError(f"{what}={n} is not divisible by the tensor-parallel size {world}")
    k = n // world
    return rank * k, (rank + 1) * k


def _set_param(module: nn.Module, name: str, spec: ParamShard, plan: dict, prefix: str) -> None:
    p = getattr(module, name)
    if tuple(p.shape) != spec.full_shape:
        raise ValueError(f"{prefix}{name}: shape {tuple(p.shape)} != expected full shape {spec.full_shape} "
                         "(already sharded?)")
    local = spec.take(p.data)
    if not local.is_meta:
        local = local.clone()  # own storage: the full tensor can be freed
    setattr(module, name, nn.Parameter(local, requires_grad=p.requires_grad))
    plan[prefix + name] = spec


def _shard_linear_rows(lin: nn.Linear, ranges, plan, prefix):
    """Column parallel (output features)."""
    full = tuple(lin.weight.shape)
    _set_param(lin, "weight", ParamShard(full, 0, tuple(ranges)), plan, prefix)
    if lin.bias is not None:
        _set_param(lin, "bias", ParamShard(tuple(lin.bias.shape), 0, tuple(ranges)), plan, prefix)
    lin.out_features = lin.weight.shape[0]


def _shard_linear_cols(lin: nn.Linear, ranges, plan, prefix):
    """Row parallel (input features); the bias stays whole (added once, after the reduction)."""
    full = tuple(lin.weight.shape)
    _set_param(lin, "weight", ParamShard(full, 1, tuple(ranges)), plan, prefix)
    lin.in_features = lin.weight.shape[1]


def _shard_attention(attn: nn.Module, tp: TPInfo, prefix: str) -> None:
    H = int(attn.num_heads)
    h0, h1 = _split(H, tp.world, tp.rank, "num_attention_heads")
    qk, nope, vd = int(attn.qk_head_dim), int(attn.qk_nope_head_dim), int(attn.v_head_dim)
    q_lin = attn.q_b_proj if getattr(attn, "q_b_proj", None) is not None else attn.q_proj
    q_name = "q_b_proj" if getattr(attn, "q_b_proj", None) is not None else "q_proj"
    _shard_linear_rows(q_lin, [(h0 * qk, h1 * qk)], tp.plan, f"{prefix}{q_name}.")
    _shard_linear_rows(attn.kv_b_proj, [(h0 * (nope + vd), h1 * (nope + vd))], tp.plan, f"{prefix}kv_b_proj.")
    _shard_linear_cols(attn.o_proj, [(h0 * vd, h1 * vd)], tp.plan, f"{prefix}o_proj.")
    attn.o_proj.__class__ = RowParallelLinear
    attn.o_proj._tp = tp
    attn.num_heads = h1 - h0
    set_head_norm_reducer(attn, _NormReducer(tp, H))
    attn._stem_tp_heads = (h0, h1, H)


def _is_gated_mlp(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, a, None), nn.Linear) for a in ("gate_proj", "up_proj", "down_proj"))


def _shard_gated_mlp(mlp: nn.Module, tp: TPInfo, prefix: str) -> None:
    if mlp.down_proj.bias is not None:
        raise NotImplementedError(f"{prefix}down_proj has a bias: not supported by the MLP sharding")
    inter = mlp.gate_proj.weight.shape[0]
    r = _split(inter, tp.world, tp.rank, f"{prefix} intermediate size")
    _shard_linear_rows(mlp.gate_proj, [r], tp.plan, f"{prefix}gate_proj.")
    _shard_linear_rows(mlp.up_proj, [r], tp.plan, f"{prefix}up_proj.")
    _shard_linear_cols(mlp.down_proj, [r], tp.plan, f"{prefix}down_proj.")
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = r[1] - r[0]


def _shard_experts(experts: nn.Module, tp: TPInfo, prefix: str) -> None:
    gu, dn = experts.gate_up_proj, experts.down_proj
    if gu.dim() != 3 or dn.dim() != 3 or gu.shape[1] != 2 * dn.shape[2]:
        raise NotImplementedError(f"{prefix}: unexpected fused expert shapes {tuple(gu.shape)}, {tuple(dn.shape)}")
    if getattr(experts, "has_bias", False) or getattr(experts, "gate_up_proj_bias", None) is not None:
        raise NotImplementedError(f"{prefix}: experts with biases are not supported by the MLP sharding")
    inter = dn.shape[2]
    a, b = _split(inter, tp.world, tp.rank, f"{prefix} moe intermediate size")
    _set_param(experts, "gate_up_proj", ParamShard(tuple(gu.shape), 1, ((a, b), (inter + a, inter + b))),
               tp.plan, prefix)
    _set_param(experts, "down_proj", ParamShard(tuple(dn.shape), 2, ((a, b),)), tp.plan, prefix)
    if hasattr(experts, "intermediate_dim"):
        experts.intermediate_dim = b - a


def _shard_mlp(mlp: nn.Module, tp: TPInfo, prefix: str) -> bool:
    """Split the intermediate dimension of a dense MLP or an MoE block (routed + shared experts).
    Returns False when the module is of an unknown kind (left replicated)."""
    if _is_gated_mlp(mlp):
        _shard_gated_mlp(mlp, tp, prefix)
        return True
    experts = getattr(mlp, "experts", None)
    if experts is None or not hasattr(experts, "gate_up_proj"):
        return False
    _shard_experts(experts, tp, prefix + "experts.")
    shared = getattr(mlp, "shared_experts", None)
    if shared is not None:
        if not _is_gated_mlp(shared):
            raise NotImplementedError(f"{prefix}shared_experts is not a gate/up/down MLP")
        _shard_gated_mlp(shared, tp, prefix + "shared_experts.")
    return True


def _reduce_output_hook(tp: TPInfo):
    def hook(module, args, output):
        return tp.all_reduce(output.contiguous())

    return hook


def shard_dsa_model(model: nn.Module, group=None, *, rank: int | None = None, world: int | None = None,
                    shard_mlp: bool = True) -> nn.Module:
    """Shard a DSA model in place for tensor parallelism; returns the same model.

    group: a torch.distributed process group (None: the default group when torch.distributed is
        initialised). Without torch.distributed, `rank`/`world` give the layout (shapes only: a
        forward with world > 1 then raises); that is how a checkpoint loader plans its slices.
    shard_mlp: also split the MLPs / experts (default; needed for the large models, whose weights
        are mostly experts). False keeps them replicated (attention only).

    Works before or after `stem_boost.wrap`, on real or meta parameters. Sharding twice raises.
    """
    if getattr(model, "_stem_tp", None) is not None:
        raise ValueError("shard_dsa_model: this model is already sharded")
    group, rank, world = _resolve_group(group, rank, world)
    tp = TPInfo(rank=rank, world=world, group=group, shard_mlp=shard_mlp)
    attn_names = [n for n, m in model.named_modules() if is_dsa_attention(m)]
    if not attn_names:
        raise ValueError(f"{type(model).__name__} has no DSA (MLA + lightning indexer) attention layer")
    model._stem_tp = tp
    if world == 1:
        return model
    modules = dict(model.named_modules())
    for name in attn_names:
        _shard_attention(modules[name], tp, name + ".")
    if shard_mlp:
        for name, m in modules.items():
            if name.endswith(".mlp") and _shard_mlp(m, tp, name + "."):
                tp.hooks.append(m.register_forward_hook(_reduce_output_hook(tp)))
    return model


def _wrapped_attention(model: nn.Module):
    for name, m in model.named_modules():
        st = getattr(m, "_stem", None)
        if st is not None and hasattr(st, "last_stem"):
            yield name, st


def layer_selection_digests(model: nn.Module) -> list[str]:
    """sha256 (16 hex digits) of each wrapped DSA layer's last Stem selection (valid entries and
    counts); "none" for a layer without one."""
    out = []
    for _, st in _wrapped_attention(model):
        if not st.cfg.keep_selections:
            raise ValueError(NOT_KEPT.format(what="layer_selection_digests"))
        sel = st.last_stem
        if sel is None:
            out.append("none")
            continue
        idx = sel.idx.detach().to("cpu", torch.int64)
        counts = sel.counts.detach().to("cpu", torch.int64)
        valid = torch.arange(idx.shape[-1]) < counts.unsqueeze(-1)
        h = hashlib.sha256()
        h.update(str(tuple(idx.shape)).encode())
        h.update(counts.numpy().tobytes())
        h.update(torch.where(valid, idx, torch.full_like(idx, -1)).numpy().tobytes())
        out.append(h.hexdigest()[:16])
    return out


def selection_digest(model: nn.Module) -> str:
    """One sha256 over every layer's last Stem selection: equal on all ranks iff the ranks selected
    the same keys everywhere. Raises if the model is not wrapped by stem_boost.wrap."""
    layers = layer_selection_digests(model)
    if not layers:
        raise ValueError("selection_digest: no wrapped DSA layer (stem_boost.wrap the model first)")
    return hashlib.sha256("|".join(layers).encode()).hexdigest()


def gather_digests(model: nn.Module, group=None) -> list[str]:
    """`selection_digest` of every rank of `group` (all_gather_object), in rank order."""
    import torch.distributed as dist

    mine = selection_digest(model)
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, mine, group=group)
    return out
