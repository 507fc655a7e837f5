"""Pure, keyed fault injection: sample faults of a plan, apply them to sites.

``sample_faults`` draws one trial's faults (site, flat index, bit) from a
``Population`` with static shapes; ``apply_site`` corrupts one site's array
with the faults that landed on it; ``inject`` does both for a parameter pytree.
Only the hit values are gathered, changed on their raw bits and scattered
back, so untouched leaves are returned as they are (and stay unbatched under
vmap).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats as sps

from jaxfi._src import bits as bits_lib
from jaxfi._src import plan as plan_lib
from jaxfi._src.plan import Plan, Population
from jaxfi._src.sites import Site, param_sites

# Populations this small are sampled by an exact permutation; larger ones by
# drawing with replacement and keeping the first distinct draws, unless the
# cap is over an eighth of the population (then too many draws would repeat).
SMALL_POPULATION = 4096
# Dtypes whose scatter is bit-exact on every backend we test. Emulated formats
# (bfloat16, float8) are converted through float32 by XLA:CPU, which quiets
# signalling NaNs, so they are scattered as unsigned integers instead.
_NATIVE_SCATTER = frozenset(np.dtype(d) for d in (
    np.float16, np.float32, np.float64, np.int8, np.uint8, np.int16, np.uint16,
    np.int32, np.uint32, np.int64, np.uint64, np.bool_))


def movable(x: jax.Array) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """``x`` as values that gather and scatter bit for bit, and the way back.

    XLA:CPU quiets signalling NaNs when it moves emulated formats (bfloat16,
    float8), so those travel as their unsigned integer bits.
    """
    if np.dtype(x.dtype) in _NATIVE_SCATTER:
        return x, lambda y: y
    return bits_lib.to_bits(x), lambda y: bits_lib.from_bits(y, x.dtype)


def plan_keys(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A plan's (sampling, applying) keys from the plan's key in a trial.

    Faults are drawn from the first and fault models that need randomness
    (random values) use the second, so the draw never depends on the sites.
    """
    k_sample, k_apply = jax.random.split(key)
    return k_sample, k_apply


class Faults(NamedTuple):
    """One trial's sampled faults, sorted by (site, index, bit); invalid slots last."""

    site: jax.Array
    index: jax.Array
    bit: jax.Array
    valid: jax.Array
    overflow: jax.Array


class Record(NamedTuple):
    """What a trial did, in fixed-shape arrays (one slot per possible fault).

    ``site`` indexes the population's sites (-1 in unused slots), ``index`` is
    the flat index in the site, ``mask`` the bits the fault targeted, and
    ``before``/``after`` the raw bits of the value (widened to 32 or 64 bits).
    ``overflow`` is True if the trial drew more faults than the static cap (or
    than could be placed) and was truncated.
    """

    site: jax.Array
    index: jax.Array
    mask: jax.Array
    before: jax.Array
    after: jax.Array
    valid: jax.Array
    overflow: jax.Array

    @property
    def count(self) -> jax.Array:
        """Number of faults placed in the trial."""
        return jnp.sum(self.valid, axis=-1)


def nonfinite_faults(record: Record, sites: Sequence[Site]) -> jax.Array:
    """Whether a fault in ``record`` left a NaN or an infinity (its value after).

    Args:
      record: one trial's record, or a batch of them (leading trial axes).
      sites: the sites ``record.site`` indexes (its plan's population).

    Returns:
      A bool per trial (a scalar for one trial).
    """
    site = jnp.maximum(jnp.asarray(record.site), 0)
    found = jnp.zeros(site.shape[:-1], bool)
    for dtype in {s.dtype for s in sites if jnp.issubdtype(s.dtype, jnp.inexact)}:
        ours = jnp.asarray([s.dtype == dtype for s in sites])[site]
        after = bits_lib.from_bits(jnp.asarray(record.after).astype(bits_lib.format_of(dtype).uint), dtype)
        found |= jnp.any(jnp.asarray(record.valid) & ours & ~jnp.isfinite(after), axis=-1)
    return found


def _draw_count(key: jax.Array, pop: Population, point: Any = 0) -> tuple[jax.Array, jax.Array]:
    """Fault count for one trial at sweep point ``point`` and whether it exceeded the cap."""
    if pop.thresholds is None:
        return jnp.asarray(pop.cap, jnp.int32), jnp.asarray(False)
    row = jnp.clip(jnp.asarray(point, jnp.int32), 0, pop.thresholds.shape[0] - 1)
    hi_t = jnp.asarray((pop.thresholds >> np.uint64(32)).astype(np.uint32))[row]
    lo_t = jnp.asarray((pop.thresholds & np.uint64(0xFFFFFFFF)).astype(np.uint32))[row]
    word = jax.random.bits(key, (2,), jnp.uint32)
    below = (word[0] < hi_t) | ((word[0] == hi_t) & (word[1] < lo_t))
    # Survival thresholds decrease in k, so N = #{k : U < P(N > k)}.
    n = jnp.sum(below, dtype=jnp.int32)
    return jnp.minimum(n, pop.cap), n > pop.cap


def _site_tables(pop: Population) -> tuple[jax.Array, jax.Array, jax.Array]:
    widths = max(1, max(len(b) for b in pop.positions))
    table = np.zeros((len(pop.sites), widths), np.int32)
    for s, bits in enumerate(pop.positions):
        table[s, :len(bits)] = bits
    nbits = np.array([max(1, len(b)) for b in pop.positions], np.int32)
    sizes = np.array([s.size for s in pop.sites], np.int32)
    return jnp.asarray(table), jnp.asarray(nbits), jnp.asarray(sizes)


def _from_flat(flat: jax.Array, pop: Population):
    """Map flat population positions to (site, index, bit slot)."""
    starts = np.cumsum((0,) + pop.weights)
    site = jnp.searchsorted(jnp.asarray(starts[1:], jnp.int32), flat, side="right").astype(jnp.int32)
    local = flat - jnp.asarray(starts[:-1], jnp.int32)[site]
    nbits = _site_tables(pop)[1][site]
    return site, local // nbits, local % nbits


def _draws(key: jax.Array, pop: Population, count: int):
    """``count`` independent uniform draws from the population (with replacement)."""
    k_site, k_index, k_bit = jax.random.split(key, 3)
    _, nbits, sizes = _site_tables(pop)
    logw = jnp.log(jnp.asarray(pop.weights, jnp.float32))
    site = jax.random.categorical(k_site, logw, shape=(count,)).astype(jnp.int32)
    index = jax.random.randint(k_index, (count,), 0, sizes[site])
    slot = jax.random.randint(k_bit, (count,), 0, nbits[site])
    return site, index, slot


def _first_distinct(site, index, slot, m: int):
    """Positions of the first ``m`` distinct draws (in draw order) and how many exist."""
    c = site.shape[0]
    order = jnp.arange(c, dtype=jnp.int32)
    s_site, s_index, s_slot, s_order = jax.lax.sort((site, index, slot, order), num_keys=4)
    same = (s_site[1:] == s_site[:-1]) & (s_index[1:] == s_index[:-1]) & (s_slot[1:] == s_slot[:-1])
    first_sorted = jnp.concatenate([jnp.ones((1,), bool), ~same])
    first = jnp.zeros((c,), bool).at[s_order].set(first_sorted)
    rank = jnp.cumsum(first) - 1
    target = jnp.where(first & (rank < m), rank, m)
    chosen = jnp.zeros((m,), jnp.int32).at[target].set(order, mode="drop")
    return chosen, jnp.sum(first, dtype=jnp.int32)


@functools.lru_cache(maxsize=256)
def _extra_draws(m: int, total: int) -> int:
    """Extra draws so that m distinct ones fail to appear with negligible probability."""
    if m <= 1:
        return 0
    extra = 0
    for _ in range(50):
        lam = 1.25 * (m + extra) ** 2 / (2 * total)
        need = int(sps.poisson.isf(plan_lib.TAIL_PROBABILITY, lam)) + 1
        if need <= extra:
            return extra
        extra = need
    return extra


def _placements(key: jax.Array, pop: Population, m: int):
    """Up to ``m`` distinct (site, index, slot) placements and how many are distinct."""
    total = pop.total
    if total <= SMALL_POPULATION or m > total // 8:
        # m <= MAX_CAP, so a dense population has under 8 * MAX_CAP elements.
        flat = jax.random.permutation(key, total)[:m].astype(jnp.int32)
        site, index, slot = _from_flat(flat, pop)
        return site, index, slot, jnp.asarray(m, jnp.int32)
    site, index, slot = _draws(key, pop, m + _extra_draws(m, total))
    if m == 1:
        return site, index, slot, jnp.asarray(1, jnp.int32)
    chosen, distinct = _first_distinct(site, index, slot, m)
    return site[chosen], index[chosen], slot[chosen], distinct


def sample_faults(key: jax.Array, pop: Population, point: Any = 0) -> Faults:
    """Draw one trial's faults: a count (exact or binomial) placed without replacement.

    Args:
      key: the trial's sampling key for this plan.
      pop: the plan's population.
      point: the sweep point whose rate draws the count (a rate sweep's
        points share the placements, so lower rates hit subsets).

    Returns:
      The trial's faults.
    """
    k_count, k_place = jax.random.split(key)
    m = pop.cap
    n, overflow = _draw_count(k_count, pop, point)
    if m == 0:
        empty = jnp.zeros((0,), jnp.int32)
        return Faults(empty, empty, empty, jnp.zeros((0,), bool), overflow)
    site, index, slot, distinct = _placements(k_place, pop, m)
    valid = jnp.arange(m) < jnp.minimum(n, distinct)
    overflow = overflow | (distinct < n)
    table, _, _ = _site_tables(pop)
    bit = table[site, slot] if pop.plan.granularity == "bit" else jnp.zeros_like(slot)
    key_site = jnp.where(valid, site, len(pop.sites))
    key_site, index, bit, valid = jax.lax.sort((key_site, index, bit, valid), num_keys=3)
    return Faults(jnp.where(valid, key_site, -1), index, bit, valid, overflow)


def _record_dtype(pop: Population):
    return jnp.uint64 if pop.record_width == 64 else jnp.uint32


def _combined_masks(faults: Faults, dtype) -> jax.Array:
    """Per slot, the OR of the bits of all faults hitting the same value."""
    start = jnp.concatenate([
        jnp.ones((1,), bool),
        (faults.site[1:] != faults.site[:-1]) | (faults.index[1:] != faults.index[:-1])])
    segment = jnp.cumsum(start) - 1
    one = jnp.left_shift(jnp.ones_like(faults.bit, dtype), faults.bit.astype(dtype))
    one = jnp.where(faults.valid, one, 0)
    # Faults on one value have distinct bits, so their sum is their OR.
    total = jax.ops.segment_sum(one, segment, num_segments=faults.bit.shape[0])
    return total[segment]


class SiteFaults(NamedTuple):
    """The record fields of the slots that landed on one site."""

    hit: jax.Array
    mask: jax.Array
    before: jax.Array
    after: jax.Array


def apply_site(key: jax.Array, values: jax.Array, site: int, faults: Faults,
               pop: Population) -> tuple[jax.Array, SiteFaults]:
    """Corrupt ``values`` (the array of population site ``site``) with its faults."""
    spec = pop.sites[site]
    permanent = pop.plan.permanent
    shape = tuple(values.shape[1:]) if permanent and values.ndim else tuple(values.shape)
    if shape != spec.shape or values.dtype != spec.dtype:
        expected = f"[batch, {', '.join(map(str, spec.shape))}]" if permanent else list(spec.shape)
        raise ValueError(
            f"site {spec.name}: expected {spec.dtype.name}{expected}, "
            f"got {values.dtype}{list(values.shape)}")
    if not permanent:
        flat, fields = _apply_flat(key, values.reshape(-1), faults.index, site, faults, pop)
        return flat.reshape(values.shape), fields
    # The same faults (and the same random draws, the key being shared) on
    # every row; the record keeps the first row's values.
    rows, fields = jax.vmap(lambda row: _apply_flat(key, row, faults.index, site, faults, pop))(
        values.reshape(values.shape[0], -1))
    return rows.reshape(values.shape), SiteFaults(*(f[0] for f in fields))


def apply_rows(key: jax.Array, rows: jax.Array, row_ids: jax.Array, site: int, faults: Faults,
               pop: Population) -> tuple[jax.Array, SiteFaults]:
    """``apply_site`` on some rows of the site's array: ``rows[j]`` is row
    ``row_ids[j]`` (along the leading axis). Every fault on the site must lie
    in one of those rows; the record holds the indices in the whole array."""
    spec = pop.sites[site]
    if pop.plan.permanent:
        raise ValueError(f"site {spec.name}: a permanent plan hits every row, not some rows")
    if tuple(rows.shape[1:]) != spec.shape[1:] or rows.dtype != spec.dtype:
        raise ValueError(
            f"site {spec.name}: expected rows of {spec.dtype.name}{list(spec.shape[1:])}, "
            f"got {rows.dtype}{list(rows.shape)}")
    per_row = spec.size // spec.shape[0]
    row, offset = jnp.divmod(faults.index, per_row)
    slot = jnp.argmax(row[:, None] == row_ids[None, :], axis=1).astype(faults.index.dtype)
    flat, fields = _apply_flat(key, rows.reshape(-1), slot * per_row + offset, site, faults, pop)
    return flat.reshape(rows.shape), fields


def _apply_flat(key: jax.Array, flat: jax.Array, index: jax.Array, site: int, faults: Faults,
                pop: Population) -> tuple[jax.Array, SiteFaults]:
    """Corrupt ``flat`` at ``index`` (per fault slot) with the faults on ``site``."""
    fmt = pop.sites[site].format
    rec = _record_dtype(pop)
    if pop.cap == 0:
        empty = jnp.zeros((0,), rec)
        return flat, SiteFaults(jnp.zeros((0,), bool), empty, empty, empty)
    hit = faults.valid & (faults.site == site)
    store, back = movable(flat)
    native = store is flat
    before = store[jnp.where(hit, index, 0)]
    before = bits_lib.to_bits(before) if native else before
    if pop.plan.granularity == "bit":
        mask = _combined_masks(faults, rec).astype(fmt.uint)
        after = pop.plan.fault.combine(before, mask)
        own = jnp.left_shift(jnp.ones_like(before), faults.bit.astype(fmt.uint))
    else:
        after, own = pop.plan.fault.apply_raw(jax.random.fold_in(key, site), before, fmt)
    written = bits_lib.from_bits(after, flat.dtype) if native else after
    store = store.at[jnp.where(hit, index, flat.shape[0])].set(written, mode="drop")
    fields = SiteFaults(hit, *(jnp.where(hit, v.astype(rec), 0) for v in (own, before, after)))
    return back(store), fields


def assemble_record(faults: Faults, pop: Population, parts: Sequence[SiteFaults]) -> Record:
    """Merge the per-site fields into one trial record."""
    rec = _record_dtype(pop)
    zero = jnp.zeros(faults.valid.shape, rec)
    mask, before, after = zero, zero, zero
    for part in parts:
        mask = jnp.where(part.hit, part.mask, mask)
        before = jnp.where(part.hit, part.before, before)
        after = jnp.where(part.hit, part.after, after)
    return Record(faults.site, jnp.where(faults.valid, faults.index, 0), mask, before,
                  after, faults.valid, faults.overflow)


def plan_faults(key: jax.Array, pop: Population, point: Any = 0) -> Faults:
    """The faults a trial with plan key ``key`` draws at sweep point ``point`` (what ``inject`` applies)."""
    return sample_faults(plan_keys(key)[0], pop, point)


class Live(NamedTuple):
    """A trial's ``live`` flag with its campaign index, which fault-list plans
    and rate sweeps (the point, ``plan.split_index``) read."""

    live: jax.Array
    index: jax.Array


def listed_faults(pop: Population, index: jax.Array) -> Faults:
    """Trial ``index``'s faults from a fault-list population (none past its end)."""
    site, flat, bit, valid = (jnp.asarray(a) for a in pop.listed)
    inside = (index >= 0) & (index < site.shape[0])
    row = jnp.clip(index, 0, site.shape[0] - 1)
    valid = valid[row] & inside
    return Faults(jnp.where(valid, site[row], -1), flat[row], bit[row], valid, jnp.asarray(False))


def live_faults(key: jax.Array, pop: Population, live: jax.Array | Live | None = None) -> Faults:
    """``sample_faults``, with every fault dropped where ``live`` is False.

    A trial run with ``live=False`` is the golden run of the very program
    that computes the trials: same operations, no fault lands. A fault-list
    plan's faults come from the list, at the index a ``Live`` gives.
    """
    index = live.index if isinstance(live, Live) else None
    live = live.live if isinstance(live, Live) else live
    if pop.listed is None:
        faults = sample_faults(key, pop, 0 if index is None else plan_lib.split_index(index)[0])
    elif index is None:
        raise ValueError("a plan with a fault list needs the trial's index: run it in a jaxfi.Campaign")
    else:
        faults = listed_faults(pop, index)
    if live is None:
        return faults
    valid = faults.valid & live
    return faults._replace(site=jnp.where(valid, faults.site, -1), valid=valid,
                           overflow=faults.overflow & live)


def inject_arrays(key: jax.Array, arrays: Sequence[jax.Array], sites: Sequence[Site],
                  plan: Plan, only: frozenset[int] | None = None,
                  live: jax.Array | None = None) -> tuple[list[jax.Array], Record]:
    """Inject one trial of ``plan`` into ``arrays``, described one-to-one by ``sites``.

    ``only`` (population site indices) skips the other sites: the result is
    the same provided the trial's faults all land in ``only``, and the
    skipped arrays stay independent of ``key`` (unbatched under vmap).
    ``live``: see ``live_faults``.
    """
    pop = plan.population(tuple(sites))
    position = {site.name: i for i, site in enumerate(sites)}
    arrays = list(arrays)
    k_sample, k_apply = plan_keys(key)
    faults = live_faults(k_sample, pop, live)
    parts = []
    for s, spec in enumerate(pop.sites):
        if only is not None and s not in only:
            continue
        i = position[spec.name]
        arrays[i], part = apply_site(k_apply, jnp.asarray(arrays[i]), s, faults, pop)
        parts.append(part)
    return arrays, assemble_record(faults, pop, parts)


def inject(key: jax.Array, params: Any, plan: Plan) -> tuple[Any, Record]:
    """Inject one trial of ``plan``'s faults into a parameter pytree.

    Pure and jittable (``plan`` is static), vmappable over keys.

    Args:
      key: the trial's PRNG key for this plan.
      params: the parameter pytree.
      plan: a plan over params sites.

    Returns:
      The faulty pytree (unselected leaves are the input leaves themselves)
      and the trial's ``Record``.
    """
    return inject_params(key, params, plan)


def inject_params(key: jax.Array, params: Any, plan: Plan, only: frozenset[int] | None = None,
                  live: jax.Array | None = None) -> tuple[Any, Record]:
    """``inject`` restricted to the population sites ``only``, live or not (see ``inject_arrays``)."""
    if plan.kind != "params":
        raise ValueError(f"inject takes a plan over params sites, got a {plan.kind} plan")
    paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    arrays = [x for p, x in paths if hasattr(x, "dtype")]
    faulty, record = inject_arrays(key, arrays, param_sites(params), plan, only, live)
    it = iter(faulty)
    leaves = [next(it) if hasattr(x, "dtype") else x for _, x in paths]
    return jax.tree_util.tree_unflatten(treedef, leaves), record


def population_of(params: Any, plan: Plan) -> Population:
    """The resolved sampling population of a params plan."""
    return plan.population(param_sites(params))

