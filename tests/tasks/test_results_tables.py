"""What results.md and results.png report: every seed's accuracies, the stopping protocol, state bytes in the
plot's legend, and rewriting them from a results directory without touching results.json."""

import dataclasses
import json

import pytest

from echo_megatron.cli import main
from echo_megatron.tasks import mqar_benchmark as mb

PRESET = dataclasses.replace(mb.CPU_PRESET, archs=("mamba", "mamba_ska"), eval_gaps=(16, 1024), seeds=(0, 1))


def _cell(arch, seed, gap, accuracy, steps, state):
    return {"arch": arch, "kv_pairs": 8, "gap": gap, "accuracy": accuracy, "params": 10, "state_bytes_per_layer": state,
            "train_steps": steps, "wall_s": 1.0, "seed": seed}


CELLS = [_cell("mamba", 0, 16, 0.25, 1000, 10752), _cell("mamba", 0, 1024, 0.0375, 1000, 10752),
         _cell("mamba", 1, 16, 0.5, 1000, 10752), _cell("mamba", 1, 1024, 0.125, 1000, 10752),
         _cell("mamba_ska", 0, 16, 1.0, 300, 28960), _cell("mamba_ska", 0, 1024, 0.7094, 300, 28960),
         _cell("mamba_ska", 1, 16, 0.99, 400, 28960), _cell("mamba_ska", 1, 1024, 0.956, 400, 28960)]
RUNS = [{"run": f"{a}_M8_G16-32_s{s}", "arch": a, "kv_pairs": 8, "seed": s, "train_gaps": [16, 32], "train_steps": n,
         "monitor_accuracy": {f"{lr:g}": 0.5}, "lr": lr, "train_s": 10.0}
        for a, s, n, lr in (("mamba", 0, 1000, 1e-3), ("mamba", 1, 1000, 1e-3), ("mamba_ska", 0, 300, 3e-3),
                            ("mamba_ska", 1, 400, 3e-3))]


def test_the_per_seed_table_lists_every_seed_with_its_lr_steps_and_accuracies():
    lines = mb.seeds_table(CELLS, PRESET, RUNS).splitlines()
    assert lines[2] == "| M | arch | seed | lr | steps | G=16 | G=1024 |"
    assert lines[4:] == ["| 8 | mamba | 0 | 0.001 | 1000 | 0.250 | 0.037 |",
                         "| 8 | mamba | 1 | 0.001 | 1000 | 0.500 | 0.125 |",
                         "| 8 | mamba_ska | 0 | 0.003 | 300 | 1.000 | 0.709 |",
                         "| 8 | mamba_ska | 1 | 0.003 | 400 | 0.990 | 0.956 |"]
    assert "| 8 | mamba | 0 | — | 1000 |" in mb.seeds_table(CELLS, PRESET)  # no run records: lr unknown


@pytest.mark.parametrize("early_stop,says", [(0.99, "early stop at 0.99 on held-out sequences of the training lengths"),
                                             (0.0, "no early stop: every run trains its whole cap")])
def test_the_summary_names_the_stopping_protocol(early_stop, says):
    table = mb.markdown_table(CELLS, dataclasses.replace(PRESET, early_stop=early_stop), RUNS)
    assert says in table and "| 8 | mamba_ska | 2 | 10 | 28,960 | 300–400 (1000) | 10 |" in table


def test_the_plot_shows_every_seed_and_the_state_bytes_in_its_legend():
    fig = mb.figure(CELLS, PRESET)
    (ax,) = fig.axes
    labels = ax.get_legend_handles_labels()[1]
    assert {"mamba (10,752 B state/layer)", "mamba_ska (28,960 B state/layer)", "no-binding floor"} <= set(labels)
    dots = [c.get_offsets().tolist() for c in ax.collections if c.get_offsets().shape == (4, 2)]
    assert sorted(map(tuple, dots[1])) == sorted((c["gap"], c["accuracy"]) for c in CELLS if c["arch"] == "mamba_ska")


def test_rewrite_tables_keeps_results_json_and_its_commit(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    mb.write_results(out, mb.Results(PRESET, CELLS, RUNS))
    stored = json.loads((out / mb.RESULTS_JSON).read_text())
    stored["commit"] = "0123abc"  # the code that trained, older than this one
    (out / mb.RESULTS_JSON).write_text(json.dumps(stored))
    written = (out / mb.RESULTS_MD).read_text()
    (out / mb.RESULTS_MD).write_text("stale")
    (out / mb.RESULTS_PNG).unlink()
    assert main(["mqar", "--rewrite-tables", "--out", str(out)]) == 0
    assert (out / mb.RESULTS_MD).read_text() == written == capsys.readouterr().out
    assert (out / mb.RESULTS_JSON).read_text() == json.dumps(stored)
    assert (out / mb.RESULTS_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["mqar", "--rewrite-tables", "--out", str(tmp_path / "missing")]) == 1
    assert "has no results.json" in capsys.readouterr().err


def _results_dir(path, preset, cells, runs, commit):
    path.mkdir()
    mb.write_results(path, mb.Results(preset, cells, runs), commit=commit)
    return path


def test_merge_puts_separately_trained_architectures_in_one_table_each_with_its_commit(tmp_path, capsys):
    ska = _results_dir(tmp_path / "ska", dataclasses.replace(PRESET, archs=("mamba_ska",), workers=2),
                       [c for c in CELLS if c["arch"] == "mamba_ska"], RUNS[2:], "aaa")
    mamba = _results_dir(tmp_path / "mamba", dataclasses.replace(PRESET, archs=("mamba",), arch_steps=("mamba=1000",)),
                         [c for c in CELLS if c["arch"] == "mamba"], RUNS[:2], "bbb")
    for source, arch in ((ska, "mamba_ska"), (mamba, "mamba")):
        (source / mb.HISTORY_DIR).mkdir()
        (source / mb.HISTORY_DIR / f"{arch}.json").write_text(arch)
    out = tmp_path / "both"
    assert main(["mqar", "--merge", f"{ska},{mamba}", "--out", str(out)]) == 0
    merged = json.loads((out / mb.RESULTS_JSON).read_text())
    assert merged["commit"] == "aaa (mamba_ska); bbb (mamba)"
    assert merged["config"]["archs"] == ["mamba_ska", "mamba"] and merged["config"]["arch_steps"] == ["mamba=1000"]
    assert sorted(map(json.dumps, merged["cells"])) == sorted(map(json.dumps, CELLS))
    assert sorted(p.read_text() for p in (out / mb.HISTORY_DIR).iterdir()) == ["mamba", "mamba_ska"]
    expected = mb.markdown_table(CELLS, PRESET, RUNS) + "\n" + mb.seeds_table(CELLS, PRESET, RUNS)
    assert (out / mb.RESULTS_MD).read_text().startswith(expected) and capsys.readouterr().out.startswith(expected)
    # same commit: kept as it is; a cell twice, other settings or an existing --out: refused, nothing written
    mb.merge_results([ska], tmp_path / "one")
    assert json.loads((tmp_path / "one" / mb.RESULTS_JSON).read_text())["commit"] == "aaa"
    for sources, error in (([ska, out], "repeats cells"), ([ska, mamba], "already exists")):
        with pytest.raises(mb.ResultsDirError, match=error):
            mb.merge_results(sources, out if error == "already exists" else tmp_path / "refused")
    other = _results_dir(tmp_path / "other", dataclasses.replace(PRESET, archs=("mamba",), lrs=(1e-3,)), CELLS[:2], RUNS[:1], "aaa")
    with pytest.raises(mb.ResultsDirError, match=r"different settings \(lrs\)"):
        mb.merge_results([ska, other], tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
