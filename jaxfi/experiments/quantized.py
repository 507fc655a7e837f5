"""Faults in int8 weight storage against faults in the float32 original.

    python experiments/quantized.py --workdir=runs/study    (or: jaxfi-quantized --workdir=...)

Each model (default LeNet-5, trained on the embedded mnist5k and cached in
WORKDIR/models) is quantized after training: every kernel is stored as int8
with one float32 scale per output channel (symmetric, ``scale = max|w| /
127``) and dequantized in the forward pass (``jaxfi.models.quantized``).
Biases stay float32 in both versions, so the faults go to the kernels only:
``params/.../kernel`` (float32, 32 bits a weight) against
``params/.../kernel_q`` (int8, 8 bits a weight). The scales are not faulted.

Two sweeps on the same --eval_size test images:

- per bit: one campaign per format flips exactly one uniformly drawn kernel
  bit per trial (about --trials_per_bit trials per bit position; int8 bits
  0..7, bit 7 being the two's-complement sign, float32 bits 0..31), then the
  trials are stratified by the flipped bit;
- per rate: every kernel bit flips independently at each bit error rate in
  --rates, the same rates for both formats (an int8 model has a quarter of
  the bits, so a quarter of the flips at the same rate), one compiled
  program per model and format for every rate. Each point runs --trials
  trials, then more until the 95% interval of its top-1 error is at most
  --half_width on either side (or --max_trials ran). Trial i has the same
  key in both formats, so int8 and float32 are compared trial by trial.

Writes to --workdir:

- quantized.csv: one row per (model, dtype, sweep, bit or rate): sweep
  ("bit": one bit position; "flip": one random flip over all bits, the whole
  per-bit campaign; "rate"), model, dtype, bit, rate, eval_size, seed,
  population_bits, then the figures of ``jaxfi.study.summary_columns()``.
- quantized_paired.csv: per (model, rate), the paired difference of top-1
  error, int8 minus float32, over the trials both ran, with its 95%
  ``jaxfi.stats.paired_interval`` (``jaxfi.study.paired_error``).
- quantized.json: flags, models (with the fault-free accuracy of both
  versions on the evaluated images), timings, versions.
- quantized.png: left, P(SDC) per single-bit flip by bit position with 95%
  Wilson intervals; right, top-1 error against the bit error rate with 95%
  bands (``jaxfi.stats.mean_interval`` around the fault-free error).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import numpy as np
import pandas as pd

import jaxfi
from jaxfi import data, study
from jaxfi._src.extras import require
from jaxfi.study import flags as study_flags
from jaxfi.study import subjects as subjects_lib

flags = study_flags.flags

_NAME = "quantized"
_FLAG_NAMES = ("models", "trials_per_bit", "rates", "trials", "max_trials", "half_width", "eval_size",
               "executor", "chunk_size", "batch_size", "seed", "epochs")
# LeNet-5's float32 kernels go from no effect (1e-6) to collapse (1e-4); int8 needs
# about 100x higher rates before its error moves (8% at 1e-2, 70% at 1e-1).
DEFAULT_RATES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1)
_KERNELS = {"float32": r"/kernel$", "int8": r"/kernel_q$"}


@dataclasses.dataclass(frozen=True)
class Flags:
    """The holders of this script's flags."""

    common: study_flags.CommonFlags
    trials_per_bit: Any
    rates: Any
    trials: Any
    max_trials: Any
    half_width: Any


def define_flags() -> Flags:
    """Defines the script's flags and their validators (they show under the script's name in --help)."""
    flags.disclaim_key_flags()
    common = study_flags.define_common_flags(eval_size=128, chunk_size=64)
    flags.set_default(common.models, ["lenet5"])
    defined = Flags(
        common=common,
        trials_per_bit=flags.DEFINE_integer("trials_per_bit", 64, "Mean trials per bit position.",
                                            lower_bound=1),
        rates=flags.DEFINE_list("rates", [f"{r:g}" for r in DEFAULT_RATES],
                                "Bit error rates over the kernel bits, the same for both formats."),
        trials=flags.DEFINE_integer("trials", 32, "Trials every rate point runs first.", lower_bound=2),
        max_trials=flags.DEFINE_integer("max_trials", 1024, "Trials no rate point exceeds.", lower_bound=2),
        half_width=flags.DEFINE_float(
            "half_width", 0.03, "Run more trials at a rate point until the 95% interval of its "
            "top-1 error is at most this wide on either side (a fraction), or --max_trials ran.",
            lower_bound=0.0, upper_bound=1.0))
    study_flags.validate("rates", study_flags.check_rates)
    study_flags.validate("eval_size", lambda n: study_flags.check_eval_size(n, data.EMBEDDED))
    study_flags.validate(("trials", "max_trials", "half_width"), study_flags.check_target)
    return defined


def run(defined: Flags, argv: list[str]) -> None:
    """Trains or loads the models, quantizes them, runs both sweeps, writes CSV, JSON and plot."""
    study_flags.check_no_arguments(argv)
    common = defined.common
    began = time.perf_counter()
    workdir, floats = common.load()
    pairs = [(s, subjects_lib.quantized(s)) for s in floats]
    subjects = [s for pair in pairs for s in pair]
    root = workdir / "campaigns" / _NAME
    done = []
    for subject in subjects:
        width = jaxfi.format_of(subject.dtype).width
        done += common.sweep([_job(subject, {"count": 1}, "bits")], root,
                             defined.trials_per_bit.value * width)
    rates = study_flags.check_rates(defined.rates.value)
    jobs = [_job(s, {"ber": tuple(rates)}, "ber-sweep-" + "_".join(f"{r:g}" for r in rates),
                 tuple({"rate": r} for r in rates)) for s in subjects]
    target = study_flags.check_target(defined.trials.value, defined.max_trials.value, defined.half_width.value)
    swept = common.sweep(jobs, root, target)
    done += swept
    table = pd.concat([_rows(d, common.seed.value) for d in done], ignore_index=True)
    _paired(swept).to_csv(workdir / f"{_NAME}_paired.csv", index=False)
    title = (f"Kernel bit flips, int8 storage (per-channel scales) vs float32: {common.eval_size.value} "
             f"mnist5k test images per trial; fault-free accuracy "
             + ", ".join(f"{s.label} {100 * q.info['eval_accuracy_float32']:.1f}% / int8 "
                         f"{100 * q.info['eval_accuracy_int8']:.1f}%" for s, q in pairs))
    study.write_report(workdir / _NAME, table, name=_NAME, plot=plot, title=title,
                       flag_values=study_flags.flag_values(_FLAG_NAMES), subjects=subjects, done=done,
                       began=began, show=_print)


def _job(subject: study.Subject, how: dict[str, Any], path: str,
         points: tuple[dict[str, Any], ...] = ({"rate": None},)) -> study.Job:
    plan = jaxfi.Plan(jaxfi.Params(_KERNELS[subject.dtype]), jaxfi.BitFlip(), **how)
    return study.Job(subject, (plan,), f"{subject.label}/{path}",
                     {"model": subject.name, "dtype": subject.dtype}, points)


def _paired(swept: list[study.Done]) -> pd.DataFrame:
    """int8 minus float32 top-1 error per (model, rate), paired by trial."""
    by = {(d.keys["model"], d.keys["dtype"], d.keys["rate"]): d for d in swept}
    return pd.DataFrame([{"model": model, "rate": rate,
                          **study.paired_error(d.result, by[model, "float32", rate].result)}
                         for (model, dtype, rate), d in by.items() if dtype == "int8"])


def _rows(done: study.Done, seed: int) -> pd.DataFrame:
    keys = done.keys
    if keys["rate"] is None:
        rows = pd.concat([study.trial_figures(done.result, by="bit").assign(sweep="bit"),
                          study.trial_figures(done.result).assign(sweep="flip", bit=pd.NA)], ignore_index=True)
    else:
        rows = study.trial_figures(done.result).assign(sweep="rate", bit=pd.NA)
    front = {"sweep": rows.pop("sweep"), "model": keys["model"], "dtype": keys["dtype"],
             "bit": rows.pop("bit").astype("Int64"), "rate": np.nan if keys["rate"] is None else keys["rate"],
             "eval_size": len(done.job.subject.labels), "seed": seed,
             "population_bits": sum(site.bits for sites in done.result.sites for site in sites)}
    return pd.concat([pd.DataFrame(front, index=rows.index), rows], axis=1)


def plot(table: pd.DataFrame, path: str, title: str) -> None:
    """P(SDC) per flip by bit position (left) and top-1 error against the bit error rate (right)."""
    figure = require("matplotlib.figure", "plots")
    agg = require("matplotlib.backends.backend_agg", "plots")
    fig = figure.Figure(figsize=(13, 4.8))
    agg.FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    for i, ((model, dtype), rows) in enumerate(table.groupby(["model", "dtype"], sort=False)):
        color, label = f"C{i}", f"{model} {dtype}"
        bits = rows[rows["sweep"] == "bit"].sort_values("bit")
        flip = rows[rows["sweep"] == "flip"].iloc[0]
        sdc = bits["sdc_trial"].to_numpy()
        left.errorbar(bits["bit"].astype(int), 100 * sdc,
                      yerr=100 * np.abs(bits[["sdc_trial_lo", "sdc_trial_hi"]].to_numpy().T - sdc),
                      fmt="o-", ms=4, capsize=2, color=color,
                      label=f"{label} (one random flip: {100 * flip['sdc_trial']:.1f}%)")
        rates = rows[rows["sweep"] == "rate"].sort_values("rate")
        right.plot(rates["rate"], 100 * rates["error"], "o-", color=color,
                   label=f"{label} (fault-free {100 * rates['golden_error'].iloc[0]:.1f}%)")
        right.fill_between(rates["rate"], 100 * rates["error_lo"], 100 * rates["error_hi"], color=color, alpha=0.2)
        right.axhline(100 * rates["golden_error"].iloc[0], color=color, lw=0.8, ls=":")
    left.set_xlabel("bit position flipped (0 = least significant; int8 bit 7 = sign, float32 bit 30 = top exponent)")
    left.set_ylabel("P(SDC) per single-bit flip (%)")
    left.set_title("One kernel bit flip per trial, by bit (95% Wilson intervals)")
    right.set_xscale("log")
    right.set_xlabel("bit error rate over the kernel bits (same rates for both)")
    right.set_ylabel("top-1 error of the faulty model (%)")
    right.set_title("Random kernel bit flips (95% bands; dotted: fault-free)")
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def _print(table: pd.DataFrame) -> None:
    view = table[table["sweep"] != "bit"]
    print(view[["sweep", "model", "dtype", "rate", "trials", "faults_mean", "error", "error_lo", "error_hi",
                "sdc", "due", "sdc_trial"]].round(4).to_string(index=False))
    top = table[table["sweep"] == "bit"].sort_values("sdc_trial", ascending=False).groupby("dtype").head(3)
    print("most harmful bits:")
    print(top[["model", "dtype", "bit", "trials", "sdc_trial", "sdc_trial_lo", "sdc_trial_hi", "due_trial"]]
          .round(3).to_string(index=False))


def main() -> None:
    """The ``jaxfi-quantized`` command: defines the flags, parses them and runs."""
    study_flags.run_script(functools.partial(run, define_flags()), __doc__)
