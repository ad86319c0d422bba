"""Installable anywhere (issue 11, item 3): pyproject.toml declares ranges, `scripts/install.sh` pins them.

The key property — `pip install -e .[gpu]` into a CUDA environment (Python 3.12, torch 2.11, triton 3.6,
transformers 5.17, as in NGC-style containers) keeps that torch — is checked with pip's own resolver,
offline: a virtual environment holding stand-in torch/triton/transformers distributions of those versions,
a local index of stand-in wheels for every requirement (newer torch and triton included, so pip *could*
replace them), and `pip install --dry-run --report` of a stand-in echo-megatron wheel whose metadata is
pyproject.toml's dependency lists. The same run with the old exact pins must replace torch (the test can fail).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
CONTAINER = {"torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0"}  # the H200 image's versions
NEWER = {"torch": "2.13.0", "triton": "3.7.1", "transformers": "5.23.0"}  # on the index: pip could take them
# one stand-in version per other requirement: the first of these a specifier accepts
CANDIDATE_VERSIONS = ("0.19.2", "1.7.0", "2.3.2.post1", "4.12.0", "6.0.0", "68.0.0", "99.0.0")


def requirements(extra: str | None = None) -> list[Requirement]:
    lines = PYPROJECT["dependencies"] if extra is None else PYPROJECT["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def write_wheel(directory: Path, name: str, version: str, requires: list[str] = (),
                extras: tuple[str, ...] = ()) -> Path:
    """A minimal, installable wheel that holds only metadata (and one module so pip records a file)."""
    dist = re.sub(r"[-_.]+", "_", name)
    info = f"{dist}-{version}.dist-info"
    files = {
        f"{dist}_standin.py": "",
        f"{info}/METADATA": "\n".join([f"Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
                                       *(f"Provides-Extra: {e}" for e in extras),
                                       *(f"Requires-Dist: {r}" for r in requires)]) + "\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test_install\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join(record + [f"{info}/RECORD,,"]) + "\n"
    wheel = directory / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def stand_in_index(directory: Path, base: list[str], gpu: list[str], container: dict[str, str]) -> None:
    """Wheels for echo-megatron (with these requirement lines) and for everything it may pull."""
    names: dict[str, Requirement] = {}
    for line in base + gpu:
        req = Requirement(line)
        names.setdefault(canonicalize_name(req.name), req)
    for name, req in names.items():
        if name in CONTAINER:
            versions = [container[name], NEWER[name]]
        else:
            versions = [next(v for v in CANDIDATE_VERSIONS if req.specifier.contains(v, prereleases=True))]
        # GPU packages build against and run with the torch they find: like the real ones, they need torch
        needs_torch = ["torch"] if name in ("mamba-ssm", "causal-conv1d", "flash-attn") else []
        extra_torch = ['torch; extra == "pytorch"'] if name == "transformer-engine" else []
        for version in versions:
            write_wheel(directory, req.name, version, needs_torch + extra_torch, tuple(req.extras))
    write_wheel(directory, "echo-megatron", "0.1.0", base + [f'{line}; extra == "gpu"' for line in gpu], ("gpu",))


def pip_install_plan(tmp_path: Path, base: list[str], gpu: list[str], container: dict[str, str] = CONTAINER
                     ) -> dict[str, str]:
    """{name: version} pip would install for `echo-megatron[gpu]` into the stand-in CUDA environment."""
    index = tmp_path / "index"
    index.mkdir()
    stand_in_index(index, base, gpu, container)
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check", "-q"]
    offline = ["--no-index", "--find-links", str(index)]
    subprocess.run(pip + ["install", *offline, *(f"{n}=={v}" for n, v in container.items())], check=True,
                   capture_output=True, text=True)
    report = tmp_path / "report.json"
    proc = subprocess.run(pip + ["install", "--dry-run", "--report", str(report), *offline, "echo-megatron[gpu]"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(report.read_text())["install"]
    return {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"] for item in plan}


@pytest.mark.parametrize("torch_version", ["2.11.0", "2.11.0a0+ecf3bae40a.nv26.01"], ids=["pypi", "ngc-prerelease"])
def test_gpu_extra_into_a_cuda_environment_keeps_its_torch_triton_and_transformers(tmp_path, torch_version):
    gpu = PYPROJECT["optional-dependencies"]["gpu"]
    plan = pip_install_plan(tmp_path, PYPROJECT["dependencies"], gpu, {**CONTAINER, "torch": torch_version})
    assert plan.get("echo-megatron") == "0.1.0" and plan.get("megatron-core", "").startswith("0.19")
    assert {"mamba-ssm", "causal-conv1d"} <= set(plan)
    kept = {name: plan[name] for name in CONTAINER if name in plan}
    assert kept == {}, f"pip would replace the environment's {kept}"


def test_exact_pins_would_replace_the_containers_torch(tmp_path):
    """The check above can fail: with the exact pins pyproject.toml used to declare, pip replaces torch."""
    pinned = [line for line in PYPROJECT["dependencies"] if canonicalize_name(Requirement(line).name) not in NEWER]
    pinned += [f"{name}=={version}" for name, version in NEWER.items()]
    plan = pip_install_plan(tmp_path, pinned, [])
    assert {name: plan.get(name) for name in NEWER} == NEWER


def test_dependencies_are_ranges_that_hold_both_the_cpu_pins_and_the_gpu_image():
    declared = {canonicalize_name(r.name): r for r in requirements() + requirements("gpu")}
    for name in ("torch", "triton", "megatron-core", "transformers"):
        spec = declared[name].specifier
        assert not any(s.operator in ("==", "===") for s in spec), f"{name} must declare a range, not {spec}"
    assert str(declared["megatron-core"].specifier) in ("<0.20,>=0.19", ">=0.19,<0.20")
    pins = dict(re.findall(r"\b([a-z][a-z0-9_.-]*)==([0-9][0-9a-z.+]*)", (ROOT / "scripts" / "install.sh").read_text()))
    pins = {canonicalize_name(n): v for n, v in pins.items()}
    assert pins["torch"] == "2.13.0" and pins["triton"] == "3.7.1"  # the CPU machine keeps its exact pins
    for name, version in pins.items():  # every pin of install.sh lies inside the declared range
        if name in declared:
            assert declared[name].specifier.contains(version, prereleases=True), (name, version)
    for name, version in {**CONTAINER, "megatron-core": "0.19.2"}.items():  # and so does the GPU image
        assert declared[name].specifier.contains(Version(version)), (name, version)


def test_gpu_extra_never_names_torch():
    """The extra adds CUDA kernels' packages; torch itself comes from the environment."""
    assert not [r for r in requirements("gpu") if canonicalize_name(r.name) in ("torch", "triton")]
