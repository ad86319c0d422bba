"""Passkey probe (`echo-megatron passkey`): prompt layout, scoring against scripted models (one ideal, one that
only finds needles in the first half of the context), bad input, and (slow) a tiny Llama trained on the format
that scores high at its trained length through the CLI."""

import json
import re

import pytest
import torch
from transformers import AutoTokenizer

from echo_megatron.cli import main
from echo_megatron.tasks.passkey import (INSTRUCTION, NEEDLE, QUESTION, PasskeySettings, answer_is_right, passkey_prompt,
                                         run_passkey, write_report)
from tests.tasks.passkey_common import train_passkey_llama, write_passkey_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(write_passkey_tokenizer(tmp_path_factory.mktemp("passkey_tokenizer")))


class ScriptedModel(torch.nn.Module):
    """`generate()` reads the key back from the prompt's text: always (`reach` = 1) or only when the needle lies
    in the first `reach` of the prompt's tokens; otherwise it answers 0s."""

    def __init__(self, tokenizer, reach: float = 1.0):
        super().__init__()
        self.tokenizer, self.reach = tokenizer, reach
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a device to read

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id):
        assert input_ids.shape[0] == 1 and not do_sample and bool(attention_mask.all())
        ids = input_ids[0].tolist()
        words = self.tokenizer.convert_ids_to_tokens(ids)
        start = next(i for i in range(len(words)) if words[i:i + 4] == ["The", "pass", "key", "is"])
        key = "".join(re.findall(r"\d", self.tokenizer.decode(ids[start:start + 12])))[:5]
        if start > self.reach * len(ids):
            key = "0" * len(key)
        answer = self.tokenizer(" " + key + ".", add_special_tokens=False).input_ids
        return torch.tensor([ids + answer][:max_new_tokens + len(ids)])


def test_prompt_has_the_length_and_the_needle_at_its_depth(tokenizer):
    for length in (64, 100, 257):
        for depth in (0.0, 0.5, 1.0):
            ids = passkey_prompt(tokenizer, length, depth, "40213")
            text = tokenizer.decode(ids)
            assert len(ids) == length
            assert re.sub(r"\s", "", text).count("Thepasskeyis40213.") == 1
            assert text.startswith("There is an important info") and text.endswith("What is the pass key ? The pass key is")
    instruction = tokenizer(INSTRUCTION).input_ids
    needle = tokenizer(" " + NEEDLE.format(key="40213"), add_special_tokens=False).input_ids
    question = tokenizer(" " + QUESTION, add_special_tokens=False).input_ids
    head = passkey_prompt(tokenizer, 200, 0.0, "40213")  # the needle right after the instruction
    assert head[len(instruction):len(instruction) + len(needle)] == needle
    tail = passkey_prompt(tokenizer, 200, 1.0, "40213")  # right before the question
    assert tail[-len(question) - len(needle):-len(question)] == needle
    middle = passkey_prompt(tokenizer, 200, 0.5, "40213")
    filler = 200 - len(instruction) - len(needle) - len(question)
    assert middle[len(instruction) + round(filler / 2):][:len(needle)] == needle


def test_scoring():
    assert answer_is_right(" 4 0 2 1 3 . Remember", "40213") and answer_is_right("40213", "40213")
    assert not answer_is_right(" 4 0 2 1", "40213") and not answer_is_right(" no digits", "40213")
    assert not answer_is_right(" 402139", "40213")


def test_scripted_models_give_their_known_tables(tokenizer, tmp_path):
    settings = PasskeySettings(lengths=(80, 160), depths=(0.0, 0.5, 1.0), trials=3)
    ideal = run_passkey(ScriptedModel(tokenizer), tokenizer, settings, progress=False)
    assert ideal.accuracy == [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    assert len(ideal.answers) == 18 and len({key for _, _, key, _ in ideal.answers}) > 10
    half = run_passkey(ScriptedModel(tokenizer, reach=0.5), tokenizer, settings, progress=False)
    assert half.accuracy == [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]  # depth 0.5 starts before the prompt's middle
    paths = write_report(half, tmp_path)
    assert paths["table"].read_text().splitlines()[2] == "| 80 | 1.00 | 1.00 | 0.00 | 0.67 |"
    assert json.loads(paths["json"].read_text())["accuracy"] == half.accuracy
    assert paths["heatmap"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@torch.no_grad()
def test_runs_on_an_echo_hybrid_model_as_its_own_greedy_decoding(tokenizer, tmp_path):
    """On one of ours (Mamba-2 + SKA, constant-size cache in generate()): every recorded answer is the model's
    greedy continuation recomputed without a cache."""
    from echo_megatron.hf import EchoHybridConfig, EchoHybridForCausalLM
    from echo_megatron.tasks.passkey import ANSWER_SLACK, load_causal_lm

    torch.manual_seed(0)
    config = EchoHybridConfig(
        layers_block_type=["linear_attention", "ska", "mlp"], vocab_size=len(tokenizer), hidden_size=64,
        intermediate_size=96, mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=8, ska_num_heads=4,
        ska_rank=12, ska_value_dim=16, ska_chunk_size=8, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        eos_token_id=None)
    EchoHybridForCausalLM(config).save_pretrained(tmp_path / "echo")
    tokenizer.save_pretrained(tmp_path / "echo")
    model, loaded_tokenizer = load_causal_lm(tmp_path / "echo")
    result = run_passkey(model, loaded_tokenizer, PasskeySettings(lengths=(70,), depths=(0.3,), trials=2),
                         progress=False)
    for length, depth, key, text in result.answers:
        ids = torch.tensor([passkey_prompt(tokenizer, length, depth, key)])
        for _ in range(5 + ANSWER_SLACK):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
        assert tokenizer.decode(ids[0, length:], skip_special_tokens=True) == text


def test_bad_input_names_the_parameter(tokenizer, tmp_path, capsys):
    with pytest.raises(ValueError, match="depths must be"):
        PasskeySettings(depths=(0.5, 1.5))
    with pytest.raises(ValueError, match="length 20 is too short"):
        passkey_prompt(tokenizer, 20, 0.5, "40213")
    with pytest.raises(SystemExit):
        main(["passkey", "--hf", str(tmp_path / "missing")])
    assert "--hf must be a model directory" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_llama_trained_on_passkeys_retrieves_them(tokenizer, tmp_path, capsys):
    """A 2-layer Llama trained 1,200 steps on 64-token prompts: through the CLI, its accuracy at the trained length
    (twice that length is reported, not asserted: the model never saw a longer prompt)."""
    model_dir = train_passkey_llama(tokenizer, tmp_path / "llama", length=64, steps=1200)
    assert main(["passkey", "--hf", str(model_dir), "--lengths", "64,128", "--depths", "0,0.25,0.5,0.75,1",
                 "--trials", "8", "--output-dir", str(tmp_path / "out")]) == 0
    accuracy = json.loads((tmp_path / "out" / "passkey.json").read_text())["accuracy"]
    print(capsys.readouterr().out)
    assert sum(accuracy[0]) / len(accuracy[0]) >= 0.6, accuracy  # measured 0.78 (untrained: 0; a key is 5 digits)
