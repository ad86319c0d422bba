"""The launch scripts in examples/: `bash -n`, and every flag they pass parses — torchrun's own parser for the
rendezvous, Megatron-LM's parser (`megatron.training.arguments.add_megatron_arguments`) plus the Echo
launcher's flags for the rest — with the environment variables of single-node, multi-node and real-data
runs. `torchrun` is replaced by a stub that records its argv."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import typing
from pathlib import Path

import pytest
import typing_extensions

from echo_megatron.megatron import PRESETS, SKAConfig, get_preset

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
GPU_SCRIPTS = ["pretrain_echo_50m.sh", "pretrain_echo_180m.sh", "pretrain_echo_1b.sh", "pretrain_echo_8b.sh"]
SCRIPTS = GPU_SCRIPTS + ["pretrain_echo_tiny_cpu.sh"]


def launcher_flags(parser: argparse.ArgumentParser) -> None:
    """The flags `echo_megatron.pretrain` adds to Megatron's (issue 8): --cpu, --echo-preset,
    --echo-attention, --echo-ffn and one --ska-* flag per `SKAConfig.ska_*` field."""
    group = parser.add_argument_group("echo launcher")
    group.add_argument("--cpu", action="store_true")
    group.add_argument("--echo-preset", choices=sorted(PRESETS))
    group.add_argument("--echo-attention", choices=["ska", "softmax"])
    group.add_argument("--echo-ffn", choices=["mlp", "koopman"])
    hints = typing.get_type_hints(SKAConfig)
    for field in dataclasses.fields(SKAConfig):
        if field.name.startswith("ska_"):
            kind = next(t for t in typing.get_args(hints[field.name]) or (hints[field.name],) if t is not type(None))
            flag = "--" + field.name.replace("_", "-")
            if kind is bool:
                group.add_argument(flag, action="store_true")
            else:
                group.add_argument(flag, type=kind)


@pytest.fixture(scope="module")
def launcher_parser() -> argparse.ArgumentParser:
    with pytest.MonkeyPatch.context() as patch:  # megatron.training needs typing.override (Python 3.12)
        patch.setattr(typing, "override", typing_extensions.override, raising=False)
        from megatron.training.arguments import add_megatron_arguments

        parser = argparse.ArgumentParser(allow_abbrev=False, exit_on_error=False)
        add_megatron_arguments(parser)
    launcher_flags(parser)
    return parser


def run_script(tmp_path: Path, script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    stub = tmp_path / "bin" / "torchrun"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text('#!/usr/bin/env bash\nprintf "%s\\0" "$@" > "$ARGV_FILE"\n')
    stub.chmod(0o755)
    environment = {"PATH": f"{stub.parent}:{os.environ['PATH']}", "ARGV_FILE": str(tmp_path / "argv"),
                   "HOME": str(tmp_path), **env}
    return subprocess.run(["bash", str(EXAMPLES / script), *args], cwd=tmp_path, env=environment,
                          capture_output=True, text=True)


def launched(tmp_path: Path, script: str, *args: str, **env: str) -> tuple[argparse.Namespace, list[str]]:
    """torchrun's parsed arguments and the launcher's argv for `script` run with `env`."""
    from torch.distributed.run import get_args_parser

    result = run_script(tmp_path, script, *args, **env)
    assert result.returncode == 0, result.stderr
    argv = (tmp_path / "argv").read_text().split("\0")[:-1]
    torchrun = get_args_parser().parse_args(argv)
    assert torchrun.module and torchrun.training_script == "echo_megatron.pretrain"
    return torchrun, torchrun.training_script_args


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(EXAMPLES / script)], check=True)


@pytest.mark.parametrize("script", GPU_SCRIPTS)
def test_gpu_scripts_single_node_mock_data(tmp_path, launcher_parser, script):
    torchrun, argv = launched(tmp_path, script)
    args = launcher_parser.parse_args(argv)
    assert (torchrun.nproc_per_node, torchrun.nnodes) == ("8", "1")
    assert args.mock_data and args.data_path is None and args.bf16 and args.use_distributed_optimizer
    assert args.overlap_grad_reduce and args.overlap_param_gather
    assert args.sequence_parallel == (args.tensor_model_parallel_size > 1)
    # the layout is consistent on one node of 8 GPUs: heads and groups split over TP, the global batch
    # is a whole number of micro-batches per data-parallel rank
    config = get_preset(args.echo_preset).make_config()
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    assert config.ska_num_heads % tp == 0 and config.mamba_num_groups % tp == 0
    data_parallel = 8 // (tp * pp)
    assert args.global_batch_size % (args.micro_batch_size * data_parallel) == 0
    assert args.lr_decay_samples + args.lr_warmup_samples == args.train_samples
    assert args.min_lr == pytest.approx(args.lr / 10)


@pytest.mark.parametrize("script", GPU_SCRIPTS)
def test_gpu_scripts_multi_node_real_data_and_overrides(tmp_path, launcher_parser, script):
    torchrun, argv = launched(
        tmp_path, script, "--train-samples", "1000", "--ska-chunk-size", "128",
        GPUS_PER_NODE="4", NNODES="2", NODE_RANK="1", MASTER_ADDR="node0", MASTER_PORT="29400", TP="2",
        DATA_PATH="0.7 data/a_text_document 0.3 data/b_text_document", TOKENIZER_MODEL="tok",
    )
    # (flag parsing only: echo-50m's 7 heads need TP = 1, which the launcher checks before training)
    assert (torchrun.nproc_per_node, torchrun.nnodes, torchrun.node_rank) == ("4", "2", 1)
    assert (torchrun.master_addr, torchrun.master_port) == ("node0", 29400)
    args = launcher_parser.parse_args(argv)
    assert args.data_path == ["0.7", "data/a_text_document", "0.3", "data/b_text_document"]
    assert not args.mock_data and args.tokenizer_type == "HuggingFaceTokenizer" and args.tokenizer_model == "tok"
    assert args.tensor_model_parallel_size == 2 and args.sequence_parallel
    assert args.train_samples == 1000 and args.ska_chunk_size == 128  # the script's arguments win


@pytest.mark.parametrize("script", GPU_SCRIPTS)
def test_data_path_without_tokenizer_is_an_error(tmp_path, script):
    result = run_script(tmp_path, script, DATA_PATH="data/a_text_document")
    assert result.returncode != 0 and "TOKENIZER_MODEL" in result.stderr
    assert not (tmp_path / "argv").exists()


def test_tiny_cpu_script(tmp_path, launcher_parser):
    torchrun, argv = launched(tmp_path, "pretrain_echo_tiny_cpu.sh")
    args = launcher_parser.parse_args(argv)
    assert torchrun.nproc_per_node == "2" and args.cpu and args.echo_preset == "echo-tiny" and args.mock_data
    assert args.tensor_model_parallel_size == 2 and args.sequence_parallel


def test_unknown_flag_is_caught(launcher_parser):
    """The check can fail: a misspelt flag is rejected."""
    with pytest.raises((argparse.ArgumentError, SystemExit)):
        launcher_parser.parse_args(["--echo-preset", "echo-50m", "--overlap-grad-reduction"])
