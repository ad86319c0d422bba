"""The prepared GPU check (`scripts/gpu_check.sh`, `benchmarks/gpu_check.py`) runs on CPU in its dry-run mode,
so it cannot rot between the rare sessions that have a GPU: every section must complete and every check pass."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def _dry_run(out: Path, *flags: str) -> str:
    """`scripts/gpu_check.sh --dry-run *flags` into `out`; its stdout."""
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", *flags], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def _assert_every_section_and_check_passed(out: Path, stdout: str, profile: gpu_check.Profile) -> None:
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["meta"]["mode"].startswith("dry run")
    sections = report["sections"]
    assert list(sections) == ["p", "a", "c", "b", "k", "d"]
    for key, section in sections.items():
        assert section["status"] == "ok", (key, section["status"], section["error"])
        for item in section["items"]:
            assert "error" not in item, (key, item)
            assert item.get("pass", True) is True, (key, item)
    correctness = sections["a"]["items"]
    # every dtype of the profile, every case, and decode, each compared (not just run)
    assert len([i for i in correctness if "case" in i]) == len(profile.dtypes) * len(profile.cases)
    assert all(i["triton y"] < 1e-3 for i in correctness if "case" in i)
    packed = [i["packed vs alone"] for i in correctness if "cu_seqlens" in i.get("case", "")]
    assert len(packed) == len(profile.dtypes) and max(packed) <= 1e-6
    assert len([i for i in correctness if "T0" in i]) == len(profile.dtypes)
    layer = sections["c"]["items"]
    assert [i.get("ska_backend") for i in layer[:2]] == ["triton", "torch"] and layer[2]["pass"] is True
    timings = [i for i in sections["b"]["items"] if i["table"].startswith("Prefill")]
    assert [row["T"] for row in timings] == list(profile.bench_lengths)
    for row in timings:
        cells = {k: v for k, v in row.items() if k not in ("table", "T")}
        assert set(cells) == {"SKA triton fwd", "SKA triton fwd+bwd", "SKA triton G=1 fwd", "SKA triton G=1 fwd+bwd",
                              "SKA triton two-stage statistics fwd",
                              "SKA triton two-stage statistics fwd+bwd", "SKA triton r=P=2w fwd",
                              "SKA triton r=P=2w fwd+bwd", "SDPA flash fwd", "SDPA flash fwd+bwd"}
        assert not any(v.startswith(("error", "not run")) for v in cells.values()), row
    totals = [i for i in sections["k"]["items"] if i["table"] == "Per-kernel time: totals"]
    assert [row["T"] for row in totals] == list(profile.profile_lengths) and totals[0]["total_ms"] > 0
    notes = " ".join(sections["b"]["notes"])
    assert "SDPA cuDNN: not run" in notes and "chunk_gated_delta_rule: not run" in notes
    markdown = (out / "gpu_check.md").read_text()
    assert markdown in stdout and "## b. Timings" in markdown


def test_quick_dry_run_completes_every_section_and_every_check_passes(tmp_path):
    """`--dry-run --quick` (DRY_QUICK: fp32, the packed case, one length): every section and item kind."""
    _assert_every_section_and_check_passed(tmp_path, _dry_run(tmp_path, "--quick"), gpu_check.DRY_QUICK)


@pytest.mark.slow
def test_dry_run_completes_every_section_and_every_check_passes(tmp_path):
    """The whole dry-run profile: fp16 too, and the one-token case (about 140 s on 2 cores)."""
    _assert_every_section_and_check_passed(tmp_path, _dry_run(tmp_path), gpu_check.DRY)


def test_a_failing_section_is_recorded_and_the_next_still_runs(tmp_path):
    report = gpu_check.Report(tmp_path, dict(date="today"))

    def broken(section):
        gpu_check.guarded(report, section, "items", dict(n=1), lambda: dict(value=1.0))
        raise ValueError("boom")

    def good(section):
        gpu_check.guarded(report, section, "items", dict(n=2), lambda: 1 / 0)
        gpu_check.guarded(report, section, "items", dict(n=3), lambda: {"pass": True})

    gpu_check.run_section(report, "x", "broken", 10.0, broken)
    gpu_check.run_section(report, "y", "good", 10.0, good)
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["sections"]["x"]["status"] == "failed"
    assert data["sections"]["x"]["error"].startswith("ValueError: boom [at test_gpu_check.py:")
    assert data["sections"]["x"]["items"] == [dict(table="items", n=1, value=1.0)]
    assert data["sections"]["y"]["status"] == "ok, 1 item(s) failed or errored"
    assert data["sections"]["y"]["items"][0]["error"].startswith("ZeroDivisionError")
    assert "ValueError: boom" in (tmp_path / "gpu_check.md").read_text()


def test_time_limits_stop_items_and_the_hard_alarm_stops_a_section(tmp_path):
    report = gpu_check.Report(tmp_path, dict(date="today"))

    def slow(section):
        while True:  # never checks the deadline: only the alarm ends it
            pass

    def late(section):
        section.deadline = 0.0  # time already up: items are recorded as not run
        gpu_check.guarded(report, section, "items", dict(n=1), lambda: dict(value=1.0))

    gpu_check.run_section(report, "s", "slow", -19.5, slow)  # hard alarm fires at limit + 20 s = 0.5 s
    gpu_check.run_section(report, "l", "late", 10.0, late)
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["sections"]["s"]["status"] == "partial (hard time limit)"
    assert data["sections"]["l"]["items"][0]["error"].startswith("not run: section time limit")


def test_the_layer_and_the_check_import_without_the_packages_missing_on_the_gpu_machine():
    """The GPU machine has no mamba_ssm, causal_conv1d, TE, flash_attn or apex: importing the check and the
    layer's local spec must not need them."""
    code = ("import sys\n"
            "for name in ('mamba_ssm', 'causal_conv1d', 'transformer_engine', 'flash_attn', 'apex'):\n"
            "    sys.modules[name] = None\n"
            "import gpu_check\n"
            "from echo_megatron.megatron.specs import ska_layer_spec_local\n"
            "print(ska_layer_spec_local.submodules.self_attention.module.__name__)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")]))
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["SpectralKoopmanAttention"]
