"""Splitting a program at the parameters a fault can reach.

``split(fn, params, inputs, faulted)`` traces ``fn(params, inputs)``, inlines
call primitives, and divides its equations into a *prefix* that does not
depend on the faulted params leaves and a *suffix* that does. The prefix is
computed once (on golden params); its values read by the suffix (the
residuals) are passed to the suffix, which each trial evaluates on its own
faulty leaves. Both halves re-bind the program's own primitives with their
own parameters, so a trial sees the same operations on the same values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jex

from jaxfi._src.calls import INLINE



@dataclasses.dataclass(frozen=True)
class _Op:
    """One equation with its operands as integer value ids (or literals)."""

    eqn: jex.JaxprEqn
    ins: tuple[Any, ...]
    outs: tuple[int, ...]


class _Flat:
    """A jaxpr flattened into ``_Op``s over integer ids, call primitives inlined."""

    def __init__(self, closed: jex.ClosedJaxpr):
        self.ops: list[_Op] = []
        self.consts: dict[int, Any] = {}
        self._next = 0
        const_ids = self._fresh(len(closed.jaxpr.constvars))
        self.consts = dict(zip(const_ids, closed.consts))
        self.inputs = self._fresh(len(closed.jaxpr.invars))
        env = dict(zip(closed.jaxpr.constvars, const_ids)) | dict(zip(closed.jaxpr.invars, self.inputs))
        self.outputs = self._walk(closed.jaxpr, env)

    def _fresh(self, n: int) -> list[int]:
        ids = list(range(self._next, self._next + n))
        self._next += n
        return ids

    def _operand(self, env: dict, v: Any) -> Any:
        return env[v] if isinstance(v, jex.Var) else v

    def _walk(self, jaxpr: jex.Jaxpr, env: dict) -> list[Any]:
        for eqn in jaxpr.eqns:
            ins = [self._operand(env, v) for v in eqn.invars]
            body = eqn.params.get(INLINE.get(eqn.primitive, ""))
            if body is not None:
                inner, consts = (body.jaxpr, body.consts) if isinstance(body, jex.ClosedJaxpr) else (body, ())
                const_ids = self._fresh(len(consts))
                self.consts.update(zip(const_ids, consts))
                sub = dict(zip(inner.constvars, const_ids)) | dict(zip(inner.invars, ins))
                outs = self._walk(inner, sub)
            else:
                outs = self._fresh(len(eqn.outvars))
                self.ops.append(_Op(eqn, tuple(ins), tuple(outs)))
            env.update((v, o) for v, o in zip(eqn.outvars, outs) if isinstance(v, jex.Var))
        return [self._operand(env, v) for v in jaxpr.outvars]


def _read(env: dict, x: Any) -> Any:
    return env[x] if isinstance(x, int) else x.val


def _run(ops: Sequence[_Op], env: dict) -> None:
    for op in ops:
        out = op.eqn.primitive.bind(*(_read(env, x) for x in op.ins), **op.eqn.params)
        outs = out if op.eqn.primitive.multiple_results else (out,)
        env.update(zip(op.outs, outs))


def _is_dense(op: _Op, faulted_ids: set[int], unknown: set[int]) -> bool:
    """A ``x @ W`` dot with W a faulted 2-D leaf and x unaffected by faults."""
    if op.eqn.primitive.name != "dot_general" or len(op.ins) != 2:
        return False
    x, w = op.ins
    (contract, batch) = op.eqn.params["dimension_numbers"]
    x_rank = len(op.eqn.invars[0].aval.shape)
    return (isinstance(w, int) and w in faulted_ids and len(op.eqn.invars[1].aval.shape) == 2
            and isinstance(x, int) and x not in unknown
            and contract == ((x_rank - 1,), (0,)) and batch == ((), ()))


def _sparse_dot(golden: Any, x: Any, w_golden: Any, w_faulty: Any, cap: int) -> Any:
    """``x @ w_faulty`` as ``golden`` plus the terms of the (at most ``cap``) changed weights."""
    changed = (jax.lax.bitcast_convert_type(w_faulty, _uint(w_faulty))
               != jax.lax.bitcast_convert_type(w_golden, _uint(w_golden))).reshape(-1)
    index = jnp.nonzero(changed, size=cap, fill_value=0)[0]
    delta = jnp.where(changed[index], w_faulty.reshape(-1)[index] - w_golden.reshape(-1)[index], 0)
    rows, cols = jnp.divmod(index, w_golden.shape[1])
    terms = x[..., rows] * delta.astype(x.dtype)
    return golden.at[..., cols].add(terms.astype(golden.dtype))


def _uint(x: Any) -> Any:
    return {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[x.dtype.itemsize]


@dataclasses.dataclass(frozen=True)
class Split:
    """The two halves of a program split at its faulted params leaves.

    ``prefix(params, inputs) -> residuals`` runs once on golden values;
    ``suffix(residuals, leaves) -> output`` runs per trial on the faulted
    leaves (in the order of ``faulted``).
    """

    prefix: Callable[[Any, Any], list[Any]]
    suffix: Callable[[Sequence[Any], Sequence[Any]], Any]
    faulted: tuple[int, ...]


def split(fn: Callable[[Any, Any], Any], params: Any, inputs: Any, faulted: Sequence[int],
          sparse: int = 0) -> Split:
    """Split ``fn(params, inputs)`` at the params leaves numbered ``faulted``.

    ``sparse`` > 0: a dense layer ``x @ W`` whose W is faulted (and x is not)
    is evaluated as the golden product plus the terms of at most ``sparse``
    changed weights, instead of the full product with the faulty W. This is
    much cheaper and not bitwise equal (the sum is rounded differently).
    """
    n_params = len(jax.tree.leaves(params))
    if any(not 0 <= i < n_params for i in faulted):
        raise ValueError(f"faulted leaf numbers {list(faulted)} outside the {n_params} params leaves")
    flat = _Flat(jax.make_jaxpr(fn)(params, inputs))
    unknown = {flat.inputs[i] for i in faulted}
    for op in flat.ops:
        if any(isinstance(x, int) and x in unknown for x in op.ins):
            unknown.update(op.outs)
    late = [op for op in flat.ops if op.outs and op.outs[0] in unknown]
    early = [op for op in flat.ops if not (op.outs and op.outs[0] in unknown)]
    faulted_ids = [flat.inputs[i] for i in faulted]
    dense = {op.outs[0]: op for op in late if sparse and _is_dense(op, set(faulted_ids), unknown)}
    needed = {x for op in late for x in op.ins if isinstance(x, int) and x not in unknown}
    needed |= {x for x in flat.outputs if isinstance(x, int) and x not in unknown}
    # Golden products and weights of sparse dense layers are residuals too.
    golden_of = {out: flat._fresh(1)[0] for out in dense}
    early += [_Op(op.eqn, op.ins, (golden_of[out],)) for out, op in dense.items()]
    needed |= set(golden_of.values()) | {op.ins[1] for op in dense.values()}
    residual_ids = sorted(needed - set(flat.consts))
    out_tree = jax.tree.structure(jax.eval_shape(fn, params, inputs))

    def prefix(p: Any, x: Any) -> list[Any]:
        env = dict(flat.consts)
        env.update(zip(flat.inputs, jax.tree.leaves(p) + jax.tree.leaves(x)))
        _run(early, env)
        return [env[i] for i in residual_ids]

    def suffix(residuals: Sequence[Any], leaves: Sequence[Any]) -> Any:
        env = dict(flat.consts)
        env.update(zip(residual_ids, residuals))
        golden_w = {w: env[w] for w in (op.ins[1] for op in dense.values())}
        env.update(zip(faulted_ids, leaves))
        for op in late:
            if op.outs[0] in dense:
                x, w = op.ins
                env[op.outs[0]] = _sparse_dot(env[golden_of[op.outs[0]]], env[x], golden_w[w], env[w], sparse)
            else:
                _run([op], env)
        return jax.tree.unflatten(out_tree, [_read(env, x) for x in flat.outputs])

    return Split(prefix, suffix, tuple(faulted))
