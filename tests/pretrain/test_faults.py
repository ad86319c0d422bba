"""Faults before training or serving. A truncated checkpoint data file, one overwritten with as many other
bytes, or an overwritten .metadata fails with an error naming the file (no silent fresh start, no traceback
from deep in torch.distributed.checkpoint) in the launcher's --load, export-hf, generate, and a truncated
safetensors file in import-hf; --load of a checkpoint that holds another model fails before training, naming
the flags; a missing dataset file or an .idx that does not index its .bin fails before training, naming the
file."""

import random

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
    """Cut the largest data file in half, overwrite it with as many random bytes, or overwrite .metadata;
    returns the damaged file."""
    directory = checkpoint / "iter_0000008"
    if fault in ("truncated", "garbage"):
        target = max(directory.glob("*.distcp"), key=lambda f: f.stat().st_size)
        size = target.stat().st_size
        target.write_bytes(target.read_bytes()[: size // 2] if fault == "truncated" else random.Random(0).randbytes(size))
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


@pytest.mark.parametrize("fault, message", [("truncated", "truncated"), ("garbage", "corrupted"),
                                            ("metadata", "unreadable")])
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


def _indexed_dataset(prefix, documents: int) -> None:
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for document in range(documents):
        builder.add_item(torch.arange(document, document + 50, dtype=torch.int32))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")


@pytest.mark.parametrize("fault, message", [
    ("missing", "{prefix}.bin: no such file"),
    ("other idx", "{prefix}.bin: 2000 bytes, but {prefix}.idx indexes 1000 (5 sequences of int32): the .idx was not "
                  "written with this .bin"),
    ("truncated bin", "{prefix}.bin: 1000 bytes, but {prefix}.idx indexes 2000"),
])
def test_bad_data_paths_are_an_error_before_training(fault, message, tmp_path, monkeypatch):
    prefix, other = tmp_path / "corpus_text_document", tmp_path / "small_text_document"
    _indexed_dataset(prefix, 10)
    if fault == "missing":
        (tmp_path / "corpus_text_document.bin").unlink()
    elif fault == "other idx":
        _indexed_dataset(other, 5)
        (tmp_path / "small_text_document.idx").replace(tmp_path / "corpus_text_document.idx")
    else:
        data = (tmp_path / "corpus_text_document.bin").read_bytes()
        (tmp_path / "corpus_text_document.bin").write_bytes(data[:1000])
    flags = [f for f in RUN if f != "--mock-data"] + ["--echo-preset", "echo-tiny", "--split", "100,0,0",
                                                     "--data-path", "0.5", str(prefix), "0.5", str(prefix)]
    assert message.format(prefix=prefix) in _launcher_error(flags, monkeypatch)
