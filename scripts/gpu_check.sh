#!/usr/bin/env bash
# The prepared GPU check (issue 11): install the carried wheels (.whl/, made by scripts/gpu_wheels.sh) into
# /tmp/site, then run benchmarks/gpu_check.py under a total time limit. Results: $OUT/gpu_check.json,
# $OUT/gpu_check.md (rewritten after every item, so a timeout still leaves data) and $OUT/gpu_check.log.
#
#   scripts/gpu_check.sh                # on a CUDA machine (about 6 minutes; hard limit GPU_CHECK_LIMIT_S=450)
#   scripts/gpu_check.sh --dry-run      # on CPU: tiny sizes, Triton interpreter, no wheels needed
#   scripts/gpu_check.sh --dry-run --quick  # the same, fp32 only, one case and length (the default test run)
#
# Extra arguments go to benchmarks/gpu_check.py (e.g. --sections ac). PYTHON picks the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/gpu_check_out}
PY=${PYTHON:-python3}
LIMIT=${GPU_CHECK_LIMIT_S:-450}
mkdir -p "$OUT"
source scripts/gpu_run.sh
gpu_run gpu_check .whl /tmp/site "$LIMIT" gpu_wheels.sh "megatron/fla sections will say so" -- "$@"
