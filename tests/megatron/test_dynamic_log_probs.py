"""The dynamic engine at logit level: every request's prompt and generated log-probs equal a full forward over
the same tokens, on a perturbed model (per-head η and ρ, every weight moved from its initial value) in fp64.

Tolerance, from fp64: the engine returns its log-probs rounded to fp32 (Megatron's `log_softmax(...).float()`),
so in fp64 the difference is that rounding alone: measured at most 0.4 fp32 ulp of |log-prob| (the logits
themselves agree to 5e-14 at max |logit| 1.2). The same comparison in fp32 differs by up to 1.4e-5 (Mamba's
recurrent decode vs its chunked scan, SKA's step vs its chunked forward, summed in another order): rounding,
not a defect. A wrong SKA state (e.g. a later prefill piece started at chunk position 0) moves them by ~1e-2.
"""

import pytest
import torch

from megatron.core.inference.sampling_params import SamplingParams

from echo_megatron.megatron.ska_dynamic import SKASlots
from tests.hf.common import perturbed_model

from .common import VOCAB, full_logits
from .test_dynamic_inference import _engine

S = 8  # tiny_config's SKA chunk size
ULP = torch.finfo(torch.float32).eps  # the engine's log-probs are fp32: one ulp of |log-prob|


def _sampling(new_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, top_k=1, num_tokens_to_generate=new_tokens, termination_id=-1,
                          return_log_probs=True)


def _prompt(length: int, seed: int = 0) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed + length)).tolist()


@pytest.fixture(scope="module")
def model(model_parallel_tp1):
    """Perturbed tiny M*M- SKA hybrid (S = 8) in fp64; the engine's Mamba and SKA slots follow params_dtype."""
    model = perturbed_model("ska").double()
    model.config.params_dtype = torch.float64
    return model


@torch.no_grad()
def assert_log_probs_match_full_forward(model, records, unchecked: tuple[int, ...] = ()) -> None:
    """Each record's prompt log-probs (tokens 1..) and generated log-probs == log_softmax of a full fp64
    forward over prompt + generated tokens, within the fp32 rounding of the engine's output; the log-probs of
    the tokens at the `unchecked` indices are skipped."""
    assert records
    for record in records:
        request = record.merge()
        prompt, generated = list(request.prompt_tokens.tolist()), list(request.generated_tokens)
        tokens = torch.tensor([prompt + generated])
        reference = torch.log_softmax(full_logits(model, tokens)[0].double(), dim=-1)
        expected = reference[:-1].gather(1, tokens[0, 1:, None])[:, 0]
        got = torch.tensor(list(request.prompt_log_probs) + list(request.generated_log_probs), dtype=torch.float64)
        assert got.shape == expected.shape, (request.request_id, got.shape, expected.shape)
        error = (got - expected).abs()
        error[[i - 1 for i in unchecked if i <= len(prompt)]] = 0.0
        assert (error <= ULP * expected.abs() + 1e-12).all(), (
            f"request {request.request_id} (prompt {len(prompt)} tokens): log-probs differ from the full forward "
            f"by up to {error.max():.2e} at token {int(error.argmax()) + 1}")


def _run(engine, requests: dict[int, tuple[list[int], int]], joins: dict[int, list[int]] | None = None) -> list:
    """Add `requests` {id: (prompt, new tokens)}, those in `joins[n]` only before step n; run until every request
    (also those added before) has finished; return the finished records."""
    joins = joins or {}
    late = {request_id for ids in joins.values() for request_id in ids}
    for request_id in requests.keys() - late:
        engine.add_request(request_id, requests[request_id][0], _sampling(requests[request_id][1]))
    records, step = [], 0
    while engine.has_unfinished_requests() or step <= max(joins, default=-1):
        for request_id in joins.get(step, []):
            engine.add_request(request_id, requests[request_id][0], _sampling(requests[request_id][1]))
        records.extend(engine.step_modern()["finished_request_records"])
        step += 1
    return records


def test_prompts_at_every_chunk_position_and_slot_reuse(model):
    """Prompts of 1..S+1 and 2S-1..2S+1 tokens decode side by side (every position in the chunk at once);
    four slots for twelve requests of different lengths, so later requests reuse freed slots mid-flight."""
    lengths = list(range(1, S + 2)) + [2 * S - 1, 2 * S, 2 * S + 1]
    requests = {i: (_prompt(n), 3 + (5 * i) % 11) for i, n in enumerate(lengths)}
    engine = _engine(model, max_requests=4, all_logits=True)
    records = _run(engine, requests)
    assert sorted(record.request_id for record in records) == list(requests)
    assert_log_probs_match_full_forward(model, records)


def test_requests_joining_at_every_chunk_position(model):
    """One request decodes 2S tokens; a new one joins at each of its first S + 1 steps, so joins (a prefill
    next to decodes) happen at every position of its chunk."""
    requests = {0: (_prompt(5), 2 * S)} | {i: (_prompt(i, seed=1), 6) for i in range(1, S + 2)}
    engine = _engine(model, max_requests=S + 2, all_logits=True)
    records = _run(engine, requests, joins={step: [step] for step in range(1, S + 2)})
    assert sorted(record.request_id for record in records) == list(requests)
    assert_log_probs_match_full_forward(model, records)


@pytest.mark.parametrize("decoding, piece_end", [(0, 0), (1, S - 1), (7, 1)])
def test_chunked_prefill_pieces_ending_around_chunk_boundaries(model, monkeypatch, decoding, piece_end):
    """A 100-token prompt prefilled in pieces of 64 - `decoding` tokens (the decode requests take the rest of
    the 64-token budget): pieces end at S (0), S - 1 or S + 1 (1) in the chunk, and the next continues there."""
    piece_ends = []
    scatter = SKASlots.scatter

    def recording_scatter(self, slots, state, tokens):
        if isinstance(tokens, int) and 1 < tokens < 100:  # a piece of the long prompt, not its last
            piece_ends.append(tokens)
        scatter(self, slots, state, tokens)

    monkeypatch.setattr(SKASlots, "scatter", recording_scatter)
    engine = _engine(model, max_requests=8, max_sequence_length=128, max_tokens=64, enable_chunked_prefill=True,
                     all_logits=True)
    records = _run(engine, {i: (_prompt(1, seed=i), 12) for i in range(decoding)} | {decoding: (_prompt(100), 6)},
                   joins={1: [decoding]} if decoding else {})
    assert len(records) == decoding + 1
    assert piece_ends and piece_ends[0] % S == piece_end, piece_ends
    # Megatron 0.19.2 gives the last position of a non-final piece the log-prob of a token it samples there
    # (text_generation_controller: `prefill_token_ids[new_token_idx] = prefill_new_tokens`), not the log-prob
    # of the next prompt token: those entries are skipped.
    assert_log_probs_match_full_forward(model, records, unchecked=tuple(piece_ends))
