#!/usr/bin/env bash
# Train the SmolLM2 DSA testbed's lightning indexers on one GPU (scripts/train_smollm2_indexer.py with
# its defaults: 2K then 8K tokens; what produced the shipped weights), in one call:
# writes OUT_DIR/indexer.safetensors, OUT_DIR/indexer_log.json and a copy in /tmp/sb_indexer/ for
# the next call on the same warm machine. Extra arguments go to the training script.
# The GGUF arrives in pieces (gpu_smollm2_setup.sh). Usage: bash scripts/gpu_smollm2_indexer.sh OUT_DIR [args]
set -uo pipefail
out=${1:-/tmp/smollm2_indexer}; shift || true
mkdir -p "$out" /tmp/sb_indexer
source scripts/gpu_smollm2_setup.sh "$out" || exit 1
python scripts/train_smollm2_indexer.py --device cuda --max-seconds ${TRAIN_MAX_S:-420} \
  --out "$out/indexer.safetensors" --log "$out/indexer_log.json" "$@" 2>&1 | tee "$out/train.log" | grep -v "^step" 
grep "^step" "$out/train.log" | awk 'NR % 5 == 1' | tail -20
cp "$out/indexer.safetensors" "$out/indexer_log.json" /tmp/sb_indexer/ && nvidia-smi --query-gpu=name --format=csv,noheader
