# Steps of one call on a lent GPU machine, each with its own time limit and log, so that one slow step
# does not take the others' results with it. Source it, then name the steps:
#
#     source scripts/gpu_steps.sh
#     step 200 tests python -m pytest -q -m gpu tests/test_mla_token_ws.py
#     step 300 dsa python scripts/bench_layers.py --family dsa --seqs 65536 131072 --peers main --min-reps 9
#
# step LIMIT NAME CMD...: runs CMD (killed after LIMIT seconds), its output to $OUT/NAME.log (or
# ./gpu_logs/NAME.log without $OUT), then prints the exit status, the wall time and the log's last lines.
# Sets PYTHONUNBUFFERED and PYTHONPATH (the repository root) for the steps.

export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
GPU_STEPS_LOGS="${OUT:-$PWD/gpu_logs}"
mkdir -p "$GPU_STEPS_LOGS"

step() {
    local limit="$1" name="$2"
    shift 2
    local t0=$SECONDS
    timeout --signal=KILL "$limit" "$@" > "$GPU_STEPS_LOGS/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc $rc after $((SECONDS - t0)) s (limit $limit)"
    tail -n "${GPU_STEPS_TAIL:-25}" "$GPU_STEPS_LOGS/$name.log"
    return 0
}
