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
dtype explicitly. Values inside the bodies of scan/while/cond and other
higher-order primitives are listed (``control_flow`` says which) but cannot be
faulted or captured: selecting one is an error. The outputs of those
primitives are ordinary sites.

``run_with_faults`` re-evaluates the program with ``interpret.evaluate``,
hooks on the selected values corrupting them as they are produced; with
nothing selected it rebinds the same primitives, so it is bitwise equal to
``jit(fn)``. Call equations are re-bound whole unless a selected site lies
inside them, which keeps custom derivatives and remat where nothing is faulted.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax.extend import source_info_util as siu

from jaxfi._src import bits as bits_lib
from jaxfi._src import interpret
from jaxfi._src.inject import Record, SiteFaults, apply_site, assemble_record, live_faults, plan_keys
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
    it is; ``control_flow`` names the higher-order primitive whose body holds
    the value ("" if none; such sites cannot be faulted).
    """

    scope: str = ""
    output_of: tuple[str, ...] = ()
    control_flow: str = ""


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


def program_sites(program: interpret.Program) -> tuple[ActivationSite, ...]:
    """The activation sites of a traced program: its values with a bit format."""
    sites = []
    for value in program.values:
        dtype = _site_dtype(value.aval)
        if dtype is not None:
            sites.append(ActivationSite("activations", value.name, tuple(value.aval.shape), dtype,
                                        value.primitive, value.scope, _exits(value), value.control_flow))
    return tuple(sites)


def _touches(span: tuple[int, int], touched: list[int]) -> bool:
    i = bisect.bisect_left(touched, span[0])
    return i < len(touched) and touched[i] < span[1]


def run_hooked(program: interpret.Program, arrays: Sequence[Any],
               hooks: Mapping[int, Sequence[Callable[[jax.Array], jax.Array]]]) -> Any:
    """Evaluate ``program`` with ``hooks[id]`` applied, in order, to value ``id``
    when it is produced (in jaxfi's own name scope).

    Call equations are bound whole unless a hooked value lies inside them,
    which keeps custom derivatives and remat where nothing is hooked.
    """
    touched = sorted(hooks)

    def after(ids: tuple[int | None, ...], outs: list[Any]) -> list[Any]:
        return [_apply_hooks(hooks.get(i, ()), x) for i, x in zip(ids, outs)]

    rules = interpret.Rules(descend=lambda node: _touches(node.span, touched), after=after)
    return interpret.run(program, arrays, rules)


def _apply_hooks(hooks: Sequence[Callable], value: Any) -> Any:
    if not hooks:
        return value
    with jax.named_scope(OWN_SCOPE):
        for hook in hooks:
            value = hook(value)
    return value


# ----------------------------------------------------------------------------
# Selection.


def _asks_integers(selector: Selector) -> bool:
    spec = selector.dtype
    if spec is None:
        return False
    dtypes = spec if isinstance(spec, (tuple, list, set, frozenset)) else (spec,)
    return any(jnp.issubdtype(np.dtype(d), jnp.integer) for d in dtypes)


def _candidates(sites: Sequence[ActivationSite], selector: Selector) -> tuple[ActivationSite, ...]:
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
            "values inside scan/while/cond (and other higher-order primitive) bodies "
            "cannot be faulted or captured. Select the outputs of that primitive instead, "
            "or exclude body values with where=lambda s: not s.control_flow")


def _population(sites: Sequence[ActivationSite], plan: Plan) -> Population:
    if plan.kind != "activations":
        raise ValueError(f"expected a plan over activations sites, got a {plan.kind} plan")
    pop = plan.population(_candidates(sites, plan.sites))
    refuse_control_flow(pop.sites, f"plan {plan.sites.describe()}")
    return pop


class _Injection:
    """One plan's faults of one trial, applied site by site during evaluation."""

    def __init__(self, key: jax.Array, pop: Population, live: jax.Array | None):
        k_sample, self.key = plan_keys(key)
        self.pop = pop
        self.faults = live_faults(k_sample, pop, live)
        self.parts: list[SiteFaults | None] = [None] * len(pop.sites)

    def hook(self, site: int) -> Callable[[jax.Array], jax.Array]:
        def apply(values: jax.Array) -> jax.Array:
            values, self.parts[site] = apply_site(self.key, values, site, self.faults, self.pop)
            return values
        return apply

    @property
    def active(self) -> bool:
        """Whether any fault can land (a count=0 plan leaves the program untouched)."""
        return self.pop.cap > 0

    def record(self) -> Record:
        return assemble_record(self.faults, self.pop, [p for p in self.parts if p is not None])


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
    sites, ids = program_sites(program), program.ids
    hooks: dict[int, list[Callable]] = collections.defaultdict(list)
    injections = []
    with jax.named_scope(OWN_SCOPE):
        for plan, key, subset in zip(plans, keys, only):
            injection = _Injection(key, _population(sites, plan), live)
            for s, site in enumerate(injection.pop.sites if injection.active else ()):
                if subset is None or s in subset:
                    hooks[ids[site.name]].append(injection.hook(s))
            injections.append(injection)
    out = run_hooked(program, arrays, hooks)
    with jax.named_scope(OWN_SCOPE):
        return out, [inj.record() for inj in injections]


def activation_sites(fn: Callable[..., Any], *args, integers: bool = False) -> list[ActivationSite]:
    """Every candidate intermediate value of ``fn(*args)``, in program order.

    Floating outputs only unless ``integers``; values inside control-flow
    bodies are included with ``control_flow`` set (they cannot be faulted).
    """
    sites = program_sites(interpret.trace(fn, args)[0])
    return [s for s in sites if integers or s.format.is_float]


def selected_sites(fn: Callable[..., Any], plan: Plan, *args) -> tuple[ActivationSite, ...]:
    """The sites an activations ``plan`` selects in ``fn(*args)``; records index these."""
    return _population(program_sites(interpret.trace(fn, args)[0]), plan).sites


def sites_table(sites: Sequence[Site]) -> pd.DataFrame:
    """One row per site: name, primitive, shape, dtype, values, bits and, for
    activations, scope, output_of (module paths it is the output of) and
    control_flow (non-empty: cannot be faulted)."""
    rows = [{
        "name": s.name,
        "primitive": s.primitive,
        "shape": s.shape,
        "dtype": s.dtype.name,
        "values": s.size,
        "bits": s.bits,
        "scope": getattr(s, "scope", ""),
        "output_of": getattr(s, "output_of", ()),
        "control_flow": getattr(s, "control_flow", ""),
    } for s in sites]
    columns = ["name", "primitive", "shape", "dtype", "values", "bits", "scope", "output_of",
               "control_flow"]
    return pd.DataFrame(rows, columns=columns)


def _chosen(sites: Sequence[ActivationSite], chosen: str | Sequence[str] | Selector,
            what: str) -> tuple[ActivationSite, ...]:
    if isinstance(chosen, Selector):
        if chosen.kind != "activations":
            raise ValueError(f"{what} needs an activations selector, got {chosen.describe()}")
        return chosen.select(_candidates(sites, chosen))
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
        chosen = _chosen(program_sites(program), sites, what)
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
