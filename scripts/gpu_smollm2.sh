#!/usr/bin/env bash
# SmolLM2-135M evaluation on a GPU machine (the real-weights testbed): dense vs native vs Stem vs the
# two ablations at 2K-8K, DSA (two native budgets) and InfLLMv2, three processes side by side.
#
# The device machine has no network and a call carries at most 64 MiB, the GGUF is 98 MB: it travels
# in three pieces over three calls (see gpu_smollm2_setup.sh: calls 1 and 2 copy .gguf_a and
# .gguf_b to /tmp/gguf/, call 3 carries .gguf_c/gguf_part_02 and the wheels of gguf and
# accelerate in .whl_sm/ and runs this script). Usage: bash scripts/gpu_smollm2.sh OUT_DIR
set -uo pipefail
out=${1:-/tmp/smollm2_out}
mkdir -p "$out"
source scripts/gpu_smollm2_setup.sh "$out" || exit 1
limit=${EVAL_LIMIT_S:-470}
samples=${EVAL_SAMPLES:-8}
timeout "$limit" python scripts/eval_smollm2.py --family dsa --index-topk 512 --samples "$samples" \
  --out "$out/smollm2_dsa_top512.json" > "$out/dsa_top512.log" 2>&1 &
timeout "$limit" python scripts/eval_smollm2.py --family dsa --index-topk 1024 --samples "$samples" \
  --out "$out/smollm2_dsa_top1024.json" > "$out/dsa_top1024.log" 2>&1 &
timeout "$limit" python scripts/eval_smollm2.py --family infllmv2 --samples "$samples" \
  --out "$out/smollm2_infllmv2.json" > "$out/infllmv2.log" 2>&1 &
wait
for f in "$out"/*.log; do echo "== $f"; grep -E "^L=|Error|error" "$f" | tail -20; done
