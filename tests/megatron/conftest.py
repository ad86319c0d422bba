import pytest

from .common import single_process_model_parallel


@pytest.fixture(scope="module")
def model_parallel_tp1():
    """Module-wide CPU mode + one-rank gloo group + TP=1 model-parallel state (seeded)."""
    with single_process_model_parallel():
        yield


@pytest.fixture(autouse=True, scope="module")
def no_inference_mode_left_behind():
    """Megatron's DynamicInferenceEngine marks the whole process as inferring (`InferenceMode.set_active()`)
    when it is built and clears that only in `suspend()`; a module that builds engines would otherwise leave
    training forwards of later modules taking the inference path ("Inference must always gather TP logits")."""
    from megatron.core.inference.utils import InferenceMode

    yield
    InferenceMode.unset_active()
