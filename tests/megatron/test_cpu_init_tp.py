"""`use_cpu_initialization` (implied by the launcher's --cpu) is TP-invariant: a model built at TP=2 starts
from exactly the TP=1 weights. `torchrun --nproc-per-node 2` over gloo, see cpu_init_tp_worker.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.multiproc
def test_cpu_initialization_at_tp2_equals_tp1():
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "tests.megatron.cpu_init_tp_worker"]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    assert "PASSED" in result.stdout, result.stdout[-2000:]
