"""Trains one model under test and caches it in --workdir.

    python experiments/train.py --model=lenet5 --workdir=/tmp/w

Writes WORKDIR/MODEL.msgpack (variables) and WORKDIR/MODEL.json (settings,
per-epoch metrics, versions). Re-running with the same flags reports the
existing checkpoint; different flags are refused unless --overwrite.
Unset training flags take jaxfi.training.DEFAULTS for the model.
"""

import json
import sys

from absl import app, flags

from jaxfi import data, models, training

_MODEL = flags.DEFINE_enum("model", "lenet5", models.MODELS, "Model to train.")
_DATASET = flags.DEFINE_string("dataset", data.EMBEDDED, "'mnist5k' or a prepared TFDS dataset name.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory (TFDS datasets only).")
_EPOCHS = flags.DEFINE_integer("epochs", None, "Epochs (default: per model).", lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Batch size (default: per model).", lower_bound=1)
_LEARNING_RATE = flags.DEFINE_float(
    "learning_rate", None, "Peak learning rate of the cosine schedule (default: per model)."
)
_OPTIMIZER = flags.DEFINE_enum("optimizer", None, ["adam", "sgd"], "Optimizer (default: per model).")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", None, "Weight decay on kernels (default: per model).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for initialisation, shuffling and dropout.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for the checkpoint and its metadata.", required=True
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a checkpoint trained with other settings.")


def main(argv: list[str]) -> None:
    """Trains or loads the model and prints its settings and metrics."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        _, _, meta = training.train_or_load(
            _MODEL.value,
            _WORKDIR.value,
            _DATASET.value,
            data_dir=_DATA_DIR.value,
            epochs=_EPOCHS.value,
            batch_size=_BATCH_SIZE.value,
            learning_rate=_LEARNING_RATE.value,
            optimizer=_OPTIMIZER.value,
            weight_decay=_WEIGHT_DECAY.value,
            seed=_SEED.value,
            overwrite=_OVERWRITE.value,
        )
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    metrics = meta["metrics"]
    print(
        json.dumps(
            {
                "checkpoint": f"{_WORKDIR.value}/{_MODEL.value}.msgpack",
                "config": meta["config"],
                "test_accuracy": metrics["final_test_accuracy"],
                "train_seconds": round(metrics["train_seconds"], 1),
                "num_params": metrics["num_params"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    app.run(main)
