"""Training the models under test with optax, evaluating them, and checkpoints.

A checkpoint is two files: ``NAME.msgpack`` (the variables, Flax msgpack) and
``NAME.json`` (metadata: model, run configuration, metrics, library versions
and the msgpack's SHA-256). Both are written atomically.

The study scripts call ``train_or_load``, which trains a model once per
workdir and afterwards loads the cached checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import platform
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from jaxfi import Plan, StepInfo, TrainState, fault_aware_step, init_state
from jaxfi import data as data_lib
from jaxfi import models as models_lib
from jaxfi._src.extras import require

# Training needs the ``models`` extra; without it, say so at import.
flax = require("flax", "models")
nn = require("flax.linen", "models")
flax_serialization = require("flax.serialization", "models")
optax = require("optax", "models")

__all__ = ["DEFAULTS", "train", "evaluate", "save_checkpoint", "load_checkpoint", "train_or_load"]

Variables = dict[str, Any]
Log = Callable[[str], Any] | None

# Per-model training settings for mnist5k (accuracies and times per seed: docs/models.md).
DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": dict(epochs=10, batch_size=64, learning_rate=1e-3, optimizer="adam", weight_decay=1e-4),
    "cnn": dict(epochs=8, batch_size=128, learning_rate=3e-3, optimizer="adam", weight_decay=1e-4),
    "lenet5": dict(epochs=10, batch_size=128, learning_rate=3e-3, optimizer="adam", weight_decay=1e-4),
    "resnet8": dict(epochs=6, batch_size=128, learning_rate=5e-3, optimizer="adam", weight_decay=1e-4),
}
_OPTIMIZERS = ("adam", "sgd")


def train(
    model: nn.Module,
    train_data: data_lib.Dataset,
    test_data: data_lib.Dataset | None = None,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    optimizer: str = "adam",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
    plans: Sequence[Plan] = (),
    seed: int = 0,
    log: Log = print,
) -> tuple[Variables, dict[str, Any]]:
    """Trains ``model`` from scratch with a cosine-decayed learning rate, each step under ``plans``.

    ``optimizer`` is "adam" (AdamW) or "sgd" (with ``momentum``); weight decay
    applies to kernels only, not to biases or BatchNorm. ``clip_norm`` clips
    each gradient to that global norm (use it with weight faults: an exponent
    flip's loss near 1e34 otherwise swamps Adam's moments). Each epoch logs the
    mean training loss and, if ``test_data`` is given, the test accuracy. The
    same seed gives bitwise the same variables on the same machine.

    Steps run through ``jaxfi.fault_aware_step``: each forward pass sees a
    fresh trial of ``plans``, a step with a non-finite loss or gradient is
    skipped, and with no plans a step is bitwise the plain optax step. Params
    plans name leaves without ``params/`` (``conv1/kernel``); inputs plans see
    ``arg1/0`` images, ``arg1/1`` labels, ``arg1/2`` the dropout key's data and
    ``arg2/...`` BatchNorm statistics.

    Returns:
      (variables, metrics): metrics has per-epoch ``train_loss`` (over applied
      steps), ``test_accuracy``, ``epoch_seconds``, ``skipped_steps`` and
      ``faults_per_step``, plus ``train_seconds``, ``final_test_accuracy``
      (None without test data) and ``num_params``.
    """
    _check_hyperparameters(epochs, batch_size, learning_rate, optimizer)
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm!r}")
    start = time.perf_counter()
    steps_per_epoch = len(train_data.labels) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} exceeds the {len(train_data.labels)} training examples")
    variables = models_lib.init_variables(model, train_data.images.shape[1:], seed)
    tx, step_fn = _train_step(
        model, optimizer, learning_rate, epochs * steps_per_epoch, momentum, weight_decay, clip_norm,
        tuple(plans),
    )
    state = init_state(variables["params"], tx, {k: v for k, v in variables.items() if k != "params"})
    seed_key = jax.random.key(seed)
    dropout_key, fault_key = jax.random.fold_in(seed_key, 1), jax.random.fold_in(seed_key, 2)
    predict = functools.partial(_logits, model)
    metrics: dict[str, Any] = {
        "train_loss": [], "test_accuracy": [], "epoch_seconds": [], "skipped_steps": [], "faults_per_step": []
    }
    for epoch in range(epochs):
        epoch_start, infos = time.perf_counter(), []
        batches = data_lib.batches(train_data, batch_size, seed=(seed, epoch), drop_remainder=True)
        for i, (x, y) in enumerate(batches):
            # Raw key data, as inputs plans need a numpy dtype for every batch leaf.
            dropout = jax.random.key_data(jax.random.fold_in(dropout_key, epoch * steps_per_epoch + i))
            state, info = step_fn(state, (x, y, dropout), fault_key)
            infos.append(info)
        _record_epoch(metrics, infos)
        variables = {"params": state.params, **state.model_state}
        accuracy = None if test_data is None else _accuracy(predict, variables, test_data, 500)
        metrics["test_accuracy"].append(accuracy)
        metrics["epoch_seconds"].append(time.perf_counter() - epoch_start)
        _log(log, _epoch_line(metrics, epoch, epochs, bool(plans)))
    metrics.update(
        train_seconds=time.perf_counter() - start,
        final_test_accuracy=metrics["test_accuracy"][-1],
        num_params=models_lib.param_count(state.params),
    )
    return variables, metrics


def _record_epoch(metrics: dict[str, Any], infos: list[StepInfo]) -> None:
    """Appends the epoch's mean loss over applied steps, skipped steps and faults per step."""
    applied = np.asarray(jnp.stack([i.applied for i in infos]))
    losses = np.asarray(jnp.stack([i.loss for i in infos]))
    faults = np.asarray(jnp.stack([jnp.asarray(sum(r.count for r in i.records)) for i in infos]))
    metrics["train_loss"].append(float(jnp.mean(losses[applied])) if applied.any() else float("nan"))
    metrics["skipped_steps"].append(int((~applied).sum()))
    metrics["faults_per_step"].append(float(np.mean(faults)))


def _epoch_line(metrics: dict[str, Any], epoch: int, epochs: int, faulty: bool) -> str:
    accuracy, skipped = metrics["test_accuracy"][-1], metrics["skipped_steps"][-1]
    return (
        f"epoch {epoch + 1}/{epochs}: train loss {metrics['train_loss'][-1]:.4f}"
        + ("" if accuracy is None else f", test accuracy {accuracy:.4f}")
        + (f", {metrics['faults_per_step'][-1]:.2f} faults/step" if faulty else "")
        + (f", {skipped} skipped" if faulty or skipped else "")
        + f" ({metrics['epoch_seconds'][-1]:.1f}s)"
    )


def evaluate(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    dataset: data_lib.Dataset,
    batch_size: int = 500,
) -> float:
    """Top-1 accuracy of ``apply_fn(params, images)`` on ``dataset``."""
    return _accuracy(jax.jit(apply_fn), params, dataset, batch_size)


@functools.partial(jax.jit, static_argnums=0)
def _logits(model: nn.Module, variables: Variables, x: jax.Array) -> jax.Array:
    return model.apply(variables, x, train=False)


def _accuracy(
    predict: Callable[[Any, jax.Array], jax.Array], params: Any, dataset: data_lib.Dataset, batch_size: int
) -> float:
    correct = 0
    for x, y in data_lib.batches(dataset, batch_size):
        n = len(y)
        # Pad the last batch to the full size so that one compiled shape serves all batches.
        x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)]) if n < batch_size else x
        correct += int(np.sum(np.asarray(jnp.argmax(predict(params, x), -1))[:n] == y))
    return correct / len(dataset.labels)


def _check_hyperparameters(epochs: int, batch_size: int, learning_rate: float, optimizer: str) -> None:
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")


def _optimizer(
    name: str, learning_rate: float, total_steps: int, momentum: float, weight_decay: float
) -> optax.GradientTransformation:
    schedule = optax.cosine_decay_schedule(learning_rate, total_steps)
    if name == "adam":
        return optax.adamw(schedule, weight_decay=weight_decay, mask=_kernels)
    return optax.chain(
        optax.masked(optax.add_decayed_weights(weight_decay), _kernels),
        optax.sgd(schedule, momentum=momentum),
    )


def _kernels(params: Any) -> Any:
    """Weight-decay mask: kernels only, not biases or BatchNorm scales."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


# Cached on the (hashable) model, settings and plans, so that runs differing only in seed or
# data reuse one compiled step.
@functools.lru_cache(maxsize=32)
def _train_step(
    model: nn.Module,
    optimizer: str,
    learning_rate: float,
    total_steps: int,
    momentum: float,
    weight_decay: float,
    clip_norm: float | None,
    plans: tuple[Plan, ...],
) -> tuple[optax.GradientTransformation, Callable[..., tuple[TrainState, StepInfo]]]:
    """The optimizer and a ``jaxfi.fault_aware_step`` under ``plans``."""
    tx = _optimizer(optimizer, learning_rate, total_steps, momentum, weight_decay)
    if clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)

    def loss_fn(params: Any, batch: tuple[jax.Array, jax.Array, jax.Array], state: Variables) -> Any:
        """Cross-entropy in training mode; BatchNorm statistics (non-param collections) update alongside."""
        x, y, dropout = batch
        mutable = list(state) or False
        rngs = {"dropout": jax.random.wrap_key_data(dropout)}
        out = model.apply({"params": params, **state}, x, train=True, rngs=rngs, mutable=mutable)
        logits, new_state = out if mutable else (out, {})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, {**state, **new_state}

    return tx, fault_aware_step(loss_fn, tx, *plans)


def _log(log: Log, message: str) -> None:
    if log is not None:
        log(message)


def save_checkpoint(path: str | os.PathLike, variables: Variables, meta: Mapping[str, Any]) -> None:
    """Writes ``variables`` to ``path`` (msgpack) and ``meta`` plus versions and hash to its .json sibling.

    ``meta`` must be JSON-serialisable; by convention it holds "model",
    "config", "metrics". Each file is written to a temporary file and renamed,
    so a crash never leaves a half-written checkpoint.
    """
    path = pathlib.Path(path)
    blob = flax_serialization.to_bytes(jax.tree.map(np.asarray, variables))
    full_meta = {**meta, "versions": _versions(), "sha256": hashlib.sha256(blob).hexdigest()}
    text = json.dumps(full_meta, indent=2, sort_keys=True)
    _write_atomic(path, blob)
    _write_atomic(_meta_path(path), text.encode())


def load_checkpoint(
    path: str | os.PathLike, model_name: str | None = None, *, like: Any = None
) -> tuple[Variables, dict[str, Any]]:
    """Reads a checkpoint written by ``save_checkpoint``: returns (variables, meta).

    Args:
      path: the .msgpack file.
      model_name: if given, the checkpoint must hold this model.
      like: if given, a pytree (arrays or ``jax.ShapeDtypeStruct``) that the
        variables must match in structure, shapes and dtypes, e.g.
        ``jax.eval_shape`` of the model's init.

    Raises:
      FileNotFoundError: no checkpoint at ``path``.
      ValueError: another model, another tree, or bytes that do not match the metadata.
    """
    path = pathlib.Path(path)
    meta = _read_meta(path)
    if model_name is not None and meta.get("model") != model_name:
        raise ValueError(f"checkpoint {path} holds model {meta.get('model')!r}, not {model_name!r}")
    blob = path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
        raise ValueError(
            f"checkpoint {path} does not match the hash in {_meta_path(path)}: corrupt or mixed files"
        )
    variables = flax_serialization.msgpack_restore(blob)
    if like is not None:
        _check_same_tree(variables, like, path)
    return jax.tree.map(jnp.asarray, variables), meta


def _meta_path(path: pathlib.Path) -> pathlib.Path:
    if path.suffix == ".json":
        raise ValueError(f"checkpoint path must not end in .json (that is its metadata file), got {path}")
    return path.with_suffix(".json")


def _read_meta(path: pathlib.Path) -> dict[str, Any]:
    meta_path = _meta_path(path)
    if not path.exists() or not meta_path.exists():
        raise FileNotFoundError(f"no checkpoint at {path} (needs {path.name} and {meta_path.name})")
    return json.loads(meta_path.read_text())


def _write_atomic(path: pathlib.Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file private (0600); a checkpoint is meant to be shared.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _check_same_tree(variables: Any, like: Any, path: pathlib.Path) -> None:
    """Raises ValueError naming the first pytree path where ``variables`` and ``like`` differ."""
    got = {
        jax.tree_util.keystr(p): (v.shape, np.dtype(v.dtype))
        for p, v in jax.tree_util.tree_leaves_with_path(variables)
    }
    want = {
        jax.tree_util.keystr(p): (v.shape, np.dtype(v.dtype))
        for p, v in jax.tree_util.tree_leaves_with_path(like)
    }
    missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    if missing or extra:
        raise ValueError(
            f"checkpoint {path} is for another model: missing {missing[:5]}, unexpected {extra[:5]}"
            + (" (lists cut at 5)" if max(len(missing), len(extra)) > 5 else "")
        )
    for key, spec in want.items():
        if got[key] != spec:
            raise ValueError(f"checkpoint {path}: {key} has shape/dtype {got[key]}, the model expects {spec}")


def _versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
    }


def train_or_load(
    model_name: str,
    workdir: str | os.PathLike,
    dataset: str = data_lib.EMBEDDED,
    *,
    data_dir: str | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    optimizer: str | None = None,
    momentum: float = 0.9,
    weight_decay: float | None = None,
    seed: int = 0,
    model_kwargs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    log: Log = print,
) -> tuple[nn.Module, Variables, dict[str, Any]]:
    """Trains ``model_name`` on ``dataset`` once, caching it as ``workdir/<model_name>.msgpack``.

    Settings left as None come from ``DEFAULTS[model_name]``. If the workdir
    already holds a checkpoint of this model trained with the same settings
    it is loaded instead; one with other settings is an error unless
    ``overwrite``.

    Returns:
      (model, variables, meta); meta["metrics"] has the training metrics.
    """
    given = dict(
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        optimizer=optimizer,
        weight_decay=weight_decay,
    )
    config = _run_config(model_name, dataset, given, momentum=momentum, seed=seed, model_kwargs=model_kwargs)
    path = pathlib.Path(workdir) / f"{model_name}.msgpack"
    cached = _cached(path, config, overwrite, log)
    if cached is not None:
        return cached
    train_data = data_lib.load(dataset, "train", data_dir)
    test_data = data_lib.load(dataset, data_lib.eval_split(dataset), data_dir)
    model = models_lib.get_model(model_name, num_classes=train_data.num_classes, **config["model_kwargs"])
    _log(log, f"training {model_name} on {dataset} -> {path}")
    variables, metrics = train(model, train_data, test_data, log=log, **_train_kwargs(config))
    meta = {
        "model": model_name,
        "config": config,
        "num_classes": train_data.num_classes,
        "input_shape": list(train_data.images.shape[1:]),
        "metrics": metrics,
    }
    save_checkpoint(path, variables, meta)
    return model, variables, meta


def _run_config(
    model_name: str,
    dataset: str,
    given: Mapping[str, Any],
    *,
    momentum: float,
    seed: int,
    model_kwargs: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Everything that determines the trained weights, JSON-normalised so it compares with a saved one.

    ``given`` holds the training settings passed by the caller; None means the model's default.
    """
    if model_name not in models_lib.MODELS:
        raise ValueError(f"unknown model {model_name!r}; known models: {', '.join(models_lib.MODELS)}")
    settings = {**DEFAULTS.get(model_name, {}), **{k: v for k, v in given.items() if v is not None}}
    unset = [k for k in ("epochs", "batch_size", "learning_rate") if k not in settings]
    if unset:
        raise ValueError(f"no default training settings for {model_name!r}; pass {', '.join(unset)}")
    settings.setdefault("optimizer", "adam")
    settings.setdefault("weight_decay", 0.0)
    config = dict(
        model=model_name,
        dataset=dataset,
        momentum=momentum,
        seed=seed,
        model_kwargs=dict(model_kwargs or {}),
        **settings,
    )
    return json.loads(json.dumps(config))


def _train_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("epochs", "batch_size", "learning_rate", "optimizer", "momentum", "weight_decay", "seed")
    return {k: config[k] for k in keys}


def _cached(
    path: pathlib.Path, config: dict[str, Any], overwrite: bool, log: Log
) -> tuple[nn.Module, Variables, dict[str, Any]] | None:
    """The checkpoint at ``path`` if it was trained with ``config``; None if there is none or overwrite."""
    try:
        meta = _read_meta(path)
    except FileNotFoundError:
        return None
    if meta.get("config") != config:
        if overwrite:
            _log(log, f"overwriting {path} (a run with other settings)")
            return None
        old = meta.get("config") or {}
        diff = {k: (old.get(k), config[k]) for k in config if old.get(k) != config[k]}
        raise ValueError(
            f"{path} holds a different run (setting: (existing, requested)) {diff}; "
            "use another workdir or overwrite (--overwrite) to replace it"
        )
    model = models_lib.get_model(config["model"], num_classes=meta["num_classes"], **config["model_kwargs"])
    like = jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jnp.zeros((1, *meta["input_shape"]), jnp.float32),
    )
    variables, meta = load_checkpoint(path, config["model"], like=like)
    accuracy = meta.get("metrics", {}).get("final_test_accuracy")
    _log(log, f"using existing checkpoint {path} (test accuracy {accuracy})")
    return model, variables, meta
