"""`echo-megatron export-hf` / `import-hf` on torch_dist checkpoints shaped like the launcher's: parity with
`load_megatron_checkpoint`, tokenizer and dtype, sharded output, fresh-process loads (trust_remote_code for
echo_hybrid; stock nemotron_h without echo_megatron), TP = 2 loading of an imported checkpoint, bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from echo_megatron.cli import main
from echo_megatron.hf import export_model, load_megatron_checkpoint
from tests.hf.common import (SEQ, VOCAB, full_logits, perturbed_model, relative_error, save_launcher_checkpoint,
                             write_tokenizer)

REPO = Path(__file__).resolve().parents[2]
IDS = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, model_parallel_tp1):
    """Launcher-shaped checkpoints (iteration 8) of a perturbed SKA model and a perturbed softmax (GQA) model,
    with their Megatron logits on IDS."""
    root = tmp_path_factory.mktemp("checkpoints")
    result = {}
    for name in ("ska", "softmax_gqa"):
        model = perturbed_model(name)
        result[name] = (save_launcher_checkpoint(model, root / name), full_logits(model, IDS))
    return result


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_export_hf_matches_load_megatron_checkpoint(checkpoints, tokenizer_dir, tmp_path, model_parallel_tp1):
    ckpt, reference = checkpoints["ska"]
    assert torch.equal(full_logits(load_megatron_checkpoint(ckpt).eval(), IDS), reference)
    out = tmp_path / "nested" / "hf"
    assert main(["export-hf", str(ckpt), str(out), "--tokenizer", str(tokenizer_dir)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "echo_hybrid" and config["auto_map"]["AutoModelForCausalLM"]
    assert config["eos_token_id"] == VOCAB - 1 and config["megatron_vocab_size"] == VOCAB
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("</s>") == VOCAB - 1
    with torch.no_grad():
        error = relative_error(reference, AutoModelForCausalLM.from_pretrained(out)(IDS).logits)
    assert error <= 1e-4


def test_export_bf16_and_sharded(checkpoints, tmp_path, model_parallel_tp1):
    ckpt, reference = checkpoints["ska"]
    assert main(["export-hf", str(ckpt), str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert model.lm_head.weight.dtype == torch.bfloat16
    model = perturbed_model("ska")
    reference = full_logits(model, IDS)
    sharded = export_model(model, tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and sharded.model_type == "echo_hybrid"
    with torch.no_grad():
        assert relative_error(reference, AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")(IDS).logits) <= 1e-4


FRESH_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM

def check(directory, expected_file, **kwargs):
    expected = torch.load(expected_file)
    model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    with torch.no_grad():
        logits = model(expected["ids"]).logits
    error = ((logits - expected["logits"]).abs().max() / expected["logits"].abs().max()).item()
    assert error <= 1e-4, error
    return type(model).__name__

stock = check(sys.argv[1], sys.argv[2])
stock_imported_echo = "echo_megatron" in sys.modules
echo = check(sys.argv[3], sys.argv[4], trust_remote_code=True)
print(stock, stock_imported_echo, echo)
"""


def test_fresh_process_loads(checkpoints, tmp_path, model_parallel_tp1):
    """A new process loads the stock nemotron_h export without ever importing echo_megatron, then the
    echo_hybrid export through `trust_remote_code=True` (auto_map); both give Megatron's logits."""
    argv = []
    for name in ("softmax_gqa", "ska"):
        ckpt, reference = checkpoints[name]
        assert main(["export-hf", str(ckpt), str(tmp_path / name)]) == 0
        torch.save({"ids": IDS, "logits": reference}, tmp_path / f"{name}.pt")
        argv += [str(tmp_path / name), str(tmp_path / f"{name}.pt")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", FRESH_LOAD, *argv], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-3:] == ["NemotronHForCausalLM", "False", "EchoHybridForCausalLM"]


@pytest.mark.multiproc
def test_imported_checkpoint_loads_exports_and_trains_at_tp2(checkpoints, tmp_path, model_parallel_tp1):
    ckpt, reference = checkpoints["ska"]
    assert main(["export-hf", str(ckpt), str(tmp_path / "hf")]) == 0
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "imported")]) == 0
    assert (tmp_path / "imported" / "latest_checkpointed_iteration.txt").read_text() == "release"
    torch.save({"ids": IDS, "logits": reference}, tmp_path / "expected.pt")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "tests.hf.import_tp2_worker", str(tmp_path / "imported"), str(tmp_path / "expected.pt"),
               str(tmp_path / "hf"), str(tmp_path / "hf_from_tp2")]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    assert "PASSED" in result.stdout


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith((name, f".{name}"))]


def test_bad_input_leaves_nothing(checkpoints, tmp_path, capsys, model_parallel_tp1):
    ckpt, _ = checkpoints["ska"]
    # missing shard
    broken = tmp_path / "missing"
    shutil.copytree(ckpt, broken)
    for shard in (broken / "iter_0000008").glob("*.distcp"):
        shard.unlink()
    assert main(["export-hf", str(broken), str(tmp_path / "out")]) == 1
    assert "cannot read the Megatron checkpoint" in capsys.readouterr().err
    # corrupt shard
    corrupt = tmp_path / "corrupt"
    shutil.copytree(ckpt, corrupt)
    for shard in (corrupt / "iter_0000008").glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    assert main(["export-hf", str(corrupt), str(tmp_path / "out")]) == 1
    assert "cannot read the Megatron checkpoint" in capsys.readouterr().err
    # unknown iteration, not a checkpoint
    assert main(["export-hf", str(ckpt), str(tmp_path / "out"), "--iteration", "3"]) == 1
    assert "iteration 3 not found" in capsys.readouterr().err
    assert main(["import-hf", str(tmp_path), str(tmp_path / "out")]) == 1
    assert "no config.json" in capsys.readouterr().err
    assert _leftovers(tmp_path, "out") == []
    # non-empty output is refused and kept
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    assert main(["export-hf", str(ckpt), str(occupied)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"] and _leftovers(tmp_path, "occupied") == ["occupied"]


def test_unsupported_content_is_named(tmp_path, capsys, model_parallel_tp1):
    model = perturbed_model("ska")
    save_launcher_checkpoint(model, tmp_path / "moe", hybrid_layer_pattern="M*ME")
    assert main(["export-hf", str(tmp_path / "moe"), str(tmp_path / "out")]) == 1
    assert "'E'" in capsys.readouterr().err
    save_launcher_checkpoint(model, tmp_path / "bias", add_bias_linear=True)
    assert main(["export-hf", str(tmp_path / "bias"), str(tmp_path / "out")]) == 1
    assert "add_bias_linear" in capsys.readouterr().err
    assert _leftovers(tmp_path, "out") == []
