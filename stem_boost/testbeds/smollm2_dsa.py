"""SmolLM2-135M turned into a DSA model: a distilled lightning indexer in every layer.

    from stem_boost.testbeds.smollm2_dsa import load_smollm2_dsa
    model, tok = load_smollm2_dsa(index_topk=256)      # native DSA sparse attention, trained indexer
    model = stem_boost.wrap(model, reduce=0.15)          # Stem through stem_boost.adapters.dsa_gqa

Why: DeepSeek-V3.2 (the real DSA model) has 671B parameters. This testbed is a real-weights DSA
model that runs on a CPU: the frozen SmolLM2-135M-Instruct (GQA Llama, 30 layers, 9 query / 3 KV
heads of 64 dims, 8K context) plus one lightning indexer per layer, trained the way DeepSeek
trained its indexer in the dense warm-up stage (KL from the main attention distribution, model
frozen; `scripts/train_smollm2_indexer.py`). The weights ship in
`stem_boost/data/smollm2_indexer.safetensors`.

The indexer (`SmolIndexer`) is DeepSeek-V3.2's `Indexer`, scaled down (defaults of `IndexerConfig`):

    q_resid = RMSNorm(wq_a x)                 [q_rank=128]  SmolLM2 has no q-LoRA (DeepSeek's q_resid is
                                                            the MLA attention's q_a_layernorm(q_a_proj x),
                                                            rank 1536); the indexer owns a small q_a
    q       = wq_b q_resid                    [n_heads=4 x head_dim=64]
    k       = LayerNorm(wk x)                 [head_dim=64], one key per token shared by the heads
    RoPE    half-split ("non-interleaved", as DeepSeek-V3.2's indexer) on the first rope_dim=32
            dims of q and k, with SmolLM2's theta (1e5): the frequencies are every other one of the
            model's 64-dim RoPE
    w       = weights_proj(x) * n_heads^-0.5  [n_heads]
    I[s, t] = sum_h w[s, h] * relu(head_dim^-0.5 * q[s, h] . k[t]),  causal, top-`index_topk` keys

x is the layer's input to attention (after `input_layernorm`). `SmolDSAAttention` replaces
`LlamaAttention` in each layer: same q/k/v/o projections, plus the indexer; its forward is
native DSA: the indexer's top-k keys per query (one list for all 9 heads, Hsel = 1), attention over
those keys only (`stem_boost.kernels.sparse_attention`: the Triton kernel on CUDA, PyTorch on the
CPU; no S x T mask). With index_topk >= the sequence length it is exactly dense attention.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..adapters.dsa import attend_expanded, native_selection
from ..adapters.dsa_gqa import gqa_indexer_topk, gqa_qkv
from ..compat import cache_argument
from ..native.dsa_indexer import DEEPSEEK_V32, chunked_index_topk, indexer_qk, indexer_weights
from ..rope import apply_rope_half
from ..selection import key_padding
from .smollm2_gguf import load_smollm2

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
INDEXER_FILE = DATA_DIR / "smollm2_indexer.safetensors"
INDEXER_LOG = DATA_DIR / "smollm2_indexer_log.json"
ATTN_IMPLEMENTATION = "smollm2_dsa"
DEFAULT_INDEX_TOPK = 256

__all__ = ["IndexerConfig", "SmolIndexer", "SmolDSAAttention", "dsa_ify", "load_smollm2_dsa", "set_index_topk",
           "indexer_state", "save_indexers", "load_indexers", "attention_inputs", "teacher_distribution",
           "indexer_logits", "kl_rows", "topk_recall", "build_testbed"]


@dataclass(frozen=True)
class IndexerConfig:
    n_heads: int = 4
    head_dim: int = 64
    rope_dim: int = 32
    q_rank: int = 128  # 0: wq_b reads the normed hidden state directly
    index_topk: int = DEFAULT_INDEX_TOPK

    def to_dict(self) -> dict:
        return asdict(self)


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dt = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dt)


class SmolIndexer(nn.Module):
    """DeepSeek-V3.2's lightning indexer, scaled down for SmolLM2 (see the module docstring)."""

    def __init__(self, hidden_size: int, cfg: IndexerConfig = IndexerConfig(), layer_idx: int = 0):
        super().__init__()
        if cfg.rope_dim % 2 or cfg.rope_dim > cfg.head_dim:
            raise ValueError(f"rope_dim={cfg.rope_dim} must be even and <= head_dim={cfg.head_dim}")
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.n_heads, self.head_dim, self.qk_rope_head_dim = cfg.n_heads, cfg.head_dim, cfg.rope_dim
        self.index_topk = int(cfg.index_topk)
        self.softmax_scale = cfg.head_dim ** -0.5
        if cfg.q_rank:
            self.wq_a = nn.Linear(hidden_size, cfg.q_rank, bias=False)
            self.q_norm = _RMSNorm(cfg.q_rank)
        else:
            self.wq_a = self.q_norm = None
        self.wq_b = nn.Linear(cfg.q_rank or hidden_size, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(hidden_size, cfg.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(cfg.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(hidden_size, cfg.n_heads, bias=False)

    # ---- the two hooks stem_boost.adapters.dsa_gqa uses
    def q_resid(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.wq_a is None else self.q_norm(self.wq_a(x))

    def rope_embeddings(self, position_embeddings):
        """The layer's (cos, sin) [.., 2F] -> the indexer's rope dims: every (F / (rope_dim/2))-th
        frequency (same theta; for 64 -> 32 dims: every other one)."""
        cos, sin = position_embeddings
        full, r = cos.shape[-1], self.qk_rope_head_dim
        if full == r:
            return cos, sin
        step = full // r
        half_c, half_s = cos[..., : full // 2: step], sin[..., : full // 2: step]
        return torch.cat([half_c, half_c], dim=-1), torch.cat([half_s, half_s], dim=-1)

    # ---- differentiable parts (training, analysis)
    def qkw(self, x: torch.Tensor, position_embeddings):
        """q [B, S, H, D], k [B, S, D], w [B, S, H] fp32: exactly what the selection uses."""
        q, k = indexer_qk(self, x, self.q_resid(x), self.rope_embeddings(position_embeddings), None, DEEPSEEK_V32)
        return q, k, indexer_weights(self, x, DEEPSEEK_V32)

    def forward(self, hidden_states, q_resid, position_embeddings, attention_mask=None, position_ids=None,
                past_key_values=None):
        """Native API of DeepSeek-V3.2's indexer: int32 top-k key indices [B, S, min(index_topk, T)]
        (-1 where a row has fewer valid keys). Uses no cache (the attention caches the keys)."""
        pe = self.rope_embeddings(position_embeddings)
        q, k = indexer_qk(self, hidden_states, q_resid, pe, None, DEEPSEEK_V32)
        w = indexer_weights(self, hidden_states, DEEPSEEK_V32)
        return chunked_index_topk(q, k, w, attention_mask, self.index_topk, self.softmax_scale).indices


def indexer_logits(indexer: SmolIndexer, x: torch.Tensor, position_embeddings) -> torch.Tensor:
    """Dense index scores I [B, S, S] with the causal mask (-inf above the diagonal).
    O(S^2 * n_heads) memory: training and analysis at moderate lengths only."""
    q, k, w = indexer.qkw(x, position_embeddings)
    s = torch.einsum("bshd,btd->bsht", q.float(), k.float()).mul(indexer.softmax_scale).relu()
    logits = torch.einsum("bsht,bsh->bst", s, w)
    S = x.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
    return logits.masked_fill(~causal, float("-inf"))


class SmolDSAAttention(nn.Module):
    """LlamaAttention + lightning indexer, native DSA forward (see the module docstring).

    Shares the q/k/v/o projections of the LlamaAttention it replaces."""

    def __init__(self, attn: nn.Module, indexer: SmolIndexer, backend: str = "auto"):
        super().__init__()
        self.config = attn.config
        self.layer_idx = attn.layer_idx
        self.head_dim = attn.head_dim
        self.num_heads = attn.config.num_attention_heads
        self.num_key_value_heads = attn.config.num_key_value_heads
        self.num_key_value_groups = attn.num_key_value_groups
        self.scaling = attn.scaling
        self.is_causal = True
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.indexer = indexer
        self.backend = backend  # `sparse_attention`'s executor: "auto", "triton", "masked" or "reference"
        self.max_bytes = 256 * 2**20
        self.last_selection = None  # the Selection of the last prefill (analysis)

    @property
    def index_topk(self) -> int:
        return self.indexer.index_topk

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None, **kwargs):
        past_key_values = cache_argument(past_key_values, kwargs)  # transformers >= 5.24: cache=
        B, S, _ = hidden_states.shape
        q, k, v, past_len = gqa_qkv(self, hidden_states, position_embeddings, past_key_values)
        T = past_len + S
        pad = key_padding(attention_mask, T)  # [B, T] True = real token, or None
        top = gqa_indexer_topk(self, hidden_states, position_embeddings, pad, past_key_values,
                               max_bytes=self.max_bytes)
        sel = native_selection(top, q_offset=past_len, padding=pad)  # idx [B, 1, S, K]
        if S > 1:
            self.last_selection = sel
        out = attend_expanded(self, q, k, v, sel, self.backend)  # [B, S, Hq, D]
        return self.o_proj(out.reshape(B, S, -1).to(hidden_states.dtype)), None


# --------------------------------------------------------------------------------------------------
# Building the DSA model
# --------------------------------------------------------------------------------------------------
def _register_attention() -> None:
    """An attention-implementation name whose mask function yields at most a [B, T] padding mask
    (the DSA forward handles causality itself; never a dense [B, 1, S, T] mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    def _not_called(*args, **kwargs):
        raise RuntimeError(f"'{ATTN_IMPLEMENTATION}' is only valid on a model built by smollm2_dsa.dsa_ify")

    if ATTN_IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_IMPLEMENTATION, _not_called)
    if ATTN_IMPLEMENTATION not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, flash_attention_mask)


def indexer_state(model) -> dict[str, torch.Tensor]:
    """All indexer parameters, keyed `layers.<i>.<name>`."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        for name, t in layer.self_attn.indexer.state_dict().items():
            out[f"layers.{i}.{name}"] = t
    return out


def save_indexers(indexers: list[SmolIndexer], path: str | Path, metadata: dict | None = None,
                  dtype: torch.dtype = torch.float16) -> None:
    """Indexer weights as safetensors (fp16 by default: ~9 MB for 30 layers), config in metadata."""
    import json

    from safetensors.torch import save_file

    state = {f"layers.{i}.{n}": t.detach().to(dtype).contiguous()
             for i, ix in enumerate(indexers) for n, t in ix.state_dict().items()}
    meta = {"indexer_config": json.dumps(indexers[0].cfg.to_dict()), "n_layers": str(len(indexers))}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    save_file(state, str(path), metadata=meta)


def load_indexers(path: str | Path = INDEXER_FILE, hidden_size: int = 576, index_topk: int | None = None,
                  dtype: torch.dtype = torch.float32) -> list[SmolIndexer]:
    """SmolIndexer modules (fp32 by default) from a file written by `save_indexers`."""
    import json

    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no indexer weights at {path}: run scripts/train_smollm2_indexer.py")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    cfg = IndexerConfig(**json.loads(meta["indexer_config"]))
    if index_topk is not None:
        cfg = IndexerConfig(**{**cfg.to_dict(), "index_topk": int(index_topk)})
    out = []
    for i in range(int(meta["n_layers"])):
        ix = SmolIndexer(hidden_size, cfg, layer_idx=i)
        prefix = f"layers.{i}."
        ix.load_state_dict({k[len(prefix):]: v.to(dtype) for k, v in state.items() if k.startswith(prefix)})
        out.append(ix.to(dtype))
    return out


def random_indexers(model, cfg: IndexerConfig = IndexerConfig(), seed: int = 0) -> list[SmolIndexer]:
    """Freshly initialised (untrained) indexers, deterministic in `seed`."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        n = model.config.num_hidden_layers
        return [SmolIndexer(model.config.hidden_size, cfg, layer_idx=i) for i in range(n)]
    finally:
        torch.random.set_rng_state(gen_state)


def dsa_ify(model, indexers: list[SmolIndexer], backend: str = "auto"):
    """Replace every LlamaAttention of `model` (in place) by a SmolDSAAttention with its indexer."""
    layers = model.model.layers
    if len(indexers) != len(layers):
        raise ValueError(f"{len(indexers)} indexers for {len(layers)} layers")
    p = next(model.parameters())
    for i, (layer, ix) in enumerate(zip(layers, indexers)):
        if isinstance(layer.self_attn, SmolDSAAttention):
            raise ValueError("the model is already a DSA model")
        ix.layer_idx = i
        layer.self_attn = SmolDSAAttention(layer.self_attn, ix.to(device=p.device, dtype=p.dtype), backend=backend)
    _register_attention()
    model.config._attn_implementation = ATTN_IMPLEMENTATION
    model.config.index_topk = indexers[0].index_topk
    return model


def set_index_topk(model, index_topk: int) -> None:
    """Change the native budget of every layer."""
    for layer in model.model.layers:
        layer.self_attn.indexer.index_topk = int(index_topk)
    model.config.index_topk = int(index_topk)


def load_smollm2_dsa(index_topk: int = DEFAULT_INDEX_TOPK, indexer: str | Path = "trained",
                     dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                     backend: str = "auto", seed: int = 0):
    """(model, tokenizer): SmolLM2-135M-Instruct as a native DSA model.

    indexer: "trained" (the shipped weights), "random" (untrained, deterministic in `seed`), or a
    path to a safetensors file from `save_indexers`.
    """
    model, tok = load_smollm2(dtype=dtype, device=device)
    if indexer == "random":
        ixs = random_indexers(model, IndexerConfig(index_topk=index_topk), seed=seed)
    else:
        ixs = load_indexers(INDEXER_FILE if indexer == "trained" else indexer, model.config.hidden_size,
                            index_topk=index_topk)
    dsa_ify(model, ixs, backend=backend)
    return model, tok


def build_testbed(index_topk: int = DEFAULT_INDEX_TOPK, indexer: str = "trained", dtype: str = "float32",
                  device: str = "cpu", **_unused):
    """`stem_boost.testbeds` entry point (`stem-boost compare` with testbed `smollm2_dsa`)."""
    from ..text.tokenizers import HFTokenizer
    from . import Testbed

    model, tok = load_smollm2_dsa(index_topk=index_topk, indexer=indexer, dtype=getattr(torch, dtype),
                                  device=device)
    desc = (f"SmolLM2-135M-Instruct (GGUF Q4_1, 30 layers, GQA 9q/3kv x 64) + distilled lightning indexer "
            f"({indexer}), index_topk {index_topk}")
    tokenizer = HFTokenizer(tok)
    tokenizer.bos_id = None  # SmolLM2 adds no BOS (its "bos" is <|im_start|>); the indexer was trained without
    return Testbed(model=model, tokenizer=tokenizer, name="smollm2_dsa", description=desc,
                   random_weights=False, family="dsa")


# --------------------------------------------------------------------------------------------------
# Distillation targets and metrics (training script, evaluation, tests)
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def attention_inputs(model, input_ids: torch.Tensor, keep: bool = True):
    """Run the (dense, frozen) model once; per layer the attention's input hidden state [B, S, hidden]
    and position embeddings (cos, sin). Works on the plain Llama model and on the DSA one."""
    captured: list = []

    def hook(mod, args, kwargs):
        captured.append((kwargs["hidden_states"], kwargs["position_embeddings"]))

    hooks = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.layers]
    try:
        model.model(input_ids=input_ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return captured


@torch.no_grad()
def teacher_distribution(attn: nn.Module, x: torch.Tensor, position_embeddings, q_chunk: int = 1024) -> torch.Tensor:
    """The main attention's probabilities summed over the heads and L1-normalised per query row
    (DeepSeek-V3.2's dense warm-up target): [B, S, S] fp32, causal."""
    B, S, _ = x.shape
    D = attn.head_dim
    q = attn.q_proj(x).view(B, S, -1, D).transpose(1, 2)
    k = attn.k_proj(x).view(B, S, -1, D).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = apply_rope_half(q, k, cos, sin)
    Hq, Hkv = q.shape[1], k.shape[1]
    k = k.float().repeat_interleave(Hq // Hkv, dim=1)
    out = torch.empty(B, S, S, dtype=torch.float32, device=x.device)
    for s0 in range(0, S, q_chunk):
        s1 = min(S, s0 + q_chunk)
        sc = torch.einsum("bhsd,bhtd->bhst", q[:, :, s0:s1].float(), k) * attn.scaling
        causal = torch.arange(S, device=x.device)[None, :] <= torch.arange(s0, s1, device=x.device)[:, None]
        p = sc.masked_fill(~causal, float("-inf")).softmax(-1)
        out[:, s0:s1] = p.sum(1) / Hq
    return out


def kl_rows(p: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p || softmax(logits)) per query row [B, S] (masked logits = -inf, where p = 0)."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    logq = torch.where(torch.isfinite(logq), logq, torch.zeros_like(logq))
    return (torch.xlogy(p, p) - p * logq).sum(-1)


@torch.no_grad()
def topk_recall(p: torch.Tensor, scores: torch.Tensor, k: int) -> dict:
    """How well the top-k of `scores` [B, S, S] (masked = -inf) matches the top-k of the true
    distribution p, over the rows that have more than k causal keys (rows with <= k keys are dense).

    recall: |top-k(scores) & top-k(p)| / k, averaged.  mass: attention mass of p the top-k(scores)
    keeps; oracle_mass: the mass of p's own top-k (the best any k-subset can do)."""
    S = p.shape[-1]
    rows = torch.arange(k, S, device=p.device)  # row i has i + 1 keys
    if rows.numel() == 0:
        return dict(recall=1.0, mass=1.0, oracle_mass=1.0, rows=0)
    pr, sr = p[:, rows], scores[:, rows].float()
    top_s = sr.topk(k, dim=-1).indices
    top_p = pr.topk(k, dim=-1).indices
    hit = torch.zeros_like(pr, dtype=torch.bool).scatter_(-1, top_p, True).gather(-1, top_s)
    return dict(recall=float(hit.float().mean()), mass=float(pr.gather(-1, top_s).sum(-1).mean()),
                oracle_mass=float(pr.gather(-1, top_p).sum(-1).mean()), rows=int(rows.numel() * p.shape[0]))


def sink_recent_scores(S: int, n_sink: int = 4, device=None) -> torch.Tensor:
    """Baseline "indexer" that prefers the first n_sink tokens, then the most recent ones
    (StreamingLLM's pattern) as [1, S, S] scores."""
    t = torch.arange(S, device=device, dtype=torch.float32)
    s = t[None, :] - t[:, None]  # recent keys score higher
    s = torch.where(t[None, :] < n_sink, torch.full_like(s, 1e6), s)
    causal = t[None, :] <= t[:, None]
    return s.masked_fill(~causal, float("-inf")).unsqueeze(0)


def random_scores(S: int, seed: int = 0, device=None) -> torch.Tensor:
    """Baseline: uniformly random key scores [1, S, S] (causal)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(S, S, generator=g).to(device)
    causal = torch.ones(S, S, dtype=torch.bool, device=device).tril()
    return s.masked_fill(~causal, float("-inf")).unsqueeze(0)


def entropy_rows(p: torch.Tensor) -> torch.Tensor:
    return -torch.xlogy(p, p).sum(-1)
