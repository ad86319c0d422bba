"""`echo-megatron generate`: a launcher checkpoint served by Megatron-Core's dynamic inference engine.

    echo-megatron generate --load CKPT_DIR [--tokenizer DIR] --prompt TEXT | --prompts FILE
                           [--max-new-tokens N] [--temperature T] [--top-k K] [--batch-size B]

The checkpoint is a torch_dist checkpoint written by `echo_megatron.pretrain` (any TP size; loaded at TP = 1,
fp32, on the CPU when there is no GPU) with its Megatron `args` stored inside. The tokenizer is the
checkpoint's: a Hugging Face directory (`--tokenizer`, as given to `preprocess`) or, for `NullTokenizer`
checkpoints (`--mock-data`), token ids written as text ("12 7 40"). Requests run through continuous batching
(`--batch-size` at a time, the rest waiting); with one prompt the completion streams token by token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import torch

from echo_megatron.megatron.generation import RequestMemory, build_engine, memory_per_request


class GenerateError(ValueError):
    """Bad input to `generate` (checkpoint, tokenizer, prompts, sampling options)."""


@dataclass
class Completion:
    """One request's result."""

    prompt: str
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)  # generated token ids
    text: str = ""
    log_probs: list[float] = field(default_factory=list)  # log-probability of each generated token (fp32)


@dataclass
class GenerateReport:
    completions: list[Completion]
    seconds: float  # wall time of the engine loop (prefills and decodes)
    memory: list[RequestMemory]  # per request, at its final length

    @property
    def generated_tokens(self) -> int:
        return sum(len(completion.ids) for completion in self.completions)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else float("inf")


def _checkpoint_args(ckpt_dir):
    """The Megatron `args` stored in a launcher checkpoint (no tensors read)."""
    from megatron.core import dist_checkpointing

    from echo_megatron.hf.convert import ConversionError
    from echo_megatron.hf.megatron_io import iteration_dir
    from echo_megatron.megatron.checkpoint_files import CheckpointFilesError, check_torch_dist_files

    try:
        path, _ = iteration_dir(ckpt_dir)
        check_torch_dist_files(path)
        args = dist_checkpointing.load_common_state_dict(str(path)).get("args")
    except (ConversionError, CheckpointFilesError) as error:
        raise GenerateError(f"--load: {error}") from error
    if args is None:
        raise GenerateError(f"--load: {str(path)!r} holds no Megatron args (not a launcher checkpoint)")
    return args


def load_tokenizer(args, tokenizer_dir: Optional[str]):
    """The checkpoint's tokenizer: `tokenizer_dir` (Hugging Face directory), or Megatron's NullTokenizer for a
    NullTokenizer checkpoint. Its vocabulary must fit the model's (`padded_vocab_size`)."""
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    from echo_megatron.pretrain.preprocess import PreprocessError
    from echo_megatron.pretrain.preprocess import load_tokenizer as load_hf_tokenizer

    model_vocab = args.padded_vocab_size
    if tokenizer_dir is not None:
        try:
            tokenizer = load_hf_tokenizer(tokenizer_dir)
        except PreprocessError as error:
            raise GenerateError(str(error)) from error
    elif args.tokenizer_type == "NullTokenizer":
        tokenizer = build_tokenizer(SimpleNamespace(
            tokenizer_type="NullTokenizer", vocab_size=args.vocab_size, pad_vocab_size=False,
            null_tokenizer_eod_id=getattr(args, "null_tokenizer_eod_id", None),
            null_tokenizer_pad_id=getattr(args, "null_tokenizer_pad_id", None)))
    else:
        raise GenerateError(f"the checkpoint was trained with tokenizer_type={args.tokenizer_type!r}: pass its "
                            "directory with --tokenizer")
    if tokenizer.vocab_size > model_vocab:
        raise GenerateError(f"--tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary has "
                            f"{model_vocab} (padded_vocab_size): not the checkpoint's tokenizer")
    return tokenizer


def _tokenize(tokenizer, prompt: str, model_vocab: int) -> list[int]:
    try:
        ids = list(tokenizer.tokenize(prompt))
    except ValueError as error:  # NullTokenizer: "ids as text"
        raise GenerateError(f"prompt {prompt[:40]!r}: this checkpoint's NullTokenizer reads token ids "
                            f"separated by spaces, e.g. '12 7 40' ({error})") from error
    if not ids:
        raise GenerateError(f"prompt {prompt!r} has no tokens")
    if not all(0 <= i < model_vocab for i in ids):
        raise GenerateError(f"prompt {prompt[:40]!r}: token ids must lie in [0, {model_vocab}), got {ids}")
    return ids


def _sequence_limit(args, max_sequence_length: Optional[int]) -> int:
    limit = max_sequence_length or args.seq_length
    if args.position_embedding_type == "learned_absolute" and limit > args.max_position_embeddings:
        raise GenerateError(f"--max-sequence-length {limit} exceeds the model's learned position embeddings "
                            f"({args.max_position_embeddings})")
    return limit


def _update(completion: Completion, request, tokenizer, on_text: Optional[Callable[[int, str], None]]) -> None:
    """Copy a request's tokens so far into its completion; hand the new text to `on_text`."""
    completion.ids = [int(i) for i in request.generated_tokens]
    completion.log_probs = [float(p) for p in request.generated_log_probs or []]
    text = tokenizer.detokenize(completion.ids)
    if on_text is not None and len(text) > len(completion.text):
        on_text(request.request_id, text[len(completion.text):])
    completion.text = text


def generate(
    ckpt_dir, prompts: list[str], *, tokenizer_dir: Optional[str] = None, max_new_tokens: int = 32,
    temperature: float = 0.0, top_k: int = 0, batch_size: int = 4, max_sequence_length: Optional[int] = None,
    ignore_eos: bool = False, on_text: Optional[Callable[[int, str], None]] = None,
) -> GenerateReport:
    """Generate a completion of each prompt (see the module docstring).

    temperature 0 is greedy decoding; otherwise sampling at `temperature` from the `top_k` most likely
    tokens (0: all). `max_sequence_length` (prompt + completion) defaults to the checkpoint's `seq_length`;
    SKA and Mamba have no position limit, so it may be raised unless the model has learned absolute position
    embeddings. `on_text(request, new_text)` receives the completion of each request as it grows.
    """
    if not prompts:
        raise GenerateError("no prompts: pass --prompt TEXT or --prompts FILE")
    if max_new_tokens < 1 or batch_size < 1 or top_k < 0 or temperature < 0:
        raise GenerateError(f"need --max-new-tokens >= 1, --batch-size >= 1, --top-k >= 0, --temperature >= 0; "
                            f"got {max_new_tokens}, {batch_size}, {top_k}, {temperature}")
    from megatron.core.inference.sampling_params import SamplingParams

    from echo_megatron.hf.convert import ConversionError
    from echo_megatron.hf.megatron_io import load_megatron_checkpoint, megatron_session

    with megatron_session():
        args = _checkpoint_args(ckpt_dir)
        tokenizer = load_tokenizer(args, tokenizer_dir)
        limit = _sequence_limit(args, max_sequence_length)
        completions = [Completion(prompt, _tokenize(tokenizer, prompt, args.padded_vocab_size)) for prompt in prompts]
        for completion in completions:
            if len(completion.prompt_ids) + max_new_tokens > limit:
                raise GenerateError(f"prompt of {len(completion.prompt_ids)} tokens + --max-new-tokens "
                                    f"{max_new_tokens} exceeds the model's limit of {limit} tokens "
                                    "(--max-sequence-length)")
        greedy = temperature == 0
        sampling = SamplingParams(temperature=1.0 if greedy else temperature, top_k=1 if greedy else top_k,
                                  num_tokens_to_generate=max_new_tokens,
                                  termination_id=-1 if ignore_eos else tokenizer.eod, return_log_probs=True,
                                  skip_prompt_log_probs=True)
        try:
            model = load_megatron_checkpoint(ckpt_dir)
        except ConversionError as error:
            raise GenerateError(f"--load: {error}") from error
        if torch.cuda.is_available():
            model.cuda()
        try:
            engine = build_engine(model, tokenizer, max_requests=min(batch_size, len(prompts)),
                                  max_sequence_length=limit)
        except RuntimeError as error:  # softmax attention layers without flash-attn
            raise GenerateError(str(error)) from error
        start = time.perf_counter()
        for request_id, completion in enumerate(completions):
            engine.add_request(request_id, completion.prompt_ids, sampling)
        while engine.has_unfinished_requests():
            result = engine.step_modern()
            active = [engine.get_request(i) for i in result["active_request_ids"]]
            finished = [record.merge() for record in result["finished_request_records"]]
            for request in active + finished:
                _update(completions[request.request_id], request, tokenizer, on_text)
        seconds = time.perf_counter() - start
        memory = [memory_per_request(model, len(c.prompt_ids) + len(c.ids)) for c in completions]
    return GenerateReport(completions, seconds, memory)


def read_prompts(prompt: Optional[str], prompts_file: Optional[str]) -> list[str]:
    """`--prompt TEXT` or `--prompts FILE` (one prompt per non-empty line)."""
    if (prompt is None) == (prompts_file is None):
        raise GenerateError("pass exactly one of --prompt TEXT and --prompts FILE")
    if prompt is not None:
        return [prompt]
    path = Path(prompts_file)
    if not path.is_file():
        raise GenerateError(f"--prompts: {prompts_file!r} is not a file")
    return [line for line in path.read_text().splitlines() if line.strip()]


def _mib(n: int) -> str:
    return f"{n / 2**20:.3f} MiB"


def memory_line(memory: RequestMemory) -> str:
    """One request's inference memory next to softmax attention's KV cache at its length."""
    return (f"{memory.tokens} tokens: state {_mib(memory.total)} (SKA {_mib(memory.ska)} + Mamba "
            f"{_mib(memory.mamba)} + KV {_mib(memory.kv)}); softmax attention in the '*' layers would hold "
            f"KV {_mib(memory.softmax_kv)}")
