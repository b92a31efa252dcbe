"""Tensor-parallel check of `stem_boost.dist` on a DeepSeek-V3.2-shaped model with random weights.

    python -m stem_boost.dist.check                     # 2 GPUs: deepspeed (torchrun when DeepSpeed is absent)
    python -m stem_boost.dist.check --cpu               # tiny dims, gloo, 2 CPU processes (tests/test_dist.py)
    python -m stem_boost.dist.check --one-gpu           # both ranks on one GPU (gloo): a rehearsal

It writes a random checkpoint (128 MLA heads, DeepSeek-V3.2's MLA / indexer dims, 2 layers, 8
experts; tiny dims with --cpu) as sharded safetensors, then starts the ranks with the launcher,
each running `run`: load this rank's shard (`load_sharded_checkpoint`), wrap with Stem
(reduce=0.15), and
  1. correctness (fp32, TF32 off): rank 0 also loads the whole model (TP=1); logits of TP=1 vs
     TP=N (relative max error), the Stem selection digests of every rank (must be equal), and
     the share of query rows whose Stem selection equals TP=1's;
  2. timing (the default indexer dtype): prefill (logits of the last position only) at each length, TP=1
     (rank 0 alone, the others wait) and TP=N, native selection (reduce=0) and Stem.
Results: OUT/dist_check.json (rank 0), a summary on stdout, and "DIST CHECK PASSED" or
"DIST CHECK FAILED: ..." as the last line; exit status 0 / 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..config import StemConfig

# DeepSeek-V3.2's attention and indexer dims (128 MLA heads, q_lora 1536, kv_lora 512, nope 128,
# rope 64, v 128, indexer 64 heads x 128, top-k 2048, YaRN x40); 2 layers (dense + MoE with 8
# experts), a 32K vocabulary.
MID = dict(
    vocab_size=32768, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
    num_hidden_layers=2, first_k_dense_replace=1, mlp_layer_types=["dense", "sparse"],
    num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1, n_routed_experts=8,
    num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5,
    kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
    index_n_heads=64, index_head_dim=128, index_topk=2048, max_position_embeddings=163840,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                     "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                     "mscale": 1.0, "mscale_all_dim": 1.0},
    tie_word_embeddings=False, initializer_range=0.02,
)
TINY = dict(MID, vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, n_group=1, topk_group=1,
            kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
            index_n_heads=4, index_head_dim=16, index_topk=16, max_position_embeddings=4096,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 1024, "beta_fast": 32.0, "beta_slow": 1.0,
                             "mscale": 1.0, "mscale_all_dim": 1.0},
            initializer_range=0.2)


def log(*a):
    print(f"[rank {os.environ.get('RANK', '0')}]", *a, flush=True)


def make_ckpt(out: Path, cpu: bool, seed: int = 0) -> None:
    """A random-weight DeepSeek-V3.2-shaped checkpoint (TINY on the CPU, MID else) as sharded safetensors."""
    from transformers import AutoModelForCausalLM, DeepseekV32Config

    if (out / "model.safetensors.index.json").exists():
        log(f"checkpoint already at {out}")
        return
    cfg = DeepseekV32Config(**(TINY if cpu else MID))
    device = "cpu" if cpu or not torch.cuda.is_available() else "cuda"
    torch.manual_seed(seed)
    t0 = time.time()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32 if cpu else torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, max_shard_size="50KB" if cpu else "2GB")
    log(f"random checkpoint: {n / 1e9:.3f}B params, {len(list(out.glob('*.safetensors')))} files, "
        f"{time.time() - t0:.1f}s -> {out}")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(model, ids, device):
    import torch.distributed as dist

    sync(device)
    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(ids, logits_to_keep=1, use_cache=False).logits
    sync(device)
    return out, time.perf_counter() - t0


def rows_equal(sel_a, sel_b) -> float:
    """Share of query rows whose selected key sets are equal."""
    a, ca = sel_a.idx.long(), sel_a.counts.long()
    b, cb = sel_b.idx.long().to(a.device), sel_b.counts.long().to(a.device)
    k = max(a.shape[-1], b.shape[-1])
    big = 1 << 40

    def norm(x, c):
        x = torch.nn.functional.pad(x, (0, k - x.shape[-1]), value=-1)
        valid = torch.arange(k, device=x.device) < c.unsqueeze(-1)
        return torch.where(valid, x, torch.full_like(x, big)).sort(-1).values

    same = (norm(a, ca) == norm(b, cb)).all(-1) & (ca == cb)
    return float(same.float().mean())


def run(ckpt: Path, out_dir: Path, lengths: list[int], check_len: int, reps: int, cpu: bool = False,
        one_gpu: bool = False, backend: str | None = None, indexer_dtype: str | None = None) -> int:
    """One rank of the check (started by the launcher); 0 when every rank passed."""
    import torch.distributed as dist

    import stem_boost
    from stem_boost.dist import gather_digests, init_from_env, load_sharded_checkpoint, selection_digest

    rank, world, device = init_from_env(backend=backend, share_devices=one_gpu)
    log(f"world {world}, device {device}, backend {dist.get_backend() if dist.is_initialized() else '-'}")
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results: dict = dict(world=world, device=str(device), cpu_mode=cpu,
                         gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    failures: list[str] = []
    ckpt_config = json.loads((ckpt / "config.json").read_text())
    vocab = ckpt_config["vocab_size"]
    g = torch.Generator().manual_seed(7)

    def barrier():
        if dist.is_initialized():
            dist.barrier()

    # ---------------------------------------------------------------- 1. correctness (fp32)
    ids = torch.randint(3, vocab, (1, check_len), generator=g).to(device)
    t0 = time.time()
    model = load_sharded_checkpoint(ckpt, device=device, dtype=torch.float32)
    results["load_fp32_tp_s"] = round(time.time() - t0, 2)
    stem_boost.wrap(model, reduce=0.15, keep_selections=True)
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits.float()
    digests = gather_digests(model)
    results["digests_tp"] = digests
    results["stats_tp"] = {k: v for k, v in stem_boost.stats(model).items() if k != "layers"}
    if len(set(digests)) != 1:
        failures.append(f"Stem selections differ across ranks: {digests}")
    # every rank's logits are the same bits (the all_reduce result)
    if world > 1:
        host = logits.cpu()
        gathered = [torch.empty_like(host) for _ in range(world)]
        dist.all_gather(gathered, host)
        logits = host
        results["logits_rank_maxdiff"] = max(float((x - logits).abs().max()) for x in gathered)
        if results["logits_rank_maxdiff"] != 0.0:
            failures.append(f"logits differ across ranks by {results['logits_rank_maxdiff']}")
    if rank == 0:
        sels_tp = stem_boost.last_selections(model)
        ref = load_sharded_checkpoint(ckpt, rank=0, world=1, device=device, dtype=torch.float32)
        stem_boost.wrap(ref, reduce=0.15, keep_selections=True)
        with torch.no_grad():
            ref_logits = ref(ids, use_cache=False).logits.float().cpu()
        logits = logits.cpu()
        scale = float(ref_logits.abs().max())
        err = float((logits - ref_logits).abs().max())
        results.update(logits_maxabs_tp1=scale, logits_maxdiff_tp1_vs_tp=err, logits_relerr=err / max(scale, 1e-30),
                       argmax_agree=float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()),
                       digest_tp1=selection_digest(ref),
                       selection_rows_equal=[rows_equal(s, r) for s, r in
                                             zip(sels_tp, stem_boost.last_selections(ref))],
                       stats_tp1={k: v for k, v in stem_boost.stats(ref).items() if k != "layers"})
        # GPU: a few near-tied indexer / OAM scores flip between TP=1 and TP=2 (fp32 summation order
        # of the all-reduced hidden states and norms); the rows they touch dominate the error
        # (1-GPU rehearsal, 128 heads, S=4096: 0.3% of layer-1 rows, relative error 1.2e-3).
        tol = 1e-4 if cpu else 5e-3
        if not results["logits_relerr"] < tol:
            failures.append(f"TP={world} vs TP=1 logits: relative error {results['logits_relerr']:.2e} >= {tol}")
        if results["argmax_agree"] < 0.99:
            failures.append(f"TP={world} vs TP=1: next-token argmax agrees on {results['argmax_agree']:.3f} of positions")
        if min(results["selection_rows_equal"]) < (1.0 if cpu else 0.99):
            failures.append(f"Stem selection rows equal to TP=1: {results['selection_rows_equal']}")
        log(f"fp32 S={check_len}: TP={world} vs TP=1 rel err {results['logits_relerr']:.2e}, "
            f"rows equal {results['selection_rows_equal']}, digests {digests} vs TP=1 {results['digest_tp1']}")
        del ref
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    barrier()

    # ---------------------------------------------------------------- 2. timing (the default indexer dtype)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    # the indexer dtype `wrap` runs by default on this device (fp8 / bf16 fused Triton scorer on CUDA)
    idx_dtype = indexer_dtype or StemConfig().indexer_dtype_on(device, ckpt_config["index_head_dim"])
    results["timing_indexer_dtype"] = idx_dtype
    timing: dict = {}
    for tp in ([1, world] if world > 1 else [1]):
        active = tp == world or rank == 0
        model = None
        if active:
            model = load_sharded_checkpoint(ckpt, rank=0 if tp == 1 else None, world=1 if tp == 1 else None,
                                            device=device, dtype=dtype)
            warm = torch.randint(3, vocab, (1, min(lengths[0], 4096)), generator=torch.Generator().manual_seed(1))
            for reduce_ in (0.0, 0.15):  # Triton compiles, CUDA allocator warm-up
                stem_boost.wrap(model, reduce=reduce_, beta=0.2 if reduce_ else 0.0, indexer_dtype=idx_dtype)
                with torch.no_grad():
                    model(warm.to(device), logits_to_keep=1, use_cache=False)
        for L in lengths:
            x = torch.randint(3, vocab, (1, L), generator=torch.Generator().manual_seed(L)).to(device)
            for mode, reduce_ in (("native", 0.0), ("stem", 0.15)):
                times = []
                for _ in range(reps):
                    if tp == 1:
                        barrier()
                        if active:
                            stem_boost.wrap(model, reduce=reduce_, beta=0.2 if reduce_ else 0.0, indexer_dtype=idx_dtype)
                            sync(device)
                            t0 = time.perf_counter()
                            with torch.no_grad():
                                model(x, logits_to_keep=1, use_cache=False)
                            sync(device)
                            times.append(time.perf_counter() - t0)
                        barrier()
                    else:
                        stem_boost.wrap(model, reduce=reduce_, beta=0.2 if reduce_ else 0.0, indexer_dtype=idx_dtype)
                        _, dt = prefill(model, x, device)
                        times.append(dt)
                if active:
                    best = min(times[1:] if len(times) > 1 else times)
                    timing[f"tp{tp}_{mode}_{L}"] = round(best * 1000, 1)
                    if rank == 0:
                        log(f"prefill TP={tp} {mode:6s} S={L}: {best * 1000:.1f} ms (runs {[round(t * 1000, 1) for t in times]})")
            if device.type == "cuda" and active and rank == 0:
                timing[f"tp{tp}_peak_mem_gib_{L}"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        barrier()
    results["prefill_ms"] = timing

    comm_dev = device if device.type == "cuda" and dist.is_initialized() and dist.get_backend() == "nccl" else "cpu"
    ok = torch.tensor([0 if failures else 1], device=comm_dev)
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        results["failures"] = failures
        (out_dir / "dist_check.json").write_text(json.dumps(results, indent=1))
        log(json.dumps(results, indent=1))
        print("DIST CHECK PASSED" if int(ok) == 1 and not failures else f"DIST CHECK FAILED: {failures}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if int(ok) == 1 else 1


def launch_command(launcher: str, nproc: int, port: int, cpu: bool) -> list[str]:
    """The launcher's command line up to the module to run (deepspeed counts accelerators on the CPU)."""
    if launcher == "deepspeed":
        count = "--num_accelerators" if cpu else "--num_gpus"
        return [sys.executable, "-m", "deepspeed.launcher.runner", count, str(nproc), "--master_addr", "127.0.0.1",
                "--master_port", str(port), "--module"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(port), "-m"]


def pick_launcher(asked: str) -> str:
    """deepspeed when asked for and importable, else torchrun."""
    if asked == "deepspeed":
        from .deepspeed_inference import deepspeed_available

        if deepspeed_available():
            return "deepspeed"
        log("deepspeed cannot be imported: falling back to torchrun")
    return "torchrun"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="tiny dims, gloo, CPU processes")
    p.add_argument("--one-gpu", action="store_true", help="every rank on cuda:0 with gloo (timings mean nothing)")
    p.add_argument("--nproc", type=int, default=2, help="ranks (GPUs)")
    p.add_argument("--launcher", choices=["deepspeed", "torchrun"], default="deepspeed")
    p.add_argument("--port", type=int, default=29517)
    p.add_argument("--ckpt", type=Path, default=None, help="checkpoint folder (written when absent)")
    p.add_argument("--out", type=Path, default=Path("out/dist_check"), help="results folder")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="timed prefill lengths")
    p.add_argument("--check-len", type=int, default=None, help="tokens of the fp32 correctness check")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--indexer-dtype", choices=["float32", "bfloat16", "fp8"], default=None,
                   help="indexer scores of the timed runs (default: what `wrap` runs on the device: fp8 on "
                        "GPUs with FP8 tensor cores, else bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one rank, started by the launcher
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed's
    a = p.parse_args(argv)
    a.ckpt = a.ckpt or (a.out / "ckpt_tiny" if a.cpu else Path("/tmp/stem_dsv32_mid"))
    a.lengths = a.lengths or ([64, 128] if a.cpu else [32768, 65536])
    a.check_len = a.check_len or (48 if a.cpu else 4096)
    a.reps = a.reps or (2 if a.cpu else 3)
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        return run(a.ckpt, a.out, a.lengths, a.check_len, a.reps, cpu=a.cpu, one_gpu=a.one_gpu,
                   backend="gloo" if a.one_gpu else None, indexer_dtype=a.indexer_dtype)
    if not a.cpu and not a.one_gpu and torch.cuda.device_count() < a.nproc:
        print(f"need {a.nproc} GPUs, {torch.cuda.device_count()} visible (--one-gpu rehearses on one, --cpu on the CPU)")
        return 1
    a.out.mkdir(parents=True, exist_ok=True)
    make_ckpt(a.ckpt, a.cpu)
    launcher = "torchrun" if a.one_gpu else pick_launcher(a.launcher)
    worker = ["stem_boost.dist.check", "--worker", "--ckpt", str(a.ckpt), "--out", str(a.out), "--check-len",
              str(a.check_len), "--reps", str(a.reps), "--lengths", *map(str, a.lengths)]
    worker += ["--cpu"] * a.cpu + ["--one-gpu"] * a.one_gpu
    worker += ["--indexer-dtype", a.indexer_dtype] if a.indexer_dtype else []
    cmd = launch_command(launcher, a.nproc, a.port, a.cpu) + worker
    # NVLink multicast stays off (shared machines); one thread per rank on the CPU
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
               PYTHONUNBUFFERED="1", **({"OMP_NUM_THREADS": "1"} if a.cpu else {}))
    log("launch: " + " ".join(cmd))
    return subprocess.run(cmd, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
