"""Pretraining launcher: `torchrun --nproc-per-node N -m echo_megatron.pretrain <flags>`.

Runs `megatron.training.pretrain()` (megatron-core 0.19.2) on Echo hybrid models: every Megatron-LM
flag of `pretrain_hybrid.py`, plus `--echo-preset`, `--echo-attention`, `--echo-ffn`, `--ska-*` and
`--cpu` (see `arguments.py`).

Modules: `arguments` (flags), `model` (stack spec + layer checks), `data` (datasets, forward step),
`throughput` (tokens/s and MFU from SKA's true FLOPs), `cpu_training` (every CPU fix to
megatron.training), `compat` (run-time fixes for megatron-core bugs), `launcher` (`main`).
"""

from .compat import install_typing_override

install_typing_override()  # before anything imports megatron.training (Python 3.11)
