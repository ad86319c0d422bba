"""`--cpu` fixes that can be checked in-process (the torchrun tests in test_launcher.py cover the rest)."""

from __future__ import annotations

import pytest
import torch

from echo_megatron.pretrain import cpu_training
from echo_megatron.pretrain.cpu_training import CudaToCPU


def test_cuda_tensors_land_on_the_cpu_and_report_the_cuda_type():
    with CudaToCPU():
        created = torch.zeros(3, device="cuda")
        moved = torch.ones(2).to("cuda")
        same = created.cuda()
        assert created.device.type == moved.device.type == "cpu"
        assert same is created
        assert created.type() == "torch.cuda.FloatTensor"
        assert created.type(torch.float64).dtype == torch.float64  # the converting form is untouched
    assert created.type() == "torch.FloatTensor"  # only inside the mode


def test_cpu_fixes_refuse_a_machine_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="--cpu is for machines without CUDA"):
        cpu_training.enable()



def test_jit_warmup_runs_on_a_forked_cpu_generator(monkeypatch):
    """Megatron's JIT warmup draws random inputs sized by the parallel layout between seeding and the
    weight initialisation; on the CPU it must not advance the generator the weights come from."""
    from megatron.training import initialize

    monkeypatch.setattr(initialize, "_warmup_jit_function", lambda tp_size=None: torch.rand(7, device="cpu"))
    cpu_training.jit_warmup_keeps_the_cpu_generator()
    torch.manual_seed(0)
    initialize._warmup_jit_function(tp_size=1)
    after_warmup = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after_warmup, torch.rand(3))
