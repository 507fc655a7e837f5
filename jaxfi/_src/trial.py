"""One trial of any function: weight, input and activation faults together.

``faulty(fn, *plans)`` turns ``fn(params, *inputs)`` into
``g(key, params, *inputs) -> (output, records)``, applying every plan in one
trial. Plan ``i`` draws from ``fold_in(key, i)``, so adding a plan never
changes the faults of the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxfi._src import activations
from jaxfi._src.inject import Record, inject, inject_arrays
from jaxfi._src.plan import Plan
from jaxfi._src.sites import Site, path_name, param_sites


def input_sites(args: Sequence[Any], params_argnum: int | None = 0) -> list[Site]:
    """Every array leaf of the arguments except the params one, named ``arg{i}[/path]``."""
    sites = []
    for i, arg in enumerate(args):
        if i == params_argnum:
            continue
        for path, x in jax.tree_util.tree_flatten_with_path(arg)[0]:
            if hasattr(x, "dtype"):
                name = f"arg{i}" + (f"/{path_name(path)}" if path else "")
                sites.append(Site("inputs", name, tuple(np.shape(x)), np.dtype(x.dtype)))
    return sites


def inject_inputs(key: jax.Array, args: Sequence[Any], plan: Plan,
                  params_argnum: int | None = 0,
                  only: frozenset[int] | None = None) -> tuple[list[Any], Record]:
    """Inject one trial of an inputs ``plan`` into the function arguments."""
    flat, treedef = jax.tree_util.tree_flatten(
        [a if i != params_argnum else None for i, a in enumerate(args)])
    arrays = [x for x in flat if hasattr(x, "dtype")]
    faulty, record = inject_arrays(key, arrays, input_sites(args, params_argnum), plan, only)
    it = iter(faulty)
    rebuilt = jax.tree_util.tree_unflatten(
        treedef, [next(it) if hasattr(x, "dtype") else x for x in flat])
    return [args[i] if i == params_argnum else a for i, a in enumerate(rebuilt)], record


def _check_plans(plans: Sequence[Plan]) -> None:
    if not plans:
        raise ValueError("faulty needs at least one plan")
    for p in plans:
        if not isinstance(p, Plan):
            raise TypeError(f"expected jaxfi.Plan objects, got {p!r}")


def faulty(fn: Callable[..., Any], *plans: Plan, params_argnum: int = 0,
           only: Sequence[frozenset[int] | None] | None = None) -> Callable[..., Any]:
    """Make ``g(key, *args) -> (fn's output, records)`` that injects every plan.

    Params plans corrupt ``args[params_argnum]``, inputs plans the other
    arguments, activations plans the intermediate values of ``fn``. ``records``
    is a tuple with one ``Record`` per plan, in order. ``g`` is pure: jit it,
    vmap it over keys, differentiate through it.

    ``only`` (one entry per plan) restricts each plan to the given population
    site indices. It is an optimisation for trials known to hit only those
    sites: the rest of the computation then does not depend on the key, so
    XLA computes it once per batch of trials.
    """
    _check_plans(plans)
    only = tuple(only) if only is not None else (None,) * len(plans)
    if len(only) != len(plans):
        raise ValueError(f"only needs one entry per plan: {len(plans)} plans, {len(only)} entries")

    def g(key: jax.Array, *args):
        args = list(args)
        records: list[Record | None] = [None] * len(plans)
        for i, plan in enumerate(plans):
            k = jax.random.fold_in(key, i)
            if plan.kind == "params":
                args[params_argnum], records[i] = inject(k, args[params_argnum], plan, only[i])
            elif plan.kind == "inputs":
                args, records[i] = inject_inputs(k, args, plan, params_argnum, only[i])
        active = [(i, p) for i, p in enumerate(plans) if p.kind == "activations"]
        if not active:
            return fn(*args), tuple(records)
        keys = [jax.random.fold_in(key, i) for i, _ in active]
        out, act_records = activations.run_with_faults(
            fn, args, [p for _, p in active], keys, [only[i] for i, _ in active])
        for (i, _), rec in zip(active, act_records):
            records[i] = rec
        return out, tuple(records)

    return g


def sites_of(fn: Callable[..., Any], plan: Plan, *args, params_argnum: int = 0) -> tuple[Site, ...]:
    """The sites ``plan`` selects when ``fn`` is called on ``args`` (records index these)."""
    if plan.kind == "params":
        return plan.population(tuple(param_sites(args[params_argnum]))).sites
    if plan.kind == "inputs":
        return plan.population(tuple(input_sites(args, params_argnum))).sites
    return activations.selected_sites(fn, plan, *args)
