"""Every ```python block of README.md runs as pasted: each in a fresh interpreter (blocks that call
`initialize_single_process` own their process), from a scratch directory, with the checkout on the path.
A block that loads "OUT_DIR" (the Hugging Face section) finds there what `echo-megatron export-hf` writes:
a tiny SKA hybrid with its tokenizer."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(markdown: str) -> list[tuple[int, str]]:
    """(first line number, code) of each fenced ```python block."""
    return [(markdown.count("\n", 0, match.start()) + 2, match.group(1)) for match in PYTHON_BLOCK.finditer(markdown)]


BLOCKS = python_blocks((REPO / "README.md").read_text())
# what a newcomer must not meet: transformers' interactive trust prompt, its model-type mismatch warning
UX_TRAPS = ("Do you wish to run the custom code?", "to instantiate a model of type")


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2, "README.md lost its Python examples (or this test's pattern no longer finds them)"


def test_block_extraction_finds_every_fence():
    text = "x\n```python\na = 1\n```\n```bash\nno\n```\n```python\nb = 2\nc = 3\n```\n"
    assert python_blocks(text) == [(3, "a = 1\n"), (9, "b = 2\nc = 3\n")]


def export_tiny_model(directory: Path) -> None:
    """`directory`: a perturbed tiny `M*M-` SKA hybrid exported to Hugging Face format, with a tokenizer."""
    from echo_megatron.hf import export_model
    from tests.hf.common import perturbed_model, write_tokenizer
    from tests.megatron.common import single_process_model_parallel

    tokenizer = write_tokenizer(directory.parent / "tokenizer")
    with single_process_model_parallel():
        export_model(perturbed_model("ska"), directory, tokenizer=tokenizer)


@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs(line, code, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.setdefault("OMP_NUM_THREADS", "1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a block runs as a user's single process would, not as a torchrun rank
    if '"OUT_DIR"' in code:
        export_tiny_model(tmp_path / "OUT_DIR")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600, stdin=subprocess.DEVNULL)  # a prompt for input would read EOF
    assert result.returncode == 0, f"README.md block at line {line} failed:\n{result.stderr[-4000:]}"
    output = result.stdout + result.stderr
    for trap in UX_TRAPS:
        assert trap not in output, f"README.md block at line {line} printed {trap!r}:\n{output[-4000:]}"


BASH_BLOCK = re.compile(r"^```bash[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
ACTIVATE = "source .venv/bin/activate"


def test_readme_commands_run_after_one_activation_step():
    """After the install line nothing is active: the README says once to `source .venv/bin/activate` before
    its first bare `torchrun` / `echo-megatron` command, and in a clean shell (no venv on PATH) that step
    gives both commands from this project's .venv."""
    readme = (REPO / "README.md").read_text()
    assert readme.count(ACTIVATE) == 1
    bare = [match.start() + line.start() for match in BASH_BLOCK.finditer(readme)
            for line in re.finditer(r"^\s*(?:\w+=\S+\s+)*(torchrun|echo-megatron)\b", match.group(1), re.MULTILINE)]
    assert bare and readme.index(ACTIVATE) < min(bare)
    shell = subprocess.run(["bash", "-c", f"{ACTIVATE} && command -v torchrun echo-megatron"], cwd=REPO,
                           capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "HOME": str(REPO)})
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.split() == [str(REPO / ".venv" / "bin" / name) for name in ("torchrun", "echo-megatron")]
