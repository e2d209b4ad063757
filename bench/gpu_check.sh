#!/bin/bash
# The device check of the GPU issue in one command, for a session lent a GPU machine (about 8 minutes on an
# H200). Run from the repository root; results go to $OUT (default: bench/results/gpu_check/):
#
#     bash bench/gpu_check.sh
#
# The machine's own torch is used (PYTHONPATH=src, no install). Wheels it lacks (faster-coco-eval,
# pycocotools, ensemble-boxes for the fusion test) are installed from WHEELS (default: .whl/, download them
# here first with `pip download --python-version 3.12 --only-binary=:all: --no-deps -d .whl ...`).
# QUICK=1 runs every step on a few images (a smoke run of the script itself, on a CPU too).
set -u
OUT=${OUT:-bench/results/gpu_check}
WHEELS=${WHEELS:-.whl}
QUICK=${QUICK:-0}
mkdir -p "$OUT"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHEELS"/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee "$OUT/env.txt"

if [ "$QUICK" = 1 ]; then
    LABEL=(--images 4 --size 128 --batch-size 2 --repeat 1 --views identity,hflip --workers 0 --threads 1)
    TRAIN=(--train-iterations 2 --train-warmup 1)
    BIG=(--train-batch-size 3)
else
    LABEL=(--images 256 --workers 8 --threads 4)
    TRAIN=(--train-iterations 30 --train-warmup 5)
    BIG=(--train-batch-size 32)
fi

echo "== 1. CUDA tests"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -3 | tee "$OUT/tests.txt"

echo "== 2. bench/gpu.py: labeling efficiency and training, both models, batch 8"
timeout 330 python3 bench/gpu.py --out "$OUT/gpu.json" "${LABEL[@]}" "${TRAIN[@]}" 2>"$OUT/gpu.log" | tee "$OUT/gpu_table.txt"

echo "== 3. training only, R50 at a larger batch: less of each step is Python"
timeout 200 python3 bench/gpu.py --out "$OUT/gpu_train_big.json" --models fasterrcnn_resnet50_fpn_v2 --skip-label \
    "${LABEL[@]}" "${TRAIN[@]}" "${BIG[@]}" 2>"$OUT/gpu_train_big.log" | tee "$OUT/gpu_train_big_table.txt"
echo "done"
