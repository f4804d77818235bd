#!/usr/bin/env bash
# The GPU figures of RESULTS.md section 4 in one short run (a few minutes on one H100/H200),
# on a machine with one CUDA GPU:
#   * training images/s of the classic loop, our pipeline and the bare model, the pipeline's
#     fraction of the bare model's forward+backward throughput (target >= 0.80) and each one's
#     peak GPU memory, at the paper's setting (resnet101, 224 px, conv1..layer3 frozen) and at
#     resnet18 at 64 px;
#   * time to quality on the bundled sample (no dataset can be fetched on that machine).
#
#   bash bench/gpu_check.sh [OUTDIR]      (default: $OUT if set, else runs/gpu_check)
#
# Environment: DEVICE (cuda), PYTHON (python3), STEPS (20 timed steps), BATCH (32 triplets at
# 224 px; four times that at 64 px), TTQ_BUDGET (60 s). A CPU dry run of the script itself:
#   DEVICE=cpu PYTHON=.venv/bin/python STEPS=1 BATCH=2 TTQ_BUDGET=5 bash bench/gpu_check.sh /tmp/gpu_dry
set -euo pipefail
OUTDIR=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)  # relative to where it was called from, before the cd below
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
STEPS=${STEPS:-20}
BATCH=${BATCH:-32}
TTQ_BUDGET=${TTQ_BUDGET:-60}
export PYTHONUNBUFFERED=1

{ nvidia-smi || true; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } \
    > "$OUTDIR/env.txt" 2>&1

echo "== training throughput, resnet101 at 224 px, batch $BATCH"
"$PY" bench/bench_train.py --device "$DEVICE" --arch resnet101 --image-size 224 --batch-size "$BATCH" \
    --steps "$STEPS" --repeats 2 2>&1 | tee "$OUTDIR/train_resnet101_224.txt"

echo "== training throughput, resnet18 at 64 px, batch $((4 * BATCH))"
"$PY" bench/bench_train.py --device "$DEVICE" --arch resnet18 --image-size 64 --batch-size $((4 * BATCH)) \
    --steps "$STEPS" --repeats 2 2>&1 | tee "$OUTDIR/train_resnet18_64.txt"

echo "== time to quality on the bundled sample, ${TTQ_BUDGET} s per recipe"
"$PY" bench/bench_time_to_quality.py --device "$DEVICE" --source bundled --train-per-class 60 --val-per-class 15 \
    --budget "$TTQ_BUDGET" --eval-at "$TTQ_BUDGET" --output-dir "$OUTDIR/ttq" 2>&1 | tee "$OUTDIR/time_to_quality.txt"
