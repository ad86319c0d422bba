"""An exported `echo_hybrid` directory is self-contained: a fresh process in which echo_megatron, megatron and
mamba_ssm cannot be imported loads it with transformers alone and gets the in-package model's logits, greedy
`generate()` equal to full recomputation and a cache of constant size; with echo_megatron importable the same
files run its kernels. The generated file is the package's source text."""

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from echo_megatron.hf import EchoHybridConfig, EchoHybridForCausalLM, export_model
from echo_megatron.hf.remote_code import RemoteCodeError, _assemble, remote_code_files
from echo_megatron.ops import chunked, decode, portable
from tests.hf.common import SEQ, VOCAB, perturbed_model, relative_error

IDS = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))
PROMPT_LEN, NEW_TOKENS = 21, 20  # the prompt ends mid-chunk (S = 8); the new tokens cross three chunk boundaries

STANDALONE = """
import json, sys
BLOCKED = ("echo_megatron", "megatron", "mamba_ssm")
for name in BLOCKED:
    sys.modules[name] = None  # `import name` raises ImportError, find_spec(name) is None
import torch
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache

directory, ids_file, prompt_len, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32).eval()
ids = torch.load(ids_file)
prompt = ids[:, :prompt_len]

def cache_bytes(cache):
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "groups"):  # the SKA layer's constant state
            total += layer.nbytes
        elif hasattr(layer, "conv_states"):  # Mamba's
            states = [*layer.conv_states.values(), *layer.recurrent_states.values()]
            total += sum(s.numel() * s.element_size() for s in states if s is not None)
    return total

with torch.no_grad():
    logits = {"full": model(ids, use_cache=False).logits, "prefill": model(ids, use_cache=True).logits}
    generated = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
    recomputed = prompt
    for _ in range(new_tokens):
        recomputed = torch.cat([recomputed, model(recomputed, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    cache = DynamicCache(config=model.config)
    model(prompt, past_key_values=cache, use_cache=True)
    sizes = []
    for step in range(new_tokens):
        model(recomputed[:, prompt_len + step:prompt_len + step + 1], past_key_values=cache, use_cache=True)
        sizes.append(cache_bytes(cache))
torch.save(logits, ids_file + ".logits")
loaded = sorted({name.split(".")[0] for name, module in sys.modules.items() if module is not None} & set(BLOCKED))
print(json.dumps(dict(generated=generated.tolist(), recomputed=recomputed.tolist(), sizes=sizes, loaded=loaded,
                      model_module=type(model).__module__, mixer=repr(model.model.layers[1].mixer),
                      seq_length=cache.get_seq_length())))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model_parallel_tp1):
    """A perturbed Megatron SKA + Mamba-2 model exported to an echo_hybrid directory (fp32)."""
    directory = tmp_path_factory.mktemp("remote") / "hf"
    export_model(perturbed_model("ska"), directory)
    return directory


def test_fresh_process_without_echo_megatron(exported, tmp_path):
    torch.save(IDS, tmp_path / "ids.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, "-c", STANDALONE, str(exported), str(tmp_path / "ids.pt"),
                             str(PROMPT_LEN), str(NEW_TOKENS)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded"] == [] and report["model_module"].startswith("transformers_modules")
    assert "ska=transformers_modules." in report["mixer"]  # the file's own PyTorch path ran
    package_model = EchoHybridForCausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        expected = package_model(IDS, use_cache=False).logits
        expected_tokens = package_model.generate(IDS[:, :PROMPT_LEN], max_new_tokens=NEW_TOKENS, do_sample=False)
    for path, logits in torch.load(tmp_path / "ids.pt.logits").items():  # `ska` without a cache, `ska_prefill` with
        assert relative_error(expected, logits) <= 1e-5, path
    assert report["generated"] == report["recomputed"] == expected_tokens.tolist()
    assert report["seq_length"] == PROMPT_LEN + NEW_TOKENS
    assert report["sizes"][0] > 0 and len(set(report["sizes"])) == 1, report["sizes"]


def test_with_echo_megatron_importable_the_package_kernels_run(exported, tmp_path, monkeypatch):
    """The exported file itself (AutoModel would pick the registered in-package class here) runs `echo_megatron.ops`."""
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    remote_class = get_class_from_dynamic_module("modeling_echo_hybrid.EchoHybridForCausalLM", str(exported))
    model = remote_class.from_pretrained(exported).eval()
    assert type(model).__module__.startswith("transformers_modules")
    assert "ska=echo_megatron.ops.ska" in repr(model.model.layers[1].mixer)
    with torch.no_grad():
        expected = EchoHybridForCausalLM.from_pretrained(exported).eval()(IDS).logits
        assert relative_error(expected, model(IDS).logits) <= 1e-6


def _imports_echo_megatron(line: str) -> bool:
    return line.strip().startswith(("import ", "from ")) and "echo_megatron" in line


def test_generated_file_is_the_package_source():
    files = remote_code_files()
    modeling, configuration = files["modeling_echo_hybrid.py"], files["configuration_echo_hybrid.py"]
    for definition in (chunked.causal_in_blocks, chunked._CausalBlocks, decode.step, decode.SKAState, portable.ska,
                       EchoHybridForCausalLM):
        assert inspect.getsource(definition) in modeling, definition.__name__
    for absent in ("def forward_with_statistics", "class InitialStatistics", "def ska_reference", "import triton"):
        assert absent not in modeling, absent  # no prefix mode, context parallelism, reference or Triton
    assert inspect.getsource(EchoHybridConfig) in configuration
    assert not [line for line in configuration.splitlines() if _imports_echo_megatron(line)]
    imports = [line for line in modeling.splitlines() if _imports_echo_megatron(line)]
    assert imports == ["    from echo_megatron.ops import SKAState, ska, ska_prefill, ska_step  # noqa: F811"]


def test_generator_refuses_what_it_cannot_copy():
    with pytest.raises(RemoteCodeError, match="defined in"):
        _assemble([("echo_megatron.ops.chunked", ["spectral_norm_estimate"]),
                   ("echo_megatron.ops.reference", ["spectral_norm_estimate"])], after={}, title="clash")
