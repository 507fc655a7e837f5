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
from jax.extend import core as jex
from jax.extend.core import primitives as prims

_INLINE = {
    prims.jit_p: "jaxpr",
    prims.closed_call_p: "call_jaxpr",
    prims.call_p: "call_jaxpr",
    prims.custom_jvp_call_p: "call_jaxpr",
    prims.custom_vjp_call_p: "call_jaxpr",
    prims.remat_p: "jaxpr",
}


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
            body = eqn.params.get(_INLINE.get(eqn.primitive, ""))
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


def split(fn: Callable[[Any, Any], Any], params: Any, inputs: Any, faulted: Sequence[int]) -> Split:
    """Split ``fn(params, inputs)`` at the params leaves numbered ``faulted``."""
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
    needed = {x for op in late for x in op.ins if isinstance(x, int) and x not in unknown}
    needed |= {x for x in flat.outputs if isinstance(x, int) and x not in unknown}
    residual_ids = sorted(needed - set(flat.consts))
    faulted_ids = [flat.inputs[i] for i in faulted]
    out_tree = jax.tree.structure(jax.eval_shape(fn, params, inputs))

    def prefix(p: Any, x: Any) -> list[Any]:
        env = dict(flat.consts)
        env.update(zip(flat.inputs, jax.tree.leaves(p) + jax.tree.leaves(x)))
        _run(early, env)
        return [env[i] for i in residual_ids]

    def suffix(residuals: Sequence[Any], leaves: Sequence[Any]) -> Any:
        env = dict(flat.consts)
        env.update(zip(residual_ids, residuals))
        env.update(zip(faulted_ids, leaves))
        _run(late, env)
        return jax.tree.unflatten(out_tree, [_read(env, x) for x in flat.outputs])

    return Split(prefix, suffix, tuple(faulted))
