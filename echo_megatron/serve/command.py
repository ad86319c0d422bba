"""The `echo-megatron generate` subcommand: arguments, streaming output and the report (see `generate.py`)."""

from __future__ import annotations

import argparse
import sys
import warnings


def _generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .generate import GenerateError, generate, memory_line, read_prompts

    # torch's checkpoint reader warns that one process loads the whole checkpoint: that is the intent here.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed\.checkpoint")
    streaming = args.prompt is not None

    def stream(request: int, text: str) -> None:
        print(text, end="", flush=True)

    try:
        prompts = read_prompts(args.prompt, args.prompts)
        report = generate(args.load, prompts, tokenizer_dir=args.tokenizer, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, batch_size=args.batch_size,
                          max_sequence_length=args.max_sequence_length, ignore_eos=args.ignore_eos,
                          on_text=stream if streaming else None)
    except GenerateError as error:
        print(f"echo-megatron generate: error: {error}", file=sys.stderr)
        return 2
    if streaming:
        print()
    for index, (completion, memory) in enumerate(zip(report.completions, report.memory)):
        if not streaming:
            print(f"[{index}] {completion.prompt!r} -> {completion.text!r}")
        print(f"[{index}] generated ids: {' '.join(map(str, completion.ids))}")
        print(f"[{index}] memory per request at {memory_line(memory)}")
    print(f"{report.generated_tokens} tokens in {report.seconds:.2f} s: {report.tokens_per_second:.1f} tokens/s "
          f"(batch size {min(args.batch_size, len(report.completions))}, prefill included)")
    return 0


def add_generate_parser(commands) -> None:
    """Register `generate` on the `echo-megatron` subparsers."""
    sub = commands.add_parser(
        "generate", help="generate text from a launcher checkpoint with Megatron's dynamic inference engine",
        description="Load a checkpoint written by echo_megatron.pretrain (TP = 1, fp32; CPU without a GPU), serve "
                    "the prompts by continuous batching (SKA and Mamba keep a constant-size state per request) and "
                    "report tokens/s and the memory per request next to softmax attention's KV cache.",
    )
    sub.add_argument("--load", required=True, help="checkpoint directory (with latest_checkpointed_iteration.txt)")
    sub.add_argument("--tokenizer", help="Hugging Face tokenizer directory the model was trained with (not needed "
                                         "for NullTokenizer checkpoints, whose prompts are token ids: '12 7 40')")
    source = sub.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt (its completion streams as it is generated)")
    source.add_argument("--prompts", help="a file with one prompt per line")
    sub.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt (default: 32)")
    sub.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
    sub.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    sub.add_argument("--batch-size", type=int, default=4, help="requests in flight at once (default: 4)")
    sub.add_argument("--max-sequence-length", type=int,
                     help="prompt + completion limit (default: the checkpoint's seq_length)")
    sub.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-document token")
    sub.set_defaults(func=_generate, parser=sub)
