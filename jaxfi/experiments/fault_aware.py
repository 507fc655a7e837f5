"""Does fault-aware training or range restriction make a small CNN resilient to weight bit flips?

    python experiments/fault_aware.py --workdir=/tmp/fat

Trains --model on the embedded mnist5k twice with the same settings (the
model's defaults plus gradient clipping at --clip_norm): normally, and with
random bit flips in every weight at --train_rate during training (a fresh fault
trial per step). Then sweeps the bit error rate over all weights (one Campaign
per rate and variant) for four variants: each model without and with range
restriction of its ReLU outputs to the bounds seen on its training data. Every
campaign uses the same seed, so trial i flips the same bit positions in every
variant and variants can be compared trial by trial. Writes to --workdir:

- fault_aware.csv: one row per (variant, rate): faulty top-1 error with a 95%
  interval over trials, the fault-free error, DUE trials, faults per
  trial, seconds, and the paired difference to a reference variant (see
  ``_REFERENCE``).
- fault_aware.png: error vs bit error rate, one line and band per variant.
- fault_aware.json: flags, training metrics, bounds, wall time and versions.

Intervals. The trial is the unit of replication (the test inputs of a trial
share its faults), so the error is the mean over trials of each trial's error
on the test images, with an interval over trials (``jaxfi.stats.mean_interval``
with the fault-free error as baseline: the changed-share bound while fewer
than 10 trials changed the error, else Student-t). The paired difference is
the mean over trials of (error - reference error) with
``jaxfi.stats.paired_interval`` (the same guard around 0): it is conditional
on the test images.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
from typing import Any

import jax
import numpy as np
import pandas as pd

import jaxfi
from jaxfi import data, models, stats, study, training
from jaxfi.study import flags as study_flags

flags = study_flags.flags

_NAME = "fault_aware"
_RELU_OUTPUTS = jaxfi.Activations(primitive="max")
Variant = tuple[str, bool]  # (training, restricted)
_VARIANTS: tuple[Variant, ...] = (
    ("normal", False), ("normal", True), ("fault-aware", False), ("fault-aware", True))
# Each variant is compared with the one that differs in a single factor.
_REFERENCE: dict[Variant, Variant] = {
    ("normal", True): ("normal", False),
    ("fault-aware", False): ("normal", False),
    ("fault-aware", True): ("normal", True),
}


@dataclasses.dataclass(frozen=True)
class Flags:
    """The holders of this script's flags."""

    workdir: Any
    model: Any
    train_rate: Any
    rates: Any
    trials: Any
    epochs: Any
    seed: Any
    clip_norm: Any
    eval_examples: Any
    executor: Any
    quick: Any


def define_flags() -> Flags:
    """Defines the script's flags and their validators (they show under the script's name in --help)."""
    flags.disclaim_key_flags()
    defined = Flags(
        workdir=flags.DEFINE_string("workdir", None, "Output directory.", required=True),
        model=flags.DEFINE_enum("model", "lenet5", list(training.DEFAULTS), "Model to train and sweep."),
        train_rate=flags.DEFINE_float("train_rate", 1e-5,
                                      "Bit error rate over all weights during fault-aware training.",
                                      lower_bound=0.0, upper_bound=1.0),
        rates=flags.DEFINE_list("rates", ["1e-6", "3e-6", "1e-5", "3e-5", "1e-4"],
                                "Bit error rates of the sweep."),
        trials=flags.DEFINE_integer("trials", 100, "Fault trials per rate and variant.", lower_bound=1),
        epochs=flags.DEFINE_integer("epochs", None, "Training epochs (default: per model).", lower_bound=1),
        seed=flags.DEFINE_integer("seed", 0, "Seed for training and for the fault campaigns."),
        clip_norm=flags.DEFINE_float("clip_norm", 1.0, "Global gradient norm clip for both models (0: none).",
                                     lower_bound=0.0),
        eval_examples=flags.DEFINE_integer("eval_examples", 500, "Test images per trial.", lower_bound=1),
        executor=flags.DEFINE_string("executor", "loop",
                                     "Campaign executor (loop was fastest for weight faults)."),
        quick=flags.DEFINE_bool("quick", False,
                                "Tiny settings for a smoke test: 1 epoch, at most 4 trials, small data."))
    study_flags.validate("rates", study_flags.check_rates)
    study_flags.validate("executor", study_flags.check_executor)
    study_flags.validate("eval_examples", lambda n: study_flags.check_eval_size(n, data.EMBEDDED))
    return defined


def run(defined: Flags, argv: list[str]) -> None:
    """Trains both models, sweeps the rates for the four variants and writes CSV, PNG and JSON."""
    study_flags.check_no_arguments(argv)
    start = time.perf_counter()
    workdir = pathlib.Path(study_flags.user_path(defined.workdir.value))
    workdir.mkdir(parents=True, exist_ok=True)
    config = _config(defined)
    train_data, test_data = _datasets(config)
    trained = {kind: _train(kind, config, train_data, test_data) for kind in ("normal", "fault-aware")}
    functions = {kind: _protected(model, variables, train_data)
                 for kind, (model, variables, _) in trained.items()}
    rows, errors, goldens = [], {}, {}
    for kind, restricted in _VARIANTS:
        apply_fn, params, _ = functions[kind][restricted]
        for rate in config["rates"]:
            row, errors[kind, restricted, rate] = _campaign(apply_fn, params, rate, test_data, config)
            goldens[kind, restricted] = row["golden_error"]
            rows.append({"variant": _label((kind, restricted)), "training": kind,
                         "restriction": restricted, **row,
                         **_versus((kind, restricted), rate, errors, goldens)})
            print(_progress(rows[-1]), flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(workdir / f"{_NAME}.csv", index=False)
    study.plot_variants(table, workdir / f"{_NAME}.png", _title(config))
    config["results"] = {
        "training": {kind: _training_summary(metrics) for kind, (_, _, metrics) in trained.items()},
        "bounds": {kind: functions[kind][True][2] for kind in functions},
        "wall_seconds": time.perf_counter() - start,
        "versions": {"jaxfi": jaxfi.__version__, "jax": jax.__version__},
    }
    (workdir / f"{_NAME}.json").write_text(json.dumps(config, indent=2))
    print(f"wrote {workdir}/{_NAME}.{{csv,png,json}} in {config['results']['wall_seconds']:.0f}s")


def _config(defined: Flags) -> dict[str, Any]:
    settings = dict(training.DEFAULTS[defined.model.value])
    if defined.epochs.value is not None:
        settings["epochs"] = defined.epochs.value
    quick = defined.quick.value
    return {
        "model": defined.model.value,
        "train_rate": defined.train_rate.value,
        "rates": sorted(study_flags.check_rates(defined.rates.value)),
        "trials": min(defined.trials.value, 4) if quick else defined.trials.value,
        "seed": defined.seed.value,
        "eval_examples": min(defined.eval_examples.value, 100) if quick else defined.eval_examples.value,
        "train_examples": 1000 if quick else None,
        "executor": defined.executor.value,
        "restricted_sites": "ReLU outputs: " + _RELU_OUTPUTS.describe(),
        "training": {**settings, "epochs": 1 if quick else settings["epochs"],
                     "clip_norm": defined.clip_norm.value or None},
        "quick": quick,
    }


def _datasets(config: dict[str, Any]) -> tuple[data.Dataset, data.Dataset]:
    train_data = data.load(data.EMBEDDED, "train")
    if config["train_examples"] is not None:
        train_data = data.eval_subset(train_data, config["train_examples"], config["seed"])
    test_data = data.eval_subset(data.load(data.EMBEDDED, "test"), config["eval_examples"], config["seed"])
    return train_data, test_data


def _train(kind: str, config: dict[str, Any], train_data: data.Dataset,
           test_data: data.Dataset) -> tuple[Any, Any, dict[str, Any]]:
    """(model, variables, metrics), trained normally or under --train_rate weight faults."""
    model = models.get_model(config["model"], num_classes=train_data.num_classes)
    plans = [jaxfi.Plan(jaxfi.Params(), ber=config["train_rate"])] if kind == "fault-aware" else []
    print(f"training {config['model']} ({kind})")
    variables, metrics = training.train(model, train_data, test_data, plans=plans,
                                        seed=config["seed"], **config["training"])
    return model, variables, metrics


def _protected(model: Any, variables: Any,
               train_data: data.Dataset) -> dict[bool, tuple[Any, Any, Any]]:
    """restricted -> (apply_fn, params, bounds or None) for one trained model."""
    apply_fn, params = models.bind_inference(model, variables)
    images = (x for x, _ in data.batches(train_data, 500))
    bounds = jaxfi.record_bounds(apply_fn, _RELU_OUTPUTS, params, images)
    return {False: (apply_fn, params, None), True: (jaxfi.restrict(apply_fn, bounds), params, bounds)}


def _campaign(apply_fn: Any, params: Any, rate: float, test_data: data.Dataset,
              config: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray]:
    """The row of one (variant, rate) campaign and its per-trial errors."""
    start = time.perf_counter()
    campaign = jaxfi.Campaign(apply_fn, params, test_data.images, test_data.labels,
                              jaxfi.Plan(jaxfi.Params(), ber=rate), seed=config["seed"])
    result = campaign.run(config["trials"], executor=config["executor"], quiet=True)
    errors = 1.0 - result.table["accuracy"].to_numpy(np.float64)
    golden_error = 1.0 - campaign.golden.accuracy
    error = stats.mean_interval(errors, bounds=(0.0, 1.0), baseline=golden_error)
    return {
        "rate": rate, "trials": len(result), "eval_examples": len(test_data.labels),
        "error": error["mean"], "lo": error["lo"], "hi": error["hi"],
        "golden_error": golden_error,
        "due_trials": float(result.table["due"].mean()),
        "faults_per_trial": float(result.table["faults"].mean()),
        "seconds": time.perf_counter() - start,
    }, errors


def _versus(variant: Variant, rate: float, errors: dict[tuple[str, bool, float], np.ndarray],
            goldens: dict[Variant, float]) -> dict[str, Any]:
    """Paired difference (this - reference) over trials with the same faults, and its 95% interval."""
    reference = _REFERENCE.get(variant)
    if reference is None:
        return {"reference": "", "diff": np.nan, "diff_lo": np.nan, "diff_hi": np.nan}
    diff = stats.paired_interval(errors[(*variant, rate)], errors[(*reference, rate)],
                                 baseline=goldens[variant] - goldens[reference])
    return {"reference": _label(reference), "diff": diff["mean"], "diff_lo": diff["lo"], "diff_hi": diff["hi"]}


def _label(variant: Variant) -> str:
    kind, restricted = variant
    return f"{kind}{' + range restriction' if restricted else ''}"


def _progress(row: dict[str, Any]) -> str:
    line = (f"{row['variant']:32s} rate {row['rate']:.0e}: error {row['error']:.4f} "
            f"[{row['lo']:.4f}, {row['hi']:.4f}]")
    if row["reference"]:
        line += f", vs {row['reference']}: {row['diff']:+.4f} [{row['diff_lo']:+.4f}, {row['diff_hi']:+.4f}]"
    return line + f" ({row['seconds']:.1f}s)"


def _title(config: dict[str, Any]) -> str:
    return (f"{config['model']} on mnist5k under weight bit flips: fault-aware training at "
            f"{config['train_rate']:.0e}, range restriction of ReLU outputs\n"
            f"{config['trials']} trials x {config['eval_examples']} test images per point; "
            "bands: 95% intervals over trials")


def _training_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("final_test_accuracy", "train_seconds", "train_loss", "test_accuracy", "skipped_steps",
            "faults_per_step")
    return {k: metrics[k] for k in keys}


def main() -> None:
    """The ``jaxfi-fault-aware`` command: defines the flags, parses them and runs."""
    study_flags.run_script(functools.partial(run, define_flags()), __doc__)
