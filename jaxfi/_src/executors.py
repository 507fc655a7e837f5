"""Executors: how a chunk of trials is computed, all giving the same bits.

A campaign's trials are one pure function ``trial(base_key, index, params,
inputs) -> (output, records)``. Its definition is the unbatched program
``jax.jit(trial)`` run on one index: that is what ``Campaign.replay`` and the
"loop" executor compute. The batched executors are built to reproduce it bit
for bit (``batching`` says how, and what XLA leaves unguaranteed), and a
campaign checks their first chunk against it:

* "vmap": ``jit(vmap(trial))`` over a chunk, with batch-invariant rules for
  matmuls, convolutions and float reductions (see ``batching``);
* "map": ``jax.lax.map`` over the chunk's trials (``batch_size`` trials at a
  time through the same batch-invariant vmap);
* "loop": a Python loop over the jitted single trial;
* "auto": times the others (and "map" with batches of 8) briefly on the first
  chunk and keeps the fastest of those whose results equal the loop's bit for
  bit.

A chunk's trial axis is sharded over every device given (a 1-D mesh with
``shard_map``; params and inputs replicated), and its program is compiled once
for a fixed width: a short last chunk is padded with the following trial
indices, whose results are dropped, instead of compiling another shape. Params
and inputs are always jit arguments, never constants baked into the program.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import numpy as np
import pandas as pd
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxfi._src.batching import batch_invariant
from jaxfi._src.grouped import GroupedExecutor
from jaxfi._src.trial import Outputs, Trials, same_bits, trial_function

TRIAL_AXIS = "trials"


class NotBitwiseError(RuntimeError):
    """A batched executor gave different bits than the unbatched trial."""


def _invariant(trials: Trials) -> Callable[..., Any]:
    """The trial function with batch-invariant batching rules (see ``batching``)."""
    return batch_invariant(trials.fn, trials.base_key, np.int32(0), trials.params, trials.inputs)


class Runner(Protocol):
    """A compiled way to compute trials [start, stop) with stop - start <= width."""

    name: str
    width: int
    compile_seconds: float

    def __call__(self, start: int, stop: int) -> Outputs: ...


def _first(tree: Any, n: int) -> Any:
    return jax.tree.map(lambda a: np.asarray(a)[:n], tree)


class _ShardedRunner:
    """A chunk program whose trial axis is split over a 1-D mesh of devices."""

    def __init__(self, name: str, trials: Trials, chunk_size: int,
                 devices: Sequence[jax.Device], local: Callable[..., Any]):
        self.name = name
        self.width = -(-chunk_size // len(devices)) * len(devices)
        mesh = Mesh(np.asarray(devices), (TRIAL_AXIS,))
        self._split = NamedSharding(mesh, PartitionSpec(TRIAL_AXIS))
        self._args = jax.device_put((trials.base_key, trials.params, trials.inputs),
                                    NamedSharding(mesh, PartitionSpec()))
        # check_vma=False: the batch-invariant program is re-bound from a jaxpr
        # traced outside the mesh, which carries no varying-axis annotations.
        program = jax.jit(jax.shard_map(
            local, mesh=mesh, out_specs=PartitionSpec(TRIAL_AXIS), check_vma=False,
            in_specs=(PartitionSpec(), PartitionSpec(TRIAL_AXIS), PartitionSpec(), PartitionSpec())))
        base, params, inputs = self._args
        began = time.perf_counter()
        self._compiled = program.lower(base, self._indices(0), params, inputs).compile()
        self.compile_seconds = time.perf_counter() - began

    def _indices(self, start: int) -> jax.Array:
        return jax.device_put(np.arange(start, start + self.width, dtype=np.int32), self._split)

    def __call__(self, start: int, stop: int) -> Outputs:
        base, params, inputs = self._args
        out = self._compiled(base, self._indices(start), params, inputs)
        return _first(jax.device_get(out), stop - start)


class _LoopRunner:
    """The jitted single trial in a Python loop, trials dealt to devices in turn."""

    name = "loop"

    def __init__(self, trials: Trials, chunk_size: int, devices: Sequence[jax.Device]):
        self.width = chunk_size
        self._single = trials.single
        self._placed = [jax.device_put((trials.base_key, trials.params, trials.inputs), d)
                        for d in devices]
        began = time.perf_counter()
        for base, params, inputs in self._placed:
            jax.block_until_ready(self._single(base, np.int32(0), params, inputs))
        self.compile_seconds = time.perf_counter() - began

    def __call__(self, start: int, stop: int) -> Outputs:
        outs = []
        for i in range(start, stop):
            base, params, inputs = self._placed[(i - start) % len(self._placed)]
            outs.append(self._single(base, np.int32(i), params, inputs))
        return jax.tree.map(lambda *xs: np.stack(xs), *jax.device_get(outs))


@dataclasses.dataclass(frozen=True)
class VmapExecutor:
    """``jit(vmap(trial))`` over each chunk, with batch-invariant rules."""

    name = "vmap"

    def build(self, trials: Trials, chunk_size: int, devices: Sequence[jax.Device]) -> Runner:
        """Compile the chunk program for ``chunk_size`` trials over ``devices``."""
        batched = jax.vmap(_invariant(trials), in_axes=(None, 0, None, None))
        return _ShardedRunner(self.name, trials, chunk_size, devices, batched)


@dataclasses.dataclass(frozen=True)
class MapExecutor:
    """``jax.lax.map`` over each chunk's trials, ``batch_size`` at a time."""

    batch_size: int = 1

    def __post_init__(self):
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"MapExecutor batch_size must be a positive int, got {self.batch_size!r}")

    @property
    def name(self) -> str:
        return "map" if self.batch_size == 1 else f"map(batch_size={self.batch_size})"

    def build(self, trials: Trials, chunk_size: int, devices: Sequence[jax.Device]) -> Runner:
        """Compile the chunk program for ``chunk_size`` trials over ``devices``."""
        # One trial at a time is the unbatched program itself; only a batch
        # inside lax.map goes through vmap and needs the invariant rules.
        fn = trials.fn if self.batch_size == 1 else _invariant(trials)
        size = self.batch_size

        def mapped(base_key, indices, params, inputs):
            return lax.map(lambda i: fn(base_key, i, params, inputs), indices, batch_size=size)

        return _ShardedRunner(self.name, trials, chunk_size, devices, mapped)


@dataclasses.dataclass(frozen=True)
class LoopExecutor:
    """A Python loop over the jitted single trial (the reference)."""

    name = "loop"

    def build(self, trials: Trials, chunk_size: int, devices: Sequence[jax.Device]) -> Runner:
        """Compile the single trial on every device."""
        return _LoopRunner(trials, chunk_size, devices)


@dataclasses.dataclass(frozen=True)
class AutoExecutor:
    """Time ``candidates`` on the first chunk and keep the fastest bitwise-correct one.

    The loop is timed on ``probe`` trials and is the reference: a candidate
    whose results differ from it in any bit is never chosen.
    """

    candidates: tuple[Any, ...] = ("grouped", "vmap", "map", MapExecutor(8), "loop")
    probe: int = 8
    name = "auto"

    def __post_init__(self):
        object.__setattr__(self, "candidates", tuple(executor(c) for c in self.candidates))
        if not self.candidates or any(isinstance(c, AutoExecutor) for c in self.candidates):
            raise ValueError("AutoExecutor needs one or more candidates, none of them 'auto'")
        if self.probe < 1:
            raise ValueError(f"AutoExecutor probe must be >= 1, got {self.probe!r}")


Executor = VmapExecutor | MapExecutor | LoopExecutor | GroupedExecutor | AutoExecutor
_NAMED = {"vmap": VmapExecutor, "map": MapExecutor, "loop": LoopExecutor,
          "grouped": GroupedExecutor, "auto": AutoExecutor}


def executor(spec: str | Executor) -> Executor:
    """An executor from its name ("grouped", "vmap", "map", "loop", "auto") or an executor object.

    Any object with a ``name`` and ``build(trials, chunk_size, devices) ->
    Runner`` is an executor.
    """
    if isinstance(spec, str) and spec in _NAMED:
        return _NAMED[spec]()
    if not isinstance(spec, str) and callable(getattr(spec, "build", None)):
        return spec
    raise ValueError(f"executor must be one of {sorted(_NAMED)} or an executor object, got {spec!r}")


def verify(name: str, out: Outputs, trials: Trials, start: int, stop: int) -> None:
    """Check the first and last trial of a chunk against the unbatched trial."""
    for i in sorted({start, stop - 1}):
        if not same_bits(_first(_drop(out, i - start), 1), _expand(trials.replay(i))):
            raise NotBitwiseError(
                f"executor {name!r} gave different bits than the unbatched trial {i} on this "
                "model and backend (XLA compiled the batched program differently); use "
                "executor='loop' or 'map', or 'auto' to pick a consistent one")


def _drop(tree: Any, n: int) -> Any:
    return jax.tree.map(lambda a: np.asarray(a)[n:], tree)


def _expand(tree: Any) -> Any:
    return jax.tree.map(lambda a: np.asarray(a)[None], tree)


def _concat(a: Outputs, b: Outputs) -> Outputs:
    return jax.tree.map(lambda x, y: np.concatenate([x, y]), a, b)


def choose(auto: AutoExecutor, trials: Trials, chunk_size: int,
           devices: Sequence[jax.Device], start: int, stop: int) -> tuple[Runner, Outputs, pd.DataFrame]:
    """Time every candidate on trials [start, stop) and pick the fastest consistent one.

    Returns the chosen runner, the chunk's outputs (computed while timing) and
    a table of executor, trials_per_s, compile_s and bitwise per candidate.
    """
    loop = LoopExecutor().build(trials, chunk_size, devices)
    probe = min(auto.probe, stop - start)
    began = time.perf_counter()
    reference = loop(start, start + probe)
    loop_rate = probe / (time.perf_counter() - began)
    rows, runners, chunk = [], {}, None
    for candidate in auto.candidates:
        if isinstance(candidate, LoopExecutor):
            rows.append(_row("loop", loop_rate, loop.compile_seconds, True))
            runners["loop"] = loop
            continue
        runner = candidate.build(trials, chunk_size, devices)
        began = time.perf_counter()
        out = runner(start, stop)
        rate = runner.width / (time.perf_counter() - began)
        consistent = same_bits(_first(out, probe), reference)
        rows.append(_row(runner.name, rate, runner.compile_seconds, consistent))
        if consistent:
            runners[runner.name] = runner
            chunk = out if chunk is None else chunk
    table = pd.DataFrame(rows)
    usable = table[table["bitwise"]]
    # The loop is the reference, so it is the fallback when nothing else agrees.
    best = runners[usable.loc[usable["trials_per_s"].idxmax(), "executor"]] if len(usable) else loop
    table["chosen"] = table["executor"] == best.name
    if chunk is None:
        chunk = _concat(reference, loop(start + probe, stop)) if stop > start + probe else reference
    return best, chunk, table


def _row(name: str, rate: float, compile_s: float, bitwise: bool) -> dict[str, Any]:
    return {"executor": name, "trials_per_s": rate, "compile_s": compile_s, "bitwise": bitwise}
