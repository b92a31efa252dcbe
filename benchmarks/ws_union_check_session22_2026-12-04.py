"""The warp-specialised walk on independent random per-token lists (long gaps between a half's entries) at 32K:
against the 64-row Gluon kernel, and both timed (a hang stops at the step's timeout)."""
import time
import torch
import triton
from stem_boost.kernels.block_union import block_union_attention

torch.manual_seed(2)
B, S, Hkv, G, D, K = 1, 32768, 2, 16, 128, 64
nb = S // 64
q = torch.randn(B, S, Hkv * G, D, device="cuda", dtype=torch.bfloat16)
k = torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16)
v = torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16)
vis = torch.arange(S, device="cuda") // 64
score = torch.rand(B, Hkv, S, nb, device="cuda")
score = torch.where(torch.arange(nb, device="cuda") <= vis[:, None], score, -1.0)
score[..., 0] = 2.0
score = torch.where(torch.arange(nb, device="cuda") == vis[:, None], 2.0, score)
top = score.topk(K, dim=-1)
idx = torch.where(top.values >= 0, top.indices, nb + 1).sort(dim=-1).values
idx = torch.where(idx > nb, -1, idx).to(torch.int32)
counts = (idx >= 0).sum(-1).to(torch.int32)
del score, top
t = time.time()
a = block_union_attention(q, k, v, idx, counts, block_size=64, kernel="sm90_ws")
torch.cuda.synchronize()
print("ws first call", round(time.time() - t, 1), "s", flush=True)
b = block_union_attention(q, k, v, idx, counts, block_size=64, kernel="sm90")
print("ws vs m64 rel err", float((a.float() - b.float()).norm() / b.float().norm()), flush=True)
for name, kern in (("sm90", "sm90"), ("sm90_ws", "sm90_ws"), ("sm90", "sm90"), ("sm90_ws", "sm90_ws")):
    ms = triton.testing.do_bench(lambda: block_union_attention(q, k, v, idx, counts, block_size=64, kernel=kern), rep=200)
    print(f"{name}: {ms:.3f} ms", flush=True)
err = float((a.float() - b.float()).norm() / b.float().norm())
assert err < 1e-2, f"the warp-specialised walk disagrees with the 64-row one: {err:.3e}"
print("smoke ok", flush=True)
