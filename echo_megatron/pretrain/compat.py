"""Run-time fixes for the unpatched megatron-core 0.19.2 (and Python 3.11) that the launcher needs.

`patches/` holds the same fixes as `.patch` files for users who patch their Megatron; this module
applies them at run time so the launcher never requires a patched install. Each fix names the error it
fixes and says in the log (rank 0) when it is applied; the distributed-optimizer fixes are applied only
to megatron-core 0.19.2 (`FIXED_VERSION`), other versions are left alone with a log line.
"""

from __future__ import annotations

import argparse
import functools
import os
import typing

import torch

import typing_extensions


FIXED_VERSION = "0.19.2"
"""The megatron-core release whose distributed-optimizer code `distributed_optimizer_torch_adam` fixes."""


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


def _torch_adam_states(optimizer) -> list[dict]:
    """The per-parameter state dicts of a DistributedOptimizer's inner torch Adam/AdamW."""
    return [optimizer.optimizer.state[param] for group in optimizer.optimizer.param_groups for param in group["params"]]


def distributed_optimizer_torch_adam() -> None:
    """Distributed-optimizer resume with torch's Adam (no Apex / Transformer Engine), three bugs of
    `megatron/core/optimizer/distrib_optimizer.py` (0.19.2):

    1. Loading builds `sharded_state_dict(is_loading=True)`, which calls `state_dict()` on a fresh
       optimizer whose Adam state is empty: `assert len(steps) == 1` (`AssertionError`). Fix: before
       that, initialise the state as `init_state_fn` does, with `step` 0 in every parameter's state.
    2. `_set_main_param_and_optimizer_states` copies the checkpoint into the fp32 main parameters
       with grad enabled: `RuntimeError: a view of a leaf Variable that requires grad is being used in
       an in-place operation`. Fix: run it under `torch.no_grad()` (its siblings already are).
    3. After `load_state_dict`, Adam's per-parameter `step` is the dummy value of fix 1 (or one tensor
       shared by every parameter, which torch's Adam then increments once per parameter): the bias
       corrections are wrong and training after resume silently diverges from the uninterrupted run.
       Fix: give every parameter its own `step` tensor holding the checkpoint's step.
    """
    from megatron.core.optimizer import distrib_optimizer

    from megatron.core.package_info import __version__

    optimizer_class = distrib_optimizer.DistributedOptimizer
    if distrib_optimizer.HAVE_APEX_OR_TE or getattr(optimizer_class, "_echo_compat", False):
        return  # fused Apex/TE Adam keeps its step in the param groups: not affected
    if __version__.split("+")[0] != FIXED_VERSION:
        _log(f"megatron-core {__version__}: the distributed-optimizer resume fixes for {FIXED_VERSION} are not applied")
        return
    sharded_state_dict = optimizer_class.sharded_state_dict
    set_states = optimizer_class._set_main_param_and_optimizer_states
    load_state_dict = optimizer_class.load_state_dict

    @functools.wraps(sharded_state_dict)
    def sharded_state_dict_fixed(self, *args, **kwargs):
        is_loading = kwargs.get("is_loading", args[1] if len(args) > 1 else False)
        if is_loading and self.init_state_fn is not None:
            self.init_state_fn(self.optimizer, self.config)
            for state in _torch_adam_states(self):
                state.setdefault("step", torch.tensor(0.0))
        return sharded_state_dict(self, *args, **kwargs)

    @functools.wraps(set_states)
    def set_states_fixed(self, *args, **kwargs):
        with torch.no_grad():
            return set_states(self, *args, **kwargs)

    @functools.wraps(load_state_dict)
    def load_state_dict_fixed(self, state_dict, *args, **kwargs):
        result = load_state_dict(self, state_dict, *args, **kwargs)
        steps = {group["step"] for group in state_dict["optimizer"]["param_groups"] if "step" in group}
        if len(steps) == 1:
            step = float(steps.pop())
            for state in _torch_adam_states(self):
                if state:
                    state["step"] = torch.tensor(step)
        return result

    optimizer_class.sharded_state_dict = sharded_state_dict_fixed
    optimizer_class._set_main_param_and_optimizer_states = set_states_fixed
    optimizer_class.load_state_dict = load_state_dict_fixed
    optimizer_class._echo_compat = True
    _log("DistributedOptimizer with torch Adam: fixed resume (empty-state assert, in-place copy into a leaf "
         "view, shared per-parameter Adam step)")


def final_norm_without_te() -> None:
    """`--transformer-impl local` on a GPU without Transformer Engine: Megatron's `HybridStack` builds its final
    norm with `TENorm` whatever the spec. Fixes `ImportError: Transformer Engine is not installed` at model build
    (`echo_megatron.megatron.norm.use_torch_final_norm`; CPU mode does the same)."""
    from megatron.core.extensions.transformer_engine import HAVE_TE

    from echo_megatron.megatron.norm import use_torch_final_norm

    if not HAVE_TE and use_torch_final_norm():
        _log("no Transformer Engine: the hybrid stack's final norm is TorchNorm")


def escape_unformattable_help(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """argparse %-formats every help text, and Megatron's `ArgumentGroupFactory` copies config-field docstrings
    into help unescaped: `--moe-paged-stash-buffer-size-factor-cuda`'s "(e.g. 1.10 = 10%)" makes `--help` fail
    with `ValueError: unsupported format character ')'`. Double the `%` of each help text argparse cannot
    format (texts that format, e.g. with `%(default)s`, are left alone)."""
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help and "%" in action.help:
            try:
                formatter._expand_help(action)
            except (ValueError, TypeError, KeyError):
                action.help = action.help.replace("%", "%%")
    return parser


def apply() -> None:
    """Apply every run-time fix the launcher needs (idempotent)."""
    install_typing_override()
    final_norm_without_te()
    skip_helper_compile()
    distributed_optimizer_torch_adam()
