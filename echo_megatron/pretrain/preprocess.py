"""`echo-megatron preprocess`: a JSON-lines corpus → Megatron's indexed dataset for `--data-path`.

Megatron-LM's `tools/preprocess_data.py` is not in the megatron-core wheel; this is its document-level
equivalent on the same pieces: Megatron's `build_tokenizer` (`HuggingFaceTokenizer` from a local
directory, as `--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR` loads it for training) and
`megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder`. Output: `PREFIX_{json_key}_document.bin`
and `.idx` (Megatron-LM's naming; pass `PREFIX_text_document` to `--data-path`), one document per
non-empty line, token dtype uint16 below 65,500 tokens of vocabulary, else int32.

Lines are tokenised by `workers` processes in input order. A bad line (not JSON, not an object, no
`json_key`, a non-string value) stops the run with `FILE:LINE` in the error; both outputs are written
under temporary names and renamed only when complete, so a failed run leaves nothing behind (and an
earlier dataset at the same prefix untouched). Blank lines and documents that tokenise to nothing are
skipped and counted.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import types
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_bin_path, get_idx_path
from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

LINES_PER_TASK = 64  # lines a worker tokenises per round trip


class PreprocessError(ValueError):
    """Bad input or arguments for `preprocess`; the message names the file (and line)."""


@dataclass(frozen=True)
class PreprocessResult:
    """What `preprocess` wrote: the dataset prefix for `--data-path`, its two files and counts."""

    prefix: str
    bin_path: str
    idx_path: str
    documents: int
    tokens: int
    skipped: int


def load_tokenizer(directory: str | os.PathLike):
    """Megatron's `HuggingFaceTokenizer` for a local directory (as `--tokenizer-type HuggingFaceTokenizer
    --tokenizer-model DIR` builds it), via `megatron.core.tokenizers.utils.build_tokenizer`."""
    if not Path(directory).is_dir():
        raise PreprocessError(f"--tokenizer must be a directory loadable by transformers.AutoTokenizer, "
                              f"got {str(directory)!r}")
    args = types.SimpleNamespace(  # the TokenizerConfig fields build_tokenizer reads for HuggingFaceTokenizer
        tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(directory), chat_template=None,
        vocab_file=None, merge_file=None, special_tokens=None, tokenizer_hf_no_use_fast=False,
        trust_remote_code=False, tokenizer_hf_no_include_special_tokens=False, metadata_path=None,
        pad_vocab_size=False,
    )
    return build_tokenizer(args)


class _Encoder:
    """Tokenises numbered JSON lines; one per process (the tokenizer is built on first use)."""

    def __init__(self, source: str, tokenizer_dir: str, json_key: str, append_eod: bool):
        self.source, self.tokenizer_dir, self.json_key, self.append_eod = source, tokenizer_dir, json_key, append_eod
        self.tokenizer = None

    def text(self, number: int, line: str) -> str | None:
        """The document text of input line `number` (None for a blank line)."""
        if not line.strip():
            return None
        where = f"{self.source}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise PreprocessError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise PreprocessError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if self.json_key not in record:
            raise PreprocessError(f"{where}: no key {self.json_key!r} (keys: {', '.join(map(repr, record))}); "
                                  f"choose one with --json-key")
        text = record[self.json_key]
        if not isinstance(text, str):
            raise PreprocessError(f"{where}: {self.json_key!r} must be a string, got {type(text).__name__}")
        return text

    def __call__(self, lines: list[tuple[int, str]]) -> list[list[int]]:
        """Token ids of each line; [] for a line to skip."""
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_dir)
        documents = []
        for number, line in lines:
            text = self.text(number, line)
            ids = list(self.tokenizer.tokenize(text)) if text else []
            if ids and self.append_eod:
                ids.append(self.tokenizer.eod)
            documents.append(ids)
        return documents


def _batches(lines: Iterable[str]) -> Iterator[list[tuple[int, str]]]:
    numbered = enumerate(lines, start=1)
    while batch := list(islice(numbered, LINES_PER_TASK)):
        yield batch


def _line_count(path: Path) -> int:
    with path.open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def preprocess(
    input_path: str | os.PathLike, tokenizer_dir: str | os.PathLike, output_prefix: str, *,
    json_key: str = "text", workers: int = 1, append_eod: bool = False, progress: bool = True,
) -> PreprocessResult:
    """Tokenise the JSON lines of `input_path` (field `json_key`) into `output_prefix_{json_key}_document`.

    workers: tokenising processes (1: this process). append_eod: end every document with the
    tokenizer's end-of-document id. progress: a tqdm bar on stderr (lines read).
    """
    source = Path(input_path)
    if not source.is_file():
        raise PreprocessError(f"--input must be an existing JSON-lines file, got {str(input_path)!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise PreprocessError(f"--workers must be an int >= 1, got {workers!r}")
    tokenizer = load_tokenizer(tokenizer_dir)
    if append_eod and tokenizer.eod is None:
        raise PreprocessError(f"--append-eod: the tokenizer in {str(tokenizer_dir)!r} has no end-of-document "
                              "(eos) token")
    prefix = f"{output_prefix}_{json_key}_document"
    bin_path, idx_path = get_bin_path(prefix), get_idx_path(prefix)
    Path(bin_path).parent.mkdir(parents=True, exist_ok=True)
    suffix = f".tmp-{os.getpid()}"
    encoder = _Encoder(str(source), str(tokenizer_dir), json_key, append_eod)
    documents = tokens = skipped = 0
    builder = None
    try:
        builder = IndexedDatasetBuilder(bin_path + suffix, dtype=DType.optimal_dtype(tokenizer.vocab_size))
        with source.open(encoding="utf-8") as lines, _bar(_line_count(source), progress) as bar:
            pool = multiprocessing.Pool(workers) if workers > 1 else None
            try:
                encoded = pool.imap(encoder, _batches(lines)) if pool else map(encoder, _batches(lines))
                for batch in encoded:
                    for ids in batch:
                        if ids:
                            builder.add_document(ids, [len(ids)])
                            documents, tokens = documents + 1, tokens + len(ids)
                        else:
                            skipped += 1
                    bar.update(len(batch))
            finally:
                if pool:
                    pool.terminate()
        builder.finalize(idx_path + suffix)
        os.replace(bin_path + suffix, bin_path)
        os.replace(idx_path + suffix, idx_path)
    finally:
        if builder is not None and not builder.data_file.closed:
            builder.data_file.close()
        for temporary in (bin_path + suffix, idx_path + suffix):
            Path(temporary).unlink(missing_ok=True)
    return PreprocessResult(prefix, bin_path, idx_path, documents, tokens, skipped)


def _bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit=" lines", disable=not enabled, desc="preprocess")
