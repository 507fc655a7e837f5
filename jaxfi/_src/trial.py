"""One trial of any function: weight, input and activation faults together.

``faulty(fn, *plans)`` turns ``fn(params, *inputs)`` into
``g(key, params, *inputs) -> (output, records)``, applying every plan in one
trial. The key conventions live here: trial ``i`` of a campaign uses
``trial_key(base_key, i)`` and plan ``j`` of a trial ``plan_key(key, j)``
(then ``inject.plan_keys`` splits it into sampling and applying keys).
``Trials`` bundles a campaign's trial function with its arguments for the
executors.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxfi._src import activations
from jaxfi._src.inject import Live, Record, inject_arrays, inject_params
from jaxfi._src.plan import Plan, split_index
from jaxfi._src.sites import Site, param_sites, path_name


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
                  params_argnum: int | None = 0, only: frozenset[int] | None = None,
                  live: jax.Array | None = None) -> tuple[list[Any], Record]:
    """Inject one trial of an inputs ``plan`` into the function arguments."""
    flat, treedef = jax.tree_util.tree_flatten(
        [a if i != params_argnum else None for i, a in enumerate(args)])
    arrays = [x for x in flat if hasattr(x, "dtype")]
    faulty, record = inject_arrays(key, arrays, input_sites(args, params_argnum), plan, only, live)
    it = iter(faulty)
    rebuilt = jax.tree_util.tree_unflatten(
        treedef, [next(it) if hasattr(x, "dtype") else x for x in flat])
    return [args[i] if i == params_argnum else a for i, a in enumerate(rebuilt)], record


def trial_key(base_key: jax.Array, index: Any) -> jax.Array:
    """Trial ``index``'s key in a campaign with key ``base_key``: the same at
    every point of a rate sweep (``plan.split_index``)."""
    return jax.random.fold_in(base_key, split_index(index)[1])


def plan_key(key: jax.Array, i: int) -> jax.Array:
    """Plan ``i``'s key in a trial with key ``key``: adding a plan never changes
    the faults of the others."""
    return jax.random.fold_in(key, i)


def _check_plans(plans: Sequence[Plan]) -> None:
    if not plans:
        raise ValueError("faulty needs at least one plan")
    for p in plans:
        if not isinstance(p, Plan):
            raise TypeError(f"expected jaxfi.Plan objects, got {p!r}")


def faulty(fn: Callable[..., Any], *plans: Plan, params_argnum: int = 0) -> Callable[..., Any]:
    """Make ``g(key, *args) -> (fn's output, records)`` that injects every plan.

    Params plans corrupt ``args[params_argnum]``, inputs plans the other
    arguments, activations plans the intermediate values of ``fn``. ``g`` is
    pure: jit it, vmap it over keys, differentiate through it.

    Args:
      fn: any JAX function.
      *plans: the plans applied in every call; plan ``i`` draws from
        ``fold_in(key, i)``.
      params_argnum: which argument is the parameter pytree.

    Returns:
      ``g``; its ``records`` are a tuple with one ``Record`` per plan, in order.
    """
    return restricted(fn, plans, None, params_argnum)


def restricted(fn: Callable[..., Any], plans: Sequence[Plan],
               only: Sequence[frozenset[int] | None] | None,
               params_argnum: int = 0) -> Callable[..., Any]:
    """``faulty`` with each plan restricted to the population sites in ``only``.

    An executor optimisation for trials known to hit only those sites: the
    rest of the computation then does not depend on the key, so XLA computes
    it once per batch of trials. ``only=None`` (or a None entry) keeps all.
    The returned ``g(key, *args, live=None)`` drops every fault where ``live``
    is False (see ``inject.live_faults``).
    """
    _check_plans(plans)
    only = tuple(only) if only is not None else (None,) * len(plans)
    if len(only) != len(plans):
        raise ValueError(f"only needs one entry per plan: {len(plans)} plans, {len(only)} entries")

    def g(key: jax.Array, *args, live: jax.Array | None = None):
        args = list(args)
        records: list[Record | None] = [None] * len(plans)
        for i, plan in enumerate(plans):
            k = plan_key(key, i)
            if plan.kind == "params":
                args[params_argnum], records[i] = inject_params(k, args[params_argnum], plan, only[i], live)
            elif plan.kind == "inputs":
                args, records[i] = inject_inputs(k, args, plan, params_argnum, only[i], live)
        active = [(i, p) for i, p in enumerate(plans) if p.kind == "activations"]
        if not active:
            return fn(*args), tuple(records)
        keys = [plan_key(key, i) for i, _ in active]
        out, act_records = activations.run_with_faults(
            fn, args, [p for _, p in active], keys, [only[i] for i, _ in active], live)
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


# ----------------------------------------------------------------------------
# A campaign's trials.

Outputs = tuple[Any, tuple[Record, ...]]
# The trial index whose run is a program's golden run: no fault lands.
GOLDEN_INDEX = -1
# The program id of the unbatched trial (``Trials.single``) and every executor
# verified to give its bits.
REFERENCE = 0


class Computed(NamedTuple):
    """Trials computed by an executor: outputs, records (one per plan) and, per
    trial, the id of the program that computed it (see ``Runner.golden``)."""

    output: Any
    records: tuple[Record, ...]
    program: np.ndarray


def same_bits(a: Any, b: Any) -> bool:
    """Whether two pytrees of arrays are equal bit for bit (NaN payloads included)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.shape(x) == np.shape(y)
        and np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb))


def trial_function(faulty_fn: Callable[..., Any]) -> Callable[..., Any]:
    """``(base_key, index, params, inputs) -> faulty_fn(trial_key(base_key, index), params, inputs)``.

    ``faulty_fn`` comes from ``faulty``; index ``GOLDEN_INDEX`` (any negative
    index) runs the same program with no fault landing.
    """
    def trial(base_key: jax.Array, index: jax.Array, params: Any, inputs: Any):
        index = jnp.asarray(index, jnp.int32)
        return faulty_fn(trial_key(base_key, index), params, inputs, live=Live(index >= 0, index))
    return trial


@dataclasses.dataclass(frozen=True, eq=False)
class Trials:
    """A campaign's trial function and the arguments it runs on.

    ``fn(base_key, index, params, inputs) -> (output, records)``; trial ``i``
    uses ``trial_key(base_key, i)``. ``apply_fn`` and ``plans`` (what ``fn``
    was built from) let executors specialise trials; ``sites`` (per plan, the
    sites its records index) let them read the records; ``compile_seconds``
    (of the golden forward, measured where it was first compiled) and
    ``costs`` let "auto" estimate the loop without building it.
    """

    fn: Callable[..., Any]
    base_key: jax.Array
    params: Any
    inputs: Any
    apply_fn: Callable[..., Any] | None = None
    plans: tuple[Plan, ...] | None = None
    compile_seconds: float | None = None
    sites: tuple[tuple[Site, ...], ...] | None = None

    def on(self, inputs: Any) -> Trials:
        """The same trials on other inputs of the same shapes and dtypes,
        sharing the compiled unbatched trial (``single``)."""
        moved = dataclasses.replace(self, inputs=inputs)
        for shared in ("single", "single_compile_seconds"):
            if shared in self.__dict__:
                moved.__dict__[shared] = self.__dict__[shared]
        return moved

    @functools.cached_property
    def single(self) -> Callable[..., Any]:
        """The compiled unbatched trial on the default device: the reference
        every executor is measured against. Compiled once, ahead of time
        (``single_compile_seconds``), and shared by the golden run, replays
        and the loop executor."""
        began = time.perf_counter()
        compiled = jax.jit(self.fn).lower(self.base_key, np.int32(0), self.params, self.inputs).compile()
        self.__dict__["single_compile_seconds"] = time.perf_counter() - began
        return compiled

    @property
    def single_compile_seconds(self) -> float:
        """Seconds the unbatched trial took to compile (compiling it if it was not yet)."""
        _ = self.single
        return self.__dict__["single_compile_seconds"]

    def replay(self, index: int) -> Outputs:
        """Trial ``index`` alone, on the default device, as numpy arrays."""
        return jax.device_get(self.single(self.base_key, np.int32(index), self.params, self.inputs))

    @functools.cached_property
    def costs(self) -> tuple[float, float] | None:
        """(compile, run) seconds of the golden forward, or None without them.

        Timed on first use only (by "auto"), not for every campaign: the
        fastest of three runs, since the first runs after a compile are slow.
        """
        if self.compile_seconds is None or self.apply_fn is None:
            return None
        forward = jax.jit(self.apply_fn)
        runs = []
        for _ in range(3):
            began = time.perf_counter()
            jax.block_until_ready(forward(self.params, self.inputs))
            runs.append(time.perf_counter() - began)
        return self.compile_seconds, min(runs)

    @functools.cached_property
    def golden(self) -> np.ndarray:
        """The reference program's output with no fault landing."""
        return self.replay(GOLDEN_INDEX)[0]
