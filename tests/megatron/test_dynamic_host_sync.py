"""The dynamic engine's SKA decode step reads no tensor value on the host (issue 20 item 5).

Requests at different positions of their SKA chunks (one completes a chunk in the trapped steps) decode
side by side; every SKA layer call of a decode-only step runs inside the host-read trap of
`tests/ops/test_host_sync.py` (Python entry points and syncing aten ops trapped; the torch path on its
accelerator branch, the one CUDA tensors take without Triton). The tokens equal an untrapped run.
Prefill calls are not trapped: they read Megatron's host-side bookkeeping (`request_to_mamba_state_idx`,
`request_kv_length_offsets`, `cu_seqlens_list`), host tensors, and step a continued prefill piece by piece.
"""

import torch

from echo_megatron.megatron import ska_layer

from tests.ops.test_host_sync import host_reads_trapped

from .test_dynamic_inference import _engine, _generated, _greedy, model  # noqa: F401  (the module's model fixture)

PROMPTS = [list(range(1, 7)), [7, 8, 9], [5] + list(range(20, 30))]  # 6, 3, 11 tokens: positions 6, 3, 3 of S = 8


def test_engine_ska_decode_step_reads_nothing_on_the_host(model, monkeypatch):  # noqa: F811
    expected = _generated(_engine(model).generate(PROMPTS, _greedy(6)))
    forward = ska_layer.ska_dynamic_forward
    trapped_calls = []

    def trapped_forward(layer, q, k, v, context):
        if context.batch_dimensions.prefill_req_count:
            return forward(layer, q, k, v, context)
        trapped_calls.append(context.batch_dimensions.decode_req_count)
        with host_reads_trapped(monkeypatch):
            return forward(layer, q, k, v, context)

    monkeypatch.setattr(ska_layer, "ska_dynamic_forward", trapped_forward)
    assert _generated(_engine(model).generate(PROMPTS, _greedy(6))) == expected
    assert len(trapped_calls) >= 5 and max(trapped_calls) == len(PROMPTS)
