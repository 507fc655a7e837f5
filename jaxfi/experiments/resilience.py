"""Error of image classifiers under random bit flips at increasing fault rates.

Reproduces and extends Rojas, Nicolae, Meneses, "Evaluating Resilience of Deep
Learning Models" (CARLA 2019): for each model and fault rate, a campaign of
independent trials, each flipping random bits of the weights (or activations)
and evaluating --eval_size test images.

    python experiments/resilience.py --workdir=runs/study    (or: jaxfi-resilience --workdir=...)

trains mlp, lenet5 and resnet8 on the embedded mnist5k (cached in
WORKDIR/models) and sweeps bit error rates over all weight bits. Each model's
sweep is one campaign: the rate is data to one compiled trial program, and
trial i draws from the same key at every rate (its faults at a lower rate are
a subset of those at a higher one), so rates and models are paired. Each
point runs --trials trials, then more until the 95% interval of its top-1
error over trials is at most --half_width on either side (or --max_trials
ran; ``jaxfi.study.Target``): while fewer than 10 trials changed the error
that interval is the changed-share bound, so a point never stops on a
zero-width interval; its sequential coverage is simulated in the tests.
Running the same command again resumes: finished points are read back from
their model's store (WORKDIR/campaigns/resilience/MODEL/...) and an
interrupted one continues, with compiled programs loaded from
WORKDIR/compilation_cache.

Several processes or hosts (docs/distributed.md): add --coordinator_address,
--num_processes and --process_id; process 0 trains the models while the
others wait, and only process 0 writes the outputs (the same as one process).

Options: --mode=count sweeps exact fault counts (--counts) instead of rates;
--site=activations|both corrupts the outputs of every Conv, Dense and
BatchNorm (the same rates, as a bit error rate over activation bits of every
evaluated image; in count mode the count is per trial, i.e. per evaluated
batch, for activations). Weights are the ``params`` collection (kernels,
biases, BatchNorm scale and bias); --batch_stats adds BatchNorm running
statistics.

Paper scale (not run here; needs an array_record ImageNet in DATA_DIR and
torchvision weights saved as WEIGHTS/{alexnet,vgg16,resnet50}.npz or
.safetensors, see jaxfi.models.convert)::

    python experiments/resilience.py --workdir=runs/imagenet \\
        --dataset=imagenet2012 --data_dir=DATA_DIR --weights=WEIGHTS \\
        --models=alexnet,vgg16,resnet50 --eval_size=256 --trials=200 \\
        --rates=1e-10,1e-9,1e-8,3e-8,1e-7,3e-7,1e-6

(the cliff moves to lower rates as models grow: on mnist5k all three models
were near 30% error at a rate near 1 / number of weights, about 30 flips per
inference).

Writes to --workdir, with STEM = resilience-SITE-MODE:

- STEM.csv: one row per (model, point). Columns: model; site; mode; rate (bit
  error rate, empty in count mode); count (flips per trial, empty in rate
  mode); eval_size; seed; population_bits (bits the faults are drawn from per
  trial); then the figures of ``jaxfi.study.summary_columns()``: trials,
  golden_error, faults_mean, overflow, and error, sdc, sdc5, due, logit_dev
  (means over trials of per-trial fractions, with 95% intervals over trials:
  *_lo, *_hi) and sdc_trial, due_trial, harm_trial (fractions of trials with
  such an event among eval_size inputs, 95% Wilson intervals).
  jaxfi/study/summary.py says why the trial is the unit.
- STEM-paired.csv (rate mode): paired differences of the top-1 error, each
  with its 95% paired interval over the trials both sides share: every
  model's point against its next lower rate, and every pair of models at
  each rate.
- STEM.json: flags, models (source, accuracy, size), per point its trials,
  the trials computed in this run, the executor, seconds and what
  --executor=auto measured, wall time, software versions.
- STEM.png: error vs fault rate, and SDC and DUE, one curve per model.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from typing import Any

import jax
import pandas as pd

from jaxfi import data, study
from jaxfi.study import flags as study_flags

flags = study_flags.flags

_FLAG_NAMES = ("models", "mode", "rates", "counts", "site", "batch_stats", "trials", "max_trials",
               "half_width", "eval_size", "executor", "chunk_size", "seed", "epochs", "dataset", "data_dir",
               "weights", "num_processes")


@dataclasses.dataclass(frozen=True)
class Flags:
    """The holders of this script's flags."""

    common: study_flags.CommonFlags
    mode: Any
    rates: Any
    counts: Any
    site: Any
    batch_stats: Any
    trials: Any
    max_trials: Any
    half_width: Any
    dataset: Any
    data_dir: Any
    weights: Any


def define_flags() -> Flags:
    """Defines the script's flags and their validators (they show under the script's name in --help)."""
    flags.disclaim_key_flags()
    defined = Flags(
        common=study_flags.define_common_flags(eval_size=128, chunk_size=32, executor="auto",
                                               chunk_help="Trials per stored chunk (resume granularity)."),
        mode=flags.DEFINE_enum("mode", "rate", ["rate", "count"], "Sweep bit error rates or exact fault counts."),
        rates=flags.DEFINE_list("rates", [f"{r:g}" for r in study.DEFAULT_RATES], "Bit error rates (--mode=rate)."),
        counts=flags.DEFINE_list("counts", [str(c) for c in study.DEFAULT_COUNTS],
                                 "Single-bit flips per trial (--mode=count)."),
        site=flags.DEFINE_enum("site", "weights", list(study.SITES), "What the faults corrupt."),
        batch_stats=flags.DEFINE_bool("batch_stats", False, "Count BatchNorm running statistics as weights."),
        trials=flags.DEFINE_integer("trials", 32, "Trials every (model, point) runs first.", lower_bound=2),
        max_trials=flags.DEFINE_integer(
            "max_trials", 2048, "Trials no (model, point) exceeds (--max_trials=--trials: a fixed number).",
            lower_bound=2),
        half_width=flags.DEFINE_float(
            "half_width", 0.02, "Run more trials at a point until the 95% interval of its top-1 "
            "error over trials is at most this wide on either side (a fraction: 0.03 = 3 points), or "
            "--max_trials ran.", lower_bound=0.0, upper_bound=1.0),
        dataset=flags.DEFINE_string("dataset", data.EMBEDDED, "'mnist5k' or a prepared TFDS dataset."),
        data_dir=flags.DEFINE_string("data_dir", None, "TFDS data directory."),
        weights=flags.DEFINE_string("weights", None, "Directory of torchvision NAME.npz/.safetensors weights."))
    study_flags.validate("rates", study_flags.check_rates)
    study_flags.validate("counts", study_flags.check_counts)
    study_flags.validate(("eval_size", "dataset"), study_flags.check_eval_size)
    study_flags.validate(("trials", "max_trials", "half_width"), study_flags.check_target)
    return defined


def run(defined: Flags, argv: list[str]) -> None:
    """Trains or loads the models, runs the sweep and writes the CSV, JSON and plot."""
    study_flags.check_no_arguments(argv)
    common = defined.common
    points = _points(defined)
    began = time.perf_counter()
    workdir, subjects = common.load(dataset=defined.dataset.value,
                                    data_dir=study_flags.user_path(defined.data_dir.value),
                                    weights=study_flags.user_path(defined.weights.value))
    jobs = [job for s in subjects for job in _jobs(s, points, defined.batch_stats.value)]
    target = study_flags.check_target(defined.trials.value, defined.max_trials.value, defined.half_width.value)
    done = common.sweep(jobs, workdir / "campaigns" / "resilience", target)
    table = pd.DataFrame([_row(d, common.seed.value) for d in done])
    mode, site = defined.mode.value, defined.site.value
    if mode == "rate" and jax.process_index() == 0:
        _paired(done).to_csv(workdir / f"resilience-{site}-{mode}-paired.csv", index=False)
    study.write_report(workdir / f"resilience-{site}-{mode}", table, name="resilience",
                       plot=study.plot_sweep, title=_title(defined, subjects),
                       flag_values=study_flags.flag_values(_FLAG_NAMES), subjects=subjects, done=done,
                       began=began, show=functools.partial(_print, mode))


def _jobs(subject: study.Subject, points: list[study.Point], batch_stats: bool) -> list[study.Job]:
    """One campaign for the whole rate sweep (one compiled program), or one per fault count."""
    keys = [{"site": p.site, "mode": p.mode, "rate": p.rate, "count": p.count} for p in points]
    if points[0].mode == "rate":
        rates = "_".join(f"{p.rate:g}" for p in points)
        path = f"{subject.label}/{points[0].site}-ber-sweep-{hashlib.sha256(rates.encode()).hexdigest()[:10]}"
        return [study.Job(subject, study.plans_for(subject, points, batch_stats), path, {"model": subject.label},
                          tuple(keys))]
    return [study.Job(subject, study.plans_for(subject, p, batch_stats), f"{subject.label}/{p.label}",
                      {"model": subject.label, **k}) for p, k in zip(points, keys)]


def _points(defined: Flags) -> list[study.Point]:
    site = defined.site.value
    if defined.mode.value == "rate":
        return [study.Point(site, rate=r) for r in study_flags.check_rates(defined.rates.value)]
    return [study.Point(site, count=c) for c in study_flags.check_counts(defined.counts.value)]


def _row(done: study.Done, seed: int) -> dict[str, Any]:
    population = sum(site.bits for sites in done.result.sites for site in sites)
    keys = {**done.keys, "eval_size": len(done.job.subject.labels), "seed": seed,
            "population_bits": population}
    return {**keys, **study.trial_figures(done.result).to_dict("records")[0]}


def _paired(done: list[study.Done]) -> pd.DataFrame:
    """Paired error differences: each point against the model's next lower rate, and between models."""
    by_model: dict[str, list[study.Done]] = {}
    for d in done:
        by_model.setdefault(d.keys["model"], []).append(d)
    rows = []
    for model, points in by_model.items():
        points = sorted(points, key=lambda d: d.keys["rate"])
        for lower, higher in zip(points, points[1:]):
            rows.append({"rate": higher.keys["rate"], "a": model, "b": f"{model} at {lower.keys['rate']:g}",
                         **study.paired_error(higher.result, lower.result)})
    models = list(by_model)
    for i, first in enumerate(models):
        for second in models[i + 1:]:
            for x, y in zip(by_model[first], by_model[second]):
                rows.append({"rate": x.keys["rate"], "a": first, "b": second,
                             **study.paired_error(x.result, y.result)})
    return pd.DataFrame(rows)


def _title(defined: Flags, subjects: list[study.Subject]) -> str:
    what = {"weights": "weight", "activations": "activation", "both": "weight and activation"}[defined.site.value]
    low, high = defined.trials.value, defined.max_trials.value
    trials = (f"{low} trials" if low == high else
              f"{low}-{high} trials (until the error's 95% interval is +-{100 * defined.half_width.value:g} points)")
    return (f"Random {what} bit flips on {defined.dataset.value}: {trials} x "
            f"{len(subjects[0].labels)} test images per point")


def _print(mode: str, table: pd.DataFrame) -> None:
    x = "rate" if mode == "rate" else "count"
    view = pd.DataFrame({
        "model": table["model"], x: table[x], "trials": table["trials"],
        "error %": [f"{100 * e:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
                    for e, lo, hi in zip(table["error"], table["error_lo"], table["error_hi"])],
        "SDC %": (100 * table["sdc"]).round(2), "SDC-5 %": (100 * table["sdc5"]).round(2),
        "DUE %": (100 * table["due"]).round(2), "golden %": (100 * table["golden_error"]).round(1)})
    print(view.to_string(index=False))


def main() -> None:
    """The ``jaxfi-resilience`` command: defines the flags, parses them and runs."""
    study_flags.run_script(functools.partial(run, define_flags()), __doc__)
