"""The interpreter: one graph of a traced program, one evaluation loop, rule tables.

``trace(fn, args)`` traces ``fn`` with ``jax.make_jaxpr`` and walks the jaxpr
once into a ``Program``:

* ``values``: every equation output in program order, with the name stack of
  its producer (its scope), a readable name ``{scope}/{primitive}:{k}``, the
  higher-order primitive whose body holds it (``control_flow``), its
  enclosing loops with their trip counts, whether it runs only on some runs
  (cond branches, while bodies) and the scopes of its consumers;
* ``graph``: the equations as ``Node`` objects, call-like primitives (jit,
  closed_call, custom_jvp/vjp calls, remat) holding their walked body, other
  higher-order primitives (scan, while, cond) their walked bodies by label;
* ``ops``: the same program flattened, call bodies inlined, with value ids for
  operands and results (program inputs and constants get negative ids).

``evaluate(graph, args, rules)`` is the one evaluation loop, modelled on
``jax.core.eval_jaxpr``: it binds each equation through ``bind`` (bind params
via ``get_bind_params``, the equation's name stack and context), descends into
call bodies where ``rules.descend`` asks, gives equations whose primitive is
in ``rules.table`` that rule instead of ``bind``, and passes every produced
value through ``rules.after``; ``rules.control`` evaluates the scan, while
and cond nodes it descends into. Activation hooks, batch-invariant batching,
golden runs and range restriction are such rules; row slicing schedules the
flat ``ops`` and binds them with ``bind``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import core as jex
from jax.extend import source_info_util as siu
from jax.extend.core import primitives as prims

# Call-like primitives: the param holding the body that is the computation itself.
INLINE = {
    prims.jit_p: "jaxpr",
    prims.closed_call_p: "call_jaxpr",
    prims.call_p: "call_jaxpr",
    prims.custom_jvp_call_p: "call_jaxpr",
    prims.custom_vjp_call_p: "call_jaxpr",
    prims.remat_p: "jaxpr",
}

# An operand: a value id (int) or a literal.
Operand = int | jex.Literal


def is_array(x: Any) -> bool:
    """Whether a pytree leaf is an array (a program input), not a static value."""
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def bodies(eqn: jex.JaxprEqn) -> list[tuple[str, jex.Jaxpr, Sequence[Any]]]:
    """The jaxprs held in an equation's params, labelled by param name (and position)."""
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


def call_body(eqn: jex.JaxprEqn) -> tuple[jex.Jaxpr, Sequence[Any]] | None:
    """The body of a call-like equation with its constants, or None."""
    param = INLINE.get(eqn.primitive)
    if param is None:
        return None
    body = eqn.params[param]
    if isinstance(body, jex.ClosedJaxpr):
        return body.jaxpr, body.consts
    return body, ()


@dataclasses.dataclass(frozen=True)
class Loop:
    """An enclosing loop of a body value: the loop equation's name (``scan:0``)
    and its trip count (None: a ``while`` loop, unknown statically)."""

    name: str
    trips: int | None


@dataclasses.dataclass
class Value:
    """One equation output: its name, producer scope and primitive, abstract value,
    enclosing control flow ("" if none; the outermost higher-order primitive),
    the scopes that consume it, its enclosing loops (outermost first) and
    whether it is computed only on some runs (inside a cond branch or a while
    loop)."""

    name: str
    scope: str
    primitive: str
    aval: Any
    control_flow: str
    consumers: set[str] = dataclasses.field(default_factory=set)
    loops: tuple[Loop, ...] = ()
    conditional: bool = False


@dataclasses.dataclass
class Graph:
    """A jaxpr with its constants and one ``Node`` per equation."""

    jaxpr: jex.Jaxpr
    consts: Sequence[Any]
    nodes: list[Node]


@dataclasses.dataclass
class Node:
    """One equation: operand ids, value ids of its outputs (None: dropped or
    inlined), the walked body of a call, the range [lo, hi) of value ids
    created by it (bodies included) and, for other higher-order primitives
    (scan, while, cond), their walked bodies by param label (``bodies``)."""

    eqn: jex.JaxprEqn
    ins: tuple[Operand | None, ...]
    ids: tuple[int | None, ...]
    body: Graph | None
    span: tuple[int, int]
    inner: dict[str, Graph] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Op:
    """An equation of the flattened program, over value ids."""

    eqn: jex.JaxprEqn
    ins: tuple[Operand, ...]
    outs: tuple[int | None, ...]


@dataclasses.dataclass
class Program:
    """A traced program: its graph, values, flat ops and pytree structure.

    ``inputs`` are the negative ids of the program inputs, ``consts`` the
    constants by id, ``outputs`` the operands of the program outputs, and
    ``ids`` maps a value's name to its id.
    """

    graph: Graph
    values: list[Value]
    ops: list[Op]
    inputs: list[int]
    consts: dict[int, Any]
    outputs: list[Operand]
    out_tree: Any

    @property
    def ids(self) -> dict[str, int]:
        """Value id by value name."""
        return {v.name: i for i, v in enumerate(self.values)}

    def first_readers(self) -> dict[int, int]:
        """Position in ``ops`` of the first op reading each input or value id."""
        first: dict[int, int] = {}
        for n, op in enumerate(self.ops):
            for x in op.ins:
                if isinstance(x, int):
                    first.setdefault(x, n)
        return first


@dataclasses.dataclass(frozen=True)
class _Where:
    """Where the builder is: absolute name stack (the scope), name stack
    relative to the naming root, name prefix, enclosing control flow, loops
    and whether the code runs only on some runs."""

    stack: siu.NameStack
    relative: siu.NameStack
    prefix: str = ""
    control_flow: str = ""
    loops: tuple[Loop, ...] = ()
    conditional: bool = False


class _Builder:
    """Walks a jaxpr once: values numbered in program order, nodes, flat ops."""

    def __init__(self):
        self.values: list[Value] = []
        self.ops: list[Op] = []
        self.consts: dict[int, Any] = {}
        self.counts: collections.Counter = collections.Counter()
        self._next_input = -1

    def fresh(self) -> int:
        """A new negative id for a program input or constant."""
        self._next_input -= 1
        return self._next_input + 1

    def graph(self, jaxpr: jex.Jaxpr, consts: Sequence[Any], in_ids: Sequence[int | None],
              where: _Where, exit_scope: str | None, flat: bool) -> tuple[Graph, list[Any]]:
        """Walk ``jaxpr``; ``exit_scope`` (if given) is the scope consuming its outputs;
        ``flat``: its leaf equations belong to the flat program."""
        env: dict[Any, Any] = dict(zip(jaxpr.invars, in_ids))
        for var, value in zip(jaxpr.constvars, consts):
            env[var] = self.fresh() if flat else None
            if flat:
                self.consts[env[var]] = value
        nodes = [self.node(eqn, env, where, flat) for eqn in jaxpr.eqns]
        out_ids = [_operand(env, v) for v in jaxpr.outvars]
        if exit_scope is not None:
            self.consume(out_ids, exit_scope)
        return Graph(jaxpr, consts, nodes), out_ids

    def consume(self, ids: Sequence[Any], scope: str) -> None:
        for i in ids:
            if isinstance(i, int) and i >= 0:
                self.values[i].consumers.add(scope)

    def node(self, eqn: jex.JaxprEqn, env: dict, where: _Where, flat: bool) -> Node:
        lo = len(self.values)
        inner = dataclasses.replace(where, stack=where.stack + eqn.source_info.name_stack,
                                    relative=where.relative + eqn.source_info.name_stack)
        ins = tuple(_operand(env, v) for v in eqn.invars)
        call = call_body(eqn)
        if call is not None:
            body, out_ids = self.graph(*call, ins, inner, None, flat)
            env.update((v, i) for v, i in zip(eqn.outvars, out_ids) if not dropped(v))
            return Node(eqn, ins, (None,) * len(eqn.outvars), body, (lo, len(self.values)))
        scope = str(inner.stack)
        self.consume(ins, scope)
        name = self.name(inner, eqn.primitive.name)
        walked = {}
        for label, jaxpr, consts in bodies(eqn):
            nested = _Where(inner.stack, siu.new_name_stack(), f"{name}/{label}",
                            where.control_flow or eqn.primitive.name,
                            where.loops + _loop(eqn, name), where.conditional or _conditional(eqn))
            walked[label] = self.graph(jaxpr, consts, [None] * len(jaxpr.invars), nested, scope,
                                       flat=False)[0]
        ids: list[int | None] = []
        for j, v in enumerate(eqn.outvars):
            if dropped(v):
                ids.append(None)
                continue
            label = name if len(eqn.outvars) == 1 else f"{name}.{j}"
            self.values.append(Value(label, scope, eqn.primitive.name, v.aval, where.control_flow,
                                     loops=where.loops, conditional=where.conditional))
            ids.append(len(self.values) - 1)
            env[v] = ids[-1]
        if flat:
            self.ops.append(Op(eqn, ins, tuple(ids)))
        return Node(eqn, ins, tuple(ids), None, (lo, len(self.values)), walked)

    def name(self, where: _Where, primitive: str) -> str:
        # Counting per joined scope string keeps names unique even when a
        # user scope happens to spell a control-flow prefix.
        scope = "/".join(p for p in (where.prefix, str(where.relative)) if p)
        k = self.counts[scope, primitive]
        self.counts[scope, primitive] += 1
        return f"{scope}/{primitive}:{k}" if scope else f"{primitive}:{k}"


def _loop(eqn: jex.JaxprEqn, name: str) -> tuple[Loop, ...]:
    """The loop an equation's bodies run in, if it is a loop."""
    if eqn.primitive is prims.scan_p:
        return (Loop(name, int(eqn.params["length"])),)
    if eqn.primitive is prims.while_p:
        return (Loop(name, None),)
    return ()


def _conditional(eqn: jex.JaxprEqn) -> bool:
    """Whether an equation's bodies may not run on every evaluation."""
    return eqn.primitive in (prims.cond_p, prims.while_p)


def dropped(v: Any) -> bool:
    """Whether an equation output is discarded (a ``DropVar``)."""
    return isinstance(v, jex.DropVar)


def _operand(env: dict, v: Any) -> Any:
    return v if isinstance(v, jex.Literal) else env.get(v)


def build(closed: jex.ClosedJaxpr, out_tree: Any) -> Program:
    """The ``Program`` of a closed jaxpr whose outputs form ``out_tree``."""
    builder = _Builder()
    inputs = [builder.fresh() for _ in closed.jaxpr.invars]
    root = siu.new_name_stack()
    graph, outputs = builder.graph(closed.jaxpr, closed.consts, inputs, _Where(root, root), "", flat=True)
    return Program(graph, builder.values, builder.ops, inputs, builder.consts, outputs, out_tree)


def trace(fn: Callable[..., Any], args: Sequence[Any]) -> tuple[Program, list[Any]]:
    """Trace ``fn(*args)``; array leaves are the program inputs, other leaves static.

    Returns the program and its input arrays (in program-input order).
    """
    leaves, treedef = jax.tree_util.tree_flatten(list(args))
    where = [i for i, x in enumerate(leaves) if is_array(x)]

    def flat_fn(*arrays):
        full = list(leaves)
        for i, a in zip(where, arrays):
            full[i] = a
        return fn(*jax.tree_util.tree_unflatten(treedef, full))

    arrays = [leaves[i] for i in where]
    closed, shapes = jax.make_jaxpr(flat_fn, return_shape=True)(*arrays)
    return build(closed, jax.tree_util.tree_structure(shapes)), arrays


# ----------------------------------------------------------------------------
# Evaluation.


@contextlib.contextmanager
def equation_context(eqn: jex.JaxprEqn) -> Iterator[None]:
    """The equation's name stack (under the current one), traceback and context."""
    stack = siu.current_name_stack() + eqn.source_info.name_stack
    with siu.user_context(eqn.source_info.traceback, name_stack=stack), eqn.ctx.manager:
        yield


def _bind(eqn: jex.JaxprEqn, args: Sequence[Any], params: Mapping[str, Any] | None = None) -> list[Any]:
    prim = eqn.primitive
    out = prim.bind(*args, **prim.get_bind_params(dict(eqn.params if params is None else params)))
    return list(out) if prim.multiple_results else [out]


def bind(eqn: jex.JaxprEqn, args: Sequence[Any], params: Mapping[str, Any] | None = None) -> list[Any]:
    """Bind ``eqn``'s primitive on ``args`` (with ``params`` if given, else its own)
    in its ``equation_context``; always a list of outputs."""
    with equation_context(eqn):
        return _bind(eqn, args, params)


Rule = Callable[[jex.JaxprEqn, list[Any]], list[Any]]


@dataclasses.dataclass(frozen=True)
class Rules:
    """How ``evaluate`` treats equations.

    ``table``: per primitive, a rule ``(eqn, args) -> outputs`` used instead of
    ``bind``; ``descend(node)``: whether to evaluate a call's body equation by
    equation instead of binding the call whole; ``after(ids, outputs)``: the
    produced values as the program continues with them (hooks);
    ``control(node, args) -> outputs``: how to evaluate a scan, while or cond
    node (``node.inner`` holds its bodies) where ``descend`` asks.
    """

    table: Mapping[Any, Rule] = dataclasses.field(default_factory=dict)
    descend: Callable[[Node], bool] = lambda node: False
    after: Callable[[tuple[int | None, ...], list[Any]], list[Any]] | None = None
    control: Callable[[Node, list[Any]], list[Any]] | None = None


def read(env: dict, v: Any) -> Any:
    """The value of a jaxpr variable or literal in ``env``."""
    return v.val if isinstance(v, jex.Literal) else env[v]


def evaluate(graph: Graph, args: Sequence[Any], rules: Rules = Rules()) -> list[Any]:
    """Evaluate ``graph`` on ``args`` under ``rules``; the outputs, in order."""
    env = dict(zip(graph.jaxpr.constvars, graph.consts))
    env.update(zip(graph.jaxpr.invars, args))
    for node in graph.nodes:
        eqn = node.eqn
        invals = [read(env, v) for v in eqn.invars]
        with equation_context(eqn):
            if node.body is not None and rules.descend(node):
                outs = evaluate(node.body, invals, rules)
            elif node.inner and rules.control is not None and rules.descend(node):
                outs = rules.control(node, invals)
            elif eqn.primitive in rules.table:
                outs = rules.table[eqn.primitive](eqn, invals)
            else:
                outs = _bind(eqn, invals)
            if rules.after is not None:
                outs = rules.after(node.ids, outs)
        env.update((v, x) for v, x in zip(eqn.outvars, outs) if not dropped(v))
    return [read(env, v) for v in graph.jaxpr.outvars]


def run(program: Program, arrays: Sequence[Any], rules: Rules = Rules()) -> Any:
    """Evaluate ``program`` on its input arrays; the output pytree."""
    return jax.tree_util.tree_unflatten(program.out_tree, evaluate(program.graph, arrays, rules))
