"""The prepared GPU end-to-end run (issue 19): the launcher, resume, serving and HF export of one Echo model on one GPU.

Run through `scripts/gpu_e2e.sh` (which installs the carried wheels first), or directly:

    PYTHONPATH=$PWD python benchmarks/gpu_e2e.py --out DIR              # one CUDA GPU (<= 8 minutes)
    PYTHONPATH=$PWD python benchmarks/gpu_e2e.py --out DIR --dry-run    # the same code on the CPU, tiny sizes

Sections, in this order, each with its own time limit (the child processes it starts are killed at the limit, and
what they wrote so far is kept), each catching its own errors so that one failure never loses the others:

  e  Environment: versions, the GPU, which Mamba-2 / attention code paths are importable, and the SDPA backend
     `SDPAttention` picks for the softmax runs' shapes.
  a  Pretraining, `torchrun --nproc-per-node 1 -m echo_megatron.pretrain`, echo-50m (dry run: echo-tiny), mock data,
     bf16 (dry run: fp32), `--use-distributed-optimizer`, seq 2048, 30 iterations, for three stacks of the same depth:
     Echo (SKA in '*'), `--echo-attention softmax` (SDPA core attention), Mamba-2 in every '*'. Rows: tokens/s per
     GPU and MFU (the launcher's `echo-megatron:` line, FLOPs from `echo_megatron/megatron/flops.py`, peak from
     `--echo-peak-tflops` or the GPU's name), Megatron's max allocated memory, the loss at the start and the end.
     The Echo run saves a checkpoint at iteration `save_at`.
  b  Resume: the Echo run reloaded at `save_at`, 5 more iterations (`--exit-interval`): losses next to the
     uninterrupted run's.
  c  `echo_megatron.serve.generate` (what `echo-megatron generate` runs) on that checkpoint: prompts of different
     lengths in one batch, tokens/s, state bytes per request, greedy ids next to greedy decoding by full
     recomputation (a whole forward per token) of the same model.
  d  `export_checkpoint(..., dtype=bf16)` (what `echo-megatron export-hf --dtype bf16` runs) -> transformers
     `from_pretrained` + `generate()` on the device: logits against the checkpoint's Megatron forward in fp32
     (relative error within `BF16_RELATIVE_TOLERANCE`), greedy ids against Megatron's greedy by recomputation.

Every row is written as soon as it exists: `DIR/gpu_e2e.json` and `DIR/gpu_e2e.md` are rewritten after each, and the
same report goes to `DIR/docs/results/<gpu>/gpu_e2e_<date>_<commit>.{json,md}` (copy `DIR/docs` into the repository
to commit it). Children's logs: `DIR/logs/`.

On a GPU machine without Transformer Engine the runs use `--transformer-impl local`; without causal-conv1d's CUDA
extension `--disable-mamba-mem-eff-path` (Megatron's unfused Mamba path: `F.conv1d` + mamba-ssm's Triton SSD scan);
without mamba-ssm's `selective_scan_cuda` a stand-in module (`STUB_SOURCE`, put first on the children's path) lets
`mamba_ssm` import, whose Triton kernels are all that Megatron's Mamba-2 layer calls.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
STACKS = ("echo", "softmax", "mamba")
"""The three pretraining runs of section a: SKA, SDPA softmax attention, Mamba-2 in the '*' slots."""
BF16_RELATIVE_TOLERANCE = 2e-2
"""Section d: ||HF bf16 logits - Megatron logits|| / ||Megatron logits|| must stay under this (bf16 weights and
activations carry 8 significant bits, 4e-3 per rounding, accumulated over the layers)."""
RESUME_TOLERANCE = {False: 1e-2, True: 1e-5}
"""Section b: |resumed - uninterrupted| / uninterrupted per iteration, bf16 on the GPU (2^-8 = 4e-3 per rounding;
kernels with atomics are not bitwise reproducible), fp32 in the dry run."""
STUB_SOURCE = '''"""Stand-in for mamba-ssm's `selective_scan_cuda` extension (not built here; see benchmarks/gpu_e2e.py).

`import mamba_ssm` imports it at the top; Megatron's Mamba-2 layer never calls it (it uses mamba-ssm's Triton kernels).
"""


def __getattr__(name):
    raise RuntimeError(f"selective_scan_cuda.{name}: mamba-ssm was built without its CUDA extension")
'''


# ----------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Profile:
    """Sizes and time limits (seconds) of one mode."""

    name: str
    preset: str
    seq_length: int
    micro_batch: int
    iterations: int
    save_at: int
    resume_iterations: int
    launcher_flags: tuple[str, ...]
    prompt_lengths: tuple[int, ...]
    new_tokens: int
    export_length: int
    limits: dict = field(default_factory=dict)

    @property
    def resume_to(self) -> int:
        return self.save_at + self.resume_iterations


GPU = Profile("gpu", "echo-50m", 2048, 8, 30, 15, 5, ("--bf16",), (17, 130, 700), 32, 512,
              dict(e=20, a_echo=150, a_softmax=55, a_mamba=55, b=40, c=55, d=55))
"""The Echo run goes first and pays for compiling every Triton kernel (SKA's, mamba-ssm's autotuned SSD scan) into
Triton's on-disk cache, which the later runs reuse; its checkpoint at `save_at` is on disk halfway through."""
DRY = Profile("dry run (CPU, gloo, echo-tiny)", "echo-tiny", 128, 2, 6, 3, 2, ("--cpu",), (3, 61, 100), 4, 100,
              dict(e=240, a_echo=240, a_softmax=240, a_mamba=240, b=240, c=240, d=240))
"""The dry run's limits only stop a hung child on a CPU shared with other work (gpu_e2e.sh allows 30 minutes)."""
WARM_UP_S = 30
"""Wheel install and interpreter start-up before the first section (scripts/gpu_e2e.sh)."""
assert sum(GPU.limits.values()) + WARM_UP_S <= 480, "the GPU run must fit in 8 minutes by construction"


# ----------------------------------------------------------------------------- report
class Report:
    """Sections -> status and rows; rewritten (JSON + markdown, two places) after every change."""

    def __init__(self, out: Path, meta: dict, results_dir: Path) -> None:
        self.out, self.meta, self.results_dir = out, meta, results_dir
        self.sections: dict[str, dict] = {}

    def start(self, key: str, title: str, limit: float) -> None:
        self.sections[key] = dict(title=title, limit_s=limit, status="running", error=None, rows=[])
        self.write()

    def add(self, key: str, row: dict) -> None:
        self.sections[key]["rows"].append(row)
        self.write()

    def finish(self, key: str, status: str, error: str | None = None) -> None:
        self.sections[key].update(status=status, error=error)
        self.write()

    def paths(self) -> list[Path]:
        stem = f"gpu_e2e_{self.meta['date']}_{self.meta['commit']}"
        return [self.out / "gpu_e2e", self.results_dir / self.meta["gpu_slug"] / stem]

    def write(self) -> None:
        data = json.dumps(dict(meta=self.meta, sections=self.sections), indent=1, default=str) + "\n"
        markdown = self.markdown()
        for stem in self.paths():
            stem.parent.mkdir(parents=True, exist_ok=True)
            for suffix, text in ((".json", data), (".md", markdown)):
                tmp = stem.with_suffix(suffix + ".tmp")
                tmp.write_text(text)
                tmp.replace(stem.with_suffix(suffix))

    def markdown(self) -> str:
        lines = ["# GPU end-to-end run (benchmarks/gpu_e2e.py)", ""]
        lines += [f"- {k}: {v}" for k, v in self.meta.items()]
        for key, section in self.sections.items():
            lines += ["", f"## {key}. {section['title']}", "",
                      f"status: {section['status']} (limit {section['limit_s']} s)"]
            if section["error"]:
                lines += ["", "```", section["error"], "```"]
            rows = section["rows"]
            if rows:
                columns = list(dict.fromkeys(c for row in rows for c in row))
                lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
        return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "/")


def run_section(report: Report, key: str, title: str, limit: float, body: Callable[[float], None]) -> None:
    """Run `body(deadline)`; record "ok", "failed" (with the error) or "partial (time limit)"."""
    report.start(key, title, limit)
    try:
        body(time.monotonic() + limit)
    except subprocess.TimeoutExpired as error:
        report.finish(key, "partial (time limit)", f"{error.cmd[-1] if error.cmd else ''}: stopped after {limit} s")
    except Exception as error:  # noqa: BLE001 - one section's failure never loses the others
        frame = traceback.extract_tb(error.__traceback__)[-1]
        report.finish(key, "failed", f"{type(error).__name__}: {error} [at {Path(frame.filename).name}:{frame.lineno}]")
    else:
        failed = [row for row in report.sections[key]["rows"] if row.get("pass") is False]
        report.finish(key, f"ok, {len(failed)} check(s) failed" if failed else "ok")


_children: set[int] = set()
"""Process groups of the running children (killed when this process is terminated, e.g. by gpu_e2e.sh's timeout)."""


def _terminate(signum, frame) -> None:
    for group in list(_children):
        os.killpg(group, signal.SIGKILL)
    sys.exit(128 + signum)


def run_child(command: list[str], log: Path, deadline: float, env: dict) -> str:
    """Run `command` (its own process group) with stdout+stderr to `log` until it exits or `deadline`; returns the log
    text. At the deadline the whole group is killed and `subprocess.TimeoutExpired` raised (the log is kept)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as sink:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        _children.add(process.pid)
        try:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise subprocess.TimeoutExpired(command, deadline) from None
        finally:
            _children.discard(process.pid)
    text = log.read_text(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"{Path(command[-1]).name if command else ''} exited with {process.returncode}; "
                           f"log {log.name} ends: {text[-1500:]}")
    return text


# ----------------------------------------------------------------------------- launcher logs
_LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.eE+-]+)")
_THROUGHPUT = re.compile(r"echo-megatron: tokens/s ([\d,]+) \| model TFLOP/s/device ([\d.eE+-]+) .*?\| MFU ([^|]+?) \|")
_MEMORY = re.compile(r"max allocated: ([\d.]+)")


def losses(log: str) -> dict[int, float]:
    """Iteration -> Megatron's logged 'lm loss' (needs --log-interval 1)."""
    return {int(i): float(v) for i, v in _LOSS.findall(log)}


def training_row(stack: str, log: str, warm_up: int) -> dict:
    """One section-a row from a launcher log: medians of the per-iteration throughput lines after `warm_up` lines."""
    per_iteration = _THROUGHPUT.findall(log)
    steady = per_iteration[warm_up:] or per_iteration
    loss = losses(log)
    row = dict(stack=stack, iterations=max(loss, default=0))
    if steady:
        row["tokens/s/GPU"] = statistics.median(float(t.replace(",", "")) for t, _, _ in steady)
        row["TFLOP/s/GPU"] = statistics.median(float(f) for _, f, _ in steady)
        mfu = [m.strip() for _, _, m in steady]
        row["MFU"] = (f"{statistics.median(float(m[:-1]) for m in mfu):.2f}%" if all(m.endswith("%") for m in mfu)
                      else mfu[0])
    memory = _MEMORY.findall(log)
    row["max allocated MiB"] = float(memory[0]) if memory else "not logged"
    if len(loss) >= 4:
        first, last = sorted(loss)[:2], sorted(loss)[-2:]
        row["loss start"] = statistics.mean(loss[i] for i in first)
        row["loss end"] = statistics.mean(loss[i] for i in last)
        row["pass"] = row["loss end"] < row["loss start"]
    return row


def resumed_pairs(reference: dict[int, float], resumed: dict[int, float], start: int) -> list[dict]:
    """Rows (iteration, uninterrupted loss, resumed loss). Megatron 0.19 logs the first iteration after a resume
    without resetting its loss accumulator: the value at start+2 is the mean of start+1 and start+2."""
    rows = []
    for iteration in sorted(i for i in resumed if i > start):
        expected = reference.get(iteration)
        if expected is not None and iteration == start + 2 and start + 1 in reference:
            expected = (reference[start + 1] + expected) / 2
        row = dict(iteration=iteration, uninterrupted=expected, resumed=resumed[iteration])
        if expected is not None:
            row["rel_diff"] = abs(resumed[iteration] - expected) / abs(expected)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- environment
def have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def cuda_extension_stubs(stub_dir: Path) -> list[str]:
    """On CUDA without mamba-ssm's `selective_scan_cuda`, write the stand-in module into `stub_dir` (put first on the
    children's path); returns the stubbed names."""
    import torch

    if not torch.cuda.is_available() or have("selective_scan_cuda") or not have("mamba_ssm"):
        return []
    stub_dir.mkdir(parents=True, exist_ok=True)
    (stub_dir / "selective_scan_cuda.py").write_text(STUB_SOURCE)
    return ["selective_scan_cuda"]


def launcher_flags(profile: Profile, dry_run: bool) -> list[str]:
    """Flags shared by every pretraining run of this machine."""
    flags = ["--echo-preset", profile.preset, "--mock-data", "--seq-length", str(profile.seq_length),
             "--micro-batch-size", str(profile.micro_batch), "--global-batch-size", str(profile.micro_batch),
             "--train-iters", str(profile.iterations), "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "2",
             "--log-interval", "1", "--eval-iters", "0", "--seed", "1234", "--use-distributed-optimizer",
             *profile.launcher_flags]
    if not dry_run:
        if not have("transformer_engine"):  # and so no fused weight-gradient kernel (apex is not there either)
            flags += ["--transformer-impl", "local", "--no-gradient-accumulation-fusion"]
        if not have("causal_conv1d_cuda"):
            flags += ["--disable-mamba-mem-eff-path"]
    return flags


def stack_flags(stack: str, preset: str) -> list[str]:
    """What makes each section-a stack: SKA (the preset), softmax attention, or Mamba-2 in every '*' slot."""
    if stack == "softmax":
        return ["--echo-attention", "softmax"]
    if stack == "mamba":
        from echo_megatron.megatron.presets import get_preset

        return ["--hybrid-layer-pattern", get_preset(preset).pattern.replace("*", "M")]
    return []


# ----------------------------------------------------------------------------- workers (child processes)
def _rows_writer(path: Path) -> Callable[[dict], None]:
    def write(row: dict) -> None:
        with open(path, "a") as sink:
            sink.write(json.dumps(row, default=str) + "\n")

    return write


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def worker_environment(args, emit: Callable[[dict], None]) -> None:
    import torch
    import triton

    emit(dict(item="torch", value=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__))
    emit(dict(item="device", value=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"))
    import megatron.core

    from echo_megatron.megatron.cpu import enable_cpu_mode
    from echo_megatron.pretrain.throughput import peak_tflops

    cpu = enable_cpu_mode()  # what --cpu does in the dry run's launcher; nothing on a GPU
    from megatron.core.ssm import mamba_mixer

    emit(dict(item="megatron-core", value=megatron.core.__version__, path=str(Path(megatron.core.__file__).parent)))
    emit(dict(item="peak bf16 TFLOP/s (MFU denominator)", value=peak_tflops(None)))
    emit(dict(item="Megatron Mamba-2 mixer has mamba-ssm (HAVE_MAMBA_SSM)", value=mamba_mixer.HAVE_MAMBA_SSM))
    for name in ("mamba_split_conv1d_scan_combined", "mamba_chunk_scan_combined", "causal_conv1d_fn",
                 "causal_conv1d_update", "selective_state_update"):
        function = getattr(mamba_mixer, name)
        emit(dict(item=f"Megatron mixer: {name}",
                  value="None" if function is None else f"{function.__module__}.{function.__name__}"))
    fused = cpu or have("causal_conv1d_cuda")
    emit(dict(item="Mamba-2 training path of the runs", value=(
        "use_mem_eff_path: mamba_split_conv1d_scan_combined" if fused else
        "--disable-mamba-mem-eff-path: in_proj, causal_conv1d_fn or F.conv1d, mamba_chunk_scan_combined, gated norm")))
    for module in ("transformer_engine", "flash_attn", "causal_conv1d_cuda", "selective_scan_cuda"):
        emit(dict(item=f"import {module}", value="yes" if have(module) else "no"))
    emit(dict(item="SDPAttention backend (causal, heads 7 x 64, T 2048)", value=_sdpa_backend()))


def _sdpa_backend() -> str:
    import torch
    from megatron.core.transformer.enums import AttnMaskType

    from echo_megatron.hf.megatron_io import megatron_session
    from echo_megatron.megatron import SKAConfig
    from echo_megatron.megatron.sdpa_attention import SDPAttention

    with megatron_session():
        cuda = torch.cuda.is_available()
        config = SKAConfig(num_layers=1, hidden_size=448, num_attention_heads=7, bf16=cuda, attention_dropout=0.0,
                           params_dtype=torch.bfloat16 if cuda else torch.float32)
        module = SDPAttention(config, 1, AttnMaskType.causal, "self")
        q = torch.randn(2048 if cuda else 64, 1, 7, 64, device=_device(), dtype=config.params_dtype)
        module(q, q, q, None)
        return module.backend


def _load_model(ckpt: Path):
    """The checkpoint as Megatron's `HybridModel` (fp32) on this machine's device, in eval mode; Mamba mixers take the
    unfused path when causal-conv1d's CUDA extension is missing (the fused one needs it)."""
    from megatron.core.ssm.mamba_mixer import MambaMixer

    from echo_megatron.hf.megatron_io import load_megatron_checkpoint

    model = load_megatron_checkpoint(ckpt).to(_device()).eval()
    if _device().type == "cuda" and not have("causal_conv1d_cuda"):
        for module in model.modules():
            if isinstance(module, MambaMixer):
                module.use_mem_eff_path = False
    return model


def _logits(model, ids):
    """Full-vocabulary logits [b, T, V] of one whole-sequence forward."""
    import torch

    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    return model(ids, positions, None, runtime_gather_output=True)


def _recomputed_greedy(model, prompt: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy ids by a whole forward per token, and each step's top-2 logit margin."""
    import torch

    ids = torch.tensor([prompt], device=_device())
    margins = []
    for _ in range(new_tokens):
        last = _logits(model, ids)[0, -1].float()
        top = last.topk(2).values
        margins.append(float(top[0] - top[1]))
        ids = torch.cat([ids, last.argmax().view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist(), margins


def _prompts(profile: Profile, vocab: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(0)
    return [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in profile.prompt_lengths]


def worker_generate(args, emit: Callable[[dict], None]) -> None:
    import torch

    from echo_megatron.hf.megatron_io import megatron_session
    from echo_megatron.serve.generate import generate

    profile = DRY if args.dry_run else GPU
    vocab = 128 if args.dry_run else 32000
    prompts = _prompts(profile, vocab)
    report = generate(args.ckpt, [" ".join(map(str, p)) for p in prompts], max_new_tokens=profile.new_tokens,
                      batch_size=len(prompts), ignore_eos=True)
    emit(dict(item="engine", requests=len(prompts), generated=report.generated_tokens, seconds=report.seconds,
              **{"tokens/s": report.tokens_per_second}))
    with megatron_session(), torch.no_grad():
        model = _load_model(args.ckpt)
        for completion, memory in zip(report.completions, report.memory):
            reference, margins = _recomputed_greedy(model, completion.prompt_ids, len(completion.ids))
            same = next((i for i, (a, b) in enumerate(zip(completion.ids, reference)) if a != b), len(reference))
            emit(dict(item=f"prompt {len(completion.prompt_ids)} tokens", generated=len(completion.ids),
                      **{"state bytes": memory.total, "SKA bytes": memory.ska, "Mamba bytes": memory.mamba,
                         "softmax KV bytes at this length": memory.softmax_kv,
                         "ids equal to recomputation": f"{same}/{len(reference)}",
                         "min top-2 margin": min(margins) if margins else None},
                      **{"pass": same == len(reference)}))


def worker_export(args, emit: Callable[[dict], None]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from echo_megatron.hf.export import export_checkpoint
    from echo_megatron.hf.megatron_io import megatron_session

    profile = DRY if args.dry_run else GPU
    hf_dir = Path(args.out) / "hf_bf16"
    start = time.perf_counter()
    export_checkpoint(args.ckpt, hf_dir, dtype="bf16", force=True)
    emit(dict(item="export-hf --dtype bf16", seconds=time.perf_counter() - start,
              bytes=sum(p.stat().st_size for p in hf_dir.iterdir())))
    vocab = 128 if args.dry_run else 32000
    ids = torch.randint(1, vocab, (2, profile.export_length), generator=torch.Generator().manual_seed(1)).to(_device())
    prompt = ids[:1, : profile.prompt_lengths[1]]
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).to(_device()).eval()
        hf.generation_config.eos_token_id = None
        hf_logits = hf(ids).logits.float()
        start = time.perf_counter()
        generated = hf.generate(prompt, max_new_tokens=profile.new_tokens, do_sample=False)
        hf_greedy = generated[0, prompt.shape[1]:].tolist()
        emit(dict(item="HF generate() (bf16, batch 1)", generated=len(hf_greedy),
                  **{"tokens/s": len(hf_greedy) / (time.perf_counter() - start)}))
        del hf
        with megatron_session():
            model = _load_model(args.ckpt)
            fp32 = _logits(model, ids)[..., : hf_logits.shape[-1]].float()
            error = float((hf_logits - fp32).norm() / fp32.norm())
            emit(dict(item="HF bf16 logits vs Megatron fp32", tokens=ids.numel(), relative_error=error,
                      max_abs_diff=float((hf_logits - fp32).abs().max()),
                      argmax_agreement=float((hf_logits.argmax(-1) == fp32.argmax(-1)).float().mean()),
                      tolerance=BF16_RELATIVE_TOLERANCE, **{"pass": error <= BF16_RELATIVE_TOLERANCE}))
            reference, margins = _recomputed_greedy(model, prompt[0].tolist(), profile.new_tokens)
            same = next((i for i, (a, b) in enumerate(zip(hf_greedy, reference)) if a != b), len(reference))
            # bf16 may pick the other token only where fp32's top-2 margin is within bf16's error of the logits
            explained = same == len(reference) or margins[same] <= BF16_RELATIVE_TOLERANCE * float(fp32.abs().max())
            emit(dict(item=f"HF greedy vs Megatron fp32 recomputation (prompt {prompt.shape[1]})",
                      **{"ids equal": f"{same}/{len(reference)}",
                         "fp32 top-2 margin at first difference": None if same == len(reference) else margins[same],
                         "pass": explained}))


WORKERS = {"environment": worker_environment, "generate": worker_generate, "export": worker_export}


# ----------------------------------------------------------------------------- orchestration
def _meta(dry_run: bool, commit: str) -> dict:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and not dry_run else "cpu-dry-run"
    return dict(mode=(DRY if dry_run else GPU).name, date=datetime.date.today().isoformat(), commit=commit,
                gpu=gpu, gpu_slug=re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-"),
                python=sys.version.split()[0], host=os.uname().nodename)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--dry-run", action="store_true", help="CPU, gloo, echo-tiny, a few iterations")
    parser.add_argument("--sections", default="eabcd", help="which sections to run (default: all, in order)")
    parser.add_argument("--commit", default=os.environ.get("ECHO_COMMIT", "unknown"),
                        help="commit of the code under test, for the result file names (default: $ECHO_COMMIT)")
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="where docs/results/<gpu>/ goes (default: OUT/docs/results)")
    parser.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        import echo_megatron.hf  # noqa: F401  (transformers' NemotronH before any CPU mode)

        WORKERS[args.worker](args, _rows_writer(args.rows))
        return 0
    unknown = set(args.sections) - set("eabcd")
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}; allowed letters: e, a, b, c, d")
    return orchestrate(args)


def orchestrate(args) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    profile = DRY if args.dry_run else GPU
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out, _meta(args.dry_run, args.commit), args.results_dir or out / "docs" / "results")
    stubs = cuda_extension_stubs(out / "stubs")
    path = [str(out / "stubs")] if stubs else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*path, str(ROOT), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1")
    if args.dry_run:
        env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    report.meta.update(stubbed_cuda_extensions=stubs or "none")
    ckpt, logs = out / "ckpt_echo", out / "logs"
    common = launcher_flags(profile, args.dry_run)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                "-m", "echo_megatron.pretrain"]
    uninterrupted: dict[int, float] = {}

    def worker(name: str, key: str, deadline: float) -> None:
        rows = logs / f"{name}.jsonl"
        rows.unlink(missing_ok=True)
        command = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--worker", name,
                   "--ckpt", str(ckpt), "--rows", str(rows), *(["--dry-run"] if args.dry_run else [])]
        try:
            run_child(command, logs / f"{name}.log", deadline, env)
        finally:
            for line in rows.read_text().splitlines() if rows.exists() else []:
                report.add(key, json.loads(line))

    def train(deadline_total: float) -> None:
        failures = []
        for stack in STACKS:
            limit = profile.limits[f"a_{stack}"]
            deadline = min(deadline_total, time.monotonic() + limit)
            flags = [*common, *stack_flags(stack, profile.preset)]
            if stack == "echo":
                flags += ["--save", str(ckpt), "--save-interval", str(profile.save_at)]
            log = logs / f"train_{stack}.log"
            try:
                run_child([*torchrun, *flags], log, deadline, env)
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                failures.append(f"{stack}: {type(error).__name__}")
            text = log.read_text(errors="replace") if log.exists() else ""
            if stack == "echo":
                uninterrupted.update(losses(text))
            report.add("a", training_row(stack, text, warm_up=3))
        if failures:
            raise RuntimeError("runs that did not finish: " + ", ".join(failures) + " (logs/train_*.log)")

    def resume(deadline: float) -> None:
        flags = [*common, "--load", str(ckpt), "--ckpt-step", str(profile.save_at),
                 "--exit-interval", str(profile.resume_to)]
        log = logs / "resume_echo.log"
        try:
            run_child([*torchrun, *flags], log, deadline, env)
        finally:
            text = log.read_text(errors="replace") if log.exists() else ""
            for row in resumed_pairs(uninterrupted, losses(text), profile.save_at):
                report.add("b", {**row, "pass": row.get("rel_diff", 1.0) <= RESUME_TOLERANCE[args.dry_run]})

    plan = [
        ("e", "Environment and code paths", profile.limits["e"], lambda d: worker("environment", "e", d)),
        ("a", f"Pretraining, {profile.preset}, seq {profile.seq_length}, {profile.iterations} iterations, 1 GPU",
         sum(profile.limits[f"a_{s}"] for s in STACKS), train),
        ("b", f"Save at {profile.save_at} -> resume {profile.resume_to - profile.save_at} iterations (Echo)",
         profile.limits["b"], resume),
        ("c", "echo-megatron generate from the checkpoint vs full recomputation", profile.limits["c"],
         lambda d: worker("generate", "c", d)),
        ("d", "export-hf --dtype bf16 -> transformers generate()", profile.limits["d"],
         lambda d: worker("export", "d", d)),
    ]
    for key, title, limit, body in plan:
        if key in args.sections:
            run_section(report, key, title, limit, body)
    print(report.markdown())
    ok = all(s["status"] == "ok" for s in report.sections.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
