"""One full-width attention layer, native vs Stem, prefill time and peak memory (run on a GPU).

dsa:      a DeepSeek-V3.2 attention layer (transformers' DeepseekV32Attention at real dims: hidden
          7168, 128 heads, MLA kv_lora 512 / rope 64 / nope 128 / v 128, q_lora 1536, indexer
          64 x 128, top-k 2048), random bf16 weights.
          (a) native transformers sdpa path (indices -> dense S x T mask; its indexer materialises
              fp32 [S, 64, T] scores), (b) native indices (chunked fused indexer) + our kernel
              (stem_boost.wrap with reduce=0, beta=0), (c) Stem at reduce=0.15.
infllmv2: a MiniCPM-4.1-8B attention layer (hidden 4096, 32 q / 2 kv heads, d 128, the real
          sparse_config), random bf16 weights. (a) dense SDPA, (b) native InfLLMv2 selection + our
          kernel, (c) Stem at reduce=0.18. Selection included in every time.
Times: triton.testing.do_bench median (CUDA events); memory: peak allocated during one forward.

    python scripts/bench_layers.py --family dsa --seqs 32768 65536 131072 --out dsa.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import stem_boost  # noqa: E402

PROFILE = False


def timed(fn, rep_ms: int = 300) -> tuple[float, float]:
    """(median ms, peak GiB above the baseline) of fn(); (nan, nan) if it runs out of memory."""
    from triton.testing import do_bench

    try:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        ms = do_bench(fn, warmup=1, rep=rep_ms, return_mode="median")
        return ms, peak
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return float("nan"), float("nan")


class _Wrapper(torch.nn.Module):
    """Holds one attention module as `model.layers[0].self_attn` so stem_boost.wrap can find it."""

    def __init__(self, attn, config):
        super().__init__()
        self.attn = attn
        self.config = config


def bench_dsa(seqs, device, native_max_seq):
    from transformers import DeepseekV32Config
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32Attention, DeepseekV32RotaryEmbedding

    cfg = DeepseekV32Config(num_hidden_layers=1, n_routed_experts=8, max_position_embeddings=163840,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    attn = DeepseekV32Attention(cfg, layer_idx=0).to(device=device, dtype=torch.bfloat16).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.02)
    for name, mod in attn.named_modules():
        if "norm" in name and hasattr(mod, "weight"):
            torch.nn.init.ones_(mod.weight)
    rotary = DeepseekV32RotaryEmbedding(cfg).to(device)
    holder = _Wrapper(attn, cfg)
    rows = []
    for S in seqs:
        x = torch.randn(1, S, cfg.hidden_size, device=device, dtype=torch.bfloat16)
        pos = torch.arange(S, device=device)[None]
        pe = rotary(x, pos)
        row = dict(family="dsa", S=S)
        # (a) native sdpa path: 4-D causal mask, the module's own forward
        if S <= native_max_seq:
            def native():
                mask = torch.ones(S, S, dtype=torch.bool, device=device).tril_()[None, None]
                with torch.no_grad():
                    attn(x, pe, mask, position_ids=pos)
            row["native_sdpa_ms"], row["native_sdpa_gib"] = timed(native, rep_ms=100)
        else:
            row["native_sdpa_ms"] = row["native_sdpa_gib"] = float("nan")
        for name, reduce, beta in (("native_kernel", 0.0, 0.0), ("stem", 0.15, 0.2)):
            stem_boost.wrap(holder, reduce=reduce, beta=beta, indexer_dtype="bfloat16")

            def run():
                with torch.no_grad():
                    attn(x, pe, None, position_ids=pos)
            row[f"{name}_ms"], row[f"{name}_gib"] = timed(run)
            if name == "stem":
                row["reduce_achieved"] = stem_boost.stats(holder)["reduce_achieved"]
            stem_boost.unwrap(holder)
        row["stem_over_native"] = row["stem_ms"] / row["native_kernel_ms"]
        row.update(dsa_breakdown(attn, x, pe, pos))
        if PROFILE:
            stem_boost.wrap(holder, reduce=0.15, indexer_dtype="bfloat16")
            with torch.no_grad():
                attn(x, pe, None, position_ids=pos)
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                        torch.profiler.ProfilerActivity.CPU]) as prof:
                    attn(x, pe, None, position_ids=pos)
                    torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), flush=True)
            stem_boost.unwrap(holder)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del x, pe
    return rows


def dsa_breakdown(attn, x, pe, pos) -> dict:
    """Milliseconds of the parts: chunked fused indexer top-k, the Stem step, the absorbed kernel."""
    from stem_boost.adapters.dsa import _compact, _latent_value_norms
    from stem_boost.adapters.dsa_indexer import dsa_indexer_topk
    from stem_boost.boost import boost_candidates
    from stem_boost.config import StemConfig
    from stem_boost.kernels import sparse_attention
    from stem_boost.oam import aggregate_heads

    S = x.shape[1]
    with torch.no_grad():
        q_resid = attn.q_a_layernorm(attn.q_a_proj(x))
        top = dsa_indexer_topk(attn.indexer, x, q_resid, pe, None, pos, max_bytes=2 * 2**30,
                               score_dtype=torch.bfloat16, tie_break="none")
        ms_index, _ = timed(lambda: dsa_indexer_topk(attn.indexer, x, q_resid, pe, None, pos, max_bytes=2 * 2**30,
                                                     score_dtype=torch.bfloat16, tie_break="none"))
        native = _compact(top)
        kv_a = attn.kv_a_proj_with_mqa(x)
        latent = attn.kv_a_layernorm(kv_a[..., :512])
        w_uv = attn.kv_b_proj.weight.view(128, -1, 512)[:, 128:]
        cfg = StemConfig(reduce=0.15)
        norms = aggregate_heads(_latent_value_norms(latent, w_uv), 1)
        avail = torch.arange(S) + 1
        boost = lambda: boost_candidates(native.idx, top.scores.unsqueeze(1), norms, avail, 2048, cfg)
        sel, _ = boost()
        ms_stem_step, _ = timed(boost)
        ms_norms, _ = timed(lambda: _latent_value_norms(latent, w_uv))
        chunk = min(S, 16384)
        q = torch.randn(1, chunk, 128, 576, device=x.device, dtype=x.dtype)
        kv = torch.randn(1, S, 1, 576, device=x.device, dtype=x.dtype)
        part = lambda s: (s.idx[:, :, S - chunk:], s.counts[:, :, S - chunk:])
        kern = lambda s: sparse_attention(q, kv, kv[..., :512], *part(s), block_size=1, check_indices=False)
        ms_k_native, _ = timed(lambda: kern(native))
        ms_k_stem, _ = timed(lambda: kern(sel))
    return dict(indexer_topk_ms=ms_index, stem_step_ms=ms_stem_step, value_norms_ms=ms_norms,
                kernel_native_last_chunk_ms=ms_k_native, kernel_stem_last_chunk_ms=ms_k_stem, kernel_chunk=chunk)


def bench_infllmv2(seqs, device):
    import torch.nn.functional as F

    from stem_boost.models.minicpm4 import MiniCPM4Config, MiniCPM4ForCausalLM
    from stem_boost.models.minicpm4.infllmv2 import MINICPM41_SPARSE_CONFIG

    cfg = MiniCPM4Config(vocab_size=1024, hidden_size=4096, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=32, num_key_value_heads=2, head_dim=128,
                         max_position_embeddings=262144, sparse_config=dict(MINICPM41_SPARSE_CONFIG))
    torch.manual_seed(0)
    model = MiniCPM4ForCausalLM(cfg).to(device=device, dtype=torch.bfloat16).eval()
    attn = model.model.layers[0].self_attn
    attn.select_chunk_size = 1024
    rotary = model.model.rotary_emb
    rows = []
    for S in seqs:
        x = torch.randn(1, S, cfg.hidden_size, device=device, dtype=torch.bfloat16)
        pos = torch.arange(S, device=device)[None]
        pe = rotary(pos)
        row = dict(family="infllmv2", S=S)

        def dense():
            with torch.no_grad():
                B = 1
                q = attn.q_proj(x).view(B, S, 32, 128).transpose(1, 2)
                k = attn.k_proj(x).view(B, S, 2, 128).transpose(1, 2)
                v = attn.v_proj(x).view(B, S, 2, 128).transpose(1, 2)
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                attn.o_proj(o.transpose(1, 2).reshape(B, S, -1))
        row["dense_ms"], row["dense_gib"] = timed(dense)
        for name, reduce, beta in (("native_kernel", 0.0, 0.0), ("stem", 0.18, 0.2)):
            stem_boost.wrap(model, reduce=reduce, beta=beta)

            def run():
                with torch.no_grad():
                    attn(x, pe)
            row[f"{name}_ms"], row[f"{name}_gib"] = timed(run)
            if name == "stem":
                row["reduce_achieved"] = stem_boost.stats(model)["reduce_achieved"]
            stem_boost.unwrap(model)
        row["stem_over_native"] = row["stem_ms"] / row["native_kernel_ms"]
        row["dense_over_stem"] = row["dense_ms"] / row["stem_ms"]
        row.update(infllmv2_breakdown(attn, x, pe))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def infllmv2_breakdown(attn, x, pe) -> dict:
    """Milliseconds of the parts: native InfLLMv2 selection (PyTorch), the kernel on its selection."""
    from stem_boost.kernels import sparse_attention
    from stem_boost.models.minicpm4.infllmv2 import infllmv2_select
    from stem_boost.models.minicpm4.modeling_minicpm4 import apply_rotary_pos_emb

    B, S, _ = x.shape
    with torch.no_grad():
        q = attn.q_proj(x).view(B, S, 32, 128).transpose(1, 2)
        k = attn.k_proj(x).view(B, S, 2, 128).transpose(1, 2)
        v = attn.v_proj(x).view(B, S, 2, 128).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *pe)
        sel = infllmv2_select(q, k, attn.infllmv2, chunk_size=attn.select_chunk_size)
        ms_sel, _ = timed(lambda: infllmv2_select(q, k, attn.infllmv2, chunk_size=attn.select_chunk_size))
        counts = (sel.idx >= 0).sum(-1).to(torch.int32)
        ms_kernel, _ = timed(lambda: sparse_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), sel.idx,
                                                      counts, block_size=64, query_block=1, check_indices=False))
    return dict(native_selection_ms=ms_sel, kernel_native_ms=ms_kernel,
                mean_blocks_per_token=float(counts.float().mean()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["dsa", "infllmv2"], nargs="+", default=["dsa", "infllmv2"])
    ap.add_argument("--seqs", type=int, nargs="+", default=[32768, 65536, 131072])
    ap.add_argument("--native-max-seq", type=int, default=32768, help="largest S to try the native sdpa DSA path at")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of the Stem DSA forward")
    args = ap.parse_args()
    global PROFILE
    PROFILE = args.profile
    if not torch.cuda.is_available():
        sys.exit("bench_layers.py needs a CUDA GPU")
    torch.manual_seed(int(time.time()))
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    if "dsa" in args.family:
        res["rows"] += bench_dsa(args.seqs, "cuda", args.native_max_seq)
    if "infllmv2" in args.family:
        res["rows"] += bench_infllmv2(args.seqs, "cuda")
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    print(f"\n{res['device']}  torch {res['torch']}")
    print("| layer | S | native/dense ms | native+kernel ms | Stem ms | Stem/native | achieved reduce | peak GiB native+kernel / Stem | native sdpa peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        base = r.get("native_sdpa_ms", r.get("dense_ms"))
        base = "OOM" if base != base else f"{base:.1f}"
        peak0 = r.get("native_sdpa_gib", r.get("dense_gib"))
        peak0 = "OOM" if peak0 != peak0 else f"{peak0:.1f}"
        print(f"| {r['family']} | {r['S']} | {base} | {r['native_kernel_ms']:.1f} | {r['stem_ms']:.1f} | "
              f"{r['stem_over_native']:.3f} | {r['reduce_achieved']:.3f} | {r['native_kernel_gib']:.1f} / {r['stem_gib']:.1f} | {peak0} |")


if __name__ == "__main__":
    main()
