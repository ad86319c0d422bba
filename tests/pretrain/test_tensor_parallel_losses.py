"""The launcher at TP=2 trains the same model as at TP=1: --cpu implies --use-cpu-initialization, so both
start from the same weights and see the same batches; losses agree up to fp32 round-off."""

import pytest

from .launch import SHORT, launch, losses


@pytest.mark.slow
def test_ska_only_pattern_tp2_losses_equal_tp1():
    """SKA's output projection starts at zero, so iteration 1 cannot tell: iterations 2-3 see the q/k/v init."""
    flags = [*SHORT, "--hybrid-layer-pattern", "*-*-*-*-", "--train-iters", "3"]
    reference = losses(launch([*flags, "--tensor-model-parallel-size", "1"]).stdout)
    sharded = losses(launch([*flags, "--tensor-model-parallel-size", "2"]).stdout)
    assert sorted(sharded) == sorted(reference) == [1, 2, 3]
    for iteration, loss in reference.items():
        assert sharded[iteration] == pytest.approx(loss, rel=1e-5), (iteration, reference, sharded)
