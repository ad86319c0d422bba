"""`MQARPreset.workers`: runs trained side by side in spawned worker processes give exactly the cells,
learning-rate records and training histories of one process, and later seeds reuse the rate their
first seed selected."""

import dataclasses
import json

import pytest

from echo_megatron.tasks import mqar_benchmark as mb

TINY = dataclasses.replace(
    mb.CPU_PRESET, archs=("mamba", "mamba_ska"), kv_pairs=(2,), train_gaps=(4,), eval_gaps=(4, 12), pattern="M*-",
    hidden_size=32, num_heads=2, mamba_head_dim=8, mamba_state_dim=8, ffn_hidden_size=64, ska_rank=8, ska_value_dim=8,
    ska_chunk_size=4, steps=3, batch_size=4, lrs=(1e-3, 1e-2), warmup_steps=1, eval_every=1, eval_examples=8,
    eval_batch_size=4, seeds=(0, 1), early_stop=0.0,
)


def _without_timings(rows: list[dict], key: str) -> list[dict]:
    return sorted(({k: v for k, v in row.items() if k != key} for row in rows), key=json.dumps)


@pytest.mark.multiproc
def test_two_workers_equal_one_process(tmp_path):
    one = mb.run_benchmark(dataclasses.replace(TINY, workers=1), tmp_path / "one", progress=False)
    two = mb.run_benchmark(dataclasses.replace(TINY, workers=2), tmp_path / "two", progress=False)
    assert len(one) == len(TINY.archs) * len(TINY.seeds) * len(TINY.eval_gaps)
    assert _without_timings(two, "wall_s") == _without_timings(one, "wall_s")
    runs = {name: json.loads((tmp_path / name / mb.RUNS_JSON).read_text()) for name in ("one", "two")}
    assert [r["run"] for r in runs["two"]] == [r["run"] for r in runs["one"]]  # written in planned order
    assert _without_timings(runs["two"], "train_s") == _without_timings(runs["one"], "train_s")
    for record in runs["one"]:
        if record["seed"] == 1:  # reuses seed 0's selection instead of sweeping
            twin = next(r for r in runs["one"] if r["run"] == record["run"].replace("_s1", "_s0"))
            assert list(record["monitor_accuracy"]) == [f"{twin['lr']:g}"]
    histories = sorted(p.name for p in (tmp_path / "one" / mb.HISTORY_DIR).iterdir())
    assert histories == sorted(p.name for p in (tmp_path / "two" / mb.HISTORY_DIR).iterdir())
    for name in histories:
        assert (tmp_path / "two" / mb.HISTORY_DIR / name).read_text() == (tmp_path / "one" / mb.HISTORY_DIR / name).read_text()
