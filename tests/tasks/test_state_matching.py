"""State bytes per layer and the state-matched Mamba-2 baseline (``mamba_matched``)."""

import dataclasses

import pytest

from echo_megatron.tasks import mqar_benchmark as mb


@pytest.mark.parametrize(
    "preset,mamba,ska,matched_dim,matched",
    [
        # conv [128 + 2·16, 4] + SSM [128, 16] floats; SKA's ops decode state; d_state 48: [224, 4] + [128, 48]
        (mb.CPU_PRESET, 10_752, 28_960, 48, 28_160),
        (mb.NIAH_CPU_PRESET, 10_752, 28_960, 48, 28_160),
        # d = 448: conv [896 + 2·64, 4] + SSM [896, 64]; d_state 176: [1248, 4] + [896, 176]
        (mb.PAPER_PRESET, 245_760, 653_912, 176, 650_752),
        (mb.NIAH_PAPER_PRESET, 245_760, 653_912, 176, 650_752),
    ],
    ids=["mqar-cpu", "niah-cpu", "mqar-paper", "niah-paper"],
)
def test_state_bytes_and_the_matched_state_dimension(preset, mamba, ska, matched_dim, matched):
    assert mb.mamba_state_bytes(preset) == mamba
    assert mb.ska_state_bytes(preset) == ska
    assert mb.matched_mamba_state_dim(preset) == matched_dim
    assert mb.state_bytes_per_layer("mamba", preset, 4096) == mamba
    assert mb.state_bytes_per_layer("mamba_ska", preset, 4096) == ska
    assert mb.state_bytes_per_layer("mamba_matched", preset, 4096) == matched
    assert abs(matched - ska) <= 0.1 * ska
    # The nearest multiple of 8: the next one up or down is further from SKA's state.
    for other in (matched_dim - 8, matched_dim + 8):
        assert abs(mb.mamba_state_bytes(dataclasses.replace(preset, mamba_state_dim=other)) - ska) > abs(matched - ska)


def test_only_mamba_matched_changes_the_state_dimension():
    preset = mb.CPU_PRESET
    assert mb.arch_preset("mamba_matched", preset).mamba_state_dim == 48
    assert all(mb.arch_preset(a, preset) is preset for a in mb.ARCHS if a != "mamba_matched")
    assert mb.arch_pattern("mamba_matched", "M*M*") == mb.arch_pattern("mamba", "M*M*") == "MMMM"


def test_the_state_bytes_are_megatrons_own_state_shapes():
    """The formula against the states Megatron's MambaMixer allocates for decoding (fp32)."""
    from echo_megatron.tasks import trainer

    trainer.initialize_distributed(1, 0)
    preset = dataclasses.replace(mb.CPU_PRESET, pattern="M*")
    for arch in ("mamba", "mamba_matched"):
        model = mb.build_model(arch, preset, 64)
        mixers = [layer.mixer for layer in model.decoder.layers]
        assert len(mixers) == 2
        for mixer in mixers:
            conv, ssm = mixer.mamba_state_shapes_per_request()
            assert 4 * (conv[0] * conv[1] + ssm[0] * ssm[1] * ssm[2]) == mb.state_bytes_per_layer(arch, preset, 64)


def test_a_state_that_cannot_be_matched_is_refused():
    # A wide Mamba-2 whose conv state alone exceeds a tiny SKA state by far more than 10 %.
    preset = dataclasses.replace(mb.CPU_PRESET, hidden_size=1024, num_heads=1, ska_rank=2, ska_value_dim=2)
    with pytest.raises(ValueError, match="no Mamba-2 state dimension .* matches SKA's state of"):
        mb.matched_mamba_state_dim(preset)
