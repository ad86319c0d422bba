"""`echo-megatron generate` (Megatron's dynamic inference engine on a launcher checkpoint): greedy output
equals the Hugging Face export's `generate()`; bad input fails with a clear error."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from echo_megatron.cli import main
from echo_megatron.hf import export_checkpoint
from echo_megatron.serve.generate import GenerateError, generate
from tests.hf.common import perturbed_model, save_launcher_checkpoint, write_tokenizer
from tests.pretrain.launch import SHORT, launch

NEW_TOKENS = 12
PROMPTS = ["w1 w2 w3", "w40 w7 w7 w9 w11 w2 w30 w31 w3 w5 w6"]  # 3 and 11 tokens; SKA chunks of 8


@torch.no_grad()
def _hf_greedy(hf_dir, prompts: list[str], new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    """Greedy `generate()` of the exported model, each prompt alone, never stopping early."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    model.generation_config.eos_token_id = None
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        outputs.append(out[0, ids.shape[1]:].tolist())
    return outputs


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model_parallel_tp1):
    """(checkpoint, tokenizer dir, HF export) of a tiny perturbed M*M- SKA model saved as the launcher saves."""
    root = tmp_path_factory.mktemp("serve")
    ckpt = save_launcher_checkpoint(perturbed_model("ska"), root / "ckpt", tokenizer_type="HuggingFaceTokenizer")
    tokenizer = write_tokenizer(root / "tokenizer")
    export_checkpoint(ckpt, root / "hf", tokenizer=tokenizer)
    return ckpt, tokenizer, root / "hf"


def test_generate_equals_hf_export_greedy(checkpoint):
    ckpt, tokenizer, hf_dir = checkpoint
    report = generate(ckpt, PROMPTS, tokenizer_dir=str(tokenizer), max_new_tokens=NEW_TOKENS, batch_size=2,
                      ignore_eos=True)
    assert [completion.ids for completion in report.completions] == _hf_greedy(hf_dir, PROMPTS)
    memory = report.memory[1]
    assert memory.tokens == 11 + NEW_TOKENS and memory.kv == 0 and memory.ska > 0 and memory.mamba > 0


def test_cli_streams_and_reports(checkpoint, capsys):
    ckpt, tokenizer, hf_dir = checkpoint
    assert main(["generate", "--load", str(ckpt), "--tokenizer", str(tokenizer), "--prompt", PROMPTS[1],
                 "--max-new-tokens", str(NEW_TOKENS), "--ignore-eos"]) == 0
    out = capsys.readouterr().out
    expected = _hf_greedy(hf_dir, PROMPTS[1:])[0]
    assert f"[0] generated ids: {' '.join(map(str, expected))}" in out
    assert out.splitlines()[0].split() == [f"w{i}" for i in expected]  # the streamed completion
    assert "softmax attention in the '*' layers would hold KV" in out and "tokens/s" in out


# fp32 tolerance on log-probs: the same comparison in fp64 (tests/megatron/test_dynamic_log_probs.py) agrees to
# the engine's fp32 output rounding, so what fp32 adds is rounding; measured in fp32 on this model: <= 2e-5
# (1.4e-5 over the engine scenarios there). A wrong SKA state moves log-probs by ~1e-2.
LOG_PROB_TOLERANCE = 1e-4


def test_generate_log_probs_equal_full_forward(checkpoint):
    """Prompts ending at S - 1, S, S + 1 (S = 8), two slots for three requests (the third reuses a slot): the
    log-prob of every generated token == log_softmax of a full forward of the checkpoint's model."""
    from echo_megatron.hf.megatron_io import load_megatron_checkpoint
    from tests.megatron.common import full_logits

    ckpt, tokenizer, _ = checkpoint
    prompts = [" ".join(f"w{(5 * i + n) % 45}" for i in range(n)) for n in (7, 8, 9)]
    report = generate(ckpt, prompts, tokenizer_dir=str(tokenizer), max_new_tokens=NEW_TOKENS, batch_size=2,
                      ignore_eos=True)
    model = load_megatron_checkpoint(ckpt).eval()
    for completion in report.completions:
        tokens = torch.tensor([completion.prompt_ids + completion.ids])
        with torch.no_grad():
            reference = torch.log_softmax(full_logits(model, tokens)[0].double(), dim=-1)
        expected = reference[len(completion.prompt_ids) - 1:-1].gather(1, tokens[0, len(completion.prompt_ids):, None])
        error = (torch.tensor(completion.log_probs, dtype=torch.float64) - expected[:, 0]).abs().max().item()
        print(f"prompt of {len(completion.prompt_ids)} tokens: max |Δ log-prob| = {error:.1e}")
        assert len(completion.log_probs) == NEW_TOKENS and error <= LOG_PROB_TOLERANCE


@pytest.mark.parametrize("flags, message", [
    (["--load", "{root}/missing", "--prompt", "w1"], "does not exist"),
    (["--load", "{ckpt}", "--prompt", "w1"], "pass its directory with --tokenizer"),
    (["--load", "{ckpt}", "--tokenizer", "{tokenizer}", "--prompt", "w1 w2 w3 w4 w5 w6",
      "--max-sequence-length", "10"], "prompt of 6 tokens + --max-new-tokens 5 exceeds the model's limit of 10"),
    (["--load", "{ckpt}", "--tokenizer", "{tokenizer}", "--prompts", "{root}/none.txt"], "is not a file"),
])
def test_bad_input_is_a_clear_error(checkpoint, capsys, flags, message):
    ckpt, tokenizer, _ = checkpoint
    values = dict(root=ckpt.parent, ckpt=ckpt, tokenizer=tokenizer)
    assert main(["generate", *(flag.format(**values) for flag in flags), "--max-new-tokens", "5"]) == 2
    assert message in capsys.readouterr().err


def test_tokenizer_vocabulary_mismatch(tmp_path, model_parallel_tp1):
    """A NullTokenizer checkpoint whose tokenizer has more tokens than the model's embedding; and its prompts
    must be token ids."""
    ckpt = save_launcher_checkpoint(perturbed_model("ska"), tmp_path / "null", tokenizer_type="NullTokenizer",
                                    vocab_size=100)
    with pytest.raises(GenerateError, match="has 100 tokens but the model's vocabulary has 48"):
        generate(ckpt, ["1 2 3"])
    ok = save_launcher_checkpoint(perturbed_model("ska"), tmp_path / "ids", tokenizer_type="NullTokenizer")
    with pytest.raises(GenerateError, match="reads token ids separated by spaces"):
        generate(ok, ["hello"])


@pytest.mark.slow
@pytest.mark.multiproc
def test_launcher_checkpoint_generate_equals_hf_export(tmp_path, model_parallel_tp1):
    """`echo_megatron.pretrain --cpu` at TP = 2 + SP (echo-tiny, NullTokenizer, mock data) -> generate (TP = 1)
    == export-hf generate()."""
    ckpt, hf_dir = tmp_path / "ckpt", tmp_path / "hf"
    launch([*SHORT, "--tensor-model-parallel-size", "2", "--sequence-parallel", "--train-iters", "4",
            "--save", str(ckpt), "--save-interval", "4"])
    prompts = ["5 9 13 2 77", " ".join(str(i) for i in range(30, 100))]  # 5 and 70 tokens (SKA chunk 64)
    report = generate(ckpt, prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert main(["export-hf", str(ckpt), str(hf_dir)]) == 0
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    model.generation_config.eos_token_id = None
    for prompt, completion in zip(prompts, report.completions):
        ids = torch.tensor([[int(t) for t in prompt.split()]])
        with torch.no_grad():
            expected = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, ids.shape[1]:].tolist()
        assert completion.ids == expected
