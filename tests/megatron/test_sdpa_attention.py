"""`SDPAttention` (PyTorch SDPA core attention) against Megatron's local `DotProductAttention`, fp32 on the CPU."""

import copy

import pytest
import torch
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from echo_megatron.megatron.sdpa_attention import SDPAttention
from echo_megatron.megatron.specs import softmax_hybrid_stack_spec_local

from .common import VOCAB, full_logits, tiny_config

pytestmark = pytest.mark.usefixtures("model_parallel_tp1")

HEADS, HEAD_DIM = 4, 8


def config(groups: int = HEADS, **overrides) -> TransformerConfig:
    fields = dict(num_layers=1, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, num_query_groups=groups,
                  attention_dropout=0.0, masked_softmax_fusion=False, use_cpu_initialization=True)
    fields.update(overrides)
    return TransformerConfig(**fields)


def pair(mask_type=AttnMaskType.causal, groups: int = HEADS, **overrides):
    """(DotProductAttention, SDPAttention) built with the same arguments."""
    cfg = config(groups, **overrides)
    kwargs = dict(config=cfg, layer_number=1, attn_mask_type=mask_type, attention_type="self")
    return DotProductAttention(**kwargs), SDPAttention(**kwargs)


def qkv(sq: int, sk: int, batch: int = 2, groups: int = HEADS, seed: int = 0):
    """q [sq, b, heads, hn], k/v [sk, b, groups, hn], fp32, requiring gradients."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(sq, batch, HEADS, HEAD_DIM), (sk, batch, groups, HEAD_DIM), (sk, batch, groups, HEAD_DIM)]
    return [torch.randn(*s, generator=gen).requires_grad_() for s in shapes]


def output_and_grads(module, tensors, **kwargs):
    inputs = [t.detach().clone().requires_grad_() for t in tensors]
    out = module(*inputs, kwargs.pop("attention_mask", None), **kwargs)
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
    return out.detach(), [t.grad for t in inputs]


def assert_same(reference, candidate):
    torch.testing.assert_close(candidate[0], reference[0], rtol=1e-5, atol=1e-6)
    for ref_grad, grad in zip(reference[1], candidate[1]):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("groups", [HEADS, 2], ids=["mha", "gqa2"])
@pytest.mark.parametrize("seq_len", [1, 13])
def test_causal_output_and_gradients_equal_dot_product_attention(groups, seq_len):
    dpa, sdpa = pair(groups=groups)
    tensors = qkv(seq_len, seq_len, groups=groups)
    reference = output_and_grads(dpa, tensors)
    assert reference[0].shape == (seq_len, 2, HEADS * HEAD_DIM)
    assert_same(reference, output_and_grads(sdpa, tensors))
    assert sdpa.backend == "FLASH_ATTENTION"  # CPU: equal head widths, no dropout (GQA included)


def test_given_scale_and_query_key_layer_scaling_equal_dot_product_attention():
    cfg = config(apply_query_key_layer_scaling=True, fp16=False)
    kwargs = dict(config=cfg, layer_number=3, attn_mask_type=AttnMaskType.causal, attention_type="self")
    tensors = qkv(9, 9)
    assert_same(output_and_grads(DotProductAttention(**kwargs), tensors),
                output_and_grads(SDPAttention(**kwargs), tensors))
    kwargs["softmax_scale"] = 0.05
    assert_same(output_and_grads(DotProductAttention(**kwargs), tensors),
                output_and_grads(SDPAttention(**kwargs), tensors))


def test_decode_step_over_cached_keys_equals_dot_product_attention():
    """Megatron's static KV cache: one query against sk cached keys, mask type causal (or no_mask)."""
    dpa, sdpa = pair(groups=2)
    tensors = qkv(1, 9, groups=2)
    reference = output_and_grads(dpa, tensors)
    assert_same(reference, output_and_grads(sdpa, tensors))
    assert_same(reference, output_and_grads(sdpa, tensors, attn_mask_type=AttnMaskType.no_mask))


def test_padding_mask_tensor_equals_dot_product_attention():
    dpa, sdpa = pair(AttnMaskType.padding)
    tensors = qkv(7, 7)
    mask = torch.rand(2, 1, 7, 7, generator=torch.Generator().manual_seed(1)) < 0.4  # True = masked out
    mask[..., 0] = False  # every query sees at least one key (fully masked rows differ, see the docstring)
    assert_same(output_and_grads(dpa, tensors, attention_mask=mask),
                output_and_grads(sdpa, tensors, attention_mask=mask))


def test_causal_bottom_right_equals_an_explicit_mask():
    dpa, sdpa = pair(AttnMaskType.padding)
    tensors = qkv(3, 7)
    future = ~torch.ones(3, 7, dtype=torch.bool).tril(4)  # query i sees keys up to 4 + i
    reference = output_and_grads(dpa, tensors, attention_mask=future[None, None])
    assert_same(reference, output_and_grads(sdpa, tensors, attn_mask_type=AttnMaskType.causal_bottom_right))


@pytest.mark.parametrize("padded", [False, True])
def test_packed_sequences_equal_each_sequence_alone(padded):
    """THD: [t, heads, hn] with cu_seqlens = [0, 3, 8]; each sequence attends only to itself, causally
    (padding_causal, as Megatron's packed batches); padding tokens' outputs are 0."""
    dpa, sdpa = pair(groups=2)
    lengths, slots = [3, 5], ([4, 6] if padded else [3, 5])
    starts = [0, slots[0]]
    q, k, v = (t.detach()[:, 0] for t in qkv(sum(slots), sum(slots), groups=2))
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=5, max_seqlen_kv=5,
                             cu_seqlens_q_padded=torch.tensor([0, 4, 10], dtype=torch.int32) if padded else None)
    packed = sdpa(q, k, v, None, attn_mask_type=AttnMaskType.padding_causal, packed_seq_params=params)
    assert packed.shape == (sum(slots), HEADS * HEAD_DIM)
    for start, length in zip(starts, lengths):
        alone = dpa(*(t[start:start + length, None] for t in (q, k, v)), None)[:, 0]
        torch.testing.assert_close(packed[start:start + length], alone, rtol=1e-5, atol=1e-6)
    if padded:
        assert torch.equal(packed[[3, 9]], torch.zeros(2, HEADS * HEAD_DIM))


def test_attention_dropout_in_training_only_and_unbiased():
    torch.manual_seed(0)
    _, plain = pair()
    _, dropped = pair(attention_dropout=0.5)
    q, k, v = (t.detach() for t in qkv(6, 6, batch=1))
    expected = plain(q, k, v, None)
    dropped.eval()
    assert torch.equal(dropped(q, k, v, None), expected)  # eval: no dropout
    dropped.train()
    draws = torch.stack([dropped(q, k, v, None) for _ in range(400)])
    assert dropped.backend == "MATH"  # the CPU flash kernel has no dropout
    single_error = (draws[0] - expected).abs().mean()
    mean_error = (draws.mean(0) - expected).abs().mean()
    assert single_error > 0.1  # each draw drops probabilities ...
    assert mean_error < single_error / 8  # ... but on average computes the same attention (1/sqrt(400) = 1/20)
    overridden = SDPAttention(config(attention_dropout=0.5), 1, AttnMaskType.causal, "self", attention_dropout=0.0)
    assert torch.equal(overridden.train()(q, k, v, None), expected)  # the argument wins over the config


@pytest.mark.parametrize("case, message", [
    (dict(sq=3, sk=5), "causal needs equal query and key lengths"),
    (dict(mask_type=AttnMaskType.padding), "padding needs an attention_mask tensor"),
    (dict(mask_type=AttnMaskType.padding_causal), "padding_causal needs an attention_mask"),
    (dict(attention_mask=torch.zeros(1, 1, 4, 4)), "attention_mask must be boolean"),
    (dict(mask_type=AttnMaskType.no_mask, attention_mask=torch.zeros(1, 1, 4, 4, dtype=torch.bool)),
     "attention_mask tensor needs attn_mask_type"),
    (dict(attention_bias=torch.zeros(1, 1, 4, 4)), "attention_bias is not supported"),
])
def test_unsupported_masks_raise_naming_the_option(case, message):
    _, sdpa = pair()
    q, k, v = (t.detach() for t in qkv(case.get("sq", 4), case.get("sk", 4)))
    with pytest.raises(ValueError, match=message):
        sdpa(q, k, v, case.get("attention_mask"), attn_mask_type=case.get("mask_type"),
             attention_bias=case.get("attention_bias"))


def test_unsupported_packed_layouts_and_configs_raise():
    _, sdpa = pair()
    q, k, v = (t.detach()[:, 0] for t in qkv(8, 8))
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=torch.tensor([0, 3, 8]),
                             cu_seqlens_kv=torch.tensor([0, 4, 8]))
    with pytest.raises(ValueError, match="must be self-attention"):
        sdpa(q, k, v, None, packed_seq_params=params)
    with pytest.raises(ValueError, match="window_size"):
        SDPAttention(config(window_size=(4, 0)), 1, AttnMaskType.causal, "self")
    with pytest.raises(ValueError, match="softmax_type must be 'vanilla'"):
        SDPAttention(config(softmax_type="off-by-one"), 1, AttnMaskType.causal, "self")


def test_hybrid_model_logits_and_gradients_equal_the_dot_product_attention_stack():
    """A tiny HybridModel ('M*-', GQA with 2 groups) with the local softmax spec (SDPA) and the same stack
    with Megatron's DotProductAttention, same weights: equal logits and parameter gradients."""
    pattern = "M*-"
    dpa_spec = copy.deepcopy(softmax_hybrid_stack_spec_local)
    dpa_spec.submodules.attention_layer.submodules.self_attention.submodules.core_attention = DotProductAttention
    models = []
    for spec in (softmax_hybrid_stack_spec_local, dpa_spec):
        torch.manual_seed(0)
        models.append(HybridModel(config=tiny_config(pattern, num_query_groups=2), hybrid_stack_spec=spec,
                                  vocab_size=VOCAB, max_sequence_length=64, hybrid_layer_pattern=pattern))
    sdpa_model, dpa_model = models
    dpa_model.load_state_dict(sdpa_model.state_dict())
    assert [type(m).__name__ for m in sdpa_model.modules() if "Attention" in type(m).__name__][-1] == "SDPAttention"
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    logits = [full_logits(model, ids) for model in models]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
    for model, out in zip(models, logits):
        out.float().logsumexp(-1).mean().backward()
    for (name, p_sdpa), p_dpa in zip(sdpa_model.named_parameters(), dpa_model.parameters()):
        torch.testing.assert_close(p_sdpa.grad, p_dpa.grad, rtol=1e-4, atol=1e-6, msg=name)
