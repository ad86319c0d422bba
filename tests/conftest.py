"""Fixtures shared across test directories."""

import pytest

from tests.pretrain.launch import launch


@pytest.fixture(scope="session")
def tp2(tmp_path_factory):
    """One launcher run at TP = 2 + SP (the README's acceptance command, with per-iteration logging and no
    evaluation): echo-tiny, 8 iterations, checkpoints at 4 and 8 -> (save directory, log). Read-only for its
    users (tests/pretrain's launcher and resume tests, tests/hf's export parity), so it runs once."""
    save = tmp_path_factory.mktemp("tp2")
    run = launch(["--cpu", "--echo-preset", "echo-tiny", "--mock-data", "--tensor-model-parallel-size", "2",
                  "--sequence-parallel", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "8",
                  "--lr", "1e-3", "--save", str(save), "--save-interval", "4", "--log-interval", "1",
                  "--eval-iters", "0"])
    return save, run.stdout
