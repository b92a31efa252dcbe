"""DeepSpeed integration: DeepSpeed's launcher and communication, stem_boost's own sharding.

    deepspeed --num_gpus 8 my_script.py
    # my_script.py
    model = load_sharded_checkpoint(path, ...)       # or any full model on the CPU / meta-free
    model = init_deepspeed_tp(model, tp_size=8, dtype=torch.bfloat16)
    stem_boost.wrap(model, reduce=0.15)

Decision: `deepspeed.init_inference(model, tensor_parallel={"tp_size": n},
replace_with_kernel_inject=False)` is NOT used to shard DSA models. DeepSpeed's AutoTP
(deepspeed/module_inject/auto_tp.py, checked on DeepSpeed 0.19.8, the version of the wheel in
.whl/, by running it on the tiny DeepSeek-V3.2 model with 2 gloo ranks) cannot be told to leave
the lightning indexer replicated:
  * AutoTP turns every nn.Linear of a decoder layer into a column-parallel LinearLayer unless its
    name is a hard-coded skip (`mlp.gate`, `q_a_proj`, `kv_a_proj_with_mqa`, ...) or an all-reduce
    layer. The indexer's `wq_b` and `weights_proj` are column-sharded (each rank scores with half
    of the indexer heads: a different top-k per rank), and `wk` (followed by the `k_norm`
    LayerNorm) is taken for an all-reduce (row-parallel) layer by the parser's "linear before a
    norm" rule: the forward then fails (`mat1 and mat2 shapes cannot be multiplied`).
  * With an `injection_policy` ({DecoderLayer: ("self_attn.o_proj", "mlp.down_proj")}) the
    indexer linears are still column-sharded (wk to half its head_dim: `k_norm` fails).
  * `update_mp_params` divides any `n_heads` / `num_heads` / `hidden_size` attribute of every
    sub-module by the TP size, so the indexer's `n_heads` (and its `n_heads ** -0.5` weight
    scale) changes even where its weights would be kept whole.
  * The inference config has no `partition_config` (the configurable AutoTP specs with a SKIP
    type exist only in the training engine's tensor_parallel config), and transformers 5's fused
    experts (`experts.gate_up_proj` [E, 2I, D]) are not sharded at all: the experts, most of
    DeepSeek-V3.2's 671B parameters, would be replicated on every GPU.
  * Stem also needs the OAM value norms reduced over the ranks' heads, which AutoTP has no hook for.
So the model is sharded by `stem_boost.dist.tp.shard_dsa_model` (heads split, indexer replicated,
norms all-reduced, MLP / experts split), and DeepSpeed provides the launcher (`deepspeed
--num_gpus N`, which sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT) and
`deepspeed.init_distributed` (which also discovers MPI / SLURM environments). The model's
collectives are torch.distributed calls on the group DeepSpeed initialised (deepspeed.comm wraps
the same process group), so the same code runs under torchrun without DeepSpeed.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import nn

from .tp import shard_dsa_model

__all__ = ["deepspeed_available", "init_deepspeed_tp", "tp_group"]

INSTALL_HINT = "DS_BUILD_OPS=0 pip install deepspeed   (or: pip install 'stem-boost[dist]')"


def deepspeed_available() -> bool:
    """True when `import deepspeed` can be attempted (the package is installed)."""
    return importlib.util.find_spec("deepspeed") is not None


def tp_group(tp_size: int):
    """The process group of this rank's tensor-parallel block of `tp_size` consecutive ranks (None =
    the default group when tp_size == world). Every rank must call it (new_group is collective)."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    if tp_size < 1 or world % tp_size:
        raise ValueError(f"tp_size={tp_size} must divide the world size {world}")
    if tp_size == world:
        return None
    mine = None
    for start in range(0, world, tp_size):
        g = dist.new_group(list(range(start, start + tp_size)))
        if start <= rank < start + tp_size:
            mine = g
    return mine


def _to(model: nn.Module, device: torch.device, dtype: torch.dtype | None) -> None:
    from .loading import fp32_names

    keep = fp32_names(model, dtype) if dtype is not None else []
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_meta:
            raise ValueError(f"{name} is on the meta device: load it first (load_sharded_checkpoint)")
    for mname, mod in model.named_modules():
        for coll in (mod._parameters, mod._buffers):
            for n, t in list(coll.items()):
                if t is None:
                    continue
                full = f"{mname}.{n}" if mname else n
                want = t.dtype
                if dtype is not None and t.is_floating_point() and n in mod._parameters and not any(k in full for k in keep):
                    want = dtype
                if t.device != device or t.dtype != want:
                    new = t.data.to(device=device, dtype=want)
                    coll[n] = nn.Parameter(new, requires_grad=t.requires_grad) if n in mod._parameters else new


def init_deepspeed_tp(model: nn.Module, tp_size: int | None = None, *, dtype: torch.dtype | None = None,
                      shard_mlp: bool = True, dist_backend: str | None = None) -> nn.Module:
    """Tensor-parallel inference of a DSA model under the `deepspeed` launcher.

    Initialises DeepSpeed's communication (`deepspeed.init_distributed`: nccl on CUDA, gloo on the
    CPU), makes cuda:LOCAL_RANK current, shards `model` in place with `shard_dsa_model` over
    tp_size consecutive ranks (default: all), then moves it to this rank's device (and `dtype`;
    modules kept in fp32 by the model class stay fp32). A model already sharded (e.g. by
    `load_sharded_checkpoint`) is only moved. Works before or after `stem_boost.wrap`.
    Raises ImportError when DeepSpeed is not installed (see `INSTALL_HINT`; the same sharding runs
    under torchrun with `init_from_env` + `shard_dsa_model`).
    """
    if not deepspeed_available():
        raise ImportError(f"init_deepspeed_tp needs DeepSpeed: {INSTALL_HINT}")
    import deepspeed
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    backend = dist_backend or ("nccl" if cuda else "gloo")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
    world = dist.get_world_size()
    tp_size = world if tp_size is None else int(tp_size)
    group = tp_group(tp_size)
    if getattr(model, "_stem_tp", None) is None:
        shard_dsa_model(model, group, shard_mlp=shard_mlp)
    elif model._stem_tp.world != tp_size:
        raise ValueError(f"the model is already sharded over {model._stem_tp.world} ranks, not tp_size={tp_size}")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    _to(model, device, dtype)
    return model.eval()
