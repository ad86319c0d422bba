"""The Echo hybrid built by `build_hybrid_model` (single process, TP=1): training, causality, packed
sequences, constant-memory inference parity, spec objects, presets and builder errors."""

import pytest
import torch

from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear, TERowParallelLinear
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.ssm.mamba_mixer import MambaMixer
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec

from echo_megatron.megatron import (
    KoopmanMLP,
    SpectralKoopmanAttention,
    build_hybrid_model,
    echo_hybrid_stack_spec,
    echo_hybrid_stack_spec_local,
    echo_koopman_stack_spec,
    echo_koopman_stack_spec_local,
    get_preset,
    stack_spec,
)
from echo_megatron.megatron import inference
from echo_megatron.megatron.inference import cache_nbytes, forward_step, greedy_generate, static_inference_context
from echo_megatron.ops import SKAState

from .common import PATTERN, VOCAB, full_logits, ska_modules, tiny_config, tiny_model

pytestmark = pytest.mark.usefixtures("model_parallel_tp1")


def batch(b=4, t=32, seed=0):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("ffn", ["mlp", "koopman"])
def test_training_lowers_the_loss_and_reaches_every_ska_parameter(ffn):
    model = tiny_model(ffn=ffn)
    assert isinstance(model, HybridModel)
    ids = batch()
    inputs, labels = ids[:, :-1], ids[:, 1:]
    position_ids = torch.arange(inputs.shape[1]).expand_as(inputs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        loss = model(inputs, position_ids, None, labels=labels).mean()  # [b, s] per-token losses
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses

    (layer,) = ska_modules(model)
    assert torch.count_nonzero(layer.out_proj.weight) > 0
    optimizer.zero_grad()
    model(inputs, position_ids, None, labels=labels).mean().backward()
    q_grad, k_grad, v_grad = torch.split(layer.in_proj.weight.grad, layer.in_proj_split_sections)
    for name, grad in [("q", q_grad), ("k", k_grad), ("v", v_grad), ("eta", layer.eta.grad), ("rho", layer.rho.grad),
                       ("out_proj", layer.out_proj.weight.grad)]:
        per_head = grad.reshape(4, -1) if name != "out_proj" else grad.reshape(-1, 4, 16).transpose(0, 1)
        assert (per_head.abs().sum(dim=1) > 0).all(), f"{name} has heads without gradient"


def test_causal_through_the_whole_model():
    model = tiny_model(pattern="M*M-*-")
    ids = batch(b=2, t=40)
    reference = full_logits(model, ids)
    for t in (1, 7, 8, 9, 23, 39):
        changed = ids.clone()
        changed[:, t:] = torch.randint(0, VOCAB, changed[:, t:].shape)
        logits = full_logits(model, changed)
        assert torch.equal(logits[:, :t], reference[:, :t]), t
        assert not torch.equal(logits[:, t:], reference[:, t:])


def test_packed_thd_batch_equals_sequences_one_by_one():
    model = tiny_model(params_dtype=torch.float64, ska_zero_init_output=False)
    lengths = [9, 17, 3, 20]
    sequences = [batch(b=1, t=n, seed=i) for i, n in enumerate(lengths)]
    packed_ids = torch.cat(sequences, dim=1)
    total = packed_ids.shape[1]
    bounds = torch.tensor([0, 9, 26, 29, 49], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=bounds, cu_seqlens_kv=bounds, max_seqlen_q=20,
                             max_seqlen_kv=20, total_tokens=total)
    packed = model(packed_ids, torch.arange(total)[None], None, packed_seq_params=params, runtime_gather_output=True)
    alone = torch.cat([full_logits(model, seq) for seq in sequences], dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
@pytest.mark.parametrize("pattern, batch_size, prompt_length", [("M*M-*-", 1, 1), ("M*M-*-", 1, 13), ("*-*-", 3, 5)])
def test_prefill_and_decode_equal_the_full_forward(dtype, tolerance, pattern, batch_size, prompt_length):
    """Megatron-Core 0.19 decodes Mamba layers at batch size 1 only; SKA-only stacks use batch 3."""
    model = tiny_model(pattern=pattern, params_dtype=dtype, ska_zero_init_output=False).eval()
    ids = batch(b=batch_size, t=30)
    with torch.no_grad():
        reference = full_logits(model, ids)
    context = static_inference_context(batch_size, 30, all_logits=True)
    logits = [forward_step(model, context, ids[:, :prompt_length])]
    ska_layers = {m.layer_number for m in ska_modules(model)}
    mamba_layers = {m.layer_number for m in model.modules() if isinstance(m, MambaMixer)}
    assert set(context.key_value_memory_dict) == ska_layers | mamba_layers
    assert all(isinstance(context.key_value_memory_dict[layer], SKAState) for layer in ska_layers)
    state_bytes = cache_nbytes(context)
    for t in range(prompt_length, 30):
        logits.append(forward_step(model, context, ids[:, t : t + 1]))
        assert cache_nbytes(context) == state_bytes  # constant memory, SKA and Mamba
    torch.testing.assert_close(torch.cat(logits, dim=1), reference, rtol=tolerance, atol=tolerance)
    # a new prefill at offset 0 resets every state: the same prompt gives the same logits again
    context.reset()
    torch.testing.assert_close(forward_step(model, context, ids[:, :prompt_length]), logits[0], rtol=0, atol=0)


def test_batched_decode_of_mamba_layers_is_refused_clearly(monkeypatch):
    """Unless patches/mamba-static-decode-batch.patch is applied (tests/test_patching.py runs that case)."""
    monkeypatch.setattr(inference, "patch_applied", lambda name: False)
    model = tiny_model().eval()
    context = static_inference_context(2, 8)
    forward_step(model, context, batch(b=2, t=4))
    with pytest.raises(NotImplementedError, match="batch size 1 .* `echo-megatron patch-megatron`"):
        forward_step(model, context, batch(b=2, t=1))


def test_greedy_generate_matches_argmax_of_the_full_forward():
    model = tiny_model(ska_zero_init_output=False).eval()
    prompt = batch(b=1, t=10)
    tokens = greedy_generate(model, prompt, max_new_tokens=12)
    assert tokens.shape == (1, 22) and torch.equal(tokens[:, :10], prompt)
    with torch.no_grad():
        expected = full_logits(model, tokens[:, :-1]).argmax(-1)[:, 9:]
    assert torch.equal(tokens[:, 10:], expected)


def test_softmax_baseline_runs_on_cpu_and_is_causal():
    model = tiny_model(attention="softmax", pattern="M*M-")
    assert any(isinstance(m, SelfAttention) for m in model.modules()) and not ska_modules(model)
    ids = batch(b=2, t=20)
    reference = full_logits(model, ids)
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % VOCAB
    assert torch.equal(full_logits(model, changed)[:, :12], reference[:, :12])


def test_spec_objects_and_layer_classes():
    for spec in (echo_hybrid_stack_spec, echo_hybrid_stack_spec_local, echo_koopman_stack_spec,
                 echo_koopman_stack_spec_local):
        assert isinstance(spec, ModuleSpec)
        assert spec.submodules.attention_layer.submodules.self_attention.module is SpectralKoopmanAttention
    te_ska = echo_hybrid_stack_spec.submodules.attention_layer.submodules.self_attention.submodules
    assert (te_ska.in_proj, te_ska.out_proj) == (TELayerNormColumnParallelLinear, TERowParallelLinear)
    assert echo_koopman_stack_spec_local.submodules.mlp_layer.submodules.mlp.module is KoopmanMLP
    assert stack_spec("te", "koopman", "ska") is echo_koopman_stack_spec
    model = tiny_model(ffn="koopman")
    kinds = [type(layer).__name__ for layer in model.decoder.layers]
    assert kinds == ["MambaLayer", "TransformerLayer", "MambaLayer", "MLPLayer"]
    assert isinstance(model.decoder.layers[1].self_attention, SpectralKoopmanAttention)
    assert isinstance(model.decoder.layers[3].mlp, KoopmanMLP)


def test_local_checkpoint_keys_match_the_fused_te_layout():
    keys = set()
    for value in tiny_model().sharded_state_dict().values():
        keys.update(t.key for t in (value.build() if hasattr(value, "build") else [value]))
    for key in ("decoder.layers.1.self_attention.in_proj.layer_norm_weight",
                "decoder.layers.0.mixer.in_proj.layer_norm_weight",
                "decoder.layers.3.mlp.linear_fc1.layer_norm_weight",
                "decoder.layers.1.self_attention.in_proj.weight.query",
                "decoder.layers.1.self_attention.in_proj.weight.value",
                "decoder.layers.1.self_attention.eta", "decoder.layers.1.self_attention.rho"):
        assert key in keys, key
    assert not any("input_layernorm" in key for key in keys)


def test_presets():
    tiny = get_preset("echo-tiny")
    assert tiny.pattern == "M-*-M-*-"
    model = tiny.build(tiny.make_config(use_cpu_initialization=True), 64)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert len(ska_modules(model)) == 2
    for name, expected in (("echo-50m", 50_100_208), ("echo-180m", 184_932_448)):
        preset = get_preset(name)
        config = preset.make_config(use_cpu_initialization=True, perform_initialization=False)
        model = preset.build(config, 128)
        assert sum(p.numel() for p in model.parameters()) == expected, name
        assert len(ska_modules(model)) == {"echo-50m": 4, "echo-180m": 2}[name]
        del model
    with pytest.raises(ValueError, match="preset must be one of"):
        get_preset("echo-7b")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(spec="apex"), ValueError, "spec must be one of"),
        (dict(ffn="moe"), ValueError, "ffn must be one of"),
        (dict(attention="linear"), ValueError, "attention must be one of"),
        (dict(pattern="M*E-"), ValueError, "pattern may only contain"),
        (dict(pattern="M*M-/MM"), ValueError, "multi-token prediction"),
        (dict(pattern="M*M"), ValueError, "has 3 layers but config.num_layers = 4"),
        (dict(vocab_size=0), ValueError, "vocab_size must be an int >= 1"),
        (dict(spec="te"), RuntimeError, "spec='te' needs Transformer Engine"),
        (dict(config=object()), TypeError, "config must be a TransformerConfig"),
    ],
)
def test_builder_errors(kwargs, error, match):
    args = dict(config=tiny_config(), pattern=PATTERN, vocab_size=VOCAB, seq_length=64)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        build_hybrid_model(**args)
