"""Load a (sharded) safetensors checkpoint straight into one tensor-parallel rank's model.

    rank, world, device = init_from_env()
    model = load_sharded_checkpoint("/models/DeepSeek-V3.2", device=device, dtype=torch.bfloat16)
    stem_boost.wrap(model, reduce=0.15)

No rank ever holds the whole model, on the host or on the GPU:
  1. the model is built from its config on the meta device (no memory);
  2. `tp.shard_dsa_model` slices the meta parameters to this rank's shapes and records which part
     of each full tensor the rank holds (`model._stem_tp.plan`);
  3. for each file of the checkpoint (`model.safetensors.index.json`, or a single
     `model.safetensors`), `safetensors.safe_open(...).get_slice(name)[...]` reads only this
     rank's rows / columns of the tensors it needs (the file is memory-mapped: other bytes are
     never read) and copies them into tensors allocated on `device`.

Checkpoint layouts understood:
  * the model's own parameter names (what `save_pretrained` writes, and the official DeepSeek-V3.2 /
    GLM-5 releases for everything but the experts);
  * per-expert tensors `...mlp.experts.{e}.gate_proj.weight` / `up_proj` / `down_proj` (the
    official releases and transformers 5's `save_pretrained`), assembled into the model's fused
    `experts.gate_up_proj` [E, 2I, D] ([gate | up]) and `experts.down_proj` [E, D, I];
  * block-FP8 weights with a `<name>_scale_inv` sibling (DeepSeek-V3 style, 128 x 128 blocks, or
    `quantization_config.weight_block_size`): dequantised to `dtype` (default bf16) while loading,
    slice by slice. (The whole 671B model in bf16 needs ~1.3 TB: 8 x H200 is not enough; that
    case needs FP8 matmuls, which this loader does not provide.)
Tensors of the checkpoint that the model has no parameter for (e.g. DeepSeek-V3.2's MTP layer 61)
are skipped; a parameter missing from the checkpoint is an error.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .tp import ParamShard, shard_dsa_model

__all__ = ["load_sharded_checkpoint", "empty_model", "checkpoint_files"]

log = logging.getLogger(__name__)

_EXPERT_FUSED = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<which>gate_up_proj|down_proj)$")


@dataclass
class _Piece:
    param: str  # model parameter / buffer name
    key: str  # checkpoint tensor name
    src: tuple  # index (slices) into the checkpoint tensor
    dst: tuple  # index into the local tensor


def checkpoint_files(path: str | Path) -> dict[str, str]:
    """tensor name -> file name, from `model.safetensors.index.json` or a single `model.safetensors`."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    single = path / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{path}: neither model.safetensors.index.json nor model.safetensors")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), single.name)


def empty_model(config, attn_implementation: str | None = "sdpa") -> nn.Module:
    """The causal-LM model of `config` with every parameter and buffer on the meta device."""
    from transformers import AutoModelForCausalLM

    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def _shape_of(handles, files, key):
    return tuple(handles(files[key]).get_slice(key).get_shape())


def _full_index(ndim: int) -> tuple:
    return (slice(None),) * ndim


def _plan_pieces(name: str, local_shape: tuple, spec: ParamShard | None, files: dict, handles) -> list[_Piece]:
    """Pieces (checkpoint tensor, source slices, destination slices) that fill parameter `name`."""
    nd = len(local_shape)
    if name in files:
        if spec is None:
            shape = _shape_of(handles, files, name)
            if shape != tuple(local_shape):
                raise ValueError(f"{name}: checkpoint shape {shape} != model shape {tuple(local_shape)}")
            return [_Piece(name, name, _full_index(nd), _full_index(nd))]
        shape = _shape_of(handles, files, name)
        if shape != spec.full_shape:
            raise ValueError(f"{name}: checkpoint shape {shape} != full model shape {spec.full_shape}")
        return [_Piece(name, name, src, dst) for src, dst in spec.pieces()]
    m = _EXPERT_FUSED.match(name)
    if m is None:
        return []
    prefix, which = m["prefix"], m["which"]
    # per-expert tensors: the fused dim d of [E, ...] is dim d - 1 of the expert's 2-D weight
    if which == "gate_up_proj":
        E, two_i, _ = spec.full_shape if spec is not None else local_shape
        inter = two_i // 2
        dim = 1
        ranges = spec.ranges if spec is not None else ((0, two_i),)
    else:
        E, _, inter = spec.full_shape if spec is not None else local_shape
        dim = 2
        ranges = spec.ranges if spec is not None else ((0, inter),)
    if f"{prefix}.0.{'gate_proj' if which == 'gate_up_proj' else 'down_proj'}.weight" not in files:
        return []
    pieces = []
    for e in range(E):
        off = 0
        for a, b in ranges:
            parts = []
            if which == "gate_up_proj":  # [gate | up] along dim 1
                if a < inter:
                    parts.append((f"{prefix}.{e}.gate_proj.weight", a, min(b, inter)))
                if b > inter:
                    parts.append((f"{prefix}.{e}.up_proj.weight", max(a, inter) - inter, b - inter))
            else:
                parts.append((f"{prefix}.{e}.down_proj.weight", a, b))
            for key, s0, s1 in parts:
                src = [slice(None), slice(None)]
                src[dim - 1] = slice(s0, s1)
                dst = [e, slice(None), slice(None)]
                dst[dim] = slice(off, off + s1 - s0)
                off += s1 - s0
                pieces.append(_Piece(name, key, tuple(src), tuple(dst)))
    return pieces


def _index_range(idx: slice, n: int) -> tuple[int, int]:
    a, b, step = idx.indices(n)
    if step != 1:
        raise ValueError("strided slices are not supported")
    return a, b


def _read(handle, scale_handle, key: str, src: tuple, block: tuple[int, int], device, dtype) -> torch.Tensor:
    """handle.get_slice(key)[src] on `device`; a block-FP8 weight is dequantised to `dtype`."""
    sl = handle.get_slice(key)
    if scale_handle is None:
        return sl[src].to(device)
    shape = tuple(sl.get_shape())
    if len(shape) != 2:
        raise NotImplementedError(f"{key}: block-FP8 dequantisation expects a 2-D weight, got {shape}")
    (r0, r1), (c0, c1) = (_index_range(src[0], shape[0]), _index_range(src[1], shape[1]))
    br, bc = block
    w = sl[r0:r1, c0:c1].to(device).float()
    s = scale_handle.get_slice(key + "_scale_inv")[r0 // br:-(-r1 // br), c0 // bc:-(-c1 // bc)].to(device).float()
    s = s.repeat_interleave(br, dim=0).repeat_interleave(bc, dim=1)
    s = s[r0 - (r0 // br) * br:, c0 - (c0 // bc) * bc:][: r1 - r0, : c1 - c0]
    return (w * s).to(dtype)


def fp32_names(model: nn.Module, dtype: torch.dtype) -> list[str]:
    keep = set()
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    if dtype in (torch.float16, torch.bfloat16):
        keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    return sorted(keep)


def _rebuild_buffers(model: nn.Module, device) -> None:
    """Non-persistent buffers (RoPE inv_freq, ...) are not in checkpoints: build the module again on
    the CPU from the model config and take its buffers."""
    for mname, mod in model.named_modules():
        meta = [n for n, b in mod._buffers.items() if b is not None and b.is_meta]
        if not meta:
            continue
        fresh = None
        for build in (lambda: type(mod)(config=model.config), lambda: type(mod)(model.config)):
            try:
                with torch.device("cpu"):
                    fresh = build()
                break
            except Exception:  # noqa: BLE001 - try the next constructor form
                fresh = None
        if fresh is None:
            raise RuntimeError(f"{mname}: buffers {meta} are neither in the checkpoint nor rebuildable from the config")
        for n in meta:
            mod._buffers[n] = fresh._buffers[n].to(device)


def load_sharded_checkpoint(
    path: str | Path,
    *,
    group=None,
    rank: int | None = None,
    world: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    shard_mlp: bool = True,
    attn_implementation: str | None = "sdpa",
    config=None,
    model: nn.Module | None = None,
) -> nn.Module:
    """Build this rank's shard of the model saved in `path` and fill it from the checkpoint.

    group / rank / world: as `shard_dsa_model` (default: the default process group, or rank 0 of 1
        without torch.distributed). world = 1 loads the whole model (still without a full host copy:
        tensors go file by file to `device`).
    device: where the parameters are created (e.g. "cuda:3"); dtype: their dtype (default: the
        config's dtype, else each checkpoint tensor's own; FP8 weights -> bfloat16). Modules the
        model class keeps in fp32 (`_keep_in_fp32_modules`: fp16 only, `..._strict`: fp16/bf16,
        as transformers does) stay fp32.
    config: a transformers config to use instead of `path/config.json`.
    model: a meta-device model of your own (already sharded or not) instead of one built from the config.
    Returns the model in eval mode, sharded (`model._stem_tp`), on `device`.
    """
    from safetensors import safe_open

    path = Path(path)
    if model is None:
        if config is None:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(path)
        qcfg = getattr(config, "quantization_config", None)
        if qcfg is not None:  # built unquantised; block-FP8 tensors are dequantised below
            config.quantization_config = None
            try:
                del config.quantization_config
            except AttributeError:
                pass
        model = empty_model(config, attn_implementation)
    else:
        qcfg = getattr(model.config, "quantization_config", None)
    block = (128, 128)
    if isinstance(qcfg, dict) and qcfg.get("weight_block_size"):
        block = tuple(qcfg["weight_block_size"])
    if getattr(model, "_stem_tp", None) is None:
        shard_dsa_model(model, group, rank=rank, world=world, shard_mlp=shard_mlp)
    plan = model._stem_tp.plan
    if dtype is None:
        dtype = getattr(model.config, "dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
    device = torch.device(device)

    files = checkpoint_files(path)
    opened: dict[str, object] = {}

    def handle(fname):
        if fname not in opened:
            opened[fname] = safe_open(str(path / fname), framework="pt", device="cpu")
        return opened[fname]

    # ---- plan: every parameter / persistent buffer -> pieces of checkpoint tensors
    targets: dict[str, tuple[nn.Module, str, bool, torch.Tensor]] = {}
    for mname, mod in model.named_modules():
        for pname, p in list(mod._parameters.items()) + list(mod._buffers.items()):
            if p is None or (pname in mod._buffers and pname in mod._non_persistent_buffers_set):
                continue
            full = f"{mname}.{pname}" if mname else pname
            targets[full] = (mod, pname, pname in mod._parameters, p)
    tied = set()
    if getattr(model.config, "tie_word_embeddings", False):
        out_emb = model.get_output_embeddings()
        if out_emb is not None:
            tied = {n for n, (m, pn, _, _) in targets.items() if m is out_emb and pn == "weight"}
    pieces_by_file: dict[str, list[_Piece]] = defaultdict(list)
    missing = []
    for name, (_, _, _, p) in targets.items():
        pieces = _plan_pieces(name, tuple(p.shape), plan.get(name), files, handle)
        if not pieces:
            if name not in tied:
                missing.append(name)
            continue
        for pc in pieces:
            pieces_by_file[files[pc.key]].append(pc)
    if missing:
        raise KeyError(f"{len(missing)} parameters are missing from {path}: {missing[:10]}")

    fp32 = fp32_names(model, dtype) if dtype is not None else []
    local: dict[str, torch.Tensor] = {}
    filled: dict[str, int] = defaultdict(int)
    for fname in sorted(pieces_by_file):
        for pc in pieces_by_file[fname]:
            scale_handle = None
            if pc.key + "_scale_inv" in files:
                scale_handle = handle(files[pc.key + "_scale_inv"])
            if pc.param not in local:
                _, _, _, p = targets[pc.param]
                want = dtype
                if any(k in pc.param for k in fp32) or p.dtype == torch.float32 and not targets[pc.param][2]:
                    want = torch.float32  # fp32-kept modules; fp32 buffers (router bias) stay fp32
                if want is None:
                    want = handle(fname).get_slice(pc.key).get_dtype()
                    want = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                            "F64": torch.float64}.get(want, torch.bfloat16)
                local[pc.param] = torch.empty(tuple(p.shape), dtype=want, device=device)
            t = local[pc.param]
            piece = _read(handle(fname), scale_handle, pc.key, pc.src, block, device, t.dtype)
            view = t[pc.dst]
            if tuple(view.shape) != tuple(piece.shape):
                raise ValueError(f"{pc.param} <- {pc.key}{pc.src}: shape {tuple(piece.shape)} != {tuple(view.shape)}")
            view.copy_(piece)
            filled[pc.param] += piece.numel()
    for name, t in local.items():
        if filled[name] != t.numel():
            raise ValueError(f"{name}: {filled[name]} of {t.numel()} elements filled from the checkpoint")
        mod, pname, is_param, _ = targets[name]
        if is_param:
            mod._parameters[pname] = nn.Parameter(t, requires_grad=False)
        else:
            mod._buffers[pname] = t
    if tied:
        model.tie_weights()
    _rebuild_buffers(model, device)
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise RuntimeError(f"still on the meta device after loading: {left[:10]}")
    used = {pc.key for pcs in pieces_by_file.values() for pc in pcs}
    skipped = [k for k in files if k not in used and not k.endswith("_scale_inv")]
    if skipped:
        log.info("load_sharded_checkpoint: %d checkpoint tensors not used by the model (e.g. %s)",
                 len(skipped), skipped[:3])
    return model.eval()
