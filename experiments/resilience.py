"""Error of image classifiers under random bit flips at increasing fault rates.

Reproduces and extends Rojas, Nicolae, Meneses, "Evaluating Resilience of Deep
Learning Models" (CARLA 2019): for each model and fault rate, a campaign of
independent trials, each flipping random bits of the weights (or activations)
and evaluating --eval_size test images.

    python experiments/resilience.py --workdir=runs/study

trains mlp, lenet5 and resnet8 on the embedded mnist5k (cached in
WORKDIR/models) and sweeps bit error rates over all weight bits. Running the
same command again resumes: finished points are read back from their stores
(WORKDIR/campaigns/resilience/...) and an interrupted one continues.

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
  (means over trials of per-trial fractions, with 95% Student-t intervals
  over trials: *_lo, *_hi) and sdc_trial, due_trial, harm_trial (fractions of
  trials with such an event, 95% Wilson intervals). jaxfi/study.py says why
  the trial is the unit.
- STEM.json: flags, models (source, accuracy, size), per-point timings and
  executors, wall time, software versions.
- STEM.png: error vs fault rate, and SDC and DUE, one curve per model.
"""

from __future__ import annotations

import time

import pandas as pd
from absl import app, flags

from jaxfi import data, study

_COMMON = study.define_common_flags(eval_size=256, chunk_size=16,
                                    chunk_help="Trials per stored chunk (resume granularity).")
_MODE = flags.DEFINE_enum("mode", "rate", ["rate", "count"], "Sweep bit error rates or exact fault counts.")
_RATES = flags.DEFINE_list("rates", [f"{r:g}" for r in study.DEFAULT_RATES],
                            "Bit error rates (--mode=rate).")
_COUNTS = flags.DEFINE_list("counts", [str(c) for c in study.DEFAULT_COUNTS],
                             "Single-bit flips per trial (--mode=count).")
_SITE = flags.DEFINE_enum("site", "weights", list(study.SITES), "What the faults corrupt.")
_BATCH_STATS = flags.DEFINE_bool("batch_stats", False, "Count BatchNorm running statistics as weights.")
_TRIALS = flags.DEFINE_integer("trials", 32, "Trials per (model, point).", lower_bound=2)
_DATASET = flags.DEFINE_string("dataset", data.EMBEDDED, "'mnist5k' or a prepared TFDS dataset.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory.")
_WEIGHTS = flags.DEFINE_string("weights", None, "Directory of torchvision NAME.npz/.safetensors weights.")


def main(argv: list[str]) -> None:
    """Trains or loads the models, runs the sweep and writes the CSV, JSON and plot."""
    study.check_no_arguments(argv)
    points = _points()
    began = time.perf_counter()
    workdir, subjects = _COMMON.load(dataset=_DATASET.value, data_dir=_DATA_DIR.value,
                                     weights=_WEIGHTS.value)
    jobs = [study.Job(s, study.plans_for(s, p, _BATCH_STATS.value), f"{s.label}/{p.label}",
                      {"model": s.label, "site": p.site, "mode": p.mode, "rate": p.rate, "count": p.count})
            for s in subjects for p in points]
    done = _COMMON.sweep(jobs, workdir / "campaigns" / "resilience", _TRIALS.value)
    table = pd.DataFrame([_row(d) for d in done])
    study.write_report(workdir / f"resilience-{_SITE.value}-{_MODE.value}", table, name="resilience",
                       plot=study.plot_sweep, title=_title(subjects), flag_values=_flag_values(),
                       subjects=subjects, done=done, began=began, show=_print)


def _points() -> list[study.Point]:
    try:
        if _MODE.value == "rate":
            return [study.Point(_SITE.value, rate=float(r)) for r in _RATES.value]
        return [study.Point(_SITE.value, count=int(c)) for c in _COUNTS.value]
    except ValueError as err:
        raise app.UsageError(f"--rates/--counts: {err}")


def _row(done: study.Done) -> dict:
    population = sum(site.bits for sites in done.result.sites for site in sites)
    keys = {**done.job.keys, "eval_size": len(done.job.subject.labels), "seed": _COMMON.seed.value,
            "population_bits": population}
    return {**keys, **study.summarize(done.result).to_dict("records")[0]}


def _title(subjects: list[study.Subject]) -> str:
    what = {"weights": "weight", "activations": "activation", "both": "weight and activation"}[_SITE.value]
    return (f"Random {what} bit flips on {_DATASET.value}: {_TRIALS.value} trials x "
            f"{len(subjects[0].labels)} test images per point")


def _flag_values() -> dict:
    names = ("models", "mode", "rates", "counts", "site", "batch_stats", "trials", "eval_size",
             "executor", "chunk_size", "seed", "epochs", "dataset", "data_dir", "weights")
    return {name: flags.FLAGS[name].value for name in names}


def _print(table: pd.DataFrame) -> None:
    x = "rate" if _MODE.value == "rate" else "count"
    view = pd.DataFrame({
        "model": table["model"], x: table[x],
        "error %": [f"{100 * e:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
                    for e, lo, hi in zip(table["error"], table["error_lo"], table["error_hi"])],
        "SDC %": (100 * table["sdc"]).round(2), "SDC-5 %": (100 * table["sdc5"]).round(2),
        "DUE %": (100 * table["due"]).round(2), "golden %": (100 * table["golden_error"]).round(1)})
    print(view.to_string(index=False))


if __name__ == "__main__":
    app.run(main)
