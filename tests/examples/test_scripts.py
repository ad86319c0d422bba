"""The launch scripts in examples/: `bash -n`, and every flag they pass parses — torchrun's own parser for the
rendezvous, Megatron-LM's parser (`megatron.training.arguments.add_megatron_arguments`) plus the Echo
launcher's flags for the rest — with the environment variables of single-node, multi-node and real-data
runs (`torchrun` is replaced by a stub that records its argv); examples/README.md's tables are current."""

from __future__ import annotations

import argparse
import subprocess
import typing
import pytest
import typing_extensions

from echo_megatron.megatron import PRESETS, get_preset
from echo_megatron.pretrain.arguments import add_echo_arguments
from scripts.examples_table import EXAMPLES, README, SCRIPTS, run_with_stub_torchrun, tables

GPU_SCRIPTS = [script for script in SCRIPTS if not script.endswith("_cpu.sh")]


@pytest.fixture(scope="module")
def launcher_parser() -> argparse.ArgumentParser:
    with pytest.MonkeyPatch.context() as patch:  # megatron.training needs typing.override (Python 3.12)
        patch.setattr(typing, "override", typing_extensions.override, raising=False)
        from megatron.training.arguments import add_megatron_arguments

        parser = argparse.ArgumentParser(allow_abbrev=False, exit_on_error=False)
        add_megatron_arguments(parser)
    return add_echo_arguments(parser, argv=[])  # the launcher's own flags (echo_megatron.pretrain.arguments)


def launched(script: str, *args: str, **env: str) -> tuple[argparse.Namespace, list[str]]:
    """torchrun's parsed arguments and the launcher's argv for `script args` run with `env`."""
    from torch.distributed.run import get_args_parser

    result, argv = run_with_stub_torchrun(script, *args, env=env)
    assert result.returncode == 0 and argv is not None, result.stderr
    torchrun = get_args_parser().parse_args(argv)
    assert torchrun.module and torchrun.training_script == "echo_megatron.pretrain"
    return torchrun, torchrun.training_script_args


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(EXAMPLES / script)], check=True)


@pytest.mark.parametrize("script", GPU_SCRIPTS)
def test_gpu_scripts_single_node_mock_data(launcher_parser, script):
    torchrun, argv = launched(script)
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
def test_gpu_scripts_multi_node_real_data_and_overrides(launcher_parser, script):
    torchrun, argv = launched(
        script, "--train-samples", "1000", "--ska-chunk-size", "128", "--ska-rank", "64",
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
    assert args.ska_rank == 64  # e.g. echo-8b at its former width (examples/README.md)


@pytest.mark.parametrize("script", GPU_SCRIPTS)
def test_data_path_without_tokenizer_is_an_error(script):
    result, argv = run_with_stub_torchrun(script, env={"DATA_PATH": "data/a_text_document"})
    assert result.returncode != 0 and "TOKENIZER_MODEL" in result.stderr and argv is None


def test_tiny_cpu_script(launcher_parser):
    torchrun, argv = launched("pretrain_echo_tiny_cpu.sh")
    args = launcher_parser.parse_args(argv)
    assert torchrun.nproc_per_node == "2" and args.cpu and args.echo_preset == "echo-tiny" and args.mock_data
    assert args.tensor_model_parallel_size == 2 and args.sequence_parallel


def test_unknown_flag_is_caught(launcher_parser):
    """The check can fail: a misspelt flag is rejected."""
    with pytest.raises((argparse.ArgumentError, SystemExit)):
        launcher_parser.parse_args(["--echo-preset", "echo-50m", "--overlap-grad-reduction"])


def test_every_script_is_in_the_table_and_the_readme_is_current():
    assert sorted(SCRIPTS) == sorted(p.name for p in EXAMPLES.glob("pretrain_*.sh"))
    assert tables() in README.read_text(), "run: python scripts/examples_table.py --write"


def test_rank_cost_table_is_current():
    """examples/README.md's "Cost of r = 128 in echo-8b" table is `scripts/rank_cost.py`'s output."""
    from scripts.rank_cost import table

    assert table("echo-8b", [64, 128]) in README.read_text(), "run: python scripts/rank_cost.py --write"


def test_ska_memory_benchmark_shapes_are_the_presets():
    """benchmarks/ska_activation_memory.py runs without Megatron, so it spells the shapes out: they must be
    the presets' (H, r, P, S, K). Its committed H200 results measured every GPU script's preset, at the
    preset's shape except echo-8b (measured at r = 64, before its r = 128): the table's measured bound says "not
    measured" for that one (its saved bytes are computed for every preset, at the kernels' chunks per block)."""
    from benchmarks.ska_activation_memory import SHAPES
    from scripts.examples_table import script_layout, ska_measurement, ska_measurements, ska_shape

    for name, shape in SHAPES.items():
        if name in PRESETS:
            assert shape == ska_shape(get_preset(name).make_config())
    assert SHAPES["echo-8b r=64"] == (32, 64, 128, 64, 2)
    presets = {script_layout(script).preset for script in GPU_SCRIPTS}
    assert presets <= {row["preset"] for row in ska_measurements()}
    unmeasured = {name for name in presets if ska_measurement(get_preset(name).make_config()) is None}
    assert unmeasured == {"echo-8b"} and get_preset("echo-8b").make_config().ska_rank == 128


def test_ska_chunks_per_block_of_the_scripts():
    """The G the memory tables compute saved bytes at (examples/README.md names echo-8b's): micro-batch × heads per
    TP rank × chunks per sequence over 264 dense programs (132 SMs × 2), capped at 8. echo-8b: 4 × 32 / 4 × 64 /
    264 -> 7; echo-1b: 4 × 16 × 64 / 264 -> 8 (the cap)."""
    from scripts.examples_table import script_layout, ska_chunks_per_block

    got = {}
    for script in GPU_SCRIPTS:
        layout = script_layout(script)
        got[layout.preset] = ska_chunks_per_block(get_preset(layout.preset).make_config(), layout)
    assert got == {"echo-50m": 8, "echo-180m": 8, "echo-1b": 8, "echo-8b": 7}


CLEAN_PATH = "/usr/local/bin:/usr/bin:/bin"  # no virtualenv on it


@pytest.mark.parametrize("script", ["pretrain_echo_tiny_cpu.sh", "pretrain_echo_50m.sh"])
@pytest.mark.parametrize("installed", [True, False], ids=["venv", "no-venv"])
def test_scripts_use_the_project_venv_when_torchrun_is_not_on_path(script, installed, tmp_path):
    """Right after `bash scripts/install.sh` (nothing activated) a script runs `.venv/bin/torchrun` of its
    project; with no .venv either it stops with a clear error. (A copy of examples/ with a stub torchrun.)"""
    import shutil

    assert shutil.which("torchrun", path=CLEAN_PATH) is None
    project = tmp_path / "project"
    shutil.copytree(EXAMPLES, project / "examples")
    argv_file = tmp_path / "argv"
    if installed:
        stub = project / ".venv" / "bin" / "torchrun"
        stub.parent.mkdir(parents=True)
        stub.write_text('#!/usr/bin/env bash\nprintf "%s\\0" "$@" > "$ARGV_FILE"\n')
        stub.chmod(0o755)
    result = subprocess.run(["bash", str(project / "examples" / script)], cwd=tmp_path, capture_output=True, text=True,
                            env={"PATH": CLEAN_PATH, "HOME": str(tmp_path), "ARGV_FILE": str(argv_file)})
    if installed:
        assert result.returncode == 0, result.stderr
        assert "echo_megatron.pretrain" in argv_file.read_text().split("\0")
    else:
        assert result.returncode != 0 and not argv_file.exists()
        assert "torchrun not found" in result.stderr and "bash scripts/install.sh" in result.stderr
