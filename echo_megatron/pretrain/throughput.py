"""Tokens/s and MFU from SKA's true FLOP count, logged next to Megatron's own figures.

Megatron's `num_floating_point_operations` counts every '*' layer as quadratic softmax attention;
`echo_megatron.megatron.flops.hybrid_model_flops` counts SKA's linear-in-T work (and the Koopman MLP).
The launcher wraps `megatron.training.training.training_log`: at every `--log-interval` iteration it
prints one extra line with wall-clock tokens/s, model TFLOP/s per device, MFU against
`--echo-peak-tflops` (per device; known GPUs by name otherwise), and both FLOP counts per iteration.
"""

from __future__ import annotations

import functools
import time

import torch

from megatron.training import training
from megatron.training.utils import print_rank_last

from echo_megatron.megatron.flops import hybrid_model_flops

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "B200": 2250.0, "GB200": 2500.0}
"""Dense bf16 peak per device (vendor figures) used for MFU when --echo-peak-tflops is not given."""


def peak_tflops(explicit: float | None) -> float | None:
    """Per-device peak: `--echo-peak-tflops`, else the bf16 figure of a known CUDA device, else None."""
    if explicit is not None:
        return explicit
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_BF16_TFLOPS.items():
            if key in name:
                return value
    return None


class ThroughputLog:
    """Per-interval tokens/s and MFU (see the module docstring)."""

    def __init__(self, args, model_config) -> None:
        self.tokens_per_iteration = args.global_batch_size * args.seq_length
        self.echo_flops = hybrid_model_flops(
            args.hybrid_layer_pattern, model_config.transformer, seq_length=args.seq_length,
            vocab_size=args.padded_vocab_size, batch_size=args.global_batch_size,
            attention=args.echo_attention, ffn=args.echo_ffn,
        ).total
        self.megatron_flops = None  # Megatron's figure, computed at the first log (needs initialised args)
        self.peak = peak_tflops(args.echo_peak_tflops)
        self.world_size = args.world_size
        self.log_interval = args.log_interval
        self.start: tuple[int, float] | None = None

    def line(self, iterations: int, seconds: float) -> str:
        """The log line for `iterations` steps that took `seconds` of wall-clock time."""
        per_iteration = seconds / iterations
        tflops = self.echo_flops / per_iteration / self.world_size / 1e12
        mfu = f"{100 * tflops / self.peak:.2f}%" if self.peak else "n/a (set --echo-peak-tflops)"
        return (f" echo-megatron: tokens/s {self.tokens_per_iteration / per_iteration:,.0f} | "
                f"model TFLOP/s/device {tflops:.4g} (SKA-true) | MFU {mfu} | FLOPs/iteration "
                f"{self.echo_flops:.4g} SKA-true vs {self.megatron_flops:.4g} Megatron (counts '*' as softmax)")

    def after_training_log(self, iteration: int) -> None:
        """Called after Megatron's `training_log` of `iteration`."""
        now = time.perf_counter()
        if self.start is None:  # first step (warm-up) is excluded
            self.start = (iteration, now)
            return
        if iteration % self.log_interval:
            return
        if self.megatron_flops is None:
            from megatron.training import get_args

            args = get_args()
            self.megatron_flops = training.num_floating_point_operations(args, args.global_batch_size)
        first, then = self.start
        print_rank_last(self.line(iteration - first, now - then))
        self.start = (iteration, now)


def install(args, model_config) -> ThroughputLog:
    """Wrap `megatron.training.training.training_log` so that it also prints `ThroughputLog` lines."""
    log = ThroughputLog(args, model_config)
    original = training.training_log

    @functools.wraps(original)
    def training_log(*positional, **keywords):
        result = original(*positional, **keywords)
        iteration = keywords["iteration"] if "iteration" in keywords else positional[3]
        log.after_training_log(iteration)
        return result

    training.training_log = training_log
    return log
