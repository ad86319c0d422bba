"""Repro: static-batching decode through Mamba layers at batch size 3 (HybridModel "M*M-*-", fp64).

Prefills 5 tokens and decodes 25 more one at a time, (1) straight through Megatron's model call with a
`StaticInferenceContext` and (2) through `echo_megatron.megatron.inference.forward_step`, and compares
the logits at every position with one full forward. Prints one JSON line; exit 0 iff both equal it.
"""

import json
import sys

import torch


def main() -> int:
    from megatron.core.inference.utils import InferenceMode

    from echo_megatron.megatron import SKAConfig, build_hybrid_model, initialize_single_process
    from echo_megatron.megatron.inference import forward_step, static_inference_context

    initialize_single_process(seed=0)
    pattern, batch, length, prompt = "M*M-*-", 3, 30, 5
    config = SKAConfig(num_layers=len(pattern), hidden_size=32, num_attention_heads=2, ska_rank=8, ska_value_dim=8,
                       ska_chunk_size=4, ska_zero_init_output=False, mamba_head_dim=8, mamba_state_dim=8,
                       mamba_num_groups=2, ffn_hidden_size=64, normalization="RMSNorm", add_bias_linear=False,
                       hidden_dropout=0.0, params_dtype=torch.float64, use_cpu_initialization=True)
    model = build_hybrid_model(config, pattern, vocab_size=48, seq_length=length).eval()
    ids = torch.randint(0, 48, (batch, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids, torch.arange(length).expand(batch, length), None, runtime_gather_output=True)

    def megatron_call(context, chunk):
        start = context.sequence_len_offset
        positions = torch.arange(start, start + chunk.shape[1]).expand(batch, chunk.shape[1])
        with torch.no_grad(), InferenceMode.active():
            logits = model(chunk, positions, None, inference_context=context, runtime_gather_output=True)
        context.increment_sequence_len_offset(chunk.shape[1])
        return logits

    result = {}
    for name, step in (("megatron", megatron_call), ("forward_step", lambda c, x: forward_step(model, c, x))):
        context = static_inference_context(batch, length, all_logits=True)
        try:
            logits = [step(context, ids[:, :prompt])] + [step(context, ids[:, t:t + 1]) for t in range(prompt, length)]
            result[name] = {"max_abs_diff": (torch.cat(logits, dim=1) - full).abs().max().item()}
        except Exception as error:  # noqa: BLE001 - the repro reports whatever breaks
            result[name] = {"error": f"{type(error).__name__}: {error}"[:300]}
    result["ok"] = all(r.get("max_abs_diff", 1.0) < 1e-9 for r in result.values())
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
