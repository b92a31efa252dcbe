"""Tensor-parallel check of stem_boost.dist on a DeepSeek-V3.2-shaped model (see gpu_dist_check.sh).

    python scripts/gpu_dist_check.py make-ckpt --out DIR          # random weights, sharded safetensors
    deepspeed --num_gpus 2 scripts/gpu_dist_check.py run --ckpt DIR --out RESULTS_DIR
    torchrun --nproc_per_node 2 scripts/gpu_dist_check.py run --ckpt DIR --out RESULTS_DIR

`run` on every rank: load this rank's shard of the checkpoint (stem_boost.dist.load_sharded_checkpoint),
wrap with Stem (reduce=0.15), and
  1. correctness (fp32, TF32 off): rank 0 also loads the whole model (TP=1); logits of TP=1 vs
     TP=2 (relative max error), the Stem selection digests of every rank (must be equal), and
     the share of query rows whose Stem selection equals TP=1's;
  2. timing (bf16; CUDA only): prefill (logits of the last position only) at each length, TP=1
     (rank 0 alone, the others wait) and TP=2, native selection (reduce=0) and Stem.
Results: RESULTS_DIR/dist_check.json (rank 0), a summary on stdout, and "DIST CHECK PASSED" or
"DIST CHECK FAILED: ..." as the last line; exit status 0 / 1.
STEM_DIST_CPU=1: tiny dims, gloo, CPU (what the CI test runs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CPU_MODE = os.environ.get("STEM_DIST_CPU", "0") == "1"
# STEM_DIST_ONE_GPU=1: every rank on cuda:0 with gloo (a 1-GPU rehearsal; timings then mean nothing)
ONE_GPU = os.environ.get("STEM_DIST_ONE_GPU", "0") == "1"

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


def make_ckpt(out: Path, seed: int = 0) -> None:
    from transformers import AutoModelForCausalLM, DeepseekV32Config

    if (out / "model.safetensors.index.json").exists():
        log(f"checkpoint already at {out}")
        return
    cfg = DeepseekV32Config(**(TINY if CPU_MODE else MID))
    device = "cpu" if CPU_MODE or not torch.cuda.is_available() else "cuda"
    torch.manual_seed(seed)
    t0 = time.time()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32 if CPU_MODE else torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, max_shard_size="50KB" if CPU_MODE else "2GB")
    log(f"random checkpoint: {n / 1e9:.3f}B params, {len(list(out.glob('*.safetensors')))} files, "
        f"{time.time() - t0:.1f}s -> {out}")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prefill(model, ids, device):
    import torch.distributed as dist

    _sync(device)
    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(ids, logits_to_keep=1, use_cache=False).logits
    _sync(device)
    return out, time.perf_counter() - t0


def _rows_equal(sel_a, sel_b) -> float:
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


def run(ckpt: Path, out_dir: Path, lengths: list[int], check_len: int, reps: int) -> int:
    import torch.distributed as dist

    import stem_boost
    from stem_boost.dist import gather_digests, init_from_env, load_sharded_checkpoint, selection_digest

    rank, world, device = init_from_env(backend=os.environ.get("STEM_DIST_BACKEND") or None, share_devices=ONE_GPU)
    log(f"world {world}, device {device}, backend {dist.get_backend() if dist.is_initialized() else '-'}")
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results: dict = dict(world=world, device=str(device), cpu_mode=CPU_MODE,
                         gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    failures: list[str] = []
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(7)

    def barrier():
        if dist.is_initialized():
            dist.barrier()

    # ---------------------------------------------------------------- 1. correctness (fp32)
    ids = torch.randint(3, vocab, (1, check_len), generator=g).to(device)
    t0 = time.time()
    model = load_sharded_checkpoint(ckpt, device=device, dtype=torch.float32)
    results["load_fp32_tp_s"] = round(time.time() - t0, 2)
    stem_boost.wrap(model, reduce=0.15)
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
        sels_tp = [m._stem.last_stem for m in model._stem_wrap.modules]
        ref = load_sharded_checkpoint(ckpt, rank=0, world=1, device=device, dtype=torch.float32)
        stem_boost.wrap(ref, reduce=0.15)
        with torch.no_grad():
            ref_logits = ref(ids, use_cache=False).logits.float().cpu()
        logits = logits.cpu()
        scale = float(ref_logits.abs().max())
        err = float((logits - ref_logits).abs().max())
        results.update(logits_maxabs_tp1=scale, logits_maxdiff_tp1_vs_tp=err, logits_relerr=err / max(scale, 1e-30),
                       argmax_agree=float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()),
                       digest_tp1=selection_digest(ref),
                       selection_rows_equal=[_rows_equal(s, m._stem.last_stem)
                                             for s, m in zip(sels_tp, ref._stem_wrap.modules)],
                       stats_tp1={k: v for k, v in stem_boost.stats(ref).items() if k != "layers"})
        # GPU: a few near-tied indexer / OAM scores flip between TP=1 and TP=2 (fp32 summation order
        # of the all-reduced hidden states and norms); the rows they touch dominate the error
        # (1-GPU rehearsal, 128 heads, S=4096: 0.3% of layer-1 rows, relative error 1.2e-3).
        tol = 1e-4 if CPU_MODE else 5e-3
        if not results["logits_relerr"] < tol:
            failures.append(f"TP={world} vs TP=1 logits: relative error {results['logits_relerr']:.2e} >= {tol}")
        if results["argmax_agree"] < 0.99:
            failures.append(f"TP={world} vs TP=1: next-token argmax agrees on {results['argmax_agree']:.3f} of positions")
        if min(results["selection_rows_equal"]) < (1.0 if CPU_MODE else 0.99):
            failures.append(f"Stem selection rows equal to TP=1: {results['selection_rows_equal']}")
        log(f"fp32 S={check_len}: TP={world} vs TP=1 rel err {results['logits_relerr']:.2e}, "
            f"rows equal {results['selection_rows_equal']}, digests {digests} vs TP=1 {results['digest_tp1']}")
        del ref
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    barrier()

    # ---------------------------------------------------------------- 2. timing (bf16 on CUDA)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    # the fast indexer (bf16 scores, fused Triton kernel; BENCHMARKS.md) on CUDA
    idx_dtype = os.environ.get("STEM_DIST_INDEXER_DTYPE", "float32" if device.type == "cpu" else "bfloat16")
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
                            _sync(device)
                            t0 = time.perf_counter()
                            with torch.no_grad():
                                model(x, logits_to_keep=1, use_cache=False)
                            _sync(device)
                            times.append(time.perf_counter() - t0)
                        barrier()
                    else:
                        stem_boost.wrap(model, reduce=reduce_, beta=0.2 if reduce_ else 0.0, indexer_dtype=idx_dtype)
                        _, dt = _prefill(model, x, device)
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-ckpt")
    m.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run")
    r.add_argument("--ckpt", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--lengths", type=int, nargs="+", default=[64, 128] if CPU_MODE else [32768, 65536])
    r.add_argument("--check-len", type=int, default=48 if CPU_MODE else 4096)
    r.add_argument("--reps", type=int, default=2 if CPU_MODE else 3)
    args = p.parse_args(argv)
    if args.cmd == "make-ckpt":
        make_ckpt(args.out)
        return 0
    return run(args.ckpt, args.out, args.lengths, args.check_len, args.reps)


if __name__ == "__main__":
    sys.exit(main())
