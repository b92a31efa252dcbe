#!/usr/bin/env bash
# Tensor-parallel check of stem_boost.dist on 2 GPUs (run from the repository root):
#   bash scripts/gpu_dist_check.sh
# 1. installs the wheels in .whl/ (DeepSpeed built with DS_BUILD_OPS=0 + the dependencies the GPU
#    image lacks) into /tmp/site when `import deepspeed` fails;
# 2. writes a random-weight DeepSeek-V3.2-shaped checkpoint (128 MLA heads, real MLA / indexer
#    dims, 2 layers, 8 experts) as sharded safetensors (scripts/gpu_dist_check.py make-ckpt);
# 3. launches `scripts/gpu_dist_check.py run` on 2 ranks with `deepspeed --num_gpus 2` (torchrun when
#    DeepSpeed cannot be imported, or LAUNCHER=torchrun): TP=2 vs TP=1 logits (fp32), Stem selection
#    digests of every rank, prefill timings at 32K and 64K (bf16), native vs Stem (reduce=0.15).
# Last line: "DIST CHECK PASSED" (exit 0) or "DIST CHECK FAILED: ..." (exit 1).
# Results JSON: $STEM_DIST_OUT/dist_check.json (default $OUT on the device machine, else out/dist_check).
#
# Environment: STEM_DIST_CPU=1 -> tiny dims, gloo, CPU (tests/test_dist.py runs this);
# STEM_DIST_ONE_GPU=1 -> a rehearsal on one GPU (both ranks on cuda:0 with gloo; timings meaningless);
# LAUNCHER=deepspeed|torchrun; NGPUS (2); LENGTHS ("32768 65536"); CKPT (checkpoint folder);
# PYTHON (python3); MASTER_PORT (29517).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
NGPUS=${NGPUS:-2}
PORT=${MASTER_PORT:-29517}
CPU=${STEM_DIST_CPU:-0}
RESULTS=${STEM_DIST_OUT:-${OUT:-out/dist_check}}
mkdir -p "$RESULTS"
# NVLink multicast stays off (shared machines); harmless elsewhere.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$CPU" = 1 ]; then
    CKPT=${CKPT:-$RESULTS/ckpt_tiny}
    ARGS=()
    export OMP_NUM_THREADS=1
else
    CKPT=${CKPT:-/tmp/stem_dsv32_mid}
    read -r -a ARGS <<< "--lengths ${LENGTHS:-32768 65536}"
    "$PY" -c 'import torch; n = torch.cuda.device_count(); print("GPUs:", n, [torch.cuda.get_device_name(i) for i in range(n)])'
fi

# ---- DeepSpeed from the carried wheels (the GPU image has no DeepSpeed and no network)
# (CPU mode installs nothing unless STEM_DIST_INSTALL=1: the wheels are for the GPU image's Python 3.12)
if [ "${STEM_DIST_INSTALL:-$([ "$CPU" = 1 ] && echo 0 || echo 1)}" = 1 ] \
        && ! "$PY" -c 'import deepspeed' >/dev/null 2>&1 && ls .whl/*.whl >/dev/null 2>&1; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
        export PYTHONPATH="$PYTHONPATH:/tmp/site"  # after the image's packages: only what is missing comes from here
    else
        echo "installing .whl/*.whl failed"
    fi
fi
LAUNCHER=${LAUNCHER:-deepspeed}
if ! "$PY" -c 'import deepspeed; print("deepspeed", deepspeed.__version__)'; then
    [ "$LAUNCHER" = deepspeed ] && echo "deepspeed cannot be imported: falling back to torchrun"
    LAUNCHER=torchrun
fi
if [ "${STEM_DIST_ONE_GPU:-0}" = 1 ]; then
    # rehearsal on a 1-GPU machine: both ranks on cuda:0, gloo (NCCL refuses two ranks on one GPU)
    LAUNCHER=torchrun
    export STEM_DIST_BACKEND=gloo
elif [ "$CPU" != 1 ]; then
    "$PY" -c "import torch, sys; n = torch.cuda.device_count(); sys.exit(0 if n >= $NGPUS else f'need $NGPUS GPUs, {n} visible (STEM_DIST_ONE_GPU=1 rehearses on one)')"
fi

# ---- the random checkpoint (one process)
"$PY" scripts/gpu_dist_check.py make-ckpt --out "$CKPT"

# ---- TP run
SCRIPT=(scripts/gpu_dist_check.py run --ckpt "$CKPT" --out "$RESULTS" "${ARGS[@]}")
if [ "$LAUNCHER" = deepspeed ]; then
    if [ "$CPU" = 1 ]; then
        # DeepSpeed's CPU launcher counts sockets/cores, not GPUs
        LAUNCH=("$PY" -m deepspeed.launcher.runner --num_accelerators "$NGPUS" --master_addr 127.0.0.1 --master_port "$PORT")
    else
        LAUNCH=("$PY" -m deepspeed.launcher.runner --num_gpus "$NGPUS" --master_addr 127.0.0.1 --master_port "$PORT")
    fi
else
    LAUNCH=("$PY" -m torch.distributed.run --nproc_per_node "$NGPUS" --master_addr 127.0.0.1 --master_port "$PORT")
fi
echo "launch: ${LAUNCH[*]} ${SCRIPT[*]}"
set +e
"${LAUNCH[@]}" "${SCRIPT[@]}" 2>&1 | tee "$RESULTS/dist_check.log"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" != 0 ]; then echo "launcher exit status $rc"; fi
exit "$rc"
