#!/usr/bin/env bash
# The prepared GPU check (issue 11): install the carried wheels (.whl/, made by scripts/gpu_wheels.sh) into
# /tmp/site, then run benchmarks/gpu_check.py under a total time limit. Results: $OUT/gpu_check.json,
# $OUT/gpu_check.md (rewritten after every item, so a timeout still leaves data) and $OUT/gpu_check.log.
#
#   scripts/gpu_check.sh                # on a CUDA machine (about 6 minutes; hard limit GPU_CHECK_LIMIT_S=450)
#   scripts/gpu_check.sh --dry-run      # on CPU: tiny sizes, Triton interpreter, no wheels needed
#
# Extra arguments go to benchmarks/gpu_check.py (e.g. --sections ac). PYTHON picks the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/gpu_check_out}
PY=${PYTHON:-python3}
LIMIT=${GPU_CHECK_LIMIT_S:-450}
mkdir -p "$OUT"
dry_run=0
for arg in "$@"; do [ "$arg" = --dry-run ] && dry_run=1; done
path=$REPO
if [ "$dry_run" = 0 ]; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
      path=$REPO:/tmp/site
    else
      echo "gpu_check.sh: installing .whl/*.whl failed; running without them (megatron/fla sections will say so)"
    fi
  else
    echo "gpu_check.sh: no .whl/ folder (make it with scripts/gpu_wheels.sh and carry it); running without wheels"
  fi
fi
export PYTHONPATH=$path${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OUT
echo "gpu_check.sh: $("$PY" -V 2>&1), PYTHONPATH=$PYTHONPATH, limit ${LIMIT}s, out $OUT"
timeout -k 10 "$LIMIT" "$PY" benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
  echo "gpu_check.sh: stopped at the total limit of ${LIMIT}s; partial results:"
  cat "$OUT/gpu_check.md" 2>/dev/null
fi
exit "$rc"
