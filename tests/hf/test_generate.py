"""`generate()` of EchoHybridForCausalLM with the constant-size SKA cache: greedy == full recomputation, cache
bytes independent of the context, left padding == the prompt alone, beam search scores == recomputed scores."""

import pytest
import torch
from transformers.cache_utils import DynamicCache, LinearAttentionLayer

from echo_megatron.hf import EchoHybridConfig, EchoHybridForCausalLM, SKACacheLayer

VOCAB = 64
LAYERS = ["linear_attention", "ska", "mlp", "linear_attention", "ska", "mlp"]


@pytest.fixture(scope="module")
def model() -> EchoHybridForCausalLM:
    """A small SKA + Mamba-2 + SwiGLU stack (no softmax layer), S = 8, weights away from their initial values."""
    torch.manual_seed(0)
    config = EchoHybridConfig(
        layers_block_type=LAYERS, vocab_size=VOCAB, hidden_size=64, intermediate_size=96, ffn_kind="gated_mlp",
        mlp_hidden_act="silu", mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=8,
        ska_num_heads=4, ska_rank=12, ska_value_dim=16, ska_chunk_size=8, pad_token_id=0, bos_token_id=None,
        eos_token_id=None,
    )
    model = EchoHybridForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("eta", "rho")):
                param.add_(0.2 * torch.randn_like(param))
    return model


def _prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def _cache_bytes(cache: DynamicCache) -> int:
    total = 0
    for layer in cache.layers:
        if isinstance(layer, SKACacheLayer):
            total += layer.nbytes
        elif isinstance(layer, LinearAttentionLayer):
            states = [*layer.conv_states.values(), *layer.recurrent_states.values()]
            total += sum(s.numel() * s.element_size() for s in states if s is not None)
    return total


@torch.no_grad()
def test_greedy_generate_equals_full_recomputation(model):
    prompt = torch.cat([_prompt(21, 1), _prompt(21, 2)])  # T0 = 21: mid-chunk, 32 new tokens cross 4 chunks
    out = model.generate(prompt, max_new_tokens=32, do_sample=False, output_scores=True, return_dict_in_generate=True)
    assert isinstance(out.past_key_values.layers[1], SKACacheLayer)
    ids = prompt
    for step in range(32):
        logits = model(ids, use_cache=False).logits[:, -1]
        scale = logits.abs().max()
        assert (out.scores[step] - logits).abs().max() <= 1e-5 * scale, step
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, ids)


@torch.no_grad()
def test_cache_bytes_do_not_grow_with_the_context(model):
    sizes = {}
    for length in (64, 512):
        cache = DynamicCache(config=model.config)
        model(_prompt(length, length), past_key_values=cache, use_cache=True)
        assert cache.get_seq_length() == length
        sizes[length] = _cache_bytes(cache)
    print(f"cache bytes after 64 / 512 prompt tokens: {sizes[64]} / {sizes[512]}")
    assert sizes[64] == sizes[512] > 0


@torch.no_grad()
def test_left_padded_row_equals_prompt_alone(model):
    short, long = _prompt(13, 3), _prompt(21, 4)
    batch = torch.cat([torch.cat([torch.zeros(1, 8, dtype=torch.long), short], dim=1), long])
    mask = torch.ones_like(batch)
    mask[0, :8] = 0
    # full forward (no cache): the padded row's real positions equal the prompt alone
    padded = model(batch, attention_mask=mask, use_cache=False).logits
    alone = model(short, use_cache=False).logits
    assert (padded[0, 8:] - alone[0]).abs().max() <= 1e-5 * alone.abs().max()
    out = model.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
    solo = model.generate(short, max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences[0, 8:], solo.sequences[0])
    for batched, single in zip(out.scores, solo.scores):
        assert (batched[0] - single[0]).abs().max() <= 1e-5 * single.abs().max()
    longer = model.generate(long, max_new_tokens=12, do_sample=False)
    assert torch.equal(out.sequences[1], longer[0])


@torch.no_grad()
def test_beam_search_scores_equal_recomputed_log_probabilities(model):
    """Beam search reorders the SKA cache (across left-padding groups); the best beam's score must equal the
    sum of its tokens' log-probabilities under a full recomputation."""
    short, long = _prompt(11, 5), _prompt(19, 6)
    batch = torch.cat([torch.cat([torch.zeros(1, 8, dtype=torch.long), short], dim=1), long])
    mask = torch.ones_like(batch)
    mask[0, :8] = 0
    new = 10
    out = model.generate(batch, attention_mask=mask, max_new_tokens=new, num_beams=3, do_sample=False,
                         length_penalty=0.0, output_scores=True, return_dict_in_generate=True)
    for row, prompt in enumerate((short, long)):
        sequence = torch.cat([prompt, out.sequences[row, -new:][None]], dim=1)
        log_probs = model(sequence, use_cache=False).logits.log_softmax(-1)
        positions = torch.arange(prompt.shape[1] - 1, sequence.shape[1] - 1)
        recomputed = log_probs[0, positions, sequence[0, positions + 1]].sum()
        assert abs(out.sequences_scores[row] - recomputed) <= 1e-4 * abs(recomputed), row


@torch.no_grad()
def test_generate_with_softmax_and_ska_layers():
    """A stack holding both a growing softmax KV cache and SKA states: left-padded greedy generation equals
    the prompt alone (the softmax masks are sized from the SKA layer's token count when it comes first)."""
    torch.manual_seed(1)
    config = EchoHybridConfig(
        layers_block_type=["ska", "linear_attention", "full_attention", "mlp"], vocab_size=VOCAB, hidden_size=64,
        intermediate_size=96, mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=8, ska_num_heads=4,
        ska_rank=12, ska_value_dim=16, ska_chunk_size=8, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )
    model = EchoHybridForCausalLM(config).eval()
    short, long = _prompt(10, 7), _prompt(17, 8)
    batch = torch.cat([torch.cat([torch.zeros(1, 7, dtype=torch.long), short], dim=1), long])
    mask = torch.ones_like(batch)
    mask[0, :7] = 0
    out = model.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False)
    for row, prompt in enumerate((short, long)):
        alone = model.generate(prompt, max_new_tokens=12, do_sample=False)
        assert torch.equal(out[row, -12:], alone[0, -12:]), row
