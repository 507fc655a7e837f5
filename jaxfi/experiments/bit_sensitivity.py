"""Which bit of a weight matters: SDC and DUE per bit position of single-bit flips.

    python experiments/bit_sensitivity.py --workdir=runs/study

For each model (trained on the embedded mnist5k, cached in WORKDIR/models)
and each storage format in --dtypes (float32, and bfloat16/float16 versions
made by casting the variables; layers still compute in float32), one campaign
flips exactly one uniformly drawn bit of the weights per trial. Trials are
then stratified by the flipped bit position.

Why one campaign per (model, dtype) rather than one Plan per bit: the sampled
population is the same as a single random weight flip in the resilience study
(every weight bit equally likely), a single-fault trial's stratum is exact,
the overall rate is a proper population average, and one compiled program
serves all bits instead of 32. The price is that a bit's sample size is
Binomial(trials, 1/width) instead of fixed; --trials_per_bit sets its mean.

Writes to --workdir:

- bit_sensitivity.csv: one row per (model, dtype, bit): model, dtype, bit,
  field (sign/exponent/mantissa), eval_size, seed, then the figures of
  ``jaxfi.study.summary_columns()`` over that bit's trials (sdc_trial,
  due_trial, harm_trial with 95% Wilson intervals; per-input means with
  ``jaxfi.stats.mean_interval`` around the fault-free value).
- bit_sensitivity.json: flags, models, timings, versions.
- bit_sensitivity.png: heat maps of P(SDC) and P(DUE) per flip, model x bit,
  one panel row per format.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import pandas as pd

import jaxfi
from jaxfi import data, study
from jaxfi.study import flags as study_flags

flags = study_flags.flags

_NAME = "bit_sensitivity"
_FLAG_NAMES = ("models", "dtypes", "trials_per_bit", "eval_size", "batch_stats", "executor",
               "chunk_size", "seed", "epochs")


@dataclasses.dataclass(frozen=True)
class Flags:
    """The holders of this script's flags."""

    common: study_flags.CommonFlags
    dtypes: Any
    trials_per_bit: Any
    batch_stats: Any


def define_flags() -> Flags:
    """Defines the script's flags and their validators (they show under the script's name in --help)."""
    flags.disclaim_key_flags()
    defined = Flags(
        common=study_flags.define_common_flags(eval_size=64, chunk_size=64),
        dtypes=flags.DEFINE_list("dtypes", list(study.DTYPES), "Storage formats of the weights."),
        trials_per_bit=flags.DEFINE_integer("trials_per_bit", 64, "Mean trials per bit position.",
                                            lower_bound=1),
        batch_stats=flags.DEFINE_bool("batch_stats", False, "Count BatchNorm running statistics as weights."))
    study_flags.validate("dtypes", lambda names: study_flags.check_choices(names, study.DTYPES, "dtype"))
    study_flags.validate("eval_size", lambda n: study_flags.check_eval_size(n, data.EMBEDDED))
    return defined


def run(defined: Flags, argv: list[str]) -> None:
    """Trains or loads the models, runs one campaign per (model, dtype), writes CSV, JSON and plot."""
    study_flags.check_no_arguments(argv)
    common = defined.common
    began = time.perf_counter()
    workdir, subjects = common.load()
    done = []
    for dtype in defined.dtypes.value:
        width = jaxfi.format_of(dtype).width
        jobs = [_job(study.cast(s, dtype), defined.batch_stats.value) for s in subjects]
        done += common.sweep(jobs, workdir / "campaigns" / _NAME, defined.trials_per_bit.value * width)
    table = pd.concat([_rows(d, common.seed.value) for d in done], ignore_index=True)
    title = (f"Single-bit weight flips by bit position: about {defined.trials_per_bit.value} trials per "
             f"bit x {common.eval_size.value} test images (mnist5k)")
    study.write_report(workdir / _NAME, table, name=_NAME, plot=study.plot_bits, title=title,
                       flag_values=study_flags.flag_values(_FLAG_NAMES), subjects=subjects, done=done,
                       began=began, show=_print)


def _job(subject: study.Subject, batch_stats: bool) -> study.Job:
    plan = jaxfi.Plan(study.weight_selector(batch_stats), jaxfi.BitFlip(), count=1)
    return study.Job(subject, (plan,), subject.label, {"model": subject.name, "dtype": subject.dtype})


def _rows(done: study.Done, seed: int) -> pd.DataFrame:
    rows = study.trial_figures(done.result, by="bit")
    dtype = done.job.keys["dtype"]
    rows.insert(0, "model", done.job.keys["model"])
    rows.insert(1, "dtype", dtype)
    rows.insert(3, "field", [study.bit_field(dtype, int(b)) for b in rows["bit"]])
    rows.insert(4, "eval_size", len(done.job.subject.labels))
    rows.insert(5, "seed", seed)
    return rows


def _print(table: pd.DataFrame) -> None:
    top = (table.sort_values("harm_trial", ascending=False).groupby(["model", "dtype"], sort=False)
           .head(3).sort_values(["dtype", "model", "harm_trial"], ascending=[True, True, False]))
    print("most harmful bits per (model, dtype):")
    print(top[["model", "dtype", "bit", "field", "trials", "sdc_trial", "due_trial", "harm_trial"]]
          .round(3).to_string(index=False))


def main() -> None:
    """The ``jaxfi-bit-sensitivity`` command: defines the flags, parses them and runs."""
    study_flags.run_script(functools.partial(run, define_flags()), __doc__)
