#!/usr/bin/env bash
# Sourced by the SmolLM2 GPU scripts: installs the carried wheels (.whl_sm: gguf, accelerate), puts
# the GGUF back together from its two carried pieces (/tmp/gguf/gguf_part_00 from the previous
# call, .gguf_b/gguf_part_01 from this one), checks its sha256, and parses it once (cache).
# Usage: source scripts/gpu_smollm2_setup.sh OUT_DIR
out=${1:-/tmp/smollm2_out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_sm/*.whl || exit 1
export PYTHONPATH=/tmp/site
gguf=/tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
cat /tmp/gguf/gguf_part_00 .gguf_b/gguf_part_01 > "$gguf" || exit 1
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $gguf" | sha256sum -c - || exit 1
export STEM_BOOST_SMOLLM2_GGUF=$gguf STEM_BOOST_CACHE=/tmp/sbcache PYTHONUNBUFFERED=1
python -c "from stem_boost.testbeds.smollm2 import load_smollm2; load_smollm2()" > "$out/setup.log" 2>&1 || { tail "$out/setup.log"; exit 1; }
