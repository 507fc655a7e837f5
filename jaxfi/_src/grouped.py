"""Prefix sharing: trials grouped by the first layer they hit.

A trial only needs to recompute what depends on its faults. This executor
first draws every trial's faults (cheap), then groups the chunk's trials by
the earliest layer they hit, in program order, for each plan. A group runs a
program restricted (``trial.restricted``) to the sites of that layer and
later ones and split there (``rows``): the golden values it reads are
computed once for all groups, and each trial computes only what its faults reach:
from a weight fault on, the whole batch, the faulted matmul or convolution
itself as its golden result plus the changed weights' terms, and a later
matmul whose input changed in a few features as its golden result plus those
features' terms; from an input or activation fault on, the rows it hit, up
to the first operation that mixes rows. Trials that also hit a site without
a batch axis (a broadcast bias, say) form groups of their own without row
slicing. Trials that drew no fault cost almost nothing. Within a group,
trials run one at a time in a loop inside one compiled call, so a trial's
bits do not depend on the others. Sites inside loop or branch bodies are
left to the other executors.

A group's program rounds differently from the unbatched trial in the last
bits; every trial is therefore compared with the golden run of its own
program (``golden(program)``: the same program with no fault landing), so
"masked" still means bit-identical. Each trial's program is named by its
group (``program_id``), which depends only on its faults. A trial whose
faults leave a NaN or an infinity, or whose values turn non-finite where they
reach an operation that may drop one (a max, a max-pool) or the output, is
computed again by the reference program and named by it (``REFERENCE``):
which value a max keeps when one is NaN is a property of the compiled
program, so only the reference can give its verdict (docs/nonfinite.md). At most
``max_programs`` split points are compiled, chosen where most of the
population lies; a trial whose layer has no program of its own runs from the
nearest split point before it. Programs compile when a group first appears.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxfi._src import interpret
from jaxfi._src.inject import Live, plan_faults
from jaxfi._src.plan import Plan, Population, split_index
from jaxfi._src.rows import RowProgram, row_sites
from jaxfi._src.sites import param_sites
from jaxfi._src.trial import GOLDEN_INDEX, REFERENCE, Computed, Trials, plan_key, sites_of, trial_key

TRIAL_AXIS = "trials"
_NEVER = np.iinfo(np.int32).max
# Per plan, the program rank of the earliest site hit (None: no hit); then
# whether a fault landed on a site without a batch axis (see ``rows``).
Key = tuple[tuple[int | None, ...], bool]


def program_id(label: str) -> int:
    """A stable id for a program's label (the same in every process)."""
    return zlib.crc32(label.encode()) & 0x7FFFFFFF


def param_order(apply_fn: Callable[..., Any], params: Any, inputs: Any) -> dict[str, int]:
    """Rank of every params leaf by the position of the first operation reading it."""
    program, _ = interpret.trace(apply_fn, (params, inputs))
    first = program.first_readers()
    names = [s.name for s in param_sites(params)]
    never = len(program.ops)
    return {name: first.get(i, never) for name, i in zip(names, program.inputs)}


def multiply_adds(eqn: Any) -> int:
    """Multiply-adds of a matmul or convolution equation (0 for anything else)."""
    out = int(np.prod(eqn.outvars[0].aval.shape))
    if eqn.primitive.name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        return out * int(np.prod([eqn.invars[0].aval.shape[d] for d in contract]))
    if eqn.primitive.name == "conv_general_dilated":
        kernel = eqn.invars[1].aval.shape
        out_feature = eqn.params["dimension_numbers"].rhs_spec[0]
        return out * int(np.prod(kernel)) // kernel[out_feature]
    return 0


def suffix_work(program: interpret.Program) -> np.ndarray:
    """Per op index r (and one past the end), the share of the program's
    multiply-adds done after op r: what a trial whose earliest fault is read
    (or written) at op r must recompute downstream of it, its correction
    there aside (docs/design.md, principle 9: the physical cost)."""
    work = np.array([multiply_adds(op.eqn) for op in program.ops] + [0], np.float64)
    after = np.concatenate([np.cumsum(work[::-1])[::-1][1:], [0.0]])
    return after / max(work.sum(), 1.0)


@dataclasses.dataclass(frozen=True)
class _PlanView:
    """A plan's population, the program rank of each of its sites and
    whether a fault there changes one row only (params: every site)."""

    plan: Plan
    pop: Population
    rank: tuple[int, ...]
    by_row: tuple[bool, ...]

    def only(self, earliest: int | None, wide: bool) -> frozenset[int]:
        """Sites a trial whose earliest hit has rank ``earliest`` may touch
        (``wide``: sites without a batch axis included)."""
        if earliest is None:
            return frozenset()
        return frozenset(s for s, r in enumerate(self.rank) if r >= earliest and (wide or self.by_row[s]))


def _layer(site: Any) -> str:
    """The layer a site belongs to: its module path without the variable
    collection (params leaves) or the scope that produced it (activations)."""
    if site.kind == "activations":
        return getattr(site, "scope", "") or site.name
    parts = site.name.split("/")
    return "/".join(parts[1:-1] if len(parts) > 2 else parts[:-1] if len(parts) == 2 else parts)


def _layer_ranks(sites: Sequence[Any], rank: Sequence[int]) -> tuple[int, ...]:
    """Each site ranked by the earliest site of its layer.

    Grouping by layer rather than by site keeps the number of compiled
    programs near the number of layers while sharing the same prefix.
    """
    first: dict[str, int] = {}
    for site, r in zip(sites, rank):
        first[_layer(site)] = min(r, first.get(_layer(site), r))
    return tuple(first[_layer(site)] for site in sites)


def _split_points(views: Sequence[_PlanView], limit: int) -> dict[int, int]:
    """Each rank mapped to the split point it runs from: at most ``limit``
    split points, the earliest rank and those holding most of the populations."""
    weight: dict[int, float] = defaultdict(float)
    for view in views:
        for site, r in zip(view.pop.sites, view.rank):
            weight[r] += site.size * (site.bits if view.plan.granularity == "bit" else 1) / max(1, view.pop.total)
    ranks = sorted(weight)
    keep = set(ranks[:1]) | set(sorted(ranks[1:], key=lambda r: (-weight[r], r))[:limit - 1])
    points, current = {}, ranks[0] if ranks else 0
    for r in ranks:
        current = r if r in keep else current
        points[r] = current
    return points


def _views(apply_fn, plans: Sequence[Plan], params: Any, inputs: Any, limit: int,
           incremental: bool = True) -> list[_PlanView]:
    views = []
    order = None
    rowed = (row_sites(apply_fn, params, inputs, incremental) if any(p.kind != "params" for p in plans)
             else frozenset())
    for plan in plans:
        sites = tuple(sites_of(apply_fn, plan, params, inputs))
        pop = plan.population(sites)
        if plan.kind == "params":
            order = order or param_order(apply_fn, params, inputs)
            rank = [order[s.name] for s in pop.sites]
        else:
            # Activation sites are listed in program order; inputs come first.
            rank = list(range(len(pop.sites))) if plan.kind == "activations" else [0] * len(pop.sites)
        by_row = tuple(plan.kind == "params" or s.name in rowed for s in pop.sites)
        views.append(_PlanView(plan, pop, _layer_ranks(pop.sites, rank), by_row))
    points = _split_points(views, limit)
    return [dataclasses.replace(v, rank=tuple(points[r] for r in v.rank)) for v in views]


def expected_work(views: Sequence[_PlanView], suffix: np.ndarray, sample: int) -> tuple[float, float]:
    """Expected ``work`` per trial (``GroupedRunner.work``) and expected number
    of programs ``sample`` trials need, from the plans' populations alone
    (faults uniform over each population: Poisson counts for rates)."""
    points = sorted({r for v in views for r in v.rank})

    def survival(r: float) -> float:
        """P(no fault lands on a site of rank below ``r``)."""
        p = 1.0
        for v in views:
            before = sum(w for w, rank in zip(v.pop.weights, v.rank) if rank < r) / max(v.pop.total, 1)
            n = v.pop.expected
            p *= (1.0 - before) ** n if v.plan.count is not None else math.exp(-n * before)
        return p

    alive = [survival(r) for r in points] + [survival(math.inf)]
    first = [a - b for a, b in zip(alive, alive[1:])]
    work = sum(p * suffix[min(r, len(suffix) - 1)] for p, r in zip(first, points))
    programs = sum(1.0 - (1.0 - p) ** sample for p in first + alive[-1:])
    return float(work), float(programs)


class GroupedRunner:
    """Computes trials grouped by the earliest site they hit (see module doc)."""

    def __init__(self, trials: Trials, chunk_size: int, devices: Sequence[jax.Device], executor: GroupedExecutor):
        if trials.apply_fn is None or trials.plans is None:
            raise ValueError("the grouped executor needs a campaign's apply_fn and plans")
        self.name = executor.name
        self.width = chunk_size
        self._trials = trials
        self._incremental = executor.incremental
        self._group = -(-executor.group_width // len(devices)) * len(devices)
        self._mesh = Mesh(np.asarray(devices), (TRIAL_AXIS,))
        self._args = jax.device_put((trials.base_key, trials.params, trials.inputs),
                                    NamedSharding(self._mesh, PartitionSpec()))
        self._views = _views(trials.apply_fn, trials.plans, trials.params, trials.inputs, executor.max_programs,
                             executor.incremental)
        self._programs: dict[Key, Any] = {}
        self._paths: dict[Key, RowProgram] = {}
        # Every golden value on these inputs, computed once and shared by the
        # group programs, and each group's share of them.
        self._values: dict[int, Any] | None = None
        self._reads: dict[Key, Any] = {}
        self._suffix: np.ndarray | None = None
        self._keys: dict[int, Key] = {}
        self._goldens: dict[int, Any] = {}
        # Shared with the runners ``on`` makes: whether the reference trial has been compiled.
        self._shared = {"reference": False}
        began = time.perf_counter()
        self._hits = jax.jit(self._hit_fn())
        self.compile_seconds = 0.0
        self.keys(np.arange(1, dtype=np.int32))
        self.compile_seconds = time.perf_counter() - began

    def _hit_fn(self) -> Callable[..., Any]:
        views = self._views

        def hits(base_key, index):
            key = trial_key(base_key, index)
            out, wide = [], jnp.asarray(False)
            for i, view in enumerate(views):
                faults = plan_faults(plan_key(key, i), view.pop, split_index(index)[0])
                rank = jnp.asarray(view.rank, jnp.int32)[faults.site]
                out.append(jnp.min(jnp.where(faults.valid, rank, _NEVER), initial=_NEVER))
                wide |= jnp.any(faults.valid & ~jnp.asarray(view.by_row)[faults.site])
            return out, wide

        return jax.vmap(hits, in_axes=(None, 0))

    def keys(self, indices: np.ndarray) -> list[Key]:
        """Per trial, the program rank of the earliest site hit by each plan
        (None: no hit) and whether a fault hit a site without a batch axis."""
        padded = np.resize(indices, max(self.width, len(indices))).astype(np.int32)
        earliest, wide = jax.device_get(self._hits(self._args[0], padded))
        return [(tuple(None if int(e[t]) == _NEVER else int(e[t]) for e in earliest), bool(wide[t]))
                for t in range(len(indices))]

    def _trial(self, key: Key) -> Callable[..., Any]:
        """The trial function of a group (its program reads golden values)."""
        ranks, wide = key
        only = tuple(v.only(k, wide) for v, k in zip(self._views, ranks))
        program = RowProgram(self._trials.apply_fn, self._trials.params, self._trials.inputs, self._trials.plans,
                             [v.pop for v in self._views], only, incremental=self._incremental)
        self._paths[key] = program
        return lambda base_key, i, params, golden, finite: program.checked(trial_key(base_key, i), params, golden,
                                                                           finite, live=Live(i >= 0, i))

    def _golden_reads(self, key: Key) -> tuple[Any, jax.Array]:
        """The golden values the group's program reads, on this runner's
        inputs, and which of the values it computes are finite there."""
        if key not in self._reads:
            program = self._paths[key]
            if self._values is None:
                self._values = program.golden_values_program(*self._args[1:])
            self._reads[key] = (program.golden(*self._args[1:], values=self._values),
                                program.golden_finite(self._values))
        return self._reads[key]

    def _compiled(self, key: Key) -> Any:
        trial = self._trial(key)

        def local(base_key, indices, count, params, golden, finite):
            # A loop over the first ``count`` slots only: a group's last call
            # (or a group of one) costs its own trials, not the program width.
            def one(j, out):
                result = trial(base_key, indices[j], params, golden, finite)
                return jax.tree.map(lambda o, r: lax.dynamic_update_index_in_dim(o, r, j, 0), out, result)

            shapes = jax.eval_shape(lambda i: trial(base_key, i, params, golden, finite), indices[0])
            empty = jax.tree.map(lambda s: jnp.zeros(indices.shape + s.shape, s.dtype), shapes)
            return lax.fori_loop(0, count[0], one, empty)

        return jax.jit(jax.shard_map(
            local, mesh=self._mesh, out_specs=PartitionSpec(TRIAL_AXIS), check_vma=False,
            in_specs=(PartitionSpec(), PartitionSpec(TRIAL_AXIS), PartitionSpec(TRIAL_AXIS), PartitionSpec(),
                      PartitionSpec(), PartitionSpec())))

    def _program(self, key: Key) -> Key:
        """The group's program, compiled on first use (by this runner or the one it came ``on``)."""
        if key not in self._programs:
            began = time.perf_counter()
            self._programs[key] = self._compiled(key)
            self._call(key, np.asarray([GOLDEN_INDEX], np.int32))
            self.compile_seconds += time.perf_counter() - began
        return key

    def _call(self, key: Key, indices: np.ndarray) -> Any:
        """Trials ``indices`` (at most the group width) through a group program."""
        per_device = self._group // len(self._mesh.devices)
        counts = np.clip(len(indices) - per_device * np.arange(len(self._mesh.devices)), 0, per_device)
        padded = np.resize(indices, self._group).astype(np.int32)
        split = NamedSharding(self._mesh, PartitionSpec(TRIAL_AXIS))
        base, params, _ = self._args
        out = self._programs[key](base, jax.device_put(padded, split),
                                  jax.device_put(counts.astype(np.int32), split), params, *self._golden_reads(key))
        return jax.tree.map(lambda a: np.asarray(a)[:len(indices)], jax.device_get(out))

    def _run_group(self, key: Key, indices: np.ndarray) -> Any:
        self._program(key)
        outs = [self._call(key, indices[i:i + self._group]) for i in range(0, len(indices), self._group)]
        return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)

    def paths(self) -> pd.DataFrame:
        """One row per compiled program: its id, group key (earliest rank hit
        per plan, wide), the rows it slices (0: whole batch) and the
        primitives it evaluates incrementally."""
        ident = {key: p for p, key in self._keys.items()}
        return pd.DataFrame([{"program": ident.get(key, -1), "key": key, "rows": row_program.rows,
                              "corrected": row_program.corrected}
                             for key, row_program in self._paths.items()])

    def golden(self, program: int) -> np.ndarray:
        """The output of program ``program`` with no fault landing (what its trials are compared with)."""
        if program == REFERENCE:
            return self._trials.golden
        if program not in self._goldens:
            output, *_ = self._call(self._program(self._keys[program]), np.asarray([GOLDEN_INDEX], np.int32))
            self._goldens[program] = output[0]
        return self._goldens[program]

    def on(self, inputs: Any) -> GroupedRunner:
        """This runner's group programs on other inputs (see ``executors.Runner.on``):
        programs compiled by either runner from now on serve both; golden
        values are computed for ``inputs``."""
        moved = copy.copy(self)
        moved._trials = self._trials.on(inputs)
        base, params, _ = self._args
        moved._args = (base, params, jax.device_put(inputs, NamedSharding(self._mesh, PartitionSpec())))
        moved._values, moved._reads, moved._goldens = None, {}, {}
        return moved

    def work(self, indices: np.ndarray) -> np.ndarray:
        """Per trial, the share of the forward pass's multiply-adds after its
        program's split point (0 for a trial that drew no fault): the layers a
        fault reaches beyond the first. Row slicing and unchanged features
        cost less than this; recomputing the first faulted layer, more."""
        if self._suffix is None:
            self._suffix = suffix_work(interpret.trace(self._trials.apply_fn,
                                                       (self._trials.params, self._trials.inputs))[0])
        ranks = [min((r for r in key[0] if r is not None), default=None) for key in self.keys(indices)]
        return np.array([0.0 if r is None else self._suffix[min(r, len(self._suffix) - 1)] for r in ranks])

    def _grouped(self, indices: np.ndarray) -> dict[Key, list[int]]:
        groups: dict[Key, list[int]] = defaultdict(list)
        for position, key in enumerate(self.keys(indices)):
            groups[key].append(position)
        return groups

    def __call__(self, start: int, stop: int) -> Computed:
        indices = np.arange(start, stop, dtype=np.int32)
        result, programs = None, np.zeros(len(indices), np.int64)
        nonfinite = np.zeros(len(indices), bool)
        for key, positions in self._grouped(indices).items():
            *out, nonfinite[positions] = self._run_group(key, indices[positions])
            ident = program_id(f"grouped{self._incremental * '+incremental'}:{key}")
            self._keys[ident] = key
            programs[positions] = ident
            if result is None:
                result = jax.tree.map(lambda a: np.empty((len(indices),) + a.shape[1:], a.dtype), out)
            _scatter(result, out, positions)
        for position in np.flatnonzero(nonfinite):
            _scatter(result, self._reference(int(indices[position])), [position])
            programs[position] = REFERENCE
        return Computed(*result, programs)

    def _reference(self, index: int) -> Any:
        """Trial ``index`` by the reference program (``Trials.replay``), as a batch of one.

        Its first call compiles the reference trial unless this process has
        already (the loop, a replay): that time counts as compile time.
        """
        began = time.perf_counter()
        out = jax.tree.map(lambda a: np.asarray(a)[None], self._trials.replay(index))
        if not self._shared["reference"]:
            self._shared["reference"] = True
            self.compile_seconds += time.perf_counter() - began
        return list(out)


def _scatter(result: Any, out: Any, positions: Sequence[int]) -> None:
    """Write the trials of ``out`` into ``result`` (numpy leaves) at ``positions``."""
    for dst, src in zip(jax.tree.leaves(result), jax.tree.leaves(out)):
        dst[positions] = src


@dataclasses.dataclass(frozen=True)
class GroupedExecutor:
    """Prefix sharing: trials grouped by the earliest layer hit, ``group_width`` per call.

    Args:
      group_width: trials per compiled call (a loop inside one call).
      incremental: evaluate a faulted matmul or convolution as its golden
        result plus the changed weights' terms (else recompute the layer).
      max_programs: most split points compiled (see the module doc).
    """

    group_width: int = 64
    incremental: bool = True
    max_programs: int = 8

    def __post_init__(self):
        for name in ("group_width", "max_programs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GroupedExecutor {name} must be a positive int, got {value!r}")

    @property
    def name(self) -> str:
        extra = "" if self.incremental else ", incremental=False"
        return f"grouped(width={self.group_width}, programs={self.max_programs}{extra})"

    def estimate(self, trials: Trials, sample: int) -> tuple[float, float]:
        """Before building anything: the expected work per trial (a share of the
        forward pass, see ``GroupedRunner.work``) and the expected number of
        programs ``sample`` trials compile (``expected_work``)."""
        return _estimate(trials.apply_fn, trials.params, trials.inputs, trials.plans, sample, self.max_programs)

    def build(self, trials: Trials, chunk_size: int, devices: Sequence[jax.Device]) -> GroupedRunner:
        """Prepare the fault sampler; group programs compile when first needed."""
        return GroupedRunner(trials, chunk_size, devices, self)


def _estimate(apply_fn: Callable[..., Any], params: Any, inputs: Any, plans: Sequence[Plan], sample: int,
              max_programs: int) -> tuple[float, float]:
    views = _views(apply_fn, plans, params, inputs, max_programs)
    program, _ = interpret.trace(apply_fn, (params, inputs))
    return expected_work(views, suffix_work(program), sample)


def downstream_work(apply_fn: Callable[..., Any], params: Any, inputs: Any, plans: Sequence[Plan]) -> float:
    """Expected share of ``apply_fn``'s matmul and convolution multiply-adds that
    lie after the first layer a trial of ``plans`` faults (0 for a trial with
    no fault): what a trial must recompute beyond a correction at its first
    faulted layer (docs/design.md, principle 9), so ``1 / downstream_work`` bounds what
    skipping the golden prefix can save against a full forward per trial.
    Row slicing (activation and input faults) saves more than this counts."""
    return _estimate(apply_fn, params, inputs, tuple(plans), 1, 8)[0]
