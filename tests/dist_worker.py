"""Worker of tests/test_dist.py: one tensor-parallel rank on the gloo backend (CPU, loopback only).

Helper module (not collected by pytest). `run(rank, world, port, workdir)` is started by
torch.multiprocessing.spawn; it writes its results to workdir/rank{rank}.pt.

Exit: each rank saves its results, waits at a barrier for the other, and leaves with os._exit(0).
Tearing gloo down in a short-lived process (destroy_process_group, then the interpreter's own
exit while the rank that hosts the TCP store may already be gone) aborted a rank now and then
("terminate called without an active exception", SIGABRT) after all its work was done and saved;
the parent then failed on the exit signal instead of reading the results.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

SEQ = 48
REDUCE = 0.15


def input_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(3, 256, (2, SEQ), generator=g)


def run(rank: int, world: int, port: int, workdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    import stem_boost
    from stem_boost.dist import gather_digests, init_from_env, layer_selection_digests, load_sharded_checkpoint
    from stem_boost.dist import selection_digest, shard_dsa_model
    from tests.dsa_tiny import build_deepseek_v32

    workdir = Path(workdir)
    out = {}
    try:
        r, w, device = init_from_env(timeout_s=300.0)  # a failed peer ends the test in minutes, not 30
        out["env"] = (r, w, str(device), dist.get_backend())
        ids = input_ids()

        # A: in-memory model, wrapped BEFORE sharding
        model = build_deepseek_v32(seed=0)
        stem_boost.wrap(model, reduce=REDUCE, keep_selections=True)
        shard_dsa_model(model)
        with torch.no_grad():
            out["logits_a"] = model(ids).logits
        out["digest_a"] = selection_digest(model)
        out["layer_digests_a"] = layer_selection_digests(model)
        out["all_digests_a"] = gather_digests(model)
        out["stats_a"] = stem_boost.stats(model)
        sharded_sd = {k: v.clone() for k, v in model.state_dict().items()}
        del model

        # B: sharded checkpoint loaded slice by slice, wrapped AFTER sharding
        loaded = load_sharded_checkpoint(workdir / "ckpt")
        loaded_sd = loaded.state_dict()
        out["param_keys_equal"] = sorted(loaded_sd) == sorted(sharded_sd)
        out["param_max_diff"] = max(float((loaded_sd[k].float() - sharded_sd[k].float()).abs().max())
                                    for k in sharded_sd)
        out["shapes_equal"] = all(loaded_sd[k].shape == sharded_sd[k].shape for k in sharded_sd)
        stem_boost.wrap(loaded, reduce=REDUCE, keep_selections=True)
        with torch.no_grad():
            out["logits_b"] = loaded(ids).logits
        out["digest_b"] = selection_digest(loaded)
        attn = loaded.model.layers[0].self_attn
        out["local_heads"] = int(attn.num_heads)
    except Exception as e:  # noqa: BLE001 - reported to the parent
        import traceback

        out["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    finally:
        torch.save(out, workdir / f"rank{rank}.pt")
        if dist.is_initialized() and "error" not in out:
            dist.barrier()  # both ranks' results are on disk before either process ends
        os._exit(0)
