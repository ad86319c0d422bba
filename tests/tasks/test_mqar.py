"""MQAR generators (SPEC §10): layout, label positions, vocabulary ranges, determinism, chance."""

import numpy as np
import pytest
import torch

from echo_megatron.tasks import IGNORE_INDEX, paper_grid, score, zoology
from echo_megatron.tasks.mqar import expected_max_count, paper_grid_floor


@pytest.mark.parametrize("kv_pairs,gap", [(1, 0), (4, 5), (8, 64), (32, 17)])
def test_paper_grid_layout_and_labels(kv_pairs, gap):
    n, m = 64, kv_pairs
    data = paper_grid(n, m, gap, seed=3)
    ids, labels = data.input_ids, data.labels
    assert ids.dtype == labels.dtype == torch.int64
    assert ids.shape == labels.shape == (n, 4 * m + gap) and data.metadata["seq_len"] == 4 * m + gap
    keys, values = ids[:, 0 : 2 * m : 2], ids[:, 1 : 2 * m : 2]
    noise, queries = ids[:, 2 * m : 2 * m + gap], ids[:, 2 * m + gap :]
    assert ((0 <= keys) & (keys < 32)).all() and ((32 <= values) & (values < 64)).all()
    assert ((64 <= noise) & (noise < 128)).all()
    assert all(len(set(row.tolist())) == m for row in keys), "keys must be distinct within a sequence"
    # The query block repeats the context pairs, each exactly once, in some order.
    context_pairs = [sorted(zip(k.tolist(), v.tolist())) for k, v in zip(keys, values)]
    query_pairs = [sorted(zip(q[0::2].tolist(), q[1::2].tolist())) for q in queries]
    assert context_pairs == query_pairs
    # Scored exactly at the query keys; the target is the token that follows (the bound value).
    scored = labels != IGNORE_INDEX
    expected = torch.zeros_like(scored)
    expected[:, 2 * m + gap :: 2] = True
    assert torch.equal(scored, expected)
    assert torch.equal(labels[:, 2 * m + gap :: 2], queries[:, 1::2])


def test_paper_grid_query_order_is_random():
    m = 8
    data = paper_grid(200, m, 4, seed=0)
    keys, query_keys = data.input_ids[:, 0 : 2 * m : 2], data.input_ids[:, 2 * m + 4 :: 2]
    assert (keys != query_keys).any(dim=1).float().mean() > 0.9


@pytest.mark.parametrize("make", [lambda s: paper_grid(32, 4, 9, seed=s), lambda s: zoology(32, 64, 4, seed=s, vocab_size=256)])
def test_deterministic_by_seed(make):
    a, b, c = make(7), make(7), make(8)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.input_ids, c.input_ids)
    # Sequence seeds give independent, reproducible streams.
    d, e = paper_grid(8, 4, 9, seed=(7, 1)), paper_grid(8, 4, 9, seed=(7, 2))
    assert torch.equal(d.input_ids, paper_grid(8, 4, 9, seed=(7, 1)).input_ids)
    assert not torch.equal(d.input_ids, e.input_ids)


def _binomial_tolerance(p: float, n: int) -> float:
    return 5 * (p * (1 - p) / n) ** 0.5


@pytest.mark.parametrize("token", [32, 47, 63])
def test_paper_grid_constant_predictor_scores_chance(token):
    data = paper_grid(4000, 8, 3, seed=11)
    correct, scored = score(torch.full_like(data.input_ids, token), data.labels)
    assert scored == 4000 * 8
    chance = data.metadata["chance"]
    assert chance == 1 / 32
    assert abs(correct / scored - chance) < _binomial_tolerance(chance, scored)


def test_zoology_constant_predictor_scores_chance():
    data = zoology(4000, 64, 8, seed=5, vocab_size=128)
    correct, scored = score(torch.full_like(data.input_ids, 100), data.labels)
    chance = data.metadata["chance"]
    assert chance == 1 / 64 and scored == 4000 * 8
    assert abs(correct / scored - chance) < _binomial_tolerance(chance, scored)


def test_score_counts_only_scored_positions():
    labels = torch.tensor([[IGNORE_INDEX, 5, IGNORE_INDEX, 7], [3, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    predictions = torch.tensor([[1, 5, 9, 0], [3, 2, 2, 2]])
    assert score(predictions, labels) == (2, 3)
    with pytest.raises(ValueError, match="shape"):
        score(predictions[:, :3], labels)


@pytest.mark.parametrize("random_non_queries", [True, False])
def test_zoology_layout_and_labels(random_non_queries):
    n, t, m, v = 200, 96, 6, 512
    data = zoology(n, t, m, seed=2, vocab_size=v, random_non_queries=random_non_queries)
    ids, labels = data.input_ids, data.labels
    assert ids.shape == labels.shape == (n, t)
    assert ((0 <= ids) & (ids < v)).all()
    keys, values = ids[:, 0 : 2 * m : 2], ids[:, 1 : 2 * m : 2]
    assert ((1 <= keys) & (keys < v // 2)).all() and ((v // 2 <= values) & (values < v)).all()
    for row in range(n):
        assert len(set(keys[row].tolist())) == m and len(set(values[row].tolist())) == m
        scored = (labels[row] != IGNORE_INDEX).nonzero().flatten()
        assert len(scored) == m
        assert (scored >= 2 * m).all() and ((scored - 2 * m) % 2 == 0).all()
        # Each key is queried exactly once, and its label is its own value.
        binding = dict(zip(keys[row].tolist(), values[row].tolist()))
        assert sorted(ids[row, scored].tolist()) == sorted(binding)
        assert [binding[k] for k in ids[row, scored].tolist()] == labels[row, scored].tolist()
        if not random_non_queries:
            filler = torch.ones(t, dtype=torch.bool)
            filler[: 2 * m] = False
            filler[scored] = False
            assert (ids[row, filler] == 0).all()


def test_zoology_gaps_follow_the_power_law():
    """With one pair the query slot is a single draw: its histogram must match p(g) ∝ g^(a-1)."""
    n, t, a = 40000, 42, 0.5
    data = zoology(n, t, 1, seed=9, vocab_size=64, power_a=a)
    slots = ((data.labels != IGNORE_INDEX).nonzero()[:, 1] - 2) // 2
    space = (t - 2) // 2
    p = np.arange(1, space + 1) ** (a - 1.0)
    p /= p.sum()
    freq = np.bincount(slots.numpy(), minlength=space) / n
    assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / n) + 1e-9)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: paper_grid(0, 4, 4, seed=0), "num_examples"),
        (lambda: paper_grid(4, 0, 4, seed=0), "kv_pairs"),
        (lambda: paper_grid(4, 33, 4, seed=0), "kv_pairs"),
        (lambda: paper_grid(4, 4, -1, seed=0), "gap"),
        (lambda: paper_grid(4, 4, 4, seed=0, vocab_size=130), "vocab_size"),
        (lambda: paper_grid(4, 4, 4, seed=-1), "seed"),
        (lambda: paper_grid(4, 4, 4, seed=()), "seed"),
        (lambda: zoology(4, 63, 4, seed=0), "seq_len"),
        (lambda: zoology(4, 64, 17, seed=0), "kv_pairs"),
        (lambda: zoology(4, 64, 4, seed=0, vocab_size=64), "vocab_size"),
        (lambda: zoology(4, 64, 4, seed=0, power_a=0.0), "power_a"),
    ],
)
def test_bad_arguments_name_the_parameter(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _answer_an_unasked_context_value(ids: torch.Tensor, labels: torch.Tensor, kv_pairs: int) -> torch.Tensor:
    """A scripted predictor that never binds keys to values: at each query it answers the most
    frequent context value among those not yet revealed in the query block (ties: smallest id)."""
    predictions = torch.full_like(ids, -1)
    for row in range(ids.shape[0]):
        remaining = ids[row, 1 : 2 * kv_pairs : 2].tolist()
        for pos in (labels[row] != IGNORE_INDEX).nonzero().flatten().tolist():
            predictions[row, pos] = max(sorted(set(remaining)), key=remaining.count)
            remaining.remove(int(ids[row, pos + 1]))  # the answer is revealed as the next input token
    return predictions


@pytest.mark.parametrize("kv_pairs", [2, 8])
def test_paper_grid_no_binding_floor_is_reached_by_an_unasked_value_predictor(kv_pairs):
    data = paper_grid(3000, kv_pairs, 5, seed=21)
    floor = data.metadata["floor"]
    correct, scored = score(_answer_an_unasked_context_value(data.input_ids, data.labels, kv_pairs), data.labels)
    assert abs(correct / scored - floor) < _binomial_tolerance(floor, scored)
    assert floor > 10 * data.metadata["chance"]


def test_floor_closed_forms():
    # Distinct values (infinitely many value tokens): H_M / M.
    assert paper_grid_floor(8, 10**7) == pytest.approx(sum(1 / k for k in range(1, 9)) / 8, abs=1e-6)
    assert paper_grid_floor(1) == 1.0
    assert expected_max_count(3, 2) == pytest.approx(2.25)  # counts (3,0) w.p. 1/4, (2,1) w.p. 3/4
    assert expected_max_count(2, 32) == pytest.approx(1 + 1 / 32)
    assert zoology(10, 64, 8, seed=0, vocab_size=128).metadata["floor"] == 1 / 8


def test_cpu_preset_queries_never_read_their_own_ska_chunk():
    """Every scored query of the CPU preset sits in a later SKA chunk than the pair it asks for (SPEC §3)."""
    from echo_megatron.tasks.mqar_benchmark import CPU_PRESET

    (kv_pairs,), chunk = CPU_PRESET.kv_pairs, CPU_PRESET.ska_chunk_size
    for gap in (*CPU_PRESET.train_gaps, *CPU_PRESET.eval_gaps):
        data = paper_grid(16, kv_pairs, gap, seed=gap)
        for row in range(16):
            context_pos = {int(k): i for i, k in enumerate(data.input_ids[row, 0 : 2 * kv_pairs : 2].tolist())}
            for pos in (data.labels[row] != IGNORE_INDEX).nonzero().flatten().tolist():
                value_pos = 2 * context_pos[int(data.input_ids[row, pos])] + 1
                assert value_pos // chunk < pos // chunk
