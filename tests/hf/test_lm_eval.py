"""lm-evaluation-harness on an exported `echo_hybrid` directory: the README's `lm_eval --model hf` command, in a
fresh process, on a local multiple-choice task (a task YAML over a JSON-lines file; no network). Its
log-likelihoods equal the in-package model's own forward."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from echo_megatron.hf import EchoHybridForCausalLM, export_model
from tests.hf.common import perturbed_model, write_tokenizer

pytest.importorskip("lm_eval", reason="the `eval` extra (lm-eval) is not installed")

TASK = "echo_local_choice"
TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
WORDS = 45  # the tiny tokenizer's words w0 … w44


def _documents(count: int = 6) -> list[dict]:
    """Contexts of 6-30 words, three choices of 1-3 words each (the prompt crosses SKA chunks of S = 8)."""
    generator = torch.Generator().manual_seed(11)

    def words(n):
        return " ".join(f"w{i}" for i in torch.randint(0, WORDS, (n,), generator=generator).tolist())

    return [dict(context=words(6 + 5 * i), choices=[words(1 + j) for j in range(3)], answer=i % 3)
            for i in range(count)]


@torch.no_grad()
def _log_likelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) by our forward: the sum over the continuation's tokens."""
    context_ids = tokenizer(context).input_ids
    ids = tokenizer(context + continuation).input_ids
    log_probs = model(torch.tensor([ids[:-1]]), use_cache=False).logits[0].log_softmax(-1)
    return sum(log_probs[position - 1, ids[position]].item() for position in range(len(context_ids), len(ids)))


def test_lm_eval_log_likelihoods_equal_our_forward(tmp_path, model_parallel_tp1):
    model_dir = tmp_path / "hf"
    export_model(perturbed_model("ska"), model_dir, tokenizer=write_tokenizer(tmp_path / "tokenizer"))
    documents = _documents()
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in documents))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=tmp_path / "docs.jsonl"))
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
               f"pretrained={model_dir},trust_remote_code=True,dtype=float32", "--tasks", TASK,
               "--include_path", str(tmp_path / "tasks"), "--device", "cpu", "--batch_size", "1",
               "--output_path", str(tmp_path / "out"), "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_HOME": str(tmp_path / "hf_home"), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    samples_file, = (tmp_path / "out").rglob(f"samples_{TASK}_*.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert len(samples) == len(documents)

    model = EchoHybridForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ours = [[_log_likelihood(model, tokenizer, doc["context"], " " + choice) for choice in doc["choices"]]
            for doc in documents]
    theirs = [[float(response[0]) for response in sample["filtered_resps"]] for sample in samples]
    print("lm-eval vs ours (log-likelihood per choice):")
    for ours_row, theirs_row in zip(ours, theirs):
        print("  " + "  ".join(f"{a:.6f} / {b:.6f}" for a, b in zip(theirs_row, ours_row)))
    assert torch.allclose(torch.tensor(theirs, dtype=torch.float64), torch.tensor(ours, dtype=torch.float64),
                          rtol=1e-5, atol=1e-5)
    accuracy = sum(max(range(3), key=row.__getitem__) == doc["answer"] for row, doc in zip(ours, documents))
    assert json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"][TASK]["acc,none"] \
        == pytest.approx(accuracy / len(documents))
