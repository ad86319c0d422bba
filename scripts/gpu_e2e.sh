#!/usr/bin/env bash
# The prepared GPU end-to-end run (issue 19): install the carried wheels (.whl-e2e/, made by scripts/gpu_e2e_wheels.sh)
# into /tmp/site-e2e, then run benchmarks/gpu_e2e.py under a total time limit (its sections have their own limits, which
# sum to at most 450 s). Results: $OUT/gpu_e2e.{json,md} (rewritten after every row, so a timeout still leaves data),
# the same report as $OUT/docs/results/<gpu>/gpu_e2e_<date>_<commit>.{json,md} (copy $OUT/docs into the repository),
# children's logs in $OUT/logs/.
#
#   scripts/gpu_e2e.sh              # one CUDA GPU, <= 8 minutes (hard limit GPU_E2E_LIMIT_S=470)
#   scripts/gpu_e2e.sh --dry-run    # CPU: the same code at tiny sizes (gloo, --cpu, echo-tiny), no wheels needed
#                                   # (hard limit 1800 s: a CPU shared with other work)
#
# Extra arguments go to benchmarks/gpu_e2e.py (e.g. --sections ea). PYTHON picks the interpreter; the commit in the
# result names is $ECHO_COMMIT, else `git rev-parse --short HEAD` (the device copy of the tree may have no .git: pass it).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/gpu_e2e_out}
PY=${PYTHON:-python3}
SITE=/tmp/site-e2e
mkdir -p "$OUT"
dry_run=0
for arg in "$@"; do [ "$arg" = --dry-run ] && dry_run=1; done
if [ "$dry_run" = 1 ]; then LIMIT=${GPU_E2E_LIMIT_S:-1800}; else LIMIT=${GPU_E2E_LIMIT_S:-470}; fi
export ECHO_COMMIT=${ECHO_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
echo "gpu_e2e.sh: commit $ECHO_COMMIT"
source scripts/gpu_run.sh
gpu_run gpu_e2e .whl-e2e "$SITE" "$LIMIT" gpu_e2e_wheels.sh "section e says what is missing" -- "$@"
