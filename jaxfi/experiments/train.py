"""Trains one model under test and caches it in --workdir.

    python experiments/train.py --model=lenet5 --workdir=/tmp/w    (or: jaxfi-train ...)

Writes WORKDIR/MODEL.msgpack (variables) and WORKDIR/MODEL.json (settings,
per-epoch metrics, versions). Re-running with the same flags reports the
existing checkpoint; different flags are refused unless --overwrite.
Unset training flags take jaxfi.training.DEFAULTS for the model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from typing import Any

from jaxfi import data, models, training
from jaxfi.study import flags as study_flags

flags = study_flags.flags


@dataclasses.dataclass(frozen=True)
class Flags:
    """The holders of this script's flags."""

    model: Any
    dataset: Any
    data_dir: Any
    epochs: Any
    batch_size: Any
    learning_rate: Any
    optimizer: Any
    weight_decay: Any
    seed: Any
    workdir: Any
    overwrite: Any


def define_flags() -> Flags:
    """Defines the script's flags (they show under the script's name in --help)."""
    flags.disclaim_key_flags()
    return Flags(
        model=flags.DEFINE_enum("model", "lenet5", models.MODELS, "Model to train."),
        dataset=flags.DEFINE_string("dataset", data.EMBEDDED, "'mnist5k' or a prepared TFDS dataset name."),
        data_dir=flags.DEFINE_string("data_dir", None, "TFDS data directory (TFDS datasets only)."),
        epochs=flags.DEFINE_integer("epochs", None, "Epochs (default: per model).", lower_bound=1),
        batch_size=flags.DEFINE_integer("batch_size", None, "Batch size (default: per model).", lower_bound=1),
        learning_rate=flags.DEFINE_float(
            "learning_rate", None, "Peak learning rate of the cosine schedule (default: per model).",
            lower_bound=0.0),
        optimizer=flags.DEFINE_enum("optimizer", None, ["adam", "sgd"], "Optimizer (default: per model)."),
        weight_decay=flags.DEFINE_float("weight_decay", None, "Weight decay on kernels (default: per model).",
                                        lower_bound=0.0),
        seed=flags.DEFINE_integer("seed", 0, "Seed for initialisation, shuffling and dropout."),
        workdir=flags.DEFINE_string("workdir", None, "Directory for the checkpoint and its metadata.",
                                    required=True),
        overwrite=flags.DEFINE_bool("overwrite", False, "Replace a checkpoint trained with other settings."))


def run(defined: Flags, argv: list[str]) -> None:
    """Trains or loads the model and prints its settings and metrics."""
    study_flags.check_no_arguments(argv)
    try:
        _, _, meta = training.train_or_load(
            defined.model.value, study_flags.user_path(defined.workdir.value), defined.dataset.value,
            data_dir=study_flags.user_path(defined.data_dir.value), epochs=defined.epochs.value,
            batch_size=defined.batch_size.value, learning_rate=defined.learning_rate.value,
            optimizer=defined.optimizer.value, weight_decay=defined.weight_decay.value,
            seed=defined.seed.value, overwrite=defined.overwrite.value)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    metrics = meta["metrics"]
    print(json.dumps({
        "checkpoint": f"{study_flags.user_path(defined.workdir.value)}/{defined.model.value}.msgpack",
        "config": meta["config"],
        "test_accuracy": metrics["final_test_accuracy"],
        "train_seconds": round(metrics["train_seconds"], 1),
        "num_params": metrics["num_params"],
    }, indent=2))


def main() -> None:
    """The ``jaxfi-train`` command: defines the flags, parses them and runs."""
    study_flags.run_script(functools.partial(run, define_flags()), __doc__)
