"""Batch-invariant vmap: per-trial arithmetic that does not depend on the batch.

``jax.vmap`` is free to change floating-point results: XLA:CPU compiles a
batched program with other shapes, layouts and fusions, and measured on this
machine (jax 0.10.2) that changes the last bits of

* ``x @ W`` with only ``W`` batched: vmap folds the trials into the output
  features, one wider matmul whose blocking (hence summation order) depends on
  the number of trials;
* convolutions with a batched kernel (a grouped convolution) or batched input
  and kernel;
* floating-point sums (``reduce_sum``, pooling sums, cumulative sums) of
  batched operands, even at batch size 1;

so trial ``i`` computed in a chunk of 7 differed from the same trial in a chunk
of 64 or alone. ``batch_invariant(fn, *example)`` re-evaluates ``fn``'s jaxpr
and gives those primitives a batching rule whose per-trial arithmetic is the
unbatched one:

* ``dot_general``: every operand is broadcast to the batch and the product
  becomes a true batched matmul (batch dimensions); XLA:CPU gave each batch
  member the unbatched matmul's bits for every shape tried;
* convolutions and float reductions: evaluated trial by trial with
  ``lax.map`` at the unbatched shape.

Everything else keeps JAX's own batching rule. That is not a proof: XLA:CPU's
elementwise code for some transcendental functions also depends on the fused
shape (``erf(a - b)`` with a broadcast ``b`` differed in 26 of 17,920 values),
so executors check their first trials against the unbatched reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex

from jaxfi._src.calls import INLINE, sub_jaxprs

_MATMUL = "dot_general"
_PER_TRIAL = frozenset({"conv_general_dilated"})
_FLOAT_REDUCTIONS = frozenset({
    "reduce_sum", "reduce_prod", "reduce_window_sum", "cumsum", "cumprod", "cumlogsumexp",
})


def batch_invariant(fn: Callable[..., Any], *example: Any) -> Callable[..., Any]:
    """``fn`` (traced at ``example``'s shapes) with batch-invariant batching rules.

    Unbatched, the result equals ``fn``; under ``jax.vmap``, matmuls,
    convolutions and float reductions compute each trial as if it were alone.
    """
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*example)
    out_tree = jax.tree.structure(out_shape)

    def rewritten(*args: Any) -> Any:
        leaves = jax.tree.leaves(args)
        return jax.tree.unflatten(out_tree, _evaluate(closed.jaxpr, closed.consts, leaves))

    return rewritten


def _needs_rule(eqn: jex.JaxprEqn) -> bool:
    """Whether vmap's own rule for this equation may change per-trial bits."""
    name = eqn.primitive.name
    if name == _MATMUL or name in _PER_TRIAL:
        return True
    return name in _FLOAT_REDUCTIONS and any(
        jnp.issubdtype(v.aval.dtype, jnp.inexact) for v in eqn.invars)


def _contains_rule(jaxpr: jex.Jaxpr) -> bool:
    """Whether ``jaxpr`` or any body nested in it has an equation needing a rule."""
    for eqn in jaxpr.eqns:
        if _needs_rule(eqn):
            return True
        if any(_contains_rule(sub) for sub in sub_jaxprs(eqn)):
            return True
    return False


def _read(env: dict, v: Any) -> Any:
    return v.val if isinstance(v, jex.Literal) else env[v]


def _evaluate(jaxpr: jex.Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """Evaluate ``jaxpr`` equation by equation, giving rules where they are needed."""
    env: dict = {}
    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        outs = _equation(eqn, [_read(env, v) for v in eqn.invars])
        if not eqn.primitive.multiple_results:
            outs = [outs]
        for var, value in zip(eqn.outvars, outs):
            if not isinstance(var, jex.DropVar):
                env[var] = value
    return [_read(env, v) for v in jaxpr.outvars]


def _equation(eqn: jex.JaxprEqn, ins: list[Any]) -> Any:
    """One equation: call bodies inlined, ruled primitives wrapped, the rest re-bound."""
    prim = eqn.primitive
    if prim in INLINE:
        body = eqn.params[INLINE[prim]]
        if isinstance(body, jex.ClosedJaxpr):
            return _evaluate(body.jaxpr, body.consts, ins)
        return _evaluate(body, (), ins)
    if _needs_rule(eqn):
        return _with_rule(prim, eqn.params)(*ins)
    if any(_contains_rule(sub) for sub in sub_jaxprs(eqn)):
        return prim.bind(*ins, **_rewritten_params(eqn.params))
    return prim.bind(*ins, **eqn.params)


def _rewritten_params(params: dict[str, Any]) -> dict[str, Any]:
    """Control-flow bodies (scan, while, cond) with their rules rewritten too."""
    def rewrite(value: Any) -> Any:
        if isinstance(value, tuple):
            return tuple(rewrite(v) for v in value)
        if isinstance(value, jex.ClosedJaxpr) and _contains_rule(value.jaxpr):
            return _rewrite_closed(value)
        return value
    return {name: rewrite(value) for name, value in params.items()}


def _rewrite_closed(closed: jex.ClosedJaxpr) -> jex.ClosedJaxpr:
    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype, weak_type=v.aval.weak_type)
             for v in closed.jaxpr.invars]
    return jax.make_jaxpr(lambda *a: _evaluate(closed.jaxpr, closed.consts, a))(*avals)


def _with_rule(prim: jex.Primitive, params: dict[str, Any]) -> Callable[..., Any]:
    """``prim`` bound with ``params``, batched so that each trial computes alone."""
    def op(*xs: Any) -> Any:
        return prim.bind(*xs, **params)

    wrapped = jax.custom_batching.custom_vmap(op)

    @wrapped.def_vmap
    def rule(axis_size: int, in_batched: Sequence[bool], *xs: Any):
        if prim.name == _MATMUL:
            full = [x if b else jnp.broadcast_to(x, (axis_size, *np.shape(x)))
                    for x, b in zip(xs, in_batched)]
            return jax.vmap(op)(*full), True
        return _one_by_one(op, xs, in_batched), True

    return wrapped


def _one_by_one(op: Callable[..., Any], xs: Sequence[Any], in_batched: Sequence[bool]) -> Any:
    """``op`` per trial with ``lax.map``: the unbatched program, once per trial."""
    batched = [x for x, b in zip(xs, in_batched) if b]

    def one(slices: list[Any]) -> Any:
        it = iter(slices)
        return op(*[next(it) if b else x for x, b in zip(xs, in_batched)])

    return lax.map(one, batched)
