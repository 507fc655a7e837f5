"""Statistics for fault-injection campaigns: binomial intervals, means over trials, sample sizes.

Rates of events (a trial with an SDC) get Wilson or Clopper-Pearson
intervals; means of continuous per-trial figures get Student-t intervals over
trials, the unit of replication. ``jaxfi._src.stats`` states the conventions.
"""

from jaxfi._src.stats import (
    METHODS,
    MIN_CHANGED,
    clopper_pearson,
    cluster_interval,
    converged,
    leveugle_sample_size,
    mean_interval,
    paired_interval,
    rate_summary,
    stratified_rates,
    wilson,
)

__all__ = [
    "METHODS",
    "MIN_CHANGED",
    "clopper_pearson",
    "cluster_interval",
    "converged",
    "leveugle_sample_size",
    "mean_interval",
    "paired_interval",
    "rate_summary",
    "stratified_rates",
    "wilson",
]
