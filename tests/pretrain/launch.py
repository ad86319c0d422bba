"""Run the launcher in subprocesses and read its log (shared by the tests/pretrain launcher tests)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = ["--cpu", "--echo-preset", "echo-tiny", "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--lr", "1e-3", "--log-interval", "1", "--eval-iters", "0"]
"""echo-tiny on the CPU, one log line per iteration, no evaluation."""
SHORT = [*TINY, "--seq-length", "128"]
"""TINY at two SKA chunks per sequence (faster)."""

_ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.eE+-]+)")


def launcher_env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1"}


def launch(flags: list[str], nproc: int = 2, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node nproc -m echo_megatron.pretrain flags` (nproc=0: plain python,
    one process); stdout and stderr together in `.stdout`. With check, a failure shows the log's tail."""
    runner = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
              if nproc else [sys.executable])
    result = subprocess.run([*runner, "-m", "echo_megatron.pretrain", *flags], cwd=REPO, env=launcher_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"launcher exited with {result.returncode}:\n{result.stdout[-6000:]}")
    return result


def losses(log: str) -> dict[int, float]:
    """Iteration -> the 'lm loss' Megatron logged for it (needs --log-interval 1)."""
    return {int(i): float(loss) for i, loss in _ITERATION.findall(log)}


def layer_tables(log: str) -> dict[int, list[tuple[int, str, str]]]:
    """Pipeline stage -> [(layer number, symbol, block class)] from the launcher's layer tables."""
    tables: dict[int, list[tuple[int, str, str]]] = {}
    for stage, body in re.findall(r"layer table \(pipeline stage (\d+)\):\n.*?\n((?:\s+\d+\s+\S\s+\S+\s+[\d,]+\n)+)", log):
        tables[int(stage)] = [(int(n), sym, cls) for n, sym, cls in re.findall(r"\s+(\d+)\s+(\S)\s+(\S+)", body)]
    return tables


def assert_resumed_exactly(reference: dict[int, float], resumed: dict[int, float], start: int) -> None:
    """The resumed run's losses from iteration start+1 equal the uninterrupted run's.

    Megatron 0.19 logs the first iteration after a resume as a "first iteration" without resetting its
    loss accumulator, so the next logged value is the mean of both: compare that one as the mean.
    """
    last = max(resumed)
    assert sorted(resumed) == list(range(start + 1, last + 1))
    for iteration in range(start + 1, last + 1):
        expected = reference[iteration]
        if iteration == start + 2:
            expected = (reference[start + 1] + reference[start + 2]) / 2
        assert resumed[iteration] == pytest.approx(expected, rel=2e-6, abs=0), iteration
