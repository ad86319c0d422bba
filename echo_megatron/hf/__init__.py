"""Hugging Face side of echo-megatron: `EchoHybridConfig`, `EchoHybridForCausalLM` (transformers 5) and converters.

Importing this package registers `echo_hybrid` with `AutoConfig` and `AutoModelForCausalLM`. Tested with
transformers 5.23.0 (5.24 renamed the cache argument of the forward).
"""

from ._nemotron_import import import_nemotron_h

import_nemotron_h()  # before anything imports mamba-ssm through the CPU-mode stubs (see _nemotron_import)

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from .cache import SKACacheLayer  # noqa: E402
from .configuration import EchoHybridConfig  # noqa: E402
from .convert import ConversionError  # noqa: E402
from .export import export_checkpoint, export_model, import_checkpoint  # noqa: E402
from .megatron_io import load_megatron_checkpoint, megatron_session  # noqa: E402
from .modeling import EchoHybridForCausalLM, EchoHybridModel  # noqa: E402

AutoConfig.register(EchoHybridConfig.model_type, EchoHybridConfig, exist_ok=True)
AutoModelForCausalLM.register(EchoHybridConfig, EchoHybridForCausalLM, exist_ok=True)

__all__ = ["EchoHybridConfig", "EchoHybridForCausalLM", "EchoHybridModel", "SKACacheLayer", "ConversionError",
           "export_model", "export_checkpoint", "import_checkpoint", "load_megatron_checkpoint", "megatron_session"]
