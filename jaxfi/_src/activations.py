"""Faults in the intermediate values of any JAX function.

``fn`` is traced with ``jax.make_jaxpr``; nested jaxprs of call-like primitives
(jit, closed_call, custom_jvp/vjp calls, remat) are walked through, and every
equation output becomes a candidate site named ``{scope}/{primitive}:{k}``:
``scope`` is the equation's name stack (Linen gives module paths such as
``CNN/conv1``; NNX does after ``named_scopes``; plain jax gives
``jax.named_scope`` names), ``k`` counts equations of that primitive in that
scope in program order, and an equation with several outputs adds ``.{j}``.
Names depend only on the program, so they are stable across processes.
Function inputs and closed-over constants are not activations: fault them
with ``Inputs`` or ``Params`` plans.

By default only floating outputs are candidates; integer temporaries (indices,
iotas, quantized values) become candidates when a selector asks for an integer
dtype explicitly.

Control flow. Values inside the bodies of ``scan`` (and ``fori_loop`` with
static bounds, which lowers to it), ``while_loop`` and ``cond``/``switch``
are sites too, named after the enclosing primitive and body
(``layers/scan:0/jaxpr/attn/dot_general:0``); ``control_flow`` says which.
A value inside a loop has the iteration in its identity: its population is
``(iterations,) + shape`` (nested loops multiply, outer loop slowest), a
fault hits the one iteration its flat index encodes, and the record's index
says which (``loop_iteration``; ``sites_table(by_iteration=True)`` names
iterations ``scan:0[3]``). A permanent plan draws over one iteration's value
and hits it at every iteration. A ``while_loop`` has no static trip count:
its iteration is drawn among the first ``iterations`` that the selector
states (``Activations(..., iterations=N)``; refused without), and a fault on
an iteration the loop never reaches does not land. Values of every ``cond``
branch are listed, sized as if their branch ran; a fault on a branch that
does not run does not land. Neither is ever re-drawn: the record leaves such a
fault out (not valid, site -1), so the trial counts as fault-free. Bodies of
remat/checkpoint and custom_jvp/custom_vjp calls are inlined like other calls.
Values computed in a while loop's condition cannot be faulted, and
``capture``/``transform`` take values outside control-flow bodies only.

``run_with_faults`` re-evaluates the program with ``interpret.evaluate``,
hooks on the selected values corrupting them as they are produced; with
nothing selected it rebinds the same primitives, so it is bitwise equal to
``jit(fn)``. Call and control-flow equations are re-bound whole unless a
selected site lies inside them, which keeps custom derivatives and remat where
nothing is faulted; a loop or cond holding one is evaluated as a new
``lax.scan``/``while_loop``/``switch`` over the interpreted body whose carry
adds the iteration counter and the record fields.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax.extend import source_info_util as siu

from jaxfi._src import bits as bits_lib
from jaxfi._src import interpret
from jaxfi._src.inject import (
    Record,
    SiteFaults,
    apply_rows,
    apply_site,
    assemble_record,
    live_faults,
    plan_keys,
)
from jaxfi._src.plan import Plan, Population
from jaxfi._src.sites import Selector, Site, listing

# jaxfi's own operations run under this scope, so they never shift the
# occurrence numbers of the user's equations when a faulty function is traced.
OWN_SCOPE = "jaxfi"


@dataclasses.dataclass(frozen=True)
class ActivationSite(Site):
    """An intermediate value: a ``Site`` plus where it lives in the program.

    ``scope`` is the name stack of the producing equation; ``output_of`` lists
    the scopes (module paths) this value leaves, i.e. the modules whose output
    it is; ``control_flow`` names the outermost higher-order primitive whose
    body holds the value ("" if none). A value inside loop bodies has
    ``loops`` (the loop equations' names, outermost first) and ``trips``
    (their trip counts; a while loop's is the selector's ``iterations``
    bound); unless the plan is permanent its shape is ``(iterations,) +``
    the value's shape, ``iterations`` being the product of ``trips``.
    ``conditional``: the value is not computed on every run (a cond branch,
    a while body), so a fault on it may not land.
    """

    scope: str = ""
    output_of: tuple[str, ...] = ()
    control_flow: str = ""
    loops: tuple[str, ...] = ()
    trips: tuple[int, ...] = ()
    iterations: int = 0
    conditional: bool = False

    @property
    def value_shape(self) -> tuple[int, ...]:
        """The shape of the value one evaluation (one iteration) produces."""
        return self.shape[1:] if self.iterations else self.shape


def _within(scope: str, prefix: str) -> bool:
    return scope == prefix or scope.startswith(prefix + "/")


def _exits(value: interpret.Value) -> tuple[str, ...]:
    """The scope prefixes of ``value`` that some consumer lies outside of."""
    parts = value.scope.split("/") if value.scope else []
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return tuple(p for p in prefixes if any(not _within(c, p) for c in value.consumers))


def _site_dtype(aval: Any) -> np.dtype | None:
    dtype = getattr(aval, "dtype", None)
    if dtype is None or not hasattr(aval, "shape"):
        return None  # tokens and other non-array values
    if jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
        return None  # PRNG keys and other extended dtypes have no bit format
    dtype = np.dtype(dtype)
    return dtype if dtype in bits_lib.SUPPORTED_DTYPES else None


def program_sites(program: interpret.Program, bound: int | None = None,
                  per_iteration: bool = False) -> tuple[ActivationSite, ...]:
    """The activation sites of a traced program: its values with a bit format.

    Args:
      program: the traced program.
      bound: the iterations drawn from in while loops (their trip count is
        not static); None: while bodies get ``trips`` 0 and cannot be faulted.
      per_iteration: give loop body values their per-iteration shape (for
        permanent plans, which hit every iteration) instead of
        ``(iterations,) + shape``.
    """
    sites = []
    for value in program.values:
        dtype = _site_dtype(value.aval)
        if dtype is None:
            continue
        trips = tuple(loop.trips if loop.trips is not None else (bound or 0) for loop in value.loops)
        iterations = math.prod(trips) if trips and not per_iteration else 0
        shape = ((iterations,) if trips and not per_iteration else ()) + tuple(value.aval.shape)
        sites.append(ActivationSite(
            "activations", value.name, shape, dtype, value.primitive, value.scope, _exits(value),
            value.control_flow, tuple(loop.name for loop in value.loops), trips, iterations,
            value.conditional))
    return tuple(sites)


def loop_iteration(site: Site, index: Any) -> np.ndarray:
    """The loop iteration of flat ``index`` (e.g. a record's) in ``site``; -1 outside loops.

    Nested loops count iterations row-major (outer loop slowest); ``iteration_name``
    spells them out.
    """
    index = np.asarray(index, np.int64)
    if not getattr(site, "iterations", 0):
        return np.full(index.shape, -1, np.int64)
    return index // max(1, math.prod(site.shape[1:]))


def iteration_name(site: ActivationSite, iteration: int) -> str:
    """The site's name at one loop iteration: ``layers/scan:0[3]/jaxpr/...``."""
    if not site.loops:
        return site.name
    counters = np.unravel_index(int(iteration), site.trips)
    name = site.name
    for loop, k in sorted(zip(site.loops, counters), key=lambda lk: -len(lk[0])):
        name = name.replace(loop + "/", f"{loop}[{k}]/", 1)
    return name


def _touches(node: interpret.Node, touched: list[int]) -> bool:
    """Whether a hooked value is created inside ``node`` (its own outputs are
    hooked after it, like any equation's)."""
    lo, hi = node.span
    i = bisect.bisect_left(touched, lo)
    return any(touched[j] not in node.ids for j in range(i, bisect.bisect_left(touched, hi)))


# A hook with state: ``(value, counters, state) -> (value, state)``, where
# ``counters`` are the enclosing loops' iteration counters (outermost first).
# The state (a pytree of fixed shape) is carried through loops and branches.
StatefulHook = Callable[[jax.Array, tuple[jax.Array, ...], Any], tuple[jax.Array, Any]]


class _Evaluation:
    """An evaluation with stateful hooks on value ids, inside loops and branches too.

    A scan, while or cond whose bodies hold a hooked value is evaluated as a
    new ``lax.scan``/``while_loop``/``switch`` over the interpreted body, its
    carry extended by the iteration counter and the hooks' states; others are
    bound whole, as are calls without hooked values.
    """

    def __init__(self, hooks: Mapping[int, Sequence[tuple[int, StatefulHook]]], states: dict[int, Any],
                 counters: tuple[jax.Array, ...] = ()):
        self.hooks, self.states, self.counters = hooks, states, counters
        self.touched = sorted(hooks)

    def rules(self) -> interpret.Rules:
        return interpret.Rules(descend=lambda node: _touches(node, self.touched),
                               after=self.after, control=self.control)

    def after(self, ids: tuple[int | None, ...], outs: list[Any]) -> list[Any]:
        return [self._hooked(i, x) for i, x in zip(ids, outs)]

    def _hooked(self, i: int | None, value: Any) -> Any:
        if i not in self.hooks:
            return value
        with jax.named_scope(OWN_SCOPE):
            for key, hook in self.hooks[i]:
                value, self.states[key] = hook(value, self.counters, self.states[key])
        return value

    def _inside(self, node: interpret.Node) -> dict[int, Any]:
        """The states of the hooks on values inside ``node``."""
        lo, hi = node.span
        keys = {key for i in self.touched if lo <= i < hi for key, _ in self.hooks[i]}
        return {k: self.states[k] for k in sorted(keys)}

    def _body(self, graph: interpret.Graph, args: Sequence[Any], counters: tuple[jax.Array, ...],
              states: dict[int, Any]) -> tuple[list[Any], dict[int, Any]]:
        inner = _Evaluation(self.hooks, {**self.states, **states}, counters)
        outs = interpret.evaluate(graph, args, inner.rules())
        return outs, {k: inner.states[k] for k in states}

    def control(self, node: interpret.Node, args: list[Any]) -> list[Any]:
        rule = {"scan": self._scan, "while": self._while, "cond": self._cond}.get(node.eqn.primitive.name)
        if rule is None:
            raise ValueError(f"values inside a {node.eqn.primitive.name} body cannot be hooked; "
                             "only scan, while (fori_loop) and cond (switch) bodies can")
        return rule(node, args)

    def _scan(self, node: interpret.Node, args: list[Any]) -> list[Any]:
        p = node.eqn.params
        consts, n_carry = args[:p["num_consts"]], p["num_carry"]
        init, xs = args[p["num_consts"]:p["num_consts"] + n_carry], args[p["num_consts"] + n_carry:]
        step = -1 if p["reverse"] else 1

        def body(carry, x):
            # The counter is the position along the scanned axis (xs[t]).
            t, states, inner = carry
            outs, states = self._body(node.inner["jaxpr"], [*consts, *inner, *x], self.counters + (t,), states)
            return (t + step, states, outs[:n_carry]), outs[n_carry:]

        start = jnp.asarray(p["length"] - 1 if p["reverse"] else 0, jnp.int32)
        (_, states, carry), ys = jax.lax.scan(body, (start, self._inside(node), list(init)), list(xs),
                                              length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
        self.states.update(states)
        return [*carry, *ys]

    def _while(self, node: interpret.Node, args: list[Any]) -> list[Any]:
        p = node.eqn.params
        n_cond, n_body = p["cond_nconsts"], p["body_nconsts"]
        cond_consts, body_consts, init = args[:n_cond], args[n_cond:n_cond + n_body], args[n_cond + n_body:]
        test = node.inner["cond_jaxpr"]
        if _holds_hooked(test, self.touched):
            raise ValueError("values computed in a while loop's condition cannot be faulted; "
                             "fault its body's values instead")

        def cond(carry):
            return interpret.evaluate(test, [*cond_consts, *carry[2]])[0]

        def body(carry):
            t, states, inner = carry
            outs, states = self._body(node.inner["body_jaxpr"], [*body_consts, *inner], self.counters + (t,),
                                      states)
            return t + 1, states, outs

        _, states, out = jax.lax.while_loop(cond, body, (jnp.asarray(0, jnp.int32), self._inside(node),
                                                          list(init)))
        self.states.update(states)
        return list(out)

    def _cond(self, node: interpret.Node, args: list[Any]) -> list[Any]:
        index, operands = args[0], args[1:]
        graphs = [node.inner[f"branches{k}"] for k in range(len(node.eqn.params["branches"]))]

        def branch(graph: interpret.Graph) -> Callable[..., Any]:
            def run(states, ops):
                outs, states = self._body(graph, ops, self.counters, states)
                return states, outs
            return run

        states, out = jax.lax.switch(index, [branch(g) for g in graphs], self._inside(node), list(operands))
        self.states.update(states)
        return list(out)


def _holds_hooked(graph: interpret.Graph, touched: Sequence[int]) -> bool:
    ids = {i for node in graph.nodes for i in range(*node.span)}
    return any(i in ids for i in touched)


def evaluate_hooked(program: interpret.Program, arrays: Sequence[Any],
                    hooks: Mapping[int, Sequence[tuple[int, StatefulHook]]],
                    states: dict[int, Any]) -> tuple[Any, dict[int, Any]]:
    """Evaluate ``program`` with stateful hooks on value ids (also inside
    scan, while and cond bodies); the output pytree and the final states.

    ``hooks[id]`` lists ``(state key, hook)`` pairs applied in order when
    value ``id`` is produced, in jaxfi's own name scope; ``states`` holds
    each key's initial state.
    """
    run = _Evaluation(hooks, dict(states))
    out = interpret.run(program, arrays, run.rules())
    return out, run.states


def run_hooked(program: interpret.Program, arrays: Sequence[Any],
               hooks: Mapping[int, Sequence[Callable[[jax.Array], jax.Array]]]) -> Any:
    """Evaluate ``program`` with ``hooks[id]`` applied, in order, to value ``id``
    when it is produced (in jaxfi's own name scope).

    Call equations are bound whole unless a hooked value lies inside them,
    which keeps custom derivatives and remat where nothing is hooked.
    """
    def stateless(hook: Callable[[jax.Array], jax.Array]) -> StatefulHook:
        return lambda value, counters, state: (hook(value), state)

    stateful = {i: [(0, stateless(h)) for h in hs] for i, hs in hooks.items()}
    return evaluate_hooked(program, arrays, stateful, {0: ()})[0]


# ----------------------------------------------------------------------------
# Selection.


def _asks_integers(selector: Selector) -> bool:
    spec = selector.dtype
    if spec is None:
        return False
    dtypes = spec if isinstance(spec, (tuple, list, set, frozenset)) else (spec,)
    return any(jnp.issubdtype(np.dtype(d), jnp.integer) for d in dtypes)


def _candidates(program: interpret.Program, selector: Selector,
                permanent: bool = False) -> tuple[ActivationSite, ...]:
    sites = program_sites(program, getattr(selector, "iterations", None), permanent)
    integers = _asks_integers(selector)
    return tuple(s for s in sites if integers or s.format.is_float)


def refuse_control_flow(chosen: Sequence[ActivationSite], what: str) -> None:
    """Raise a ValueError if any chosen site lies inside a control-flow body."""
    inside = [s for s in chosen if s.control_flow]
    if inside:
        names = ", ".join(repr(s.name) for s in inside[:5])
        more = f" and {len(inside) - 5} more" if len(inside) > 5 else ""
        raise ValueError(
            f"{what} selects {names}{more}, inside the body of a {inside[0].control_flow}; "
            f"{what} takes values outside scan/while/cond bodies only (faults reach inside "
            "them). Select the outputs of that primitive instead, or exclude body values "
            "with where=lambda s: not s.control_flow")


def _refuse_unbounded(sites: Sequence[ActivationSite], selector: Selector) -> None:
    unbounded = [s for s in sites if 0 in s.trips]
    if unbounded:
        raise ValueError(
            f"selection {selector.describe()} includes {unbounded[0].name!r}, inside a while "
            "loop whose trip count is not static: give the selector iterations=N, the number "
            "of iterations a fault's iteration is drawn from (faults drawn past the loop's "
            "actual trip count do not land), or exclude it with where=lambda s: not s.conditional")


def _population(program: interpret.Program, plan: Plan) -> Population:
    if plan.kind != "activations":
        raise ValueError(f"expected a plan over activations sites, got a {plan.kind} plan")
    candidates = _candidates(program, plan.sites, plan.permanent)
    if not plan.permanent:  # a permanent fault hits every iteration: no bound needed
        _refuse_unbounded(plan.sites.select(candidates), plan.sites)
    return plan.population(candidates)


def _merge(state: SiteFaults, part: SiteFaults) -> SiteFaults:
    """The record fields of a site hit several times (iterations): the first landing."""
    first = part.hit & ~state.hit
    return SiteFaults(state.hit | part.hit, *(jnp.where(first, p, s) for p, s in zip(part[1:], state[1:])))


class _Injection:
    """One plan's faults of one trial, applied site by site during evaluation.

    A loop site's fault hits the iteration its flat index encodes (its
    leading axis), or every iteration if the plan is permanent.
    """

    def __init__(self, key: jax.Array, pop: Population, live: jax.Array | None):
        k_sample, self.key = plan_keys(key)
        self.pop = pop
        self.faults = live_faults(k_sample, pop, live)

    def hook(self, site: int) -> StatefulHook:
        spec = self.pop.sites[site]

        def apply(values: jax.Array, counters: tuple[jax.Array, ...], state: SiteFaults):
            if not spec.iterations:
                values, part = apply_site(self.key, values, site, self.faults, self.pop)
                return values, _merge(state, part)
            t, inside = _iteration(counters[-len(spec.trips):], spec.trips)
            per = max(1, spec.size // spec.iterations)
            faults = self.faults._replace(valid=self.faults.valid & inside & (self.faults.index // per == t))
            rows, part = apply_rows(self.key, values[None], t[None], site, faults, self.pop)
            return rows[0], _merge(state, part)
        return apply

    def empty(self) -> SiteFaults:
        dtype = jnp.uint64 if self.pop.record_width == 64 else jnp.uint32
        zeros = jnp.zeros(self.faults.valid.shape, dtype)
        return SiteFaults(jnp.zeros(self.faults.valid.shape, bool), zeros, zeros, zeros)

    @property
    def active(self) -> bool:
        """Whether any fault can land (a count=0 plan leaves the program untouched)."""
        return self.pop.cap > 0

    def record(self, parts: Mapping[int, SiteFaults]) -> Record:
        """The trial's record; a fault on a conditional site that did not land
        (a branch not taken, an iteration not reached) is left out."""
        record = assemble_record(self.faults, self.pop, list(parts.values()))
        conditional = [s for s, site in enumerate(self.pop.sites) if site.conditional]
        if not conditional:
            return record
        landed = functools.reduce(jnp.logical_or, [parts[s].hit for s in conditional if s in parts],
                                  jnp.zeros_like(record.valid))
        maybe = jnp.isin(self.faults.site, jnp.asarray(conditional, jnp.int32))
        valid = record.valid & (~maybe | landed)
        return record._replace(site=jnp.where(valid, record.site, -1),
                               index=jnp.where(valid, record.index, 0), valid=valid)


def _iteration(counters: Sequence[jax.Array], trips: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """The row-major iteration of loop counters, and whether every counter is
    within its trip count (a while loop may run past the bound drawn from)."""
    t, inside = jnp.asarray(0, jnp.int32), jnp.asarray(True)
    for c, n in zip(counters, trips):
        t = t * n + jnp.minimum(c, n - 1)
        inside = inside & (c < n)
    return t, inside


# ----------------------------------------------------------------------------
# Public functions.


def run_with_faults(fn: Callable[..., Any], args: Sequence[Any], plans: Sequence[Plan],
                    keys: Sequence[jax.Array],
                    only: Sequence[frozenset[int] | None] | None = None,
                    live: jax.Array | None = None) -> tuple[Any, list[Record]]:
    """Evaluate ``fn(*args)`` with each activations plan's faults; one key per plan.

    Each plan's key is split into (sampling, applying) keys as for params
    plans (``plan_keys``); faults are drawn up front, so values upstream of
    the first selected site do not depend on the keys. Pure: jit, vmap over
    keys, grad, lax.map. For derivatives a faulted value is a constant (zero
    derivative, as for params faults); untouched values of a selected site
    pass derivatives unchanged.

    Args:
      fn: any JAX function.
      args: its arguments.
      plans: activations plans.
      keys: one key per plan.
      only: per plan, the population site indices to fault (None: all); an
        optimisation for trials known to hit only those sites.
      live: where False, no fault lands (see ``inject.live_faults``).

    Returns:
      ``fn``'s output and one record per plan.
    """
    only = tuple(only) if only is not None else (None,) * len(plans)
    if len(plans) != len(keys):
        raise ValueError(f"run_with_faults needs one key per plan, got {len(keys)} keys "
                         f"for {len(plans)} plans")
    program, arrays = interpret.trace(fn, args)
    ids = program.ids
    hooks: dict[int, list[tuple[int, StatefulHook]]] = collections.defaultdict(list)
    states: dict[int, SiteFaults] = {}
    injections, owners = [], []
    with jax.named_scope(OWN_SCOPE):
        for plan, key, subset in zip(plans, keys, only):
            injection = _Injection(key, _population(program, plan), live)
            for s, site in enumerate(injection.pop.sites if injection.active else ()):
                if subset is None or s in subset:
                    states[len(owners)] = injection.empty()
                    hooks[ids[site.name]].append((len(owners), injection.hook(s)))
                    owners.append((len(injections), s))
            injections.append(injection)
    out, states = evaluate_hooked(program, arrays, hooks, states)
    parts: list[dict[int, SiteFaults]] = [{} for _ in injections]
    for key, (i, s) in enumerate(owners):
        parts[i][s] = states[key]
    with jax.named_scope(OWN_SCOPE):
        return out, [inj.record(p) for inj, p in zip(injections, parts)]


def activation_sites(fn: Callable[..., Any], *args: Any, integers: bool = False,
                     iterations: int | None = None) -> list[ActivationSite]:
    """Every candidate intermediate value of ``fn(*args)``, in program order.

    Args:
      fn: any JAX function.
      *args: its arguments.
      integers: list integer values too (not only floating ones).
      iterations: the bound on while loops' trip counts (see ``Activations``);
        without it, while body values have ``trips`` 0.

    Returns:
      The sites; values inside scan/while/cond bodies have ``control_flow``
      set and, inside loops, an iteration axis in front of their shape.
    """
    sites = program_sites(interpret.trace(fn, args)[0], iterations)
    return [s for s in sites if integers or s.format.is_float]


def selected_sites(fn: Callable[..., Any], plan: Plan, *args) -> tuple[ActivationSite, ...]:
    """The sites an activations ``plan`` selects in ``fn(*args)``; records index these."""
    return _population(interpret.trace(fn, args)[0], plan).sites


def sites_table(sites: Sequence[Site], by_iteration: bool = False) -> pd.DataFrame:
    """One row per site: name, primitive, shape, dtype, values, bits and, for
    activations, scope, output_of (module paths it is the output of),
    control_flow (the enclosing scan/while/cond, if any), iterations (of a
    loop site's leading axis) and conditional (a fault may not land).

    With ``by_iteration``, a loop site gives one row per iteration, named
    ``layers/scan:0[3]/jaxpr/...`` with that iteration's shape and size.
    """
    rows = []
    for s in sites:
        row = {
            "name": s.name,
            "primitive": s.primitive,
            "shape": s.shape,
            "dtype": s.dtype.name,
            "values": s.size,
            "bits": s.bits,
            "scope": getattr(s, "scope", ""),
            "output_of": getattr(s, "output_of", ()),
            "control_flow": getattr(s, "control_flow", ""),
            "iterations": getattr(s, "iterations", 0),
            "conditional": getattr(s, "conditional", False),
        }
        if not (by_iteration and row["iterations"]):
            rows.append(row)
            continue
        one = s.size // row["iterations"]
        rows.extend({**row, "name": iteration_name(s, t), "shape": s.shape[1:], "values": one,
                     "bits": s.bits // row["iterations"], "iterations": 1}
                    for t in range(row["iterations"]))
    columns = ["name", "primitive", "shape", "dtype", "values", "bits", "scope", "output_of",
               "control_flow", "iterations", "conditional"]
    return pd.DataFrame(rows, columns=columns)


def _chosen(program: interpret.Program, chosen: str | Sequence[str] | Selector,
            what: str) -> tuple[ActivationSite, ...]:
    if isinstance(chosen, Selector):
        if chosen.kind != "activations":
            raise ValueError(f"{what} needs an activations selector, got {chosen.describe()}")
        return chosen.select(_candidates(program, chosen))
    sites = program_sites(program)
    names = (chosen,) if isinstance(chosen, str) else tuple(chosen)
    by_name = {s.name: s for s in sites}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown activation site(s) {unknown}; available:\n" + listing(sites))
    return tuple(by_name[n] for n in names)


def transform(fn: Callable[..., Any], sites: str | Sequence[str] | Selector,
              hook_for: Callable[[ActivationSite], Callable[[jax.Array], jax.Array]],
              what: str) -> Callable[..., Any]:
    """``fn`` with ``hook_for(site)`` applied to each chosen site's value when produced.

    Args:
      fn: any JAX function.
      sites: an exact site name, a list of names, or an ``Activations`` selector.
      hook_for: gives the function applied to a site's value (called at trace time).
      what: how errors name the caller (e.g. "capture").

    Returns:
      ``g(*args)`` computing ``fn(*args)`` with the hooks; sites outside
      control-flow bodies only (a ValueError otherwise).
    """

    def g(*args):
        program, arrays = interpret.trace(fn, args)
        chosen = _chosen(program, sites, what)
        refuse_control_flow(chosen, what)
        ids = program.ids
        return run_hooked(program, arrays, {ids[s.name]: [hook_for(s)] for s in chosen})

    return g


def capture(fn: Callable[..., Any], sites: str | Sequence[str] | Selector
            ) -> Callable[..., tuple[Any, dict[str, jax.Array]]]:
    """Make ``g(*args) -> (fn(*args), {site name: value})`` for the chosen sites.

    ``sites`` is an exact site name, a list of names, or an ``Activations``
    selector. ``g`` computes the same program as ``fn`` with extra outputs, so
    its sites keep their names: ``jaxfi.faulty(capture(fn, names), plan)``
    returns the captured values as the faults left them.
    """

    def g(*args):
        values: dict[str, jax.Array] = {}

        def keep(site: ActivationSite) -> Callable[[jax.Array], jax.Array]:
            def store(x: jax.Array) -> jax.Array:
                values[site.name] = x
                return x
            return store

        out = transform(fn, sites, keep, "capture")(*args)
        return out, values

    return g


# ----------------------------------------------------------------------------
# Flax NNX: module paths in name stacks.

_SCOPE_ATTR = "_jaxfi_scope"


def _remaining(path: tuple[str, ...], stack: tuple[str, ...]) -> tuple[str, ...]:
    """The part of ``path`` not already at the end of the current name stack."""
    for k in range(len(path), 0, -1):
        if stack[len(stack) - k:] == path[:k]:
            return path[k:]
    return path


@functools.cache
def _scoped_class(cls: type) -> type:
    """A same-named subclass of ``cls`` whose ``__call__`` runs under the module path.

    Being a subclass keeps isinstance checks and reprs; being the class an nnx
    GraphDef records carries the behaviour through split/merge.
    """

    def __call__(self, *args, **kwargs):
        path = tuple(getattr(self, _SCOPE_ATTR).split("/"))
        current = str(siu.current_name_stack())
        rest = _remaining(path, tuple(current.split("/")) if current else ())
        if not rest:
            return cls.__call__(self, *args, **kwargs)
        with jax.named_scope("/".join(rest)):
            return cls.__call__(self, *args, **kwargs)

    namespace = {"__call__": __call__, "__module__": cls.__module__,
                 "__qualname__": cls.__qualname__, "_jaxfi_scoped": True}
    return type(cls)(cls.__name__, (cls,), namespace)


def _has_call(cls: type) -> bool:
    return any("__call__" in vars(c) for c in cls.__mro__ if c is not object)


def named_scopes(model: Any) -> Any:
    """Give a Flax NNX model's module calls ``jax.named_scope`` module paths.

    NNX leaves the name stack empty, so activation sites would be named by
    primitive only. This tags every submodule in place (returns ``model``):
    its ``__call__`` then runs under its path, e.g. ``CNN/conv1`` or
    ``CNN/layers/0``, whoever calls it. The tag lives in the module's class
    and a static attribute, so it survives ``nnx.split``/``nnx.merge`` and
    works in pure ``apply(state, x)`` functions. Other methods are not scoped.
    """
    from flax import nnx  # Imported here: jaxfi itself does not need flax.

    if not isinstance(model, nnx.Module):
        raise TypeError(f"named_scopes takes a flax.nnx.Module, got {type(model).__name__}")
    root = type(model).__name__
    for path, module in nnx.iter_modules(model):
        cls = type(module)
        if not _has_call(cls):
            continue
        setattr(module, _SCOPE_ATTR, "/".join([root, *map(str, path)]))
        if not getattr(cls, "_jaxfi_scoped", False):
            module.__class__ = _scoped_class(cls)
    return model
