#!/usr/bin/env bash
# One-shot GPU checks and timings for a lent GPU machine (run from the repo root; writes $OUT or bench_out/gpu).
# Prerequisite there: torch with CUDA; DALI from wheels carried in WHEELS_DIR (see ../shared/gpu/dali_wheels.sh).
#   WHEELS_DIR=~/dali_whl OUT=$OUT bash launch/gpu_checks.sh
# Everything below is what docs/PERFORMANCE.md lists as "not measured" on CPU-only sessions.
set -uo pipefail
OUT=${OUT:-bench_out/gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
if [ -n "${WHEELS_DIR:-}" ] && [ -d "$WHEELS_DIR" ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site "$WHEELS_DIR"/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
run() { echo "== $*" | tee -a "$OUT/log.txt"; timeout 240 "$@" 2>&1 | tee -a "$OUT/log.txt"; }
# 1. GPU-only tests (DALI mixed decode vs CPU mode, channels_last)
run python3 -m pytest -q -p no:cacheprovider tests/unit/test_dali_backend.py -k gpu
# 2. meta step cost vs a plain step: ResNet-50 224 px bf16 B=128 (goal: exact <= 3x, head <= 1.15x)
run python3 -m launch.bench_meta --arch resnet50 --image-size 224 --batch 128 --precision bf16 --device cuda \
    --modes plain,head,exact,second_order --steps 10 --warmup 3
# 3. DALI mixed-decode pipeline alone, and the torch loader, at 8 threads
run python3 -m launch.bench_data --device cuda --threads 8 --image-size 224 --batch 256 --batches 30 --n 2000 \
    --raw-size 1024 --workers 16 --repeat 2 --json "$OUT/data.json"
# 4. DALI-fed ResNet-50 bf16 training vs the same step on synthetic in-GPU data (goal >= 97%)
PREP=bench_out/data/prepared
for backend in synthetic dali; do
  run python3 -m launch.cli bench train configs/aptos_baseline.yaml data.backend=$backend data.root=$PREP \
      data.format=prepared train.batch_size=256 train.max_steps=60 train.precision=bf16 data.num_workers=8 \
      logging.every_steps=20
done
