"""Faults during training: campaigns of faulty training runs, their outcomes and a detector.

Sites of a training step, named by what they are:

* ``forward/{scope}/{primitive}:{k}``: values of the forward pass (``scope``
  is the module path, e.g. ``forward/MLP/fc1/dot_general:0``);
* ``backward/{scope}/{primitive}:{k}``: values of the backward pass, i.e.
  cotangents (gradients of activations and of weights) computed by JAX's
  transpose of that module (``backward/MLP/fc1/dot_general:0``);
* ``weights/{path}``: the parameter leaves (``weights/fc1/kernel``);
* ``optimizer/{path}``: the optimizer state leaves, tuple indices dropped
  where the name stays unique (``optimizer/mu/fc1/kernel``, ``optimizer/count``).

Values inside a loop or branch body are sites too: with layers under
``nn.scan`` (``jaxfi.models.transformer``) a block's values are
``forward/Transformer/scan:0/jaxpr/layers/...`` and their cotangents, computed
by the transposed (reverse) scan, ``backward/Transformer/scan:0/jaxpr/layers/...``;
their leading axis is the iteration, i.e. the layer. Values in a while body
need ``Activations(..., iterations=N)``, as for any activation site.

Select them with ordinary plans: ``Activations(name=...)`` matches forward
and backward names, ``Params(name=...)`` weights and optimizer names. A forward
or backward fault is transient (one step's value); a weights or optimizer
fault changes the stored state, which training then carries on from.

``TrainingCampaign`` runs trials of ``steps`` optimizer steps from a start
state on a fixed batch sequence (step ``t`` always sees ``batches[t]``, so the
golden run is the fault-free trial). Trial ``i`` draws its fault step ``s``
uniformly from ``fault_steps`` and its faults from its key, exactly as any
campaign (``trial_key(base, i)``). The work a fault cannot change is done once:

* the golden run is computed once, keeping its state before every step from
  ``fault_steps[0]`` on; a trial starts from the golden state before step ``s``;
* a trial whose state becomes bit-identical to the golden state stops (it
  would repeat the golden run bit for bit), as does one whose loss is not
  finite (the run has failed); its curve is completed from the golden run or
  with NaN.

Trials run as one compiled program per chunk (``lax.map`` over trials of a
``lax.scan`` over steps), or with ``executor="loop"`` as a Python loop over
the same jitted steps. Each executor compares its trials with the golden run
its own programs compute (XLA:CPU may round a step alone differently from the
same step in a loop), and every run checks that the golden trial computed by
that program ends bit-identical to that golden run, so "bit-identical to
golden" is never an artefact of two programs rounding differently.
``TrainingCampaign.independent`` runs a trial as an independent training run
from step 0, the reference the tests compare with bit for bit.
Every step is ``fault_aware.train_step``, the step fault-aware training takes,
with every update applied.
"""

from __future__ import annotations

import dataclasses
import functools
import platform
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import pandas as pd

from jaxfi._src import activations, identity
from jaxfi._src import stats as stats_lib
from jaxfi._src.fault_aware import Optimizer, ValueAndGrad, train_step
from jaxfi._src.inject import Record, inject_arrays
from jaxfi._src.plan import Plan
from jaxfi._src.sites import Activations, Selector, Site, path_name
from jaxfi._src.store import Store
from jaxfi._src.trial import GOLDEN_INDEX, plan_key, same_bits, trial_key
from jaxfi._src.version import __version__

KINDS = ("forward", "backward", "weights", "optimizer")
TRAINING_OUTCOMES = ("masked", "immediate_inf_nan", "slow_degrade", "recovered")

# An equation's scope under value_and_grad: "jvp(MLP)/fc1" forward, "transpose(jvp(MLP))/fc1" backward.
_BACKWARD = re.compile(r"^transpose\(jvp\(([^()]*)\)\)(?:/|$)")
_FORWARD = re.compile(r"^jvp\(([^()]*)\)(?:/|$)")
# Bodies whose values the interpreter can hook ("": outside any body).
_BODIES = ("", "scan", "while", "cond")

LossFn = Callable[[Any, Any], jax.Array]
MetricFn = Callable[[Any], jax.Array]


# ----------------------------------------------------------------------------
# Sites.


def readable_name(raw: str) -> str | None:
    """The training-site name of a value of a ``value_and_grad`` step, or None.

    Args:
      raw: an activation site name of the traced step, e.g. ``transpose(jvp(MLP))/fc1/dot_general:0``.

    Returns:
      ``forward/...`` or ``backward/...`` (``backward/MLP/fc1/dot_general:0``);
      None for values outside both passes.
    """
    for kind, pattern in (("backward", _BACKWARD), ("forward", _FORWARD)):
        match = pattern.match(raw)
        if match:
            rest = raw[match.end():]
            return "/".join(p for p in (kind, match[1], rest) if p)
    return None


def _renamed(site: activations.ActivationSite) -> activations.ActivationSite | None:
    name = readable_name(site.name)
    return None if name is None else dataclasses.replace(site, name=name)


def _hookable(site: Site) -> bool:
    """Whether a value can be faulted: outside bodies, or in a loop or branch body (a scan over
    layers, forward and transposed), not in another primitive's body (a scatter's update)."""
    return getattr(site, "control_flow", "") in _BODIES


@dataclasses.dataclass(frozen=True)
class _OnReadable:
    """A ``where`` predicate: the user's selector applied to a site under its training name."""

    selector: Selector

    def __call__(self, site: Site) -> bool:
        renamed = _renamed(site) if _hookable(site) else None
        return renamed is not None and self.selector.matches(renamed)


def _step_plan(plan: Plan) -> Plan:
    """An activations plan over training names, as a plan over the traced step's own names."""
    sites = Activations(dtype=plan.sites.dtype, where=_OnReadable(plan.sites),
                        iterations=getattr(plan.sites, "iterations", None))
    return dataclasses.replace(plan, sites=sites)


def _grad_fn(loss_fn: LossFn) -> Callable[[Any, Any], tuple[jax.Array, Any]]:
    return lambda params, batch: jax.value_and_grad(loss_fn)(params, batch)


def _short_names(paths: Sequence[str]) -> list[str]:
    """Paths without purely numeric parts (tuple indices), unless that makes two alike."""
    short = ["/".join(p for p in path.split("/") if not p.isdigit()) for path in paths]
    return short if len(set(short)) == len(short) else list(paths)


def state_sites(params: Any, opt_state: Any) -> list[Site]:
    """The ``weights/...`` and ``optimizer/...`` sites (kind "params"), in flattening order."""
    weights = [(path_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]]
    opt = [(path_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]
           if hasattr(x, "dtype")]
    names = ([f"weights/{n}" for n, _ in weights]
             + [f"optimizer/{n}" for n in _short_names([n for n, _ in opt])])
    return [Site("params", name, tuple(np.shape(x)), np.dtype(x.dtype))
            for name, (_, x) in zip(names, weights + opt)]


def _state_arrays(params: Any, opt_state: Any) -> list[jax.Array]:
    return jax.tree.leaves(params) + [x for x in jax.tree.leaves(opt_state) if hasattr(x, "dtype")]


def _state_from(arrays: Sequence[jax.Array], params: Any, opt_state: Any) -> tuple[Any, Any]:
    n = len(jax.tree.leaves(params))
    flat, treedef = jax.tree.flatten(opt_state)
    it = iter(arrays[n:])
    opt = [next(it) if hasattr(x, "dtype") else x for x in flat]
    return jax.tree.unflatten(jax.tree.structure(params), arrays[:n]), jax.tree.unflatten(treedef, opt)


def step_sites(loss_fn: LossFn, params: Any, batch: Any) -> list[activations.ActivationSite]:
    """The ``forward/...`` and ``backward/...`` sites of one ``value_and_grad`` step, in program order."""
    sites = activations.activation_sites(_grad_fn(loss_fn), params, batch)
    return [r for r in map(_renamed, sites) if r is not None]


def training_sites_table(loss_fn: LossFn, params: Any, opt_state: Any, batch: Any) -> pd.DataFrame:
    """Every site of a training step, one row each: kind, name, primitive, shape, dtype, values, bits, iterations.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar loss``.
      params: the parameters.
      opt_state: the optimizer state (``optimizer.init(params)``).
      batch: one batch.

    Returns:
      A table with ``kind`` in forward, backward, weights, optimizer and the
      names plans select. Values inside a scan body (e.g. layers under
      ``nn.scan``, forward and backward) have ``iterations`` > 0 and a
      leading iteration axis, as for any activation site; values in while
      and cond bodies are listed too.
    """
    acts = [s for s in step_sites(loss_fn, params, batch) if _hookable(s)]
    rows = [dict(kind=s.name.split("/")[0], name=s.name, primitive=s.primitive, shape=s.shape,
                 dtype=s.dtype.name, values=s.size, bits=s.bits, iterations=s.iterations) for s in acts]
    rows += [dict(kind=s.name.split("/")[0], name=s.name, primitive="", shape=s.shape,
                  dtype=s.dtype.name, values=s.size, bits=s.bits, iterations=0)
             for s in state_sites(params, opt_state)]
    return pd.DataFrame(rows, columns=["kind", "name", "primitive", "shape", "dtype", "values", "bits",
                                       "iterations"])


# ----------------------------------------------------------------------------
# One faulty step and the trial program.


class TrialOutput(NamedTuple):
    """One trial: its fault step, loss and gradient-norm curves ([steps]), final
    metric, whether the final state is bit-identical to golden, the step after
    which it stopped (-1: ran to the end) and one record per plan."""

    fault_step: jax.Array
    losses: jax.Array
    grad_norms: jax.Array
    metric: jax.Array
    identical: jax.Array
    stopped: jax.Array
    records: tuple[Record, ...]


def _global_norm(tree: Any) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _same(a: Any, b: Any) -> jax.Array:
    """Whether two pytrees of arrays are bit-identical (NaN payloads included)."""
    flags = [jnp.all(jax.lax.bitcast_convert_type(x, _uint(x.dtype)) == jax.lax.bitcast_convert_type(y, _uint(y.dtype)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
    return jnp.all(jnp.stack(flags))


def faulty_value_and_grad(loss_fn: LossFn, *plans: Plan) -> Callable[..., Any]:
    """``jax.value_and_grad(loss_fn)`` with faults in its forward and backward values.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar loss``.
      *plans: activations plans over training-site names (``forward/...``,
        ``backward/...``; see the module notes).

    Returns:
      ``g(keys, params, batch, live=None) -> ((loss, grads), records)``: ``keys``
      holds one key per plan (stacked), ``live`` (where False) drops every fault.
    """
    for p in plans:
        if not isinstance(p, Plan) or p.kind != "activations":
            raise ValueError(f"faulty_value_and_grad takes activations plans (forward/..., backward/...), got {p!r}")
    step_plans = [_step_plan(p) for p in plans]

    def g(keys: jax.Array, params: Any, batch: Any, live: jax.Array | None = None):
        out, records = activations.run_with_faults(_grad_fn(loss_fn), (params, batch), step_plans,
                                                   list(keys), live=live)
        return out, tuple(records)

    return g


def _uint(dtype: Any) -> Any:
    return {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[np.dtype(dtype).itemsize]


@dataclasses.dataclass(frozen=True, eq=False)
class _Step:
    """A campaign's training step: ``faulty`` at the fault step, ``other`` at every other step.

    Both are ``fault_aware.train_step`` (the step fault-aware training takes),
    every update applied, between optimization barriers so that XLA compiles
    the step alike wherever it runs (alone, in a scan, in a map over trials);
    that is not guaranteed, hence one golden run per executor.
    Hooks on activation values change how XLA fuses (and so rounds) the step
    even when no fault lands, so with activations plans every step of every
    run (golden included) is the hooked step with a runtime ``live`` flag; with
    only weights/optimizer plans the other steps are the plain step, which the
    injection step equals bit for bit when no fault lands.
    """

    loss_fn: LossFn
    optimizer: Optimizer
    plans: tuple[Plan, ...]

    def other(self, key: jax.Array, state: tuple[Any, Any], batch: Any, live: jax.Array
              ) -> tuple[tuple[Any, Any], tuple[jax.Array, jax.Array]]:
        """A step where no fault lands (``live`` is False at run time)."""
        if any(p.kind == "activations" for p in self.plans):
            return self.faulty(key, state, batch, live)[:2]
        return self._update(_plain_value_and_grad(self.loss_fn), state, batch)[:2]

    def _update(self, value_and_grad: ValueAndGrad, state: tuple[Any, Any], batch: Any
                ) -> tuple[tuple[Any, Any], tuple[jax.Array, jax.Array], tuple[Record, ...]]:
        params, opt_state = jax.lax.optimization_barrier(state)
        out = train_step(value_and_grad, self.optimizer, params, opt_state, (), batch, skip_non_finite=False)
        new = (out.params, out.opt_state), (out.loss, _global_norm(out.grads))
        return jax.lax.optimization_barrier(new) + (out.records,)

    def faulty(self, key: jax.Array, state: tuple[Any, Any], batch: Any, live: jax.Array
               ) -> tuple[tuple[Any, Any], tuple[jax.Array, jax.Array], tuple[Record, ...]]:
        """One step with the faults of ``key`` landing where ``live``."""
        params, opt_state = jax.lax.optimization_barrier(state)
        records: list[Record | None] = [None] * len(self.plans)
        arrays, sites = _state_arrays(params, opt_state), state_sites(params, opt_state)
        for i, plan in enumerate(self.plans):
            if plan.kind == "params":
                arrays, records[i] = inject_arrays(plan_key(key, i), arrays, sites, plan, live=live)
        act = [i for i, p in enumerate(self.plans) if p.kind == "activations"]
        value_and_grad = (_hooked_value_and_grad(self.loss_fn, [self.plans[i] for i in act],
                                                 [plan_key(key, i) for i in act], live)
                          if act else _plain_value_and_grad(self.loss_fn))
        new, curves, recs = self._update(value_and_grad, _state_from(arrays, params, opt_state), batch)
        for i, rec in zip(act, recs):
            records[i] = rec
        return new, curves, tuple(records)


def _plain_value_and_grad(loss_fn: LossFn) -> ValueAndGrad:
    """``loss_fn``'s loss and gradients in ``train_step``'s calling convention, no faults."""
    def value_and_grad(params: Any, batch: Any, model_state: Any):
        loss, grads = _grad_fn(loss_fn)(params, batch)
        return (loss, model_state), grads, ()

    return value_and_grad


def _hooked_value_and_grad(loss_fn: LossFn, plans: Sequence[Plan], keys: Sequence[jax.Array],
                           live: jax.Array) -> ValueAndGrad:
    """The loss and gradients with the activations ``plans``' faults (one key each) landing where ``live``."""
    g = faulty_value_and_grad(loss_fn, *plans)

    def value_and_grad(params: Any, batch: Any, model_state: Any):
        (loss, grads), records = g(jax.random.wrap_key_data(jax.random.key_data(jnp.stack(keys))),
                                   params, batch, live=live)
        return (loss, model_state), grads, records

    return value_and_grad


def _at(tree: Any, i: jax.Array) -> Any:
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), tree)


def _check_plans(plans: Sequence[Plan]) -> tuple[Plan, ...]:
    if not plans:
        raise ValueError("TrainingCampaign needs at least one plan")
    for p in plans:
        if not isinstance(p, Plan):
            raise TypeError(f"plans must be jaxfi.Plan objects, got {p!r}")
        if p.kind not in ("params", "activations"):
            raise ValueError(f"training plans select Params (weights/..., optimizer/...) or Activations "
                             f"(forward/..., backward/...) sites, got a {p.kind} plan {p.sites.describe()}")
    return tuple(plans)


def _check_range(fault_steps: tuple[int, int], steps: int) -> tuple[int, int]:
    lo, hi = (int(v) for v in fault_steps)
    if not 0 <= lo < hi <= steps:
        raise ValueError(f"fault_steps must be (lo, hi) with 0 <= lo < hi <= steps={steps}, got {fault_steps!r}")
    return lo, hi


class TrainingGolden(NamedTuple):
    """The fault-free run: states before each step from ``fault_steps[0]`` (and the final
    one) stacked on a leading axis, loss and gradient-norm curves, final metric."""

    states: tuple[Any, Any]
    losses: np.ndarray
    grad_norms: np.ndarray
    metric: float


class TrainingCampaign:
    """Trials of faulty training: each trains ``steps`` steps with one plan trial at a drawn step.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar loss``.
      params: the start parameters (a checkpoint, or a fresh init).
      optimizer: an ``optax.GradientTransformation`` (or any ``Optimizer``).
      batches: a pytree of arrays whose leading axis is the step: step ``t``
        trains on ``batches[t]`` in every trial.
      *plans: the faults of each trial, all landing at its fault step (see the
        module notes for site names); ``count`` or a rate as for any plan.
      fault_steps: ``(lo, hi)``: the fault step is uniform over ``lo <= s < hi``;
        default the whole run.
      metric_fn: ``metric_fn(params) -> scalar``, higher is better (e.g. test
        accuracy), evaluated on each trial's final parameters.
      opt_state: the start optimizer state (default ``optimizer.init(params)``).
      seed: the campaign seed; trial ``i`` uses ``fold_in(key(seed), i)``.
    """

    def __init__(self, loss_fn: LossFn, params: Any, optimizer: Optimizer, batches: Any, *plans: Plan,
                 metric_fn: MetricFn, fault_steps: tuple[int, int] | None = None,
                 opt_state: Any = None, seed: int = 0):
        leading = {np.shape(x)[0] if np.ndim(x) else 0 for x in jax.tree.leaves(batches)}
        if len(leading) != 1 or 0 in leading:
            raise ValueError(f"batches must be a pytree of arrays sharing a leading step axis, "
                             f"got leading sizes {sorted(leading)}")
        self.steps = leading.pop()
        self.fault_steps = _check_range(fault_steps or (0, self.steps), self.steps)
        self.plans = _check_plans(plans)
        self.params, self.batches, self.seed = params, batches, int(seed)
        self.opt_state = optimizer.init(params) if opt_state is None else opt_state
        self.metric_fn = metric_fn
        # Raw key data, not a key: a closed-over constant the program fingerprint can hash.
        self._key_data = jax.random.key_data(jax.random.key(self.seed))
        self._step = _Step(loss_fn, optimizer, self.plans)
        self._hooked = any(p.kind == "activations" for p in self.plans)
        self._goldens: dict[str, TrainingGolden] = {}
        self.sites = tuple(self._sites(loss_fn))

    def _sites(self, loss_fn: LossFn) -> list[tuple[str, ...]]:
        """Per plan, the training names of its population's sites (records index these)."""
        batch = _at(self.batches, 0)
        names = []
        for plan in self.plans:
            if plan.kind == "params":
                pop = plan.population(tuple(state_sites(self.params, self.opt_state)))
                names.append(tuple(s.name for s in pop.sites))
            else:
                chosen = activations.selected_sites(_grad_fn(loss_fn), _step_plan(plan), self.params, batch)
                names.append(tuple(readable_name(s.name) for s in chosen))
        return names

    # -- programs

    def _golden_run(self, start: tuple[Any, Any], batches: Any, never: jax.Array):
        """The fault-free run; ``never`` (-1, a runtime value so that XLA compiles the
        same step as in the trials) is the step whose faults would land."""
        lo = self.fault_steps[0]

        def body(state, xs):
            t, batch = xs
            new, (loss, norm) = self._step.other(self.base_key, state, batch, t == never)
            return new, (state, loss, norm)

        steps = jnp.arange(self.steps)
        head = jax.tree.map(lambda x: x[:lo], (steps, batches))
        state, (_, l0, n0) = jax.lax.scan(body, start, head)
        tail = jax.tree.map(lambda x: x[lo:], (steps, batches))
        final, (states, l1, n1) = jax.lax.scan(body, state, tail)
        states = jax.tree.map(lambda s, f: jnp.concatenate([s, f[None]]), states, final)
        return states, jnp.concatenate([l0, l1]), jnp.concatenate([n0, n1]), self.metric_fn(final[0])

    def trial(self, index: jax.Array, golden: TrainingGolden, batches: Any) -> TrialOutput:
        """Trial ``index`` (negative: the golden trial, no fault lands), pure and jittable."""
        lo, hi = self.fault_steps
        key = trial_key(self.base_key, index)
        s = jax.random.randint(jax.random.fold_in(key, 0), (), lo, hi)
        fault_key = jax.random.fold_in(key, 1)
        state, (loss0, norm0), records = self._step.faulty(
            fault_key, _at(golden.states, s - lo), _at(batches, s), index >= 0)
        length = self.steps - lo - 1

        def body(carry, j):
            state, done = carry
            t = s + 1 + j
            run = (t < self.steps) & ~done

            def go(state):
                # Never live (t > s), but XLA cannot know: the same step as in the golden run.
                new, (loss, norm) = self._step.other(fault_key, state, _at(batches, t), (index >= 0) & (t == s))
                rejoined = _same(new, _at(golden.states, t + 1 - lo))
                return new, ~jnp.isfinite(loss) | rejoined, loss, norm, rejoined

            def skip(state):
                nan = jnp.full((), jnp.nan, jnp.float32)
                return state, done, nan, nan, jnp.asarray(False)

            new, done_now, loss, norm, rejoined = jax.lax.cond(run, go, skip, state)
            return (new, done | done_now), (loss, norm, run, rejoined)

        rejoin0 = _same(state, _at(golden.states, s + 1 - lo))
        done0 = ~jnp.isfinite(loss0) | rejoin0
        (state, _), (losses, norms, ran, rejoins) = jax.lax.scan(body, (state, done0), jnp.arange(length))
        rejoined = rejoin0 | jnp.any(rejoins)
        final_golden = jax.tree.map(lambda x: x[-1], golden.states)
        final = jax.lax.cond(rejoined, lambda: final_golden, lambda: state)
        last = s + jnp.sum(ran)
        stopped = jnp.where(last < self.steps - 1, last, -1)
        curve = functools.partial(_curve, s=s, steps=self.steps, rejoined=rejoined)
        return TrialOutput(s, curve(golden.losses, loss0, losses, ran), curve(golden.grad_norms, norm0, norms, ran),
                           self.metric_fn(final[0]).astype(jnp.float32), _same(final, final_golden),
                           stopped.astype(jnp.int32), records)

    @property
    def base_key(self) -> jax.Array:
        """The campaign key; trial ``i`` uses ``fold_in(base_key, i)``."""
        return jax.random.wrap_key_data(self._key_data)

    @functools.cached_property
    def _golden_program(self) -> Callable[..., Any]:
        return jax.jit(self._golden_run)

    @functools.cached_property
    def _chunk_program(self) -> Callable[..., TrialOutput]:
        return jax.jit(lambda idx, golden, batches: jax.lax.map(lambda i: self.trial(i, golden, batches), idx))

    @functools.cached_property
    def _single_program(self) -> Callable[..., TrialOutput]:
        return jax.jit(self.trial)

    @property
    def golden(self) -> TrainingGolden:
        """The fault-free run as the map executor computes it (``golden_of("map")``)."""
        return self.golden_of("map")

    def golden_of(self, executor: str) -> TrainingGolden:
        """The fault-free run as ``executor`` computes it, computed once (``golden_run``).

        XLA:CPU may round a step run alone differently from the same step in a
        loop (seen on the scanned transformer's backward pass), so each
        executor's trials are compared with the golden run its own programs compute.
        """
        if executor not in self._goldens:
            self._goldens[executor] = self.golden_run(executor)
        return self._goldens[executor]

    def golden_run(self, executor: str = "map") -> TrainingGolden:
        """Computes the fault-free run: states from ``fault_steps[0]`` on, curves and final metric.

        Args:
          executor: "map": one ``lax.scan`` over steps; "loop": the loop
            executor's (and ``independent``'s) jitted steps, from Python.
        """
        _check_executor(executor)
        if executor == "loop":
            return self._host_golden()
        states, losses, norms, metric = self._golden_program((self.params, self.opt_state), self.batches,
                                                              jnp.int32(-1))
        return TrainingGolden(states, np.asarray(losses), np.asarray(norms), float(metric))

    def _host_golden(self) -> TrainingGolden:
        lo = self.fault_steps[0]
        state, states, losses, norms = (self.params, self.opt_state), [], [], []
        for t in range(self.steps):
            if t >= lo:
                states.append(state)
            state, (loss, norm), _ = self._host_step(self.base_key, state, t, live=False, fault=False)
            losses.append(loss)
            norms.append(norm)
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states, state)
        return TrainingGolden(stacked, np.asarray(jnp.stack(losses)), np.asarray(jnp.stack(norms)),
                              float(self._jit_metric(state[0])))

    def _host_step(self, key: jax.Array, state: tuple[Any, Any], t: int, *, live: bool, fault: bool
                   ) -> tuple[tuple[Any, Any], tuple[jax.Array, jax.Array], tuple[Record, ...]]:
        """Step ``t`` as the loop executor, ``independent`` and their golden run take it: one compiled
        injection step at the fault step, and at every step when activations plans hook the step."""
        args = (key, state, _at(self.batches, t), np.bool_(live))
        if fault or self._hooked:
            return self._jit_faulty(*args)
        return self._jit_other(*args) + ((),)

    def run_trials(self, indices: Sequence[int], executor: str = "map") -> TrialOutput:
        """Trials ``indices``, as numpy arrays.

        Args:
          indices: trial indices (negative: golden trials).
          executor: "map", one compiled program (``lax.map`` over trials of a
            ``lax.scan`` over steps); or "loop", a Python loop over trials and
            steps of the jitted steps (the same shared golden prefix and early
            stops; faster where XLA:CPU runs a step inside a loop body slower
            than alone, as for convolutions). Each compares its trials with its
            own golden run (``golden_of``). They give the same bits where
            XLA:CPU rounds a step alike alone and in a loop (the MLP here);
            elsewhere the loop executor's bits are those of ``independent``
            runs (LeNet-5's golden runs differ from step 3 on, by at most
            6e-7 relative in the loss), and the map executor refuses where its
            trial program does not reproduce its golden run (the scanned
            transformer's backward pass).
        """
        _check_executor(executor)
        if executor == "loop":
            outs = [self._host_trial(int(i)) for i in indices]
            return jax.tree.map(lambda *xs: np.stack(xs), *outs)
        idx = jnp.asarray(np.asarray(indices, np.int32))
        return jax.device_get(self._chunk_program(idx, self._golden_arrays(), self.batches))

    def _host_trial(self, index: int) -> TrialOutput:
        """``trial`` with a Python loop over steps: the same jitted steps as ``independent``."""
        lo, hi = self.fault_steps
        g, golden_at = self.golden_of("loop"), self._jit_golden_at
        key = trial_key(self.base_key, jnp.int32(index))
        s = int(jax.random.randint(jax.random.fold_in(key, 0), (), lo, hi))
        losses, norms = g.losses.copy(), g.grad_norms.copy()
        state, rejoined, stopped = golden_at(g.states, s - lo), False, -1
        for t in range(s, self.steps):
            state, (loss, norm), out = self._host_step(jax.random.fold_in(key, 1), state, t,
                                                       live=index >= 0 and t == s, fault=t == s)
            if t == s:
                records = out
            losses[t], norms[t] = loss, norm
            rejoined = bool(self._jit_same(state, golden_at(g.states, t + 1 - lo)))
            if rejoined or not np.isfinite(losses[t]):
                stopped = t if t < self.steps - 1 else -1
                if not rejoined:
                    losses[t + 1:], norms[t + 1:] = np.nan, np.nan
                break
        final_golden = golden_at(g.states, self.steps - lo)
        final = final_golden if rejoined else state
        return jax.device_get(TrialOutput(
            np.int32(s), losses, norms, self._jit_metric(final[0]).astype(jnp.float32),
            self._jit_same(final, final_golden), np.int32(stopped), records))

    @functools.cached_property
    def _jit_golden_at(self) -> Callable[..., Any]:
        return jax.jit(_at)

    @functools.cached_property
    def _jit_same(self) -> Callable[..., Any]:
        return jax.jit(_same)

    @functools.cached_property
    def _jit_metric(self) -> Callable[..., Any]:
        return jax.jit(self.metric_fn)

    def replay(self, index: int) -> TrialOutput:
        """Trial ``index`` alone (the unbatched program), as numpy arrays."""
        return jax.device_get(self._single_program(np.int32(index), self._golden_arrays(), self.batches))

    def _golden_arrays(self) -> TrainingGolden:
        g = self.golden
        return TrainingGolden(g.states, jnp.asarray(g.losses), jnp.asarray(g.grad_norms), jnp.float32(g.metric))

    def independent(self, index: int) -> tuple[np.ndarray, np.ndarray, Any, tuple[Record, ...]]:
        """Trial ``index`` as an independent training run: a Python loop of jitted steps from the start.

        The reference the campaign is measured against: no shared golden
        prefix, no early stop. Returns (losses, grad norms, final (params,
        opt_state), records), as numpy arrays.
        """
        lo, hi = self.fault_steps
        key = trial_key(self.base_key, jnp.int32(index))
        s = int(jax.random.randint(jax.random.fold_in(key, 0), (), lo, hi))
        state, losses, norms, records = (self.params, self.opt_state), [], [], ()
        for t in range(self.steps):
            state, (loss, norm), out = self._host_step(jax.random.fold_in(key, 1), state, t,
                                                       live=index >= 0 and t == s, fault=t == s)
            if t == s:
                records = out
            losses.append(loss)
            norms.append(norm)
        return np.asarray(jnp.stack(losses)), np.asarray(jnp.stack(norms)), jax.device_get(state), \
            jax.device_get(records)

    @functools.cached_property
    def _jit_faulty(self) -> Callable[..., Any]:
        return jax.jit(self._step.faulty)

    @functools.cached_property
    def _jit_other(self) -> Callable[..., Any]:
        return jax.jit(self._step.other)

    # -- identity and running

    def config(self, executor: str = "map") -> dict[str, Any]:
        """What determines this campaign's results with ``executor`` (its store's identity)."""
        start = (self.params, self.opt_state)
        golden = jax.eval_shape(self._golden_run, start, self.batches, jnp.int32(-1))
        golden = TrainingGolden(*golden)
        return {
            "campaign": "training-faults",
            "versions": {"jaxfi": __version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
                         "numpy": np.__version__, "python": platform.python_version()},
            "program": identity.program(self.trial, jnp.int32(0), golden, self.batches),
            "golden_program": identity.program(self._golden_run, start, self.batches, jnp.int32(-1)),
            "start": identity.arrays((self.params, self.opt_state)),
            "batches": identity.arrays(self.batches),
            "plans": [identity.describe(p) for p in self.plans],
            "steps": self.steps, "fault_steps": list(self.fault_steps), "seed": self.seed,
            # Each executor compares its trials with the golden run its own programs compute.
            "executor": executor,
        }

    def run(self, n_trials: int, *, store: str | None = None, chunk_size: int = 16, executor: str = "map",
            progress: Callable[[int, int], Any] | None = None) -> TrainingResult:
        """Run trials ``0 .. n_trials - 1`` (resuming from ``store`` if given).

        Each run first checks, on one chunk holding the golden trial, that the
        trial program reproduces the golden run bit for bit.

        Args:
          n_trials: how many trials.
          store: a directory; trials already stored there are not recomputed,
            and a store of another campaign is refused.
          chunk_size: trials per compiled call.
          executor: "map" or "loop" (see ``run_trials``); part of the store's identity.
          progress: called with (done, total) after each chunk.

        Returns:
          A ``TrainingResult``.
        """
        if isinstance(n_trials, bool) or not isinstance(n_trials, (int, np.integer)) or n_trials < 1:
            raise ValueError(f"n_trials must be a positive integer, got {n_trials!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        _check_executor(executor)
        db = Store(store, self.config(executor)) if store is not None else None
        self._check_golden_trial(chunk_size, executor)
        todo = db.missing(n_trials) if db is not None else [(0, n_trials)]
        chunks = [(a, min(a + chunk_size, b)) for a, b in todo for a in range(a, b, chunk_size)]
        parts = {}
        for k, (a, b) in enumerate(chunks):
            # Padded with golden trials (they stop after one step) so that one program serves every chunk.
            padded = list(range(a, b)) + [GOLDEN_INDEX] * (chunk_size - (b - a)) * (executor == "map")
            columns = {k: v[:b - a] for k, v in _columns(self.run_trials(padded, executor)).items()}
            if db is not None:
                db.write_chunk(a, b, columns)
            parts[a] = columns
            if progress is not None:
                progress(k + 1, len(chunks))
        if db is not None:
            arrays = db.load_arrays()
            arrays = {k: v[arrays["trial"] < n_trials] for k, v in arrays.items()}
        else:
            arrays = {k: np.concatenate([parts[a][k] for a in sorted(parts)]) for k in parts[0]}
            arrays["trial"] = np.arange(n_trials)
        return TrainingResult(arrays, self.golden_of(executor), self.sites)

    def _check_golden_trial(self, chunk_size: int, executor: str) -> None:
        out = self.run_trials([GOLDEN_INDEX] * (chunk_size if executor == "map" else 1), executor)
        g = self.golden_of(executor)
        if not (bool(out.identical[0]) and same_bits(out.losses[0], g.losses)):
            hint = " (executor='loop' runs the same compiled steps in both)" if executor == "map" else ""
            raise RuntimeError(f"the trial program of executor={executor!r} does not reproduce its golden run "
                               f"bit for bit on this machine; outcomes would mix rounding with faults{hint}")


def _check_executor(executor: str) -> None:
    if executor not in ("map", "loop"):
        raise ValueError(f"executor must be 'map' or 'loop', got {executor!r}")


def _curve(golden: jax.Array, first: jax.Array, rest: jax.Array, ran: jax.Array, *,
           s: jax.Array, steps: int, rejoined: jax.Array) -> jax.Array:
    """A trial's full curve: golden before ``s``, the trial's own values while it ran, then
    golden (it rejoined the golden run) or NaN (it stopped on a non-finite loss)."""
    t = jnp.arange(steps)
    j = jnp.clip(t - s - 1, 0, max(rest.shape[0] - 1, 0))
    own = jnp.where(t == s, first, rest[j] if rest.shape[0] else first)
    ran_t = (t == s) | ((t > s) & (ran[j] if ran.shape[0] else False))
    after = jnp.where(rejoined, golden, jnp.nan)
    return jnp.where(t < s, golden, jnp.where(ran_t, own, after)).astype(jnp.float32)


def _columns(out: TrialOutput) -> dict[str, np.ndarray]:
    cols = {"fault_step": out.fault_step, "losses": out.losses, "grad_norms": out.grad_norms,
            "metric": out.metric, "identical": out.identical, "stopped": out.stopped}
    for j, rec in enumerate(out.records):
        for field in Record._fields:
            cols[f"p{j}_{field}"] = getattr(rec, field)
    return {k: np.asarray(v) for k, v in cols.items()}


# ----------------------------------------------------------------------------
# Outcomes.


@dataclasses.dataclass(frozen=True)
class TrainingThresholds:
    """How trials are classified (see ``classify_training``).

    Attributes:
      window: steps from the fault step within which a non-finite loss is "immediate".
      tolerance: largest drop of the final metric (golden minus trial) still "no worse".
      deviation: relative loss deviation from golden, at some step from the
        fault on, that counts as "deviated" (for Recovered).
    """

    window: int = 5
    tolerance: float = 0.01
    deviation: float = 0.1


def classify_training(losses: np.ndarray, golden_losses: np.ndarray, metric: np.ndarray, golden_metric: float,
                      identical: np.ndarray, fault_step: np.ndarray,
                      thresholds: TrainingThresholds = TrainingThresholds()) -> np.ndarray:
    """The outcome class of each trial, in this order of precedence:

    * ``immediate_inf_nan``: a non-finite loss within ``window`` steps from the fault step;
    * ``masked``: final state bit-identical to golden, or final metric no worse
      than golden by more than ``tolerance`` and the loss curve never deviated;
    * ``slow_degrade``: final metric worse than golden by more than
      ``tolerance`` (or not finite);
    * ``recovered``: the loss deviated by more than ``deviation`` relative to
      golden (or became non-finite after the window) yet the final metric is
      within ``tolerance``.

    Args:
      losses: [trials, steps] loss curves.
      golden_losses: [steps] the golden curve.
      metric: [trials] final metric (higher is better).
      golden_metric: the golden final metric.
      identical: [trials] final state bit-identical to golden.
      fault_step: [trials] the step each fault landed at.
      thresholds: the window, tolerance and deviation.

    Returns:
      [trials] array of names from ``TRAINING_OUTCOMES``.
    """
    losses, metric = np.asarray(losses, np.float64), np.asarray(metric, np.float64)
    t = np.arange(losses.shape[1])[None, :]
    since = t >= np.asarray(fault_step)[:, None]
    bad = ~np.isfinite(losses)
    immediate = np.any(bad & since & (t < np.asarray(fault_step)[:, None] + thresholds.window), axis=1)
    with np.errstate(invalid="ignore"):
        far = np.abs(losses - golden_losses[None, :]) > thresholds.deviation * np.abs(golden_losses[None, :])
        worse = ~np.isfinite(metric) | (golden_metric - metric > thresholds.tolerance)
    deviated = np.any(since & (far | bad), axis=1)
    return np.select([immediate, np.asarray(identical, bool), worse, deviated],
                     ["immediate_inf_nan", "masked", "slow_degrade", "recovered"], "masked").astype(object)


# ----------------------------------------------------------------------------
# Detector.


def spike_flags(values: np.ndarray, *, factor: float = 10.0, window: int = 10) -> np.ndarray:
    """Flag steps whose value is not finite or exceeds ``factor`` times the median of the previous ``window``.

    Steps with fewer than ``window`` steps of history are flagged only when not
    finite. Non-finite values in the history are ignored by the median.

    Args:
      values: [..., steps] per-step loss or gradient norm.
      factor: the jump factor (> 1).
      window: the history length (>= 1).

    Returns:
      Boolean flags of ``values``' shape.
    """
    if not factor > 1:
        raise ValueError(f"factor must be > 1, got {factor!r}")
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")
    values = np.asarray(values, np.float64)
    flags = ~np.isfinite(values)
    if values.shape[-1] > window:
        history = np.lib.stride_tricks.sliding_window_view(values[..., :-1], window, axis=-1)
        history = np.where(np.isfinite(history), history, np.nan)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            # An all-NaN history (a failed run) has no median: the step is not flagged.
            warnings.simplefilter("ignore", RuntimeWarning)
            median = np.nanmedian(history, axis=-1)
            flags[..., window:] |= values[..., window:] > factor * median
    return flags


def detector_scores(flags: np.ndarray, fault_step: np.ndarray, outcome: np.ndarray) -> pd.DataFrame:
    """Recall and false alarms of per-step ``flags`` on a campaign's trials.

    A trial is detected if some step from its fault step on is flagged.
    Recall is per non-masked outcome class (and over all of them); the false
    alarm rate is the detection rate over masked trials.

    Args:
      flags: [trials, steps] booleans (e.g. ``spike_flags`` of loss or gradient norm).
      fault_step: [trials] fault steps.
      outcome: [trials] outcome names.

    Returns:
      One row per group: ``group``, ``trials``, ``detected``, ``rate`` and its Wilson ``lo``/``hi``.
    """
    t = np.arange(flags.shape[1])[None, :]
    detected = np.any(flags & (t >= np.asarray(fault_step)[:, None]), axis=1)
    outcome = np.asarray(outcome)
    groups = [(o, outcome == o) for o in TRAINING_OUTCOMES if o != "masked"]
    groups += [("recall (all non-masked)", outcome != "masked"), ("false alarms (masked)", outcome == "masked")]
    rows = []
    for name, mask in groups:
        n, k = int(mask.sum()), int(detected[mask].sum())
        lo, hi = stats_lib.wilson(k, n)
        rows.append(dict(group=name, trials=n, detected=k, rate=k / n if n else float("nan"), lo=lo, hi=hi))
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------
# Results.


class TrainingResult:
    """A training-fault campaign's trials: per-trial columns, curves, golden run and site names.

    Attributes:
      arrays: the stored columns by trial (``losses``/``grad_norms`` [trials, steps]).
      golden: the ``TrainingGolden`` run.
      sites: per plan, the site names its records index.
    """

    def __init__(self, arrays: dict[str, np.ndarray], golden: TrainingGolden, sites: tuple[tuple[str, ...], ...]):
        self.arrays, self.golden, self.sites = arrays, golden, sites

    @property
    def losses(self) -> np.ndarray:
        """[trials, steps] loss curves (float32)."""
        return self.arrays["losses"]

    def outcomes(self, thresholds: TrainingThresholds = TrainingThresholds()) -> np.ndarray:
        """Each trial's outcome class (see ``classify_training``)."""
        a = self.arrays
        return classify_training(a["losses"], self.golden.losses, a["metric"], self.golden.metric,
                        a["identical"], a["fault_step"], thresholds)

    def table(self, thresholds: TrainingThresholds = TrainingThresholds()) -> pd.DataFrame:
        """One row per trial: trial, fault_step, site, index, bit, before, after (first fault of
        plan 0), metric, identical, stopped, outcome."""
        a = self.arrays
        valid = a["p0_valid"]
        first = np.where(valid.any(axis=1), np.argmax(valid, axis=1), 0)[:, None]
        field = {f: np.take_along_axis(a[f"p0_{f}"], first, axis=1)[:, 0] for f in Record._fields[:5]}
        mask = field["mask"].astype(np.uint64)
        bit = np.where(mask > 0, np.floor(np.log2(np.maximum(mask, 1).astype(np.float64))), -1).astype(int)
        names = np.array(list(self.sites[0]) + [""], dtype=object)
        return pd.DataFrame({
            "trial": a["trial"], "fault_step": a["fault_step"], "faults": valid.sum(axis=1),
            "site": names[np.where(valid.any(axis=1), field["site"], -1)], "index": field["index"], "bit": bit,
            "before": field["before"], "after": field["after"], "metric": a["metric"],
            "identical": a["identical"], "stopped": a["stopped"], "outcome": self.outcomes(thresholds)})

    def shares(self, by: str | None = None, thresholds: TrainingThresholds = TrainingThresholds(),
               confidence: float = 0.95) -> pd.DataFrame:
        """Outcome shares with Wilson intervals, overall or per value of column ``by`` of ``table``."""
        table = self.table(thresholds)
        groups = [("all", table)] if by is None else list(table.groupby(by, sort=True))
        rows = []
        for key, part in groups:
            for o in TRAINING_OUTCOMES:
                k, n = int((part["outcome"] == o).sum()), len(part)
                lo, hi = stats_lib.wilson(k, n, confidence)
                rows.append({"group": key, "outcome": o, "count": k, "trials": n, "share": k / n, "lo": lo, "hi": hi})
        return pd.DataFrame(rows)
