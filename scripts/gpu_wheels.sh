#!/usr/bin/env bash
# Make .whl/ (git-ignored): the wheels scripts/gpu_check.sh installs on a GPU machine that has no network
# (Python 3.12, torch 2.11 + CUDA 13, triton 3.6, einops, numpy; no megatron-core, fla, mamba-ssm, TE).
# Pure-Python or cp312 manylinux x86-64 wheels, no dependencies resolved (the image has torch, numpy, einops):
#   megatron-core 0.19.2  (Requires-Dist: torch, numpy, packaging>=24.2 — all in the image; extras not needed)
#   fla-core 0.6.0        (Requires-Dist: einops, in the image; torch/triton only through extras)
# Nothing else: a carried wheel that the image also has would shadow the image's copy for every package.
# Then it checks that the set installs into a clean --target dir and that megatron.core imports from there.
#   scripts/gpu_wheels.sh            # needs PyPI; about 4 MiB
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
PY=${PYTHON:-python3}
WHEELS=(megatron-core==0.19.2 fla-core==0.6.0)
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download -q --disable-pip-version-check --no-deps "${TARGET[@]}" -d "$DEST" "${WHEELS[@]}"
for wheel in "$DEST"/*.whl; do
  echo "$(basename "$wheel"): $(unzip -p "$wheel" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' \
    | cut -d' ' -f2- | paste -sd, - || true)"
done
du -sh "$DEST"
# The install the GPU machine does, into a clean dir (pip of this Python, told the target is cp312).
check=$(mktemp -d)
trap 'rm -rf "$check"' EXIT
"$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --ignore-requires-python "${TARGET[@]}" \
  --target "$check" "$DEST"/*.whl
VENV_PY=${CHECK_PYTHON:-.venv/bin/python}
if [ -x "$VENV_PY" ]; then
  PYTHONPATH=$PWD:$check "$VENV_PY" -W ignore - "$check" <<'PY'
import sys
for name in ("mamba_ssm", "causal_conv1d", "transformer_engine", "flash_attn", "apex"):  # absent on the GPU machine
    sys.modules[name] = None
import megatron.core, fla.ops.gated_delta_rule
from echo_megatron.megatron.specs import ska_layer_spec_local
assert megatron.core.__file__.startswith(sys.argv[1]), megatron.core.__file__
print(f"gpu_wheels.sh: megatron.core {megatron.core.__version__} and fla {fla.__version__} import from the wheels; "
      f"ska_layer_spec_local imports without mamba_ssm/TE/flash_attn ({ska_layer_spec_local.submodules.self_attention.module.__name__})")
PY
else
  echo "gpu_wheels.sh: $VENV_PY not found: skipped the import check (set CHECK_PYTHON to a Python with torch)"
fi
