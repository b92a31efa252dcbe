"""stem_boost.dist: tensor parallelism (TP=2 on two gloo processes, loopback only), the sharded
checkpoint loader, init_from_env, the DeepSpeed entry point's error path, and the TP check
(`stem_boost.dist.check`) in its CPU mode (tiny dims)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import stem_boost
from stem_boost.dist import (ParamShard, init_from_env, layer_selection_digests, load_sharded_checkpoint,
                             selection_digest, shard_dsa_model)
from tests import dist_worker
from tests.dsa_tiny import build_deepseek_v32

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    """Reference TP=1 run in this process, then two gloo ranks (spawned) on the same model and on
    its checkpoint saved in many small shards."""
    import torch.multiprocessing as mp

    work = tmp_path_factory.mktemp("tp2")
    model = build_deepseek_v32(seed=0)
    model.save_pretrained(work / "ckpt", max_shard_size="50KB")
    assert (work / "ckpt" / "model.safetensors.index.json").exists()
    n_files = len(list((work / "ckpt").glob("*.safetensors")))
    stem_boost.wrap(model, reduce=dist_worker.REDUCE, keep_selections=True)
    with torch.no_grad():
        logits = model(dist_worker.input_ids()).logits
    ref = dict(logits=logits, digest=selection_digest(model), layer_digests=layer_selection_digests(model),
               stats=stem_boost.stats(model), n_files=n_files)
    try:
        mp.spawn(dist_worker.run, args=(2, _free_port(), str(work)), nprocs=2, join=True)
    except mp.ProcessExitedException as exc:  # name what each rank reported before it died
        saved = {r: torch.load(work / f"rank{r}.pt", weights_only=False).get("error", "no error")
                 for r in range(2) if (work / f"rank{r}.pt").exists()}
        raise AssertionError(f"{exc}; results saved by the ranks: {saved}") from exc
    ranks = [torch.load(work / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r, out in enumerate(ranks):
        assert "error" not in out, f"rank {r}: {out['error']}"
    return ref, ranks


def test_tp2_environment(tp2):
    _, ranks = tp2
    assert [o["env"] for o in ranks] == [(0, 2, "cpu", "gloo"), (1, 2, "cpu", "gloo")]
    assert all(o["local_heads"] == 2 for o in ranks)  # 4 heads over 2 ranks


def test_tp2_logits_match_tp1(tp2):
    ref, ranks = tp2
    for o in ranks:
        torch.testing.assert_close(o["logits_a"], ref["logits"], atol=1e-4, rtol=0)
    assert torch.equal(ranks[0]["logits_a"], ranks[1]["logits_a"])  # all_reduce: same bits everywhere


def test_tp2_selection_identical_across_ranks(tp2):
    ref, ranks = tp2
    assert ranks[0]["all_digests_a"] == ranks[1]["all_digests_a"] == [ranks[0]["digest_a"]] * 2
    assert ranks[0]["digest_a"] == ranks[1]["digest_a"]
    # and the same selection as the unsharded model (global RMS over all heads, same top-k)
    assert ranks[0]["layer_digests_a"] == ref["layer_digests"]
    for o in ranks:
        assert o["stats_a"]["stem_pairs"] == ref["stats"]["stem_pairs"]
        assert o["stats_a"]["native_pairs"] == ref["stats"]["native_pairs"]
    assert ref["stats"]["reduce_achieved"] > 0.05  # Stem really truncated something


def test_tp2_sharded_checkpoint_loader(tp2):
    ref, ranks = tp2
    assert ref["n_files"] > 5
    for o in ranks:
        assert o["param_keys_equal"] and o["shapes_equal"]
        assert o["param_max_diff"] == 0.0
        torch.testing.assert_close(o["logits_b"], ref["logits"], atol=1e-4, rtol=0)
        assert o["digest_b"] == ref["digest"]


# ---------------------------------------------------------------- single process


def test_param_shard_pieces():
    spec = ParamShard(full_shape=(3, 8, 5), dim=1, ranges=((2, 4), (6, 8)))
    assert spec.local_shape == (3, 4, 5)
    full = torch.arange(3 * 8 * 5).view(3, 8, 5)
    torch.testing.assert_close(spec.take(full), torch.cat([full[:, 2:4], full[:, 6:8]], dim=1))


def test_shard_layout_without_process_group(tmp_path):
    model = build_deepseek_v32(seed=0)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    shard_dsa_model(model, rank=1, world=2)
    attn = model.model.layers[0].self_attn
    H, qk, nope, vd = 4, attn.qk_head_dim, attn.qk_nope_head_dim, attn.v_head_dim
    assert attn.num_heads == 2
    sd = model.state_dict()
    p = "model.layers.0.self_attn."
    torch.testing.assert_close(sd[p + "q_b_proj.weight"], full[p + "q_b_proj.weight"][2 * qk:4 * qk])
    torch.testing.assert_close(sd[p + "kv_b_proj.weight"], full[p + "kv_b_proj.weight"][2 * (nope + vd):])
    torch.testing.assert_close(sd[p + "o_proj.weight"], full[p + "o_proj.weight"][:, 2 * vd:])
    for name in ("indexer.wq_b.weight", "indexer.wk.weight", "indexer.weights_proj.weight", "q_a_proj.weight"):
        torch.testing.assert_close(sd[p + name], full[p + name])  # replicated
    e = "model.layers.1.mlp.experts."
    inter = full[e + "down_proj"].shape[2]
    torch.testing.assert_close(sd[e + "gate_up_proj"], torch.cat(
        [full[e + "gate_up_proj"][:, inter // 2:inter], full[e + "gate_up_proj"][:, inter + inter // 2:]], dim=1))
    assert H % 2 == 0
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        model(torch.randint(3, 256, (1, 8)))
    with pytest.raises(ValueError, match="already sharded"):
        shard_dsa_model(model, rank=1, world=2)
    # the loader, rank 1 of 2, without a process group: the same tensors
    loaded = load_sharded_checkpoint(tmp_path, rank=1, world=2).state_dict()
    assert sorted(loaded) == sorted(sd)
    for k in sd:
        assert torch.equal(loaded[k], sd[k]), k


def test_shard_rejects_indivisible_heads():
    model = build_deepseek_v32(seed=0)
    with pytest.raises(ValueError, match="not divisible"):
        shard_dsa_model(model, rank=0, world=3)


def test_block_fp8_dequantisation(tmp_path):
    """A DeepSeek-style block-FP8 weight (+ weight_scale_inv, 128x128 blocks) read slice by slice."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from stem_boost.dist.loading import _read

    torch.manual_seed(0)
    w = torch.randn(300, 260)
    rb, cb = -(-300 // 128), -(-260 // 128)
    scale = torch.rand(rb, cb) + 0.5
    s_full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :260]
    q = (w / s_full).to(torch.float8_e4m3fn)
    save_file({"x.weight": q, "x.weight_scale_inv": scale}, str(tmp_path / "m.safetensors"))
    expect = q.float() * s_full
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        for src in [(slice(None), slice(None)), (slice(100, 290), slice(None)), (slice(5, 140), slice(130, 259))]:
            got = _read(f, f, "x.weight", src, (128, 128), torch.device("cpu"), torch.float32)
            torch.testing.assert_close(got, expect[src])


def test_init_from_env_single_process(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert init_from_env() == (0, 1, torch.device("cpu"))


_EXIT_PROBE = """
import atexit, os
import torch.distributed as dist
# one write a line: the two ranks share the pipe (a short write is atomic, print's pieces are not)
say = lambda line: os.write(1, (line + "\\n").encode())
# registered before init_from_env's own handler, so it runs after it (atexit is last in, first out)
atexit.register(lambda: say(f"initialised at exit: {dist.is_initialized()}"))
from stem_boost.dist import init_from_env
rank, world, _ = init_from_env()
t = __import__("torch").ones(1)
dist.all_reduce(t)
say(f"rank {rank} of {world} sum {float(t)}")
"""


def test_init_from_env_destroys_its_group_at_exit(tmp_path):
    """Two gloo ranks that initialise through init_from_env and exit without destroying the group:
    the group is gone by the time the interpreter finalises (a live gloo group there can abort)."""
    script = tmp_path / "probe.py"
    script.write_text(_EXIT_PROBE)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count("sum 2.0") == 2, proc.stdout
    assert proc.stdout.count("initialised at exit: False") == 2, proc.stdout


def test_init_deepspeed_tp_without_deepspeed(monkeypatch):
    from stem_boost.dist import deepspeed_inference

    monkeypatch.setattr(deepspeed_inference, "deepspeed_available", lambda: False)
    with pytest.raises(ImportError, match="DS_BUILD_OPS=0 pip install deepspeed"):
        stem_boost.dist.init_deepspeed_tp(build_deepseek_v32(seed=0), 2)


@pytest.mark.slow
def test_dist_check_cpu_mode(tmp_path):
    """python -m stem_boost.dist.check --cpu: tiny dims, gloo, two torchrun ranks on 127.0.0.1."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "stem_boost.dist.check", "--cpu", "--launcher", "torchrun", "--out", str(tmp_path),
           "--port", str(_free_port())]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "DIST CHECK PASSED" in res.stdout
    assert json.loads((tmp_path / "dist_check.json").read_text())["failures"] == []
