"""Statistics for fault-injection campaigns: intervals, sample sizes, per-stratum rates.

Conventions used throughout:

* Counts `k` (events) and `n` (trials) are non-negative integers (integer
  dtypes or integer-valued floats), broadcast against each other. Scalars in
  give Python floats out; arrays in give numpy arrays out.
* An empty sample (`n == 0`) has rate NaN and the vacuous interval (0, 1): it
  contains every rate, so it is honest, it never looks converged, and it keeps
  NaN out of interval arithmetic and plots.
* `method` is "wilson" (score interval; close to nominal coverage on average,
  the default) or "clopper_pearson" (exact; coverage at least nominal for
  every rate, hence wider).
* The mean of a continuous figure (accuracy, logit deviation, a per-trial
  fraction) gets a Student-t interval over trials (`mean_interval`): trials
  are the unit of replication, and the t quantile stays honest for the few
  dozen trials of a sweep point, where a normal quantile is too narrow.
* A figure with a `baseline` (the value of a trial whose faults change
  nothing: the golden error, 0 for a fraction of affected inputs or a paired
  difference) is guarded against samples where few trials changed: with
  fewer than `MIN_CHANGED` trials away from the baseline, the t interval
  (zero-width when none changed) is replaced by the changed-share bound,
  which holds whatever the changed trials' values (see `mean_interval`).
  Rates of affected inputs treat the trial as a cluster of inputs.
* `half_width` is (hi - lo) / 2. Both intervals are asymmetric near 0 and 1,
  so this is the width a campaign compares with its target margin, not the
  distance from the rate to either bound.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as _sps

ArrayLike = Any  # scalars, sequences or numpy arrays of counts
Interval = tuple[float, float] | tuple[np.ndarray, np.ndarray]

METHODS = ("wilson", "clopper_pearson")
# Changed trials (values away from the baseline) a sample needs before its
# Student-t interval is used. Simulated sequential runs (tests/test_stats.py)
# kept coverage at 95% nominal >= 0.95 with 10 and fell to 0.87-0.94 with 1-5
# for skewed samples of small shifts.
MIN_CHANGED = 10


# ---------------------------------------------------------------- validation


def _check_fraction(name: str, value: Any, *, closed: bool = False) -> float:
    """A real number in (0, 1), or [0, 1] when `closed`; named in errors."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    ok = 0.0 <= value <= 1.0 if closed else 0.0 < value < 1.0
    if not ok:
        allowed = "[0, 1]" if closed else "(0, 1)"
        raise ValueError(f"{name} must be in {allowed}, got {value!r}")
    return value


def _count_array(name: str, value: ArrayLike) -> np.ndarray:
    """Non-negative integer-valued counts as float64 (exact up to 2**53)."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold integer counts, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr) | (arr < 0) | (arr != np.floor(arr))
    if bad.any():
        raise ValueError(
            f"{name} must be non-negative integers, got {arr[bad].flat[0]!r}")
    return arr


def _counts(k: ArrayLike, n: ArrayLike) -> tuple[np.ndarray, np.ndarray, bool]:
    """Validated, broadcast (k, n) and whether both came in as scalars."""
    k_arr, n_arr = _count_array("k", k), _count_array("n", n)
    try:
        k_b, n_b = np.broadcast_arrays(k_arr, n_arr)
    except ValueError:
        raise ValueError(
            f"k and n must broadcast, got shapes {k_arr.shape} and {n_arr.shape}"
        ) from None
    over = k_b > n_b
    if over.any():
        i = np.argwhere(over)[0]
        raise ValueError(
            f"k must not exceed n, got k={k_b[tuple(i)]:.0f} > n={n_b[tuple(i)]:.0f}")
    return k_b, n_b, k_arr.ndim == 0 and n_arr.ndim == 0


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method


def _z(confidence: float) -> float:
    """Two-sided standard-normal quantile; isf keeps precision near 1."""
    return float(_sps.norm.isf((1.0 - confidence) / 2.0))


def _out(lo: np.ndarray, hi: np.ndarray, scalar: bool) -> Interval:
    return (float(lo), float(hi)) if scalar else (lo, hi)


# ----------------------------------------------------------------- intervals


def wilson(k: ArrayLike, n: ArrayLike, confidence: float = 0.95) -> Interval:
    """Wilson score interval for a binomial rate k/n, vectorised.

    Returns (lo, hi): floats for scalar inputs, arrays otherwise. Exact edges:
    k == 0 gives lo == 0, k == n gives hi == 1, n == 0 gives (0, 1).
    """
    k, n, scalar = _counts(k, n)
    z = _z(_check_fraction("confidence", confidence))
    z2 = z * z
    with np.errstate(divide="ignore", invalid="ignore"):
        centre = (k + z2 / 2.0) / (n + z2)
        spread = np.sqrt(k * (n - k) / n + z2 / 4.0)
        half = z / (n + z2) * spread
    # The formula gives 0 and 1 at the edges only up to rounding; pin them.
    lo = np.where(k == 0, 0.0, np.clip(centre - half, 0.0, 1.0))
    hi = np.where(k == n, 1.0, np.clip(centre + half, 0.0, 1.0))
    return _out(lo, hi, scalar)


def clopper_pearson(k: ArrayLike, n: ArrayLike,
                    confidence: float = 0.95) -> Interval:
    """Clopper-Pearson ("exact") interval for a binomial rate k/n, vectorised.

    Bounds are beta quantiles: lo = Beta(k, n-k+1).ppf(a/2), hi =
    Beta(k+1, n-k).isf(a/2) with a = 1 - confidence. Same return convention
    and edge cases as `wilson`.
    """
    k, n, scalar = _counts(k, n)
    tail = (1.0 - _check_fraction("confidence", confidence)) / 2.0
    # Beta parameters must be positive; the edge cases are pinned below, so
    # substitute 1 there to keep scipy free of invalid-argument NaNs.
    lo = _sps.beta.ppf(tail, np.where(k > 0, k, 1.0), n - k + 1.0)
    hi = _sps.beta.isf(tail, k + 1.0, np.where(k < n, n - k, 1.0))
    lo = np.where(k == 0, 0.0, lo)
    hi = np.where(k == n, 1.0, hi)
    return _out(lo, hi, scalar)


_INTERVALS = {"wilson": wilson, "clopper_pearson": clopper_pearson}


def rate_summary(k: ArrayLike, n: ArrayLike, confidence: float = 0.95,
                 method: str = "wilson") -> dict[str, float] | pd.DataFrame:
    """Rate, interval and half-width for k events in n trials.

    Scalar inputs give a dict with keys k, n, rate, lo, hi, half_width;
    array inputs give a DataFrame with those columns (one row per element).
    """
    lo, hi = _INTERVALS[_check_method(method)](k, n, confidence)
    k_arr, n_arr, scalar = _counts(k, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = np.where(n_arr > 0, k_arr / n_arr, np.nan)
    half = (np.asarray(hi) - np.asarray(lo)) / 2.0
    cols = {"k": k_arr.astype(np.int64), "n": n_arr.astype(np.int64),
            "rate": rate, "lo": lo, "hi": hi, "half_width": half}
    if scalar:
        return {name: np.asarray(v).item() for name, v in cols.items()}
    return pd.DataFrame({name: np.ravel(v) for name, v in cols.items()})


def leveugle_sample_size(population: int | float | None, margin: float = 0.01,
                         confidence: float = 0.95, p: float = 0.5) -> int:
    """Number of faults to inject for a margin of error at a confidence level.

    Leveugle et al. (DATE 2009), simple random sampling without replacement:
    n = N / (1 + e^2 (N - 1) / (t^2 p (1 - p))), rounded up; `population`
    None or inf gives the infinite-population limit t^2 p (1 - p) / e^2.
    t is the exact normal quantile (1.959964 for 95%): 95% / 1% gives
    9603.65 -> 9604, the paper's figure (t = 1.96 gives 9604.0 too). Where
    tables round t coarsely (2.58 for 99%) they are a little larger than
    this function (16641 vs 16588 at 99% / 1%).
    """
    e = _check_fraction("margin", margin)
    t = _z(_check_fraction("confidence", confidence))
    p = _check_fraction("p", p, closed=True)
    infinite = t * t * p * (1.0 - p) / (e * e)
    if population is None or population == math.inf:
        return math.ceil(infinite)
    if (isinstance(population, bool) or not isinstance(population, numbers.Integral)
            or population < 1):
        raise ValueError(
            f"population must be a positive integer, None or inf, got {population!r}")
    if infinite == 0.0:  # p in {0, 1}: no variance, nothing to estimate
        return 0
    return math.ceil(population / (1.0 + (population - 1) / infinite))


# --------------------------------------------------------- continuous values


def _t_interval(mean: np.ndarray, std: np.ndarray, count: np.ndarray,
                confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """mean -+ t(count - 1) * std / sqrt(count); NaN where count < 2 (no spread known)."""
    quantile = _sps.t.isf((1.0 - confidence) / 2.0, np.maximum(count - 1, 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        half = np.where(count >= 2, quantile * std / np.sqrt(count), np.nan)
    return mean - half, mean + half


def mean_interval(values: ArrayLike, confidence: float = 0.95,
                  bounds: tuple[float, float] | None = None, baseline: float | None = None,
                  min_changed: int = MIN_CHANGED) -> dict[str, Any]:
    """Mean of the finite values with a confidence interval, e.g. over trials.

    Non-finite values (e.g. the logit deviation of a DUE trial) are left out.
    Without ``baseline`` the interval is Student-t. With it, the values are
    those of trials that either keep the baseline exactly (the faults changed
    nothing) or move anywhere in ``bounds``; while fewer than
    ``min_changed`` values differ from it, the interval is the changed-share
    bound ``[b + u (low - b), b + u (high - b)]``, where ``u`` is the
    one-sided Clopper-Pearson upper bound of the share of trials that
    change anything: the mean is ``b + share * (mean of changed - b)``, so it
    lies in that interval whenever the share is at most ``u`` (probability
    at least ``confidence``), whatever the changed trials' values. A sample
    where nothing changed thus gets an interval about 3/n wide at 95%,
    never a zero-width one.

    Args:
      values: one value per unit of replication (per trial).
      confidence: the interval's confidence level, in (0, 1).
      bounds: (low, high) the figure cannot leave, e.g. (0, 1) for a
        fraction; the interval is clipped to them. None: no clipping.
        Required with ``baseline``.
      baseline: the value of a trial whose faults changed nothing, or None.
      min_changed: changed values needed before the t interval is used.

    Returns:
      A dict with mean, lo, hi, half_width ((hi - lo) / 2), n (the number of
      finite values used), changed (values away from the baseline; None
      without one) and method ("t" or "changed-share bound"). lo and hi are
      NaN below two values without a baseline, the mean is NaN for none.
    """
    confidence = _check_fraction("confidence", confidence)
    arr = np.asarray(values, dtype=np.float64).ravel()
    arr = arr[np.isfinite(arr)]
    count = arr.size
    mean = arr.mean() if count else np.nan
    changed = None if baseline is None else int(np.count_nonzero(arr != baseline))
    if changed is not None and changed < min_changed:
        if bounds is None:
            raise ValueError("mean_interval with a baseline needs bounds (the values' range)")
        lo, hi = _changed_share_bound(changed, count, float(baseline), bounds, confidence)
        method = "changed-share bound"
    else:
        std = arr.std(ddof=1) if count >= 2 else np.nan
        lo, hi = _t_interval(np.float64(mean), np.float64(std), np.float64(count), confidence)
        if bounds is not None:
            lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
        method = "t"
    return {"mean": float(mean), "lo": float(lo), "hi": float(hi), "half_width": float((hi - lo) / 2.0),
            "n": int(count), "changed": changed, "method": method}


def _changed_share_bound(changed: int, n: int, baseline: float, bounds: tuple[float, float],
                         confidence: float) -> tuple[float, float]:
    """[b + u (low - b), b + u (high - b)] with u the one-sided upper bound of the changed share."""
    upper = float(_sps.beta.ppf(confidence, changed + 1, n - changed)) if changed < n else 1.0
    return baseline + upper * (bounds[0] - baseline), baseline + upper * (bounds[1] - baseline)


def paired_interval(a: ArrayLike, b: ArrayLike, confidence: float = 0.95,
                    bounds: tuple[float, float] = (0.0, 1.0), baseline: float = 0.0,
                    min_changed: int = MIN_CHANGED) -> dict[str, Any]:
    """The mean difference ``a - b`` of paired values, with a guarded interval.

    Trials that share keys (trial ``i`` of two sweep points, two models or
    two site kinds with one seed) are paired: their difference varies far
    less than either value, so the paired interval is the one to compare
    them with, and an independent-sample interval would be too wide (or, at
    low rates, meaningless). A pair where neither trial changed differs by
    exactly ``baseline`` (0 for one model at two rates; the difference of the
    golden values for two models), so the interval is ``mean_interval`` of
    the differences around that baseline: never zero-width while fewer than
    ``min_changed`` pairs moved.

    Args:
      a: one value per trial.
      b: one value per trial, trial ``i`` paired with trial ``i`` of ``a``
        (same length).
      confidence: the interval's confidence level.
      bounds: the range of each value; differences lie in
        [low - high, high - low].
      baseline: the difference of a pair whose faults changed nothing.
      min_changed: as in ``mean_interval``.

    Returns:
      ``mean_interval``'s dict for the differences.

    Raises:
      ValueError: ``a`` and ``b`` differ in length.
    """
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same number of trials, got {a.size} and {b.size}")
    spread = bounds[1] - bounds[0]
    return mean_interval(a - b, confidence, (-spread, spread), baseline=baseline, min_changed=min_changed)


# ------------------------------------------------------- per-stratum rates


def _require_columns(table: pd.DataFrame, names: Sequence[str], what: str) -> None:
    absent = [c for c in names if c not in table.columns]
    if absent:
        raise ValueError(
            f"{what} {absent} not in table; columns are {list(table.columns)}")


def _event_column(table: pd.DataFrame, name: str) -> pd.Series:
    """A per-trial event column as 0/1 integers; rejects anything else."""
    col = table[name]
    if col.dtype == bool:
        return col.astype(np.int64)
    if not pd.api.types.is_numeric_dtype(col) or not col.isin([0, 1]).all():
        raise ValueError(
            f"outcome column {name!r} must be boolean or 0/1 per trial (pass "
            f"`denominator` for counts), got dtype {col.dtype} with values "
            f"{col[~col.isin([0, 1])].unique()[:5].tolist()}")
    return col.astype(np.int64)


def _count_column(table: pd.DataFrame, name: str, denom: pd.Series) -> pd.Series:
    """A per-trial count column, checked against its per-trial denominator."""
    counts = table[name]
    _count_array(f"outcome column {name!r}", counts.to_numpy())
    over = counts.to_numpy() > denom.to_numpy()
    if over.any():
        row = table.index[over][0]
        raise ValueError(
            f"outcome column {name!r} exceeds its denominator at row {row!r}: "
            f"{counts[row]} > {denom[row]}")
    return counts.astype(np.int64)


def _denominators(table: pd.DataFrame, denominator: str | int) -> pd.Series:
    if isinstance(denominator, str):
        _require_columns(table, [denominator], "denominator column")
        values = table[denominator]
        _count_array(f"denominator column {denominator!r}", values.to_numpy())
        return values.astype(np.int64)
    if isinstance(denominator, bool) or not isinstance(denominator, numbers.Integral) \
            or denominator < 1:
        raise ValueError(
            f"denominator must be a column name or a positive int, got {denominator!r}")
    return pd.Series(int(denominator), index=table.index, dtype=np.int64)


def _events_and_units(table: pd.DataFrame, outcomes: Sequence[str],
                      denominator: str | int | None) -> pd.DataFrame:
    """Per-trial columns {o}_k and {o}_n whose group sums give the counts."""
    denom = None if denominator is None else _denominators(table, denominator)
    cols = {}
    for name in outcomes:
        if denom is None:
            cols[f"{name}_k"] = _event_column(table, name)
            cols[f"{name}_n"] = pd.Series(1, index=table.index, dtype=np.int64)
        else:
            cols[f"{name}_k"] = _count_column(table, name, denom)
            cols[f"{name}_n"] = denom
    return pd.DataFrame(cols, index=table.index)


def _grouped(frame: pd.DataFrame, keys: pd.DataFrame | None, how: str) -> pd.DataFrame:
    """Column-wise reduction `how` per stratum, or over everything."""
    if keys is None:
        return getattr(frame, how)().to_frame().T.reset_index(drop=True)
    groups = frame.groupby([keys[c] for c in keys.columns], sort=True,
                           dropna=False, observed=True)
    return getattr(groups, how)().reset_index()


def _finite_or_nan(table: pd.DataFrame, name: str) -> pd.Series:
    """A continuous column as float64 with non-finite values masked out."""
    try:
        values = table[name].astype(np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"continuous column {name!r} must be numeric, got dtype "
                         f"{table[name].dtype}") from None
    return values.where(np.isfinite(values))


def _continuous_columns(table: pd.DataFrame, names: Sequence[str],
                        keys: pd.DataFrame | None, confidence: float) -> pd.DataFrame:
    values = pd.DataFrame({c: _finite_or_nan(table, c) for c in names},
                          index=table.index)
    mean = _grouped(values, keys, "mean")
    std = _grouped(values, keys, "std")
    count = _grouped(values, keys, "count")
    out = {}
    for c in names:
        lo, hi = _t_interval(mean[c].to_numpy(), std[c].to_numpy(),
                             count[c].to_numpy(), confidence)
        out.update({f"{c}_mean": mean[c], f"{c}_lo": lo, f"{c}_hi": hi,
                    f"{c}_n": count[c].astype(np.int64)})
    return pd.DataFrame(out)


def _check_names(by: list[str], outcomes: list[str], continuous: list[str]) -> None:
    """Inputs and generated summary columns must all be distinct."""
    names = [*by, "trials", *outcomes, *continuous]
    names += [f"{o}_{s}" for o in outcomes for s in ("k", "n", "rate", "lo", "hi")]
    names += [f"{c}_{s}" for c in continuous for s in ("mean", "lo", "hi", "n")]
    seen = pd.Series(names)
    collide = sorted(set(seen[seen.duplicated()]))
    if collide:
        raise ValueError(f"summary column names collide: {collide}; rename the "
                         "outcome, continuous or `by` columns")


def stratified_rates(table: pd.DataFrame, outcomes: Sequence[str],
                     by: Sequence[str] | None = None, confidence: float = 0.95,
                     method: str = "wilson", *, denominator: str | int | None = None,
                     continuous: Sequence[str] = ()) -> pd.DataFrame:
    """Per-stratum rates with confidence intervals, one row per stratum.

    `table` has one row per trial. Without `denominator`, each outcome column
    is a per-trial event (bool or 0/1, e.g. "sdc": the trial changed at least
    one top-1) and its rate is events / trials. With `denominator` (a column
    name of per-trial unit counts, or an int such as the batch size), outcome
    columns are per-trial counts of affected units and the rate is
    sum(counts) / sum(denominators), with a cluster interval over trials
    (``cluster_interval``; ``method`` applies to per-trial events only):
    units hit by the same fault are not independent.

    Columns: the `by` keys (sorted strata; all trials as one row when None),
    `trials`, then per outcome {o}_k, {o}_n, {o}_rate, {o}_lo, {o}_hi, then
    per `continuous` column {c}_mean, {c}_lo, {c}_hi, {c}_n (Student-t, as
    `mean_interval`).
    """
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"table must be a pandas DataFrame, got {type(table).__name__}")
    outcomes, continuous, by = list(outcomes), list(continuous), list(by or [])
    _require_columns(table, outcomes, "outcome columns")
    _require_columns(table, continuous, "continuous columns")
    _require_columns(table, by, "`by` columns")
    _check_names(by, outcomes, continuous)
    confidence = _check_fraction("confidence", confidence)
    interval = _INTERVALS[_check_method(method)]
    keys = table[by] if by else None

    units = _events_and_units(table, outcomes, denominator)
    sums = _grouped(units, keys, "sum")
    trials = _grouped(pd.DataFrame({"trials": np.ones(len(table), np.int64)},
                                   index=table.index), keys, "sum")
    parts = [trials]
    for name in outcomes:
        k, n = sums[f"{name}_k"].to_numpy(), sums[f"{name}_n"].to_numpy()
        if denominator is None:
            lo, hi = interval(k, n, confidence)
        else:
            lo, hi = _per_stratum(units[[f"{name}_k", f"{name}_n"]], keys, confidence)
        rate = np.where(n > 0, k / np.maximum(n, 1), np.nan)
        parts.append(pd.DataFrame({f"{name}_k": k, f"{name}_n": n,
                                   f"{name}_rate": rate, f"{name}_lo": lo,
                                   f"{name}_hi": hi}))
    if continuous:
        parts.append(_continuous_columns(table, continuous, keys, confidence))
    return pd.concat(parts, axis=1)


def _per_stratum(units: pd.DataFrame, keys: pd.DataFrame | None,
                 confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """``cluster_interval`` of every stratum, in ``_grouped``'s order."""
    k_name, n_name = units.columns
    if keys is None:
        groups = [units]
    else:
        grouped = units.groupby([keys[c] for c in keys.columns], sort=True, dropna=False, observed=True)
        groups = [rows for _, rows in grouped]
    bounds = [cluster_interval(g[k_name].to_numpy(), g[n_name].to_numpy(), confidence) for g in groups]
    return (np.array([b[0] for b in bounds], np.float64).reshape(-1),
            np.array([b[1] for b in bounds], np.float64).reshape(-1))


def cluster_interval(k: ArrayLike, n: ArrayLike, confidence: float = 0.95,
                     min_changed: int = MIN_CHANGED) -> tuple[float, float]:
    """Interval of the rate sum(k) / sum(n) of units clustered in trials.

    Trial ``i`` affected ``k[i]`` of its ``n[i]`` units (inputs). One fault
    changes many inputs at once, so inputs are not independent; the trial is
    the cluster: a Student-t interval of the ratio estimator over trials
    (linearised residuals ``k - rate * n``), guarded like ``mean_interval``:
    with fewer than ``min_changed`` trials that affected any unit, the
    interval is [0, u * max(n) / mean(n)], ``u`` the one-sided
    Clopper-Pearson upper bound of the share of such trials (the rate is at
    most that share when every trial has the same ``n``).

    Args:
      k: affected units per trial.
      n: units per trial (all positive).
      confidence: the interval's confidence level.
      min_changed: as in ``mean_interval``.

    Returns:
      (lo, hi), clipped to [0, 1]; (0, 1) for no trials.
    """
    k, n = np.asarray(k, np.float64).ravel(), np.asarray(n, np.float64).ravel()
    m = k.size
    if m == 0:
        return 0.0, 1.0
    changed = int(np.count_nonzero(k))
    if changed < min_changed:
        upper = float(_sps.beta.ppf(confidence, changed + 1, m - changed)) if changed < m else 1.0
        return 0.0, min(1.0, upper * float(n.max() / n.mean()))
    rate = k.sum() / n.sum()
    residual = (k - rate * n) / n.mean()
    lo, hi = _t_interval(np.float64(rate), np.float64(residual.std(ddof=1)), np.float64(m), confidence)
    return max(float(lo), 0.0), min(float(hi), 1.0)


# ----------------------------------------------------------------- stopping


def _rate_counts(summary_or_counts: Any) -> tuple[np.ndarray, np.ndarray]:
    """(k, n) arrays from a stratified_rates() table, a rate_summary() dict/table or
    a (k, n) pair."""
    src = summary_or_counts
    if isinstance(src, pd.DataFrame):
        if {"k", "n"} <= set(src.columns):
            return src["k"].to_numpy(), src["n"].to_numpy()
        names = [c[:-2] for c in src.columns
                 if c.endswith("_k") and f"{c[:-2]}_n" in src.columns]
        if not names:
            raise ValueError("summary_or_counts has no {name}_k/{name}_n count "
                             f"columns; columns are {list(src.columns)}")
        return (np.concatenate([src[f"{c}_k"].to_numpy() for c in names]),
                np.concatenate([src[f"{c}_n"].to_numpy() for c in names]))
    if isinstance(src, Mapping):
        return np.asarray(src["k"]), np.asarray(src["n"])
    if isinstance(src, tuple) and len(src) == 2:
        return np.asarray(src[0]), np.asarray(src[1])
    raise TypeError("summary_or_counts must be a stratified_rates() DataFrame, a "
                    f"rate_summary() result or a (k, n) pair, got {type(src).__name__}")


def converged(summary_or_counts: Any, margin: float, confidence: float = 0.95,
              method: str = "wilson") -> bool:
    """True when every rate's interval half-width is at most `margin`.

    Intervals are recomputed from the counts at `confidence` with `method`,
    so the stopping rule does not depend on how the summary was built. Empty
    strata (n == 0) never converge, and neither does an empty summary.
    """
    margin = _check_fraction("margin", margin)
    k, n = _rate_counts(summary_or_counts)
    lo, hi = _INTERVALS[_check_method(method)](k, n, confidence)
    half = (np.asarray(hi) - np.asarray(lo)) / 2.0
    return bool(np.size(n) > 0 and np.all(np.asarray(n) > 0) and np.all(half <= margin))

