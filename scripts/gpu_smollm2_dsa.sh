#!/usr/bin/env bash
# SmolLM2-135M DSA (top-INDEX_TOPK keys, default 1024; reduce 0.15) with a given indexer, every variant, in one call:
#   1. the calibrated allocations of stem_cal and mass_cal (layer objective, one training window at
#      each of 2K/4K/8K) for that indexer, into OUT_DIR/calibration/, two processes;
#   2. dense / native / stem / uniform / no_oam / mass / stem_cal / mass_cal at 2K, 4K and 8K, four
#      processes per length side by side, until the call's deadline.
# INDEXER: the indexer weights (default: the shipped ones; e.g. /tmp/sb_indexer/indexer.safetensors
# left by gpu_smollm2_indexer.sh on the same warm machine). The GGUF arrives in pieces
# (gpu_smollm2_setup.sh). Usage: INDEXER=... bash scripts/gpu_smollm2_dsa.sh OUT_DIR
set -uo pipefail
t_start=$(date +%s)
out=${1:-/tmp/smollm2_dsa}
mkdir -p "$out/calibration"
source scripts/gpu_smollm2_setup.sh "$out" || exit 1
dsa="--family dsa --index-topk ${INDEX_TOPK:-1024} --indexer ${INDEXER:-trained} --samples ${EVAL_SAMPLES:-8} --cal-dir $out/calibration"
run() { local name=$1; shift; eval_bg "$name" $dsa "$@"; }  # name, then eval_smollm2 arguments
run cal_stem --variants stem_cal --calibrate-only --cal-lengths 2048 4096 8192 --cal-windows 1
run cal_mass --variants mass_cal --calibrate-only --cal-lengths 2048 4096 8192 --cal-windows 1
wait
echo "calibration done after $(( $(date +%s) - t_start ))s"
for L in ${EVAL_LENGTHS:-2048 4096 8192}; do
  run "a_$L" --lengths $L --variants dense native mass_cal
  run "b_$L" --lengths $L --variants stem stem_cal
  run "c_$L" --lengths $L --variants mass uniform
  run "d_$L" --lengths $L --variants no_oam
done
wait
nvidia-smi --query-gpu=name --format=csv,noheader
for f in "$out"/*.log; do echo "== $(basename $f)"; grep -E "^L=|^calibrated|Error|error" "$f" | cut -c1-160 | tail -4; done
echo "total $(( $(date +%s) - t_start ))s"
