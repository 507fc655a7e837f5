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
  Student-t intervals).
- bit_sensitivity.json: flags, models, timings, versions.
- bit_sensitivity.png: heat maps of P(SDC) and P(DUE) per flip, model x bit,
  one panel row per format.
"""

from __future__ import annotations

import time

import pandas as pd
from absl import app, flags

import jaxfi
from jaxfi import study

_COMMON = study.define_common_flags(eval_size=64, chunk_size=64)
_DTYPES = flags.DEFINE_list("dtypes", list(study.DTYPES), "Storage formats of the weights.")
_TRIALS_PER_BIT = flags.DEFINE_integer("trials_per_bit", 64, "Mean trials per bit position.", lower_bound=1)
_BATCH_STATS = flags.DEFINE_bool("batch_stats", False, "Count BatchNorm running statistics as weights.")

_NAME = "bit_sensitivity"


def main(argv: list[str]) -> None:
    """Trains or loads the models, runs one campaign per (model, dtype), writes CSV, JSON and plot."""
    study.check_no_arguments(argv)
    unknown = sorted(set(_DTYPES.value) - set(study.DTYPES))
    if unknown:
        raise app.UsageError(f"--dtypes: unknown {unknown}; choose from {list(study.DTYPES)}")
    began = time.perf_counter()
    workdir, subjects = _COMMON.load()
    done = []
    for dtype in _DTYPES.value:
        width = jaxfi.format_of(dtype).width
        jobs = [_job(study.cast(s, dtype)) for s in subjects]
        done += _COMMON.sweep(jobs, workdir / "campaigns" / _NAME, _TRIALS_PER_BIT.value * width)
    table = pd.concat([_rows(d) for d in done], ignore_index=True)
    title = (f"Single-bit weight flips by bit position: about {_TRIALS_PER_BIT.value} trials per "
             f"bit x {_COMMON.eval_size.value} test images (mnist5k)")
    study.write_report(workdir / _NAME, table, name=_NAME, plot=study.plot_bits, title=title,
                       flag_values=_flag_values(), subjects=subjects, done=done, began=began,
                       show=_print)


def _job(subject: study.Subject) -> study.Job:
    plan = jaxfi.Plan(study.weight_selector(_BATCH_STATS.value), jaxfi.BitFlip(), count=1)
    return study.Job(subject, (plan,), subject.label, {"model": subject.name, "dtype": subject.dtype})


def _rows(done: study.Done) -> pd.DataFrame:
    rows = study.summarize(done.result, by="bit")
    dtype = done.job.keys["dtype"]
    rows.insert(0, "model", done.job.keys["model"])
    rows.insert(1, "dtype", dtype)
    rows.insert(3, "field", [study.bit_field(dtype, int(b)) for b in rows["bit"]])
    rows.insert(4, "eval_size", len(done.job.subject.labels))
    rows.insert(5, "seed", _COMMON.seed.value)
    return rows


def _flag_values() -> dict:
    names = ("models", "dtypes", "trials_per_bit", "eval_size", "batch_stats", "executor",
             "chunk_size", "seed", "epochs")
    return {name: flags.FLAGS[name].value for name in names}


def _print(table: pd.DataFrame) -> None:
    top = (table.sort_values("harm_trial", ascending=False).groupby(["model", "dtype"], sort=False)
           .head(3).sort_values(["dtype", "model", "harm_trial"], ascending=[True, True, False]))
    print("most harmful bits per (model, dtype):")
    print(top[["model", "dtype", "bit", "field", "trials", "sdc_trial", "due_trial", "harm_trial"]]
          .round(3).to_string(index=False))


if __name__ == "__main__":
    app.run(main)
