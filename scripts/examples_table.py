"""Tables of examples/README.md, computed from the launch scripts, the presets and the FLOP model.

    python scripts/examples_table.py           # print the tables (markdown)
    python scripts/examples_table.py --write   # replace them in examples/README.md

Each script is run with a stub `torchrun` that records its arguments (nothing is launched), so the layout
in the tables is exactly what the script passes. Parameters come from `echo_megatron.megatron.params`
(tested against real builds), FLOPs from `echo_megatron.megatron.flops` (tested against
`torch.utils.flop_counter`). Memory and throughput are ESTIMATES under the assumptions in `ASSUMPTIONS`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
README = EXAMPLES / "README.md"
SKA_MEMORY = ROOT / "benchmarks" / "results" / "ska_activation_memory_h200.json"
BEGIN, END = "<!-- examples-table:begin (scripts/examples_table.py --write) -->", "<!-- examples-table:end -->"
SCRIPTS = ("pretrain_echo_50m.sh", "pretrain_echo_180m.sh", "pretrain_echo_1b.sh", "pretrain_echo_8b.sh",
           "pretrain_echo_tiny_cpu.sh")

PEAK_FLOPS = 989e12  # H100 SXM dense bf16
MULTIPROCESSORS = 132  # H100 and H200 SXM: what the SKA kernels' chunks per block are chosen for
MFU = 0.40
GPU_MEMORY_GIB = 80
ASSUMPTIONS = """\
Estimates, not measurements of training runs (no launcher ran on a GPU for these tables; only the SKA
operator's activation memory and speed were measured, on one H200, with the Triton kernels as of that run):
- tokens/s per GPU = {mfu:.0%} MFU × {peak:.0f} TFLOP/s (H100 or H200 SXM, dense bf16) / training FLOPs per
  token from `echo_megatron.megatron.flops` (forward + backward, SKA linear in T). Megatron's own MFU
  formula counts the '*' layers as causal softmax attention; its figure is shown for comparison.
  Small models rarely reach 40% MFU (kernel launches and communication dominate): read the 50M and
  180M rows as upper bounds. SKA's chunked operator runs far below matmul efficiency: the last column
  is the MEASURED bound (benchmarks/ska_activation_memory.py, Triton kernels as of that run, one H200,
  batch 1, T = 4096, forward + backward) on tokens/s per GPU if a GPU did nothing but its share (1/TP) of
  the SKA operators; where it is not far above the estimate, the estimate is too optimistic (batch 1 gives
  the kernels the least parallelism, so the bound is conservative for larger micro-batches). "not
  measured" where that run did not cover the preset's SKA shape.
- model and optimizer state: Megatron's `theoretical_memory_usage` rule, 18 bytes per parameter, or
  6 + 12/DP with the distributed optimizer (bf16 weights, fp32 gradients, fp32 master weights and Adam
  moments), for the parameters of one tensor-parallel rank (all matrices split by TP; the few replicated
  norm vectors are counted in full).
- activations: bf16 tensors saved for the backward per token and layer, micro-batch × sequence × Σ layers,
  divided by TP (sequence parallelism splits the rest): Mamba-2 2d + in_proj output + conv output + 2·d_in;
  SKA 2d + q/k/v + H·P, plus what the SKA operator itself keeps per token, COMPUTED by
  `echo_megatron.megatron.flops.ska_triton_saved_bytes` at the chunks per block G that the script's
  micro-batch, heads per TP rank and chunks per sequence give the kernels on a {multiprocessors}-SM GPU
  (`ops.triton.function.gpu_chunks_per_block`; the dense kernels recompute the statistics of G - 1 chunks in
  G): {ska_memory}. At G = 1 (every chunk's statistics kept, as the kernels of the H200 run did) the model
  is within 0.1 % of every row MEASURED there (benchmarks/ska_activation_memory.py, bf16, T = 4096,
  benchmarks/results/ska_activation_memory_h200.json): {ska_measured};
  MLP 2d + fc1 output + fc2 input;
  Koopman MLP 2d + 3·d_k; fp32 logits and softmax (2·V fp32); ×PP micro-batches in flight on the first
  pipeline stage. No activation recomputation (Megatron's `--recompute-*`), no allocator overhead or
  communication buffers.
"""


def run_with_stub_torchrun(script: str, *args: str, env: dict[str, str] | None = None
                           ) -> tuple[subprocess.CompletedProcess, list[str] | None]:
    """Run `examples/<script> args` in a scratch directory with a stub `torchrun` on PATH that only
    records its argv; returns the finished process and that argv (None if torchrun was not reached)."""
    with tempfile.TemporaryDirectory() as scratch:
        stub = Path(scratch) / "bin" / "torchrun"
        stub.parent.mkdir()
        stub.write_text('#!/usr/bin/env bash\nprintf "%s\\0" "$@" > "$ARGV_FILE"\n')
        stub.chmod(0o755)
        argv_file = Path(scratch) / "argv"
        environment = {"PATH": f"{stub.parent}:{os.environ['PATH']}", "ARGV_FILE": str(argv_file),
                       "HOME": scratch, **(env or {})}
        result = subprocess.run(["bash", str(EXAMPLES / script), *args], cwd=scratch, env=environment,
                                capture_output=True, text=True)
        argv = argv_file.read_text().split("\0")[:-1] if argv_file.exists() else None
        return result, argv


def launch_argv(script: str) -> list[str]:
    """The argv `examples/<script>` passes to torchrun with its default environment."""
    result, argv = run_with_stub_torchrun(script)
    if result.returncode or argv is None:
        raise RuntimeError(f"{script} failed ({result.returncode}): {result.stderr}")
    return argv


@dataclass(frozen=True)
class Layout:
    """What a script launches: preset, processes, parallel sizes, batch and sequence."""

    preset: str
    gpus: int
    tp: int
    pp: int
    micro_batch: int
    global_batch: int
    seq_length: int
    sequence_parallel: bool
    distributed_optimizer: bool
    untied: bool
    cpu: bool

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)


@functools.lru_cache(maxsize=None)
def script_layout(script: str) -> Layout:
    """Parse the flags of `script`'s launch (the defaults of its environment variables; run once per process)."""
    from torch.distributed.run import get_args_parser

    torchrun = get_args_parser().parse_args(launch_argv(script))
    parser = argparse.ArgumentParser(allow_abbrev=False)
    for flag, kind in (("--echo-preset", str), ("--tensor-model-parallel-size", int),
                       ("--pipeline-model-parallel-size", int), ("--micro-batch-size", int),
                       ("--global-batch-size", int), ("--seq-length", int)):
        parser.add_argument(flag, type=kind, required=flag == "--echo-preset")
    for flag in ("--sequence-parallel", "--use-distributed-optimizer", "--untie-embeddings-and-output-weights",
                 "--cpu"):
        parser.add_argument(flag, action="store_true")
    args, _ = parser.parse_known_args(torchrun.training_script_args)
    return Layout(
        preset=args.echo_preset, gpus=int(torchrun.nproc_per_node) * int(torchrun.nnodes.split(":")[-1]),
        tp=args.tensor_model_parallel_size or 1, pp=args.pipeline_model_parallel_size or 1,
        micro_batch=args.micro_batch_size, global_batch=args.global_batch_size, seq_length=args.seq_length,
        sequence_parallel=args.sequence_parallel, distributed_optimizer=args.use_distributed_optimizer,
        untied=args.untie_embeddings_and_output_weights, cpu=args.cpu,
    )


def ska_measurements() -> list[dict]:
    """The SKA operator runs measured with the Triton kernels on one H200 (B = 1): preset name and shape
    (H, r, P, S, K) as measured, saved bytes per token, forward+backward ms at `tokens` tokens."""
    results = json.loads(SKA_MEMORY.read_text())
    return [{**row, "shape": tuple(row["shape"]), "tokens": results["tokens"]} for row in results["rows"]
            if row["backend"] == "triton" and "error" not in row]


def ska_shape(config) -> tuple[int, int, int, int, int]:
    """(H, r, P, S, K) of an SKAConfig, as benchmarks/ska_activation_memory.py names a shape."""
    return config.ska_num_heads, config.ska_rank, config.ska_value_dim, config.ska_chunk_size, config.ska_power


def ska_measurement(config) -> dict | None:
    """The H200 measurement at `config`'s SKA shape, or None where none was measured."""
    return next((row for row in ska_measurements() if row["shape"] == ska_shape(config)), None)


def ska_chunks_per_block(config, layout: Layout) -> int:
    """G, the chunks per block the chunk_causal dense kernels take at `layout`'s micro-batch, heads per
    tensor-parallel rank and sequence length on a MULTIPROCESSORS-SM GPU."""
    from echo_megatron.ops.triton.function import gpu_chunks_per_block

    num_chunks = -(-layout.seq_length // config.ska_chunk_size)
    batch_heads = layout.micro_batch * config.ska_num_heads // layout.tp
    return gpu_chunks_per_block(batch_heads, num_chunks, MULTIPROCESSORS)


def ska_computed_bytes_per_token(shape: tuple[int, int, int, int, int], chunks_per_block: int = 1) -> float:
    """What the SKA operator of `shape` keeps for the backward per token, from the byte model, at G =
    chunks_per_block."""
    from echo_megatron.megatron.flops import ska_triton_saved_bytes

    heads, rank, value_dim, chunk, _ = shape
    return heads * ska_triton_saved_bytes(rank=rank, value_dim=value_dim, chunk_size=chunk,
                                          chunks_per_block=chunks_per_block)


def ska_saved_bytes_per_token(config, layout: Layout) -> float:
    """The SKA operator's saved bytes per token at `layout` (computed at its chunks per block)."""
    return ska_computed_bytes_per_token(ska_shape(config), ska_chunks_per_block(config, layout))


def assumptions(layouts: list[Layout]) -> str:
    """ASSUMPTIONS with the SKA operator term of the GPU rows' `layouts` (computed at each one's chunks per
    block) and the H200 measurements of their presets next to the model at G = 1."""
    from echo_megatron.megatron import get_preset

    computed_terms, measured_terms = [], []
    for layout in layouts:
        config = get_preset(layout.preset).make_config()
        every = ska_chunks_per_block(config, layout)
        computed_terms.append(f"{layout.preset} {ska_saved_bytes_per_token(config, layout) / 1e3:.1f} kB (G = {every})")
        for row in ska_measurements():
            if row["preset"] == layout.preset:
                at_rank = "" if row["shape"] == ska_shape(config) else f" at r = {row['shape'][1]}"
                measured_terms.append(f"{layout.preset}{at_rank} {row['saved_bytes_per_token'] / 1e3:.1f} kB "
                                      f"(model {ska_computed_bytes_per_token(row['shape']) / 1e3:.1f} kB)")
    return ASSUMPTIONS.format(mfu=MFU, peak=PEAK_FLOPS / 1e12, multiprocessors=MULTIPROCESSORS,
                              ska_memory=", ".join(computed_terms), ska_measured=", ".join(measured_terms))


def activation_elements_per_token(symbol: str, config, ffn: str, layout: Layout) -> float:
    """bf16-sized elements one layer of `preset` saves for the backward per token at `layout` (see
    ASSUMPTIONS)."""
    from echo_megatron.megatron.flops import mamba_inner_and_heads
    from echo_megatron.megatron.koopman_mlp import koopman_width

    d = config.hidden_size
    if symbol == "M":
        inner, heads = mamba_inner_and_heads(config)
        xbc = inner + 2 * config.mamba_num_groups * config.mamba_state_dim
        return 2 * d + (inner + xbc + heads) + xbc + 2 * inner
    if symbol == "*":
        h, r, p = config.ska_num_heads, config.ska_rank, config.ska_value_dim
        return 2 * d + h * (2 * r + p) + h * p + ska_saved_bytes_per_token(config, layout) / 2
    if ffn == "koopman":
        return 2 * d + 3 * koopman_width(d)
    return 2 * d + config.ffn_hidden_size * (3 if config.gated_linear_unit else 2)


@dataclass(frozen=True)
class Row:
    script: str
    layout: Layout
    params: int
    params_by_kind: dict[str, int]
    flops_per_token: float
    megatron_flops_per_token: float
    state_gib: float
    activation_gib: float
    ska_bound: float | None  # tokens/s per GPU if it ran only the SKA operators at their measured speed
    ska_rank: int

    @property
    def tokens_per_s(self) -> float:
        return MFU * PEAK_FLOPS / self.flops_per_token


def estimate(script: str, **config_overrides) -> Row:
    """The row of `script`; `config_overrides` replace fields of its preset's `SKAConfig` (e.g. ska_rank)."""
    from megatron.core.models.hybrid.hybrid_layer_allocation import get_hybrid_layer_counts

    from echo_megatron.megatron import get_preset
    from echo_megatron.megatron.flops import hybrid_model_flops
    from echo_megatron.megatron.params import hybrid_model_params, layer_params

    layout = script_layout(script)
    preset = get_preset(layout.preset)
    config = preset.make_config(**config_overrides)
    seq, counts = layout.seq_length, get_hybrid_layer_counts(preset.pattern)
    params = hybrid_model_params(preset.pattern, config, vocab_size=preset.vocab_size, ffn=preset.ffn,
                                 tie_embeddings=not layout.untied)
    by_kind = {name: counts[symbol] * layer_params(symbol, config, ffn=preset.ffn)
               for name, symbol in (("Mamba-2", "M"), ("SKA", "*"), ("FFN", "-"))}
    by_kind["embeddings"] = params - sum(by_kind.values())
    flops = hybrid_model_flops(preset.pattern, config, seq_length=seq, vocab_size=preset.vocab_size, ffn=preset.ffn)
    megatron = hybrid_model_flops(preset.pattern, config, seq_length=seq, vocab_size=preset.vocab_size,
                                  ffn=preset.ffn, attention="softmax")
    bytes_per_param = 6 + 12 / layout.dp if layout.distributed_optimizer else 18
    state = params / layout.tp * bytes_per_param
    activations, ska_bound = 0.0, None
    if not layout.cpu:
        measured = ska_measurement(config)
        if measured:
            ska_bound = measured["tokens"] / (measured["fwd_bwd_ms"] / 1e3 * counts["*"] / layout.tp)
        per_token = sum(count * activation_elements_per_token(symbol, config, preset.ffn, layout)
                        for symbol, count in counts.items() if count)
        per_token += 2 * preset.vocab_size * 2 + config.hidden_size  # fp32 logits and softmax, embedding output
        activations = layout.micro_batch * seq * per_token * 2 / layout.tp * layout.pp
    return Row(script, layout, params, by_kind, flops.total / seq, megatron.total / seq, state / 2**30,
               activations / 2**30, ska_bound, config.ska_rank)


def _millions(n: float) -> str:
    """3 significant figures with a B / M / k suffix."""
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def render(rows: list[Row]) -> str:
    out = ["| script | preset | parameters (Mamba-2 / SKA / FFN / embeddings) | layout on the default GPUs | "
           "train FLOPs per token (Megatron's count) | memory per GPU, estimate (state + activations) | "
           "tokens/s per GPU, estimate | SKA operators alone, measured bound |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lay = row.layout
        kinds = " / ".join(_millions(row.params_by_kind[k]) for k in ("Mamba-2", "SKA", "FFN", "embeddings"))
        if lay.cpu:
            layout = f"{lay.gpus} CPU processes (gloo): TP {lay.tp}{' + SP' if lay.sequence_parallel else ''}, " \
                     f"DP {lay.dp}; micro-batch {lay.micro_batch}, global {lay.global_batch} × {lay.seq_length}"
            memory = throughput = bound = "CPU smoke test (not estimated)"
        else:
            accumulation = lay.global_batch // (lay.micro_batch * lay.dp)
            layout = (f"{lay.gpus} GPUs: TP {lay.tp}{' + SP' if lay.sequence_parallel else ''}, PP {lay.pp}, "
                      f"DP {lay.dp}; micro-batch {lay.micro_batch} × {accumulation} accumulation steps, "
                      f"global {lay.global_batch} × {lay.seq_length} tokens")
            total = row.state_gib + row.activation_gib
            memory = f"{total:.1f} GiB ({row.state_gib:.1f} + {row.activation_gib:.1f})"
            if total > GPU_MEMORY_GIB:
                memory += f" > {GPU_MEMORY_GIB} GiB"
            throughput = f"≈ {_millions(row.tokens_per_s)}"
            bound = f"≤ {_millions(row.ska_bound)}" if row.ska_bound else \
                f"not measured (r = {row.ska_rank})"
        flops = f"{row.flops_per_token / 1e9:.2f} GFLOP ({row.megatron_flops_per_token / 1e9:.2f})"
        out.append(f"| `{row.script}` | `{lay.preset}` | {_millions(row.params)} ({kinds}) | {layout} | {flops} | "
                   f"{memory} | {throughput} | {bound} |")
    return "\n".join(out) + "\n\n" + assumptions([row.layout for row in rows if not row.layout.cpu])


def tables() -> str:
    return render([estimate(script) for script in SCRIPTS])


def print_or_write(text: str, begin: str, end: str, *, write: bool) -> None:
    """Print `text`, or with `write` put it between the markers `begin` and `end` in examples/README.md."""
    if not write:
        print(text)
        return
    readme = README.read_text()
    start, stop = readme.index(begin) + len(begin), readme.index(end)
    README.write_text(readme[:start] + "\n" + text + readme[stop:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"replace the tables in {README.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    print_or_write(tables(), BEGIN, END, write=args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
