#!/usr/bin/env bash
# Every GPU figure of docs/PERFORMANCE.md in one go, on one GPU node with mtcmkd installed:
#
#   bash benchmarks/gpu_checks.sh OUT_DIR [T1CE_NIFTI]
#
# 1. the method step alone: fp32 vs bf16 / channels-last (paper config, baseline);
# 2. the training loop (`mtcmkd train`, DeepSpeed, bf16) of the paper configuration and of the
#    baseline at 128^3 with 0/1/2 loader workers: how many workers keep one GPU step fed;
# 3. a short MTCM-KD run with validation, then `evaluate` and `export torchscript --verify`
#    on the GPU (the user path, end to end);
# 4. full-volume inference, eager vs the exported TorchScript file, on the GPU;
# 5. torch.compile: the baseline loop with train.compile, then the MTCM-KD step (last: compiling
#    takes longest).
# Each step has its own time limit and its own log/JSON in OUT_DIR; a failing step does not stop
# the others. Run it from outside the source tree (the installed package is used). On an H200
# steps 1-4 took 8.5 min; the compile steps add up to 7 min more. WORKERS="1" (environment)
# narrows the loader sweep.
set -u
OUT=${1:?usage: gpu_checks.sh OUT_DIR [T1CE_NIFTI]}
VOLUME=${2:-}
REPO=$(cd "$(dirname "$0")/.." && pwd)
B=$REPO/benchmarks
C=$REPO/configs
mkdir -p "$OUT"
STORE=$(mktemp -d)/store
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

step() {  # step NAME SECONDS CMD...
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T))"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 12 "$OUT/$name.log"
    echo "=== $name: rc $rc, $((SECONDS - t0)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)"

step step_paper 150 python3 "$B/bench_train_gpu.py" --config "$C/mtcmkd-paper.yaml" \
    --iters 10 --warmup 3 --variants fp32 fp32-strict bf16 bf16+channels_last \
    --json-out "$OUT/step_paper.json"
step step_baseline 90 python3 "$B/bench_train_gpu.py" --config "$C/baseline.yaml" \
    --iters 10 --warmup 3 --variants fp32 bf16 bf16+channels_last \
    --json-out "$OUT/step_baseline.json"
WORKERS=${WORKERS:-0 1 2}
# shellcheck disable=SC2086  # WORKERS is a list
step loop_paper 240 python3 "$B/bench_train_loop.py" --config "$C/mtcmkd-paper.yaml" \
    --patch 128 --shape 240 240 155 --cases 8 --steps 20 --skip 5 --workers $WORKERS \
    --store "$STORE" --set train.precision=auto --json-out "$OUT/loop_paper.json"
# shellcheck disable=SC2086
step loop_baseline 150 python3 "$B/bench_train_loop.py" --config "$C/baseline.yaml" \
    --patch 128 --steps 30 --skip 5 --workers $WORKERS --store "$STORE" \
    --set train.precision=auto --json-out "$OUT/loop_baseline.json"
RUN=$(dirname "$STORE")/run
step user_path 200 bash -c "mtcmkd train --config '$C/mtcmkd-paper.yaml' --store '$STORE' \
    --out '$RUN' --set train.epochs=2 --set train.iters_per_epoch=10 --set train.val_every=1 \
    --set train.val_cases=2 --set train.precision=auto --set method.kd_start_epoch=1 \
  && mtcmkd evaluate --year 2021 --run '$RUN' --store '$STORE' --device cuda --out '$OUT/eval' \
  && mtcmkd export torchscript '$RUN' --out '$(dirname "$STORE")/student_ts.pt' --verify"
step export_gpu 150 python3 "$B/bench_export.py" --device cuda --paths eager torchscript \
    --overlap 0.5 --repeats 2 ${VOLUME:+--volume "$VOLUME"} --json-out "$OUT/export_gpu.json"
step loop_compile 200 python3 "$B/bench_train_loop.py" --config "$C/baseline.yaml" \
    --patch 128 --steps 60 --skip 20 --workers 1 --store "$STORE" \
    --set train.precision=auto --set train.compile=true --json-out "$OUT/loop_compile.json"
step step_compile 240 python3 "$B/bench_train_gpu.py" --config "$C/mtcmkd-paper.yaml" \
    --iters 10 --warmup 3 --variants bf16 bf16+compile --json-out "$OUT/step_compile.json"
echo "=== done ($(date +%T))"
