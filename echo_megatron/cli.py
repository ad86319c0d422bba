"""The ``echo-megatron`` command line (thin: parsing and error reporting only).

    echo-megatron mqar                      # CPU demo preset, results in ./mqar_cpu
    echo-megatron mqar --preset paper       # SPEC §10 grid at the Echo-50M size (GPUs, torchrun)
    echo-megatron export-hf CKPT_DIR OUT_DIR --tokenizer TOKENIZER_DIR   # Megatron checkpoint -> Hugging Face
    echo-megatron import-hf HF_DIR CKPT_DIR                               # Hugging Face -> Megatron (--load)
    echo-megatron niah                      # needle in a haystack, train at T=64, evaluate up to 4096
    torchrun --nproc-per-node 2 -m echo_megatron.cli mqar --tp 2 ...
    echo-megatron preprocess --input corpus.jsonl --tokenizer TOKENIZER_DIR --output-prefix data/corpus
    echo-megatron patch-megatron [--check|--revert]   # our megatron-core 0.19.2 fixes (patches/)
    echo-megatron generate --load CKPT_DIR --prompt TEXT  # Megatron's dynamic inference engine (echo_megatron.serve)
    echo-megatron passkey --hf HF_DIR       # passkey retrieval of a pretrained model: length x depth table, heat-map
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
import warnings
from pathlib import Path

# Flags that are shorthands for preset fields: flag -> field.
_FIELD_FLAGS = {
    "archs": "archs", "kv_pairs": "kv_pairs", "gaps": "eval_gaps", "train_gaps": "train_gaps", "steps": "steps",
    "batch_size": "batch_size", "lr": "lrs", "seeds": "seeds", "ska_power": "ska_power",
    "ska_chunk_size": "ska_chunk_size", "tp": "tensor_parallel_size",
}


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    return values


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _train_gaps(text: str) -> tuple[int, ...]:
    return () if text == "each" else _int_list(text)


def _arch_list(text: str) -> tuple[str, ...]:
    from echo_megatron.tasks.mqar_benchmark import ARCHS

    archs = tuple(a.strip() for a in text.split(",") if a.strip())
    bad = [a for a in archs if a not in ARCHS]
    if bad or not archs:
        raise argparse.ArgumentTypeError(f"unknown architecture {', '.join(bad) or '(none)'}; choose from {', '.join(ARCHS)}")
    return archs


def _coerce(field: dataclasses.Field, text: str):
    """Parse ``text`` as the type of preset ``field`` (int, float, str or a tuple of them)."""
    from echo_megatron.tasks.mqar_benchmark import MQARPreset

    hint = typing.get_type_hints(MQARPreset)[field.name]
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        return tuple(item(x) for x in text.split(",") if x.strip())
    return hint(text)


def _parse_sets(assignments: list[str], parser: argparse.ArgumentParser) -> dict:
    from echo_megatron.tasks.mqar_benchmark import MQARPreset

    fields = {f.name: f for f in dataclasses.fields(MQARPreset) if f.name != "name"}
    changes = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or key not in fields:
            parser.error(f"argument --set: expected KEY=VALUE with KEY one of {', '.join(fields)}; got {assignment!r}")
        try:
            changes[key] = _coerce(fields[key], value)
        except ValueError:
            parser.error(f"argument --set: bad value {value!r} for {key}")
    return changes


def _mqar(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Both ``mqar`` and ``niah``: the same benchmark driver, different presets."""
    from echo_megatron.tasks.mqar_benchmark import (NIAH_PRESETS, PRESETS, ResultsDirError, merge_results,
                                                    rewrite_tables, run_benchmark)

    presets = NIAH_PRESETS if args.command == "niah" else PRESETS
    if args.rewrite_tables or args.merge:
        out = Path(args.out) if args.out else Path(f"{args.command}_{args.preset}")
        try:
            print(merge_results([Path(p) for p in args.merge], out) if args.merge else rewrite_tables(out), end="")
        except ResultsDirError as error:
            print(f"echo-megatron {args.command}: error: {error}", file=sys.stderr)
            return 1
        return 0
    changes = {field: getattr(args, flag) for flag, field in _FIELD_FLAGS.items() if getattr(args, flag) is not None}
    changes.update(_parse_sets(args.set, parser))
    try:
        preset = dataclasses.replace(presets[args.preset], **changes)
    except ValueError as error:
        parser.error(str(error))
    out = Path(args.out) if args.out else Path(f"{args.command}_{args.preset}")
    _set_cpu_threads(args.threads)
    try:
        cells = run_benchmark(preset, out, force=args.force, resume=args.resume, progress=not args.no_progress)
    except ResultsDirError as error:
        print(f"echo-megatron {args.command}: error: {error}", file=sys.stderr)
        return 1
    if cells:
        print(f"results: {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")
        print((out / "results.md").read_text() if (out / "results.md").exists() else "", end="")
    return 0


def _set_cpu_threads(threads: int | None) -> None:
    """Intra-op threads on CPU: --threads, else $OMP_NUM_THREADS, else 1 (the benchmark's small
    matrices gain little from a second thread, and spinning OpenMP threads collapse throughput
    when the cores are shared)."""
    import os

    import torch

    if torch.cuda.is_available():
        return
    if threads is None:
        threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _preprocess(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from echo_megatron.pretrain.preprocess import PreprocessError, preprocess

    try:
        result = preprocess(args.input, args.tokenizer, args.output_prefix, json_key=args.json_key,
                            workers=args.workers, append_eod=args.append_eod, progress=not args.no_progress)
    except PreprocessError as error:
        print(f"echo-megatron preprocess: error: {error}", file=sys.stderr)
        return 1
    print(f"{result.documents} documents, {result.tokens} tokens ({result.skipped} empty lines or documents "
          f"skipped): {result.bin_path}, {result.idx_path}\ntrain with --data-path {result.prefix}")
    return 0


def _add_preprocess(commands) -> None:
    preprocess = commands.add_parser(
        "preprocess", help="tokenise a JSON-lines corpus into Megatron's indexed dataset (.bin/.idx)",
        description="Megatron-LM's tools/preprocess_data.py for the megatron-core wheel: writes "
                    "PREFIX_<json-key>_document.bin/.idx for --data-path (an existing dataset at that prefix is "
                    "replaced only when the new one is complete).",
    )
    preprocess.add_argument("--input", required=True, help="JSON-lines file, one document per line")
    preprocess.add_argument("--tokenizer", required=True,
                            help="local tokenizer directory (transformers.AutoTokenizer format), loaded as Megatron's "
                                 "HuggingFaceTokenizer; train with --tokenizer-type HuggingFaceTokenizer "
                                 "--tokenizer-model DIR")
    preprocess.add_argument("--output-prefix", required=True, help="output path prefix")
    preprocess.add_argument("--json-key", default="text", help="field holding each document's text (default: text)")
    preprocess.add_argument("--workers", type=_positive_int, default=1, help="tokenising processes (default: 1)")
    preprocess.add_argument("--append-eod", action="store_true", help="end every document with the EOD (eos) token")
    preprocess.add_argument("--no-progress", action="store_true", help="no progress bar")
    preprocess.set_defaults(func=_preprocess, parser=preprocess)


def _patch_megatron(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from echo_megatron.patching import PatchError, megatron_root, run

    action = "check" if args.check else "revert" if args.revert else "apply"
    try:
        report = run(action)
    except PatchError as error:
        print(f"echo-megatron patch-megatron: error: {error}", file=sys.stderr)
        return 2
    print(f"megatron-core at {megatron_root() / 'megatron' / 'core'}:")
    for name, state in report:
        print(f"  {name}: {state}")
    if action == "check":
        return 0 if all(state == "applied" for _, state in report) else 1
    return 0


def _add_benchmark_arguments(sub: argparse.ArgumentParser, presets: dict, task: str) -> None:
    """The flags shared by ``mqar`` and ``niah`` (NIAH names its lengths --lengths / --train-lengths)."""
    from echo_megatron.tasks.mqar_benchmark import ARCHS

    helps = {"cpu": "the CPU demo (default)", "paper": "the Echo-50M size (GPUs)"}
    sub.add_argument("--preset", choices=sorted(presets), default="cpu",
                     help="; ".join(f"{name}: {helps[name]}" for name in sorted(presets)))
    sub.add_argument("--out", help=f"results directory (default: ./{task}_<preset>)")
    sub.add_argument("--archs", type=_arch_list, help=f"comma-separated subset of {','.join(ARCHS)}")
    if task == "niah":
        sub.add_argument("--lengths", dest="gaps", type=_int_list, help="comma-separated evaluation lengths T")
        sub.add_argument("--train-lengths", dest="train_gaps", type=_int_list, help="comma-separated training lengths")
        sub.set_defaults(kv_pairs=None)
    else:
        sub.add_argument("--kv-pairs", type=_int_list, help="comma-separated numbers of KV pairs M")
        sub.add_argument("--gaps", type=_int_list, help="comma-separated evaluation gaps G")
        sub.add_argument("--train-gaps", type=_train_gaps,
                         help="comma-separated training gaps (one model per arch and M), or 'each' (one model per cell)")
    sub.add_argument("--steps", type=int, help="training steps per model (at most: early stopping may end sooner)")
    sub.add_argument("--batch-size", type=int, help="global batch size")
    sub.add_argument("--lr", type=_float_list,
                     help="comma-separated peak learning rates: the first seed trains one model per rate and keeps "
                          "the best on held-out data of its training lengths; later seeds reuse it")
    sub.add_argument("--seeds", type=_int_list,
                     help="comma-separated seeds (initialisation and data); one model per seed and cell, tables "
                          "report mean and min–max")
    sub.add_argument("--ska-power", type=int, help="SKA power-filter order K")
    sub.add_argument("--ska-chunk-size", type=int, help="SKA chunk size S")
    sub.add_argument("--tp", type=int, help="tensor-parallel size (torchrun world size must be a multiple)")
    sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override any preset field, e.g. --set hidden_size=32 --set early_stop=0")
    again = sub.add_mutually_exclusive_group()
    again.add_argument("--force", action="store_true", help="delete an existing results directory and start over")
    again.add_argument("--resume", action="store_true", help="continue an existing results directory (same config)")
    again.add_argument("--rewrite-tables", action="store_true",
                       help="no training: rewrite results.md and results.png of --out from its results.json and "
                            "runs.json with this version's tables and plot (results.json is left as it is)")
    again.add_argument("--merge", type=lambda text: [p for p in text.split(",") if p], metavar="DIR,DIR[,...]",
                       help="no training: write to the new directory --out one table and plot of these results "
                            "directories (same settings, different architectures or seeds; each keeps its commit)")
    sub.add_argument("--threads", type=_positive_int,
                     help="CPU intra-op threads per process (default: $OMP_NUM_THREADS, else 1)")
    sub.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub.set_defaults(func=_mqar, parser=sub)


def build_parser() -> argparse.ArgumentParser:
    from echo_megatron.serve.command import add_generate_parser
    from echo_megatron.tasks.mqar_benchmark import NIAH_PRESETS, PRESETS

    parser = argparse.ArgumentParser(prog="echo-megatron", description="Spectral Koopman Attention for Megatron-Core.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    mqar = commands.add_parser(
        "mqar", help="multi-query associative recall benchmark: Mamba-2 vs Mamba-2 + attention vs Mamba-2 + SKA",
        description="Train and evaluate the architectures on the MQAR grid (SPEC §10). Flags override the preset.",
    )
    _add_benchmark_arguments(mqar, PRESETS, "mqar")
    niah = commands.add_parser(
        "niah", help="needle in a haystack: train at one length, evaluate at longer ones (paper Table 2)",
        description="One (key, value) needle in filler (values and noise), queried at the end; train at T = 64 and "
                    "evaluate at longer T. Same outputs as mqar. Flags override the preset.",
    )
    _add_benchmark_arguments(niah, NIAH_PRESETS, "niah")
    _add_preprocess(commands)

    patch = commands.add_parser(
        "patch-megatron", help="apply our fixes (patches/) to the installed megatron-core 0.19.2",
        description="Apply the .patch files shipped in patches/ to the installed megatron-core (0.19.2 only; "
                    "idempotent, all-or-nothing). Exit status of --check: 0 when every patch is applied, 1 otherwise.",
    )
    mode = patch.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="report each patch's state; change nothing")
    mode.add_argument("--revert", action="store_true", help="restore megatron-core's original files")
    patch.set_defaults(func=_patch_megatron, parser=patch)
    _add_hf_parsers(commands)
    _add_passkey_parser(commands)
    add_generate_parser(commands)
    return parser


def _passkey(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`passkey` (echo_megatron.tasks.passkey)."""
    from echo_megatron.tasks.passkey import FILLER, PasskeySettings, load_causal_lm, run_passkey, write_report

    try:
        filler = Path(args.filler).read_text() if args.filler else FILLER
        settings = PasskeySettings(lengths=args.lengths, depths=args.depths, trials=args.trials, digits=args.digits,
                                   filler=filler, seed=args.seed)
        model, tokenizer = load_causal_lm(args.hf, device=args.device, dtype=args.dtype)
        result = run_passkey(model, tokenizer, settings)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    paths = write_report(result, args.output_dir)
    print(result.table())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _add_passkey_parser(commands) -> None:
    passkey = commands.add_parser(
        "passkey", help="passkey retrieval of a pretrained causal LM: accuracy by context length x needle depth",
        description="A number hidden at a chosen depth in filler text, asked for at the end, greedy decoding, on any "
                    "directory transformers loads (echo_hybrid exports and stock models). Writes passkey.md (table), "
                    "passkey.json and passkey.png (heat-map) to --output-dir.",
    )
    passkey.add_argument("--hf", required=True, help="Hugging Face model directory (with its tokenizer)")
    passkey.add_argument("--lengths", type=_int_list, default=(256, 512, 1024), help="prompt lengths in tokens")
    passkey.add_argument("--depths", type=_float_list, default=(0.0, 0.25, 0.5, 0.75, 1.0),
                         help="needle depths, fractions of the filler in [0, 1]")
    passkey.add_argument("--trials", type=int, default=5, help="prompts per (length, depth) cell")
    passkey.add_argument("--digits", type=int, default=5, help="digits of the pass key")
    passkey.add_argument("--filler", help="text file whose words fill the context (default: the classic sentences)")
    passkey.add_argument("--seed", type=int, default=0)
    passkey.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    passkey.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    passkey.add_argument("--output-dir", default="passkey_results", help="where the table and heat-map go")
    passkey.set_defaults(func=_passkey, parser=passkey)


def _convert_hf(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`export-hf` and `import-hf` (echo_megatron.hf): conversion errors are reported, never half-written."""
    from echo_megatron.hf import ConversionError, export_checkpoint, import_checkpoint

    try:
        if args.command == "export-hf":
            config = export_checkpoint(args.ckpt_dir, args.out_dir, iteration=args.iteration, dtype=args.dtype,
                                       tokenizer=args.tokenizer, force=args.force)
            message = f"wrote a {config.model_type} model ({config.num_hidden_layers} layers) to {args.out_dir}"
        else:
            import_checkpoint(args.hf_dir, args.ckpt_dir, force=args.force)
            message = f"wrote a torch_dist checkpoint to {args.ckpt_dir} (load it with --load, any TP size)"
    except ConversionError as error:
        print(f"echo-megatron {args.command}: error: {error}", file=sys.stderr)
        return 1
    print(message)
    return 0


def _add_hf_parsers(commands) -> None:
    """`export-hf` and `import-hf` (echo_megatron.hf)."""
    export = commands.add_parser(
        "export-hf", help="convert a Megatron torch_dist checkpoint to a Hugging Face model directory",
        description="Megatron checkpoint (echo_megatron.pretrain) -> Hugging Face directory: stock nemotron_h for "
                    "softmax/MLP stacks, echo_hybrid (trust_remote_code or `import echo_megatron.hf`) otherwise.",
    )
    export.add_argument("ckpt_dir", help="Megatron checkpoint directory (with latest_checkpointed_iteration.txt)")
    export.add_argument("out_dir", help="output directory (must not exist or be empty, unless --force)")
    export.add_argument("--iteration", type=int, help="iteration to export (default: the latest)")
    export.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="weights dtype (default: the checkpoint's)")
    export.add_argument("--tokenizer", help="tokenizer directory to copy (AutoTokenizer.from_pretrained(OUT_DIR))")
    back = commands.add_parser(
        "import-hf", help="convert an exported Hugging Face directory back to a Megatron torch_dist checkpoint",
        description="Hugging Face directory (nemotron_h or echo_hybrid) -> Megatron 'release' checkpoint that "
                    "echo_megatron.pretrain loads with --load at any tensor-parallel size.",
    )
    back.add_argument("hf_dir", help="Hugging Face model directory")
    back.add_argument("ckpt_dir", help="output checkpoint directory (must not exist or be empty, unless --force)")
    for command in (export, back):
        command.add_argument("--force", action="store_true", help="replace a non-empty output directory")
        command.set_defaults(func=_convert_hf, parser=command)


def main(argv: list[str] | None = None) -> int:
    # Megatron-Core announces at import time every optional GPU package it does not find.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args, args.parser)


if __name__ == "__main__":
    sys.exit(main())
