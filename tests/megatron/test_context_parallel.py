"""Context-parallel SKA inside Megatron's HybridModel ("M*M-"): CP = 2 == CP = 1 (and CP = 2 × TP = 2 == TP = 2),
logits and every parameter gradient, through `torchrun` over gloo (see hybrid_cp_worker.py); bad layouts and
unsupported options fail at build time with errors naming the sizes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from echo_megatron.megatron.ska_layer import _check_context_parallel_options

from .common import tiny_config, tiny_model

REPO = Path(__file__).resolve().parents[2]
SETTINGS = [f"float64:{norm}:{power}" for norm in ("causal_max", "none") for power in (0, 1, 2)]
SETTINGS += ["float32:causal_max:2", "float32:none:1"]


def _torchrun(nproc: int, tp: int, settings: list[str]) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "tests.megatron.hybrid_cp_worker", str(tp), *settings]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    passed = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("PASSED ")]
    assert passed == settings, result.stdout[-2000:]


@pytest.mark.multiproc
def test_cp2_equals_cp1_in_hybrid_model():
    _torchrun(2, 1, SETTINGS)


@pytest.mark.multiproc
def test_cp2_tp2_with_sequence_parallelism_equals_tp2():
    """The default run's CP × TP check: one fp64 setting of the slow test below (4 ranks)."""
    _torchrun(4, 2, ["float64:none:1:sp"])


@pytest.mark.multiproc
@pytest.mark.slow
def test_cp2_tp2_equals_tp2_in_hybrid_model():
    _torchrun(4, 2, ["float64:causal_max:2", "float64:none:1:sp", "float32:none:1:sp"])


def test_sequence_length_must_hold_whole_chunks_per_segment(model_parallel_tp1):
    with pytest.raises(ValueError, match=r"seq_length \(48\) must be a multiple of .* = 32"):
        tiny_model(seq_length=48, context_parallel_size=2)  # S = 8: 4 segments of 12 tokens


@pytest.mark.parametrize("options, message", [
    (dict(ska_norm="sequence_max", ska_allow_sequence_max=True), "ska_norm in"),
    (dict(ska_backend="reference"), "ska_backend in"),
])
def test_unsupported_options_under_context_parallelism(options, message):
    with pytest.raises(ValueError, match=message):
        _check_context_parallel_options(tiny_config(**options))


def test_comm_bytes_known_values():
    from echo_megatron.megatron.flops import ring_attention_cp_comm_bytes, ska_cp_comm_bytes

    ska = ska_cp_comm_bytes(cp_size=8, num_heads=12, rank=48, value_dim=64)
    per_rank = 2 * 12 * (2 * 48 * 48 + 64 * 48 + 1 + 2 * 48) * 4  # bytes one rank contributes
    assert (ska.forward, ska.backward) == (7 * per_rank, 7 * per_rank)
    assert ska_cp_comm_bytes(cp_size=8, num_heads=12, rank=48, value_dim=64, tensor_parallel_size=2).total == ska.total / 2
    ring = ring_attention_cp_comm_bytes(seq_length=32768, cp_size=8, num_query_groups=12, head_dim=64)
    assert ring.forward == 7 * 4096 * 2 * 12 * 64 * 2 and ring.backward == 2 * ring.forward
