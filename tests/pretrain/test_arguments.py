"""The launcher's flags: generated `--ska-*` flags, presets as overridable defaults, `--cpu`, the default `--spec`."""

from __future__ import annotations

import dataclasses

import pytest

from echo_megatron.megatron.config import SKAConfig
from echo_megatron.megatron.presets import PRESETS, get_preset
from echo_megatron.pretrain.arguments import CPU_DEFAULTS, add_echo_arguments


def _parse(monkeypatch, flags: list[str]):
    """Megatron-LM's parser with the launcher's extra arguments (no validation, no global state)."""
    from megatron.training.arguments import parse_args

    monkeypatch.setattr("sys.argv", ["echo_megatron.pretrain", *flags])
    return parse_args(extra_args_provider=add_echo_arguments)


def _parser():
    import argparse

    from megatron.training.arguments import add_megatron_arguments

    return add_echo_arguments(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)), argv=[])


def test_every_ska_field_is_a_flag_with_its_docstring_as_help():
    actions = {action.dest: action for action in _parser()._actions}
    for field in dataclasses.fields(SKAConfig):
        if field.name.startswith("ska_"):
            assert field.name in actions, field.name
    assert actions["ska_chunk_size"].option_strings == ["--ska-chunk-size"]
    assert actions["ska_chunk_size"].help.startswith("S: a query in chunk c reads the statistics of chunks < c")
    assert actions["ska_zero_init_output"].option_strings == ["--no-ska-zero-init-output",
                                                              "--disable-ska-zero-init-output"]


def test_ska_flags_parse_to_typed_values(monkeypatch):
    args = _parse(monkeypatch, ["--ska-chunk-size", "32", "--ska-power", "1", "--ska-eps", "1e-4", "--ska-norm", "none",
                                "--ska-num-heads", "8", "--no-ska-zero-init-output", "--ska-allow-sequence-max"])
    assert (args.ska_chunk_size, args.ska_power, args.ska_eps, args.ska_norm, args.ska_num_heads) == (32, 1, 1e-4, "none", 8)
    assert (args.ska_zero_init_output, args.ska_allow_sequence_max, args.ska_rank) == (False, True, None)


def test_preset_fills_the_architecture_and_explicit_flags_override(monkeypatch):
    args = _parse(monkeypatch, ["--echo-preset", "echo-tiny", "--hidden-size", "64", "--ska-chunk-size", "32"])
    assert (args.hidden_size, args.ska_chunk_size) == (64, 32)  # explicit
    assert (args.hybrid_layer_pattern, args.num_attention_heads, args.ska_rank, args.ska_value_dim) == ("M-*-M-*-", 4, 24, 32)
    assert (args.mamba_state_dim, args.mamba_head_dim, args.mamba_num_groups, args.swiglu) == (16, 32, 2, True)
    assert (args.vocab_size, args.tokenizer_type, args.seq_length, args.max_position_embeddings) == (128, "NullTokenizer", 256, 256)
    assert (args.normalization, args.add_bias_linear, args.position_embedding_type) == ("RMSNorm", False, "none")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_maps_onto_megatron_flags(name):
    dests = {action.dest for action in _parser()._actions}
    values = get_preset(name).megatron_args()
    assert set(values) <= dests, set(values) - dests


def test_cpu_implies_the_cpu_flags_and_the_local_spec(monkeypatch):
    args = _parse(monkeypatch, ["--cpu", "--echo-preset", "echo-tiny"])
    assert {key: getattr(args, key) for key in CPU_DEFAULTS} == CPU_DEFAULTS
    assert args.spec == ["echo_megatron.megatron.specs", "echo_hybrid_stack_spec_local"]


@pytest.mark.parametrize("flags, ffn, spec", [
    (["--echo-preset", "echo-tiny"], "mlp", "echo_hybrid_stack_spec"),
    (["--echo-preset", "echo-50m"], "koopman", "echo_koopman_stack_spec"),  # the preset's FFN
    (["--echo-preset", "echo-50m", "--echo-ffn", "mlp"], "mlp", "echo_hybrid_stack_spec"),
    (["--echo-preset", "echo-tiny", "--echo-attention", "softmax", "--transformer-impl", "local"], "mlp",
     "softmax_hybrid_stack_spec_local"),
    (["--echo-preset", "echo-tiny", "--spec", "my.module", "my_spec"], "mlp", None),
])
def test_default_spec_follows_the_layer_choices(monkeypatch, flags, ffn, spec):
    args = _parse(monkeypatch, flags)
    assert args.spec == (["my.module", "my_spec"] if spec is None else ["echo_megatron.megatron.specs", spec])
    assert args.echo_ffn == ffn


def test_preset_query_groups_turn_on_group_query_attention():
    from echo_megatron.megatron.presets import HybridPreset

    preset = HybridPreset(name="gqa", pattern="M*", vocab_size=128, ffn="mlp",
                          config_fields=dict(hidden_size=64, num_attention_heads=4, num_query_groups=2))
    values = preset.megatron_args()
    assert (values["num_query_groups"], values["group_query_attention"]) == (2, True)
    assert "group_query_attention" not in get_preset("echo-tiny").megatron_args()


def test_help_prints_every_flag(monkeypatch, capsys):
    """Megatron's own help texts hold a bare '%' ("10%)"), which argparse's help formatting rejects."""
    with pytest.raises(SystemExit) as raised:
        _parse(monkeypatch, ["--help"])
    assert raised.value.code == 0
    printed = capsys.readouterr().out
    assert "(e.g. 1.10 = 10%)" in " ".join(printed.split())  # --moe-paged-stash-buffer-size-factor-cuda
    assert "--ska-chunk-size" in printed and "--echo-preset" in printed


def test_cpu_help_names_the_flags_it_implies(monkeypatch):
    """The flags `--cpu`'s help names parse, with Megatron's parser, to CPU_DEFAULTS."""
    cpu = next(action for action in _parser()._actions if action.dest == "cpu")
    implied = cpu.help.split("implies ")[1].split()
    args = _parse(monkeypatch, implied)
    assert {name: getattr(args, name) for name in CPU_DEFAULTS} == CPU_DEFAULTS
