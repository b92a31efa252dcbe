#!/usr/bin/env bash
# SmolLM2-135M evaluation with the calibrated per-layer allocations (stem_cal, mass_cal) next to
# every other variant, on one GPU: one process per (family, length) side by side, and InfLLMv2 at
# 8K split over two processes by variant (its mass variants are the slow ones). Every process
# calibrates on the same training-text windows (2K, 4K and 8K), so the allocation is one per
# family for all lengths. The GGUF arrives as in gpu_smollm2_setup.sh (three calls).
# Usage: bash scripts/gpu_smollm2_cal.sh OUT_DIR
set -uo pipefail
out=${1:-/tmp/smollm2_cal}
mkdir -p "$out"
source scripts/gpu_smollm2_setup.sh "$out" || exit 1
limit=${EVAL_LIMIT_S:-540}
samples=${EVAL_SAMPLES:-8}
cal="--cal-lengths 2048 4096 8192 --cal-windows ${CAL_WINDOWS:-1}"
all="dense native stem uniform no_oam mass stem_cal mass_cal"
run() {  # name, then eval_smollm2 arguments
  local name=$1; shift
  timeout "$limit" python scripts/eval_smollm2.py --samples "$samples" $cal --out "$out/$name.json" "$@" \
    > "$out/$name.log" 2>&1 &
}
for L in 2048 4096 8192; do
  run "dsa_top1024_$L" --family dsa --index-topk 1024 --lengths $L --variants $all
done
run infllmv2_2048 --family infllmv2 --lengths 2048 --variants $all
run infllmv2_4096 --family infllmv2 --lengths 4096 --variants $all
run infllmv2_8192_a --family infllmv2 --lengths 8192 --variants dense native stem uniform no_oam
run infllmv2_8192_b --family infllmv2 --lengths 8192 --variants dense native mass stem_cal mass_cal
wait
nvidia-smi --query-gpu=name --format=csv,noheader
for f in "$out"/*.log; do echo "== $f"; grep -E "^L=|^calibrated|Error|error" "$f" | cut -c1-220 | tail -12; done
