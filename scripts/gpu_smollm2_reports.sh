#!/usr/bin/env bash
# H100 `stem-boost compare` reports on the real-weights testbeds (SmolLM2 DSA and InfLLMv2) plus the
# InfLLMv2 8K row of the mass-aware variant (WITH_INF8K=1); the GGUF travels as in scripts/gpu_smollm2.sh.
# Usage on the device machine: bash scripts/gpu_smollm2_reports.sh OUT_DIR
set -uo pipefail
out=${1:-/tmp/smollm2_out}
source scripts/gpu_smollm2_setup.sh "$out" || exit 1
limit=${EVAL_LIMIT_S:-500}
lengths=${CMP_LENGTHS:-[4096]}  # one length keeps both reports inside one 10-minute device call
common=(--set model.device=cuda --set model.dtype=bfloat16 --set "tasks.names=[niah_single_1,niah_multikey_1,vt]"
        --set tasks.samples=2 --set "tasks.lengths=$lengths" --set perplexity.length=4096 --set fidelity.length=4096
        --set "latency.lengths=[2048,4096,8192]" --set latency.repeats=3 --no-progress)
timeout "$limit" python -m stem_boost compare --config smollm2 --set model.options.index_topk=1024 "${common[@]}" \
  --out /tmp/rep/h100_smollm2_dsa > "$out/cmp_dsa.log" 2>&1 &
timeout "$limit" python -m stem_boost compare --config smollm2_infllmv2 "${common[@]}" \
  --out /tmp/rep/h100_smollm2_infllmv2 > "$out/cmp_inf.log" 2>&1 &
if [ "${WITH_INF8K:-0}" = 1 ]; then  # the InfLLMv2 8K row of BENCHMARKS.md §5 (mass variant)
  timeout "$limit" python scripts/eval_smollm2.py --family infllmv2 --lengths 8192 --variants dense native stem mass \
    --samples 8 --out "$out/smollm2_infllmv2_8k.json" > "$out/inf8k.log" 2>&1 &
fi
wait
tar czf "$out/reports.tgz" -C /tmp rep
for f in "$out"/*.log; do echo "== $f"; tail -4 "$f"; done
grep -h "^L=" "$out/inf8k.log" 2>/dev/null; true
