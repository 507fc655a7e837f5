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
from jax.extend.core import primitives as prims

from jaxfi._src import interpret

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
    program = interpret.build(closed, jax.tree.structure(out_shape))

    def rewritten(*args: Any) -> Any:
        return interpret.run(program, jax.tree.leaves(args), RULES)

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
    return any(_needs_rule(eqn) or any(_contains_rule(body) for _, body, _ in interpret.bodies(eqn))
               for eqn in jaxpr.eqns)


def _invariant_rule(eqn: jex.JaxprEqn, args: list[Any]) -> list[Any]:
    """A ruled primitive bound so that each trial computes alone under vmap."""
    if not _needs_rule(eqn):  # an integer reduction: vmap's rule is exact
        return interpret.bind(eqn, args)
    out = _with_rule(eqn)(*args)
    return list(out) if eqn.primitive.multiple_results else [out]


def _control_flow_rule(eqn: jex.JaxprEqn, args: list[Any]) -> list[Any]:
    """scan/while/cond with the ruled equations of their bodies rewritten too."""
    return interpret.bind(eqn, args, _rewritten_params(eqn.params))


def _rewritten_params(params: dict[str, Any]) -> dict[str, Any]:
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
    program = interpret.build(closed, None)
    return jax.make_jaxpr(lambda *a: interpret.evaluate(program.graph, a, RULES))(*avals)


def _with_rule(eqn: jex.JaxprEqn) -> Callable[..., Any]:
    """``eqn``'s primitive bound with its params, batched so that each trial computes alone."""
    def op(*xs: Any) -> Any:
        out = interpret.bind(eqn, xs)
        return out if eqn.primitive.multiple_results else out[0]

    wrapped = jax.custom_batching.custom_vmap(op)

    @wrapped.def_vmap
    def rule(axis_size: int, in_batched: Sequence[bool], *xs: Any):
        if eqn.primitive.name == _MATMUL:
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


# The rule table: batch-invariant rules for the primitives whose batching may
# change per-trial bits, rewritten bodies for control flow; call bodies are
# always evaluated equation by equation so that their equations get rules too.
RULES = interpret.Rules(
    table={
        prims.dot_general_p: _invariant_rule,
        prims.conv_general_dilated_p: _invariant_rule,
        prims.reduce_sum_p: _invariant_rule,
        prims.reduce_prod_p: _invariant_rule,
        prims.reduce_window_sum_p: _invariant_rule,
        prims.cumsum_p: _invariant_rule,
        prims.cumprod_p: _invariant_rule,
        prims.cumlogsumexp_p: _invariant_rule,
        prims.scan_p: _control_flow_rule,
        prims.while_p: _control_flow_rule,
        prims.cond_p: _control_flow_rule,
    },
    descend=lambda node: True)
