#!/usr/bin/env bash
# Make .whl-e2e/ (git-ignored): the wheels scripts/gpu_e2e.sh installs on a GPU machine that has no network
# (Python 3.12, torch 2.11 + CUDA 13, triton 3.6, transformers 5.17, einops, numpy; no megatron-core, mamba-ssm,
# causal-conv1d, TE, flash-attn, apex). No dependencies resolved (the image has torch, numpy, einops, transformers):
#   megatron-core 0.19.2      cp312 manylinux wheel from PyPI (its dataset helpers are compiled in it)
#   mamba-ssm 2.3.2.post1     built here from the sdist without its CUDA extension (MAMBA_SKIP_CUDA_BUILD): the
#                             Triton kernels Megatron's Mamba-2 layer calls; gpu_e2e.py stands in for
#                             `selective_scan_cuda`, which `import mamba_ssm` needs
#   causal-conv1d 1.7.0       built here without its CUDA extension: it then does not import, and Megatron takes
#                             its F.conv1d path (training, --disable-mamba-mem-eff-path) and its own Triton
#                             causal_conv1d_update (decoding)
# echo-megatron itself runs from the carried working tree (PYTHONPATH), as in scripts/gpu_check.sh.
#   scripts/gpu_e2e_wheels.sh        # needs PyPI; a few MiB
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl-e2e
PY=${PYTHON:-.venv/bin/python}
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download -q --disable-pip-version-check --no-deps "${TARGET[@]}" -d "$DEST" megatron-core==0.19.2
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
  "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$DEST" \
  mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0
for wheel in "$DEST"/*.whl; do
  if unzip -l "$wheel" | grep -q '\.so$'; then
    case "$(basename "$wheel")" in megatron_core*) ;; *) echo "gpu_e2e_wheels.sh: $wheel holds a compiled extension" >&2; exit 1;; esac
  fi
  echo "$(basename "$wheel")"
done
du -sh "$DEST"
# The install the GPU machine does, into a clean dir; then the imports the run needs, from there.
check=$(mktemp -d)
trap 'rm -rf "$check"' EXIT
"$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --ignore-requires-python "${TARGET[@]}" \
  --target "$check" "$DEST"/*.whl
mkdir -p "$check/stubs"
"$PY" - "$check/stubs" <<'PY'
import sys
sys.path.insert(0, "benchmarks")
from pathlib import Path
from gpu_e2e import STUB_SOURCE
Path(sys.argv[1], "selective_scan_cuda.py").write_text(STUB_SOURCE)
PY
PYTHONPATH=$check/stubs:$check:$PWD "$PY" -W ignore - "$check" <<'PY'
import sys
for name in ("transformer_engine", "flash_attn", "apex", "causal_conv1d_cuda"):  # absent on the GPU machine
    sys.modules[name] = None
import mamba_ssm.ops.triton.ssd_combined, megatron.core, megatron.core.ssm.mamba_mixer as mixer
for module in (megatron.core, mamba_ssm):
    assert module.__file__.startswith(sys.argv[1]), module.__file__
assert mixer.HAVE_MAMBA_SSM and mixer.causal_conv1d_fn is None, (mixer.HAVE_MAMBA_SSM, mixer.causal_conv1d_fn)
print("gpu_e2e_wheels.sh: with the selective_scan_cuda stand-in and no causal_conv1d_cuda, Megatron's mixer has "
      "mamba-ssm's Triton kernels and its F.conv1d path")
PY
