"""Executors: how a chunk of trials is computed.

A campaign's trials are one pure function ``trial(base_key, index, params,
inputs) -> (output, records)``. Its reference is the unbatched program
``jax.jit(trial)`` run on one index: what ``Campaign.replay`` and the "loop"
executor compute. Executors are chosen for speed, never for what they sample:
every executor draws the same faults (records are bitwise equal), and every
trial's output is compared with the golden run of the program that computed
it (``Runner.golden``), so "masked" means a bit-identical output whatever the
executor. Which program computed each trial is part of its results
(``Computed.program``).

* "grouped" (the fast path, ``grouped``): trials grouped by the first layer
  they hit, each computing only what its faults change;
* "vmap": ``jit(vmap(trial))`` over a chunk, with batch-invariant rules for
  matmuls, convolutions and float reductions (see ``batching``), checked to
  give the reference's bits;
* "map": ``jax.lax.map`` over the chunk's trials, likewise;
* "loop": a Python loop over the jitted single trial (the reference);
* "auto": decides once, from a probe on the campaign's first trials, between
  its candidates (see ``choose``).

A chunk's trial axis is sharded over every device given (a 1-D mesh with
``shard_map``; params and inputs replicated), and its program is compiled once
for a fixed width: a short last chunk is padded with the following trial
indices, whose results are dropped, instead of compiling another shape. Params
and inputs are always jit arguments, never constants baked into the program.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import numpy as np
import pandas as pd
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxfi._src.batching import batch_invariant
from jaxfi._src.grouped import GroupedExecutor, GroupedRunner
from jaxfi._src.inject import nonfinite_faults
from jaxfi._src.trial import REFERENCE, Computed, Outputs, Trials, same_bits

TRIAL_AXIS = "trials"


class NotBitwiseError(RuntimeError):
    """A batched executor gave different bits than the unbatched trial."""


def _invariant(trials: Trials) -> Callable[..., Any]:
    """The trial function with batch-invariant batching rules (see ``batching``)."""
    return batch_invariant(trials.fn, trials.base_key, np.int32(0), trials.params, trials.inputs)


class Runner(Protocol):
    """A compiled way to compute trials [start, stop) with stop - start <= width.

    ``on`` is optional: a runner that has it can run a campaign in
    microbatches (``Campaign(batch_size=...)``).
    """

    name: str
    width: int
    compile_seconds: float

    def __call__(self, start: int, stop: int) -> Computed: ...

    def golden(self, program: int) -> np.ndarray:
        """The output of program ``program`` when no fault lands."""

    def on(self, inputs: Any) -> Runner:
        """This runner on other inputs, without compiling anything again.

        ``inputs`` has the shapes and dtypes of the runner's inputs (a
        microbatch of a campaign's batch; the campaign pads the last one).
        The returned runner computes trial ``i`` with the same key, params
        and plans (so the same faults and records, but for values read from
        the inputs), reuses every program compiled so far (its
        ``compile_seconds`` starts from this runner's), and places only
        ``inputs`` on the devices (params stay where they are). Its
        ``golden(program)`` is program ``program`` with no fault landing on
        ``inputs``. This runner is left unchanged. Program ids keep their
        meaning: a trial gets the same program on every microbatch.
        """


def _first(tree: Any, n: int) -> Any:
    return jax.tree.map(lambda a: np.asarray(a)[:n], tree)


def _reference(out: Outputs) -> Computed:
    """Outputs of the reference program (or one checked to give its bits)."""
    output, records = out
    return Computed(output, records, np.full(len(output), REFERENCE, np.int64))


class _ShardedRunner:
    """A chunk program whose trial axis is split over a 1-D mesh of devices."""

    def __init__(self, name: str, trials: Trials, chunk_size: int,
                 devices: Sequence[jax.Device], local: Callable[..., Any]):
        self.name = name
        self.width = -(-chunk_size // len(devices)) * len(devices)
        self._trials = trials
        mesh = Mesh(np.asarray(devices), (TRIAL_AXIS,))
        self._split = NamedSharding(mesh, PartitionSpec(TRIAL_AXIS))
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._args = jax.device_put((trials.base_key, trials.params, trials.inputs), self._replicated)
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

    def __call__(self, start: int, stop: int) -> Computed:
        base, params, inputs = self._args
        out = self._compiled(base, self._indices(start), params, inputs)
        return _nonfinite_by_reference(_reference(_first(jax.device_get(out), stop - start)), self._trials, start)

    def golden(self, program: int) -> np.ndarray:
        """The reference program's golden output (this runner gives its bits)."""
        return self._trials.golden

    def on(self, inputs: Any) -> _ShardedRunner:
        """This runner's compiled program on other inputs (see ``Runner.on``)."""
        moved = copy.copy(self)
        moved._trials = self._trials.on(inputs)
        base, params, _ = self._args
        moved._args = (base, params, jax.device_put(inputs, self._replicated))
        return moved


def _nonfinite_trials(computed: Computed, trials: Trials) -> np.ndarray:
    """Per trial, whether a fault left a NaN or an infinity, or the output
    holds one where the golden output holds none."""
    found = np.zeros(len(computed.program), bool)
    for record, sites in zip(computed.records, trials.sites or ()):
        found |= np.asarray(nonfinite_faults(record, sites))
    for out, golden in zip(jax.tree.leaves(computed.output), jax.tree.leaves(trials.golden)):
        if np.issubdtype(out.dtype, np.inexact):
            fresh = ~np.isfinite(out) & np.isfinite(golden)
            found |= fresh.reshape(len(found), -1).any(axis=1)
    return found


def _nonfinite_by_reference(computed: Computed, trials: Trials, start: int) -> Computed:
    """``computed`` with its non-finite trials recomputed by the reference program.

    Where a max or a max-pool meets a NaN, which value it keeps is a property
    of the compiled program (vmap's batched max may drop a NaN the unbatched
    one keeps), so only the reference gives such a trial's verdict
    (docs/nonfinite.md). Finite trials are left as the batched program gave them.
    """
    redo = np.flatnonzero(_nonfinite_trials(computed, trials))
    if not redo.size:
        return computed
    output, records = jax.tree.map(np.array, (computed.output, computed.records))
    for i in redo:
        one_output, one_records = trials.replay(start + int(i))
        for whole, one in zip(jax.tree.leaves((output, records)), jax.tree.leaves((one_output, one_records))):
            whole[i] = one
    return Computed(output, records, computed.program)


class _LoopRunner:
    """The jitted single trial in a Python loop, trials dealt to devices in turn."""

    name = "loop"

    def __init__(self, trials: Trials, chunk_size: int, devices: Sequence[jax.Device]):
        self.width = chunk_size
        self._trials = trials
        self._devices = list(devices)
        self._placed = [jax.device_put((trials.base_key, trials.params, trials.inputs), d)
                        for d in devices]
        # The default device runs the campaign's own compiled trial (its golden
        # run and replays use it too); other devices compile their own copy.
        default = jax.devices()[0]
        single = trials.single if default in self._devices else None
        began = time.perf_counter()
        self._compiled = [single if d == default else
                          jax.jit(trials.fn).lower(base, np.int32(0), params, inputs).compile()
                          for d, (base, params, inputs) in zip(self._devices, self._placed)]
        self.compile_seconds = time.perf_counter() - began + (
            trials.single_compile_seconds if single is not None else 0.0)

    def __call__(self, start: int, stop: int) -> Computed:
        outs = []
        for i in range(start, stop):
            d = (i - start) % len(self._placed)
            base, params, inputs = self._placed[d]
            outs.append(self._compiled[d](base, np.int32(i), params, inputs))
        return _reference(jax.tree.map(lambda *xs: np.stack(xs), *jax.device_get(outs)))

    def golden(self, program: int) -> np.ndarray:
        """The reference program's golden output."""
        return self._trials.golden

    def on(self, inputs: Any) -> _LoopRunner:
        """The compiled single trial on other inputs (see ``Runner.on``)."""
        moved = copy.copy(self)
        moved._trials = self._trials.on(inputs)
        moved._placed = [(base, params, jax.device_put(inputs, d))
                         for (base, params, _), d in zip(self._placed, self._devices)]
        return moved


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
    """Decide once, on the campaign's first trials, which candidate runs it.

    Args:
      candidates: executors to choose from; the loop is always timed (it is
        the reference) and chosen when nothing else is faster.
      probe: trials the loop is timed on.
      sample: trials a candidate is timed on (twice: compiling, then running).
      horizon: trials the decision plans for (e.g. the most a sequential
        study may run); None: the trials left in the run that decides.
    """

    candidates: tuple[Any, ...] = ("grouped", "loop")
    probe: int = 8
    sample: int = 128
    horizon: int | None = None
    name = "auto"

    def __post_init__(self):
        object.__setattr__(self, "candidates", tuple(executor(c) for c in self.candidates))
        if not self.candidates or any(isinstance(c, AutoExecutor) for c in self.candidates):
            raise ValueError("AutoExecutor needs one or more candidates, none of them 'auto'")
        for name in ("probe", "sample", "horizon"):
            value = getattr(self, name)
            if name == "horizon" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AutoExecutor {name} must be a positive int, got {value!r}")


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
    if isinstance(spec, AutoExecutor) or (not isinstance(spec, str) and callable(getattr(spec, "build", None))):
        return spec
    raise ValueError(f"executor must be one of {sorted(_NAMED)} or an executor object, got {spec!r}")


_REFERENCE_FAMILY = {"executor": "reference", "name": "reference (loop, map or vmap)"}


def spec(chosen: Executor) -> dict[str, Any]:
    """A JSON description of the programs an executor computes trials with
    (what a store records): the reference family (loop, map, vmap: all
    checked to give the unbatched trial's bits), or another executor's type
    and settings."""
    if isinstance(chosen, (LoopExecutor, MapExecutor, VmapExecutor)):
        return dict(_REFERENCE_FAMILY)
    fields = dataclasses.asdict(chosen) if dataclasses.is_dataclass(chosen) else {}
    return {"executor": type(chosen).__name__, "name": chosen.name, **fields}


def from_spec(recorded: dict[str, Any]) -> Executor | None:
    """An executor giving the programs a ``spec`` describes, or None for a custom one."""
    if recorded == _REFERENCE_FAMILY:
        return LoopExecutor()
    if recorded.get("executor") != GroupedExecutor.__name__:
        return None
    return GroupedExecutor(**{k: v for k, v in recorded.items() if k not in ("executor", "name")})


def verify(name: str, out: Computed, trials: Trials, start: int, stop: int) -> None:
    """Check that a reference-family runner gave the unbatched trial's bits on
    the first and last trial of a chunk (``Campaign.run`` checks its first
    ``VERIFY_CHUNKS`` chunks)."""
    for i in sorted({start, stop - 1}):
        if not same_bits(_first(_drop(out[:2], i - start), 1), _expand(trials.replay(i))):
            raise NotBitwiseError(
                f"executor {name!r} gave different bits than the unbatched trial {i} on this "
                "model and backend (XLA compiled the batched program differently); use "
                "executor='loop', 'grouped' or 'auto'")


def _drop(tree: Any, n: int) -> Any:
    return jax.tree.map(lambda a: np.asarray(a)[n:], tree)


def _expand(tree: Any) -> Any:
    return jax.tree.map(lambda a: np.asarray(a)[None], tree)


def choose(auto: AutoExecutor, trials: Trials, chunk_size: int, devices: Sequence[jax.Device],
           start: int, remaining: int) -> tuple[Executor, Runner | None, pd.DataFrame]:
    """Pick the candidate that finishes ``remaining`` trials from ``start`` soonest.

    ``remaining`` is replaced by ``auto.horizon`` when that is set. The
    loop's cost is ``trials.costs`` (the golden forward's compile and run
    seconds, which the loop's per-trial program matches closely) when given,
    else it is compiled and timed on ``auto.probe`` trials. A grouped
    candidate first compiles the program of its most common group in a
    sample of ``auto.sample`` trials; it is skipped when the loop would finish
    before the candidate compiled the programs that sample needs (that
    measured compile times their number), or without building it when even its
    best case loses (``_best_case``: the work its trials need, estimated from
    the plans' populations; the table's estimate_s for it). Otherwise it runs
    the sample twice, compiling then running, and the second run gives its
    rate. Reference-family candidates (vmap, map) must also give the loop's
    bits. The choice is the least estimated
    time to finish from here (compiles already paid are not counted); the
    table (executor, trials_per_s, compile_s, estimate_s, usable, chosen)
    says why. The runner returned is None when the loop, not yet built, wins.
    """
    remaining = auto.horizon or remaining
    probe = min(auto.probe, max(1, remaining))
    loop: Runner | None = None
    if trials.costs is not None:
        loop_compile, per_trial = trials.costs
        loop_rate, loop_estimate = 1.0 / per_trial, loop_compile + remaining * per_trial
    else:
        loop = LoopExecutor().build(trials, chunk_size, devices)
        loop_compile, loop_rate = loop.compile_seconds, probe / _timed(loop, start, start + probe)
        loop_estimate = remaining / loop_rate
    rows = [_row("loop", loop_rate, loop_compile, loop_estimate, True)]
    runners: dict[str, tuple[Executor, Runner | None]] = {"loop": (LoopExecutor(), loop)}
    sample = min(auto.sample, max(1, remaining))
    for candidate in auto.candidates:
        if isinstance(candidate, LoopExecutor):
            continue
        best = (_best_case(candidate, trials, sample, remaining, loop_rate, loop_compile)
                if isinstance(candidate, GroupedExecutor) else None)
        if best is not None and best >= loop_estimate:
            rows.append(_row(candidate.name, float("nan"), float("nan"), best, False))
            continue
        runner = candidate.build(trials, chunk_size, devices)
        if _compile_estimate(runner, start, sample, loop_compile) > loop_estimate:
            rows.append(_row(runner.name, float("nan"), float("nan"), float("inf"), False))
            continue
        compile_s = runner.compile_seconds + _timed(runner, start, start + sample)
        rate = sample / _timed(runner, start, start + sample)
        usable = True
        if isinstance(candidate, (VmapExecutor, MapExecutor)):
            loop = loop or LoopExecutor().build(trials, chunk_size, devices)
            runners["loop"] = (LoopExecutor(), loop)
            usable = same_bits(_first(runner(start, start + probe)[:2], probe), loop(start, start + probe)[:2])
        rows.append(_row(runner.name, rate, compile_s, remaining / rate, usable))
        runners[runner.name] = (candidate, runner)
    table = pd.DataFrame(rows)
    usable = table[table["usable"]]
    name = usable.loc[usable["estimate_s"].idxmin(), "executor"]
    best, runner = runners[name]
    table["chosen"] = table["executor"] == name
    return best, runner, table


# About the least any group program took to compile on these machines (1 to
# 1.2 s on the small CNN; 2 to 6 s per program on ResNet-8, two to three
# times its golden forward): the loop's compile, when "auto" reads it off the
# golden forward, leaves out the fault injection, which dominates a trial's
# compile.
_LEAST_PROGRAM_COMPILE_S = 1.0


def _best_case(grouped: GroupedExecutor, trials: Trials, sample: int, remaining: int, loop_rate: float,
               loop_compile: float) -> float | None:
    """The least time the grouped executor could take: its expected work per
    trial (a share of the forward pass) at the loop's rate, plus, per program
    it would compile, the loop's compile and at least
    ``_LEAST_PROGRAM_COMPILE_S``. None for plans other than params plans: row
    slicing makes activation and input faults cheaper than their work says."""
    if any(plan.kind != "params" for plan in trials.plans or ()):
        return None
    work, programs = grouped.estimate(trials, sample)
    return remaining * work / loop_rate + programs * max(loop_compile, _LEAST_PROGRAM_COMPILE_S)


def _compile_estimate(runner: Runner, start: int, sample: int, loop_compile: float) -> float:
    """Seconds ``runner`` would spend compiling for trials [start, start + sample):
    for a grouped runner, its measured compile of the most common group's
    program times the number of groups; else one loop compile."""
    if not isinstance(runner, GroupedRunner):
        return loop_compile
    keys = runner.keys(np.arange(start, start + sample))
    common = collections.Counter(keys).most_common(1)[0][0]
    first = start + keys.index(common)
    before = runner.compile_seconds
    runner(first, first + 1)
    return len(set(keys)) * (runner.compile_seconds - before)


def cache_compilation(directory: str | os.PathLike[str]) -> None:
    """Keep every program this process compiles in ``directory`` (JAX's
    persistent compilation cache) and load it from there instead of compiling
    it again: a resumed campaign, a later run and the other processes of a
    distributed one (on a shared file system) start without recompiling. A
    loaded program is the same executable, so it computes the same bits.

    The directory is trusted code: keep it where only you can write.

    Raises:
      ValueError: ``directory`` exists and is not a directory.
    """
    path = pathlib.Path(directory)
    if path.exists() and not path.is_dir():
        raise ValueError(f"compilation cache {str(path)!r} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Every program: a grouped program or a faulty trial costs seconds to
    # compile and milliseconds to load, below JAX's default threshold of 1 s.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _timed(runner: Runner, start: int, stop: int) -> float:
    began = time.perf_counter()
    for a in range(start, stop, runner.width):
        runner(a, min(stop, a + runner.width))
    return time.perf_counter() - began


def _row(name: str, rate: float, compile_s: float, estimate_s: float, usable: bool) -> dict[str, Any]:
    return {"executor": name, "trials_per_s": rate, "compile_s": compile_s, "estimate_s": estimate_s,
            "usable": usable}
