"""Synthetic tasks: multi-query associative recall (MQAR, SPEC §10)."""

from echo_megatron.tasks.mqar import IGNORE_INDEX, MQARData, paper_grid, score, zoology

__all__ = ["IGNORE_INDEX", "MQARData", "paper_grid", "score", "zoology"]
