"""transformers picks its Mamba kernels when `modeling_nemotron_h` is first imported: after `enable_cpu_mode()`
(stub CUDA extensions make `import mamba_ssm` succeed) it would pick mamba-ssm's GPU kernels. `import
echo_megatron.hf` must still select transformers' PyTorch path on a CPU machine, and leave CPU mode intact."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
PROBE = """
import inspect, sys
from echo_megatron.megatron.cpu import enable_cpu_mode
enable_cpu_mode()
if sys.argv[1] == "echo":
    import echo_megatron.hf  # noqa: F401
from transformers.models.nemotron_h import modeling_nemotron_h as nemotron_h
kernels = [inspect.getclosurevars(getattr(nemotron_h, name)).nonlocals["is_new_implementation"]
           for name in ("mamba2_chunk_scan", "mamba2_split_conv1d_scan_combined", "causal_conv1d_fn",
                        "causal_conv1d_update", "mamba2_selective_state_update")]
print(sum(kernels), "selective_scan_cuda" in sys.modules)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on GPUs transformers should pick mamba-ssm's kernels")
def test_cpu_mode_before_import_keeps_pytorch_mamba():
    """0 of the 5 kernels from mamba-ssm (with `transformers` instead of `echo` as argv[1] the probe prints
    "5 True": measured, that is the trap), and the CPU-mode stubs still installed afterwards."""
    result = subprocess.run([sys.executable, "-c", PROBE, "echo"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "0 True"
