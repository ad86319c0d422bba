"""NIAH generator: layout, needle outside the query's SKA chunk, uniform depth, and the no-binding floor."""

import numpy as np
import pytest
import torch

from echo_megatron.tasks import IGNORE_INDEX, score
from echo_megatron.tasks.niah import needle_depth_range, niah, niah_floor, no_binding_accuracy


@pytest.mark.parametrize("seq_len,chunk", [(64, 16), (65, 16), (200, 64), (19, 16)])
def test_layout_and_needle_outside_the_query_chunk(seq_len, chunk):
    data = niah(500, seq_len, seed=1, chunk_size=chunk)
    ids, labels = data.input_ids, data.labels
    assert ids.shape == labels.shape == (500, seq_len)
    assert torch.equal((labels != IGNORE_INDEX).nonzero()[:, 1], torch.full((500,), seq_len - 1))
    depth = torch.tensor(data.metadata["depth"])
    rows = torch.arange(500)
    query = ids[:, -1]
    assert torch.equal(ids[rows, depth], query) and torch.equal(ids[rows, depth + 1], labels[:, -1])
    assert ((query < 32) & (labels[:, -1] >= 32) & (labels[:, -1] < 64)).all()
    # The key appears exactly twice (needle and query); the filler holds values and noise only.
    assert ((ids < 32).sum(dim=1) == 2).all()
    # The needle's value lies in an earlier SKA chunk than the query.
    assert ((depth + 1) // chunk < (seq_len - 1) // chunk).all()


def test_needle_depth_is_uniform_over_the_allowed_range():
    n, seq_len, chunk = 60000, 64, 16
    depths = needle_depth_range(seq_len, chunk)
    assert depths == 47  # key at 0 … 46, value at most at 47 < 48, the query chunk's start
    freq = np.bincount(niah(n, seq_len, seed=4, chunk_size=chunk).metadata["depth"], minlength=depths) / n
    p = 1 / depths
    assert len(freq) == depths and np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / n))


@pytest.mark.parametrize("seq_len", [64, 512])
def test_most_frequent_context_value_predictor_scores_the_floor(seq_len):
    """The scripted no-binding predictor (most frequent value token of the context) scores the floor."""
    data = niah(4000, seq_len, seed=7)
    context = data.input_ids[:, :-1]
    is_value = (context >= 32) & (context < 64)
    counts = torch.zeros(4000, 128, dtype=torch.long).scatter_add_(1, context, is_value.long())
    predictions = torch.full_like(data.input_ids, -1)
    predictions[:, -1] = counts.argmax(dim=1)
    correct, scored = score(predictions, data.labels)
    floor, stderr = niah_floor(seq_len)
    assert data.metadata["floor"] == floor and stderr < 0.005
    assert correct / scored == pytest.approx(floor, abs=5 * (floor / scored) ** 0.5 + 5 * stderr)
    assert no_binding_accuracy(data.input_ids).mean() == pytest.approx(floor, abs=5 * (floor / scored) ** 0.5 + 5 * stderr)
    assert floor > data.metadata["chance"]  # above a constant guess: tables report it next to chance


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_examples=0, seq_len=64), "num_examples"),
    (dict(num_examples=2, seq_len=16), "seq_len"),
    (dict(num_examples=2, seq_len=64, chunk_size=0), "chunk_size"),
    (dict(num_examples=2, seq_len=64, vocab_size=130), "vocab_size"),
])
def test_bad_arguments_name_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        niah(seed=0, **kwargs)


@pytest.mark.parametrize("seq_len", [512, 4096])
def test_needles_span_the_haystack_at_evaluation_lengths(seq_len):
    """Length generalisation asks for long-range recall: the distance from the needle's value to the
    query is uniform over [T - 1 - last_needle_value, T - 2], i.e. up to the whole sequence."""
    n, chunk = 4000, 16
    depth = np.array(niah(n, seq_len, seed=5, chunk_size=chunk).metadata["depth"])
    distance = seq_len - 2 - depth  # value at depth + 1, query at T - 1
    count = needle_depth_range(seq_len, chunk)
    shortest, longest = seq_len - 1 - count, seq_len - 2  # distances: `count` consecutive integers
    assert distance.min() >= shortest and distance.max() <= longest
    assert longest > 0.99 * seq_len and shortest < chunk + 2
    far = longest - seq_len // 2  # distances in (T/2, T - 2]
    assert np.mean(distance > seq_len // 2) == pytest.approx(far / count, abs=5 * (0.25 / n) ** 0.5)


@pytest.mark.parametrize("name", ["cpu", "paper"])
def test_every_niah_preset_can_place_a_needle_at_its_training_length(name):
    """A preset whose SKA chunk is as long as its training sequences has no room for a needle before
    the query's chunk (the paper preset once had S = 64 at T = 64 and failed at its first batch)."""
    from echo_megatron.tasks.mqar_benchmark import NIAH_PRESETS

    preset = NIAH_PRESETS[name]
    for length in preset.train_gaps:
        data = preset.data(8, 1, length, seed=0)
        depth = torch.tensor(data.metadata["depth"])
        assert ((depth + 1) // preset.ska_chunk_size < (length - 1) // preset.ska_chunk_size).all()
