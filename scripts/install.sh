#!/usr/bin/env bash
# Build (or refresh) the CPU development environment in .venv/ at the repo root.
# Idempotent: a second run only checks that everything is present.
# GPU users install the `gpu` extra instead (see README); nothing here compiles CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=.venv
STAMP=$VENV/.echo-megatron-installed
# The stamp holds a hash of this script and pyproject.toml: edit either and the next run reinstalls.
want=$(cat scripts/install.sh pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "install.sh: .venv is up to date"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${pip[@]}" --upgrade "pip>=24" setuptools wheel packaging ninja
# Pinned first, so nothing later can pull a (multi-GB) CUDA torch.
"${pip[@]}" torch==2.13.0 triton==3.7.1
# megatron-core 0.19 declares Python >= 3.12 but runs on 3.11 (typing.override comes from typing_extensions).
"${pip[@]}" --ignore-requires-python --no-deps megatron-core==0.19.2
"${pip[@]}" einops numpy "typing_extensions>=4.12" "transformers==5.23.0" "tokenizers==0.23.3" safetensors \
  tqdm matplotlib pyyaml "huggingface_hub" pytest pytest-timeout "hypothesis>=6" \
  psutil
# Mamba-2 layers: pure-Python install, no CUDA extension build (the CPU mode supplies the kernels' CPU paths).
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
  "${pip[@]}" --no-build-isolation --no-deps mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0
"${pip[@]}" --no-deps -e .
# The `eval` extra of pyproject.toml (lm-evaluation-harness, for tests/hf/test_lm_eval.py), with torch and
# transformers held at the pins above (the extra alone would let pip move them).
mapfile -t eval_extra < <("$VENV/bin/python" -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["eval"], sep="\n")')
"${pip[@]}" "${eval_extra[@]}" torch==2.13.0 triton==3.7.1 "transformers==5.23.0" "tokenizers==0.23.3"
echo "$want" > "$STAMP"
echo "install.sh: .venv ready ($("$VENV/bin/python" -c 'import torch, triton, megatron.core as m; print("torch", torch.__version__, "triton", triton.__version__, "megatron-core", m.__version__)'))"
