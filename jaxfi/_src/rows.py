"""Row slicing: a fault in one example's values changes only that example.

In a model evaluated on a batch, most operations treat each example (row of
the leading axis) on its own: elementwise maths, convolutions, pooling,
reshapes that keep the leading axis. A fault in an input or an activation of
example ``n`` therefore changes only row ``n`` until the first operation that
mixes rows or is not known to compute a row the same way at any batch size
(``dot_general`` and float sums among them: XLA:CPU picks other kernels
for one row than for many, which round differently).

``RowProgram`` splits a trial accordingly. A golden run computes, once, every
value the trial reads without changing. Per trial, only the operations that
depend on a fault run: on the faulted rows alone while they stay row-local,
then, from the first other operation on, on the whole batch with those rows
written into the golden values. A convolutional trunk hit by one fault thus
costs one example instead of the batch. Which rows are computed is drawn
with the trial's faults; their number is static (the plans' fault caps).
Weight faults reach every row. A matmul or convolution of a golden operand
with a faulted weight is evaluated incrementally: its golden result plus the
changed weights' terms (a few output columns or channels); from there the
trial runs on the whole batch, and a matmul whose input changed in a few
features only is its golden result plus those features' terms. With these
incremental layers, matmuls and sums also run on the faulted rows alone
(they may round one row differently than the batch, so a row whose input
kept its golden bits keeps the golden result's bits).
``incremental=False`` recomputes such layers and keeps to the operations
that compute a row as the batch does, bit for bit.

Records equal ``faulty``'s: the same faults are drawn from the same keys and
indexed in the whole arrays. Output values may differ from the unsliced trial
in the last bits (other kernels, other fusion, the corrections' rounding), so
a trial is compared with the golden run of the same program
(``trial(..., live=False)``), never with another program's.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex

from jaxfi._src import bits as bits_lib
from jaxfi._src import interpret
from jaxfi._src.inject import (
    Faults,
    apply_rows,
    apply_site,
    assemble_record,
    inject_params,
    live_faults,
    movable,
    nonfinite_faults,
    plan_keys,
)
from jaxfi._src.plan import Plan, Population
from jaxfi._src.sites import Site, param_sites
from jaxfi._src.trial import input_sites, plan_key

_ELEMENTWISE = frozenset({
    "abs", "acos", "acosh", "add", "and", "asin", "asinh", "atan", "atan2", "atanh", "cbrt",
    "ceil", "clamp", "convert_element_type", "copy", "copy_p", "cos", "cosh", "div", "eq", "erf",
    "erf_inv", "erfc", "exp", "exp2", "expm1", "floor", "ge", "gt", "imag", "integer_pow",
    "is_finite", "le", "lgamma", "digamma", "log", "log1p", "logistic", "lt", "max", "min", "mul",
    "ne", "neg", "nextafter", "not", "or", "pow", "real", "reduce_precision", "rem", "round",
    "rsqrt", "select_n", "shift_left", "shift_right_arithmetic", "shift_right_logical", "sign",
    "sin", "sinh", "sqrt", "square", "sub", "tan", "tanh", "xor"})
# Not reduce_sum or reduce_prod: XLA:CPU vectorises a float sum over the
# other axes differently for one row than for many (seen: a global average
# pool), so the result would not be the batch's row bit for bit.
_REDUCTIONS = frozenset({"reduce_max", "reduce_min", "reduce_and", "reduce_or", "reduce_xor",
                         "argmax", "argmin"})
_WINDOWS = frozenset({"reduce_window_sum", "reduce_window_max", "reduce_window_min"})
_MAX_CONV_CORRECTIONS = 16
# Operations that can turn a NaN into a number, and which one depends on the
# compiled program (XLA:CPU's max-pool keeps or drops a NaN by its position in
# the window; a fused ReLU maps it to 0): a NaN reaching one is watched.
_NAN_DROPPING = frozenset({"max", "min", "clamp", "reduce_max", "reduce_min", "reduce_window_max",
                           "reduce_window_min", "argmax", "argmin", "sort", "convert_element_type"})
# Row-local, but XLA:CPU may round one row differently than the whole batch.
_ROUNDED = frozenset({"dot_general", "reduce_sum"})
# Params that spell the batch size of an operation's output.
_SHAPE_PARAMS = {"reshape": "new_sizes", "broadcast_in_dim": "shape", "slice": "limit_indices"}


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.aval.shape)


def _row_operands(eqn: jex.JaxprEqn, batch: int, rounded: bool = False) -> tuple[bool, ...] | None:
    """Which operands are sliced by rows when ``eqn`` runs on some rows only,
    or None if it does not treat each row of its output on its own. With
    ``rounded``, also the operations that treat each row on its own but may
    round one row differently than the batch (``_ROUNDED``)."""
    name, p = eqn.primitive.name, eqn.params
    out_rank = len(_shape(eqn.outvars[0]))
    if any(_shape(o)[:1] != (batch,) for o in eqn.outvars):
        return None
    shapes = [_shape(v) for v in eqn.invars]
    def rowed(s: tuple[int, ...]) -> bool:
        return len(s) == out_rank and s[:1] == (batch,)

    first = rowed(shapes[0])
    rest = (False,) * (len(shapes) - 1)
    if name in _ELEMENTWISE or (name == "concatenate" and p["dimension"] != 0):
        return tuple(rowed(s) for s in shapes)
    if name == "conv_general_dilated":
        dn = p["dimension_numbers"]
        ok = p["batch_group_count"] == 1 and dn.lhs_spec[0] == 0 and dn.out_spec[0] == 0
        return (True, False) if ok and first else None
    if name in _WINDOWS:
        lead = (p["window_dimensions"][0], p["window_strides"][0], tuple(p["padding"][0]),
                p["base_dilation"][0], p["window_dilation"][0])
        return (True,) if lead == (1, 1, (0, 0), 1, 1) else None
    keeps_rows = {
        "reduce": lambda: 0 not in p.get("axes", (0,)),
        "reshape": lambda: p["dimensions"] is None and shapes[0][:1] == (batch,),
        "broadcast_in_dim": lambda: tuple(p["broadcast_dimensions"][:1]) == (0,) and shapes[0][:1] == (batch,),
        "transpose": lambda: p["permutation"][0] == 0,
        "squeeze": lambda: 0 not in p["dimensions"],
        "rev": lambda: 0 not in p["dimensions"],
        "pad": lambda: tuple(p["padding_config"][0]) == (0, 0, 0),
        "slice": lambda: (p["start_indices"][0] == 0 and p["limit_indices"][0] == batch
                          and (p["strides"] is None or p["strides"][0] == 1)),
    }
    kind = "reduce" if name in _REDUCTIONS else name
    if kind in keeps_rows and (first or kind in ("reshape", "broadcast_in_dim")) and keeps_rows[kind]():
        return (True,) + rest
    if rounded and name == "reduce_sum" and first and 0 not in p["axes"]:
        return (True,)
    if rounded and name == "dot_general" and first and not rowed(shapes[1]):
        (lhs_contract, _), (lhs_batch, rhs_batch) = p["dimension_numbers"]
        return (True, False) if not lhs_batch and not rhs_batch and 0 not in lhs_contract else None
    return None


def _row_params(eqn: jex.JaxprEqn, rows: int) -> dict[str, Any]:
    params = dict(eqn.params)
    key = _SHAPE_PARAMS.get(eqn.primitive.name)
    if key is not None:
        params[key] = (rows,) + tuple(params[key][1:])
    return params


def take_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
    """``x[rows]`` along the leading axis; out-of-range rows read zeros."""
    raw, back = movable(x)
    return back(jnp.take(raw, rows, axis=0, mode="fill", fill_value=0))


def put_rows(x: jax.Array, rows: jax.Array, values: jax.Array) -> jax.Array:
    """``x`` with ``x[rows] = values``; out-of-range rows are dropped."""
    raw, back = movable(x)
    return back(raw.at[rows].set(movable(values)[0], mode="drop"))


def _batched(flat: interpret.Program, arrays: Sequence[Any], n_params: int, batch: int,
             rounded: bool = False) -> set[int]:
    """Ids of the values whose leading axis is the batch: inputs with a
    leading ``batch`` axis and what row-local operations make of them."""
    batched = {i for i, a in zip(flat.inputs[n_params:], arrays[n_params:]) if np.shape(a)[:1] == (batch,)}
    for op in flat.ops:
        sliced = _row_operands(op.eqn, batch, rounded)
        if sliced is not None and any(s and x in batched for x, s in zip(op.ins, sliced) if isinstance(x, int)):
            batched.update(o for o in op.outs if o is not None)
    return batched


def _batch_size(inputs: Sequence[Any]) -> int:
    """The leading axis of the first input array (0 if there is none: no row slicing)."""
    return int(np.shape(inputs[0])[0]) if inputs and np.ndim(inputs[0]) else 0


def row_sites(fn: Callable[[Any, Any], Any], params: Any, inputs: Any, rounded: bool = False) -> frozenset[str]:
    """Names of the input and activation sites of ``fn(params, inputs)`` whose
    faults keep row slicing: values with a batch axis (the leading axis of
    ``inputs``), and values after the last such one (from there a trial runs
    on the whole batch anyway). A fault on any other site (a bias broadcast
    inside a convolutional trunk, say) changes every row. ``rounded``: row
    slicing goes through matmuls and sums too (see ``RowProgram``)."""
    flat, arrays = interpret.trace(fn, (params, inputs))
    n_params = len(param_sites(params))
    batched = _batched(flat, arrays, n_params, _batch_size(arrays[n_params:]), rounded)
    last = max((n for n, op in enumerate(flat.ops) if batched.intersection(op.outs)), default=-1)
    keep = batched | {o for op in flat.ops[last + 1:] for o in op.outs}
    names = {flat.inputs[n_params + n]: s.name for n, s in enumerate(input_sites((params, inputs)))}
    names.update((i, name) for name, i in flat.ids.items())
    return frozenset(names[i] for i in keep if i in names)


@dataclasses.dataclass(frozen=True)
class _Hook:
    """Plan ``plan``'s population site ``site`` is the value this hook is on."""

    plan: int
    site: int


# Where a computed op reads an operand: a literal, the trial's own value, the
# golden value, the golden value's faulted rows, or the golden value with the
# trial's own rows written in.
_Recipe = tuple[str, ...]


class RowProgram:
    """One trial of ``fn(params, inputs)`` under ``plans`` restricted to ``only``
    (population site indices per plan), computed on the faulted rows while
    the program stays row-local (see the module doc).

    ``golden(params, inputs)`` returns the values trials read (compute it
    once); ``trial(key, params, golden) -> (output, records)`` draws the
    records of ``trial.restricted(fn, plans, only)(key, params, inputs)`` bit
    for bit, with outputs equal to it up to rounding (other kernels for a few
    rows, the incremental layers' corrections).
    """

    def __init__(self, fn: Callable[[Any, Any], Any], params: Any, inputs: Any,
                 plans: Sequence[Plan], pops: Sequence[Population], only: Sequence[frozenset[int]],
                 incremental: bool = True):
        program, arrays = interpret.trace(fn, (params, inputs))
        self._incremental = incremental
        self._params_cap = sum(pop.cap for plan, pop in zip(plans, pops) if plan.kind == "params")
        self._flat = flat = program
        self._out_tree = program.out_tree
        self._plans, self._pops, self._only = tuple(plans), tuple(pops), tuple(only)
        n_params = len(param_sites(params))
        self._leaf_ids = frozenset(flat.inputs[:n_params])
        self.batch = _batch_size(arrays[n_params:])
        input_ids = {s.name: flat.inputs[n_params + n] for n, s in enumerate(input_sites((params, inputs)))}
        leaf_ids = {s.name: flat.inputs[n] for n, s in enumerate(param_sites(params))}
        self._hooks: dict[int, list[_Hook]] = {}
        # Every site of the plans, faulted in this program or not.
        self._sites: dict[int, list[_Hook]] = {}
        faulted: set[int] = set()
        for i, (plan, pop) in enumerate(zip(plans, pops)):
            ids = {"params": leaf_ids, "inputs": input_ids, "activations": program.ids}[plan.kind]
            for s, site in enumerate(pop.sites):
                self._sites.setdefault(ids[site.name], []).append(_Hook(i, s))
                if s not in only[i]:
                    continue
                if plan.kind == "params":
                    faulted.add(ids[site.name])
                else:
                    self._hooks.setdefault(ids[site.name], []).append(_Hook(i, s))
        self._analyse(_batched(flat, arrays, n_params, self.batch, incremental), faulted)
        if self.rows > self.batch // 2:
            # So many rows gain little: run on the whole batch from the first fault.
            self._analyse(set(), faulted)

    def _analyse(self, batched: set[int], faulted: set[int]) -> None:
        """Decide once which values a trial computes, and whether by rows, whole or both."""
        flat = self._flat
        mode = {i: "full" for i in faulted}
        self._hooked_mode(flat.inputs, batched, mode)
        hows, slices = [], []
        for op in flat.ops:
            slices.append(_row_operands(op.eqn, self.batch, self._incremental))
            hows.append(_how(op, slices[-1], mode))
            if hows[-1] is not None:
                mode.update((o, hows[-1]) for o in op.outs if o is not None)
            self._hooked_mode(op.outs, batched, mode)
        self._mode = mode
        doubled = self._doubled(hows, mode)
        self._corrected = {n for n, (op, how) in enumerate(zip(flat.ops, hows)) if self._incremental
                           and how == "full" and _correctable(op, faulted, mode, self._params_cap)}
        self._faulted = faulted
        self._sparse = {n: k for n, (op, how) in enumerate(zip(flat.ops, hows))
                        if self._incremental and how == "full" and n not in self._corrected
                        and (k := _sparse_cap(op, mode, faulted, self._params_cap))}
        # Rows a rounding operation computes are golden again where their inputs are.
        self._checked = {n for n, (op, how) in enumerate(zip(flat.ops, hows))
                         if how == "rows" and op.eqn.primitive.name in _ROUNDED}
        # Corrected and feature-updated ops read what they need themselves.
        updated = self._corrected | self._sparse.keys()
        self._steps = [(op, _rows_recipe(op, sliced, mode) if how == "rows" else None,
                        _full_recipe(op, mode, doubled)
                        if (how == "full" and n not in updated) or doubled.intersection(op.outs) else None,
                        how) for n, (op, how, sliced) in enumerate(zip(flat.ops, hows, slices))]
        self._doubled_ids = doubled
        by_rows = {(h.plan, h.site) for i, hooks in self._hooks.items() if mode[i] == "rows" for h in hooks}
        self._row_sites = {p: frozenset(s for q, s in by_rows if q == p) for p, _ in by_rows}
        self.rows = sum(self._pops[p].cap for p in self._row_sites)
        reads = {x for op, rows, full, _ in self._steps for recipe in (rows, full) if recipe
                 for x, r in zip(op.ins, recipe) if r in ("golden", "take", "splice")}
        reads |= {i for n in self._checked for i in (flat.ops[n].ins[0], flat.ops[n].outs[0])}
        reads |= {x for x in flat.outputs if isinstance(x, int) and mode.get(x) == "rows" and x not in doubled}
        reads |= {x for x in flat.outputs if isinstance(x, int) and x not in mode}
        computed = {o for op, rows, full, _ in self._steps if rows or full for o in op.outs}
        reads |= {i for i in self._hooks if i not in computed}
        self._again = self._recomputed(reads, hows)
        again_outs = {o for n in self._again for o in flat.ops[n].outs}
        reads = (reads - again_outs) | {x for n in self._again for x in flat.ops[n].ins if isinstance(x, int)}
        # Read as stored, not recomputed per trial: a trial is compared with
        # its own program's golden run, so how XLA fused the golden prefix
        # does not matter, and recomputing it cost a conv2 trial of the small
        # CNN a third of its time.
        stored = {i for n in updated for i in (flat.ops[n].ins[0], flat.ops[n].outs[0])}
        # A feature update reads its weight: a params leaf is passed to every trial, anything else is read.
        stored |= {flat.ops[n].ins[1] for n in self._sparse if flat.ops[n].ins[1] not in self._leaf_ids}
        stored = {x for x in stored if isinstance(x, int) and x not in faulted}
        self._golden_ids = sorted((reads | stored) - again_outs - set(flat.consts) - faulted)
        # Where a trial's NaN or infinity shows, if it has one (see ``checked``):
        # arithmetic carries it to a program output unless an operation whose
        # NaN semantics depend on the compiled program drops it first.
        # A faulted value itself is checked in the records.
        dropping = {x for op in flat.ops if op.eqn.primitive.name in _NAN_DROPPING for x in op.ins
                    if isinstance(x, int)}
        outputs = {x for x in flat.outputs if isinstance(x, int)}
        self._watched = tuple(sorted((dropping | outputs) & mode.keys()))

    def _recomputed(self, reads: set[int], hows: Sequence[str | None]) -> set[int]:
        """Golden operations a trial computes again rather than reading their results.

        In the unsliced trial XLA fuses such operations (a BatchNorm's scale,
        a ReLU) into their consumers and may round differently than when it
        reads them from memory; so a trial recomputes every golden value it
        reads back to values XLA always materialises: convolution and matmul
        results (see ``_materialised``), sites (which carry fault-writing
        operations), inputs.
        """
        flat = self._flat
        producer = {o: n for n, op in enumerate(flat.ops) for o in op.outs if o is not None}
        again: set[int] = set()
        work = list(reads)
        while work:
            n = producer.get(work.pop())
            if (n is None or n in again or hows[n] is not None or _materialised(flat.ops[n].eqn)
                    or self._sites.keys() & set(flat.ops[n].outs)):
                continue
            again.add(n)
            work.extend(x for x in flat.ops[n].ins if isinstance(x, int))
        return again

    def _doubled(self, hows: Sequence[str | None], mode: dict[int, str]) -> set[int]:
        """Row-computed values that are also computed on the whole batch.

        Where whole-batch operations read rows, XLA would fuse the elementwise
        operations before them into their loops in the unsliced trial, and may
        then round differently (seen with a ResNet's pooling after BatchNorm).
        So those operations run on the whole batch too, back to the nearest
        values XLA always materialises (``_materialised``), faulted values, inputs.
        """
        ops = self._flat.ops
        need = {x for op, how in zip(ops, hows) if how == "full" for x in op.ins
                if isinstance(x, int) and mode.get(x) == "rows"}
        need |= {x for x in self._flat.outputs if isinstance(x, int) and mode.get(x) == "rows"}
        doubled: set[int] = set()
        for op, how in zip(reversed(ops), reversed(hows)):
            if (how == "rows" and need.intersection(op.outs) and not _materialised(op.eqn)
                    and not self._hooks.keys() & set(op.outs)):
                doubled.update(o for o in op.outs if o is not None)
                need.update(x for x in op.ins if isinstance(x, int) and mode.get(x) == "rows")
        return doubled

    @property
    def corrected(self) -> tuple[str, ...]:
        """The primitives evaluated incrementally (golden result plus the
        changed weights' terms), in program order."""
        return tuple(self._flat.ops[n].eqn.primitive.name for n in sorted(self._corrected))

    @property
    def sparse(self) -> tuple[str, ...]:
        """The matmuls evaluated as their golden result plus the changed input
        features' terms when few features changed, in program order."""
        return tuple(self._flat.ops[n].eqn.primitive.name for n in sorted(self._sparse))

    def _hooked_mode(self, ids: Sequence[int | None], batched: set[int], mode: dict[int, str]) -> None:
        """A faulted golden value becomes the trial's own: by rows if it has a batch axis."""
        for i in ids:
            if i in self._hooks and i not in mode:
                mode[i] = "rows" if i in batched else "full"

    def golden(self, params: Any, inputs: Any, values: dict[int, Any] | None = None) -> list[Any]:
        """The golden values trials read, computed on the unfaulted arguments
        (or taken from ``values``, the ``golden_values`` of any RowProgram of
        the same function, arguments and plans).

        Compiles and runs its own program; do not wrap it in ``jit``. Every
        site of the plans gets the same fault-writing operations as in a
        trial, only with no fault: they keep XLA from fusing across those
        values (a fused multiply-add rounds differently), so the golden values
        match the trial's unfaulted ones bit for bit. The empty fault sets are
        arguments so that XLA cannot fold those operations away.
        """
        if values is not None:
            return [values[i] for i in self._golden_ids]
        return jax.jit(self._golden)(params, inputs, jax.random.key(0), self._blanks())

    def golden_values(self, params: Any, inputs: Any) -> dict[int, Any]:
        """Every value of the program (by id) on the unfaulted arguments, with
        the blank fault writes: the same whatever ``only`` is, so one call
        serves every RowProgram of these plans."""
        return self.golden_values_program(params, inputs)

    @functools.cached_property
    def golden_values_program(self) -> Callable[[Any, Any], dict[int, Any]]:
        """``golden_values`` compiled once, for any arguments of the same shapes."""
        every = jax.jit(functools.partial(self._golden, every=True))
        return lambda params, inputs: every(params, inputs, jax.random.key(0), self._blanks())

    def _blanks(self) -> list[Faults]:
        return [Faults(np.full(pop.cap, -1, np.int32), np.zeros(pop.cap, np.int32),
                       np.zeros(pop.cap, np.int32), np.zeros(pop.cap, bool), np.False_) for pop in self._pops]

    def _golden(self, params: Any, inputs: Any, key: jax.Array, blanks: Sequence[Faults],
                every: bool = False) -> list[Any] | dict[int, Any]:
        env: dict[int, Any] = {}

        def blank(ids: Sequence[int | None], values: Sequence[Any]) -> list[Any]:
            out = []
            for i, x in zip(ids, values):
                for hook in self._sites.get(i, ()):
                    x = apply_site(key, x, hook.site, blanks[hook.plan], self._pops[hook.plan])[0]
                if i is not None:
                    env[i] = x
                out.append(x)
            return out

        args = blank(self._flat.inputs, param_leaves(params) + jax.tree.leaves(inputs))
        interpret.evaluate(self._flat.graph, args, interpret.Rules(descend=lambda node: True, after=blank))
        return env if every else [env[i] for i in self._golden_ids]

    def trial(self, key: jax.Array, params: Any, golden: Sequence[Any],
              live: Any = None) -> tuple[Any, tuple[Any, ...]]:
        """One trial from its key, the (unfaulted) params and ``golden``; with
        ``live`` False, no fault lands (the program's own golden run)."""
        output, records, *_ = self._evaluate(key, params, golden, live)
        return output, records

    def checked(self, key: jax.Array, params: Any, golden: Sequence[Any], finite: jax.Array,
                live: Any = None) -> tuple[Any, tuple[Any, ...], jax.Array]:
        """``trial``, and whether a value the trial computed itself (a faulted
        value or one downstream of it) holds a NaN or an infinity.

        Such a trial's outcome is a property of the compiled program (which
        value a max or a max-pool keeps when one is NaN, say), so only the
        reference program can say it; the caller recomputes it there.

        Args:
          key: the trial's key.
          params: the unfaulted params.
          golden: ``golden(params, inputs)``.
          finite: ``golden_finite`` of the same inputs: a value whose golden
            run already holds a non-finite element (a mask of -inf, say) is
            not checked itself, only what the trial computes from it.
          live: as in ``trial``.

        Returns:
          ``(output, records, nonfinite)``.
        """
        output, records, own, own_full, rows = self._evaluate(key, params, golden, live)
        return output, records, self._nonfinite(own, own_full, rows, finite, records)

    def golden_finite(self, values: dict[int, Any]) -> jax.Array:
        """Per value ``checked`` watches, whether its golden run (from
        ``golden_values``) is all finite."""
        return jnp.stack([jnp.all(jnp.isfinite(values[i])) if _inexact(values[i]) else jnp.asarray(True)
                          for i in self._watched] or [jnp.asarray(True)])

    def _nonfinite(self, own: dict, own_full: dict, rows: jax.Array, finite: jax.Array,
                   records: Sequence[Any]) -> jax.Array:
        """Whether a fault made a NaN or an infinity (from the records), or a
        watched value holds one in a row the trial computes (padding rows
        aside) where its golden run holds none."""
        found = jnp.any(jnp.stack([nonfinite_faults(r, pop.sites) for r, pop in zip(records, self._pops)]))
        real = rows < self.batch
        for k, i in enumerate(self._watched):
            by_rows = self._mode.get(i) == "rows"
            # A value computed on the whole batch as well differs from golden in the trial's rows only.
            for values in (own.get(i), take_rows(own_full[i], rows) if i in own_full else None):
                if values is None or not _inexact(values):
                    continue
                bad = ~jnp.isfinite(values)
                if by_rows:
                    bad = jnp.any(bad.reshape(bad.shape[0], -1), axis=1) & real
                found |= jnp.any(bad) & finite[k]
        return found

    def _evaluate(self, key: jax.Array, params: Any, golden: Sequence[Any], live: Any
                  ) -> tuple[Any, tuple[Any, ...], dict, dict, jax.Array]:
        """A trial's output and records, the values it computed (by rows or
        whole, and whole where also needed so) and the rows it computed."""
        flat = self._flat
        gold = dict(flat.consts) | dict(zip(self._golden_ids, golden))
        records: list[Any] = [None] * len(self._plans)
        draws: dict[int, tuple[jax.Array, Faults]] = {}
        clean = dict(zip(flat.inputs, param_leaves(params)))
        for i, (plan, pop) in enumerate(zip(self._plans, self._pops)):
            k = plan_key(key, i)
            if plan.kind == "params":
                params, records[i] = inject_params(k, params, plan, self._only[i], live)
            else:
                k_sample, k_apply = plan_keys(k)
                draws[i] = (k_apply, live_faults(k_sample, pop, live))
        own = {i: x for i, x in zip(flat.inputs, param_leaves(params)) if self._mode.get(i) == "full"}
        own_full: dict[int, Any] = {}
        rows = self._rows(draws)
        parts: dict[int, list[Any]] = {i: [] for i in draws}
        self._fault(flat.inputs, own, gold, rows, draws, parts)
        for n, (op, rows_recipe, full_recipe, how) in enumerate(self._steps):
            if n in self._again:
                _bind(op, [_value(gold, x) for x in op.ins], op.eqn.params, gold)
            if n in self._corrected:
                (x, w), out = op.ins, op.outs[0]
                own[out] = _correction(op.eqn, gold[out], gold[x], self._changes(w, records))
            if n in self._sparse:
                (x, w), out = op.ins, op.outs[0]
                changes = self._changes(w, records) if w in self._faulted else None
                own[out] = _sparse_update(op.eqn, gold[out], gold[x], own[x], clean[w] if w in clean else gold[w],
                                          self._sparse[n], changes)
            if rows_recipe:
                args = [_operand(x, r, own, gold, rows) for x, r in zip(op.ins, rows_recipe)]
                _bind(op, args, _row_params(op.eqn, self.rows), own)
                if n in self._checked:
                    x, out = op.ins[0], op.outs[0]
                    own[out] = _golden_where_same(own[out], take_rows(gold[out], rows), args[0],
                                                  take_rows(gold[x], rows))
            if full_recipe:
                args = [_operand(x, r, own | own_full, gold, rows) for x, r in zip(op.ins, full_recipe)]
                _bind(op, args, op.eqn.params, own if how == "full" else own_full)
            self._fault(op.outs, own, gold, rows, draws, parts)
        for i, (_, faults) in draws.items():
            records[i] = assemble_record(faults, self._pops[i], parts[i])
        outs = [_operand(x, _output_recipe(x, self._mode, self._doubled_ids), own | own_full, gold, rows)
                for x in flat.outputs]
        return jax.tree.unflatten(self._out_tree, outs), tuple(records), own, own_full, rows

    def _changes(self, leaf: int, records: Sequence[Any]) -> Changes:
        """The changes the trial's params faults (in ``records``) made to ``leaf``."""
        parts = []
        for hook in self._sites[leaf]:
            if self._plans[hook.plan].kind != "params":
                continue
            record, site = records[hook.plan], self._pops[hook.plan].sites[hook.site]
            value = functools.partial(_value_of, site)
            # Faults on one value share its record (sorted, adjacent): count the value once.
            first = jnp.concatenate([jnp.ones((1,), bool), (record.index[1:] != record.index[:-1])
                                     | (record.site[1:] != record.site[:-1])])
            parts.append(Changes(record.index, value(record.after) - value(record.before),
                                 record.valid & first & (record.site == hook.site)))
        return Changes(*(jnp.concatenate(field) for field in zip(*parts)))

    def _rows(self, draws: dict[int, tuple[jax.Array, Faults]]) -> jax.Array:
        """The distinct rows holding the trial's faults on row-sliced sites
        (``batch`` fills the unused slots)."""
        found = []
        for p, sites in self._row_sites.items():
            faults, pop = draws[p][1], self._pops[p]
            per_row = np.array([s.size // max(1, s.shape[0]) if s.shape else 1 for s in pop.sites], np.int32)
            on = jnp.asarray([s in sites for s in range(len(pop.sites))])[jnp.maximum(faults.site, 0)]
            row = faults.index // jnp.asarray(per_row)[jnp.maximum(faults.site, 0)]
            found.append(jnp.where(faults.valid & on, row, self.batch))
        if not found:
            return jnp.zeros((0,), jnp.int32)
        return jnp.unique(jnp.concatenate(found), size=self.rows, fill_value=self.batch).astype(jnp.int32)

    def _fault(self, ids: Sequence[int | None], own: dict, gold: dict, rows: jax.Array,
               draws: dict, parts: dict) -> None:
        for i in ids:
            for hook in self._hooks.get(i, ()):
                by_rows = self._mode[i] == "rows"
                if i not in own:
                    own[i] = take_rows(gold[i], rows) if by_rows else gold[i]
                k_apply, faults = draws[hook.plan]
                pop = self._pops[hook.plan]
                if by_rows:
                    own[i], part = apply_rows(k_apply, own[i], rows, hook.site, faults, pop)
                else:
                    own[i], part = apply_site(k_apply, own[i], hook.site, faults, pop)
                parts[hook.plan].append(part)


def _how(op: interpret.Op, sliced: tuple[bool, ...] | None, mode: dict[int, str]) -> str | None:
    """None if ``op`` reads no trial value; else "rows" if it can run on the
    faulted rows alone, "full" if it must run on the whole batch."""
    own = [(x, s) for x, s in zip(op.ins, sliced or (False,) * len(op.ins)) if isinstance(x, int) and x in mode]
    if not own:
        return None
    rowwise = sliced is not None and all(mode[x] == "rows" and s for x, s in own)
    return "rows" if rowwise else "full"


def _materialised(eqn: jex.JaxprEqn) -> bool:
    """Whether XLA always writes this operation's result to memory: matmuls
    and convolutions are library calls, except 1x1 convolutions, which XLA
    rewrites as matmuls it may fuse with the operations around them."""
    if eqn.primitive.name == "dot_general":
        return True
    if eqn.primitive.name != "conv_general_dilated":
        return False
    spec = eqn.params["dimension_numbers"].rhs_spec
    kernel = _shape(eqn.invars[1])
    return any(kernel[d] != 1 for d in spec[2:])


def _linear(op: interpret.Op) -> bool:
    """Whether ``op`` is a floating matmul ``x @ w`` (``w`` 2-D, no batch axes) or
    an ungrouped convolution: linear in each operand, as the corrections need."""
    name = op.eqn.primitive.name
    if name not in ("dot_general", "conv_general_dilated") or len(op.ins) != 2:
        return False
    if not all(jnp.issubdtype(v.aval.dtype, jnp.floating) for v in op.eqn.invars):
        return False
    if name == "dot_general":
        contract, batch = op.eqn.params["dimension_numbers"]
        return (len(_shape(op.eqn.invars[1])) == 2 and batch == ((), ())
                and contract == ((len(_shape(op.eqn.invars[0])) - 1,), (0,)))
    return op.eqn.params["feature_group_count"] == 1 and op.eqn.params["batch_group_count"] == 1


def _weight_correctable(op: interpret.Op, cap: int) -> bool:
    """Whether the changed weights' terms of ``op`` (a ``_linear`` op) are cheap:
    each faulted kernel element costs its own pass over an output channel
    (``kernel_element_term``), one after another, so beyond a few faults
    recomputing a convolution is cheaper."""
    return op.eqn.primitive.name == "dot_general" or cap <= _MAX_CONV_CORRECTIONS


def _correctable(op: interpret.Op, faulted: set[int], mode: dict[int, str], cap: int) -> bool:
    """Whether ``op`` is a matmul or convolution of a golden operand with a faulted
    floating params leaf that a correction can update (see ``_correction``)."""
    if not _linear(op):
        return False
    x, w = op.ins
    return w in faulted and isinstance(x, int) and x not in mode and _weight_correctable(op, cap)


class Changes(NamedTuple):
    """A trial's changes to one params leaf: flat index, new minus old value, valid."""

    index: jax.Array
    delta: jax.Array
    valid: jax.Array


def _correction(eqn: jex.JaxprEqn, golden: jax.Array, x: jax.Array, changes: Changes) -> jax.Array:
    """``eqn`` on ``x`` and the faulty leaf, as its ``golden`` result plus the changed
    weights' terms: far less work than recomputing, rounded differently."""
    w_shape = _shape(eqn.invars[1])
    if eqn.primitive.name == "dot_general":
        rows, cols = jnp.divmod(changes.index, w_shape[1])
        terms = x[..., rows] * changes.delta.astype(x.dtype)
        cols = jnp.where(changes.valid, cols, w_shape[1])
        return golden.at[..., cols].add(terms.astype(golden.dtype), mode="drop")
    dn = eqn.params["dimension_numbers"]
    out_f, in_f = dn.rhs_spec[0], dn.rhs_spec[1]
    one = tuple(1 if d in (out_f, in_f) else n for d, n in enumerate(w_shape))
    coords = jnp.unravel_index(changes.index, w_shape)
    y = golden
    for k in range(changes.index.shape[0]):
        delta = changes.delta[k].astype(x.dtype)
        if any(d != 1 for d in eqn.params["lhs_dilation"]):
            at = tuple(0 if d in (out_f, in_f) else coords[d][k] for d in range(len(w_shape)))
            kernel = jnp.zeros(one, x.dtype).at[at].set(delta)
            channel = lax.dynamic_slice_in_dim(x, coords[in_f][k], 1, axis=dn.lhs_spec[1])
            term = interpret.bind(eqn, [channel, kernel])[0]
        else:
            term = kernel_element_term(eqn, x, [coords[d][k] for d in dn.rhs_spec[2:]], coords[in_f][k], delta,
                                       _shape(eqn.outvars[0]))
        old = lax.dynamic_slice_in_dim(y, coords[out_f][k], 1, axis=dn.out_spec[1])
        new = jnp.where(changes.valid[k], old + term.astype(y.dtype), old)
        y = lax.dynamic_update_slice_in_dim(y, new, coords[out_f][k], axis=dn.out_spec[1])
    return y


def kernel_element_term(eqn: jex.JaxprEqn, x: jax.Array, at: Sequence[jax.Array], channel: jax.Array,
                        delta: jax.Array, out_shape: tuple[int, ...]) -> jax.Array:
    """The contribution of one kernel element (spatial position ``at``, input
    ``channel``) changed by ``delta`` to a convolution's output: ``delta``
    times a strided window of that input channel, in the output's layout with
    a feature axis of 1. XLA:CPU runs a one-channel convolution about as slowly
    as a third of the whole one; this is one pass over the output channel."""
    p, dn = eqn.params, eqn.params["dimension_numbers"]
    lhs, out = dn.lhs_spec, dn.out_spec
    rest = [d for d in range(x.ndim) if d != lhs[1]]
    xc = lax.dynamic_index_in_dim(x, channel, axis=lhs[1], keepdims=False)
    xc = jnp.transpose(xc, [rest.index(d) for d in (lhs[0], *lhs[2:])])
    xc = lax.pad(xc, jnp.zeros((), x.dtype), [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in p["padding"]])
    sizes = [out_shape[d] for d in out[2:]]
    strides = p["window_strides"]
    starts = [jnp.asarray(0)] + [a * r for a, r in zip(at, p["rhs_dilation"])]
    window = lax.dynamic_slice(xc, starts, [xc.shape[0]] + [(n - 1) * s + 1 for n, s in zip(sizes, strides)])
    term = window[(slice(None),) + tuple(slice(None, None, s) for s in strides)] * delta
    return jnp.transpose(term[:, None], tuple(np.argsort(out)))


def _sparse_cap(op: interpret.Op, mode: dict[int, str], faulted: set[int], cap: int) -> int:
    """Most changed input features for which ``op``, a matmul of a trial
    value with a golden or correctable faulted weight, is cheaper
    as an update of its golden result (``_sparse_update``) than recomputed;
    0 if it is not such an op."""
    # Not convolutions: XLA:CPU runs one with a few input channels nearly as
    # slowly as the whole one (ResNet-8's weight trials lost a third).
    if not _linear(op) or op.eqn.primitive.name != "dot_general":
        return 0
    x, w = op.ins
    if not (isinstance(x, int) and mode.get(x) == "full" and isinstance(w, int)):
        return 0
    if w in mode and not (w in faulted and _weight_correctable(op, cap)):
        return 0
    # Beyond an eighth of the features the update costs about as much as the op.
    return _shape(op.eqn.invars[0])[-1] // 8


def _sparse_update(eqn: jex.JaxprEqn, golden: jax.Array, golden_x: jax.Array, x: jax.Array,
                   w: jax.Array, cap: int, changes: Changes | None) -> jax.Array:
    """The matmul ``eqn`` on ``x`` and the golden weight ``w`` with ``changes`` (None: none).

    ``x W' = x_g W' + (x - x_g) W'``: the first term is ``golden`` corrected
    for the changed weights, the second runs on the input features where
    ``x`` differs from ``golden_x`` (bits), at most ``cap`` of them; with more,
    the op is recomputed. Far less work than recomputing, rounded differently.
    """
    axis, w_axis = x.ndim - 1, 0
    others = tuple(range(axis))
    changed = jnp.any(bits_lib.to_bits(x) != bits_lib.to_bits(golden_x), axis=others)
    count = jnp.sum(changed)
    features = jnp.nonzero(changed, size=cap, fill_value=changed.shape[0])[0]

    def corrected(y: jax.Array, at: jax.Array) -> jax.Array:
        return y if changes is None else _correction(eqn, y, at, changes)

    def update() -> jax.Array:
        new = jnp.take(x, features, axis=axis, mode="fill", fill_value=0)
        old = jnp.take(golden_x, features, axis=axis, mode="fill", fill_value=0)
        # Unchanged values give exactly 0 (x - x would be NaN for an infinite one).
        delta = jnp.where(bits_lib.to_bits(new) == bits_lib.to_bits(old), jnp.zeros_like(new), new - old)
        rows = jnp.take(w, features, axis=w_axis, mode="fill", fill_value=0)
        if changes is not None:
            rows = _changed_rows(rows, w.shape, w_axis, features, changes)
        term = interpret.bind(eqn, [delta, rows])[0]
        return corrected(golden, golden_x) + term.astype(golden.dtype)

    def recompute() -> jax.Array:
        return corrected(interpret.bind(eqn, [x, w])[0], x)

    return lax.cond(count == 0, lambda: corrected(golden, golden_x),
                    lambda: lax.cond(count <= cap, update, recompute))


def _changed_rows(rows: jax.Array, w_shape: tuple[int, ...], w_axis: int, features: jax.Array,
                  changes: Changes) -> jax.Array:
    """``rows``, the golden weight's slices at ``features`` along ``w_axis``,
    with the changed weights that fall in them."""
    coords = list(jnp.unravel_index(changes.index, w_shape))
    match = features[None, :] == coords[w_axis][:, None]
    coords[w_axis] = jnp.argmax(match, axis=1)
    inside = changes.valid & jnp.any(match, axis=1)
    coords = [jnp.where(inside, c, n) for c, n in zip(coords, rows.shape)]
    return rows.at[tuple(coords)].add(changes.delta.astype(rows.dtype), mode="drop")


def _golden_where_same(computed: jax.Array, golden: jax.Array, x: jax.Array, golden_x: jax.Array) -> jax.Array:
    """``computed`` rows, but ``golden``'s where the row of ``x`` equals ``golden_x``'s
    bit for bit: a row the fault did not reach keeps the golden bits, not
    those of a kernel that rounds one row differently than the batch."""
    same = jnp.all((bits_lib.to_bits(x) == bits_lib.to_bits(golden_x)).reshape(x.shape[0], -1), axis=1)
    return jnp.where(same.reshape((-1,) + (1,) * (computed.ndim - 1)), golden, computed)


def _value_of(site: Site, raw: jax.Array) -> jax.Array:
    """A site's values from the raw bits in a record (widened to 32 or 64 bits)."""
    return bits_lib.from_bits(raw.astype(site.format.uint), site.dtype)


def _rows_recipe(op: interpret.Op, sliced: tuple[bool, ...], mode: dict[int, str]) -> _Recipe:
    """Operands of ``op`` run on the trial's rows: its own rows, or the golden value's."""
    return tuple("literal" if not isinstance(x, int) else "own" if x in mode else "take" if s else "golden"
                 for x, s in zip(op.ins, sliced))


def _full_recipe(op: interpret.Op, mode: dict[int, str], doubled: set[int]) -> _Recipe:
    """Operands of ``op`` run on the whole batch: its own whole values, its own
    rows written into the golden values, or the golden values."""
    return tuple(_output_recipe(x, mode, doubled) for x in op.ins)


def _output_recipe(x: Any, mode: dict[int, str], doubled: set[int]) -> str:
    if not isinstance(x, int):
        return "literal"
    if mode.get(x) == "rows":
        return "full_of" if x in doubled else "splice"
    return "own" if x in mode else "golden"


def _operand(x: Any, recipe: str, own: dict, gold: dict, rows: jax.Array) -> Any:
    if recipe == "literal":
        return x.val
    if recipe == "take":
        return take_rows(gold[x], rows)
    if recipe == "splice":
        return put_rows(gold[x], rows, own[x])
    return own[x] if recipe in ("own", "full_of") else gold[x]


def _inexact(x: Any) -> bool:
    return jnp.issubdtype(x.dtype, jnp.inexact)


def _value(env: dict, x: Any) -> Any:
    return env[x] if isinstance(x, int) else x.val


def _bind(op: interpret.Op, args: Sequence[Any], params: dict[str, Any], env: dict) -> None:
    env.update((o, v) for o, v in zip(op.outs, interpret.bind(op.eqn, args, params)) if o is not None)


def param_leaves(params: Any) -> list[Any]:
    """The array leaves of a params pytree, in the order of ``param_sites``."""
    return [x for x in jax.tree.leaves(params) if hasattr(x, "dtype")]
