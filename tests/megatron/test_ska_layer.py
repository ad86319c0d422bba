"""SpectralKoopmanAttention: the layer adds no math to `echo_megatron.ops.ska`, its initialisation,
forward contract, packed sequences, checkpoint layout and errors."""

import pytest
import torch
import torch.nn.functional as F

from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.inference.contexts import BaseInferenceContext, StaticInferenceContext
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from echo_megatron.megatron import SKASubmodules, SpectralKoopmanAttention, effective_gamma
from echo_megatron.ops import ska

from .common import tiny_config

pytestmark = pytest.mark.usefixtures("model_parallel_tp1")

LOCAL = SKASubmodules(in_proj=ColumnParallelLinear, out_proj=RowParallelLinear)
HIDDEN = 64


def make_layer(seed=0, **overrides) -> SpectralKoopmanAttention:
    torch.manual_seed(seed)
    return SpectralKoopmanAttention(tiny_config(**overrides), LOCAL, layer_number=3)


def test_layer_output_is_ska_of_its_own_projections():
    layer = make_layer(ska_zero_init_output=False, params_dtype=torch.float64)
    with torch.no_grad():
        layer.eta.copy_(torch.tensor([0.5, 1.0, 1.5, 2.0]))
        layer.rho.copy_(torch.tensor([-2.0, 0.0, 1.0, 3.0]))
    hidden = torch.randn(40, 3, HIDDEN, dtype=torch.float64)  # [s, b, d]
    out, bias = layer(hidden, attention_mask=None, rotary_pos_emb=object(), attention_bias=object())
    assert bias is None and out.shape == hidden.shape

    weight = layer.in_proj.weight
    q, k, v = (F.linear(hidden, w).transpose(0, 1) for w in torch.split(weight, [48, 48, 64]))
    y = ska(q.unflatten(-1, (4, 12)), k.unflatten(-1, (4, 12)), v.unflatten(-1, (4, 16)), eta=layer.eta,
            gamma=1 + 0.5 * torch.sigmoid(layer.rho), chunk_size=8, power=2, eps=1e-3, norm="causal_max")
    expected = F.linear(y.flatten(2).transpose(0, 1), layer.out_proj.weight)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_initialisation():
    layer = make_layer()
    weight = layer.in_proj.weight.detach()
    assert weight.shape == (4 * (2 * 12 + 16), HIDDEN)
    for block in weight[: 2 * 4 * 12].view(8, 12, HIDDEN):  # q then k rows of each head: orthonormal
        torch.testing.assert_close(block @ block.T, torch.eye(12), rtol=0, atol=1e-5)
    assert weight[96:].std().item() == pytest.approx(0.02, rel=0.2)  # v rows: config.init_method
    assert torch.count_nonzero(layer.out_proj.weight) == 0
    assert torch.equal(layer.eta, torch.full((4,), 1.5)) and torch.equal(layer.rho, torch.full((4,), -4.0))
    torch.testing.assert_close(layer.gamma(), torch.full((4,), 1 + 0.5 * torch.sigmoid(torch.tensor(-4.0)).item()))
    for name in ("eta", "rho"):
        param = getattr(layer, name)
        assert param.dim() == 1 and param.no_weight_decay and param.tensor_model_parallel and param.partition_dim == 0
    assert torch.count_nonzero(make_layer(ska_zero_init_output=False).out_proj.weight) > 0


def test_bfloat16_layer_keeps_gamma_in_fp32():
    layer = make_layer(ska_zero_init_output=False, params_dtype=torch.bfloat16)
    gamma = layer.gamma()
    assert gamma.dtype == torch.float32 and (gamma > 1.0).all()  # bf16 would round 1.009 to 1.0
    out, _ = layer(torch.randn(20, 2, HIDDEN, dtype=torch.bfloat16), None)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all() and out.abs().sum() > 0


def test_gamma_keeps_its_range_and_gradient():
    rho = torch.tensor([-50.0, -4.0, 0.0, 4.0, 50.0], dtype=torch.float64, requires_grad=True)
    gamma = effective_gamma(rho)
    assert ((gamma >= 1.0) & (gamma <= 1.5)).all()
    (grad,) = torch.autograd.grad(gamma.sum(), rho)
    torch.testing.assert_close(grad, 0.5 * torch.sigmoid(rho) * torch.sigmoid(-rho))
    assert grad[1] > 0


def test_bias_is_returned_for_the_bias_dropout_add():
    layer = make_layer(add_bias_linear=True, add_qkv_bias=True)
    out, bias = layer(torch.randn(10, 2, HIDDEN), None)
    assert bias.shape == (HIDDEN,) and layer.in_proj.bias.shape == (160,)


@pytest.mark.parametrize("padded", [False, True])
def test_packed_thd_equals_sequences_one_by_one(padded):
    layer = make_layer(ska_zero_init_output=False, params_dtype=torch.float64)
    lengths = [5, 19, 1, 11]
    sequences = [torch.randn(n, 1, HIDDEN, dtype=torch.float64) for n in lengths]
    bounds = torch.tensor([0, 5, 24, 25, 36], dtype=torch.int32)
    params = dict(cu_seqlens_q_padded=bounds, cu_seqlens_kv_padded=bounds) if padded else {}
    packed_params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=bounds, cu_seqlens_kv=bounds, **params)
    packed, _ = layer(torch.cat(sequences), None, packed_seq_params=packed_params)
    alone = torch.cat([layer(seq, None)[0] for seq in sequences])
    torch.testing.assert_close(packed, alone, rtol=1e-12, atol=1e-12)
    assert packed[5:].abs().sum() > 0  # not trivially zero (chunk 0 of each sequence reads nothing)


def test_sharded_state_dict_splits_qkv_and_maps_heads():
    layer = make_layer()
    sharded = layer.sharded_state_dict(prefix="mixer.")
    for name in ("eta", "rho"):
        tensor = sharded[f"mixer.{name}"]
        assert isinstance(tensor, ShardedTensor) and tensor.global_shape == (4,) and tensor.axis_fragmentations == (1,)
    factory = sharded["mixer.in_proj.weight"]
    assert isinstance(factory, ShardedTensorFactory)
    parts = factory.build()
    assert [(p.key, tuple(p.global_shape)) for p in parts] == [
        ("mixer.in_proj.weight.query", (48, HIDDEN)), ("mixer.in_proj.weight.key", (48, HIDDEN)),
        ("mixer.in_proj.weight.value", (64, HIDDEN))]
    assert sharded["mixer.out_proj.weight"].global_shape == (HIDDEN, 64)


def test_errors():
    with pytest.raises(TypeError, match="config must be a TransformerConfig"):
        SpectralKoopmanAttention(object(), LOCAL)
    layer = make_layer()
    hidden = torch.randn(3, 1, HIDDEN)
    context = StaticInferenceContext(1, 16)
    context.sequence_len_offset = 2
    with torch.no_grad(), pytest.raises(RuntimeError, match="without a prefill at offset 0"):
        layer(hidden[:1], None, inference_context=context)

    class DynamicContext(BaseInferenceContext):
        def is_static_batching(self):
            return False

    with torch.no_grad(), pytest.raises(TypeError, match="need an SKADynamicInferenceContext"):
        layer(hidden, None, inference_context=DynamicContext(None))
    bounds = torch.tensor([0, 1, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="batch size 1"):
        layer(torch.randn(3, 2, HIDDEN), None, packed_seq_params=PackedSeqParams(qkv_format="thd", cu_seqlens_q=bounds))
