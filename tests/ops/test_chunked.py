"""The vectorised torch path against the slow reference, closed forms and causality (SPEC §2–3, §11)."""

from __future__ import annotations

import pytest
import torch

from echo_megatron.ops import ska

from .common import GRAD_NAMES, forward_and_grads, make_inputs, rel_err


# (B, T, H, r, P, S, K): awkward sizes, B·H > 1, r not a power of two.
CASES = [
    (2, 1, 2, 5, 7, 16, 2),
    (1, 63, 2, 24, 32, 16, 1),
    (2, 64, 1, 5, 7, 64, 2),
    (1, 65, 2, 24, 7, 64, 3),
    (2, 65, 1, 5, 32, 16, 0),
    (1, 200, 2, 5, 7, 64, 2),
    (1, 200, 2, 24, 32, 16, 1),
    (2, 20, 1, 5, 7, 1, 2),
    (1, 33, 2, 24, 7, 1, 3),
]


def _compare_to_reference(inputs: dict, tolerance: float, **options) -> None:
    fast = forward_and_grads(inputs, "torch", **options)
    slow = forward_and_grads(inputs, "reference", **options)
    for name, a, b in zip(("y",) + GRAD_NAMES, fast, slow):
        assert rel_err(a, b) <= tolerance, f"{name}: rel err {rel_err(a, b):.3e} ({options})"


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}H{}r{}P{}S{}K{}".format(*c))
@pytest.mark.parametrize("norm", ["causal_max", "none"])
def test_chunk_causal_matches_reference_fp64(case, norm):
    batch, seq_len, heads, rank, value_dim, chunk, power = case
    inputs = make_inputs(batch, seq_len, heads, rank, value_dim, requires_grad=True, seed=seq_len)
    _compare_to_reference(inputs, 1e-9, chunk_size=chunk, power=power, norm=norm)


@pytest.mark.parametrize("case", CASES[1:6], ids=lambda c: "B{}T{}H{}r{}P{}S{}K{}".format(*c))
@pytest.mark.parametrize("mode", ["chunk_causal", "prefix"])
@pytest.mark.parametrize("norm", ["causal_max", "sequence_max", "none"])
@pytest.mark.filterwarnings("ignore:norm=\"sequence_max\"")
def test_masked_matches_reference_fp64(case, mode, norm):
    batch, seq_len, heads, rank, value_dim, chunk, power = case
    inputs = make_inputs(batch, seq_len, heads, rank, value_dim, requires_grad=True, seed=7)
    mask = (torch.rand(batch, seq_len, generator=torch.Generator().manual_seed(1)) > 0.3).float()
    _compare_to_reference(inputs, 1e-9, chunk_size=chunk, power=power, norm=norm, mode=mode, mask=mask)


@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[6], CASES[8]],
                         ids=lambda c: "B{}T{}H{}r{}P{}S{}K{}".format(*c))
@pytest.mark.parametrize("norm, masked", [("causal_max", False), ("none", True), ("sequence_max", True)])
@pytest.mark.parametrize("block_readouts", [1, 5])
@pytest.mark.filterwarnings("ignore:norm=\"sequence_max\"")
def test_chunk_causal_blocks_match_reference_and_the_whole_sequence_stages_fp64(case, norm, masked, block_readouts,
                                                                               monkeypatch):
    """The block-by-block chunk_causal pipeline (many small blocks here) gives the reference's values and
    gradients; its outputs are bitwise those of the whole-sequence stages (which packed sequences take),
    its gradients equal up to the order of summation across blocks."""
    from echo_megatron.ops import chunked

    batch, seq_len, heads, rank, value_dim, chunk, power = case
    inputs = make_inputs(batch, seq_len, heads, rank, value_dim, requires_grad=True, seed=11)
    mask = (torch.rand(batch, seq_len, generator=torch.Generator().manual_seed(2)) > 0.3).double() if masked else None
    options = dict(chunk_size=chunk, power=power, norm=norm, mask=mask)
    monkeypatch.setattr(chunked, "BLOCK_READOUTS", block_readouts)
    _compare_to_reference(inputs, 1e-9, **options)
    if batch > 1:  # packed sequences (the whole-sequence stages) need B = 1
        return
    blocks = forward_and_grads(inputs, "torch", **options)
    whole = forward_and_grads(inputs, "torch", **options, cu_seqlens=torch.tensor([0, seq_len]))
    assert torch.equal(blocks[0], whole[0]), f"y: blocks differ from the whole-sequence stages by {rel_err(blocks[0], whole[0]):.1e}"
    for name, a, b in zip(GRAD_NAMES, blocks[1:], whole[1:]):
        assert rel_err(a, b) <= 1e-13, f"{name}: rel err {rel_err(a, b):.1e}"


@pytest.mark.parametrize("mode", ["chunk_causal", "prefix"])
def test_packed_sequences_match_reference_and_isolated_runs(mode):
    inputs = make_inputs(1, 150, 2, 5, 7, requires_grad=True, seed=3)
    cu_seqlens = torch.tensor([0, 17, 17, 81, 130, 150])
    options = dict(chunk_size=16, power=2, mode=mode)
    _compare_to_reference(inputs, 1e-9, cu_seqlens=cu_seqlens, **options)
    packed = ska(**{n: inputs[n] for n in ("q", "k", "v")}, eta=inputs["eta"], gamma=inputs["gamma"],
                 cu_seqlens=cu_seqlens, **options)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        alone = ska(inputs["q"][:, start:end], inputs["k"][:, start:end], inputs["v"][:, start:end],
                    eta=inputs["eta"], gamma=inputs["gamma"], **options)
        assert rel_err(packed[:, start:end], alone) <= 1e-12


@pytest.mark.parametrize("case", [CASES[1], CASES[5], CASES[6]], ids=["T63", "T200r5", "T200r24"])
def test_fp32_matches_fp64_reference(case):
    """fp32 inputs (fp32 statistics) stay within 1e-4 of the fp64 reference for iid keys."""
    batch, seq_len, heads, rank, value_dim, chunk, power = case
    exact = make_inputs(batch, seq_len, heads, rank, value_dim, requires_grad=True, seed=11)
    single = {n: x.detach().float().requires_grad_() for n, x in exact.items()}
    options = dict(chunk_size=chunk, power=power)
    fast = forward_and_grads(single, "torch", **options)
    slow = forward_and_grads(exact, "reference", **options)
    assert fast[0].dtype == torch.float32
    for name, a, b in zip(("y",) + GRAD_NAMES, fast, slow):
        assert rel_err(a, b) <= 1e-4, name


def test_gradcheck_chunked_fp64():
    inputs = make_inputs(1, 11, 2, 3, 2, requires_grad=True, seed=5)

    def fn(q, k, v, eta, gamma):
        return ska(q, k, v, eta=eta, gamma=gamma, chunk_size=4, power=2, backend="torch")

    assert torch.autograd.gradcheck(fn, tuple(inputs[n] for n in GRAD_NAMES), eps=1e-6, atol=1e-7)


def test_power_zero_is_ridge_predictor():
    """K = 0: y = η C G̃⁻¹ q, with G̃ = G + eps·m²·I built here from scratch (prefix mode, all visible)."""
    inputs = make_inputs(1, 40, 1, 6, 3, seed=2)
    q, k, v = (inputs[n][0, :, 0] for n in ("q", "k", "v"))
    eps = 1e-2
    y = ska(inputs["q"], inputs["k"], inputs["v"], eta=inputs["eta"], gamma=inputs["gamma"], power=0, eps=eps,
            mode="prefix")[0, :, 0]
    gram = k.T @ k + eps * k.norm(dim=1).max() ** 2 * torch.eye(6, dtype=k.dtype)
    cross = v.T @ k
    expected = inputs["eta"][0] * (cross @ torch.linalg.solve(gram, q.T)).T
    assert rel_err(y, expected) <= 1e-12


def test_power_one_closed_form_chunk_causal():
    """K = 1, chunk c: y = η γ̂ C G̃⁻¹ M G̃⁻¹ q over the tokens of earlier chunks (σ ≤ 1 so a = γ̂)."""
    inputs = make_inputs(1, 48, 1, 5, 4, seed=4)
    q, k, v = (inputs[n][0, :, 0] for n in ("q", "k", "v"))
    eta, gamma, eps, chunk = inputs["eta"][0], inputs["gamma"][0], 1e-3, 16
    y = ska(inputs["q"], inputs["k"], inputs["v"], eta=inputs["eta"], gamma=inputs["gamma"], power=1, eps=eps,
            chunk_size=chunk)[0, :, 0]
    for start in (16, 32):
        z, vals = k[:start], v[:start]
        gram = z.T @ z + eps * z.norm(dim=1).max() ** 2 * torch.eye(5, dtype=z.dtype)
        lag = z[1:].T @ z[:-1]
        readout = gamma * vals.T @ z @ torch.linalg.solve(gram, lag) @ torch.linalg.inv(gram)
        expected = eta * q[start:start + chunk] @ readout.T
        assert rel_err(y[start:start + chunk], expected) <= 1e-11
    assert torch.equal(y[:chunk], torch.zeros_like(y[:chunk]))


@pytest.mark.parametrize("scale", [8.0, 3.7, 1e-3])
def test_common_scale_of_keys_and_queries_is_invisible_under_causal_max(scale):
    inputs = make_inputs(2, 70, 2, 5, 7, seed=6)
    base = ska(inputs["q"], inputs["k"], inputs["v"], eta=inputs["eta"], gamma=inputs["gamma"], chunk_size=16)
    scaled = ska(inputs["q"] * scale, inputs["k"] * scale, inputs["v"], eta=inputs["eta"], gamma=inputs["gamma"],
                 chunk_size=16)
    assert rel_err(scaled, base) <= 1e-10


@pytest.mark.parametrize("chunk", [1, 16, 64])
@pytest.mark.parametrize("cut", [1, 15, 16, 17, 100])
def test_chunk_causal_outputs_never_see_the_future(chunk, cut):
    inputs = make_inputs(2, 130, 2, 5, 7, dtype=torch.float32, seed=8)
    base = ska(inputs["q"], inputs["k"], inputs["v"], eta=inputs["eta"], gamma=inputs["gamma"], chunk_size=chunk)
    changed = {n: x.clone() for n, x in inputs.items()}
    for name in ("q", "k", "v"):
        changed[name][:, cut:] = 1e3 * torch.randn_like(changed[name][:, cut:])  # large norms: probes m too
    out = ska(changed["q"], changed["k"], changed["v"], eta=inputs["eta"], gamma=inputs["gamma"], chunk_size=chunk)
    assert torch.equal(out[:, :cut], base[:, :cut])
    assert not torch.equal(out[:, cut:], base[:, cut:])


@pytest.mark.filterwarnings("ignore:norm=\"sequence_max\"")
def test_sequence_max_leaks_the_future():
    """Documents SPEC §9 trap 1: the whole-sequence max norm makes early outputs depend on late keys."""
    inputs = make_inputs(1, 64, 1, 5, 7, seed=9)
    options = dict(eta=inputs["eta"], gamma=inputs["gamma"], chunk_size=16, norm="sequence_max")
    base = ska(inputs["q"], inputs["k"], inputs["v"], **options)
    k = inputs["k"].clone()
    k[:, 60] *= 100.0
    out = ska(inputs["q"], k, inputs["v"], **options)
    assert not torch.allclose(out[:, 16:32], base[:, 16:32])


def test_whitened_operator_spectral_norm_is_at_most_one():
    """SPEC §2 step 4: every lag pair lies inside G's token set, so σ_max(W) ≤ 1 (Cauchy–Schwarz)."""
    from echo_megatron.ops.chunked import ChunkLayout, chunk_statistics, exclusive_prefix

    gen = torch.Generator().manual_seed(10)
    k = torch.randn(3, 128, 2, 6, generator=gen, dtype=torch.float64)
    k[1] = k[1, :1].expand_as(k[1]) + 1e-3 * k[1]  # nearly repeated keys: the worst case for the bound
    k[2] = torch.cumsum(k[2], dim=0)  # slowly drifting keys: σ close to 1
    layout = ChunkLayout.build(128, 8, None, k.device)
    stats = exclusive_prefix(chunk_statistics(k, torch.zeros(3, 128, 2, 1, dtype=k.dtype), layout, None), layout)
    gram = stats.gram[:, :, 1:] + 1e-3 * stats.max_norm[:, :, 1:, None, None] ** 2 * torch.eye(6, dtype=k.dtype)
    chol = torch.linalg.cholesky(gram)
    whitened = torch.linalg.solve_triangular(chol, torch.linalg.solve_triangular(chol, stats.lag[:, :, 1:],
                                             upper=False).mT, upper=False).mT
    sigma = torch.linalg.matrix_norm(whitened, ord=2)
    assert sigma.max().item() <= 1.0 + 1e-12
    assert sigma.max().item() > 0.9  # the bound is nearly attained, so the test can fail


@pytest.mark.parametrize("cu_seqlens", [None, [0, 17, 17, 81, 130, 150]], ids=["one-sequence", "packed"])
def test_token_grid_is_keys_previous_keys_values(cu_seqlens):
    """`ChunkLayout.token_grid` against the grid written token by token from its definition: each sequence
    starts its own chunk grid; token t of a sequence sits in chunk t // S, slot t % S, holding
    [z_t | z_{t-1} (0 at the sequence start, `before` for a block's first token) | v_t]; padding slots have
    z = v = 0 and, as previous key, the z of the slot before them (the last key, then 0: their lag pair is 0)."""
    from echo_megatron.ops.chunked import ChunkLayout

    size = 16
    gen = torch.Generator().manual_seed(4)
    k, v = torch.randn(1, 150, 3, 5, generator=gen), torch.randn(1, 150, 3, 7, generator=gen)
    before = torch.randn(1, 3, 5, generator=gen) if cu_seqlens is None else None  # a block of a longer sequence
    bounds = [0, 150] if cu_seqlens is None else cu_seqlens
    chunks = [-(-(end - start) // size) for start, end in zip(bounds[:-1], bounds[1:])]
    expected = torch.zeros(1, 3, sum(chunks), size, 2 * 5 + 7)
    for sequence, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        for t in range(end - start):
            chunk, slot = sum(chunks[:sequence]) + t // size, t % size
            previous = k[0, start + t - 1] if t else (before[0] if before is not None else torch.zeros(3, 5))
            expected[0, :, chunk, slot] = torch.cat([k[0, start + t], previous, v[0, start + t]], dim=-1)
        if (end - start) % size:  # the first padding slot
            chunk, slot = sum(chunks[:sequence]) + (end - start) // size, (end - start) % size
            expected[0, :, chunk, slot, 5:10] = k[0, end - 1]
    layout = ChunkLayout.build(150, size, None if cu_seqlens is None else torch.tensor(cu_seqlens), k.device)
    assert torch.equal(layout.token_grid(k, v, before), expected)


