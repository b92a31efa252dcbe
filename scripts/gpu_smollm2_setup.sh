#!/usr/bin/env bash
# Sourced by the SmolLM2 GPU scripts: installs the carried wheels (.whl_sm: gguf, accelerate), puts
# the GGUF back together from its carried pieces, checks its sha256, and parses it once (cache).
# A call carries at most 64 MiB including the tracked tree (~16 MiB), so the 98 MB file goes in
# three pieces (`split -b 34000000 -d <gguf> gguf_part_` into .gguf_a/, .gguf_b/, .gguf_c/):
# the earlier calls, back to back while the machine is warm, copy .gguf_a/* and .gguf_b/* to
# /tmp/gguf/; the call that sources this carries .gguf_c and .whl_sm.
# It also defines, for the scripts that run processes side by side until the call's deadline
# (t_start + DEADLINE_S, default 575 s; set t_start before sourcing to count the setup in):
#   left                     seconds to the deadline
#   eval_bg NAME ARGS...     python scripts/eval_smollm2.py ARGS --out OUT_DIR/NAME.json in the
#                            background, logged to OUT_DIR/NAME.log, killed at the deadline
# Usage: source scripts/gpu_smollm2_setup.sh OUT_DIR
out=${1:-/tmp/smollm2_out}
mkdir -p "$out"
t_start=${t_start:-$(date +%s)}
deadline=$((t_start + ${DEADLINE_S:-575}))
left() { echo $((deadline - $(date +%s))); }
eval_bg() {
  local name=$1; shift
  timeout $(left) python scripts/eval_smollm2.py "$@" --out "$out/$name.json" > "$out/$name.log" 2>&1 &
}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_sm/*.whl || exit 1
export PYTHONPATH=/tmp/site
gguf=/tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
cat /tmp/gguf/gguf_part_00 /tmp/gguf/gguf_part_01 .gguf_c/gguf_part_02 > "$gguf" || exit 1
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $gguf" | sha256sum -c - || exit 1
export STEM_BOOST_SMOLLM2_GGUF=$gguf STEM_BOOST_CACHE=/tmp/sbcache PYTHONUNBUFFERED=1
python -c "from stem_boost.testbeds.smollm2 import load_smollm2; load_smollm2()" > "$out/setup.log" 2>&1 || { tail "$out/setup.log"; exit 1; }
