"""Executors: how a campaign's trials are computed (one at a time, mapped, vectorised or grouped).

Executors are chosen for speed, never for what they sample: every executor
computes the same trials, and ``same_bits`` says whether two results are
bitwise equal.
"""

from jaxfi._src.executors import (
    AutoExecutor,
    GroupedExecutor,
    LoopExecutor,
    MapExecutor,
    NotBitwiseError,
    VmapExecutor,
    executor,
    same_bits,
)

__all__ = [
    "AutoExecutor",
    "GroupedExecutor",
    "LoopExecutor",
    "MapExecutor",
    "NotBitwiseError",
    "VmapExecutor",
    "executor",
    "same_bits",
]
