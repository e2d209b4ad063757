#!/bin/bash
# The device check of the GPU issues in one command, for a session lent a GPU machine. Run from the
# repository root; results go to $OUT (default: bench/results/gpu_check/), the synthetic data and labeling
# folders to $WORK (default: /tmp/datadistill-gpu-check, not copied back):
#
#     bash bench/gpu_check.sh                 # on the GPU machine
#     QUICK=1 bash bench/gpu_check.sh         # every step on a few tiny images: a smoke run, on a CPU too
#
# Steps, each under its own timeout (the sum is 540 s, under the device tool's 600 s per command; a step
# that runs out loses its own row only, and the table says so):
#   1. bench/gpu.py, one model per step (128 images of 640 px, the 8 default views, label batch 8): (a) the
#      network alone at batch 32, bf16, channels-last; (b) the eager forward; (c) `datadistill label`:
#      fasterrcnn_resnet50_fpn_v2 100 s (it makes the data), small_fcos 70 s, yolo:yolo11n.yaml 70 s,
#      hf:rtdetr 100 s;
#   2. training, R50-FPN v2 at batch 32 (256 images), fp32 vs bf16 it/s: 120 s;
#   3. the CUDA tests (tests/test_cuda.py): 80 s;
#   4. one table of all rows: $OUT/gpu.json and $OUT/gpu_table.txt.
# Then, in a second call if device time is left (about a minute): torchvision's per-image transform and
# post-processing against datadistill.models.batched's (the GPU default), and channels-last:
#     python3 bench/batched_forward.py --device cuda --images 32 --size 640 --repeats 5 \
#         --models small_fcos fasterrcnn_resnet50_fpn_v2
#
# The machine's own Python and torch are used (PYTHONPATH=src, no install of datadistill). Wheels it lacks
# are installed from WHEELS (default: .whl/; --no-deps, into /tmp/site), downloaded beforehand on a machine
# with internet for the device's Python 3.12 on x86_64 Linux (here: the dev environment's versions):
#     pip download --python-version 3.12 --platform manylinux2014_x86_64 --only-binary=:all: --no-deps -d .whl \
#         faster-coco-eval pycocotools ensemble-boxes \
#         ultralytics==8.4.190 \
#         transformers==5.25.0 huggingface-hub==2.4.0 tokenizers==0.23.3 safetensors==0.8.0 regex==2026.11.19 \
#         kernels==0.19.1 httpx2==2.16.2 httpcore2==2.16.2 h11==0.16.0 anyio==4.16.0 idna==3.20 \
#         truststore==0.10.5 charset-normalizer==3.5.3 jinja2==3.1.6 markupsafe==3.0.4 filelock==4.3.2 \
#         packaging==26.4 fsspec==2026.9.0
# faster-coco-eval, pycocotools, ensemble-boxes: the CUDA tests (as before). ultralytics: the YOLO row (its
# model, predictor and NMS import nothing else beyond what datadistill's labeling already imports: numpy,
# opencv, pyyaml, pillow, torchvision). transformers and the rest: the RT-DETR row (what loading and running
# it imported here, transformers 5.25 needs kernels). pytest, pluggy, iniconfig, and opencv-python-headless
# (cv2: faster-coco-eval and ultralytics import it) where the machine has none.
# A row whose package is missing says so in the table and the other rows go on; env.txt lists what imports.
set -u
OUT=${OUT:-bench/results/gpu_check}
WORK=${WORK:-/tmp/datadistill-gpu-check}
WHEELS=${WHEELS:-.whl}
QUICK=${QUICK:-0}
FORMAT=${FORMAT:-png}  # what (b) and (c) read: png, or jpg (JPEG copies: label decodes them on the GPU)
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHEELS"/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
"$PY" - <<'EOF' | tee "$OUT/env.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for name in ("torchvision", "ultralytics", "transformers", "faster_coco_eval", "numba", "pyarrow", "cv2"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:
        print(name, "missing:", type(exc).__name__, exc)
EOF
df -h /dev/shm | tee -a "$OUT/env.txt"  # DataLoader workers hand batches over in it (batch 32 at 640 px: 157 MB each)

if [ "$QUICK" = 1 ]; then
    LABEL=(--image-format "$FORMAT" --images 4 --size 64 --views identity,hflip --batch-size 2 --limit-batch 2
           --limit-iterations 2 --limit-warmup 1 --workers 0 --threads 1)
    TRAIN=(--images 4 --size 64 --train-batch-size 2 --train-iterations 1 --train-warmup 1 --workers 0 --threads 1)
else
    LABEL=(--image-format "$FORMAT" --images 128 --workers 8 --threads 4)
    TRAIN=(--images 256 --train-batch-size 32 --train-iterations 20 --train-warmup 5 --workers 8 --threads 4)
fi
STATUS="$OUT/steps.txt"
: >"$STATUS"

step() {  # step SECONDS NAME COMMAND...: run it under a timeout, record how it ended
    local seconds=$1 name=$2
    shift 2
    local t0=$SECONDS
    timeout -k 10 "$seconds" "$@"
    local rc=$?
    local how="ok"
    [ $rc = 124 ] || [ $rc = 137 ] && how="TIMED OUT after $seconds s"
    [ $rc != 0 ] && [ "$how" = ok ] && how="failed (exit $rc)"
    echo "$name: $how, $((SECONDS - t0)) s" | tee -a "$STATUS"
}

echo "== 1. bench/gpu.py: (a) the network alone, (b) the eager forward, (c) label; one model per step"
NAMES=()
for entry in fasterrcnn_resnet50_fpn_v2:100 small_fcos:70 yolo:yolo11n.yaml:70 hf:rtdetr:100; do
    model=${entry%:*}
    seconds=${entry##*:}
    name=label_$(echo "$model" | tr ':/.' '___')
    NAMES+=("$name")
    extra=()  # RT-DETR picks its 300 queries among the encoder's positions: at least 128 px (336 of them)
    [ "$QUICK" = 1 ] && [ "$model" = hf:rtdetr ] && extra=(--size 128)
    step "$seconds" "label $model" "$PY" bench/gpu.py --models "$model" --train-models --work "$WORK" \
        --out "$OUT/$name.json" "${LABEL[@]}" ${extra[@]+"${extra[@]}"} 2>"$OUT/$name.log" | tee "$OUT/$name.txt"
done

echo "== 2. training, R50-FPN v2 at batch 32: fp32 vs bf16"
step 120 "train fasterrcnn_resnet50_fpn_v2" "$PY" bench/gpu.py --models --train-models fasterrcnn_resnet50_fpn_v2 \
    --work "$WORK" --out "$OUT/train_r50.json" "${TRAIN[@]}" 2>"$OUT/train_r50.log" | tee "$OUT/train_r50.txt"

echo "== 3. CUDA tests"
step 80 "tests/test_cuda.py" "$PY" -m pytest -q -p no:cacheprovider -o addopts= tests/test_cuda.py 2>&1 | tail -3 | tee "$OUT/tests.txt"

echo "== 4. the table"
results=()
for name in "${NAMES[@]}" train_r50; do
    [ -f "$OUT/$name.json" ] && results+=("$OUT/$name.json")
done
if [ ${#results[@]} -gt 0 ]; then
    "$PY" bench/gpu.py --merge "${results[@]}" --out "$OUT/gpu.json" 2>>"$OUT/merge.log" | tee "$OUT/gpu_table.txt"
fi
tee -a "$OUT/gpu_table.txt" <"$STATUS"
echo "done"
