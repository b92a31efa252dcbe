"""`stem-boost compare` on several processes: who runs which work unit, and the gathering.

Launched with ``torchrun --nproc_per_node N`` or ``deepspeed --num_gpus N``, every process loads
the model (one GPU each: cuda:LOCAL_RANK; gloo on the CPU), builds the same list of work units,
runs the units `assign` gives it and sends its results to rank 0, which writes the report.
Without a launcher (no WORLD_SIZE, or 1) the team is one process and nothing is initialised.

Each unit is seeded from its own name (`unit_seed`), never from what ran before it, so the split
does not change a number: a run on N processes equals the run on one (timings aside).
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import torch

__all__ = ["Team", "assign", "join_team", "unit_seed"]


@dataclass
class Team:
    """This process's place in the run: ``rank`` of ``world``; ``owns_group``: `join_team`
    initialised torch.distributed (and `leave` tears it down)."""

    rank: int = 0
    world: int = 1
    owns_group: bool = False
    group: object = None  # a gloo group for Python objects (NCCL groups move tensors only)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_gather(self, obj) -> list:
        """``obj`` of every rank, in rank order (on every rank)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def gather(self, obj) -> list | None:
        """``obj`` of every rank in rank order on rank 0; None elsewhere."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def leave(self) -> None:
        """Wait for every rank, then tear down the process group if `join_team` made it."""
        if self.world == 1:
            return
        import torch.distributed as dist

        dist.barrier(group=self.group)
        if self.owns_group:
            dist.destroy_process_group()


def join_team() -> Team:
    """The team of this process: torch.distributed from the launcher's environment
    (`stem_boost.dist.init_from_env`: nccl and cuda:LOCAL_RANK with CUDA, else gloo) when
    WORLD_SIZE > 1, else a team of one."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not (dist.is_available() and dist.is_initialized()):
        return Team()
    from ..dist import init_from_env

    was_initialised = dist.is_initialized()
    rank, world, _device = init_from_env()
    if world == 1:
        return Team()
    group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return Team(rank=rank, world=world, owns_group=not was_initialised, group=group)


def assign(bundle_costs: list[float], world: int) -> list[int]:
    """The rank of each bundle of work: longest first, each to the least loaded rank (ties: the
    lower rank). Deterministic, so every rank computes the same split."""
    if world < 1:
        raise ValueError(f"world={world} must be >= 1")
    load = [0.0] * world
    owner = [0] * len(bundle_costs)
    for i in sorted(range(len(bundle_costs)), key=lambda i: (-bundle_costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += bundle_costs[i]
    return owner


def unit_seed(base: int, name: str) -> int:
    """The torch seed of the unit called ``name``: the same on every rank and in every split."""
    return (int(base) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def seed_unit(base: int, name: str) -> None:
    torch.manual_seed(unit_seed(base, name))
