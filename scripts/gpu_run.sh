# Sourced by scripts/gpu_check.sh and scripts/gpu_e2e.sh: the part the two prepared GPU runs share.
#
#   gpu_run NAME WHEELS SITE LIMIT_S MAKER MISSING -- ARGS...
#
# Unless ARGS hold --dry-run, installs the carried wheels WHEELS/*.whl (made by scripts/MAKER) into SITE and puts
# it on PYTHONPATH after the repository (MISSING says what runs without them); then runs benchmarks/NAME.py
# --out "$OUT" ARGS under a total limit of LIMIT_S seconds, its output teed to $OUT/NAME.log, and on a timeout
# prints the partial report $OUT/NAME.md. Needs REPO, OUT and PY set; exports OUT and PYTHONPATH.
gpu_run() {
  local name=$1 wheels=$2 site=$3 limit=$4 maker=$5 missing=$6 path=$REPO dry_run=0 arg rc
  shift 7
  for arg in "$@"; do [ "$arg" = --dry-run ] && dry_run=1; done
  if [ "$dry_run" = 0 ]; then
    if compgen -G "$wheels/*.whl" >/dev/null; then
      if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
          "$wheels"/*.whl; then
        path=$REPO:$site
      else
        echo "$name.sh: installing $wheels/*.whl failed; running without them ($missing)"
      fi
    else
      echo "$name.sh: no $wheels/ folder (make it with scripts/$maker and carry it); running without wheels"
    fi
  fi
  export PYTHONPATH=$path${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OUT
  echo "$name.sh: $("$PY" -V 2>&1), PYTHONPATH=$PYTHONPATH, limit ${limit}s, out $OUT"
  timeout -k 10 "$limit" "$PY" "benchmarks/$name.py" --out "$OUT" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "$name.sh: stopped at the total limit of ${limit}s; partial results:"
    cat "$OUT/$name.md" 2>/dev/null
  fi
  return "$rc"
}
