#!/usr/bin/env bash
# SmolLM2-135M DSA (top-1024): the calibrated allocation under the "logits" objective (next-token KL
# per (layer, cut), a full forward each) for schedule="mass", then its evaluation at 2K-8K, in one call.
#   1. one process per grid point (`--cal-grid 0 R`, measured only), merged into one allocation by
#      scripts/merge_calibrations.py -> OUT_DIR/calibration/smollm2_dsa_top1024_mass_r0.15_logits.json;
#   2. native and mass_cal (that allocation) at 2K, 4K and 8K, one process per length.
# The GGUF arrives in pieces (gpu_smollm2_setup.sh). Usage: bash scripts/gpu_smollm2_cal_kl.sh OUT_DIR
set -uo pipefail
t_start=$(date +%s)
out=${1:-/tmp/smollm2_cal_kl}
mkdir -p "$out/calibration"
source scripts/gpu_smollm2_setup.sh "$out" || exit 1
deadline=$((t_start + ${DEADLINE_S:-575}))
dsa="--family dsa --index-topk 1024 --samples ${EVAL_SAMPLES:-8} --cal-objective logits"
for R in 0.05 0.1 0.15 0.2 0.3 0.4 0.6 0.8; do
  timeout $((deadline - $(date +%s))) python scripts/eval_smollm2.py $dsa --variants mass_cal --calibrate-only \
    --cal-grid 0 $R --cal-lengths 2048 4096 8192 --cal-windows 1 --cal-dir "$out/slice_$R" --out /dev/null \
    > "$out/cal_$R.log" 2>&1 &
done
wait
n=$(ls "$out"/slice_*/*.json 2>/dev/null | wc -l)
[ "$n" -eq 8 ] || { echo "only $n of 8 grid slices were measured:"; tail -n 3 "$out"/cal_*.log; exit 1; }
python scripts/merge_calibrations.py "$out/calibration/smollm2_dsa_top1024_mass_r0.15_logits.json" \
  "$out"/slice_*/*.json || exit 1
echo "calibration done after $(( $(date +%s) - t_start ))s"
for L in 2048 4096 8192; do
  timeout $((deadline - $(date +%s))) python scripts/eval_smollm2.py $dsa --lengths $L --variants native mass_cal \
    --cal-dir "$out/calibration" --out "$out/dsa_top1024_logits_$L.json" > "$out/dsa_top1024_logits_$L.log" 2>&1 &
done
wait
nvidia-smi --query-gpu=name --format=csv,noheader
for f in "$out"/dsa_*.log; do echo "== $f"; grep -E "^L=|Error|error" "$f" | cut -c1-200 | tail -4; done
echo "total $(( $(date +%s) - t_start ))s"
