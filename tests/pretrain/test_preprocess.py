"""`echo-megatron preprocess`: a tokenizer trained offline with `tokenizers`, a tiny corpus, Megatron's
`IndexedDataset` read back and compared with direct `transformers.AutoTokenizer` tokenisation; bad lines
name FILE:LINE and leave no files behind."""

import json

import numpy
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from megatron.core.datasets.indexed_dataset import IndexedDataset

from echo_megatron.cli import main
from echo_megatron.pretrain.preprocess import PreprocessError, preprocess

TEXTS = [f"document {i}: the quick brown fox jumps over {i % 7} lazy dogs; café naïve" * (1 + i % 3)
         for i in range(150)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A 300-token BPE (whitespace pre-tokenizer) trained on TEXTS, saved in AutoTokenizer's format."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"]))
    path = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", eos_token="<eos>").save_pretrained(path)
    return path


def write_corpus(path, texts, bad_line: str | None = None, bad_at: int = 3):
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)]
    lines.insert(10, "")  # a blank line is skipped
    if bad_line is not None:
        lines.insert(bad_at - 1, bad_line)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("workers, append_eod", [(1, False), (2, True)])
def test_round_trip_equals_direct_tokenisation(tmp_path, tokenizer_dir, workers, append_eod):
    corpus = write_corpus(tmp_path / "corpus.jsonl", TEXTS + [""])  # an empty document is skipped too
    result = preprocess(corpus, tokenizer_dir, str(tmp_path / "out" / "corpus"), workers=workers,
                        append_eod=append_eod, progress=False)
    assert result.prefix == str(tmp_path / "out" / "corpus_text_document")
    assert (result.documents, result.skipped) == (len(TEXTS), 2)

    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    expected = [hf(t)["input_ids"] + ([hf.eos_token_id] if append_eod else []) for t in TEXTS]
    dataset = IndexedDataset(result.prefix)
    assert len(dataset) == len(TEXTS) and dataset.index.dtype == numpy.uint16
    assert [dataset[i].tolist() for i in range(len(dataset))] == expected
    assert result.tokens == sum(map(len, expected))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["corpus_text_document.bin",
                                                                    "corpus_text_document.idx"]


def test_cli_and_json_key(tmp_path, tokenizer_dir, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"body": t}) for t in TEXTS[:5]) + "\n")
    assert main(["preprocess", "--input", str(corpus), "--tokenizer", str(tokenizer_dir), "--output-prefix",
                 str(tmp_path / "c"), "--json-key", "body", "--append-eod", "--no-progress"]) == 0
    assert f"--data-path {tmp_path / 'c_body_document'}" in capsys.readouterr().out
    assert len(IndexedDataset(str(tmp_path / "c_body_document"))) == 5


@pytest.mark.parametrize("bad_line, message", [
    ('{"text": "unterminated', "not valid JSON"),
    ('["a", "list"]', "expected a JSON object, got list"),
    ('{"title": "no text"}', "no key 'text'"),
    ('{"text": 42}', "'text' must be a string, got int"),
])
@pytest.mark.parametrize("workers", [1, 2])
def test_bad_line_names_file_and_line_and_leaves_nothing(tmp_path, tokenizer_dir, bad_line, message, workers):
    corpus = write_corpus(tmp_path / "corpus.jsonl", TEXTS, bad_line, bad_at=97)
    out = tmp_path / "out"
    with pytest.raises(PreprocessError, match=rf"corpus\.jsonl:97: {message}"):
        preprocess(corpus, tokenizer_dir, str(out / "corpus"), workers=workers, progress=False)
    assert list(out.iterdir()) == []


def test_failed_run_keeps_an_earlier_dataset(tmp_path, tokenizer_dir, capsys):
    good = write_corpus(tmp_path / "good.jsonl", TEXTS[:4])
    prefix = str(tmp_path / "corpus")
    first = preprocess(good, tokenizer_dir, prefix, progress=False)
    before = {p: open(p, "rb").read() for p in (first.bin_path, first.idx_path)}
    bad = write_corpus(tmp_path / "bad.jsonl", TEXTS, "not json", bad_at=120)
    code = main(["preprocess", "--input", str(bad), "--tokenizer", str(tokenizer_dir), "--output-prefix", prefix,
                 "--no-progress"])
    assert code == 1 and "bad.jsonl:120: not valid JSON" in capsys.readouterr().err
    assert {p: open(p, "rb").read() for p in before} == before
    assert sorted(p.name for p in tmp_path.glob("corpus*")) == ["corpus_text_document.bin", "corpus_text_document.idx"]


def test_bad_arguments(tmp_path, tokenizer_dir):
    corpus = write_corpus(tmp_path / "c.jsonl", TEXTS[:2])
    with pytest.raises(PreprocessError, match="--input"):
        preprocess(tmp_path / "missing.jsonl", tokenizer_dir, str(tmp_path / "x"))
    with pytest.raises(PreprocessError, match="--tokenizer"):
        preprocess(corpus, tmp_path / "no-tokenizer", str(tmp_path / "x"))
    with pytest.raises(PreprocessError, match="--workers"):
        preprocess(corpus, tokenizer_dir, str(tmp_path / "x"), workers=0)


@pytest.mark.multiproc
def test_launcher_trains_on_the_preprocessed_corpus(tmp_path, tokenizer_dir):
    """The real data path: corpus -> `echo-megatron preprocess` (BPE trained offline) -> the launcher on the
    indexed dataset with Megatron's HuggingFaceTokenizer; the loss falls on this repetitive corpus."""
    from tests.pretrain.launch import TINY, launch, losses

    corpus = write_corpus(tmp_path / "corpus.jsonl", TEXTS)
    result = preprocess(corpus, tokenizer_dir, str(tmp_path / "data" / "corpus"), append_eod=True, progress=False)
    flags = [flag for flag in TINY if flag != "--mock-data"]
    trace = losses(launch([*flags, "--train-iters", "6", "--data-path", result.prefix, "--split", "100,0,0",
                           "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer_dir)]).stdout)
    assert sorted(trace) == list(range(1, 7)) and trace[6] < trace[1] - 1.0, trace
