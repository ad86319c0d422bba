"""Context-parallel SKA (`echo_megatron.ops.context_parallel`) == SKA on the whole sequences, forward and every
gradient, on Megatron's load-balanced CP layout: 2 gloo processes (torch.multiprocessing.spawn), one spawn for
all cases; each rank writes its worst errors to a JSON file the test checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from echo_megatron.ops import ska
from echo_megatron.ops.context_parallel import check_context_parallel_layout, ska_context_parallel
from megatron.core.utils import get_batch_on_this_cp_rank

from .common import GRAD_NAMES, make_inputs, rel_err

CP = 2
PACKED_DOCS = [32, 64, 16]  # global document lengths, each a multiple of 2·CP·S with S = 4 (a packed row: B = 1)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
# (name, backend, dtype, norm, power, chunk_size, batch, seq_len): segments of 16 tokens hold 2 chunks (S=8) or
# 1 (S=16). The Triton stages run under the interpreter here (fp32, fp64).
CASES = [(f"torch_{str(dtype)[6:]}_{norm}_K{power}", "torch", dtype, norm, power, 8, 2, 64)
         for dtype in (torch.float64, torch.float32) for norm in ("causal_max", "none") for power in (0, 1, 2)]
CASES += [("torch_float64_causal_max_K2_S16", "torch", torch.float64, "causal_max", 2, 16, 1, 64),
          ("torch_float64_packed_thd", "torch", torch.float64, "causal_max", 2, 4, 1, PACKED_DOCS)]
TRITON_CASES = [("triton_float32_causal_max_K2", "triton", torch.float32, "causal_max", 2, 8, 2, 64),
                ("triton_float32_none_K1", "triton", torch.float32, "none", 1, 8, 2, 64),
                ("triton_float64_causal_max_K0_S16", "triton", torch.float64, "causal_max", 0, 16, 1, 64),
                ("triton_float32_packed_thd", "triton", torch.float32, "causal_max", 2, 4, 1, PACKED_DOCS)]


def _weights(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    return torch.linspace(-1.0, 2.0, shape.numel(), dtype=torch.float64).view(shape).to(dtype)


def _full_run(inputs: dict, **options) -> dict[str, torch.Tensor]:
    """CP = 1: y and the gradients of a fixed weighted sum of y."""
    y = ska(inputs["q"], inputs["k"], inputs["v"], eta=inputs["eta"], gamma=inputs["gamma"], **options)
    grads = torch.autograd.grad((y * _weights(y.shape, y.dtype)).sum(), [inputs[n] for n in GRAD_NAMES])
    return {"y": y.detach(), **dict(zip(GRAD_NAMES, grads))}


def _cp_run(inputs: dict, split, weights: torch.Tensor, **options) -> dict[str, torch.Tensor]:
    """CP = 2 on this rank's tokens; per-head gradients summed over the group (as Megatron's DP×CP all-reduce)."""
    local = {n: split(inputs[n]).detach().requires_grad_() for n in ("q", "k", "v")}
    params = {n: inputs[n].detach().requires_grad_() for n in ("eta", "gamma")}
    y = ska_context_parallel(local["q"], local["k"], local["v"], params["eta"], params["gamma"], cp_group=None,
                             **options)
    (y * split(weights)).sum().backward()
    for param in params.values():
        dist.all_reduce(param.grad)
    return {"y": y.detach(), **{n: local[n].grad for n in ("q", "k", "v")}, **{n: params[n].grad for n in params}}


def _errors(expected: dict, actual: dict, split) -> dict[str, float]:
    return {name: rel_err(actual[name], split(want) if name in ("y", "q", "k", "v") else want)
            for name, want in expected.items()}


def _megatron_split(x: torch.Tensor) -> torch.Tensor:
    """This rank's tokens of x [B, T, ...], exactly as Megatron's data path cuts them."""
    return get_batch_on_this_cp_rank({"x": x}, is_hybrid_cp=False, cp_group=dist.group.WORLD)["x"]


def _packed_split(x: torch.Tensor) -> torch.Tensor:
    """Per-document balancing (TE's thd_get_partitioned_indices): segments i and 2c-1-i of every document."""
    rank, pieces, start = dist.get_rank(), [], 0
    for length in PACKED_DOCS:
        segments = x[:, start:start + length].chunk(2 * CP, dim=1)
        pieces += [segments[rank], segments[2 * CP - 1 - rank]]
        start += length
    return torch.cat(pieces, dim=1)


def _worker(rank: int, port: int, out_dir: str, cases: list) -> None:
    """Every case on this rank: seq_len is a length (batch rows) or a list of packed document lengths."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=CP)
    results = {}
    for name, backend, dtype, norm, power, chunk_size, batch, seq_len in cases:
        packed = isinstance(seq_len, list)
        inputs = make_inputs(batch, sum(seq_len) if packed else seq_len, 2, 5, 3, dtype=dtype, seed=power + 7,
                             requires_grad=True)
        options = dict(chunk_size=chunk_size, power=power, norm=norm, backend=backend)
        if packed:
            options["cu_seqlens"] = torch.tensor([0] + seq_len).cumsum(0)
        split = _packed_split if packed else _megatron_split
        expected = _full_run(inputs, **options)
        actual = _cp_run(inputs, split, _weights(expected["y"].shape, dtype), **options)
        results[name] = _errors(expected, actual, split)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _spawn(out_dir: Path, cases: list) -> list[dict]:
    from tests.megatron.common import free_port

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(free_port(), str(out_dir), cases), nprocs=CP, join=True)
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(CP)]


def _check(errors_per_rank: list[dict], case: str) -> None:
    tolerance = TOLERANCE[torch.float32 if "float32" in case else torch.float64]
    for rank, errors in enumerate(errors_per_rank):
        worst = max(errors[case].values())
        assert worst <= tolerance, f"rank {rank}: {errors[case]}"


@pytest.fixture(scope="module")
def cp_errors(tmp_path_factory) -> list[dict]:
    return _spawn(tmp_path_factory.mktemp("cp"), CASES)


@pytest.mark.multiproc
@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_cp2_equals_cp1_forward_and_gradients(cp_errors, case):
    _check(cp_errors, case)


@pytest.mark.multiproc
@pytest.mark.slow
def test_cp2_equals_cp1_triton_stages(tmp_path):
    """The Triton path (kernels under the interpreter on CPU) against `ska(backend="triton")` at CP = 1."""
    errors = _spawn(tmp_path, TRITON_CASES)
    for case, *_ in TRITON_CASES:
        _check(errors, case)


def test_layout_check_names_the_sizes():
    check_context_parallel_layout(256, 2, 64)
    check_context_parallel_layout(100, 1, 64)  # no CP: no constraint
    with pytest.raises(ValueError, match=r"seq_length \(192\) must be a multiple of .* = 256"):
        check_context_parallel_layout(192, 2, 64)


def test_exchange_size_matches_the_flops_accounting():
    """The all-gathered payload per sequence is exactly what `flops.ska_cp_exchange_numbers` counts."""
    from echo_megatron.megatron.flops import ska_cp_exchange_numbers
    from echo_megatron.ops.chunked import ChunkLayout, chunk_statistics
    from echo_megatron.ops.chunked import _sequence_totals
    from echo_megatron.ops.context_parallel import _flat_rows, _segment_payload, local_segment_bounds

    inputs = make_inputs(3, 32, 2, 5, 3)
    bounds = local_segment_bounds(32, 4, None, torch.device("cpu"))
    layout = ChunkLayout.build(32, 8, bounds, torch.device("cpu"))
    totals = _sequence_totals(chunk_statistics(inputs["k"], inputs["v"], layout, None), layout)
    payload = _segment_payload(_flat_rows(totals), totals.max_norm, inputs["k"], bounds)
    assert payload.shape[:3] == (3, 2, 2)
    assert payload[0].numel() == ska_cp_exchange_numbers(num_heads=2, rank=5, value_dim=3) == 2 * 2 * (50 + 15 + 11)
