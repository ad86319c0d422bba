"""Where the Triton path's GPU gradients lose accuracy: per-token errors vs the fp64 reference.

The H200 run of `scripts/gpu_check.sh` on 2026-11-28 (docs/results/h200/) failed four section-a cases on
dk only; this script prints, for those cases, the worst element and the worst tokens of y, dq and dk for
the Triton and torch paths, and whether two Triton runs are bit-identical (a race would show here).
`--ieee` forces IEEE fp32 `tl.dot` (instead of tf32x3) to tell tensor-core rounding from other causes.

    PYTHONPATH=$PWD python benchmarks/triton_gpu_precision.py [--ieee]      # on a CUDA machine
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check as check  # noqa: E402

import echo_megatron.ops.triton.function as triton_function  # noqa: E402

CASES = (
    (torch.float32, check.Case(2, 3, 24, 20, 65, 16)),
    (torch.float32, check.Case(1, 3, 24, 20, 200, 16, cu_seqlens=(0, 1, 64, 65, 130, 200))),
    (torch.float32, check.Case(1, 2, 24, 20, 130, 16, options=(("norm", "none"),))),
    (torch.float16, check.Case(1, 2, 48, 40, 200, 64)),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ieee", action="store_true", help="IEEE fp32 tl.dot instead of tf32x3")
    args = parser.parse_args()
    if args.ieee:
        triton_function._dot_precision = lambda dtype: "ieee"
    device = torch.device("cuda")
    for dtype, case in CASES:
        master, reference = check.random_inputs(case, 0), check.reference_result(case, 0)
        runs = {backend: check.forward_backward(master, case, backend, dtype, device) for backend in ("triton", "torch")}
        again = check.forward_backward(master, case, "triton", dtype, device)
        identical = all(torch.equal(again[name], runs["triton"][name]) for name in again)
        print(f"{dtype} {case.label()}: two Triton runs bit-identical: {identical}")
        for backend, out in runs.items():
            for name in ("y", "dq", "dk"):
                err = (out[name].double().cpu() - reference[name]).abs() / reference[name].abs().max()
                per_token = err.amax(dim=(0, 2, 3))
                worst = torch.topk(per_token, min(4, per_token.numel()))
                tokens = ", ".join(f"t={int(i)}: {float(v):.1e}" for v, i in zip(worst.values, worst.indices))
                print(f"  {backend:6s} {name}: max {err.max():.2e}; worst tokens {tokens}")


if __name__ == "__main__":
    main()
