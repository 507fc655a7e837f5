"""Prefix sharing: trials grouped by the first layer they hit.

A trial only needs to recompute what depends on its faults. This executor
first draws every trial's faults (cheap), then groups the chunk's trials by
the earliest layer they hit, in program order, for each plan. A group runs a
program restricted (``trial.restricted``) to the sites of that layer and
later ones and split there (``rows``): the golden values it reads are
computed once per group, and each trial computes only what its faults reach:
from a weight fault on, the whole batch; from an input or activation fault
on, the rows it hit, up to the first operation that mixes rows. Trials that
also hit a site without a batch axis (a broadcast bias, say) form groups of
their own without row slicing. Trials that drew no fault cost almost nothing.
Within a group, trials run one at a time through ``lax.map``.

Every group's program is probed bit for bit against the unbatched trial on
the group's first trials; if XLA rounds it differently (its fusion choices
differ around BatchNorm on CPU), the unsplit program is probed, and if that
differs too the group's trials run one by one as the unbatched trial. The
campaign's ``verify`` also checks every run's first chunk. Each layer
compiles one program, so this pays off from about a thousand trials.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxfi._src import interpret
from jaxfi._src.inject import plan_faults
from jaxfi._src.plan import Plan, Population
from jaxfi._src.rows import RowProgram, row_sites
from jaxfi._src.sites import param_sites
from jaxfi._src.trial import Trials, plan_key, restricted, same_bits, sites_of, trial_key

TRIAL_AXIS = "trials"
_NEVER = np.iinfo(np.int32).max
# Distinct trials of a group checked against the unbatched trial before its program is used.
_PROBES = 4
# Per plan, the program rank of the earliest site hit (None: no hit); then
# whether a fault landed on a site without a batch axis (see ``rows``).
Key = tuple[tuple[int | None, ...], bool]


def param_order(apply_fn: Callable[..., Any], params: Any, inputs: Any) -> dict[str, int]:
    """Rank of every params leaf by the position of the first operation reading it."""
    program, _ = interpret.trace(apply_fn, (params, inputs))
    first = program.first_readers()
    names = [s.name for s in param_sites(params)]
    never = len(program.ops)
    return {name: first.get(i, never) for name, i in zip(names, program.inputs)}


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
    return "/".join(parts[1:-1] if len(parts) > 2 else parts[:-1])


def _layer_ranks(sites: Sequence[Any], rank: Sequence[int]) -> tuple[int, ...]:
    """Each site ranked by the earliest site of its layer.

    Grouping by layer rather than by site keeps the number of compiled
    programs near the number of layers while sharing the same prefix.
    """
    first: dict[str, int] = {}
    for site, r in zip(sites, rank):
        first[_layer(site)] = min(r, first.get(_layer(site), r))
    return tuple(first[_layer(site)] for site in sites)


def _views(apply_fn, plans: Sequence[Plan], params: Any, inputs: Any) -> list[_PlanView]:
    views = []
    order = None
    rowed = row_sites(apply_fn, params, inputs) if any(p.kind != "params" for p in plans) else frozenset()
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
    return views


class GroupedRunner:
    """Computes trials grouped by the earliest site they hit (see module doc)."""

    def __init__(self, trials: Trials, chunk_size: int, devices: Sequence[jax.Device], executor: GroupedExecutor):
        if trials.apply_fn is None or trials.plans is None:
            raise ValueError("the grouped executor needs a campaign's apply_fn and plans")
        self.name = executor.name
        group_width, sparse = executor.group_width, executor.sparse
        self.width = chunk_size
        self._trials = trials
        self._group = -(-group_width // len(devices)) * len(devices)
        self._mesh = Mesh(np.asarray(devices), (TRIAL_AXIS,))
        self._args = jax.device_put((trials.base_key, trials.params, trials.inputs),
                                    NamedSharding(self._mesh, PartitionSpec()))
        self._views = _views(trials.apply_fn, trials.plans, trials.params, trials.inputs)
        self._sparse = sparse
        self._probed = executor.bitwise and not sparse
        self._programs: dict[Key, tuple[Any, Any]] = {}
        began = time.perf_counter()
        self._hits = jax.jit(self._hit_fn())
        self.compile_seconds = 0.0
        self._warm(np.arange(self.width, dtype=np.int32))
        self.compile_seconds = time.perf_counter() - began

    def _warm(self, indices: np.ndarray) -> None:
        """Compile the programs of the first chunk's groups, so that timing a
        chunk measures running; rarer groups compile when they first appear."""
        for key, positions in self._grouped(indices).items():
            jax.block_until_ready(self._run_group(key, indices[positions][:_PROBES]))

    def _hit_fn(self) -> Callable[..., Any]:
        views = self._views

        def hits(base_key, index):
            key = trial_key(base_key, index)
            out, wide = [], jnp.asarray(False)
            for i, view in enumerate(views):
                faults = plan_faults(plan_key(key, i), view.pop)
                rank = jnp.asarray(view.rank, jnp.int32)[faults.site]
                out.append(jnp.min(jnp.where(faults.valid, rank, _NEVER), initial=_NEVER))
                wide |= jnp.any(faults.valid & ~jnp.asarray(view.by_row)[faults.site])
            return out, wide

        return jax.vmap(hits, in_axes=(None, 0))

    def keys(self, indices: np.ndarray) -> list[Key]:
        """Per trial, the program rank of the earliest site hit by each plan
        (None: no hit) and whether a fault hit a site without a batch axis."""
        padded = np.resize(indices, self.width).astype(np.int32)
        earliest, wide = jax.device_get(self._hits(self._args[0], padded))
        return [(tuple(None if int(e[t]) == _NEVER else int(e[t]) for e in earliest), bool(wide[t]))
                for t in range(len(indices))]

    def _trial(self, key: Key, split: bool) -> tuple[Callable[..., Any], Any]:
        """The trial function of a group and the extra argument it reads."""
        ranks, wide = key
        only = tuple(v.only(k, wide) for v, k in zip(self._views, ranks))
        plans, apply_fn = self._trials.plans, self._trials.apply_fn
        params_only = all(v.plan.kind == "params" for v in self._views)
        if not split and params_only:
            fn = restricted(apply_fn, plans, only)
            return (lambda base_key, i, params, inputs, _: fn(trial_key(base_key, i), params, inputs)), ()
        if not split:
            # Restricting activation or input sites changes where XLA fuses,
            # so these groups fall back to the campaign's own trial.
            return (lambda base_key, i, params, inputs, _: self._trials.fn(base_key, i, params, inputs)), ()
        program = RowProgram(apply_fn, self._trials.params, self._trials.inputs, plans,
                             [v.pop for v in self._views], only, sparse=self._sparse)
        golden = program.golden(*self._args[1:])
        return (lambda base_key, i, params, inputs, golden: program.trial(
            trial_key(base_key, i), params, golden)), golden

    def _compiled(self, key: Key, split: bool) -> tuple[Any, Any]:
        trial, extra = self._trial(key, split)

        def local(base_key, indices, count, params, inputs, extra):
            # A loop over the first ``count`` slots only: a group's last call
            # (or a group of one) costs its own trials, not the program width.
            def one(j, out):
                result = trial(base_key, indices[j], params, inputs, extra)
                return jax.tree.map(lambda o, r: lax.dynamic_update_index_in_dim(o, r, j, 0), out, result)

            shapes = jax.eval_shape(lambda i: trial(base_key, i, params, inputs, extra), indices[0])
            empty = jax.tree.map(lambda s: jnp.zeros(indices.shape + s.shape, s.dtype), shapes)
            return lax.fori_loop(0, count[0], one, empty)

        program = jax.jit(jax.shard_map(
            local, mesh=self._mesh, out_specs=PartitionSpec(TRIAL_AXIS), check_vma=False,
            in_specs=(PartitionSpec(), PartitionSpec(TRIAL_AXIS), PartitionSpec(TRIAL_AXIS), PartitionSpec(),
                      PartitionSpec(), PartitionSpec())))
        return program, extra

    def _program(self, key: Key, indices: np.ndarray) -> tuple[Any, Any] | None:
        """The group's program (compiled on first use; probed unless told not to)."""
        if key not in self._programs:
            began = time.perf_counter()
            self._programs[key] = (self._probed_program(key, indices[:_PROBES]) if self._probed
                                   else self._compiled(key, split=True))
            self.compile_seconds += time.perf_counter() - began
        return self._programs[key]

    def _probed_program(self, key: Key, probe: np.ndarray) -> tuple[Any, Any] | None:
        """The split program if trials ``probe`` match the unbatched trial bit
        for bit (XLA may round a separately compiled part differently, e.g.
        around BatchNorm, or compute one row differently from a batch), else
        the unsplit one if they match, else None: the group's trials then run
        one by one as the unbatched trial."""
        expected = jax.tree.map(lambda *xs: np.stack(xs), *[self._trials.replay(int(i)) for i in probe])
        for split in (True, False):
            compiled = self._compiled(key, split)
            if same_bits(self._call(compiled, probe), expected):
                return compiled
        return None

    def _call(self, compiled: tuple[Any, Any], indices: np.ndarray) -> Any:
        """Trials ``indices`` (at most the group width) through a group program."""
        program, extra = compiled
        per_device = self._group // len(self._mesh.devices)
        counts = np.clip(len(indices) - per_device * np.arange(len(self._mesh.devices)), 0, per_device)
        padded = np.resize(indices, self._group).astype(np.int32)
        split = NamedSharding(self._mesh, PartitionSpec(TRIAL_AXIS))
        base, params, inputs = self._args
        out = program(base, jax.device_put(padded, split), jax.device_put(counts.astype(np.int32), split),
                      params, inputs, extra)
        return jax.tree.map(lambda a: np.asarray(a)[:len(indices)], jax.device_get(out))

    def _run_group(self, key: Key, indices: np.ndarray) -> Any:
        compiled = self._program(key, indices)
        if compiled is None:
            outs = [jax.tree.map(lambda a: a[None], self._trials.replay(int(i))) for i in indices]
        else:
            outs = [self._call(compiled, indices[i:i + self._group]) for i in range(0, len(indices), self._group)]
        return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)

    def _grouped(self, indices: np.ndarray) -> dict[Key, list[int]]:
        groups: dict[Key, list[int]] = defaultdict(list)
        for position, key in enumerate(self.keys(indices)):
            groups[key].append(position)
        return groups

    def __call__(self, start: int, stop: int) -> Any:
        indices = np.arange(start, stop, dtype=np.int32)
        result = None
        for key, positions in self._grouped(indices).items():
            out = self._run_group(key, indices[positions])
            if result is None:
                result = jax.tree.map(lambda a: np.empty((len(indices),) + a.shape[1:], a.dtype), out)
            for dst, src in zip(jax.tree.leaves(result), jax.tree.leaves(out)):
                dst[positions] = src
        return result


@dataclasses.dataclass(frozen=True)
class GroupedExecutor:
    """Prefix sharing: trials grouped by earliest hit site, ``group_width`` per call.

    ``bitwise=False`` uses every split program without probing it, where
    XLA may round it differently from the unbatched trial (on CPU: models
    with BatchNorm and pooling); ``sparse=True`` evaluates a faulted dense
    layer as the golden product plus the changed weights' terms (params plans
    only), which is never bitwise equal to recomputation. Either needs a
    campaign run with ``verify=False``; ``benchmarks/throughput.py`` measures
    how often their outcomes differ from exact recomputation.
    """

    group_width: int = 16
    sparse: bool = False
    bitwise: bool = True

    def __post_init__(self):
        if not isinstance(self.group_width, int) or self.group_width < 1:
            raise ValueError(f"GroupedExecutor group_width must be a positive int, got {self.group_width!r}")

    @property
    def name(self) -> str:
        extra = (", sparse" if self.sparse else "") + ("" if self.bitwise else ", bitwise=False")
        return f"grouped(width={self.group_width}{extra})"

    def build(self, trials: Trials, chunk_size: int, devices: Sequence[jax.Device]) -> GroupedRunner:
        """Prepare the fault sampler and compile the first chunk's group programs."""
        return GroupedRunner(trials, chunk_size, devices, self)
