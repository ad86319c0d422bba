"""`initialize_single_process`: build_hybrid_model names it when the parallel state is missing; it is
idempotent, seeds the model (same seed, same weights) and refuses a second, different TP size.
Runs in a fresh interpreter: the rest of the suite shares one process group."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import torch
    from megatron.core import parallel_state
    from echo_megatron.megatron import SKAConfig, build_hybrid_model, initialize_single_process

    def build():
        config = SKAConfig(num_layers=2, hidden_size=32, num_attention_heads=2, ska_rank=8, ska_value_dim=8,
                           ska_chunk_size=4, mamba_head_dim=8, mamba_state_dim=8, normalization="RMSNorm")
        model = build_hybrid_model(config, "M*", vocab_size=16, seq_length=16)
        return {name: value for name, value in model.state_dict().items() if isinstance(value, torch.Tensor)}

    try:
        build()
    except RuntimeError as error:
        assert "initialize_single_process" in str(error), error
        print("missing state: RuntimeError")
    initialize_single_process(seed=3)
    first = build()
    initialize_single_process(seed=3)  # again: same groups, re-seeded
    assert torch.distributed.get_world_size() == 1 and parallel_state.get_tensor_model_parallel_world_size() == 1
    second = build()
    assert all(torch.equal(first[name], second[name]) for name in first)
    initialize_single_process(seed=4)
    third = build()
    assert not torch.equal(first["decoder.layers.1.self_attention.in_proj.weight"],
                           third["decoder.layers.1.self_attention.in_proj.weight"])
    try:
        initialize_single_process(seed=0, tensor_model_parallel_size=2)
    except ValueError as error:
        assert "tensor_model_parallel_size" in str(error), error
        print("tp mismatch: ValueError")
    print("ok")
""")


def test_initialize_single_process_in_fresh_interpreter(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split() == ["missing", "state:", "RuntimeError", "tp", "mismatch:", "ValueError", "ok"]
