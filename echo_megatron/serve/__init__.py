"""Serving: `echo-megatron generate` on launcher checkpoints (Megatron-Core's dynamic inference engine).

`generate.py` holds the implementation, `command.py` the command line (light to import).
"""
