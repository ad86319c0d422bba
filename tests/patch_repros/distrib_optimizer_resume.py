"""Repro: distributed-optimizer save / resume with torch's Adam (no Apex, no Transformer Engine).

Trains a tiny hybrid model under Megatron's `DistributedDataParallel` + `DistributedOptimizer` for
4 steps, saves a torch_dist checkpoint (`dp_reshardable`, megatron.training's default sharding),
trains 2 more steps; then a fresh model + optimizer load the checkpoint the way megatron.training
does and train the same 2 steps. Exit 0 iff the resumed run reproduces the uninterrupted one exactly
(losses, grad norms, every parameter) and each parameter has its own Adam `step` tensor.

Usage: python distrib_optimizer_resume.py CHECKPOINT_DIR [SHARDING_TYPE]   (prints one JSON line;
SHARDING_TYPE is megatron's `distrib_optim_sharding_type`, default dp_reshardable)
"""

import contextlib
import json
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode


class CudaToCPU(TorchFunctionMode):
    """Test harness only: megatron-core's optimizer code makes `device='cuda'` tensors and checks
    `Tensor.type() == 'torch.cuda.FloatTensor'`; run it on the CPU unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        device = kwargs.get("device")
        if isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


class NoStream:
    """Test harness only: CPU work is synchronous, there is nothing to wait for."""

    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass


def run_on_cpu() -> contextlib.AbstractContextManager:
    torch.cuda.current_stream = lambda device=None: NoStream()
    torch.cuda.stream = lambda stream: contextlib.nullcontext()
    return CudaToCPU()


def main(checkpoint_dir: str, sharding_type: str = "dp_reshardable") -> int:
    from megatron.core import dist_checkpointing
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from echo_megatron.megatron import SKAConfig, build_hybrid_model, initialize_single_process

    metadata = {"distrib_optim_sharding_type": sharding_type}
    tokens = torch.randint(0, 32, (6, 2, 24), generator=torch.Generator().manual_seed(0))

    def build():
        initialize_single_process(seed=0)
        config = SKAConfig(num_layers=3, hidden_size=32, num_attention_heads=2, ska_rank=8, ska_value_dim=8,
                           ska_chunk_size=8, ska_zero_init_output=False, mamba_head_dim=8, mamba_state_dim=8,
                           ffn_hidden_size=64, normalization="RMSNorm", add_bias_linear=False,
                           hidden_dropout=0.0, use_cpu_initialization=True)
        model = build_hybrid_model(config, "M*-", vocab_size=32, seq_length=24)
        model = DistributedDataParallel(config, DistributedDataParallelConfig(use_distributed_optimizer=True), model)
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=3e-3, weight_decay=0.01, clip_grad=1.0,
                            use_distributed_optimizer=True), [model])
        return model, optimizer

    def train(model, optimizer, steps):
        out = []
        for step in steps:
            model.zero_grad_buffer()
            optimizer.zero_grad()
            batch = tokens[step]
            logits = model(batch, torch.arange(24).expand(2, 24), None, runtime_gather_output=True)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 32).float(), batch[:, 1:].reshape(-1))
            loss.backward()
            model.finish_grad_sync()
            _, grad_norm, _ = optimizer.step()
            out.append((loss.item(), float(grad_norm)))
        return out

    def state_dict(model, optimizer, is_loading):
        model_state = model.module.sharded_state_dict()
        return {"model": model_state,
                "optimizer": optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=metadata)}

    model, optimizer = build()
    train(model, optimizer, range(4))
    Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(state_dict(model, optimizer, is_loading=False), checkpoint_dir)
    uninterrupted = train(model, optimizer, range(4, 6))
    final = {n: p.detach().clone() for n, p in model.named_parameters()}

    model, optimizer = build()
    try:  # as megatron.training.checkpointing.load_checkpoint: template, load, then load_state_dict
        loaded = dist_checkpointing.load(state_dict(model, optimizer, is_loading=True), checkpoint_dir)
        model.module.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
    except Exception as error:  # noqa: BLE001 - the repro reports whatever breaks
        print(json.dumps({"ok": False, "error": f"{type(error).__name__}: {error}"}))
        return 1
    resumed = train(model, optimizer, range(4, 6))
    steps = [s["step"] for s in optimizer.optimizer.state.values()]
    result = {
        "uninterrupted": uninterrupted, "resumed": resumed,
        "max_param_diff": max((p.detach() - final[n]).abs().max().item() for n, p in model.named_parameters()),
        "adam_steps": sorted({float(s) for s in steps}),
        "distinct_step_tensors": len({id(s) for s in steps}), "params_with_state": len(steps),
    }
    result["ok"] = (resumed == uninterrupted and result["max_param_diff"] == 0.0 and result["adam_steps"] == [6.0]
                    and result["distinct_step_tensors"] == result["params_with_state"])
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    with run_on_cpu():
        sys.exit(main(*sys.argv[1:]))
