"""The MQAR benchmark behind ``echo-megatron mqar``: architectures × (KV pairs M, gap G).

Architectures, at matched width and depth (one layer pattern; ``'*'`` is the mixing slot):

- ``mamba``: every ``'*'`` becomes a Mamba-2 layer (all Mamba-2);
- ``mamba_matched``: the same, with the Mamba-2 state dimension raised until a layer's recurrent state
  equals SKA's (within 10 %: :func:`matched_mamba_state_dim`) — the state-matched baseline;
- ``mamba_attention``: Megatron softmax attention in ``'*'``;
- ``mamba_ska``: Spectral Koopman Attention in ``'*'``;
- ``echo``: SKA in ``'*'`` and Spectral Koopman MLPs in the ``'-'`` slots.

A preset either trains one model per architecture and M on a mix of ``train_gaps`` and evaluates
it at every ``eval_gaps`` (``--preset cpu``), or — ``train_gaps`` empty — trains one model per cell
(``--preset paper``, SPEC §10's grid). Every architecture gets the same data (same seeds), steps,
optimiser, schedule and learning-rate sweep: each run trains one model per rate in ``lrs`` and keeps
the one with the best accuracy on held-out sequences of its *training* gaps (never the evaluation
data). Results go to ``<out>/results.json`` (written after every training run, so an interrupted
benchmark resumes where it stopped), ``runs.json`` (the sweep), ``results.md``, ``results.png`` and
``history/`` (per-step loss, accuracy, gradient norm, learning rate). On a CPU-only machine a
one-process benchmark trains ``workers`` runs side by side in spawned worker processes (the CPU preset:
2, one per core); every run is seeded on its own, so the results equal those of one process.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from echo_megatron.tasks import trainer
from echo_megatron.tasks.mqar import PAPER_VOCAB_SIZE, MQARData, paper_grid, paper_grid_floor
from echo_megatron.tasks.niah import niah, niah_floor

ARCHS = ("mamba", "mamba_matched", "mamba_attention", "mamba_ska", "echo")
MAMBA_ONLY = ("mamba", "mamba_matched")  # every '*' becomes a Mamba-2 layer
TASKS = ("mqar", "niah")  # niah: one needle, queried last; "gap" means the sequence length T
RESULTS_JSON, RUNS_JSON, RESULTS_MD, RESULTS_PNG = "results.json", "runs.json", "results.md", "results.png"
HISTORY_DIR = "history"
TRAIN_STREAM, EVAL_STREAM, MONITOR_STREAM = 1, 2, 3  # independent data streams of one seed
MONITOR_EXAMPLES = 64  # per training gap: periodic evaluation and learning-rate selection


@dataclass(frozen=True)
class MQARPreset:
    """Everything that defines a benchmark run (stored as ``config`` in results.json)."""

    name: str
    archs: tuple[str, ...]
    kv_pairs: tuple[int, ...]
    eval_gaps: tuple[int, ...]
    train_gaps: tuple[int, ...]  # empty: one model per (arch, M, G) cell, trained on G
    # model (shared by every architecture)
    pattern: str
    hidden_size: int
    num_heads: int  # SKA heads and softmax-attention heads
    mamba_state_dim: int
    mamba_head_dim: int
    ffn_hidden_size: int
    ska_rank: int
    ska_value_dim: int
    ska_chunk_size: int
    ska_power: int
    init_method_std: float  # Megatron's init std of every linear and the embedding (see small_init_std)
    # training
    steps: int
    batch_size: int
    lrs: tuple[float, ...]  # peak learning rates tried per run; the best on held-out training-gap data is kept
    min_lr: float
    warmup_steps: int
    weight_decay: float
    clip_grad: float
    eval_every: int
    eval_examples: int
    eval_batch_size: int
    seeds: tuple[int, ...]  # one model per seed and cell; tables report mean and min–max
    early_stop: float  # stop a run once its held-out training-gap accuracy reaches this (0: never)
    # Per-architecture step caps, "arch=steps" (e.g. "mamba=3000"), replacing ``steps`` (the cap and the
    # length of the cosine schedule) for that architecture; the others train ``steps``.
    arch_steps: tuple[str, ...] = ()
    mamba_num_groups: int = 1
    tensor_parallel_size: int = 1
    task: str = "mqar"
    # Training runs done side by side in this many single-process workers (CPU, one process launched
    # without torchrun only; each run is seeded on its own, so results do not depend on it).
    workers: int = 1

    @property
    def length_label(self) -> str:
        """Column prefix of the evaluated lengths: G (MQAR gap) or T (NIAH sequence length)."""
        return "T" if self.task == "niah" else "G"

    def sequence_length(self, kv_pairs: int, gap: int) -> int:
        return gap if self.task == "niah" else 4 * kv_pairs + gap

    def floor(self, kv_pairs: int, gap: int) -> float:
        """The no-binding floor of a cell (docs/mqar.md; echo_megatron.tasks.niah)."""
        return niah_floor(gap, self.ska_chunk_size)[0] if self.task == "niah" else paper_grid_floor(kv_pairs)

    def data(self, examples: int, kv_pairs: int, gap: int, seed) -> MQARData:
        """The task's sequences: MQAR paper grid (M = kv_pairs, G = gap) or NIAH of length gap."""
        if self.task == "niah":
            return niah(examples, gap, seed=seed, chunk_size=self.ska_chunk_size)
        return paper_grid(examples, kv_pairs, gap, seed=seed)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.task == "niah" and self.kv_pairs != (1,):
            raise ValueError(f"task niah has one needle: kv_pairs must be (1,), got {list(self.kv_pairs)}")
        unknown = [a for a in self.archs if a not in ARCHS]
        if not self.archs or unknown:
            raise ValueError(f"archs must be a non-empty subset of {', '.join(ARCHS)}; got {', '.join(self.archs) or 'none'}")
        if not set(self.pattern) <= set("M*-") or "*" not in self.pattern:
            raise ValueError(f"pattern must use the symbols M, *, - and contain a '*' slot, got {self.pattern!r}")
        if "echo" in self.archs and "-" not in self.pattern:
            raise ValueError(f"arch echo needs '-' (MLP) slots in the pattern for its Koopman MLPs, got {self.pattern!r}")
        for name in ("kv_pairs", "eval_gaps"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        if any(m < 1 or m > PAPER_VOCAB_SIZE // 4 for m in self.kv_pairs):
            raise ValueError(f"kv_pairs must lie in [1, {PAPER_VOCAB_SIZE // 4}], got {list(self.kv_pairs)}")
        if any(g < 0 for g in (*self.eval_gaps, *self.train_gaps)):
            raise ValueError(f"gaps must be >= 0, got eval {list(self.eval_gaps)}, train {list(self.train_gaps)}")
        ints = ("hidden_size", "num_heads", "mamba_state_dim", "mamba_head_dim", "ffn_hidden_size", "ska_rank",
                "ska_value_dim", "ska_chunk_size", "steps", "batch_size", "eval_examples", "eval_batch_size",
                "mamba_num_groups", "tensor_parallel_size", "workers")
        for name in ints:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lrs or min(self.lrs) <= 0 or not 0 <= self.min_lr <= min(self.lrs):
            raise ValueError(f"lr must be a non-empty list of values > 0, each >= min_lr >= 0; got lr={list(self.lrs)}, "
                             f"min_lr={self.min_lr}")
        if not self.seeds or min(self.seeds) < 0:
            raise ValueError(f"seeds must be a non-empty list of integers >= 0, got {list(self.seeds)}")
        self.steps_by_arch()  # validates arch_steps
        if not 0 <= self.early_stop <= 1:
            raise ValueError(f"early_stop must lie in [0, 1], got {self.early_stop}")
        if self.warmup_steps < 0 or self.eval_every < 0 or self.weight_decay < 0 or self.clip_grad < 0:
            raise ValueError("warmup_steps, eval_every, weight_decay and clip_grad must be >= 0")
        if not self.init_method_std > 0:
            raise ValueError(f"init_method_std must be > 0, got {self.init_method_std}")
        if self.ska_power < 0:
            raise ValueError(f"ska_power must be >= 0, got {self.ska_power}")
        if self.num_heads % self.tensor_parallel_size or self.mamba_num_groups % self.tensor_parallel_size:
            raise ValueError(f"num_heads ({self.num_heads}) and mamba_num_groups ({self.mamba_num_groups}) must be "
                             f"divisible by tensor_parallel_size ({self.tensor_parallel_size})")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")

    def steps_by_arch(self) -> dict[str, int]:
        """The step cap of every architecture: ``steps``, or its entry in ``arch_steps``."""
        caps = dict.fromkeys(ARCHS, self.steps)
        for entry in self.arch_steps:
            arch, sep, steps = entry.partition("=")
            if not sep or arch not in ARCHS or not steps.isdigit() or int(steps) < 1:
                raise ValueError(f"arch_steps entries must read ARCH=STEPS with ARCH one of {', '.join(ARCHS)} and "
                                 f"STEPS an integer >= 1, got {entry!r}")
            caps[arch] = int(steps)
        return caps

    def train_config(self, lr: float, description: str, progress: bool, arch: str | None = None) -> trainer.TrainConfig:
        """The trainer's settings at peak ``lr``; ``arch``'s own step cap (``arch_steps``) when given."""
        return trainer.TrainConfig(
            steps=self.steps_by_arch()[arch] if arch else self.steps, batch_size=self.batch_size, lr=lr, min_lr=self.min_lr,
            warmup_steps=self.warmup_steps, weight_decay=self.weight_decay, clip_grad=self.clip_grad,
            eval_every=self.eval_every, progress=progress, description=description, stop_at=self.early_stop or None,
        )

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def small_init_std(hidden_size: int) -> float:
    """sqrt(2 / (5 d)): the width-aware init std ("small init", Nguyen & Salazar 2019; GPT-NeoX's
    ``small_init``). Megatron's default 0.02 suits d ≈ 2000; at d = 64 it is 4× too small and
    no architecture with softmax attention or Mamba-2 binds on MQAR within the CPU budget
    (docs/mqar_calibration.md)."""
    return round(math.sqrt(2.0 / (5.0 * hidden_size)), 4)


# The embedded CPU demo (≤ 20 min on 2 cores; see README): one model per architecture, trained on a
# mix of short gaps, evaluated at gaps up to 32x longer than the longest it saw.
CPU_PRESET = MQARPreset(
    name="cpu", archs=("mamba", "mamba_attention", "mamba_ska"), kv_pairs=(8,),
    eval_gaps=(16, 64, 256, 1024), train_gaps=(16, 32),
    pattern="M*M*", hidden_size=64, num_heads=4, mamba_state_dim=16, mamba_head_dim=16, ffn_hidden_size=128,
    ska_rank=16, ska_value_dim=16, ska_chunk_size=16, ska_power=1, init_method_std=small_init_std(64),
    steps=1000, batch_size=32, lrs=(1e-3, 3e-3), min_lr=1e-5, warmup_steps=100, weight_decay=0.1, clip_grad=1.0,
    eval_every=100, eval_examples=256, eval_batch_size=32, seeds=(0, 1, 2), early_stop=0.99, workers=2,
)


def _paper_preset() -> MQARPreset:
    """SPEC §10's grid, one model per cell, at the Echo-50M size (``echo_megatron.megatron``'s
    ``echo-50m``: d=448, 16 blocks with SKA at {3,7,11,15}, H=7, r=56, P=64, S=64, d_state=64), for
    GPUs. The '-' slots hold MLPs of the Koopman MLP's width (Koopman MLPs for ``echo``)."""
    from echo_megatron.megatron.koopman_mlp import koopman_width
    from echo_megatron.megatron.presets import get_preset

    echo = get_preset("echo-50m")
    f = echo.config_fields
    return MQARPreset(
        name="paper", archs=ARCHS, kv_pairs=(4, 8, 16, 32), eval_gaps=(64, 128, 256, 512, 1024, 2048, 4096),
        train_gaps=(), pattern=echo.pattern, hidden_size=f["hidden_size"], num_heads=f["ska_num_heads"],
        mamba_state_dim=f["mamba_state_dim"], mamba_head_dim=f["mamba_head_dim"],
        ffn_hidden_size=koopman_width(f["hidden_size"]), ska_rank=f["ska_rank"], ska_value_dim=f["ska_value_dim"],
        ska_chunk_size=f["ska_chunk_size"], ska_power=2, init_method_std=small_init_std(f["hidden_size"]),
        steps=4000, batch_size=64, lrs=(3e-4, 1e-3), min_lr=5e-6, warmup_steps=200, weight_decay=0.1, clip_grad=1.0,
        eval_every=500, eval_examples=1000, eval_batch_size=16, seeds=(0, 1, 2), early_stop=0.99,
    )


PAPER_PRESET = _paper_preset()

# NIAH (the paper's Table 2): train at T = 64, evaluate at 64 … 4096 (the paper's columns 64, 512, 2048,
# 4096 and 256, 1024 between); the model and optimiser of the MQAR presets. One scored token per
# sequence, so the monitor set holds 64 answers: early stopping at 0.98 allows one miss. CPU: the CPU
# preset's model; paper: the Echo-50M size, for GPUs, with S = 32 instead of 64 (at T = 64 a needle
# must lie in an earlier SKA chunk than the query: S < 64).
NIAH_CPU_PRESET = dataclasses.replace(
    CPU_PRESET, name="niah-cpu", task="niah", kv_pairs=(1,), train_gaps=(64,),
    eval_gaps=(64, 256, 512, 1024, 2048, 4096), steps=600, eval_every=50, early_stop=0.98,
    eval_examples=256, eval_batch_size=16,
    lrs=(3e-3,),  # the sweep {1e-3, 3e-3} kept 3e-3 for every architecture (docs/niah.md); `--lr 1e-3,3e-3` redoes it
)
NIAH_PAPER_PRESET = dataclasses.replace(
    PAPER_PRESET, name="niah-paper", task="niah", kv_pairs=(1,), train_gaps=(64,),
    eval_gaps=(64, 512, 2048, 4096, 8192, 16384), eval_batch_size=4, ska_chunk_size=32, eval_every=100,
    early_stop=0.98,
)

PRESETS = {"cpu": CPU_PRESET, "paper": PAPER_PRESET}
NIAH_PRESETS = {"cpu": NIAH_CPU_PRESET, "paper": NIAH_PAPER_PRESET}


@dataclass(frozen=True)
class Run:
    """One training run and the cells it fills."""

    arch: str
    kv_pairs: int
    train_gaps: tuple[int, ...]
    eval_gaps: tuple[int, ...]
    seed: int

    @property
    def name(self) -> str:
        return f"{self.arch}_M{self.kv_pairs}_G{'-'.join(map(str, self.train_gaps))}_s{self.seed}"

    @property
    def lr_source(self) -> str:
        """The name of the same run at the preset's first seed, whose selected lr later seeds reuse."""
        return self.name.rsplit("_s", 1)[0]


def planned_runs(preset: MQARPreset) -> list[Run]:
    """Seed-major: every cell gets its first seed before any gets its second (a cut-short
    benchmark still covers the whole grid)."""
    runs = []
    for seed in preset.seeds:
        for m in preset.kv_pairs:
            for arch in preset.archs:
                if preset.train_gaps:
                    runs.append(Run(arch, m, preset.train_gaps, preset.eval_gaps, seed))
                else:
                    runs.extend(Run(arch, m, (g,), (g,), seed) for g in preset.eval_gaps)
    return runs


# ---------------------------------------------------------------------------------------- model


def arch_pattern(arch: str, pattern: str) -> str:
    return pattern.replace("*", "M") if arch in MAMBA_ONLY else pattern


def arch_preset(arch: str, preset: MQARPreset) -> MQARPreset:
    """The preset an architecture's model is built from: ``mamba_matched`` gets the state-matched
    Mamba-2 state dimension (:func:`matched_mamba_state_dim`), every other architecture ``preset``."""
    if arch != "mamba_matched":
        return preset
    return dataclasses.replace(preset, mamba_state_dim=matched_mamba_state_dim(preset))


def model_config(preset: MQARPreset):
    """The SKAConfig shared by every architecture (Megatron TransformerConfig + ska_* fields)."""
    from echo_megatron.megatron import SKAConfig

    gpu = torch.cuda.is_available()
    tp = preset.tensor_parallel_size
    return SKAConfig(
        num_layers=len(preset.pattern),
        hidden_size=preset.hidden_size,
        ffn_hidden_size=preset.ffn_hidden_size,
        num_attention_heads=preset.num_heads,
        kv_channels=preset.hidden_size // preset.num_heads,
        mamba_state_dim=preset.mamba_state_dim,
        mamba_head_dim=preset.mamba_head_dim,
        mamba_num_groups=preset.mamba_num_groups,
        ska_num_heads=preset.num_heads,
        ska_rank=preset.ska_rank,
        ska_value_dim=preset.ska_value_dim,
        ska_chunk_size=preset.ska_chunk_size,
        ska_power=preset.ska_power,
        init_method_std=preset.init_method_std,
        normalization="RMSNorm",
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        sequence_parallel=tp > 1,
        use_cpu_initialization=not gpu,
        params_dtype=torch.float32,
    )


def build_model(arch: str, preset: MQARPreset, max_seq_len: int) -> torch.nn.Module:
    from echo_megatron.megatron import build_hybrid_model

    spec = "te" if torch.cuda.is_available() and _have_transformer_engine() else "local"
    model = build_hybrid_model(
        model_config(arch_preset(arch, preset)), arch_pattern(arch, preset.pattern), vocab_size=PAPER_VOCAB_SIZE, seq_length=max_seq_len,
        spec=spec, ffn="koopman" if arch == "echo" else "mlp",
        attention="softmax" if arch == "mamba_attention" else "ska", share_embeddings_and_output_weights=True,
    )
    return model.to(trainer.device())


def _have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters of the whole (tensor-parallel) model, each shard counted once."""
    from megatron.core import parallel_state, tensor_parallel

    local = sum(p.numel() for p in model.parameters() if tensor_parallel.param_is_not_tensor_parallel_duplicate(p))
    total = torch.tensor([local], dtype=torch.float64, device=trainer.device())
    torch.distributed.all_reduce(total, group=parallel_state.get_tensor_model_parallel_group())
    return int(total.item())


MATCH_TOLERANCE = 0.10  # state-matched Mamba-2: |bytes - SKA's bytes| <= 10 % of SKA's
MATCH_STATE_DIM_STEP = 8  # candidate Mamba-2 state dimensions: multiples of 8 (kernel-friendly)


def mamba_state_bytes(preset: MQARPreset) -> int:
    """A Mamba-2 layer's decode state (fp32 bytes, batch 1; constant in T): Megatron's conv state
    [d_inner + 2·groups·d_state, d_conv = 4] + SSM state [heads, head_dim, d_state] = [d_inner, d_state],
    with d_inner = 2·hidden_size."""
    d_inner = 2 * preset.hidden_size
    conv_dim = d_inner + 2 * preset.mamba_num_groups * preset.mamba_state_dim
    return 4 * (conv_dim * 4 + d_inner * preset.mamba_state_dim)


def ska_state_bytes(preset: MQARPreset) -> int:
    """An SKA layer's decode state (fp32 bytes, batch 1; constant in T): the ``echo_megatron.ops`` state."""
    from echo_megatron.ops import ska_prefill

    p = preset
    empty = torch.zeros(1, 0, p.num_heads, p.ska_rank)
    _, state = ska_prefill(empty, empty, torch.zeros(1, 0, p.num_heads, p.ska_value_dim),
                           eta=torch.ones(p.num_heads), gamma=torch.ones(p.num_heads),
                           chunk_size=p.ska_chunk_size, power=p.ska_power)
    return state.nbytes


def matched_mamba_state_dim(preset: MQARPreset) -> int:
    """The Mamba-2 state dimension (a multiple of 8; width, head dim and groups unchanged) whose layer
    state (:func:`mamba_state_bytes`) is closest to an SKA layer's (:func:`ska_state_bytes`); a
    ValueError when none lies within ``MATCH_TOLERANCE`` of it."""
    target = ska_state_bytes(preset)

    def bytes_at(d_state: int) -> int:
        return mamba_state_bytes(dataclasses.replace(preset, mamba_state_dim=d_state))

    above = MATCH_STATE_DIM_STEP  # the bytes grow with d_state: the closest is the first at or above, or the one before
    while bytes_at(above) < target:
        above += MATCH_STATE_DIM_STEP
    best = min((d for d in (above - MATCH_STATE_DIM_STEP, above) if d >= MATCH_STATE_DIM_STEP),
               key=lambda d: abs(bytes_at(d) - target))
    if abs(bytes_at(best) - target) > MATCH_TOLERANCE * target:
        raise ValueError(f"no Mamba-2 state dimension (multiple of {MATCH_STATE_DIM_STEP}) matches SKA's state of "
                         f"{target} bytes within {MATCH_TOLERANCE:.0%}: the closest, {best}, holds {bytes_at(best)} bytes")
    return best


def state_bytes_per_layer(arch: str, preset: MQARPreset, tokens: int) -> int:
    """Largest per-layer decode state (fp32 bytes, batch 1) after ``tokens`` tokens: the larger of
    the Mamba-2 layer's (:func:`mamba_state_bytes`) and the ``'*'`` layer's — SKA's
    (:func:`ska_state_bytes`, constant) or softmax attention's KV cache, 2·T·heads·head_dim (grows with T)."""
    mamba = mamba_state_bytes(arch_preset(arch, preset))
    if arch in MAMBA_ONLY:
        return mamba
    if arch == "mamba_attention":
        return max(mamba, 4 * 2 * tokens * preset.hidden_size)
    return max(mamba, ska_state_bytes(preset))


# -------------------------------------------------------------------------------------- results


class ResultsDirError(RuntimeError):
    """The output directory exists and neither --force nor --resume was given, or settings differ."""


GRID_FIELDS = ("archs", "kv_pairs", "eval_gaps", "seeds")  # may grow when resuming; everything else must match
RUNTIME_FIELDS = ("workers",)  # how the runs are scheduled, not what they compute: may differ when resuming


@dataclass
class Results:
    """What a results directory holds: the preset (``config``), the cells, and one record per
    training run (``runs.json``: accuracy of each learning rate on the monitor set, the one kept)."""

    preset: MQARPreset
    cells: list[dict]
    runs: list[dict]

    def add(self, cells: list[dict], record: dict) -> None:
        keys = {_cell_key(c) for c in cells}
        self.cells = [c for c in self.cells if _cell_key(c) not in keys] + cells
        self.runs = [r for r in self.runs if r["run"] != record["run"]] + [record]

    def done(self, run: Run) -> bool:
        have = {_cell_key(c) for c in self.cells}
        return all((run.arch, run.kv_pairs, g, run.seed) in have for g in run.eval_gaps)

    def selected_lr(self, run: Run) -> float | None:
        """The lr kept by the run's first-seed twin (later seeds reuse it instead of sweeping)."""
        return next((r["lr"] for r in self.runs if r["run"].rsplit("_s", 1)[0] == run.lr_source
                     and r["seed"] == self.preset.seeds[0]), None)


def _cell_key(cell: dict) -> tuple:
    return cell["arch"], cell["kv_pairs"], cell["gap"], cell["seed"]


def prepare_out_dir(out: Path, preset: MQARPreset, *, force: bool, resume: bool) -> Results:
    """Create ``out`` (or wipe it with ``force``) and return what it holds.

    With ``resume``, the stored cells are kept (and skipped) and the grid becomes the union of the
    stored and the requested grids. Refuses an existing non-empty ``out`` without ``force`` or
    ``resume``, and a resume whose model or training settings differ.
    """
    if out.exists() and not out.is_dir():
        raise ResultsDirError(f"--out {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if force:
            shutil.rmtree(out)
        elif resume:
            stored = load_results(out)
            config, wanted = stored["config"], preset.to_json()
            changed = sorted(k for k in wanted if k not in GRID_FIELDS + RUNTIME_FIELDS and config.get(k) != wanted[k])
            if changed:
                raise ResultsDirError(
                    f"{out} holds results with different settings ({', '.join(changed)}); "
                    "use --force to start over or another --out"
                )
            union = {k: tuple(dict.fromkeys([*config[k], *wanted[k]])) for k in GRID_FIELDS}
            runs = json.loads((out / RUNS_JSON).read_text()) if (out / RUNS_JSON).is_file() else []
            return Results(dataclasses.replace(preset, **union), stored["cells"], runs)
        else:
            raise ResultsDirError(
                f"results directory {out} already exists; pass --resume to continue it or --force to overwrite it"
            )
    out.mkdir(parents=True, exist_ok=True)
    return Results(preset, [], [])


def load_results(out: Path) -> dict:
    """The parsed ``results.json`` of ``out`` (a ResultsDirError if missing or malformed)."""
    path = out / RESULTS_JSON
    if not path.is_file():
        raise ResultsDirError(f"{out} exists but has no {RESULTS_JSON}; use --force to overwrite it")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError:
        results = None
    if not isinstance(results, dict) or not {"preset", "config", "cells"} <= set(results):
        raise ResultsDirError(f"{path} is not an MQAR results file (needs preset, config, cells)")
    return results


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(out: Path, results: Results, commit: str | None = None) -> None:
    """results.json, runs.json, results.md and results.png, each replaced atomically; results.json names
    ``commit`` (default: this code's, :func:`source_commit`)."""
    cells = sorted(results.cells, key=lambda c: (c["kv_pairs"], ARCHS.index(c["arch"]), c["gap"]))
    document = {"preset": results.preset.name, "commit": commit or source_commit(), "config": results.preset.to_json(),
                "cells": cells}
    _write_atomic(out / RESULTS_JSON, json.dumps(document, indent=1) + "\n")
    runs = sorted(results.runs, key=lambda r: (r["seed"], r["kv_pairs"], ARCHS.index(r["arch"]), r["train_gaps"]))
    _write_atomic(out / RUNS_JSON, json.dumps(runs, indent=1) + "\n")
    _write_tables(out, cells, runs, results.preset)


def _write_tables(out: Path, cells: list[dict], runs: list[dict], preset: MQARPreset) -> None:
    """results.md (summary, per seed, per run) and results.png, from the cells and run records."""
    _write_atomic(out / RESULTS_MD, markdown_table(cells, preset, runs) + "\n" + seeds_table(cells, preset, runs)
                  + "\n" + runs_table(runs))
    plot(cells, out / RESULTS_PNG, preset)


def rewrite_tables(out: Path) -> str:
    """Rewrite ``out``'s results.md and results.png from its results.json and runs.json with this code's
    tables and plot (no training); results.json, and the commit it names, stay as they are. Returns the
    new results.md."""
    stored = load_results(out)
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in stored["config"].items()}
    runs = json.loads((out / RUNS_JSON).read_text()) if (out / RUNS_JSON).is_file() else []
    _write_tables(out, stored["cells"], runs, MQARPreset(**config))
    return (out / RESULTS_MD).read_text()


MERGE_FIELDS = GRID_FIELDS + ("arch_steps",)  # merged directories may differ in these: the union is kept


def merge_results(sources: list[Path], out: Path) -> str:
    """Write to the new directory ``out`` the union of the results directories ``sources``: runs of the same
    settings (up to :data:`MERGE_FIELDS` and the scheduling) trained by separate commands — e.g. one more
    architecture beside a committed table — as one table and plot, with their ``history/`` files. Each cell keeps
    the commit that trained it:
    results.json's ``commit`` is the sources' commit when they agree, else ``"<commit> (archs); …"``. Refuses
    sources whose settings differ or that hold the same cell. Returns the new results.md."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ResultsDirError(f"--out {out} already exists; merge into a new directory")
    stored = [load_results(source) for source in sources]
    first = stored[0]
    cells, runs, commits = [], [], {}
    for source, results in zip(sources, stored):
        keys = {*first["config"], *results["config"]}
        changed = sorted(k for k in keys if k not in MERGE_FIELDS + RUNTIME_FIELDS
                         and first["config"].get(k) != results["config"].get(k))
        if changed:
            raise ResultsDirError(f"{source} holds results with different settings ({', '.join(changed)}) than {sources[0]}")
        repeated = {_cell_key(c) for c in results["cells"]} & {_cell_key(c) for c in cells}
        if repeated:
            raise ResultsDirError(f"{source} repeats cells (arch, M, gap, seed) of an earlier source: {sorted(repeated)[0]}")
        cells += results["cells"]
        runs += json.loads((source / RUNS_JSON).read_text()) if (source / RUNS_JSON).is_file() else []
        commits.setdefault(results.get("commit"), []).extend(results["config"]["archs"])
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in first["config"].items()}
    config.update({k: tuple(dict.fromkeys(x for r in stored for x in r["config"].get(k, ()))) for k in MERGE_FIELDS})
    commit = next(iter(commits)) if len(commits) == 1 else "; ".join(
        f"{c} ({', '.join(dict.fromkeys(archs))})" for c, archs in commits.items())
    out.mkdir(parents=True, exist_ok=True)
    for source in sources:
        if (source / HISTORY_DIR).is_dir():
            shutil.copytree(source / HISTORY_DIR, out / HISTORY_DIR, dirs_exist_ok=True)
    write_results(out, Results(MQARPreset(**config), cells, runs), commit=commit)
    return (out / RESULTS_MD).read_text()


@functools.cache
def source_commit() -> str | None:
    """The git commit of this process's code (``+dirty`` with uncommitted changes), or None outside a
    git checkout. Read once: ``run_benchmark`` reads it when it starts, before any run trains."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def runs_table(runs: list[dict]) -> str:
    """One row per training run: monitor accuracy (held-out, training gaps) per learning rate."""
    lines = ["| run | seed | train gaps | monitor accuracy per lr | lr kept | steps | train s |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        accs = ", ".join(f"{lr}: {acc:.3f}" for lr, acc in r["monitor_accuracy"].items())
        lines.append(f"| {r['run']} | {r['seed']} | {','.join(map(str, r['train_gaps']))} | {accs} | {r['lr']:g} | "
                     f"{r['train_steps']} | {r['train_s']:.0f} |")
    return "\n".join(lines) + "\n"


def seeds_table(cells: list[dict], preset: MQARPreset, runs: list[dict] = ()) -> str:
    """One row per (M, arch, seed): the learning rate kept (from ``runs``), the steps taken and the accuracy
    at every length — every seed, not only the summary's mean and range."""
    gaps = sorted({c["gap"] for c in cells})
    lrs = {(r["kv_pairs"], r["arch"], r["seed"]): f"{r['lr']:g}" for r in runs}
    rows: dict[tuple[int, str, int], dict[int, dict]] = {}
    for c in cells:
        rows.setdefault((c["kv_pairs"], c["arch"], c["seed"]), {})[c["gap"]] = c
    header = ["M", "arch", "seed", "lr", "steps", *(f"{preset.length_label}={g}" for g in gaps)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m, arch, seed in sorted(rows, key=lambda k: (k[0], ARCHS.index(k[1]), k[2])):
        row = rows[m, arch, seed]
        steps = sorted({c["train_steps"] for c in row.values()})
        span = f"{steps[0]}" if len(steps) == 1 else f"{steps[0]}–{steps[-1]}"
        accs = [f"{row[g]['accuracy']:.3f}" if g in row else "" for g in gaps]
        lines.append(f"| {m} | {arch} | {seed} | {lrs.get((m, arch, seed), '—')} | {span} | " + " | ".join(accs) + " |")
    return "Per seed (accuracy; lr kept; steps taken):\n\n" + "\n".join(lines) + "\n"


def accuracy_summary(cells: list[dict]) -> dict[tuple[int, str, int], tuple[float, float, float, int]]:
    """(M, arch, gap) -> (mean, min, max, number of seeds) of the accuracy over seeds."""
    groups: dict[tuple[int, str, int], list[float]] = {}
    for c in cells:
        groups.setdefault((c["kv_pairs"], c["arch"], c["gap"]), []).append(c["accuracy"])
    return {k: (sum(v) / len(v), min(v), max(v), len(v)) for k, v in groups.items()}


def _fmt(mean: float, low: float, high: float, n: int) -> str:
    return f"{mean:.3f}" if n == 1 else f"{mean:.3f} ({low:.3f}–{high:.3f})"


def markdown_table(cells: list[dict], preset: MQARPreset, runs: list[dict] = ()) -> str:
    """One row per (M, arch): parameters, state bytes at the longest gap, the training steps of its
    runs (min–max, and the architecture's cap) and their mean training time (from ``runs``), accuracy
    per gap as the mean over seeds with the min–max range; then, per M, the no-binding floor and chance."""
    gaps = sorted({c["gap"] for c in cells})
    summary = accuracy_summary(cells)
    caps = preset.steps_by_arch()
    g_ = preset.length_label
    header = ["M", "arch", "seeds", "params", f"state bytes/layer ({g_}={gaps[-1]})" if gaps else "state bytes/layer",
              "steps (cap)", "train s/run", *(f"{g_}={g}" for g in gaps)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    blank = "| " * 6
    for m in sorted({c["kv_pairs"] for c in cells}):
        for arch in ARCHS:
            row = {c["gap"]: c for c in cells if c["kv_pairs"] == m and c["arch"] == arch}
            if not row:
                continue
            last = row[max(row)]
            seeds = len({c["seed"] for c in cells if c["kv_pairs"] == m and c["arch"] == arch})
            steps = sorted({c["train_steps"] for c in cells if c["kv_pairs"] == m and c["arch"] == arch})
            times = [r["train_s"] for r in runs if r["kv_pairs"] == m and r["arch"] == arch]
            span = f"{steps[0]}" if len(steps) == 1 else f"{steps[0]}–{steps[-1]}"
            train_s = f"{sum(times) / len(times):.0f}" if times else "—"
            accs = [_fmt(*summary[m, arch, g]) if (m, arch, g) in summary else "" for g in gaps]
            lines.append(f"| {m} | {arch} | {seeds} | {last['params']:,} | {last['state_bytes_per_layer']:,} | "
                         f"{span} ({caps[arch]}) | {train_s} | " + " | ".join(accs) + " |")
        lines.append(f"| {m} | *no-binding floor* {blank}" + " | ".join(f"{preset.floor(m, g):.3f}" for g in gaps) + " |")
        lines.append(f"| {m} | *chance* {blank}" + " | ".join(f"{4 / PAPER_VOCAB_SIZE:.3f}" for _ in gaps) + " |")
    stop = (f"early stop at {preset.early_stop:g} on held-out sequences of the training lengths" if preset.early_stop
            else "no early stop: every run trains its whole cap")
    note = ("\nAccuracy: mean over seeds (min–max). *No-binding floor*: the best accuracy without binding keys "
            "to values (docs/mqar.md, echo_megatron/tasks/niah.py); chance: a constant guess. Steps: taken by the "
            f"runs (min–max; {stop}), the cap in brackets; train s/run: mean "
            "training time of a run, every learning rate of a sweep included.\n")
    return "\n".join(lines) + "\n" + note


def plot(cells: list[dict], path: Path, preset: MQARPreset) -> None:
    """Write :func:`figure` to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = figure(cells, preset)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure(cells: list[dict], preset: MQARPreset):
    """Accuracy vs gap, one panel per M: per architecture the mean over seeds (line, bars = min–max) and
    every seed (dots), its state bytes per layer at the longest gap in the legend; dashed lines = the
    no-binding floor and chance, shaded band = the gaps seen in training. Returns the matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = accuracy_summary(cells)
    state = {c["arch"]: c["state_bytes_per_layer"] for c in sorted(cells, key=lambda c: c["gap"])}  # at the longest gap
    ms = sorted({c["kv_pairs"] for c in cells})
    fig, axes = plt.subplots(1, max(len(ms), 1), figsize=(4.6 * max(len(ms), 1), 3.6), squeeze=False)
    for ax, m in zip(axes[0], ms):
        for arch in ARCHS:
            pts = sorted((g, *summary[m, a, g][:3]) for (mm, a, g) in summary if mm == m and a == arch)
            if pts:
                gs, mean, low, high = (list(x) for x in zip(*pts))
                line = ax.errorbar(gs, mean, yerr=[[mu - lo for mu, lo in zip(mean, low)], [hi - mu for mu, hi in zip(mean, high)]],
                                   marker="o", capsize=3, label=f"{arch} ({state[arch]:,} B state/layer)")
                seeds = [(c["gap"], c["accuracy"]) for c in cells if c["kv_pairs"] == m and c["arch"] == arch]
                ax.scatter(*zip(*seeds), s=9, alpha=0.45, color=line.lines[0].get_color(), zorder=3)
        gaps = sorted({c["gap"] for c in cells if c["kv_pairs"] == m})
        ax.plot(gaps, [preset.floor(m, g) for g in gaps], color="black", linestyle=":", linewidth=1,
                label="no-binding floor")
        ax.axhline(4 / PAPER_VOCAB_SIZE, color="grey", linestyle="--", linewidth=1, label="chance")
        if preset.train_gaps:
            ax.axvspan(min(preset.train_gaps), max(preset.train_gaps), color="grey", alpha=0.15,
                       label="training lengths" if preset.task == "niah" else "training gaps")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("NIAH, one needle" if preset.task == "niah" else f"MQAR, M = {m} KV pairs")
        ax.set_xlabel("sequence length T" if preset.task == "niah" else "gap G (tokens)")
        ax.set_ylabel("accuracy (line: mean; dots: seeds)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------ run


def train_batch_fn(preset: MQARPreset, run: Run):
    """Global batch of step ``step``: gaps cycle through ``run.train_gaps``; same for every arch."""

    def batch_at(step: int) -> trainer.Batch:
        gap = run.train_gaps[step % len(run.train_gaps)]
        data = preset.data(preset.batch_size, run.kv_pairs, gap, (run.seed, TRAIN_STREAM, run.kv_pairs, step))
        return data.input_ids, data.labels

    return batch_at


def eval_data(preset: MQARPreset, seed: int, kv_pairs: int, gap: int, examples: int, stream: int = EVAL_STREAM):
    return preset.data(examples, kv_pairs, gap, (seed, stream, kv_pairs, gap))


def _train_one(preset: MQARPreset, run: Run, lr: float, progress: bool):
    """Build and train one model at peak ``lr``; returns (model, TrainResult, monitor accuracy)."""
    trainer.seed_everything(run.seed)
    model = build_model(run.arch, preset, preset.sequence_length(run.kv_pairs, max(*run.eval_gaps, *run.train_gaps)))
    monitor = [eval_data(preset, run.seed, run.kv_pairs, g, MONITOR_EXAMPLES, MONITOR_STREAM) for g in run.train_gaps]

    def monitor_fn() -> float:
        return sum(trainer.evaluate(model, d, preset.eval_batch_size) for d in monitor) / len(monitor)

    description = f"{run.name} lr={lr:g}"
    result = trainer.train(model, train_batch_fn(preset, run), preset.train_config(lr, description, progress, run.arch),
                           monitor_fn)
    return model, result, result.history[-1]["eval_acc"]


def execute_run(preset: MQARPreset, run: Run, out: Path, progress: bool,
                lrs: tuple[float, ...] | None = None) -> tuple[list[dict], dict]:
    """Train one model per learning rate, keep the one with the best accuracy on held-out data of
    the training gaps (the monitor set, never the evaluation set), and evaluate it at every
    ``run.eval_gaps``. Returns the cells and the run's record (accuracy per learning rate)."""
    best = None
    monitor_acc: dict[str, float] = {}
    train_s = 0.0
    for lr in lrs or preset.lrs:
        model, result, acc = _train_one(preset, run, lr, progress)
        train_s += result.wall_s
        monitor_acc[f"{lr:g}"] = acc
        if trainer.is_rank_zero():
            (out / HISTORY_DIR).mkdir(exist_ok=True)
            _write_atomic(out / HISTORY_DIR / f"{run.name}_lr{lr:g}.json", json.dumps(result.history) + "\n")
        if best is None or acc > best[2]:
            best = (model, lr, acc, result)
    model, lr, _, result = best
    params = count_parameters(model)
    cells = []
    for gap in run.eval_gaps:
        start = time.perf_counter()
        accuracy = trainer.evaluate(model, eval_data(preset, run.seed, run.kv_pairs, gap, preset.eval_examples),
                                    preset.eval_batch_size)
        cells.append({
            "arch": run.arch, "kv_pairs": run.kv_pairs, "gap": gap, "accuracy": accuracy, "params": params,
            "state_bytes_per_layer": state_bytes_per_layer(run.arch, preset, preset.sequence_length(run.kv_pairs, gap)),
            "train_steps": result.steps, "wall_s": round(train_s + time.perf_counter() - start, 2),
            "seed": run.seed,
        })
    record = {"run": run.name, "arch": run.arch, "kv_pairs": run.kv_pairs, "seed": run.seed,
              "train_gaps": list(run.train_gaps), "train_steps": result.steps,
              "monitor_accuracy": monitor_acc, "lr": lr, "train_s": round(train_s, 2)}
    return cells, record


def run_benchmark(preset: MQARPreset, out: Path, *, force: bool = False, resume: bool = False,
                  progress: bool = True) -> list[dict]:
    """Run (or resume) the benchmark; returns all cells. Collective under torchrun."""
    trainer.initialize_distributed(preset.tensor_parallel_size, preset.seeds[0])
    rank0 = trainer.is_rank_zero()
    source_commit()  # the code that trains, not the checkout at the time a result is written
    prepared: Results | str = Results(preset, [], [])
    if rank0:
        try:
            prepared = prepare_out_dir(out, preset, force=force, resume=resume)
        except ResultsDirError as error:
            prepared = str(error)
    prepared = _broadcast(prepared)  # every rank raises together, none waits in a collective
    if isinstance(prepared, str):
        raise ResultsDirError(prepared)
    results = prepared
    pending = [run for run in planned_runs(preset) if not results.done(run)]
    if _workers(preset, len(pending)) > 1:
        finished = _execute_in_workers(preset, out, results, pending, progress)
    else:  # lazily: each run sees the learning rates its predecessors selected
        finished = ((run, *execute_run(preset, run, out, progress, _lrs_of(preset, results, run))) for run in pending)
    for run, cells, record in finished:
        results.add(cells, record)
        if rank0:
            write_results(out, results)
            print(" ".join(f"{run.arch} M={c['kv_pairs']} {preset.length_label}={c['gap']}: {c['accuracy']:.3f}" for c in cells)
                  + f" (lr {record['lr']:g})", flush=True)
    if rank0 and results.cells:
        write_results(out, results)
    return results.cells


def _lrs_of(preset: MQARPreset, results: Results, run: Run) -> tuple[float, ...] | None:
    """The learning rates ``run`` trains: the first seed sweeps ``preset.lrs`` (None); later seeds
    reuse the rate their first-seed twin kept (a sweep again if that twin has no record)."""
    kept = None if run.seed == preset.seeds[0] else results.selected_lr(run)
    return None if kept is None else (kept,)


def _workers(preset: MQARPreset, pending: int) -> int:
    """How many worker processes train side by side: ``preset.workers`` on a CPU-only machine when
    this benchmark is one process (not torchrun's ranks) and more than one run is left; else 1."""
    if torch.cuda.is_available() or torch.distributed.get_world_size() > 1:
        return 1
    return max(1, min(preset.workers, pending))


def _execute_in_workers(preset: MQARPreset, out: Path, results: Results, pending: list[Run], progress: bool):
    """Yield ``(run, cells, record)`` as worker processes finish the ``pending`` runs.

    Each worker is a fresh (spawned) process with its own one-rank process group and the parent's
    intra-op thread count; a run trains exactly as it would in this process (``execute_run``, seeded
    by the run). A later seed waits until its first-seed twin has selected the learning rate it
    reuses. The caller must add each yielded run to ``results`` before asking for the next one."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")
    lines = context.Queue()
    workers = _workers(preset, len(pending))
    for line in range(1, workers + 1):
        lines.put(line)
    waiting, running = list(pending), {}
    first_seed = preset.seeds[0]

    def ready(run: Run) -> bool:
        unfinished = [*waiting, *running.values()]
        return run.seed == first_seed or not any(r.seed == first_seed and r.lr_source == run.lr_source for r in unfinished)

    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(torch.get_num_threads(), lines)) as pool:
        while waiting or running:
            for run in [r for r in waiting if ready(r)][: workers - len(running)]:
                waiting.remove(run)
                running[pool.submit(_execute_in_worker, preset, run, out, progress, _lrs_of(preset, results, run))] = run
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                run = running.pop(future)
                yield (run, *future.result())


def _init_worker(threads: int, lines) -> None:
    """A worker's set-up: its own rendezvous (not the parent's), the parent's thread count, a progress line."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)
    torch.set_num_threads(threads)
    trainer.progress_line = lines.get()


def _execute_in_worker(preset: MQARPreset, run: Run, out: Path, progress: bool,
                       lrs: tuple[float, ...] | None) -> tuple[list[dict], dict]:
    trainer.initialize_distributed(preset.tensor_parallel_size, run.seed)
    return execute_run(preset, run, out, progress, lrs)


def _broadcast(obj):
    if torch.distributed.get_world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
