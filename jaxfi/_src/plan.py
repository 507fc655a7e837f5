"""Plans: where faults land, what they do, and how many there are per trial.

A ``Plan`` is static (hashable, usable as a jit static argument). Resolved
against concrete sites it becomes a ``Population``: the explicit sampling
population (bits or values of the selected sites), the count distribution and
the static cap on faults per trial.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import functools
import hashlib
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as sps

from jaxfi._src import faults as faults_lib
from jaxfi._src.sites import Selector, Site

# A trial whose drawn fault count exceeds the cap is flagged; the cap is the
# smallest count whose upper tail probability is below this.
TAIL_PROBABILITY = 1e-13
MAX_CAP = 200_000
# A campaign trial index (int32) holds a point of a rate sweep in its high
# bits and the trial within the point in its low TRIAL_BITS bits: one
# compiled program serves every point, and trial i draws from the same key at
# every point.
TRIAL_BITS = 24
TRIALS_PER_POINT = 2**TRIAL_BITS
MAX_POINTS = 2**(31 - TRIAL_BITS)


def point_index(point: int, trial: int) -> int:
    """The campaign index of trial ``trial`` of sweep point ``point``.

    Raises:
      ValueError: ``point`` is not in [0, MAX_POINTS) or ``trial`` not in
        [0, TRIALS_PER_POINT).
    """
    if not 0 <= point < MAX_POINTS:
        raise ValueError(f"point must be in [0, {MAX_POINTS}), got {point!r}")
    if not 0 <= trial < TRIALS_PER_POINT:
        raise ValueError(f"trial must be in [0, {TRIALS_PER_POINT}), got {trial!r}")
    return (point << TRIAL_BITS) | trial


def split_index(index: Any) -> tuple[Any, Any]:
    """(point, trial) of campaign indices (ints or integer arrays; negative: point 0)."""
    return (index >> TRIAL_BITS) * (index >= 0), index & (TRIALS_PER_POINT - 1)


class FaultList:
    """An explicit list of faults: trial ``i`` applies the faults of the list's ``i``-th trial.

    Rows are (trial, site, index, bit): ``site`` a site name, ``index`` a flat
    index or a multi-index into the site (its unit for a permanent plan) and
    ``bit`` a bit position (ignored by value fault models). Trials are
    numbered in the order of their first row (a trial label may be any
    integer). Give it to ``Plan(faults=...)``; the plan's selector must
    select every listed site, and its fault model says what a listed fault
    does (``BitFlip()`` flips the listed bit). A ``Campaign`` then runs at
    most ``len(fault_list)`` trials, with no randomness in where faults land.

    Args:
      rows: a DataFrame with columns ``site``, ``index`` and ``bit`` or
        ``bits`` (a tuple of positions, one fault each) and optionally
        ``trial`` (default: one trial per row), such as ``Result.faults()``
        of one plan; or a sequence of (trial, site, index, bit) tuples.
    """

    def __init__(self, rows: Any):
        self.rows = _fault_rows(rows)
        self.trials = tuple(dict.fromkeys(r[0] for r in self.rows))
        digest = hashlib.sha256(repr(self.rows).encode()).hexdigest()
        self._repr = f"FaultList({len(self.rows)} faults, {len(self.trials)} trials, sha256 {digest})"

    @classmethod
    def exhaustive(cls, site: Site, bits: Sequence[int] | None = None) -> FaultList:
        """One trial per (index, bit) of ``site``: every value, each of ``bits`` (all by default)."""
        positions = range(site.format.width) if bits is None else tuple(bits)
        pairs = ((i, b) for i in range(site.size) for b in positions)
        return cls([(n, site.name, i, b) for n, (i, b) in enumerate(pairs)])

    def __len__(self) -> int:
        """Number of trials."""
        return len(self.trials)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, FaultList) and self.rows == other.rows

    def __hash__(self) -> int:
        return hash(self.rows)

    def __repr__(self) -> str:
        return self._repr


def _fault_rows(rows: Any) -> tuple[tuple[int, str, Any, int], ...]:
    if hasattr(rows, "columns"):  # a DataFrame
        missing = {"site", "index"} - set(rows.columns)
        if missing or not {"bit", "bits"} & set(rows.columns):
            raise ValueError(f"FaultList needs columns site, index and bit (or bits), got {list(rows.columns)}")
        if "plan" in rows.columns and rows["plan"].nunique() > 1:
            raise ValueError("FaultList takes the faults of one plan: select one, e.g. "
                             "faults[faults.plan == 0]")
        trial = rows["trial"] if "trial" in rows.columns else range(len(rows))
        bits = rows["bits"] if "bits" in rows.columns else [(b,) for b in rows["bit"]]
        rows = [(t, s, i, b) for t, s, i, bs in zip(trial, rows["site"], rows["index"], bits) for b in bs]
    out = []
    for row in rows:
        if len(row) != 4:
            raise ValueError(f"a FaultList row is (trial, site, index, bit), got {row!r}")
        trial, site, index, bit = row
        if not isinstance(site, str):
            raise TypeError(f"a FaultList site must be a site name, got {site!r}")
        index = tuple(int(i) for i in index) if isinstance(index, (tuple, list, np.ndarray)) else int(index)
        out.append((int(trial), site, index, int(bit)))
    if not out:
        raise ValueError("FaultList needs at least one fault")
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where (``sites``), what (``fault``) and how many faults per trial.

    Give at most one of ``count`` (exact faults per trial), ``ber`` (bit error
    rate over the selected bits: each bit flips independently) or
    ``value_rate`` (each selected value is hit independently). The default is
    ``count=1``. ``max_faults`` overrides the static cap for rates (a trial
    that draws more is truncated and flagged ``overflow``). The cap never
    exceeds the population, so a rate of 1 hits every element.

    A rate may be a sequence of rates: a sweep whose points share one
    compiled program (the rate is data to it, the static cap is the largest
    point's). ``Campaign.run(point=j)`` runs point ``j``. Trial ``i`` draws
    from the same key at every point, so its faults at a lower rate are a
    subset of its faults at a higher rate (common random numbers): compare
    points with paired statistics. Point ``j`` of a sweep draws exactly the
    faults of a plan with the single rate ``rates[j]`` and ``max_faults`` set
    to the sweep's cap.

    Numbers may be Python or numpy scalars; they are stored as ``int`` and
    ``float``. Booleans, non-integer counts and caps, and rates outside
    [0, 1] (NaN included) are refused here, naming the field.

    The population is explicit: for single-bit fault models (``BitFlip(n=1)``,
    ``StuckAt(n=1)``) it is every allowed bit of every selected site, so a site
    is hit in proportion to its size times its number of allowed bits; for
    other models it is every value of the selected sites. Faults in one trial
    are drawn without replacement.

    ``permanent=True`` (activations and inputs sites only) makes each fault
    hit the same position in every input of the batch, as a stuck processing
    element or lane would: the population is then the unit of each site (its
    shape without the leading batch axis, axis 0), and a fault drawn there is
    applied to every row of the batch, and of every microbatch. Records give
    the position in the unit and the values of the first input. A fault model
    that draws random values or bits makes one draw per fault, shared by all
    inputs. Params faults are already the same for every input, so a
    permanent params plan is refused.

    ``faults`` (a ``FaultList``) replaces sampling: trial ``i`` applies the
    list's ``i``-th trial, so a campaign can be exhaustive, targeted or a
    replay of another run's faults; leave ``count``, ``ber`` and
    ``value_rate`` out.
    """

    sites: Selector
    fault: faults_lib.FaultModel = faults_lib.BitFlip()
    count: int | None = None
    ber: float | tuple[float, ...] | None = None
    value_rate: float | tuple[float, ...] | None = None
    max_faults: int | None = None
    permanent: bool = False
    faults: FaultList | None = None

    def __post_init__(self):
        if not isinstance(self.sites, Selector):
            raise TypeError(f"Plan.sites must be a selector (jaxfi.Params(...), ...), got {self.sites!r}")
        if not isinstance(self.fault, faults_lib.FaultModel):
            raise TypeError(f"Plan.fault must be a fault model, got {self.fault!r}")
        given = [f for f in ("count", "ber", "value_rate") if getattr(self, f) is not None]
        if self.faults is not None:
            if not isinstance(self.faults, FaultList):
                raise TypeError(f"Plan.faults must be a jaxfi.FaultList, got {self.faults!r}")
            if given or self.max_faults is not None:
                raise ValueError(f"a plan with a fault list takes no {given or ['max_faults']}: "
                                 "the list says how many faults each trial has")
            per_trial = collections.Counter(r[0] for r in self.faults.rows)
            object.__setattr__(self, "count", max(per_trial.values()))
            given = ["count"]
        if len(given) > 1:
            raise ValueError(f"give only one of count, ber, value_rate; got {given}")
        if not given:
            object.__setattr__(self, "count", 1)
        for name, value in (("count", self.count), ("max_faults", self.max_faults)):
            object.__setattr__(self, name, _integer(name, value))
        for name in ("ber", "value_rate"):
            object.__setattr__(self, name, _rates(name, getattr(self, name)))
        if self.faults is not None and self.points > 1:
            raise ValueError("a plan with a fault list has no rate sweep")
        if self.count is not None and self.count < 0:
            raise ValueError(f"count must be a non-negative integer, got {self.count!r}")
        if self.ber is not None and self.fault.granularity != "bit":
            raise ValueError(
                f"ber needs a single-bit fault model (BitFlip(n=1) or StuckAt(n=1)), got {self.fault!r}")
        self._check_max_faults()
        self._check_permanent()

    def _check_permanent(self) -> None:
        if not isinstance(self.permanent, (bool, np.bool_)):
            raise TypeError(f"permanent must be a bool, got {self.permanent!r}")
        object.__setattr__(self, "permanent", bool(self.permanent))
        if self.permanent and self.kind == "params":
            raise ValueError("permanent=True is for activations and inputs sites: a params "
                             "fault is already the same for every input, so leave it out")

    def _check_max_faults(self) -> None:
        if self.max_faults is None:
            return
        if self.count is not None:
            raise ValueError(f"max_faults caps a rate (ber or value_rate); with count={self.count} "
                             f"the number of faults is exact, so leave max_faults out "
                             f"(got max_faults={self.max_faults})")
        if not 1 <= self.max_faults <= MAX_CAP:
            raise ValueError(f"max_faults must be an integer in [1, {MAX_CAP}], got {self.max_faults!r}")

    @property
    def kind(self) -> str:
        return self.sites.kind

    @property
    def rates(self) -> tuple[float, ...] | None:
        """The rate of every sweep point (one for a single rate), or None for a count."""
        rate = self.ber if self.ber is not None else self.value_rate
        return None if rate is None else rate if isinstance(rate, tuple) else (rate,)

    @property
    def points(self) -> int:
        """Number of sweep points: the rates given as a sequence, else 1."""
        return len(self.rates) if self.rates is not None else 1

    @property
    def granularity(self) -> str:
        """"bit" if the population is bits, "value" if it is values."""
        return "value" if self.value_rate is not None else self.fault.granularity

    def population(self, candidates: Sequence[Site]) -> Population:
        """Resolve this plan against candidate sites (cached per plan and sites)."""
        return _population(self, tuple(candidates))


def probability(name: str, value: Any) -> float | None:
    """``value`` as a float in [0, 1] (None stays None), or an error naming ``name``.

    Args:
      name: the argument's name, for the error message.
      value: None, or a real number (Python or numpy; not a bool).

    Returns:
      None or the probability as a Python float.

    Raises:
      TypeError: ``value`` is a bool or not a real number.
      ValueError: ``value`` is NaN or outside [0, 1].
    """
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1], got {value!r} "
                        f"({type(value).__name__})")
    if not 0.0 <= float(value) <= 1.0:  # also refuses NaN
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def _rates(name: str, value: Any) -> float | tuple[float, ...] | None:
    """A rate, or a sweep of rates (a non-empty sequence of at most MAX_POINTS)."""
    if not isinstance(value, (list, tuple, np.ndarray)):
        return probability(name, value)
    rates = tuple(probability(f"{name}[{j}]", r) for j, r in enumerate(value))
    if not 1 <= len(rates) <= MAX_POINTS:
        raise ValueError(f"{name} as a sweep needs 1 to {MAX_POINTS} rates, got {len(rates)}")
    return rates


def _integer(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


@dataclasses.dataclass(frozen=True)
class Population:
    """The static sampling population of a plan over concrete sites.

    ``positions[s]`` lists the allowed bits of site ``s`` (bit granularity);
    ``weights[s]`` is the number of population elements in site ``s``.
    ``thresholds`` (if a rate is used) are 64-bit fixed-point survival
    probabilities P(N > k), k = 0..cap, of the binomial fault count, one row
    per sweep point (shape [points, cap + 1]).
    """

    plan: Plan
    sites: tuple[Site, ...]
    positions: tuple[tuple[int, ...], ...]
    weights: tuple[int, ...]
    cap: int
    thresholds: np.ndarray | None
    listed: tuple[np.ndarray, ...] | None = None

    @property
    def total(self) -> int:
        """Size of the population (bits or values)."""
        return sum(self.weights)

    @property
    def record_width(self) -> int:
        """Bit width of raw values in records: 64 if any site is 64-bit, else 32."""
        return 64 if any(s.format.width == 64 for s in self.sites) else 32

    @property
    def expected(self) -> float:
        """Expected number of faults per trial, averaged over the sweep's points."""
        p = self.plan
        if p.count is not None:
            return float(p.count)
        return self.total * float(np.mean(p.rates))


@functools.lru_cache(maxsize=256)
def _population(plan: Plan, candidates: tuple[Site, ...]) -> Population:
    sites = plan.sites.select(candidates)
    if plan.permanent:
        sites = units(sites)
    granularity = plan.granularity
    positions = []
    for site in sites:
        fmt = site.format
        plan.fault.validate(fmt)
        positions.append(plan.fault.positions(fmt) if granularity == "bit" else ())
    weights = tuple(s.size * (len(b) if granularity == "bit" else 1)
                    for s, b in zip(sites, positions))
    total = sum(weights)
    rates = plan.rates
    if plan.faults is not None:
        listed = _listed(plan, sites, positions)
        return Population(plan, sites, tuple(positions), weights, plan.count, None, listed)
    if rates is None:
        if plan.count > total:
            raise ValueError(
                f"count={plan.count} faults per trial exceeds the population of "
                f"{total} {granularity}s in the selected sites")
        return Population(plan, sites, tuple(positions), weights, plan.count, None)
    cap, thresholds = _binomial_thresholds(total, rates, plan.max_faults)
    return Population(plan, sites, tuple(positions), weights, cap, thresholds)


def _listed(plan: Plan, sites: Sequence[Site], positions: Sequence[Sequence[int]]) -> tuple[np.ndarray, ...]:
    """A fault list as [trials, cap] arrays (site, index, bit, valid), each
    trial's faults sorted by (site, index, bit) as drawn faults are."""
    ids = {s.name: n for n, s in enumerate(sites)}
    per_trial: dict[int, list[tuple[int, int, int]]] = {t: [] for t in plan.faults.trials}
    for trial, name, index, bit in plan.faults.rows:
        if name not in ids:
            near = difflib.get_close_matches(name, list(ids), n=3, cutoff=0.4)
            raise ValueError(f"FaultList site {name!r} is not selected by plan {plan.sites.describe()}; "
                             f"close matches: {near or 'none'} (of {len(ids)} selected sites)")
        site = sites[ids[name]]
        per_trial[trial].append((ids[name], _flat_index(site, index), _bit(plan, site, positions[ids[name]], bit)))
    table = np.zeros((4, len(per_trial), plan.count), np.int32)
    for t, faults in enumerate(per_trial.values()):
        faults = sorted(faults)
        if len(set(faults)) < len(faults):
            raise ValueError(f"FaultList trial {plan.faults.trials[t]} lists the same (site, index, bit) twice")
        for k, fault in enumerate(faults):
            table[:, t, k] = (*fault, 1)
    return table[0], table[1], table[2], table[3].astype(bool)


def _flat_index(site: Site, index: int | tuple[int, ...]) -> int:
    if isinstance(index, tuple):
        if len(index) != len(site.shape) or any(not 0 <= i < n for i, n in zip(index, site.shape)):
            raise ValueError(f"FaultList index {index} is out of range for site {site.name!r} of "
                             f"shape {site.shape}")
        return int(np.ravel_multi_index(index, site.shape)) if site.shape else 0
    if not 0 <= index < site.size:
        raise ValueError(f"FaultList flat index {index} is out of range for site {site.name!r} "
                         f"({site.size} values)")
    return index


def _bit(plan: Plan, site: Site, allowed: Sequence[int], bit: int) -> int:
    if plan.granularity != "bit":
        return 0
    if bit not in allowed:
        raise ValueError(f"FaultList bit {bit} of site {site.name!r} is not one that "
                         f"{plan.fault!r} can hit on {site.dtype.name}: allowed {list(allowed)}")
    return bit


def units(sites: Sequence[Site]) -> tuple[Site, ...]:
    """Each site's unit: the site without its leading batch axis (axis 0).

    Raises:
      ValueError: a site is a scalar, so it has no batch axis.
    """
    scalars = [s.name for s in sites if not s.shape]
    if scalars:
        raise ValueError(f"a permanent plan needs sites with a leading batch axis; {scalars[:5]} "
                         "are scalars: exclude them (e.g. where=lambda s: len(s.shape) > 0)")
    return tuple(dataclasses.replace(s, shape=tuple(s.shape[1:])) for s in sites)


def _binomial_thresholds(n: int, rates: Sequence[float], cap: int | None) -> tuple[int, np.ndarray]:
    """Static cap and 64-bit fixed-point survival thresholds of Binomial(n, p), one row per rate p.

    Computed exactly in float64 at trace time; sampling compares one 64-bit
    uniform word against them, which works wherever integer compares work
    (unlike jax.random.binomial, whose variance is wrong for huge n). The cap
    is the largest rate's, so every row has the same length.
    """
    p = max(rates)
    if cap is None:
        cap = max(int(sps.binom.isf(TAIL_PROBABILITY, n, p)) + 1 if p > 0 else 1, 1)
    # A trial never draws more faults than the population holds elements, so
    # the cap of a rate that can hit every element is the population size.
    cap = min(cap, n)
    if cap > MAX_CAP:
        raise ValueError(
            f"rate {p} over {n} population elements expects {n * p:.3g} faults per "
            f"trial (cap {cap} > {MAX_CAP}); use a lower rate or fewer sites")
    rows = []
    for rate in rates:
        sf = sps.binom.sf(np.arange(cap + 1), n, rate)
        scaled = np.floor(np.clip(sf, 0.0, 1.0) * 2.0**64)
        rows.append([min(int(x), 2**64 - 1) for x in scaled])
    return cap, np.array(rows, dtype=np.uint64)
