"""Tests for jaxfi._src.stats: intervals, sample sizes, summaries, stopping."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binom
from scipy.stats import t as t_dist

from jaxfi import stats

Z95 = 1.959963984540054  # standard normal 0.975 quantile


def _wilson_by_quadratic(k, n, z=Z95):
    """Wilson bounds as the roots of (phat - p)^2 = z^2 p (1 - p) / n."""
    phat = k / n
    a, b, c = 1 + z * z / n, -(2 * phat + z * z / n), phat * phat
    return tuple(sorted(np.roots([a, b, c]).real))


# ------------------------------------------------------------- sample size


def test_leveugle_infinite_population_is_9604():
    # 1.959964^2 * 0.25 / 0.01^2 = 9603.65 -> 9604, the paper's figure.
    assert stats.leveugle_sample_size(None) == 9604
    assert stats.leveugle_sample_size(math.inf) == 9604
    assert stats.leveugle_sample_size(10**15) == 9604


def test_leveugle_finite_population_by_hand():
    # N = 10000, e = 5%, 95%: t^2 p(1-p) = 3.841459 * 0.25 = 0.960365;
    # n = 10000 / (1 + 0.0025 * 9999 / 0.960365) = 10000 / 27.0292 = 369.97.
    # Krejcie & Morgan (1970), same formula, tabulate 370; also 80 and 278.
    assert stats.leveugle_sample_size(10000, margin=0.05) == 370
    assert stats.leveugle_sample_size(1000, margin=0.05) == 278
    assert stats.leveugle_sample_size(100, margin=0.05) == 80


def test_leveugle_small_populations_and_p():
    assert stats.leveugle_sample_size(1) == 1
    assert stats.leveugle_sample_size(500, margin=0.001) <= 500
    assert stats.leveugle_sample_size(None, p=0.1) == math.ceil(Z95**2 * 0.09 / 1e-4)
    assert stats.leveugle_sample_size(None, p=0.0) == 0


@pytest.mark.parametrize("kwargs, name", [
    ({"margin": 0.0}, "margin"), ({"margin": 1.0}, "margin"),
    ({"confidence": 1.0}, "confidence"), ({"confidence": -0.5}, "confidence"),
    ({"p": 1.5}, "p must"), ({"population": 0}, "population"),
    ({"population": 2.5}, "population"), ({"population": -3}, "population"),
])
def test_leveugle_validation_names_argument(kwargs, name):
    args = {"population": None, **kwargs}
    with pytest.raises(ValueError, match=name):
        stats.leveugle_sample_size(**args)


# --------------------------------------------------------------- intervals


def test_wilson_published_figures():
    lo, hi = stats.wilson(0, 100)
    assert lo == 0.0 and hi == pytest.approx(0.0370, abs=5e-5)
    assert hi == pytest.approx(Z95**2 / (100 + Z95**2), rel=1e-12)  # k = 0 closed form
    lo, hi = stats.wilson(3, 1000)
    assert (lo, hi) == pytest.approx(_wilson_by_quadratic(3, 1000), rel=1e-9)
    assert lo == pytest.approx(0.00102, abs=5e-6) and hi == pytest.approx(0.00878, abs=5e-6)


def test_clopper_pearson_figures():
    lo, hi = stats.clopper_pearson(0, 100)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 100), rel=1e-10)
    assert hi == pytest.approx(0.0362, abs=5e-5)
    lo, hi = stats.clopper_pearson(100, 100)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 100), rel=1e-10)
    # Defining property, checked with binomial tails instead of beta quantiles.
    lo, hi = stats.clopper_pearson(7, 200, confidence=0.9)
    assert binom.cdf(7, 200, hi) == pytest.approx(0.05, rel=1e-8)
    assert binom.sf(6, 200, lo) == pytest.approx(0.05, rel=1e-8)


@pytest.mark.parametrize("interval", [stats.wilson, stats.clopper_pearson])
def test_interval_edges_and_shapes(interval):
    assert interval(0, 0) == (0.0, 1.0)
    lo, hi = interval(np.array([0, 5, 10, 0]), np.array([10, 10, 10, 0]))
    assert lo.shape == hi.shape == (4,)
    assert lo[0] == 0.0 and hi[2] == 1.0 and (lo[3], hi[3]) == (0.0, 1.0)
    assert np.all((0 <= lo) & (lo < hi) & (hi <= 1)) and lo[1] < 0.5 < hi[1]
    scalar = interval(np.int64(3), 10.0)
    assert all(type(x) is float for x in scalar)
    lo2, hi2 = interval([[1], [2]], [10, 20, 30])  # broadcasting
    assert lo2.shape == (2, 3)
    # Mirror symmetry: the interval for k is the reflection of that for n - k.
    lo_a, hi_a = interval(np.arange(11), 10)
    lo_b, hi_b = interval(np.arange(11)[::-1], 10)
    np.testing.assert_allclose(lo_a, 1 - hi_b, atol=1e-12)


@pytest.mark.parametrize("interval", [stats.wilson, stats.clopper_pearson])
@pytest.mark.parametrize("k, n, exc, name", [
    (5, 3, ValueError, "k must not exceed n"), (-1, 3, ValueError, "k must"),
    (1, -3, ValueError, "n must"), (1.5, 3, ValueError, "k must"),
    (np.nan, 3, ValueError, "k must"), ("1", 3, TypeError, "k must"),
])
def test_interval_count_validation(interval, k, n, exc, name):
    with pytest.raises(exc, match=name):
        interval(k, n)


@pytest.mark.parametrize("confidence", [0.0, 1.0, 1.5, -0.1, float("nan")])
def test_interval_confidence_validation(confidence):
    with pytest.raises(ValueError, match="confidence"):
        stats.wilson(1, 10, confidence)
    with pytest.raises(TypeError, match="confidence"):
        stats.clopper_pearson(1, 10, True)


@pytest.mark.parametrize("n", [20, 100])
def test_coverage(n):
    """Exact coverage over a grid of true rates, summed over binomial outcomes."""
    k, p = np.arange(n + 1), np.linspace(0.01, 0.99, 99)
    pmf = binom.pmf(k[None, :], n, p[:, None])
    for interval, check in [(stats.clopper_pearson, lambda c: c.min() >= 0.95),
                            (stats.wilson, lambda c: abs(c.mean() - 0.95) < 0.01)]:
        lo, hi = interval(k, n)
        covered = (lo[None, :] <= p[:, None]) & (p[:, None] <= hi[None, :])
        assert check((pmf * covered).sum(axis=1)), interval.__name__


# ------------------------------------------------------ summaries, stopping


def test_rate_summary_scalar_and_array():
    s = stats.rate_summary(3, 1000)
    assert (s["k"], s["n"], s["rate"]) == (3, 1000, 0.003)
    assert s["half_width"] == pytest.approx((s["hi"] - s["lo"]) / 2)
    assert (s["lo"], s["hi"]) == stats.wilson(3, 1000)
    t = stats.rate_summary([0, 3], [0, 1000], method="clopper_pearson")
    assert list(t.columns) == ["k", "n", "rate", "lo", "hi", "half_width"]
    assert np.isnan(t["rate"][0]) and t["half_width"][0] == 0.5
    with pytest.raises(ValueError, match="method"):
        stats.rate_summary(1, 2, method="wald")


def test_mean_interval_is_student_t_and_drops_non_finite():
    s = stats.mean_interval([1.0, 2.0, 3.0, np.inf, np.nan])
    assert s["n"] == 3 and s["mean"] == 2.0
    assert s["half_width"] == pytest.approx(t_dist.ppf(0.975, 2) / math.sqrt(3))  # std = 1
    one = stats.mean_interval([5.0])
    assert one["mean"] == 5.0 and np.isnan(one["lo"])
    assert np.isnan(stats.mean_interval([])["mean"])


def _mean_lo_hi(values, **kwargs):
    s = stats.mean_interval(values, **kwargs)
    return s["mean"], s["lo"], s["hi"]


def test_mean_interval_is_student_t_clipped_and_nan_safe():
    x = np.array([0.1, 0.3, 0.2, 0.6, np.inf])
    mean, lo, hi = _mean_lo_hi(x)
    finite = x[:4]
    half = t_dist.ppf(0.975, 3) * finite.std(ddof=1) / 2
    assert (mean, lo, hi) == pytest.approx((0.3, 0.3 - half, 0.3 + half))
    assert _mean_lo_hi(x, bounds=(0.0, 0.5))[1:] == pytest.approx((max(0.0, 0.3 - half), 0.5))
    mean, lo, hi = _mean_lo_hi([0.2, 0.2, 0.2])
    assert mean == pytest.approx(0.2) and hi - lo == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(_mean_lo_hi([0.5])[1]) and math.isnan(_mean_lo_hi([np.nan])[0])


def _trials():
    """Layer a: 100 trials, 3 SDC; layer b: 50 trials, 0 SDC, one DUE."""
    layer = ["a"] * 100 + ["b"] * 50
    sdc = np.zeros(150, bool)
    sdc[[5, 50, 99]] = True
    due = np.zeros(150, np.int64)
    due[120] = 1
    deviation = np.arange(150, dtype=np.float64)
    deviation[120] = np.inf
    wrong = np.zeros(150, np.int64)
    wrong[[5, 50]] = [4, 2]
    return pd.DataFrame({"layer": layer, "sdc": sdc, "due": due,
                         "deviation": deviation, "wrong": wrong,
                         "batch": 8})


def test_stratified_rates_per_stratum():
    out = stats.stratified_rates(_trials(), ["sdc", "due"], by=["layer"],
                          continuous=["deviation"])
    assert list(out["layer"]) == ["a", "b"]
    assert list(out["trials"]) == [100, 50]
    assert list(out["sdc_k"]) == [3, 0] and list(out["due_k"]) == [0, 1]
    assert out["sdc_rate"][0] == 0.03
    assert (out["sdc_lo"][0], out["sdc_hi"][0]) == stats.wilson(3, 100)
    assert (out["sdc_lo"][1], out["sdc_hi"][1]) == (0.0, stats.wilson(0, 50)[1])
    # The DUE trial's infinite deviation is left out of the mean.
    assert list(out["deviation_n"]) == [100, 49]
    assert out["deviation_mean"][0] == pytest.approx(49.5)
    expected = stats.mean_interval(np.arange(100.0))
    assert out["deviation_lo"][0] == pytest.approx(expected["lo"])


def test_stratified_rates_overall_and_counts():
    table = _trials()
    out = stats.stratified_rates(table, ["sdc"], method="clopper_pearson")
    assert len(out) == 1 and out["trials"][0] == 150 and out["sdc_k"][0] == 3
    assert out["sdc_hi"][0] == stats.clopper_pearson(3, 150)[1]
    by_int = stats.stratified_rates(table, ["wrong"], denominator=8)
    by_col = stats.stratified_rates(table, ["wrong"], denominator="batch")
    assert by_int.equals(by_col)
    assert (by_int["wrong_k"][0], by_int["wrong_n"][0]) == (6, 1200)
    empty = stats.stratified_rates(table.iloc[:0], ["sdc"])
    assert empty["trials"][0] == 0 and (empty["sdc_lo"][0], empty["sdc_hi"][0]) == (0, 1)


def test_stratified_rates_validation():
    table = _trials()
    with pytest.raises(ValueError, match="'wrong'.*0/1"):
        stats.stratified_rates(table, ["wrong"])
    with pytest.raises(ValueError, match="missing_col"):
        stats.stratified_rates(table, ["missing_col"])
    with pytest.raises(ValueError, match="exceeds its denominator"):
        stats.stratified_rates(table, ["wrong"], denominator=3)
    with pytest.raises(ValueError, match="confidence"):
        stats.stratified_rates(table, ["sdc"], confidence=95)
    with pytest.raises(ValueError, match="collide"):
        stats.stratified_rates(table.assign(sdc_k=1), ["sdc"], by=["sdc_k"])
    with pytest.raises(ValueError, match="collide"):
        stats.stratified_rates(table, ["sdc"], by=["layer"], continuous=["layer"])


def test_converged():
    assert stats.converged((3, 1000), margin=0.01)
    assert not stats.converged((3, 1000), margin=0.001)
    assert stats.converged(stats.rate_summary(3, 1000), margin=0.01)
    summary = stats.stratified_rates(_trials(), ["sdc"], by=["layer"])
    assert stats.converged(summary, margin=0.05)  # widest: 0 of 50, 0.036
    assert not stats.converged(summary, margin=0.03)
    assert not stats.converged((np.array([0]), np.array([0])), margin=0.9)
    assert not stats.converged(summary.iloc[:0], margin=0.5)
    with pytest.raises(ValueError, match="margin"):
        stats.converged(summary, margin=0)
    with pytest.raises(ValueError, match="count columns"):
        stats.converged(pd.DataFrame({"x": [1]}), margin=0.1)


# ------------------------------------------- guarded, paired and clustered intervals


def test_a_baseline_turns_a_sample_that_never_moved_into_the_changed_share_bound():
    flat = np.full(32, 0.05)
    assert stats.mean_interval(flat)["half_width"] == 0.0  # what a bare t interval says
    guarded = stats.mean_interval(flat, bounds=(0.0, 1.0), baseline=0.05)
    upper = 1.0 - 0.05 ** (1 / 32)  # one-sided 95% Clopper-Pearson bound for 0 of 32
    assert guarded["method"] == "changed-share bound" and guarded["changed"] == 0
    assert (guarded["lo"], guarded["hi"]) == pytest.approx((0.05 - upper * 0.05, 0.05 + upper * 0.95))
    moved = np.r_[np.full(20, 0.05), np.linspace(0.1, 0.9, 12)]
    assert stats.mean_interval(moved, bounds=(0.0, 1.0), baseline=0.05)["method"] == "t"
    with pytest.raises(ValueError, match="needs bounds"):
        stats.mean_interval(flat, baseline=0.05)
    with pytest.raises(ValueError, match="same number of trials"):
        stats.paired_interval(np.zeros(3), np.zeros(4))


def _coverage(draw, interval, truth: float, runs: int) -> float:
    rng = np.random.default_rng(3)
    hits = 0
    for _ in range(runs):
        lo, hi = interval(*draw(rng))
        hits += lo <= truth <= hi
    return hits / runs


def _clustered(rng, trials=200, batch=128):
    """Affected inputs per trial: 5% of trials hit a whole block of 10-100 inputs."""
    k = np.where(rng.random(trials) < 0.05, rng.integers(10, 101, trials), 0)
    return k, np.full(trials, batch)


CLUSTER_TRUTH = 0.05 * 55 / 128


def test_cluster_interval_covers_inputs_pooled_within_trials():
    """1,000 simulated campaigns, 200 trials x 128 inputs: coverage >= 0.93 at 95% (SE about 0.007)."""
    coverage = _coverage(_clustered, lambda k, n: stats.cluster_interval(k, n), CLUSTER_TRUTH, 1000)
    assert coverage >= 0.93, coverage


def test_a_binomial_interval_over_pooled_inputs_does_not_cover():
    """The same campaigns with inputs counted as independent: far too narrow."""
    coverage = _coverage(_clustered, lambda k, n: stats.wilson(int(k.sum()), int(n.sum())), CLUSTER_TRUTH, 300)
    assert coverage < 0.7, coverage


def _nested(rng, trials=256):
    """Paired errors with common random numbers: the higher rate's faults contain the lower's."""
    low = 0.05 + 0.2 * (rng.random(trials) < 0.02)
    extra = np.where(rng.random(trials) < 0.1, rng.integers(1, 30, trials) / 128, 0)
    return np.clip(low + extra, 0, 1), low


def test_paired_interval_covers_common_random_number_differences():
    """1,000 simulated pairs of points, 256 paired trials: coverage >= 0.93 at 95%."""
    sample = _nested(np.random.default_rng(7), 2_000_000)
    truth = float((sample[0] - sample[1]).mean())

    def interval(a, b):
        s = stats.paired_interval(a, b)
        return s["lo"], s["hi"]

    assert _coverage(_nested, interval, truth, 1000) >= 0.93
