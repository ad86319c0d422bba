import pytest

from .common import single_process_model_parallel


@pytest.fixture(scope="module")
def model_parallel_tp1():
    """Module-wide CPU mode + one-rank gloo group + TP=1 model-parallel state (seeded)."""
    with single_process_model_parallel():
        yield
