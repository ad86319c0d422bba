"""SKA operator activation memory and time at the presets' shapes, one GPU, bf16, T tokens, batch 1.

Saved bytes per token: allocated after the forward minus inputs and output; the SKA term of the memory
estimates in examples/README.md (scripts/examples_table.py reads the JSON). Needs torch and triton only.
    python benchmarks/ska_activation_memory.py --out benchmarks/results/ska_activation_memory_h200.json
"""

import argparse
import json
from pathlib import Path

import torch

from echo_megatron.ops import ska

# name: (heads H, rank r, value width P, chunk S, power K) as in echo_megatron.megatron.presets (tested);
# "echo-8b r=64" is echo-8b before its r = 128 (the committed H200 run measured it as "echo-8b"), for the cost.
SHAPES = {"echo-50m": (7, 56, 64, 64, 2), "echo-180m": (12, 48, 64, 64, 2), "echo-1b": (16, 64, 128, 64, 2),
          "echo-8b": (32, 128, 128, 64, 2), "echo-8b r=64": (32, 64, 128, 64, 2), "r=128": (16, 128, 128, 64, 2)}


def measure(heads, rank, value_dim, chunk, power, tokens, backend) -> dict:
    def tensor(*shape, fill=None):
        x = torch.randn(*shape) if fill is None else torch.full(shape, fill)
        dtype = torch.bfloat16 if fill is None else torch.float32
        return x.to("cuda", dtype).requires_grad_()

    q, k, v = tensor(1, tokens, heads, rank), tensor(1, tokens, heads, rank), tensor(1, tokens, heads, value_dim)
    eta, gamma = tensor(heads, fill=1.5), tensor(heads, fill=1.2)

    def step():
        return ska(q, k, v, eta=eta, gamma=gamma, chunk_size=chunk, power=power, backend=backend)

    for _ in range(2):  # warm-up: compilation, allocator
        step().sum().backward()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    y = step()
    saved = torch.cuda.memory_allocated() - before - y.numel() * y.element_size()
    y.sum().backward()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        step().sum().backward()
    stop.record()
    torch.cuda.synchronize()
    return {"saved_bytes_per_token": saved / tokens, "fwd_bwd_ms": start.elapsed_time(stop) / 10}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, shape in SHAPES.items():
        for backend in ("triton", "torch"):
            row = {"preset": name, "shape": shape, "backend": backend}
            try:
                row.update(measure(*shape, args.tokens, backend))
            except Exception as error:  # a shape a backend cannot run is a result too
                row["error"] = f"{type(error).__name__}: {error}"[:200]
            rows.append(row)
            print(row, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                    "tokens": args.tokens, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
