"""Multi-GPU inference for the large DSA models: tensor parallelism, sharded loading, launchers.

    # deepspeed --num_gpus 8 my_script.py      (or: torchrun --nproc_per_node 8 my_script.py)
    from stem_boost.dist import init_from_env, load_sharded_checkpoint, selection_digest, gather_digests
    rank, world, device = init_from_env()
    model = load_sharded_checkpoint("/models/DeepSeek-V3.2", device=device, dtype=torch.bfloat16)
    stem_boost.wrap(model, reduce=0.15, keep_selections=True)  # kept: for the digests below
    logits = model(input_ids.to(device)).logits       # the same on every rank
    assert len(set(gather_digests(model))) == 1       # every rank made the same Stem selection

Modules: `tp` (shard_dsa_model: heads split, indexer replicated, OAM norms all-reduced),
`loading` (load_sharded_checkpoint: meta init + per-rank slices read from safetensors),
`deepspeed_inference` (init_deepspeed_tp: DeepSpeed's launcher / communication + our sharding).
"""

from __future__ import annotations

import atexit
import datetime
import os

import torch

from .loading import checkpoint_files, empty_model, load_sharded_checkpoint
from .tp import (ParamShard, RowParallelLinear, TPInfo, gather_digests, layer_selection_digests, selection_digest,
                 shard_dsa_model)

__all__ = [
    "init_from_env",
    "release_process_group",
    "shard_dsa_model",
    "selection_digest",
    "layer_selection_digests",
    "gather_digests",
    "load_sharded_checkpoint",
    "empty_model",
    "checkpoint_files",
    "init_deepspeed_tp",
    "deepspeed_available",
    "ParamShard",
    "RowParallelLinear",
    "TPInfo",
]


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0,
                  share_devices: bool = False) -> tuple[int, int, torch.device]:
    """Initialise torch.distributed from the launcher's environment; returns (rank, world, device).

    Reads RANK (else LOCAL_RANK), LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT: set by the
    `deepspeed` launcher and by torchrun. Backend: "nccl" when CUDA is available (device
    cuda:LOCAL_RANK, made current), else "gloo" (device cpu). Without WORLD_SIZE (a plain
    `python script.py`), or WORLD_SIZE=1, nothing is initialised and (0, 1, device) is returned.
    Calling it again after initialisation returns the same triple. The process group it makes is
    destroyed at interpreter exit (`atexit`) if nothing destroyed it before: a gloo group left to
    the interpreter's finalisation can abort the process ("terminate called without an active
    exception", seen once in a two-rank CPU run).
    share_devices=True (testing only, with backend="gloo"): ranks beyond the visible GPUs wrap
    around (rank r on cuda:(LOCAL_RANK % device_count)), e.g. TP=2 on one GPU.
    """
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", str(local_rank)))
    cuda = torch.cuda.is_available()
    if cuda:
        n_dev = torch.cuda.device_count()
        if local_rank >= n_dev and not share_devices:
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {n_dev} CUDA devices are visible")
        device = torch.device("cuda", local_rank % n_dev)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    if world <= 1:
        return 0, 1, device
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={world} but {var} is not set (launch with `deepspeed` or torchrun)")
    backend = backend or ("nccl" if cuda else "gloo")
    kwargs = dict(backend=backend, init_method="env://", rank=rank, world_size=world,
                  timeout=datetime.timedelta(seconds=timeout_s))
    if backend == "nccl":
        kwargs["device_id"] = device  # eager NCCL init, bound to this rank's GPU
    dist.init_process_group(**kwargs)
    atexit.register(release_process_group)
    return rank, world, device


def release_process_group() -> None:
    """Destroy the default process group, if any, while the interpreter is still whole (see
    `init_from_env`, which registers this at exit; `cli.entry` calls it before a worker leaves)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def deepspeed_available() -> bool:
    from .deepspeed_inference import deepspeed_available as _avail

    return _avail()


def init_deepspeed_tp(*args, **kwargs):
    from .deepspeed_inference import init_deepspeed_tp as _init

    return _init(*args, **kwargs)


init_deepspeed_tp.__doc__ = "See `stem_boost.dist.deepspeed_inference.init_deepspeed_tp`."
