"""Multi-query associative recall (MQAR) data, SPEC §10.

Two seeded, vectorised generators (numpy ``default_rng``; no Python loop over examples):

- :func:`paper_grid` — the paper's grid. Vocabulary in quarters (V = 128: keys [0, 32), values
  [32, 64), noise [64, 128)). A sequence is M (key, value) pairs, G noise tokens, then the same M
  pairs again in a random order: ``T = 4M + G``. Only the query keys are scored (the label is the
  value that follows). Keys are distinct within a sequence; values are drawn independently and
  uniformly, so a constant guess scores chance, ``1 / (V/4)``. The query block repeats the
  values, so a model that has not bound keys to values but answers "a context value not asked
  yet" scores the higher *no-binding floor* (:func:`paper_grid_floor`, 0.387 at M = 8).
- :func:`zoology` — Zoology's ``multiquery_ar`` format (Arora et al. 2023): keys from [1, V/2),
  values from [V/2, V) (both distinct within a sequence), context ``k v k v ...``, then each key
  queried once at a power-law distributed gap (``p(g) ∝ g^(a-1)``, a = 0.01), filler from the
  whole vocabulary, label at the query position = the key's value. The distribution is Zoology's;
  the random stream is not (Zoology seeds numpy's legacy global generator; this one draws the
  power-law gaps without replacement with the Gumbel-top-k trick, which is the same distribution).

Labels are aligned with the inputs: ``labels[:, t]`` is the target for the prediction made at
position t (the next token), ``IGNORE_INDEX`` (-100) where unscored — the convention of
``torch.nn.functional.cross_entropy(ignore_index=-100)``.

``seed`` may be an int or a sequence of ints (numpy ``SeedSequence`` entropy), so callers can
derive independent streams, e.g. ``seed=(run_seed, step, gap)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from math import factorial
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100
PAPER_VOCAB_SIZE = 128
ZOOLOGY_VOCAB_SIZE = 8192

Seed = int | Sequence[int]


@dataclass(frozen=True)
class MQARData:
    """A batch of MQAR sequences.

    Attributes:
        input_ids: [N, T] int64 token ids.
        labels: [N, T] int64; the value token at scored positions, ``IGNORE_INDEX`` elsewhere.
        metadata: generator name and parameters, ``seq_len``, ``chance`` (accuracy of a
            predictor that cannot recall), token ranges.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    metadata: dict[str, Any]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [start, stop) as (input_ids, labels)."""
        return self.input_ids[start:stop], self.labels[start:stop]


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _rng(seed: Seed) -> np.random.Generator:
    entropy = [seed] if isinstance(seed, (int, np.integer)) else list(seed)
    if not entropy or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in entropy):
        raise ValueError(f"seed must be a non-negative int or a non-empty sequence of them, got {seed!r}")
    return np.random.default_rng([int(s) for s in entropy])


def _sample_without_replacement(
    rng: np.random.Generator, num_rows: int, log_weights: np.ndarray, k: int
) -> np.ndarray:
    """k distinct indices per row, drawn sequentially with probability ∝ exp(log_weights).

    Gumbel-top-k: the k largest of ``log_weights + Gumbel noise``, in decreasing order, have
    exactly the distribution of k successive draws without replacement. Returns [num_rows, k].
    """
    n = log_weights.shape[0]
    scores = log_weights[None, :] - np.log(-np.log(rng.random((num_rows, n))))
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (num_rows, 1))
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def _uniform_without_replacement(rng: np.random.Generator, num_rows: int, n: int, k: int) -> np.ndarray:
    """k distinct uniformly random indices from [0, n) per row, in random order: [num_rows, k]."""
    return _sample_without_replacement(rng, num_rows, np.zeros(n), k)


def paper_grid(
    num_examples: int, kv_pairs: int, gap: int, seed: Seed, *, vocab_size: int = PAPER_VOCAB_SIZE
) -> MQARData:
    """The paper's MQAR grid cell (M = ``kv_pairs``, G = ``gap``): ``T = 4M + G`` tokens.

    Layout: ``k1 v1 … kM vM | G noise tokens | k_π1 v_π1 … k_πM v_πM`` with π a random
    permutation; ``labels`` hold ``v_πj`` at the position of ``k_πj`` in the query block.
    ``vocab_size`` (divisible by 4) is split in quarters: keys, values, and noise in the upper half.
    """
    _check_int("num_examples", num_examples, 1)
    _check_int("kv_pairs", kv_pairs, 1)
    _check_int("gap", gap, 0)
    _check_int("vocab_size", vocab_size, 4)
    if vocab_size % 4:
        raise ValueError(f"vocab_size must be divisible by 4 (quarters: keys, values, noise), got {vocab_size}")
    quarter = vocab_size // 4
    if kv_pairs > quarter:
        raise ValueError(f"kv_pairs must be <= vocab_size/4 = {quarter} (distinct keys), got {kv_pairs}")
    rng = _rng(seed)
    n, m = num_examples, kv_pairs
    keys = _uniform_without_replacement(rng, n, quarter, m)  # [N, M] offsets in the key quarter
    values = quarter + rng.integers(0, quarter, size=(n, m))  # [N, M]
    noise = 2 * quarter + rng.integers(0, vocab_size - 2 * quarter, size=(n, gap))
    perm = _uniform_without_replacement(rng, n, m, m)  # query order

    seq_len = 4 * m + gap
    ids = np.empty((n, seq_len), dtype=np.int64)
    ids[:, 0 : 2 * m : 2] = keys
    ids[:, 1 : 2 * m : 2] = values
    ids[:, 2 * m : 2 * m + gap] = noise
    query_start = 2 * m + gap
    query_values = np.take_along_axis(values, perm, axis=1)
    ids[:, query_start::2] = np.take_along_axis(keys, perm, axis=1)
    ids[:, query_start + 1 :: 2] = query_values
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    labels[:, query_start::2] = query_values
    metadata = {
        "generator": "paper_grid",
        "num_examples": n,
        "kv_pairs": m,
        "gap": gap,
        "seq_len": seq_len,
        "vocab_size": vocab_size,
        "key_range": [0, quarter],
        "value_range": [quarter, 2 * quarter],
        "noise_range": [2 * quarter, vocab_size],
        "chance": 1.0 / quarter,
        "floor": paper_grid_floor(m, quarter),
    }
    return MQARData(torch.from_numpy(ids), torch.from_numpy(labels), metadata)


def zoology(
    num_examples: int,
    seq_len: int,
    kv_pairs: int,
    seed: Seed,
    *,
    vocab_size: int = ZOOLOGY_VOCAB_SIZE,
    power_a: float = 0.01,
    random_non_queries: bool = True,
) -> MQARData:
    """Zoology's ``multiquery_ar``: T = ``seq_len`` (even), M = ``kv_pairs``.

    Context ``k1 v1 … kM vM`` (keys distinct from [1, V/2), values distinct from [V/2, V)); in
    the remaining ``seq_len - 2M`` tokens, key j is placed at offset ``2·g_j`` with the M distinct
    slots g drawn ∝ ``g^(power_a - 1)``; its label (same position) is v_j. Every other position is
    filler: random tokens from [0, V) if ``random_non_queries`` else 0.
    """
    _check_int("num_examples", num_examples, 1)
    _check_int("seq_len", seq_len, 2)
    _check_int("kv_pairs", kv_pairs, 1)
    _check_int("vocab_size", vocab_size, 4)
    if seq_len % 2:
        raise ValueError(f"seq_len must be even, got {seq_len}")
    if vocab_size <= seq_len:
        raise ValueError(f"vocab_size must exceed seq_len (Zoology's constraint), got {vocab_size} <= {seq_len}")
    if 4 * kv_pairs > seq_len:
        raise ValueError(f"kv_pairs must be <= seq_len/4 = {seq_len // 4}, got {kv_pairs}")
    if not power_a > 0:
        raise ValueError(f"power_a must be > 0, got {power_a}")
    rng = _rng(seed)
    n, m, half = num_examples, kv_pairs, vocab_size // 2
    keys = 1 + _uniform_without_replacement(rng, n, half - 1, m)
    values = half + _uniform_without_replacement(rng, n, vocab_size - half, m)
    context = 2 * m
    space = (seq_len - context) // 2
    log_p = np.log(power_a) + (power_a - 1.0) * np.log(np.arange(1, space + 1, dtype=np.float64))
    slots = _sample_without_replacement(rng, n, log_p, m)  # [N, M] in [0, space)

    if random_non_queries:
        ids = rng.integers(0, vocab_size, size=(n, seq_len), dtype=np.int64)
    else:
        ids = np.zeros((n, seq_len), dtype=np.int64)
    ids[:, 0:context:2] = keys
    ids[:, 1:context:2] = values
    query_pos = context + 2 * slots
    np.put_along_axis(ids, query_pos, keys, axis=1)
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    np.put_along_axis(labels, query_pos, values, axis=1)
    metadata = {
        "generator": "zoology",
        "num_examples": n,
        "kv_pairs": m,
        "seq_len": seq_len,
        "vocab_size": vocab_size,
        "power_a": power_a,
        "random_non_queries": random_non_queries,
        "key_range": [1, half],
        "value_range": [half, vocab_size],
        "chance": 1.0 / (vocab_size - half),
        "floor": 1.0 / m,
    }
    return MQARData(torch.from_numpy(ids), torch.from_numpy(labels), metadata)


@lru_cache(maxsize=None)
def expected_max_count(balls: int, bins: int) -> float:
    """E[largest bin count] when ``balls`` balls fall independently and uniformly into ``bins`` bins.

    Exact up to float64 round-off: P(max ≤ c) = balls! · [x^balls] (Σ_{i≤c} x^i / i!)^bins / bins^balls
    and E[max] = Σ_{c≥0} P(max > c).
    """
    _check_int("balls", balls, 0)
    _check_int("bins", bins, 1)
    expected = 0.0
    for cap in range(balls):
        truncated = np.array([1.0 / factorial(i) for i in range(cap + 1)])
        power, base, exponent = np.ones(1), truncated, bins
        while exponent:  # truncated polynomial power by squaring; degrees above `balls` never matter
            if exponent & 1:
                power = np.convolve(power, base)[: balls + 1]
            base, exponent = np.convolve(base, base)[: balls + 1], exponent >> 1
        ways = power[balls] * factorial(balls) / float(bins) ** balls if len(power) > balls else 0.0
        expected += 1.0 - ways
    return expected


@lru_cache(maxsize=None)
def paper_grid_floor(kv_pairs: int, num_values: int = PAPER_VOCAB_SIZE // 4) -> float:
    """Best accuracy on :func:`paper_grid` without binding keys to values (the no-binding floor).

    A predictor that cannot tell which value belongs to the asked key still sees the context
    values and the values already revealed in the query block. At the j-th query (0-based) the
    answer is a uniformly random one of the ``n = M - j`` values not revealed yet (the query order
    is a random permutation), and those n values are n independent uniform draws from the
    ``num_values`` value tokens. The best guess is the most frequent of them, right with
    probability max-count / n; averaging over the M queries:

        floor(M) = (1/M) Σ_{n=1..M} E[max count of n draws from num_values] / n

    which is H_M / M when all values are distinct (0.3397 at M = 8) and slightly more with
    repeated values (0.3870 at M = 8 with 32 value tokens). A constant guess scores chance, 1 / num_values.
    """
    _check_int("kv_pairs", kv_pairs, 1)
    return sum(expected_max_count(n, num_values) / n for n in range(1, kv_pairs + 1)) / kv_pairs


def score(predictions: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, scored) of token ``predictions`` [N, T] against ``labels`` [N, T] (-100 ignored)."""
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions shape {tuple(predictions.shape)} != labels shape {tuple(labels.shape)}")
    scored = labels != IGNORE_INDEX
    return int((predictions.eq(labels) & scored).sum()), int(scored.sum())
