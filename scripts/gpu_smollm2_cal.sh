#!/usr/bin/env bash
# SmolLM2-135M with calibrated per-layer allocations (stem_cal, mass_cal) on one GPU, in one call:
#   1. the allocations: for each family (DSA top-1024, InfLLMv2) and schedule (tpd, mass), measured on
#      training-text windows at 2K, 4K and 8K (`eval_smollm2.py --calibrate-only`), four processes
#      side by side, written to OUT_DIR/calibration/ (copy them to stem_boost/data/calibration/);
#   2. the evaluation of native, stem_cal and mass_cal at 2K-8K with those allocations, one process
#      per (family, length) side by side, until the call's deadline.
# The GGUF arrives in pieces (gpu_smollm2_setup.sh). Usage: bash scripts/gpu_smollm2_cal.sh OUT_DIR
set -uo pipefail
t_start=$(date +%s)
out=${1:-/tmp/smollm2_cal}
mkdir -p "$out"
source scripts/gpu_smollm2_setup.sh "$out" || exit 1
samples=${EVAL_SAMPLES:-8}
cal_dir="$out/calibration"
common="--samples $samples --cal-dir $cal_dir --cal-lengths 2048 4096 8192 --cal-windows ${CAL_WINDOWS:-1}"
run() { local name=$1; shift; eval_bg "$name" $common "$@"; }  # name, then eval_smollm2 arguments
dsa="--family dsa --index-topk 1024"
inf="--family infllmv2"
run cal_dsa_stem $dsa --variants stem_cal --calibrate-only
run cal_dsa_mass $dsa --variants mass_cal --calibrate-only
run cal_inf_stem $inf --variants stem_cal --calibrate-only
run cal_inf_mass $inf --variants mass_cal --calibrate-only
wait
echo "calibration done after $(( $(date +%s) - t_start ))s"
for L in 2048 4096 8192; do
  run "dsa_top1024_$L" $dsa --lengths $L --variants native stem_cal mass_cal
done
run infllmv2_2048 $inf --lengths 2048 --variants native stem_cal mass_cal
run infllmv2_4096 $inf --lengths 4096 --variants native stem_cal mass_cal
run infllmv2_8192_a $inf --lengths 8192 --variants native mass_cal
run infllmv2_8192_b $inf --lengths 8192 --variants stem_cal
wait
nvidia-smi --query-gpu=name --format=csv,noheader
tail -c 400 "$out"/cal_*.log | grep -v "calibrate layers"
for f in "$out"/dsa_*.log "$out"/infllmv2_*.log; do echo "== $f"; grep -E "^L=|Error|error" "$f" | cut -c1-200 | tail -6; done
echo "total $(( $(date +%s) - t_start ))s"
