"""Faults in checkpoints the launcher, export-hf, import-hf and generate read: a truncated data file or an
overwritten .metadata fails with an error naming the file (no silent fresh start, no traceback from deep in
torch.distributed.checkpoint); --load of a checkpoint that holds another model fails before training, naming
the flags."""

import pytest

from echo_megatron.cli import main
from echo_megatron.serve import generate as _generate  # noqa: F401  (imports Megatron's engine before capsys replaces stdout)
from tests.hf.common import perturbed_model, save_launcher_checkpoint
from tests.megatron.common import single_process_model_parallel

RUN = ["--cpu", "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2"]


@pytest.fixture
def checkpoint(tmp_path):
    """A launcher-shaped checkpoint of a tiny M*M- SKA model (r = 12, S = 8), iteration 8."""
    with single_process_model_parallel():
        return save_launcher_checkpoint(perturbed_model("ska"), tmp_path / "ckpt", tokenizer_type="NullTokenizer",
                                        echo_attention="ska", echo_ffn="mlp")


def _damage(checkpoint, fault: str):
    """Cut the largest data file in half, or overwrite .metadata; returns the damaged file."""
    directory = checkpoint / "iter_0000008"
    if fault == "truncated":
        target = max(directory.glob("*.distcp"), key=lambda f: f.stat().st_size)
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:
        target = directory / ".metadata"
        target.write_bytes(b"\x80\x04not a pickle")
    return target


def _launcher_error(flags, monkeypatch) -> str:
    from echo_megatron.pretrain.launcher import parse_args

    monkeypatch.setattr("sys.argv", ["echo_megatron.pretrain"])
    with pytest.raises(SystemExit) as raised:
        parse_args(flags)
    return str(raised.value.code)


@pytest.mark.parametrize("fault, message", [("truncated", "truncated"), ("metadata", "unreadable")])
def test_a_damaged_checkpoint_is_an_error_naming_the_file(checkpoint, fault, message, monkeypatch, capsys):
    damaged = _damage(checkpoint, fault)
    error = _launcher_error([*RUN, "--echo-preset", "echo-tiny", "--load", str(checkpoint)], monkeypatch)
    assert f"--load: {damaged}: {message}" in error
    for command in (["export-hf", str(checkpoint), str(checkpoint.parent / "hf")],
                    ["generate", "--load", str(checkpoint), "--prompt", "1 2 3", "--max-new-tokens", "2"]):
        assert main(command) != 0
        assert f"{damaged}: {message}" in capsys.readouterr().err, command
    assert not (checkpoint.parent / "hf").exists()


def test_load_of_another_model_is_an_error_before_training(checkpoint, monkeypatch):
    """echo-tiny flags (pattern M-*-M-*-, r = 24, S = 64) against the checkpoint's M*M-, r = 12, S = 8."""
    error = _launcher_error([*RUN, "--echo-preset", "echo-tiny", "--load", str(checkpoint)], monkeypatch)
    assert "the checkpoint holds another model than these flags build" in error
    for expected in ("--hybrid-layer-pattern 'M-*-M-*-' (checkpoint: 'M*M-')", "--ska-rank 24 (checkpoint: 12)",
                     "--ska-chunk-size 64 (checkpoint: 8)"):
        assert expected in error
    softmax = _launcher_error([*RUN, "--echo-preset", "echo-tiny", "--hybrid-layer-pattern", "M*M-", "--ska-rank", "12",
                               "--ska-chunk-size", "8", "--ska-value-dim", "16", "--echo-attention", "softmax", "--load", str(checkpoint)],
                              monkeypatch)
    assert softmax.endswith("flags build: --echo-attention 'softmax' (checkpoint: 'ska') (pass the checkpoint's values, "
                            "or --use-checkpoint-args)")


def test_import_hf_of_a_truncated_export_names_the_file(tmp_path, capsys):
    from echo_megatron.hf import export_model

    with single_process_model_parallel():
        export_model(perturbed_model("ska"), tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) != 0
    assert f"{weights}: unreadable safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()
