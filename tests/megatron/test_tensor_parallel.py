"""TP=2 (with and without sequence parallel) == TP=1 through distributed checkpoints both ways:
`torchrun --nproc-per-node 2` over gloo, see hybrid_tp_worker.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.multiproc
def test_tp2_equals_tp1_through_distributed_checkpoints(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "tests.megatron.hybrid_tp_worker", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    passed = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("PASSED ")}
    assert passed == {"float64_sp0", "float64_sp1", "float32_sp1"}, result.stdout[-2000:]
    assert {p.name for p in tmp_path.iterdir()} >= {"float64_sp0_tp1", "float64_sp0_tp2", "float32_sp1_tp2"}
