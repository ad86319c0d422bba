"""The prepared GPU end-to-end run (`scripts/gpu_e2e.sh`, `benchmarks/gpu_e2e.py`): its plumbing in the default run,
and the whole dry run (the same code on the CPU at tiny sizes: torchrun, resume, generate, export) as a slow test."""

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_e2e  # noqa: E402

LOG = """ [2026-12-05 11:00:00] iteration        1/       6 | lm loss: 4.800000E+00 | loss scale: 1.0
[Rank 0] (after 1 iterations) memory (MB) | allocated: 812.5 | max allocated: 2048.25 | reserved: 3000.0
 [2026-12-05 11:00:01] iteration        2/       6 | lm loss: 4.600000E+00 | loss scale: 1.0
 echo-megatron: tokens/s 1,000 | model TFLOP/s/device 10 (SKA-true) | MFU 1.01% | FLOPs/iteration 1 SKA-true vs 2 Megatron
 [2026-12-05 11:00:02] iteration        3/       6 | lm loss: 4.000000E+00 | loss scale: 1.0
 echo-megatron: tokens/s 4,000 | model TFLOP/s/device 40 (SKA-true) | MFU 4.04% | FLOPs/iteration 1 SKA-true vs 2 Megatron
 [2026-12-05 11:00:03] iteration        4/       6 | lm loss: 3.000000E+00 | loss scale: 1.0
 echo-megatron: tokens/s 2,000 | model TFLOP/s/device 20 (SKA-true) | MFU 2.02% | FLOPs/iteration 1 SKA-true vs 2 Megatron
"""


def test_the_gpu_run_fits_in_eight_minutes_by_construction():
    assert sum(gpu_e2e.GPU.limits.values()) + gpu_e2e.WARM_UP_S <= 480
    assert set(gpu_e2e.GPU.limits) == set(gpu_e2e.DRY.limits)
    assert gpu_e2e.GPU.save_at + gpu_e2e.GPU.resume_iterations <= gpu_e2e.GPU.iterations


def test_training_row_reads_medians_memory_and_the_loss_trend():
    row = gpu_e2e.training_row("echo", LOG, warm_up=0)
    assert row == {"stack": "echo", "iterations": 4, "tokens/s/GPU": 2000.0, "TFLOP/s/GPU": 20.0, "MFU": "2.02%",
                   "max allocated MiB": 2048.25, "loss start": pytest.approx(4.7), "loss end": pytest.approx(3.5),
                   "pass": True}
    rising = LOG.replace("3.000000E+00", "9.000000E+00")
    assert gpu_e2e.training_row("echo", rising, warm_up=0)["pass"] is False
    assert gpu_e2e.training_row("echo", "", warm_up=3) == {"stack": "echo", "iterations": 0,
                                                          "max allocated MiB": "not logged"}


def test_resumed_pairs_compare_megatrons_first_logged_value_after_a_resume_as_a_mean():
    reference = {1: 5.0, 2: 4.0, 3: 3.0, 4: 2.0}
    rows = gpu_e2e.resumed_pairs(reference, {2: 4.0, 3: 3.5, 4: 2.0}, start=1)
    assert [(r["iteration"], r["uninterrupted"], r["rel_diff"]) for r in rows] == [(2, 4.0, 0.0), (3, 3.5, 0.0),
                                                                                (4, 2.0, 0.0)]


def test_stacks_keep_the_depth_and_differ_only_in_the_star_layers():
    from echo_megatron.megatron.presets import get_preset

    pattern = get_preset("echo-50m").pattern
    mamba = gpu_e2e.stack_flags("mamba", "echo-50m")[1]
    assert len(mamba) == len(pattern) and "*" not in mamba and "*" in pattern
    assert [a for a, b in zip(pattern, mamba) if a != b] == ["*"] * pattern.count("*")
    assert gpu_e2e.stack_flags("softmax", "echo-50m") == ["--echo-attention", "softmax"]
    assert gpu_e2e.stack_flags("echo", "echo-50m") == []


def test_sections_record_failures_and_time_limits_and_rewrite_both_report_copies(tmp_path):
    meta = dict(date="2026-12-05", commit="abc1234", gpu_slug="nvidia-h100")
    report = gpu_e2e.Report(tmp_path, meta, tmp_path / "docs" / "results")
    child = [sys.executable, "-c", "import sys, time; print('started', flush=True); time.sleep(60)"]

    def slow(deadline):
        report.add("s", {"item": "before the child", "pass": True})
        gpu_e2e.run_child(child, tmp_path / "logs" / "slow.log", deadline, dict(os.environ))

    def broken(deadline):
        report.add("f", {"item": "check", "pass": False})
        raise ValueError("boom")

    start = time.monotonic()
    gpu_e2e.run_section(report, "s", "slow", 2.0, slow)
    assert time.monotonic() - start < 30  # the child was killed at the limit
    gpu_e2e.run_section(report, "f", "broken", 10.0, broken)
    gpu_e2e.run_section(report, "g", "good", 10.0, lambda deadline: report.add("g", {"pass": False}))
    copies = [tmp_path / "gpu_e2e.json", tmp_path / "docs/results/nvidia-h100/gpu_e2e_2026-12-05_abc1234.json"]
    for path in copies:
        sections = json.loads(path.read_text())["sections"]
        assert sections["s"]["status"] == "partial (time limit)" and sections["s"]["rows"][0]["pass"] is True
        assert sections["f"]["status"] == "failed" and sections["f"]["error"].startswith("ValueError: boom [at ")
        assert sections["g"]["status"] == "ok, 1 check(s) failed"
    assert (tmp_path / "logs" / "slow.log").read_text() == "started\n"
    assert "ValueError: boom" in copies[1].with_suffix(".md").read_text()


def _dry_run(out: Path, *flags: str) -> tuple[dict, subprocess.CompletedProcess]:
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out), OMP_NUM_THREADS="1", ECHO_COMMIT="test",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_e2e.sh"), "--dry-run", *flags], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    return json.loads((out / "gpu_e2e.json").read_text()), proc


def test_environment_section_runs_in_a_child_and_its_rows_reach_the_report(tmp_path):
    report, proc = _dry_run(tmp_path, "--sections", "e")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    section = report["sections"]["e"]
    assert list(report["sections"]) == ["e"] and section["status"] == "ok"
    rows = {row["item"]: row["value"] for row in section["rows"]}
    assert rows["device"] == "cpu" and rows["SDPAttention backend (causal, heads 7 x 64, T 2048)"] == "FLASH_ATTENTION"
    assert rows["Megatron mixer: mamba_chunk_scan_combined"] == "echo_megatron.megatron.cpu.mamba_chunk_scan_torch"


@pytest.mark.slow
def test_dry_run_completes_every_section_and_every_check_passes(tmp_path):
    report, proc = _dry_run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    sections = report["sections"]
    assert list(sections) == ["e", "a", "b", "c", "d"]
    for key, section in sections.items():
        assert section["status"] == "ok", (key, section)
        assert all(row.get("pass", True) is True for row in section["rows"]), (key, section["rows"])
    training = sections["a"]["rows"]
    assert [row["stack"] for row in training] == list(gpu_e2e.STACKS)
    assert all(row["iterations"] == gpu_e2e.DRY.iterations and row["tokens/s/GPU"] > 0 for row in training)
    resumed = sections["b"]["rows"]
    assert [row["iteration"] for row in resumed] == list(range(gpu_e2e.DRY.save_at + 1, gpu_e2e.DRY.resume_to + 1))
    generated = [row for row in sections["c"]["rows"] if row["item"].startswith("prompt")]
    assert len(generated) == len(gpu_e2e.DRY.prompt_lengths)
    assert all(row["ids equal to recomputation"] == f"{gpu_e2e.DRY.new_tokens}/{gpu_e2e.DRY.new_tokens}"
               for row in generated)
    assert [row["item"] for row in sections["d"]["rows"] if row["item"].startswith("HF bf16 logits")] == [
        "HF bf16 logits vs Megatron fp32"]
    date = datetime.date.today().isoformat()
    copy = tmp_path / "docs" / "results" / "cpu-dry-run" / f"gpu_e2e_{date}_test.json"
    assert json.loads(copy.read_text())["sections"] == sections
