"""Passkey retrieval on a pretrained causal LM (Mohtashami & Jaggi, 2023): a number hidden at a chosen depth in
filler text, asked for at the end; greedy decoding; accuracy by context length × depth.

Runs on any directory `transformers.AutoModelForCausalLM` loads (exported `echo_hybrid` models and stock ones,
so an attention baseline can stand beside ours). No network: the filler is the classic repeated sentences, or
the text of a file the user passes. A prompt of length T is exactly T tokens:
[instruction][filler before][needle][filler after][question], the needle after `depth` of the filler tokens.
An answer is right when the first run of digits of the generated text (whitespace removed) is the key.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
ANSWER_SLACK = 2  # generated tokens beyond the key's own


@dataclass(frozen=True)
class PasskeySettings:
    """lengths: prompt lengths in tokens; depths: needle positions as fractions of the filler (0 = right after the
    instruction, 1 = right before the question); trials per cell; digits of the key; filler text; seed."""

    lengths: tuple[int, ...] = (256, 512, 1024)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    trials: int = 5
    digits: int = 5
    filler: str = FILLER
    seed: int = 0

    def __post_init__(self):
        if not self.lengths or any(length < 1 for length in self.lengths):
            raise ValueError(f"lengths must be a non-empty list of token counts >= 1, got {self.lengths}")
        if not self.depths or any(not 0.0 <= depth <= 1.0 for depth in self.depths):
            raise ValueError(f"depths must be a non-empty list of fractions in [0, 1], got {self.depths}")
        if self.trials < 1:
            raise ValueError(f"trials must be >= 1, got {self.trials}")
        if not 1 <= self.digits <= 18:
            raise ValueError(f"digits must be in [1, 18], got {self.digits}")
        if not self.filler.strip():
            raise ValueError("filler must contain text")


@dataclass(frozen=True)
class PasskeyResult:
    """accuracy[i][j]: fraction right at lengths[i], depths[j]; answers: (length, depth, key, generated text)."""

    settings: PasskeySettings
    accuracy: list[list[float]]
    answers: list[tuple[int, float, str, str]]

    def table(self) -> str:
        """Markdown table: one row per length, one column per depth."""
        depths = self.settings.depths
        lines = ["| length \\ depth | " + " | ".join(f"{d:g}" for d in depths) + " | mean |",
                 "|---:|" + "---:|" * (len(depths) + 1)]
        for length, row in zip(self.settings.lengths, self.accuracy):
            lines.append(f"| {length} | " + " | ".join(f"{a:.2f}" for a in row) + f" | {sum(row) / len(row):.2f} |")
        return "\n".join(lines)


def _ids(tokenizer, text: str, *, first: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=first).input_ids


def passkey_prompt(tokenizer, length: int, depth: float, key: str, filler: str = FILLER) -> list[int]:
    """The token ids (exactly `length`) of a prompt hiding `key` at `depth` of the filler."""
    head = _ids(tokenizer, INSTRUCTION, first=True)
    needle, question = _ids(tokenizer, " " + NEEDLE.format(key=key)), _ids(tokenizer, " " + QUESTION)
    budget = length - len(head) - len(needle) - len(question)
    if budget < 0:
        raise ValueError(f"length {length} is too short: instruction, needle and question take "
                         f"{length - budget} tokens with this tokenizer")
    unit = _ids(tokenizer, " " + " ".join(filler.split()))
    filler_ids = (unit * (budget // max(len(unit), 1) + 1))[:budget]
    split = round(depth * budget)
    return head + filler_ids[:split] + needle + filler_ids[split:] + question


def answer_is_right(generated: str, key: str) -> bool:
    """The first run of digits of `generated`, whitespace removed (digit-per-token tokenizers), equals `key`."""
    found = re.search(r"\d+", re.sub(r"\s+", "", generated))
    return found is not None and found.group() == key


@torch.no_grad()
def run_passkey(model, tokenizer, settings: PasskeySettings, *, progress: bool = True) -> PasskeyResult:
    """Greedy passkey retrieval over settings.lengths × settings.depths × settings.trials prompts (batch 1)."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(settings.seed)
    device = next(model.parameters()).device
    new_tokens = len(_ids(tokenizer, " " + "9" * settings.digits)) + ANSWER_SLACK
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cells = [(i, j) for i in range(len(settings.lengths)) for j in range(len(settings.depths))]
    right = [[0] * len(settings.depths) for _ in settings.lengths]
    answers = []
    bar = tqdm(total=len(cells) * settings.trials, desc="passkey", unit="prompt", disable=not progress)
    for i, j in cells:
        length, depth = settings.lengths[i], settings.depths[j]
        for _ in range(settings.trials):
            low = 10 ** (settings.digits - 1) if settings.digits > 1 else 0
            key = str(int(torch.randint(low, 10 ** settings.digits, (1,), generator=generator)))
            ids = torch.tensor([passkey_prompt(tokenizer, length, depth, key, settings.filler)], device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=pad)
            text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            right[i][j] += answer_is_right(text, key)
            answers.append((length, depth, key, text))
            bar.update()
    bar.close()
    accuracy = [[count / settings.trials for count in row] for row in right]
    return PasskeyResult(settings, accuracy, answers)


def load_causal_lm(directory, *, device: str = "cpu", dtype: str = "auto"):
    """(model, tokenizer) of a directory transformers loads (remote code trusted; `echo_hybrid` registered)."""
    if not (Path(directory) / "config.json").is_file():
        raise ValueError(f"--hf must be a model directory with a config.json, got {str(directory)!r}")
    import echo_megatron.hf  # noqa: F401  (registers echo_hybrid for directories saved without remote code)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=dtype).to(device).eval()
    return model, tokenizer


def write_report(result: PasskeyResult, out_dir) -> dict[str, Path]:
    """passkey.md (the table), passkey.json (settings, accuracy, answers) and passkey.png (heat-map) in out_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"table": out / "passkey.md", "json": out / "passkey.json", "heatmap": out / "passkey.png"}
    paths["table"].write_text(result.table() + "\n")
    paths["json"].write_text(json.dumps(dict(settings=asdict(result.settings), accuracy=result.accuracy,
                                             answers=result.answers), indent=1) + "\n")
    settings = result.settings
    figure, axes = plt.subplots(figsize=(1.2 * len(settings.depths) + 2, 0.6 * len(settings.lengths) + 1.6))
    image = axes.imshow(result.accuracy, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    axes.set_xticks(range(len(settings.depths)), [f"{d:g}" for d in settings.depths])
    axes.set_yticks(range(len(settings.lengths)), [str(length) for length in settings.lengths])
    axes.set_xlabel("needle depth (fraction of the filler)")
    axes.set_ylabel("context length (tokens)")
    for i, row in enumerate(result.accuracy):
        for j, value in enumerate(row):
            axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    figure.colorbar(image, ax=axes, label="accuracy")
    axes.set_title(f"passkey retrieval ({settings.trials} trials per cell, greedy)")
    figure.tight_layout()
    figure.savefig(paths["heatmap"], dpi=120)
    plt.close(figure)
    return paths


__all__ = ["PasskeySettings", "PasskeyResult", "passkey_prompt", "answer_is_right", "run_passkey", "load_causal_lm",
           "write_report", "INSTRUCTION", "FILLER", "NEEDLE", "QUESTION"]
