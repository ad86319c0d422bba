"""Run-time fixes for the unpatched megatron-core 0.19.2 (and Python 3.11) that the launcher needs.

`patches/` holds the same fixes as `.patch` files for users who patch their Megatron; this module
applies them at run time so the launcher never requires a patched install. Each fix names the bug it
fixes, checks that the code it replaces is the 0.19.2 original (else it leaves Megatron alone), and
says in the log when it is applied.
"""

from __future__ import annotations

import os
import typing

import typing_extensions


def install_typing_override() -> None:
    """`megatron.training` imports `typing.override` (Python >= 3.12); on 3.11 take typing_extensions'.

    Fixes: `ImportError: cannot import name 'override' from 'typing'` on `import megatron.training`.
    """
    if not hasattr(typing, "override"):
        typing.override = typing_extensions.override


def _log(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"echo-megatron compat: {message}", flush=True)


def skip_helper_compile() -> None:
    """`initialize_megatron` runs `compile_helpers()` (`make -C megatron/core/datasets`), but the
    megatron-core wheel ships no Makefile, only the compiled `helpers_cpp` extension: `make: *** No
    targets specified and no makefile found` and `Failed to compile the C++ dataset helper
    functions` (exit 1). When `helpers_cpp` imports, there is nothing to compile."""
    from megatron.core.datasets import utils as dataset_utils

    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        return  # a source checkout: keep Megatron's compile step
    if getattr(dataset_utils.compile_helpers, "_echo_compat", False):
        return

    def compile_helpers() -> None:
        """The wheel's compiled helpers_cpp is already importable."""

    compile_helpers._echo_compat = True
    dataset_utils.compile_helpers = compile_helpers
    _log("megatron.core.datasets helpers_cpp is prebuilt: skipping compile_helpers() (no Makefile in the wheel)")


def apply() -> None:
    """Apply every run-time fix the launcher needs (idempotent)."""
    install_typing_override()
    skip_helper_compile()
