"""Range restriction (Ranger-style): clamp chosen activations to bounds seen on golden data.

``record_bounds`` runs the fault-free function over training batches and keeps
the smallest and largest value of each chosen activation site (one scalar pair
per site, e.g. per ReLU output). ``restrict(fn, bounds)`` is ``fn`` with those
values clamped as they are produced: below ``lo`` becomes ``lo``, above ``hi``
becomes ``hi``, NaN becomes 0 (pulled into ``[lo, hi]``), and every in-range
value is left bit for bit as it was. The params are not changed: protection is
switched on at evaluation by calling ``restrict(fn, bounds)`` instead of ``fn``.

Order with faults: use ``jaxfi.faulty(restrict(fn, bounds), *plans)``. A fault
at a restricted site is applied when the value is produced and the clamp reads
the faulty value, so the clamp acts after the fault; a fault anywhere else (a
weight, an unrestricted activation) propagates and is clamped at the next
restricted site downstream. The clamp runs in jaxfi's own name scope, so the
sites of ``fn`` keep their names; its operations are values of the restricted
program too, under scopes ending in ``jaxfi``. A plan selecting all
activations would also hit them (a fault after the clamp, which nothing
catches): to fault the same population as in ``fn``, add
``where=lambda s: not s.scope.endswith("jaxfi")``. ``restrict(jaxfi.faulty(fn,
...))`` would clamp before the faults and is not what you want.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxfi._src import activations
from jaxfi._src.sites import Selector

Bounds = dict[str, tuple[float, float]]


def record_bounds(fn: Callable[[Any, Any], Any], sites: str | Sequence[str] | Selector,
                  params: Any, batches: Iterable[Any]) -> Bounds:
    """Per-site ``(min, max)`` of the chosen activations of ``fn(params, batch)`` over ``batches``.

    ``sites`` is a site name, a list of names or an ``Activations`` selector
    (e.g. ``jaxfi.Activations(primitive="max")`` for ReLU outputs). Use
    fault-free training data: these are the golden ranges.
    """
    reduce = jax.jit(lambda p, x: {name: (jnp.min(v), jnp.max(v))
                                   for name, v in activations.capture(fn, sites)(p, x)[1].items()})
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    for batch in batches:
        for name, (a, b) in reduce(params, batch).items():
            lo[name] = min(lo.get(name, math.inf), float(a))
            hi[name] = max(hi.get(name, -math.inf), float(b))
    if not lo:
        raise ValueError("record_bounds got no batches")
    bounds = {name: (lo[name], hi[name]) for name in lo}
    _check_bounds(bounds)
    return bounds


def restrict(fn: Callable[..., Any], bounds: Mapping[str, tuple[float, float]]) -> Callable[..., Any]:
    """``fn`` with each site named in ``bounds`` clamped to its ``(lo, hi)`` when produced.

    Pure: composes with jit, vmap and ``jaxfi.faulty`` (see the module notes for
    the order). A name that is not a floating activation of ``fn`` is an error
    when the restricted function is called.
    """
    bounds = {name: (float(lo), float(hi)) for name, (lo, hi) in dict(bounds).items()}
    _check_bounds(bounds)

    def clamp_for(site: activations.ActivationSite) -> Callable[[jax.Array], jax.Array]:
        if not site.format.is_float:
            raise ValueError(f"restrict clamps floating values only; {site.name!r} is {site.dtype.name}")
        return _clamp(*bounds[site.name])

    restricted = activations.transform(fn, tuple(bounds), clamp_for, "restrict")

    # Campaign stores key on the function's name: different bounds must not share one.
    digest = hashlib.sha256(json.dumps(sorted(bounds.items())).encode()).hexdigest()[:12]
    restricted.__qualname__ = f"restrict({getattr(fn, '__qualname__', repr(fn))}, {digest})"
    return restricted


def _clamp(lo: float, hi: float) -> Callable[[jax.Array], jax.Array]:
    # NaN has no magnitude to clamp; 0 is what a ReLU gives for "no signal".
    fill = min(max(0.0, lo), hi)

    def clamp(x: jax.Array) -> jax.Array:
        # Comparisons rather than clip keep in-range values (and -0.0) bitwise.
        return jnp.where(x < lo, lo, jnp.where(x > hi, hi, jnp.where(jnp.isnan(x), fill, x)))

    return clamp


def _check_bounds(bounds: Mapping[str, tuple[float, float]]) -> None:
    if not bounds:
        raise ValueError("bounds must name at least one activation site")
    for name, (lo, hi) in bounds.items():
        if not isinstance(name, str):
            raise TypeError(f"bounds keys must be site names (str), got {name!r}")
        if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
            raise ValueError(f"bounds for {name!r} must be finite with lo <= hi, got ({lo}, {hi})")
