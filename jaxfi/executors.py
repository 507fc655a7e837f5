"""Executors: how a campaign's trials are computed (one at a time, mapped, vectorised or grouped).

Executors are chosen for speed, never for what they sample: every executor
draws the same faults (records bitwise equal), and each trial is compared
with the golden run of the program that computed it. The reference family
(loop, map, vmap) gives the unbatched trial's bits; the grouped executor is
the fast path. ``same_bits`` says whether two results are bitwise equal;
``downstream_work`` is the share of a forward pass a trial's faults reach;
``cache_compilation`` keeps compiled programs on disk for later processes.
"""

from jaxfi._src.executors import (
    AutoExecutor,
    GroupedExecutor,
    LoopExecutor,
    MapExecutor,
    NotBitwiseError,
    VmapExecutor,
    cache_compilation,
    executor,
    same_bits,
)
from jaxfi._src.grouped import downstream_work

__all__ = [
    "AutoExecutor",
    "GroupedExecutor",
    "LoopExecutor",
    "MapExecutor",
    "NotBitwiseError",
    "VmapExecutor",
    "cache_compilation",
    "downstream_work",
    "executor",
    "same_bits",
]
