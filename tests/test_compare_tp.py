"""`stem-boost compare` with model.parallel=tensor: a DSA checkpoint sharded over two torchrun
processes (gloo, CPU) by `stem_boost.dist` gives the numbers of the whole model in one process
(up to fp32 summation order: the sharded heads and experts are summed by an all-reduce)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stem_boost.eval.config import ConfigError, load_config
from stem_boost.testbeds.tiny_dsa import build_deepseek_v32

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, seed: int) -> Path:
    model = build_deepseek_v32(seed=seed, num_hidden_layers=2, index_topk=16)
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="200KB")
    cfg = dict(name="tiny_tp", model=dict(source="local", path=str(tmp_path / "ckpt"), dtype="float32", device="cpu",
                                          parallel="tensor"),
               tokenizer=dict(kind="bytes", add_bos=False), modes=["dense", "native", "stem"],
               tasks=dict(names=["niah_single_1"], lengths=[1024], samples=2, max_new_tokens=4),
               perplexity=dict(length=512, window=256, stride=128), fidelity=dict(length=256, max_rows=256),
               latency=dict(lengths=[128], repeats=1, warmup=0), runtime=dict(threads=1, progress=False))
    path = tmp_path / "tiny_tp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_tensor_parallel_compare_equals_the_whole_model(tmp_path):
    seed = random.randrange(1000)
    print(f"model seed {seed}")
    cfg_path = _config(tmp_path, seed)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "stem_boost", "compare", "--config", str(cfg_path), "--out", str(tmp_path / "tp")]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tp = json.loads((tmp_path / "tp" / "results.json").read_text())
    assert tp["meta"]["world_size"] == 2 and tp["meta"]["parallel"] == "tensor"
    assert "tensor parallel" in tp["meta"]["model"]

    from stem_boost.eval.runner import run

    one = run(load_config(str(cfg_path), ["model.parallel=data"]))
    for name, row in one["summary"].items():
        other = tp["summary"][name]
        assert other["rel_budget"] == row["rel_budget"]  # the same selection: the indexer is replicated
        for key in ("ppl", "mean_nll", "kl_vs_dense", "kl_vs_native", "attn_err_mean", "attn_err_native_mean"):
            if row[key] is not None:
                assert other[key] == pytest.approx(row[key], rel=1e-3, abs=1e-6), (name, key)
    assert [s["pairs"] for s in tp["samples"]] == [s["pairs"] for s in one["samples"]]


def test_tensor_parallel_needs_a_local_checkpoint():
    with pytest.raises(ConfigError, match=r"'model.parallel' is 'tensor', which needs model.source 'local'"):
        load_config("tiny_dsa", ["model.parallel=tensor"])
