#!/usr/bin/env bash
# The H100 reports committed under reports/ (issue: evaluation suite): the two tiny random-weight
# testbeds (DSA and InfLLMv2) at 2K-8K tokens on CUDA, with the shared Triton kernel.
# Usage on a GPU machine: bash scripts/gpu_reports.sh OUT_DIR
set -euo pipefail
out=${1:-reports}
common=(--set model.device=cuda --set runtime.threads=8 --set tasks.samples=2
        --set tasks.lengths=[2048,4096,8000] --set perplexity.length=8000 --set fidelity.length=8000
        --set latency.lengths=[2048,4096,8000] --set latency.repeats=3 --no-progress)
python -m stem_boost compare --config tiny_dsa "${common[@]}" --out "$out/h100_tiny_dsa"
python -m stem_boost compare --config tiny_minicpm4 "${common[@]}" --out "$out/h100_tiny_minicpm4"
