"""The figures of a study's campaign: per-trial values, and their means and rates with intervals.

The unit of replication is the trial (one fault scenario applied to the whole
evaluation batch), so per-input fractions are averaged per trial (the trial
is the cluster of its inputs) and get an interval over trials
(``jaxfi.stats.mean_interval`` with the fault-free value as baseline: the
changed-share bound while fewer than ``jaxfi.stats.MIN_CHANGED`` trials
moved, else Student-t), and per-trial events get a Wilson interval over
trials. Per-trial figures depend on the evaluation size (``eval_size``):
quote them with it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

import jaxfi
from jaxfi import stats

CONFIDENCE = 0.95
# Per-trial figures averaged over trials (t interval) and per-trial events (Wilson).
MEANS = ("error", "sdc", "sdc5", "due", "logit_dev")
EVENTS = ("sdc_trial", "due_trial", "harm_trial")
_NON_NEGATIVE = ("logit_dev",)  # not a fraction: bounded below only

_COLUMNS = {
    "trials": "trials in the campaign",
    "golden_error": "top-1 error of the fault-free model on the evaluation inputs",
    "faults_mean": "mean number of faults placed per trial",
    "overflow": "trials whose drawn fault count exceeded the static cap (should be 0)",
    "error": "top-1 error of the faulty model (DUE inputs count as wrong), mean over trials",
    "sdc": "fraction of golden-correct inputs whose top-1 changed (finite output), mean over trials",
    "sdc5": "fraction of inputs whose top-1 left golden's top-5, mean over trials",
    "due": "fraction of inputs with a non-finite logit, mean over trials",
    "logit_dev": "mean |faulty - golden| logit over inputs with finite logits, mean over trials",
    "sdc_trial": "fraction of trials with at least one SDC input",
    "due_trial": "fraction of trials with at least one DUE input",
    "harm_trial": "fraction of trials with any SDC or DUE (not masked)",
}
_GUARDED = "over trials, jaxfi.stats.mean_interval with the fault-free value as baseline"
_INTERVALS = {f"{name}_{end}": f"95% {kind} interval of {name}, {end} bound"
              for names, kind in ((MEANS, _GUARDED), (EVENTS, "Wilson"))
              for name in names for end in ("lo", "hi")}


def summary_columns() -> dict[str, str]:
    """Every column ``trial_figures`` writes (besides group keys), with its meaning."""
    order = ["trials", "golden_error", "faults_mean", "overflow"]
    for name in MEANS + EVENTS:
        order += [name, f"{name}_lo", f"{name}_hi"]
    return {name: _COLUMNS.get(name) or _INTERVALS[name] for name in order}


def per_trial(result: jaxfi.Result) -> pd.DataFrame:
    """One row per trial: the figures ``trial_figures`` averages, the events it counts, and strata."""
    t, g = result.table, result.golden
    sdc = t["sdc_correct_inputs"] / g.n_correct if g.n_correct else pd.Series(math.nan, index=t.index)
    return pd.DataFrame({
        "error": 1.0 - t["accuracy"],
        "sdc": sdc,
        "sdc5": t["sdc5_inputs"] / g.batch,
        "due": t["due_inputs"] / g.batch,
        "logit_dev": t["logit_dev"],
        "sdc_trial": t["sdc"],
        "due_trial": t["due"],
        "harm_trial": ~t["masked"],
        "faults": t["faults"],
        "overflow": t["overflow"],
        "bit": t["bit"],
        "site": t["site"],
    })


def trial_figures(result: jaxfi.Result, by: str | None = None,
                  confidence: float = CONFIDENCE) -> pd.DataFrame:
    """The figures of a campaign with intervals over trials (``summary_columns``).

    Args:
      result: a campaign result whose outcomes include ``logit_dev``
        (``jaxfi.study.logit_deviation``).
      by: a stratum column of ``per_trial`` (``"bit"``, ``"site"``), or None
        for one row over all trials.
      confidence: the intervals' confidence level.

    Returns:
      One row per stratum: the ``by`` key, then ``summary_columns()``.
    """
    frame = per_trial(result)
    golden_error = 1.0 - result.golden.accuracy
    groups = [(None, frame)] if by is None else list(frame.groupby(by, sort=True))
    return pd.DataFrame([_figures(key, rows, by, golden_error, confidence) for key, rows in groups])


def _figures(key: Any, rows: pd.DataFrame, by: str | None, golden_error: float,
             confidence: float) -> dict[str, Any]:
    row: dict[str, Any] = {} if by is None else {by: key}
    row.update(trials=len(rows), golden_error=golden_error,
               faults_mean=float(rows["faults"].mean()), overflow=int(rows["overflow"].sum()))
    for name in MEANS:
        bounds = (0.0, math.inf) if name in _NON_NEGATIVE else (0.0, 1.0)
        baseline = golden_error if name == "error" else 0.0
        s = stats.mean_interval(rows[name].to_numpy(), confidence, bounds, baseline=baseline)
        row[name], row[f"{name}_lo"], row[f"{name}_hi"] = s["mean"], s["lo"], s["hi"]
    for name in EVENTS:
        k, n = int(rows[name].sum()), len(rows)
        lo, hi = stats.wilson(k, n, confidence)
        row[name], row[f"{name}_lo"], row[f"{name}_hi"] = k / n, lo, hi
    return row


def paired_error(a: jaxfi.Result, b: jaxfi.Result, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """The paired difference of top-1 error, ``a`` minus ``b``, over the trials both results hold.

    Trials are matched by index: with one seed, trial ``i`` draws from the
    same key in every campaign and at every sweep point, so the pair is a
    common-random-numbers comparison and ``jaxfi.stats.paired_interval`` is
    its interval. Points that stopped at different trial counts are compared
    over the trials both ran.

    Args:
      a: a result.
      b: a result of a campaign with the same seed as ``a``'s.
      confidence: the interval's confidence level.

    Returns:
      trials (shared), error_a, error_b, diff (a - b), diff_lo, diff_hi and
      changed (pairs whose difference is not the golden runs' difference).
    """
    shared = np.intersect1d(a.table["trial"], b.table["trial"])
    errors = [1.0 - r.table.set_index("trial").loc[shared, "accuracy"].to_numpy() for r in (a, b)]
    golden = (1.0 - a.golden.accuracy) - (1.0 - b.golden.accuracy)
    s = stats.paired_interval(errors[0], errors[1], confidence, baseline=golden)
    return {"trials": len(shared), "error_a": float(errors[0].mean()), "error_b": float(errors[1].mean()),
            "diff": s["mean"], "diff_lo": s["lo"], "diff_hi": s["hi"], "changed": s["changed"]}


def bit_field(dtype: str, bit: int) -> str:
    """"sign", "exponent" or "mantissa": the field of ``dtype`` that holds ``bit``."""
    fmt = jaxfi.format_of(dtype)
    return "sign" if bit in fmt.sign else "exponent" if bit in fmt.exponent else "mantissa"
