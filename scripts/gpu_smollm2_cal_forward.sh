#!/usr/bin/env bash
# SmolLM2-135M DSA (top-1024), schedule="mass": calibrated allocations under the full-forward objectives
# (next-token KL and next-token loss change per (layer, cut), a full forward each, both from the same
# forwards), then their evaluation, in one call:
#   1. one process per grid point (`--cal-grid 0 R`, measured only) for CAL_OBJECTIVES (default
#      "logits nll") with the weights in CAL_DTYPE (default float32; "model" = bf16, as the first
#      logits run), merged per objective by scripts/merge_calibrations.py into OUT_DIR/calibration/;
#      beside them, unless LAYER_LENGTHS is empty, the layer objective calibrated on CAL_WINDOWS
#      windows at LAYER_LENGTHS only (default 8192: a per-length allocation) into OUT_DIR/cal_layer/;
#   2. native and mass_cal with each allocation at EVAL_LENGTHS (default 8192), one process each.
# The GGUF arrives in pieces (gpu_smollm2_setup.sh). Usage: bash scripts/gpu_smollm2_cal_forward.sh OUT_DIR
set -uo pipefail
t_start=$(date +%s)
out=${1:-/tmp/smollm2_cal_forward}
mkdir -p "$out/calibration"
source scripts/gpu_smollm2_setup.sh "$out" || exit 1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
objectives=${CAL_OBJECTIVES:-logits nll}
dtype=${CAL_DTYPE:-float32}
layer_lengths=${LAYER_LENGTHS-8192}
grid=${CAL_GRID:-0.05 0.1 0.15 0.2 0.3 0.4 0.6 0.8}
dsa="--family dsa --index-topk 1024 --samples ${EVAL_SAMPLES:-8}"
for R in $grid; do
  eval_bg "cal_$R" $dsa --variants mass_cal --calibrate-only --cal-objective $objectives --cal-dtype "$dtype" \
    --cal-grid 0 $R --cal-lengths 2048 4096 8192 --cal-windows 1 --cal-dir "$out/slice_$R"
done
if [ -n "$layer_lengths" ]; then
  eval_bg cal_layer $dsa --variants mass_cal --calibrate-only --cal-lengths $layer_lengths \
    --cal-windows ${CAL_WINDOWS:-3} --cal-dir "$out/cal_layer"
fi
wait
n_grid=$(echo $grid | wc -w)
suffix() { [ "$dtype" = float32 ] && echo "_$1_fp32" || echo "_$1"; }
for obj in $objectives; do
  n=$(ls "$out"/slice_*/*"$(suffix $obj)"*.json 2>/dev/null | wc -l)
  [ "$n" -eq "$n_grid" ] || { echo "$obj: only $n of $n_grid grid slices were measured:"; tail -n 3 "$out"/cal_*.log; exit 1; }
  python scripts/merge_calibrations.py "$out/calibration/smollm2_dsa_top1024_mass_r0.15$(suffix $obj).json" \
    "$out"/slice_*/*"$(suffix $obj)"*.json || exit 1
done
echo "calibration done after $(( $(date +%s) - t_start ))s"
evaluate() { local name=$1; shift; eval_bg "$name" $dsa --lengths $L "$@"; }  # name, then eval_smollm2 arguments
for L in ${EVAL_LENGTHS:-8192}; do
  first=native
  for obj in $objectives; do
    evaluate "${obj}_$L" --variants $first mass_cal --cal-dir "$out/calibration" --cal-objective $obj --cal-dtype "$dtype"
    first=
  done
  [ -n "$layer_lengths" ] && evaluate "layer_at_${layer_lengths// /-}_$L" --variants mass_cal --cal-dir "$out/cal_layer"
done
wait
nvidia-smi --query-gpu=name --format=csv,noheader
for f in "$out"/*.log; do echo "== $f"; grep -E "^L=|^calibrated|Error|error" "$f" | cut -c1-220 | tail -4; done
echo "total $(( $(date +%s) - t_start ))s"
