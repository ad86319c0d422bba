"""Per-architecture step caps (``arch_steps``) and the steps / training time the tables report per row."""

import dataclasses

import pytest

from echo_megatron.tasks import mqar_benchmark as mb


def test_an_architecture_cap_replaces_steps_for_that_architecture_only():
    preset = dataclasses.replace(mb.NIAH_CPU_PRESET, arch_steps=("mamba=2000", "mamba_matched=1500"))
    caps = preset.steps_by_arch()
    assert caps == {"mamba": 2000, "mamba_matched": 1500, "mamba_attention": 600, "mamba_ska": 600, "echo": 600}
    assert preset.train_config(3e-3, "x", False, "mamba").steps == 2000  # the cap and the cosine's length
    assert preset.train_config(3e-3, "x", False, "mamba_ska").steps == 600
    assert preset.train_config(3e-3, "x", False).steps == 600
    assert mb.NIAH_CPU_PRESET.steps_by_arch() == dict.fromkeys(mb.ARCHS, 600)


@pytest.mark.parametrize("entry", ["mamba", "transformer=100", "mamba=0", "mamba=lots"])
def test_a_bad_cap_is_refused_naming_the_field(entry):
    with pytest.raises(ValueError, match="arch_steps entries must read ARCH=STEPS"):
        dataclasses.replace(mb.NIAH_CPU_PRESET, arch_steps=(entry,))


def _cell(arch, seed, steps, gap=64):
    return {"arch": arch, "kv_pairs": 1, "gap": gap, "accuracy": 0.5, "params": 10, "state_bytes_per_layer": 7,
            "train_steps": steps, "wall_s": 1.0, "seed": seed}


def test_the_table_reports_steps_taken_the_cap_and_the_mean_training_time():
    preset = dataclasses.replace(mb.NIAH_CPU_PRESET, arch_steps=("mamba=2000",))
    cells = [_cell("mamba", 0, 2000), _cell("mamba", 1, 2000), _cell("mamba_ska", 0, 300), _cell("mamba_ska", 1, 500)]
    runs = [{"arch": a, "kv_pairs": 1, "train_s": s} for a, s in (("mamba", 100.0), ("mamba", 120.0),
                                                                   ("mamba_ska", 30.0), ("mamba_ska", 50.0))]
    lines = mb.markdown_table(cells, preset, runs).splitlines()
    assert lines[0].startswith("| M | arch | seeds | params | state bytes/layer (T=64) | steps (cap) | train s/run | T=64 |")
    assert "| 1 | mamba | 2 | 10 | 7 | 2000 (2000) | 110 | 0.500 (0.500–0.500) |" in lines
    assert "| 1 | mamba_ska | 2 | 10 | 7 | 300–500 (600) | 40 | 0.500 (0.500–0.500) |" in lines
    floor = next(line for line in lines if "*no-binding floor*" in line)
    assert floor.count("|") == lines[0].count("|")  # the floor's cells line up under the lengths
