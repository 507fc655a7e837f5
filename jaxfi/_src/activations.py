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

``run_with_faults`` re-evaluates the program equation by equation with
``primitive.bind`` and corrupts the selected outputs as they are produced;
with nothing selected it rebinds the same primitives, so it is bitwise equal
to ``jit(fn)``. Call equations are re-bound whole unless a selected site lies
inside them, which keeps custom derivatives and remat where nothing is faulted.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax.extend import core as jex
from jax.extend import source_info_util as siu

from jaxfi._src import bits as bits_lib
from jaxfi._src.calls import INLINE
from jaxfi._src.inject import Record, SiteFaults, apply_site, assemble_record, sample_faults
from jaxfi._src.plan import Plan, Population
from jaxfi._src.sites import Activations, Selector, Site, _listing

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


# ----------------------------------------------------------------------------
# The program: a jaxpr annotated with value ids, built once per trace.


@dataclasses.dataclass
class _Value:
    name: str
    scope: str
    primitive: str
    aval: Any
    control_flow: str
    consumers: set[str] = dataclasses.field(default_factory=set)


@dataclasses.dataclass
class _Graph:
    jaxpr: jex.Jaxpr
    consts: Sequence[Any]
    nodes: list[_Node]


@dataclasses.dataclass
class _Node:
    """One equation: value ids of its outputs, the walked body of a call, and
    the range [lo, hi) of value ids created by it (body included)."""

    eqn: jex.JaxprEqn
    ids: tuple[int | None, ...]
    body: _Graph | None
    span: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class _Where:
    """Where the builder is: absolute name stack (the scope), name stack
    relative to the naming root, name prefix, enclosing control flow."""

    stack: siu.NameStack
    relative: siu.NameStack
    prefix: str = ""
    control_flow: str = ""


def _inlined(eqn: jex.JaxprEqn) -> tuple[jex.Jaxpr, Sequence[Any]] | None:
    param = INLINE.get(eqn.primitive)
    if param is None:
        return None
    body = eqn.params[param]
    if isinstance(body, jex.ClosedJaxpr):
        return body.jaxpr, body.consts
    return body, ()


def _bodies(eqn: jex.JaxprEqn) -> list[tuple[str, jex.Jaxpr, Sequence[Any]]]:
    """The jaxprs held in an equation's params, labelled by param name."""
    found = []
    for key in sorted(eqn.params):
        value = eqn.params[key]
        group = value if isinstance(value, (tuple, list)) else (value,)
        for i, item in enumerate(group):
            label = f"{key}{i}" if isinstance(value, (tuple, list)) else key
            if isinstance(item, jex.ClosedJaxpr):
                found.append((label, item.jaxpr, item.consts))
            elif isinstance(item, jex.Jaxpr):
                found.append((label, item, ()))
    return found


class _Builder:
    """Walks a jaxpr once, numbering every equation output in program order."""

    def __init__(self):
        self.values: list[_Value] = []
        self.counts: collections.Counter = collections.Counter()

    def graph(self, jaxpr: jex.Jaxpr, consts: Sequence[Any], in_ids: Sequence[int | None],
              where: _Where, exit_scope: str | None) -> tuple[_Graph, list[int | None]]:
        """Walk ``jaxpr``; ``exit_scope`` (if given) is the scope that consumes its outputs."""
        env = {v: i for v, i in zip(jaxpr.invars, in_ids)}
        nodes = [self.node(eqn, env, where) for eqn in jaxpr.eqns]
        out_ids = [_lookup(env, v) for v in jaxpr.outvars]
        if exit_scope is not None:
            self.consume(out_ids, exit_scope)
        return _Graph(jaxpr, consts, nodes), out_ids

    def consume(self, ids: Sequence[int | None], scope: str) -> None:
        for i in ids:
            if i is not None:
                self.values[i].consumers.add(scope)

    def node(self, eqn: jex.JaxprEqn, env: dict, where: _Where) -> _Node:
        lo = len(self.values)
        inner = dataclasses.replace(where, stack=where.stack + eqn.source_info.name_stack,
                                    relative=where.relative + eqn.source_info.name_stack)
        in_ids = [_lookup(env, v) for v in eqn.invars]
        call = _inlined(eqn)
        if call is not None:
            body, out_ids = self.graph(*call, in_ids, inner, None)
            env.update((v, i) for v, i in zip(eqn.outvars, out_ids) if not _dropped(v))
            return _Node(eqn, (None,) * len(eqn.outvars), body, (lo, len(self.values)))
        scope = str(inner.stack)
        self.consume(in_ids, scope)
        name = self.name(inner, eqn.primitive.name)
        for label, jaxpr, consts in _bodies(eqn):
            nested = _Where(inner.stack, siu.new_name_stack(), f"{name}/{label}",
                            where.control_flow or eqn.primitive.name)
            self.graph(jaxpr, consts, [None] * len(jaxpr.invars), nested, scope)
        ids = []
        for j, v in enumerate(eqn.outvars):
            if _dropped(v):
                ids.append(None)
                continue
            label = name if len(eqn.outvars) == 1 else f"{name}.{j}"
            self.values.append(_Value(label, scope, eqn.primitive.name, v.aval, where.control_flow))
            ids.append(len(self.values) - 1)
            env[v] = ids[-1]
        return _Node(eqn, tuple(ids), None, (lo, len(self.values)))

    def name(self, where: _Where, primitive: str) -> str:
        # Counting per joined scope string keeps names unique even when a
        # user scope happens to spell a control-flow prefix.
        scope = "/".join(p for p in (where.prefix, str(where.relative)) if p)
        k = self.counts[scope, primitive]
        self.counts[scope, primitive] += 1
        return f"{scope}/{primitive}:{k}" if scope else f"{primitive}:{k}"


def _dropped(v: Any) -> bool:
    return isinstance(v, jex.DropVar)


def _lookup(env: dict, v: Any) -> int | None:
    return None if isinstance(v, jex.Literal) else env.get(v)


def _within(scope: str, prefix: str) -> bool:
    return scope == prefix or scope.startswith(prefix + "/")


def _exits(value: _Value) -> tuple[str, ...]:
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


@dataclasses.dataclass
class _Program:
    graph: _Graph
    out_tree: Any
    sites: tuple[ActivationSite, ...]
    ids: dict[str, int]

    def run(self, arrays: Sequence[Any], hooks: dict[int, list[Callable]]) -> Any:
        """Evaluate with ``hooks[id]`` applied, in order, to value ``id`` when produced."""
        touched = sorted(hooks)
        outs = _evaluate(self.graph, arrays, hooks, touched)
        return jax.tree_util.tree_unflatten(self.out_tree, outs)


def _build(closed: jex.ClosedJaxpr, out_tree: Any) -> _Program:
    builder = _Builder()
    root = siu.new_name_stack()
    graph, _ = builder.graph(closed.jaxpr, closed.consts, [None] * len(closed.jaxpr.invars),
                             _Where(root, root), "")
    sites, ids = [], {}
    for i, value in enumerate(builder.values):
        dtype = _site_dtype(value.aval)
        if dtype is None:
            continue
        sites.append(ActivationSite("activations", value.name, tuple(value.aval.shape), dtype,
                                    value.primitive, value.scope, _exits(value), value.control_flow))
        ids[value.name] = i
    return _Program(graph, out_tree, tuple(sites), ids)


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _trace(fn: Callable[..., Any], args: Sequence[Any]) -> tuple[_Program, list[Any]]:
    """Trace ``fn(*args)``; array leaves are the program inputs, other leaves static."""
    leaves, treedef = jax.tree_util.tree_flatten(list(args))
    where = [i for i, x in enumerate(leaves) if _is_array(x)]

    def flat_fn(*arrays):
        full = list(leaves)
        for i, a in zip(where, arrays):
            full[i] = a
        return fn(*jax.tree_util.tree_unflatten(treedef, full))

    arrays = [leaves[i] for i in where]
    closed, shapes = jax.make_jaxpr(flat_fn, return_shape=True)(*arrays)
    return _build(closed, jax.tree_util.tree_structure(shapes)), arrays


# ----------------------------------------------------------------------------
# Evaluation.


def _touches(span: tuple[int, int], touched: list[int]) -> bool:
    i = bisect.bisect_left(touched, span[0])
    return i < len(touched) and touched[i] < span[1]


def _read(env: dict, v: Any) -> Any:
    return v.val if isinstance(v, jex.Literal) else env[v]


def _evaluate(graph: _Graph, args: Sequence[Any], hooks: dict[int, list[Callable]],
              touched: list[int]) -> list[Any]:
    env = dict(zip(graph.jaxpr.constvars, graph.consts))
    env.update(zip(graph.jaxpr.invars, args))
    for node in graph.nodes:
        eqn = node.eqn
        invals = [_read(env, v) for v in eqn.invars]
        stack = siu.current_name_stack() + eqn.source_info.name_stack
        with siu.user_context(eqn.source_info.traceback, name_stack=stack), eqn.ctx.manager:
            if node.body is not None and _touches(node.span, touched):
                outs = _evaluate(node.body, invals, hooks, touched)
            else:
                outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
                outs = outs if eqn.primitive.multiple_results else [outs]
            outs = [_apply_hooks(hooks.get(i, ()), x) for i, x in zip(node.ids, outs)]
        env.update((v, x) for v, x in zip(eqn.outvars, outs) if not _dropped(v))
    return [_read(env, v) for v in graph.jaxpr.outvars]


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


def _refuse_control_flow(chosen: Sequence[ActivationSite], what: str) -> None:
    inside = [s for s in chosen if s.control_flow]
    if inside:
        names = ", ".join(repr(s.name) for s in inside[:5])
        more = f" and {len(inside) - 5} more" if len(inside) > 5 else ""
        raise ValueError(
            f"{what} selects {names}{more}, inside the body of a {inside[0].control_flow}; "
            "values inside scan/while/cond (and other higher-order primitive) bodies "
            "cannot be faulted or captured. Select the outputs of that primitive instead, "
            "or exclude body values with where=lambda s: not s.control_flow")


def _population(program: _Program, plan: Plan) -> Population:
    if plan.kind != "activations":
        raise ValueError(f"expected a plan over activations sites, got a {plan.kind} plan")
    pop = plan.population(_candidates(program.sites, plan.sites))
    _refuse_control_flow(pop.sites, f"plan {plan.sites.describe()}")
    return pop


class _Injection:
    """One plan's faults of one trial, applied site by site during evaluation."""

    def __init__(self, key: jax.Array, pop: Population):
        k_sample, self.key = jax.random.split(key)
        self.pop = pop
        self.faults = sample_faults(k_sample, pop)
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
        if not self.active:
            return assemble_record(self.faults, self.pop, [])
        return assemble_record(self.faults, self.pop, [p for p in self.parts if p is not None])


# ----------------------------------------------------------------------------
# Public functions.


def run_with_faults(fn: Callable[..., Any], args: Sequence[Any], plans: Sequence[Plan],
                    keys: Sequence[jax.Array],
                    only: Sequence[frozenset[int] | None] | None = None) -> tuple[Any, list[Record]]:
    """Evaluate ``fn(*args)`` with each activations plan's faults; one key per plan.

    Each plan's key is split into (sampling, applying) keys as for params
    plans; faults are drawn up front, so values upstream of the first selected
    site do not depend on the keys. Returns ``fn``'s output and one record per
    plan. Pure: jit, vmap over keys, grad, lax.map. For derivatives a faulted
    value is a constant (zero derivative, as for params faults); untouched
    values of a selected site pass derivatives unchanged. ``only`` restricts
    each plan to some of its sites (see ``jaxfi.faulty``).
    """
    only = tuple(only) if only is not None else (None,) * len(plans)
    if len(plans) != len(keys):
        raise ValueError(f"run_with_faults needs one key per plan, got {len(keys)} keys "
                         f"for {len(plans)} plans")
    program, arrays = _trace(fn, args)
    hooks: dict[int, list[Callable]] = collections.defaultdict(list)
    injections = []
    with jax.named_scope(OWN_SCOPE):
        for plan, key, subset in zip(plans, keys, only):
            injection = _Injection(key, _population(program, plan))
            for s, site in enumerate(injection.pop.sites if injection.active else ()):
                if subset is None or s in subset:
                    hooks[program.ids[site.name]].append(injection.hook(s))
            injections.append(injection)
    out = program.run(arrays, hooks)
    with jax.named_scope(OWN_SCOPE):
        return out, [inj.record() for inj in injections]


def activation_sites(fn: Callable[..., Any], *args, integers: bool = False) -> list[ActivationSite]:
    """Every candidate intermediate value of ``fn(*args)``, in program order.

    Floating outputs only unless ``integers``; values inside control-flow
    bodies are included with ``control_flow`` set (they cannot be faulted).
    """
    sites = _trace(fn, args)[0].sites
    return [s for s in sites if integers or s.format.is_float]


def selected_sites(fn: Callable[..., Any], plan: Plan, *args) -> tuple[ActivationSite, ...]:
    """The sites an activations ``plan`` selects in ``fn(*args)``; records index these."""
    return _population(_trace(fn, args)[0], plan).sites


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


def _chosen(program: _Program, sites: str | Sequence[str] | Selector) -> tuple[ActivationSite, ...]:
    if isinstance(sites, Selector):
        if sites.kind != "activations":
            raise ValueError(f"capture needs an activations selector, got {sites.describe()}")
        return sites.select(_candidates(program.sites, sites))
    names = (sites,) if isinstance(sites, str) else tuple(sites)
    by_name = {s.name: s for s in program.sites}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown activation site(s) {unknown}; available:\n"
                         + _listing(program.sites))
    return tuple(by_name[n] for n in names)


def capture(fn: Callable[..., Any], sites: str | Sequence[str] | Selector
            ) -> Callable[..., tuple[Any, dict[str, jax.Array]]]:
    """Make ``g(*args) -> (fn(*args), {site name: value})`` for the chosen sites.

    ``sites`` is an exact site name, a list of names, or an ``Activations``
    selector. ``g`` computes the same program as ``fn`` with extra outputs, so
    its sites keep their names: ``jaxfi.faulty(capture(fn, names), plan)``
    returns the captured values as the faults left them.
    """

    def g(*args):
        program, arrays = _trace(fn, args)
        chosen = _chosen(program, sites)
        _refuse_control_flow(chosen, "capture")
        values: dict[str, jax.Array] = {}

        def keep(name: str) -> Callable[[jax.Array], jax.Array]:
            def store(x: jax.Array) -> jax.Array:
                values[name] = x
                return x
            return store

        out = program.run(arrays, {program.ids[s.name]: [keep(s.name)] for s in chosen})
        return out, {s.name: values[s.name] for s in chosen}

    return g


@dataclasses.dataclass(frozen=True)
class _OutputOf:
    """Predicate: the site is an output of a scope fully matching ``pattern``."""

    pattern: str

    def __call__(self, site: Site) -> bool:
        return any(re.fullmatch(self.pattern, p) for p in getattr(site, "output_of", ()))

    def __repr__(self) -> str:
        return f"output_of({self.pattern!r})"


def module_output(path: str, *, dtype: Any = None) -> Selector:
    """Select the output value(s) of a module: values produced inside scope
    ``path`` (a regex fully matching a module path, e.g. ``"CNN/conv1"``) and
    used outside it. For a Linen ``Dense`` this is the bias add, whatever the
    module computes internally."""
    try:
        re.compile(path)
    except re.error as err:
        raise ValueError(f"module path pattern {path!r} is not a valid regex: {err}")
    return Activations(dtype=dtype, where=_OutputOf(path))


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
