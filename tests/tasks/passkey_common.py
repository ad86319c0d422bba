"""A word tokenizer for the passkey prompts (one token per word, punctuation mark and digit) and a tiny Llama
trained on the passkey format itself."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from echo_megatron.tasks.passkey import FILLER, INSTRUCTION, NEEDLE, QUESTION, passkey_prompt


def write_passkey_tokenizer(directory: Path) -> Path:
    """WordLevel over the words of the prompts, '.', '?' and the ten digits, saved for AutoTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(re.findall(r"[A-Za-z]+|[.?]", " ".join([INSTRUCTION, FILLER, NEEDLE, QUESTION]))))
    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "</s>", *words, *"0123456789"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                     pre_tokenizers.Digits(individual_digits=True)])
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                            eos_token="</s>").save_pretrained(directory)
    return directory


def train_passkey_llama(tokenizer, out_dir: Path, *, length: int, steps: int, digits: int = 5, batch: int = 16,
                        lr: float = 1e-2, seed: int = 0) -> Path:
    """A 2-layer Llama (d = 64) trained on passkey prompts of `length` tokens (random depth and key) followed by
    the answer: next-token loss on every token (the needle's repeated key teaches copying early), AdamW at `lr`
    decayed linearly to 0; saved with the tokenizer to out_dir."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4 * length,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)  # linear decay to 0
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        rows = []
        for _ in range(batch):
            key = str(int(torch.randint(10 ** (digits - 1), 10 ** digits, (1,), generator=generator)))
            depth = float(torch.rand((), generator=generator))
            prompt = passkey_prompt(tokenizer, length, depth, key)
            answer = tokenizer(" " + key + ".", add_special_tokens=False).input_ids
            rows.append(prompt + answer)
        ids = torch.tensor(rows)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0:
            print(step, loss.item(), flush=True)
    model.eval().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
