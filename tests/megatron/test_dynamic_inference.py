"""SKA in Megatron-Core's dynamic inference engine (continuous batching): greedy tokens of every request
equal the request generated alone and greedy decoding by full recomputation; per-request state is constant
in the context length and SKA layers get no KV cache."""

import contextlib

import pytest
import torch

from megatron.core.inference.sampling_params import SamplingParams
from megatron.core.tokenizers import MegatronTokenizer

from echo_megatron.megatron.generation import build_engine, inference_context, memory_per_request, ska_state_floats
from echo_megatron.megatron.inference import greedy_generate
from echo_megatron.megatron.ska_dynamic import SKADynamicInferenceContext

from .common import VOCAB, full_logits, tiny_model
from .test_cpu_mode import run_python

NEW_TOKENS = 12
PROMPTS = [list(range(1, 12)), [7, 8, 9], [5] + list(range(20, 40))]  # 11, 3, 21 tokens: SKA chunks of 8


def _tokenizer():
    return MegatronTokenizer.from_pretrained(metadata_path={"library": "null-text"}, vocab_size=VOCAB)


def _greedy(new_tokens: int = NEW_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0.0, top_k=1, num_tokens_to_generate=new_tokens, termination_id=-1)


def _engine(model, max_requests: int = 4, max_sequence_length: int = 64, **options):
    return build_engine(model, _tokenizer(), max_requests=max_requests, max_sequence_length=max_sequence_length,
                        **options)


def _generated(records) -> list[list[int]]:
    return [list(record.merge().generated_tokens) for record in records]


@torch.no_grad()
def _recomputed_greedy(model, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    """Greedy decoding by a full (training-mode) forward over the whole sequence at every step."""
    ids = torch.tensor([prompt])
    for _ in range(new_tokens):
        ids = torch.cat([ids, full_logits(model, ids)[:, -1:].argmax(dim=-1)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def model(model_parallel_tp1):
    """A hybrid M*M- model whose SKA layer contributes (non-zero output projection)."""
    return tiny_model(ska_zero_init_output=False).eval()


@pytest.fixture(scope="module")
def alone(model) -> list[list[int]]:
    """Each prompt generated alone by the dynamic engine."""
    return [_generated(_engine(model, max_requests=1).generate([prompt], _greedy()))[0] for prompt in PROMPTS]


def test_engine_uses_ska_slots_and_no_kv_cache(model):
    context = _engine(model).context
    assert isinstance(context, SKADynamicInferenceContext)
    assert context.kv_cache_bytes() == 0
    layer = model.decoder.layers[1].self_attention
    assert context.ska_state_bytes_per_request() == layer.num_heads_local * ska_state_floats(12, 16) * 4


def test_batch_of_different_lengths_equals_each_alone_and_full_recomputation(model, alone):
    batched = _generated(_engine(model).generate(PROMPTS, _greedy()))
    assert batched == alone
    assert alone == [_recomputed_greedy(model, prompt) for prompt in PROMPTS]


def test_waiting_requests_reuse_freed_slots(model, alone):
    """One slot, three requests: each waits for the previous to finish and starts from a zeroed state."""
    engine = _engine(model, max_requests=1)
    assert engine.context.max_requests == 1
    assert _generated(engine.generate(PROMPTS, _greedy())) == alone


def test_request_joining_mid_flight_gets_the_same_tokens(model, alone):
    """A request added while another decodes: the next steps mix its prefill with the other's decode."""
    engine = _engine(model)
    engine.add_request(0, PROMPTS[0], _greedy())
    for _ in range(3):
        engine.step_modern()
    engine.add_request(1, PROMPTS[2], _greedy())
    engine.add_request(2, PROMPTS[1], _greedy())
    records = []
    while engine.has_unfinished_requests():
        records.extend(engine.step_modern()["finished_request_records"])
    by_id = {record.request_id: list(record.merge().generated_tokens) for record in records}
    assert [by_id[0], by_id[1], by_id[2]] == [alone[0], alone[2], alone[1]]


def test_chunked_prefill_gets_the_same_tokens(model, alone):
    """At most 64 tokens per forward (Megatron's token rounding unit): a 100-token prompt is prefilled in
    pieces, later pieces continuing the SKA state token by token, next to the other requests."""
    long_prompt = [(3 * i) % VOCAB for i in range(100)]
    engine = _engine(model, max_sequence_length=128, max_tokens=64, enable_chunked_prefill=True)
    expected = alone + [_generated(_engine(model, max_requests=1, max_sequence_length=128).generate(
        [long_prompt], _greedy()))[0]]
    assert _generated(engine.generate(PROMPTS + [long_prompt], _greedy())) == expected
    assert expected[-1] == _recomputed_greedy(model, long_prompt)


def test_state_per_request_is_constant_in_context_length(model):
    """Allocated inference state per request for 64 and 4096-token requests: equal for SKA (and no KV
    buffer), 64x larger KV for the same model with softmax attention."""
    def allocated_per_request(model, tokens: int) -> int:
        context = inference_context(model, max_requests=2, max_sequence_length=tokens)
        state = [context.mamba_conv_states, context.mamba_ssm_states, context.memory_buffer]
        if isinstance(context, SKADynamicInferenceContext):
            state += [tensor for slots in context.ska_slots for tensor in slots.tensors()]
        return sum(tensor.nbytes for tensor in state) // context.max_requests

    short, long = (allocated_per_request(model, n) for n in (64, 4096))
    expected = memory_per_request(model, 4096)
    assert short == long == expected.ska + expected.mamba
    assert expected.kv == 0 and expected.softmax_kv == 2 * 4096 * 4 * 16 * 4  # K and V, 4 heads x 16, fp32
    softmax = tiny_model(attention="softmax")
    softmax_short, softmax_long = (allocated_per_request(softmax, n) for n in (64, 4096))
    assert softmax_long - softmax_short >= 60 * expected.softmax_kv // 64
    with pytest.raises(RuntimeError, match="softmax attention layers with flash-attn only"):
        _engine(softmax)


def test_long_context_request_equals_static_decoding(model):
    """A 4090-token prompt + 6 tokens through the dynamic engine (constant state) == the static path."""
    prompt = torch.randint(0, VOCAB, (1, 4090), generator=torch.Generator().manual_seed(0))
    engine = _engine(model, max_requests=1, max_sequence_length=4096)
    generated = _generated(engine.generate([prompt[0].tolist()], _greedy(6)))[0]
    assert generated == greedy_generate(model, prompt, 6)[0, 4090:].tolist()


def test_cpu_dynamic_inference_is_a_no_op_with_cuda():
    out = run_python(
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "from megatron.core.inference.contexts import dynamic_context\n"
        "from megatron.core.ssm.mamba_mixer import MambaMixer\n"
        "original = MambaMixer._dynamic_inference\n"
        "from echo_megatron.megatron.cpu_inference import enable_cpu_dynamic_inference\n"
        "print(enable_cpu_dynamic_inference(), dynamic_context.torch is torch,\n"
        "      MambaMixer._dynamic_inference is original)\n"
    )
    assert out.split() == ["False", "True", "True"]


def test_training_after_serving_takes_the_training_path(model_parallel_tp1, monkeypatch):
    """Megatron's engine sets the process-wide InferenceMode when built (and resumed) and clears it only in
    suspend(): a training forward after build_engine + generate failed ("Inference must always gather TP
    logits"). suspend()/resume() run without their CUDA memory report."""
    from megatron.core.inference.engines import DynamicInferenceEngine
    from megatron.core.inference.utils import InferenceMode

    monkeypatch.setattr(DynamicInferenceEngine, "suspend_resume_ctx",
                        staticmethod(lambda key, unified_memory_level: contextlib.nullcontext()))
    model = tiny_model(ska_zero_init_output=False)
    ids = torch.tensor([PROMPTS[0]])
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    labels = ids.roll(-1, dims=1)
    before = model(ids, positions, None, labels=labels)
    engine = _engine(model, max_requests=1)
    expected = [_recomputed_greedy(model, PROMPTS[1], 2)]
    assert _generated(engine.generate([PROMPTS[1]], _greedy(2))) == expected
    engine.suspend()
    engine.resume()
    assert _generated(engine.generate([PROMPTS[1]], _greedy(2))) == expected
    assert not InferenceMode.is_active()
    model.train()
    after = model(ids, positions, None, labels=labels)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    after.sum().backward()
    assert all(parameter.grad is not None for parameter in model.parameters() if parameter.requires_grad)
