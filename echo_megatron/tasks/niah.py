"""Needle in a haystack (NIAH) data for length generalisation (the paper's Table 2).

One (key, value) needle at a random depth in filler tokens; the key is queried as the last token and
the target is its value. Vocabulary in quarters as in MQAR (V = 128): keys [0, 32), values [32, 64),
noise [64, 128). The filler is drawn uniformly from values *and* noise, so value tokens also appear
as distractors: a model cannot answer by copying "the only value token in the context", it has to
bind the value to the key. The needle key appears nowhere else.

The needle lies entirely before the SKA chunk holding the query (``chunk_size``), so the task never
asks SKA to read its own chunk (SPEC §3); its depth (position of the key) is uniform over
``[0, last_chunk_start - 2]`` with ``last_chunk_start = ⌊(T-1)/S⌋·S``.

No-binding floor: a predictor that cannot bind sees the value tokens of the context, one of which
(uniformly, by symmetry) is the needle's; its best guess is the most frequent one, right with
probability max-count / number of value tokens. :func:`niah_floor` averages that over generated
sequences (a deterministic Monte-Carlo estimate; its standard error is returned too). The floor falls
with T (more distractor values): ≈ 0.12 at T = 64.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from echo_megatron.tasks.mqar import IGNORE_INDEX, PAPER_VOCAB_SIZE, MQARData, Seed, _check_int, _rng

FLOOR_TOKENS = 4_000_000  # Monte-Carlo budget of niah_floor: max(2000, FLOOR_TOKENS // T) sequences


def needle_depth_range(seq_len: int, chunk_size: int) -> int:
    """Number of allowed needle depths: the key at 0 … n-1 keeps key and value before the query's chunk."""
    last_chunk_start = (seq_len - 1) // chunk_size * chunk_size
    return last_chunk_start - 1


def niah(num_examples: int, seq_len: int, seed: Seed, *, chunk_size: int = 16,
         vocab_size: int = PAPER_VOCAB_SIZE) -> MQARData:
    """``num_examples`` NIAH sequences of ``seq_len`` tokens; the last position is scored.

    Layout: filler, ``key value`` at depth d, filler, ``key`` (position T-1, label = value).
    """
    _check_int("num_examples", num_examples, 1)
    _check_int("chunk_size", chunk_size, 1)
    _check_int("vocab_size", vocab_size, 4)
    if vocab_size % 4:
        raise ValueError(f"vocab_size must be divisible by 4 (quarters: keys, values, noise), got {vocab_size}")
    _check_int("seq_len", seq_len, 3)
    depths = needle_depth_range(seq_len, chunk_size)
    if depths < 1:
        raise ValueError(f"seq_len must leave room for the needle before the query's chunk: seq_len {seq_len} "
                         f"with chunk_size {chunk_size}: needs seq_len > chunk_size")
    quarter = vocab_size // 4
    rng = _rng(seed)
    n = num_examples
    ids = rng.integers(quarter, vocab_size, size=(n, seq_len))  # filler: values and noise
    keys = rng.integers(0, quarter, size=n)
    values = rng.integers(quarter, 2 * quarter, size=n)
    depth = rng.integers(0, depths, size=n)
    rows = np.arange(n)
    ids[rows, depth] = keys
    ids[rows, depth + 1] = values
    ids[:, -1] = keys
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    labels[:, -1] = values
    metadata = {
        "generator": "niah", "num_examples": n, "seq_len": seq_len, "chunk_size": chunk_size,
        "vocab_size": vocab_size, "depth": depth.tolist(), "key_range": [0, quarter],
        "value_range": [quarter, 2 * quarter], "filler_range": [quarter, vocab_size], "chance": 1.0 / quarter,
        "floor": niah_floor(seq_len, chunk_size, vocab_size)[0],
    }
    return MQARData(torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(labels), metadata)


def no_binding_accuracy(ids: torch.Tensor, vocab_size: int = PAPER_VOCAB_SIZE) -> torch.Tensor:
    """Per sequence: probability that "the most frequent value token of the context" is the answer.

    ids [N, T] (the query key last) -> [N] = max count / number of value tokens in ids[:, :-1].
    """
    quarter = vocab_size // 4
    context = ids[:, :-1]
    is_value = (context >= quarter) & (context < 2 * quarter)
    counts = torch.zeros(ids.shape[0], vocab_size, dtype=torch.long).scatter_add_(1, context, is_value.long())
    return counts.max(dim=1).values.double() / is_value.sum(dim=1).double()


@lru_cache(maxsize=None)
def niah_floor(seq_len: int, chunk_size: int = 16, vocab_size: int = PAPER_VOCAB_SIZE) -> tuple[float, float]:
    """(floor, standard error): the mean of :func:`no_binding_accuracy` over generated sequences."""
    quarter = vocab_size // 4
    samples = max(2000, FLOOR_TOKENS // seq_len)
    rng = _rng((seq_len, chunk_size, vocab_size))
    # The same distribution as niah(): filler, then the needle value replaces one filler token (the key
    # and the query are not value tokens), so count the value tokens among T-3 filler tokens plus one.
    filler = torch.from_numpy(rng.integers(quarter, vocab_size, size=(samples, seq_len - 3)))
    needle = torch.from_numpy(rng.integers(quarter, 2 * quarter, size=(samples, 1)))
    ids = torch.cat([filler, needle, torch.zeros(samples, 1, dtype=torch.long)], dim=1)
    acc = no_binding_accuracy(ids, vocab_size)
    return float(acc.mean()), float(acc.std() / samples**0.5)
