"""Which layer matters: SDC per single-bit flip in each weight leaf, raw and weighted.

    python experiments/layer_sensitivity.py --workdir=runs/study

For each model (trained on the embedded mnist5k, cached in WORKDIR/models)
and each weight leaf (every leaf of the ``params`` collection: kernels,
biases, BatchNorm scale and bias; --batch_stats adds the running statistics),
one campaign of --trials trials flips exactly one uniformly drawn bit of that
leaf per trial. Every leaf gets the same sample size, so small leaves (biases)
are measured as precisely as large ones.

Two views of the same numbers:

- raw, ``sdc_trial``: the probability that one random bit flip in this leaf
  changes the top-1 class of at least one evaluated input;
- weighted, ``sdc_weighted`` = ``sdc_trial`` x ``share`` (the leaf's share of
  the model's weight bits): the leaf's contribution to the SDC probability of
  one bit flip anywhere in the weights. It sums over leaves to the model's
  overall rate, and ranks leaves by how much they matter to a uniform fault.

Writes to --workdir:

- layer_sensitivity.csv: one row per (model, leaf): model, leaf, shape,
  values, bits, share, eval_size, seed, the figures of
  ``jaxfi.study.summary_columns()`` (Wilson intervals for the per-trial
  events, ``jaxfi.stats.mean_interval`` over trials for the per-input means), then
  sdc_weighted, sdc_weighted_lo, sdc_weighted_hi (the sdc_trial interval
  scaled by share).
- layer_sensitivity.json: flags, models, timings, versions.
- layer_sensitivity.png: per model, bars of raw and weighted SDC per leaf.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from typing import Any

import pandas as pd

import jaxfi
from jaxfi import data, study
from jaxfi.study import flags as study_flags

flags = study_flags.flags

_NAME = "layer_sensitivity"
_FLAG_NAMES = ("models", "trials", "eval_size", "batch_stats", "executor", "chunk_size", "seed", "epochs")


@dataclasses.dataclass(frozen=True)
class Flags:
    """The holders of this script's flags."""

    common: study_flags.CommonFlags
    trials: Any
    batch_stats: Any


def define_flags() -> Flags:
    """Defines the script's flags and their validators (they show under the script's name in --help)."""
    flags.disclaim_key_flags()
    defined = Flags(
        common=study_flags.define_common_flags(eval_size=64, chunk_size=64),
        trials=flags.DEFINE_integer("trials", 512, "Trials per (model, leaf).", lower_bound=2),
        batch_stats=flags.DEFINE_bool("batch_stats", False, "Include BatchNorm running statistics."))
    study_flags.validate("eval_size", lambda n: study_flags.check_eval_size(n, data.EMBEDDED))
    return defined


def run(defined: Flags, argv: list[str]) -> None:
    """Trains or loads the models, runs one campaign per (model, leaf), writes CSV, JSON and plot."""
    study_flags.check_no_arguments(argv)
    common = defined.common
    began = time.perf_counter()
    workdir, subjects = common.load()
    jobs = [job for s in subjects for job in _jobs(s, defined.batch_stats.value)]
    done = common.sweep(jobs, workdir / "campaigns" / _NAME, defined.trials.value)
    table = pd.DataFrame([_row(d, common.seed.value) for d in done])
    title = (f"Single-bit weight flips by layer: {defined.trials.value} trials per leaf x "
             f"{common.eval_size.value} test images (mnist5k)")
    study.write_report(workdir / _NAME, table, name=_NAME, plot=study.plot_layers, title=title,
                       flag_values=study_flags.flag_values(_FLAG_NAMES), subjects=subjects, done=done,
                       began=began, show=_print)


def _jobs(subject: study.Subject, batch_stats: bool) -> list[study.Job]:
    leaves = study.weight_leaves(subject, batch_stats)
    total = sum(leaf.bits for leaf in leaves)
    return [_job(subject, leaf, total) for leaf in leaves]


def _job(subject: study.Subject, leaf: jaxfi.Site, total_bits: int) -> study.Job:
    plan = jaxfi.Plan(jaxfi.Params(f"^{re.escape(leaf.name)}$"), jaxfi.BitFlip(), count=1)
    keys = {"model": subject.label, "leaf": leaf.name, "shape": "x".join(map(str, leaf.shape)),
            "values": leaf.size, "bits": leaf.bits, "share": leaf.bits / total_bits}
    return study.Job(subject, (plan,), f"{subject.label}/{leaf.name.replace('/', '.')}", keys)


def _row(done: study.Done, seed: int) -> dict[str, Any]:
    row = {**done.job.keys, "eval_size": len(done.job.subject.labels), "seed": seed,
           **study.trial_figures(done.result).to_dict("records")[0]}
    for end in ("", "_lo", "_hi"):
        row[f"sdc_weighted{end}"] = row[f"sdc_trial{end}"] * row["share"]
    return row


def _print(table: pd.DataFrame) -> None:
    view = table[["model", "leaf", "values", "share", "sdc_trial", "sdc_trial_lo", "sdc_trial_hi",
                  "due_trial", "sdc_weighted"]]
    print(view.round(4).to_string(index=False))


def main() -> None:
    """The ``jaxfi-layer-sensitivity`` command: defines the flags, parses them and runs."""
    study_flags.run_script(functools.partial(run, define_flags()), __doc__)
