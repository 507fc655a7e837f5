"""Fault-aware training: every optimiser step runs its forward pass under a fresh fault trial.

``fault_aware_step(loss_fn, optimizer, *plans)`` returns a jitted
``step(state, batch, key) -> (state, info)``. Step ``t`` draws its faults from
``fold_in(key, t)`` (``t`` is ``state.step``), so pass the same base key every
step and each step still sees new faults; replaying a step replays its faults.

What gets faulted: ``loss_fn(params, batch, model_state)`` is wrapped by
``jaxfi.faulty``, so params plans corrupt a copy of the params, inputs plans
the batch (``arg1/...``) and model state (``arg2/...``), activations plans the
intermediate values. The clean params are what the optimiser updates.

Gradients: the update is the derivative of the faulty loss with respect to the
clean params. Every weight that was not hit receives ``dL/dw`` evaluated on the
faulty forward pass (straight-through: the faulty copy is the clean value
there). A hit weight receives zero for that step: its faulty value does not
depend on its clean value, and a gradient taken at, say, a flipped exponent
says nothing useful about the clean weight. Likewise a faulted activation value
is a constant, so no gradient flows back through the faulted elements (their
neighbours at the same site pass gradients unchanged).

A fault can make the loss or the gradients non-finite (an exponent flip to inf
or NaN). Such a step is skipped: params, optimiser and model state stay as they
were, ``info.applied`` is False, and the step counter still advances so the
next step draws new faults.

``train_step`` is the one training step with faults: fault-aware training
runs it with the faulty forward's gradients and skips non-finite updates;
training-fault campaigns (``jaxfi.TrainingCampaign``) run it with faults in
forward and backward values or in the stored state, and apply every update.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from jaxfi._src.inject import Record
from jaxfi._src.plan import Plan
from jaxfi._src.trial import faulty

LossFn = Callable[[Any, Any, Any], tuple[jax.Array, Any]]


class Optimizer(Protocol):
    """What a step needs of an optimiser: an ``optax.GradientTransformation`` has it.

    jaxfi's core does not depend on optax; any object with these two methods works.
    """

    def init(self, params: Any) -> Any:
        """The optimiser state for ``params``."""

    def update(self, updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        """(updates, new state) from gradients ``updates``."""


class TrainState(NamedTuple):
    """Trainable ``params``, ``opt_state``, non-trainable ``model_state`` (e.g.
    BatchNorm statistics, ``()`` if none) and the ``step`` counter."""

    params: Any
    opt_state: Any
    model_state: Any
    step: jax.Array


class StepInfo(NamedTuple):
    """One step: the faulty forward's ``loss``, whether the update was ``applied``
    (False: non-finite loss or gradient, step skipped) and one ``Record`` per plan."""

    loss: jax.Array
    applied: jax.Array
    records: tuple[Record, ...]


def init_state(params: Any, optimizer: Optimizer, model_state: Any = ()) -> TrainState:
    """The state before step 0.

    Args:
      params: the trainable parameters.
      optimizer: an ``optax.GradientTransformation`` (or any ``Optimizer``).
      model_state: non-trainable collections such as BatchNorm statistics.

    Returns:
      A ``TrainState`` at step 0.
    """
    return TrainState(params, optimizer.init(params), model_state, jnp.zeros((), jnp.int32))


def fault_aware_step(loss_fn: LossFn, optimizer: Optimizer,
                     *plans: Plan) -> Callable[[TrainState, Any, jax.Array], tuple[TrainState, StepInfo]]:
    """A jitted ``step(state, batch, key) -> (state, info)`` that trains under ``plans``' faults.

    With no plans (or plans that place no fault: ``count=0``, ``ber=0.0``) the
    step is bitwise the plain optax step. See the module notes for the gradients.

    Args:
      loss_fn: ``loss_fn(params, batch, model_state) -> (loss, new_model_state)``.
      optimizer: an ``optax.GradientTransformation`` (or any ``Optimizer``).
      *plans: the fault plans every step's forward pass runs under.

    Returns:
      The jitted step function.
    """
    forward = faulty(loss_fn, *plans) if plans else _fault_free(loss_fn)

    def step(state: TrainState, batch: Any, key: jax.Array) -> tuple[TrainState, StepInfo]:
        out = train_step(_forward_faults(forward, jax.random.fold_in(key, state.step)), optimizer,
                         state.params, state.opt_state, state.model_state, batch, skip_non_finite=True)
        return (TrainState(out.params, out.opt_state, out.model_state, state.step + 1),
                StepInfo(out.loss, out.applied, out.records))

    return jax.jit(step)


# What a training step needs of its loss: ``(params, batch, model_state) -> ((loss, new
# model_state), grads, records)``, the gradients being those the optimizer applies.
ValueAndGrad = Callable[[Any, Any, Any], tuple[tuple[jax.Array, Any], Any, tuple[Record, ...]]]


class Stepped(NamedTuple):
    """A step's new ``params``, ``opt_state`` and ``model_state``, its ``loss`` and
    ``grads``, whether the update was ``applied`` and the faults' ``records``."""

    params: Any
    opt_state: Any
    model_state: Any
    loss: jax.Array
    grads: Any
    applied: jax.Array
    records: tuple[Record, ...]


def train_step(value_and_grad: ValueAndGrad, optimizer: Optimizer, params: Any, opt_state: Any,
               model_state: Any, batch: Any, *, skip_non_finite: bool) -> Stepped:
    """One optimizer step with faults: the step of fault-aware training and of training-fault campaigns.

    Args:
      value_and_grad: the (faulty) loss and gradients of ``params`` on ``batch``.
      optimizer: an ``optax.GradientTransformation`` (or any ``Optimizer``).
      params: the parameters before the step.
      opt_state: the optimizer state before the step.
      model_state: non-trainable state (``()`` if none).
      batch: the step's batch.
      skip_non_finite: keep params, optimizer and model state when the loss or
        a gradient is not finite (fault-aware training); False: apply every
        update (a campaign follows what the fault does).

    Returns:
      The new state, loss, gradients, ``applied`` and records.
    """
    (loss, new_model_state), grads, records = value_and_grad(params, batch, model_state)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new = (apply_updates(params, updates), new_opt_state, new_model_state)
    if not skip_non_finite:
        return Stepped(*new, loss, grads, jnp.asarray(True), records)
    applied = jnp.isfinite(loss) & _all_finite(grads)
    # cond, not jnp.where: a select fuses with the ops that compute the new
    # state and changes their rounding (BatchNorm running means), so the
    # fault-free step would no longer be bitwise the plain one.
    kept = jax.lax.cond(applied, lambda: new, lambda: (params, opt_state, model_state))
    return Stepped(*kept, loss, grads, applied, records)


def _forward_faults(forward: Callable[..., Any], key: jax.Array) -> ValueAndGrad:
    """Gradients of ``forward``'s faulty loss (``faulty``'s calling convention) at the clean params."""
    def value_and_grad(params: Any, batch: Any, model_state: Any):
        def objective(params: Any) -> tuple[jax.Array, tuple[Any, tuple[Record, ...]]]:
            (loss, new_model_state), records = forward(key, params, batch, model_state)
            return loss, (new_model_state, records)

        (loss, (new_model_state, records)), grads = jax.value_and_grad(objective, has_aux=True)(params)
        return (loss, new_model_state), grads, records

    return value_and_grad


def _fault_free(loss_fn: LossFn) -> Callable[..., Any]:
    """``loss_fn`` in ``faulty``'s calling convention, with no plans and no records."""
    return lambda key, *args: (loss_fn(*args), ())


def apply_updates(params: Any, updates: Any) -> Any:
    """``params + updates`` in each leaf's dtype, as ``optax.apply_updates`` computes it."""
    return jax.tree.map(lambda p, u: jnp.asarray(p + u).astype(jnp.asarray(p).dtype), params, updates)


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)
