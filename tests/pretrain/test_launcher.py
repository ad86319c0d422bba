"""`torchrun -m echo_megatron.pretrain --cpu ...`: training, checkpoints, resume and flag errors over gloo.

Each torchrun run is a few tens of seconds on 2 shared cores; runs are shared through module fixtures.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import typing

import pytest
import typing_extensions

from .launch import REPO, SHORT, assert_resumed_exactly, launch, launcher_env, layer_tables, losses

pytestmark = pytest.mark.multiproc

ECHO_TINY_TABLE = [(1, "M", "MambaMixer"), (2, "-", "MLP"), (3, "*", "SpectralKoopmanAttention"), (4, "-", "MLP"),
                   (5, "M", "MambaMixer"), (6, "-", "MLP"), (7, "*", "SpectralKoopmanAttention"), (8, "-", "MLP")]


def _stored_args(checkpoint_dir):
    if not hasattr(typing, "override"):
        typing.override = typing_extensions.override  # megatron.training on Python 3.11
    from megatron.core.dist_checkpointing import load_common_state_dict

    return load_common_state_dict(str(checkpoint_dir))["args"]


def _assert_trains(log: str, iterations: int) -> dict[int, float]:
    trace = losses(log)
    assert sorted(trace) == list(range(1, iterations + 1))
    assert trace[iterations] < trace[1] - 1.0, trace  # mock data: ~4.9 -> < 3.9 within a few steps
    return trace


# ------------------------------------------------------------------ TP=2 + sequence parallel (acceptance)


def test_tp2_sequence_parallel_trains_with_ska_layers(tp2):
    _, log = tp2
    _assert_trains(log, 8)
    assert layer_tables(log) == {0: ECHO_TINY_TABLE}
    assert "echo-megatron: tokens/s" in log and "SKA-true" in log


def test_checkpoint_stores_ska_fields_pattern_and_spec(tp2):
    save, _ = tp2
    args = _stored_args(save / "iter_0000008")
    assert {k: v for k, v in vars(args).items() if k.startswith("ska_")} == dict(
        ska_num_heads=4, ska_rank=24, ska_value_dim=32, ska_chunk_size=64, ska_power=2, ska_eps=1e-3,
        ska_norm="causal_max", ska_allow_sequence_max=False, ska_power_iters=6, ska_zero_init_output=True,
        ska_eta_init=1.5, ska_backend="auto")
    assert args.hybrid_layer_pattern == "M-*-M-*-"
    assert args.spec == ["echo_megatron.megatron.specs", "echo_hybrid_stack_spec_local"]
    assert (args.echo_attention, args.echo_ffn, args.tensor_model_parallel_size) == ("ska", "mlp", 2)
    assert (args.tokenizer_type, args.vocab_size, args.seq_length) == ("NullTokenizer", 128, 256)


def test_tp2_resume_matches_the_uninterrupted_run(tp2, tmp_path):
    """Also the cheap form of a kill during a checkpoint write (the real kill -9 is the slow test below):
    iteration 8's checkpoint left half-written (no .metadata, a data file cut short) while the tracker still
    names iteration 4, as Megatron leaves them; a plain --load must resume from 4 and reproduce the losses."""
    source, log = tp2
    save = tmp_path / "save"
    shutil.copytree(source, save)
    half_written = save / "iter_0000008"
    (half_written / ".metadata").unlink()
    data_file = sorted(half_written.glob("*.distcp"))[0]
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    (save / "latest_checkpointed_iteration.txt").write_text("4")
    resumed = launch(["--cpu", "--echo-preset", "echo-tiny", "--mock-data", "--tensor-model-parallel-size", "2",
                      "--sequence-parallel", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters",
                      "8", "--lr", "1e-3", "--load", str(save), "--log-interval", "1", "--eval-iters", "0"])
    assert "at iteration 4" in resumed.stdout, resumed.stdout[-3000:]
    assert_resumed_exactly(losses(log), losses(resumed.stdout), start=4)


@pytest.mark.parametrize("layout", [
    pytest.param(["--tensor-model-parallel-size", "1"], id="tp1-dp2", marks=pytest.mark.slow),
    pytest.param(["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2"], id="pp2"),
])
def test_tp2_checkpoint_resumes_at_another_layout(tp2, layout):
    """The TP = 2 checkpoint (model and Adam state) resumed on the same two ranks as TP = 1 (DP = 2) or as two
    pipeline stages: the same model, data and optimizer state, so the same losses up to fp32 reduction order.
    (Megatron refuses a TP/PP change for its distributed optimizer's dp_reshardable checkpoints.) The pp2
    case also resumes at TP = 1 from TP = 2 shards, so tp1-dp2 is slow."""
    save, log = tp2
    resumed = launch(["--cpu", "--echo-preset", "echo-tiny", "--mock-data", "--micro-batch-size", "2",
                      "--global-batch-size", "4", "--train-iters", "8", "--lr", "1e-3", "--load", str(save),
                      "--ckpt-step", "4", "--log-interval", "1", "--eval-iters", "0", *layout]).stdout
    reference, trace = losses(log), losses(resumed)
    assert sorted(trace) == [5, 6, 7, 8], resumed[-3000:]
    for iteration in (5, 7, 8):  # 6: the mean of iterations 5 and 6 after a resume (see assert_resumed_exactly)
        assert trace[iteration] == pytest.approx(reference[iteration], rel=1e-5), (iteration, reference, trace)
    if "--pipeline-model-parallel-size" in layout:
        assert layer_tables(resumed) == {0: ECHO_TINY_TABLE[:4], 1: ECHO_TINY_TABLE[4:]}


def test_use_checkpoint_args_restores_the_ska_fields(tp2):
    """--use-checkpoint-args restores the model's ska_* fields (Megatron's own list does not know them), as
    Megatron restores its model args: the checkpoint wins over flags; --ska-backend stays a run-time choice."""
    save, _ = tp2
    code = ("import sys; from echo_megatron.pretrain import compat, cpu_training; "
            "from echo_megatron.pretrain.launcher import parse_args; cpu_training.enable(); compat.apply(); "
            "a = parse_args(sys.argv[1:]); print('ARGS', a.ska_chunk_size, a.ska_power, a.ska_backend)")
    flags = ["--cpu", "--echo-preset", "echo-tiny", "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4",
             "--load", str(save), "--use-checkpoint-args", "--ska-chunk-size", "32", "--ska-power", "1",
             "--ska-backend", "torch"]
    result = subprocess.run([sys.executable, "-c", code, *flags], cwd=REPO, env=launcher_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "ARGS 64 2 torch" in result.stdout.splitlines()


# ------------------------------------------------------------------ DP=2 on an indexed dataset, distributed optimizer


def _write_indexed_dataset(prefix, documents: int = 64, length: int = 300, period: int = 50) -> None:
    """Megatron's indexed dataset of counting sequences: next token = (token mod period) + 1."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for document in range(documents):
        builder.add_item(torch.from_numpy((document * 7 + np.arange(length)) % period + 1))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")


INDEXED = [f for f in SHORT if f != "--mock-data"] + ["--split", "100,0,0", "--use-distributed-optimizer"]


@pytest.fixture(scope="module")
def dp2_indexed(tmp_path_factory):
    root = tmp_path_factory.mktemp("indexed")
    prefix = root / "counting_text_document"
    _write_indexed_dataset(prefix)
    flags = [*INDEXED, "--data-path", str(prefix), "--train-iters", "6"]
    run = launch([*flags, "--save", str(root / "checkpoints"), "--save-interval", "3"])
    return flags, root / "checkpoints", run.stdout


def test_dp2_trains_on_an_indexed_dataset(dp2_indexed):
    _, _, log = dp2_indexed
    assert "> building GPTDataset" in log and "MockGPTDataset" not in log
    trace = _assert_trains(log, 6)
    assert trace[6] < 3.0, trace  # counting is learnable: far below the mock data's ~3.9 after 6 steps
    assert layer_tables(log) == {0: ECHO_TINY_TABLE}


def test_distributed_optimizer_resume_matches_the_uninterrupted_run(dp2_indexed):
    flags, checkpoints, log = dp2_indexed
    resumed = launch([*flags, "--load", str(checkpoints), "--ckpt-step", "3"]).stdout
    assert "fixed resume" in resumed  # compat.distributed_optimizer_torch_adam was applied
    assert_resumed_exactly(losses(log), losses(resumed), start=3)


# ------------------------------------------------------------------ slow: DP=2 plain Adam, TP 1 -> 2, baselines


@pytest.fixture(scope="module")
def dp2_adam(tmp_path_factory):
    save = tmp_path_factory.mktemp("adam")
    return save, launch([*SHORT, "--train-iters", "6", "--save", str(save), "--save-interval", "3"]).stdout


@pytest.mark.slow
def test_dp2_adam_resume_matches_the_uninterrupted_run(dp2_adam):
    save, log = dp2_adam
    reference = _assert_trains(log, 6)
    resumed = launch([*SHORT, "--train-iters", "6", "--load", str(save), "--ckpt-step", "3"])
    assert_resumed_exactly(reference, losses(resumed.stdout), start=3)


@pytest.mark.slow
def test_tp1_checkpoint_resumes_at_tp2(dp2_adam):
    save, log = dp2_adam
    resumed = launch([*SHORT, "--train-iters", "6", "--load", str(save), "--ckpt-step", "3",
                      "--tensor-model-parallel-size", "2", "--sequence-parallel"])
    # Same model, data and optimizer state on another TP layout: equal up to reduction order.
    assert losses(resumed.stdout)[4] == pytest.approx(losses(log)[4], rel=1e-4)


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_resumes_from_the_last_complete_one(dp2_adam, tmp_path):
    """Rank 0 killed by SIGKILL in the middle of writing iteration 6's checkpoint (kill_during_save.py; torchrun
    then stops rank 1): the tracker still names iteration 3, and the rerun with --load resumes from iteration 3
    and reproduces the uninterrupted losses."""
    _, log = dp2_adam
    save = tmp_path / "save"
    flags = [*SHORT, "--train-iters", "6", "--save", str(save), "--save-interval", "3"]
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    output = tmp_path / "killed.log"
    with output.open("w") as log_file:  # a file, not a pipe: nothing left behind can hold the test up
        killed = subprocess.run([*runner, "-m", "tests.pretrain.kill_during_save", "6", *flags], cwd=REPO,
                                env=launcher_env(), stdout=log_file, stderr=subprocess.STDOUT, timeout=600)
    text = output.read_text()
    assert killed.returncode != 0 and "Signal 9 (SIGKILL) received by PID" in text, text[-3000:]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert any((save / "iter_0000006").iterdir())  # the half-written checkpoint is there
    resumed = launch([*flags, "--load", str(save)]).stdout
    assert "successfully loaded checkpoint from" in resumed and "at iteration 3" in resumed, resumed[-3000:]
    assert_resumed_exactly(losses(log), losses(resumed), start=3)


@pytest.mark.slow
def test_softmax_and_koopman_baselines_build_the_requested_layers():
    log = launch([*SHORT, "--train-iters", "3", "--echo-attention", "softmax", "--echo-ffn", "koopman"]).stdout
    assert len(losses(log)) == 3
    assert layer_tables(log) == {0: [(n, sym, {"*": "SelfAttention", "-": "KoopmanMLP"}.get(sym, cls))
                                     for n, sym, cls in ECHO_TINY_TABLE]}


# ------------------------------------------------------------------ errors before training


@pytest.mark.parametrize("flags, message", [
    (["--echo-preset", "echo-huge"], "argument --echo-preset: invalid choice: 'echo-huge'"),
    (["--echo-preset", "echo-tiny", "--tensor-model-parallel-size", "3"],
     "SKA heads (4, from --ska-num-heads or --num-attention-heads) must be divisible by --tensor-model-parallel-size (3)"),
    (["--echo-preset", "echo-tiny", "--ska-chunk-size", "512"],
     "--ska-chunk-size (512) must be smaller than --seq-length (256)"),
    (["--echo-preset", "echo-tiny", "--ska-chunk-size", "256"],
     "--ska-chunk-size (256) must be smaller than --seq-length (256)"),
    (["--echo-preset", "echo-tiny", "--context-parallel-size", "2", "--seq-length", "128"],
     "--seq-length, --context-parallel-size, --ska-chunk-size: context parallelism with SKA: seq_length (128) must be "
     "a multiple of 2 · context_parallel_size · ska_chunk_size = 2·2·64 = 256"),
    (["--echo-preset", "echo-tiny", "--spec", "megatron.core.models.hybrid.hybrid_layer_specs", "hybrid_stack_spec"],
     "puts SelfAttention in the '*' layers but --echo-attention ska needs SpectralKoopmanAttention"),
    (["--echo-preset", "echo-tiny", "--spec", "echo_megatron.no_such_module", "spec"],
     "the module could not be imported"),
])
def test_bad_flags_are_rejected_while_parsing(flags, message, monkeypatch, capsys):
    """`launcher.parse_args` runs the checks before Megatron validates, initialises or builds anything."""
    from echo_megatron.pretrain.launcher import parse_args

    monkeypatch.setattr("sys.argv", ["echo_megatron.pretrain"])
    with pytest.raises(SystemExit) as raised:
        parse_args(["--cpu", "--mock-data", "--micro-batch-size", "2", "--train-iters", "2", *flags])
    assert message in f"{raised.value.code}{capsys.readouterr().err}"


def test_wrong_spec_stops_the_launcher_before_distributed_init(tmp_path):
    run = launch(["--cpu", "--echo-preset", "echo-tiny", "--mock-data", "--micro-batch-size", "2", "--train-iters", "2",
                  "--save", str(tmp_path), "--spec", "megatron.core.models.hybrid.hybrid_layer_specs",
                  "hybrid_stack_spec"], nproc=0, check=False)
    assert run.returncode != 0
    assert "--echo-attention ska needs SpectralKoopmanAttention" in run.stdout
    assert "initializing torch distributed" not in run.stdout and not any(tmp_path.iterdir())


# ------------------------------------------------------------------ context parallelism (issue 12)


@pytest.mark.slow
def test_context_parallel_losses_equal_the_cp1_run():
    """CP = 2 (Megatron's load-balanced split, SKA's O(r²) exchange) vs CP = 1 (DP = 2) on the same global
    batches: the same losses up to fp32 round-off."""
    flags = [*SHORT, "--ska-chunk-size", "32", "--train-iters", "4"]  # 128 tokens = 2·CP·S
    reference = losses(launch(flags).stdout)
    context_parallel = losses(launch([*flags, "--context-parallel-size", "2"]).stdout)
    assert sorted(context_parallel) == sorted(reference) == [1, 2, 3, 4]
    for iteration, loss in reference.items():
        assert context_parallel[iteration] == pytest.approx(loss, rel=1e-5), (iteration, reference, context_parallel)


def test_transformer_engine_layers_without_transformer_engine_are_rejected(monkeypatch, capsys):
    """A GPU machine without Transformer Engine: the default --transformer-impl fails with the flag to use instead."""
    from echo_megatron.pretrain import launcher

    monkeypatch.setattr("sys.argv", ["echo_megatron.pretrain"])
    monkeypatch.setattr(launcher.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(launcher, "HAVE_TE", False)
    with pytest.raises(SystemExit) as raised:
        launcher.parse_args(["--echo-preset", "echo-tiny", "--mock-data", "--micro-batch-size", "2", "--train-iters", "2"])
    assert "Transformer Engine is not installed: add --transformer-impl local" in str(raised.value.code)
