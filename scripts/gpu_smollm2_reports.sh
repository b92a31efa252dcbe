#!/usr/bin/env bash
# H100 `stem-boost compare` reports on the real-weights testbeds (SmolLM2 DSA and InfLLMv2) plus the
# InfLLMv2 8K row of the mass-aware variant; the GGUF travels as in scripts/gpu_smollm2.sh.
# Usage on the device machine: bash scripts/gpu_smollm2_reports.sh OUT_DIR
set -uo pipefail
out=${1:-/tmp/smollm2_out}
source scripts/gpu_smollm2_setup.sh "$out" || exit 1
limit=${EVAL_LIMIT_S:-500}
common=(--set model.device=cuda --set model.dtype=bfloat16 --set "tasks.names=[niah_single_1,niah_multikey_1,vt]"
        --set tasks.samples=2 --set latency.repeats=3 --no-progress)
timeout "$limit" python -m stem_boost compare --config smollm2 --set model.options.index_topk=1024 "${common[@]}" \
  --out /tmp/rep/h100_smollm2_dsa > "$out/cmp_dsa.log" 2>&1 &
timeout "$limit" python -m stem_boost compare --config smollm2_infllmv2 "${common[@]}" \
  --out /tmp/rep/h100_smollm2_infllmv2 > "$out/cmp_inf.log" 2>&1 &
timeout "$limit" python scripts/eval_smollm2.py --family infllmv2 --lengths 8192 --variants dense native stem mass \
  --samples 8 --out "$out/smollm2_infllmv2_8k.json" > "$out/inf8k.log" 2>&1 &
wait
tar czf "$out/reports.tgz" -C /tmp rep
for f in "$out"/*.log; do echo "== $f"; tail -4 "$f"; done
grep -h "^L=" "$out/inf8k.log"
