"""`check_built_layers`, the launcher's post-build guard: a '*' or '-' layer built as another class than
--echo-attention / --echo-ffn ask for stops the run (e.g. a spec whose blocks were swapped after the
parse-time spec check), naming the layer and both classes."""

import re

import pytest

from echo_megatron.pretrain.model import check_built_layers
from tests.megatron.common import single_process_model_parallel, tiny_model


@pytest.fixture(scope="module")
def models():
    with single_process_model_parallel():
        yield {"ska": tiny_model(), "softmax": tiny_model(attention="softmax"), "koopman": tiny_model(ffn="koopman")}


def test_the_requested_classes_pass_and_print_the_table(models, capsys):
    assert check_built_layers([models["ska"]], attention="ska", ffn="mlp") == [models["ska"]]
    assert "SpectralKoopmanAttention" in capsys.readouterr().out


@pytest.mark.parametrize("built, attention, ffn, message", [
    ("softmax", "ska", "mlp", "layer 2 ('*') was built as SelfAttention, expected SpectralKoopmanAttention"),
    ("ska", "softmax", "mlp", "layer 2 ('*') was built as SpectralKoopmanAttention, expected SelfAttention"),
    ("koopman", "ska", "mlp", "layer 4 ('-') was built as KoopmanMLP, expected MLP"),
])
def test_a_wrong_class_stops_the_run(models, built, attention, ffn, message):
    with pytest.raises(RuntimeError, match=re.escape(message)):
        check_built_layers([models[built]], attention=attention, ffn=ffn)
