#!/usr/bin/env bash
# One-GPU check harness: installs the carried wheels, runs every GPU check and timing time-boxed within a 290 s
# budget (one H200: <= 5 min, room for a rerun in a 10-minute call) and writes $OUT/summary.json after every step.
# Run from anywhere; the steps and their limits: launch/gpu_steps.py, docs/PERFORMANCE.md.
#   WHEELS_DIR="$HOME/dali_whl" OUT=$OUT bash launch/gpu_checks.sh             # parts from ../shared/gpu/dali_wheels.sh
#   WHEELS_DIR="dali_whl trainer_whl" OUT=$OUT bash launch/gpu_checks.sh    # + python -m launch.trainer_wheels
#   OUT=$OUT bash launch/gpu_checks.sh --steps env,imports,dali_decode
#   bash launch/gpu_checks.sh --dry-run                                         # CPU, tiny model, < 60 s
# OUT gets summary.json, log.txt, gpu.txt only (a lent machine ships back <= 8 files); scratch: --work DIR or a temp dir
# WHEELS_DIR: space-separated folders of split parts (part1..partN + SHA256, assembled in numeric order) and/or
# *.whl files; wheels whose tags do not fit this Python (dali_wheels.sh fetches cp312) are reported, not forced.
# Exit code: 0 when no step failed, 1 otherwise (SKIP is not a failure); PYTHON picks the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-bench_out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
fi
read -r -a wheels <<< "${WHEELS_DIR:-}"
args=(--out "$OUT")
if [ ${#wheels[@]} -gt 0 ]; then args+=(--wheels "${wheels[@]}"); fi
exec "${PYTHON:-python3}" -m launch.gpu_checks "${args[@]}" "$@"
