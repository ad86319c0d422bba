"""Import transformers' NemotronH modelling before anything else of `echo_megatron.hf`.

transformers picks its Mamba kernels when `modeling_nemotron_h` is first imported: mamba-ssm's functions if
`import mamba_ssm` succeeds, else its own PyTorch code. On a machine without CUDA, `import mamba_ssm` fails
(no CUDA extensions) unless `echo_megatron.megatron.cpu.enable_cpu_mode()` has installed its stub extensions,
in which case transformers would pick GPU kernels that cannot run. So, without CUDA, the module is imported
with the stubs (and any mamba-ssm / causal-conv1d modules loaded through them) hidden, then they are restored.
"""

from __future__ import annotations

import importlib
import sys

import torch

MODULE = "transformers.models.nemotron_h.modeling_nemotron_h"
_HIDDEN_PREFIXES = ("mamba_ssm", "causal_conv1d", "selective_scan_cuda")


def import_nemotron_h():
    """transformers' `modeling_nemotron_h`, with its PyTorch Mamba path selected when CUDA is absent."""
    if MODULE in sys.modules or torch.cuda.is_available():
        return importlib.import_module(MODULE)
    hidden = {name: module for name, module in sys.modules.items()
              if name.split(".")[0] in _HIDDEN_PREFIXES or name.startswith("causal_conv1d")}
    for name in hidden:
        del sys.modules[name]
    blocked = {name: None for name in ("mamba_ssm", "causal_conv1d")}  # None in sys.modules: ImportError
    sys.modules.update(blocked)
    try:
        return importlib.import_module(MODULE)
    finally:
        for name in blocked:
            sys.modules.pop(name, None)
        sys.modules.update(hidden)
