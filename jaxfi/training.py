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
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

from jaxfi import data as data_lib
from jaxfi import models as models_lib

__all__ = ["DEFAULTS", "train", "evaluate", "save_checkpoint", "load_checkpoint", "train_or_load"]

Variables = dict[str, Any]
Log = Callable[[str], Any] | None

# Per-model training settings for mnist5k. Measured on 2 shared CPU cores (seeds 0-2):
# mlp 95-96% test accuracy in 3-4 s, lenet5 97-98% in 10-17 s, resnet8 98% in 40-57 s.
DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": dict(epochs=10, batch_size=64, learning_rate=1e-3, optimizer="adam", weight_decay=1e-4),
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
    seed: int = 0,
    log: Log = print,
) -> tuple[Variables, dict[str, Any]]:
    """Trains ``model`` from scratch with a cosine-decayed learning rate.

    ``optimizer`` is "adam" (AdamW) or "sgd" (with ``momentum``); weight decay
    applies to kernels only, not to biases or BatchNorm. Each epoch logs the
    mean training loss and, if ``test_data`` is given, the test accuracy. The
    same seed gives bitwise the same variables on the same machine.

    Returns:
      (variables, metrics): metrics has per-epoch ``train_loss``,
      ``test_accuracy`` and ``epoch_seconds``, plus ``train_seconds``,
      ``final_test_accuracy`` (None without test data) and ``num_params``.
    """
    _check_hyperparameters(epochs, batch_size, learning_rate, optimizer)
    start = time.perf_counter()
    steps_per_epoch = len(train_data.labels) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} exceeds the {len(train_data.labels)} training examples")
    variables = models_lib.init_variables(model, train_data.images.shape[1:], seed)
    params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    tx, step_fn = _train_step(
        model, optimizer, learning_rate, epochs * steps_per_epoch, momentum, weight_decay
    )
    opt_state = tx.init(params)
    dropout_key = jax.random.fold_in(jax.random.key(seed), 1)
    predict = functools.partial(_logits, model)
    metrics: dict[str, Any] = {"train_loss": [], "test_accuracy": [], "epoch_seconds": []}
    step = 0
    for epoch in range(epochs):
        epoch_start, losses = time.perf_counter(), []
        for x, y in data_lib.batches(train_data, batch_size, seed=(seed, epoch), drop_remainder=True):
            params, state, opt_state, loss = step_fn(
                params, state, opt_state, x, y, jax.random.fold_in(dropout_key, step)
            )
            losses.append(loss)
            step += 1
        metrics["train_loss"].append(float(jnp.mean(jnp.stack(losses))))
        accuracy = (
            None if test_data is None else _accuracy(predict, {"params": params, **state}, test_data, 500)
        )
        metrics["test_accuracy"].append(accuracy)
        metrics["epoch_seconds"].append(time.perf_counter() - epoch_start)
        _log(
            log,
            f"epoch {epoch + 1}/{epochs}: train loss {metrics['train_loss'][-1]:.4f}"
            + ("" if accuracy is None else f", test accuracy {accuracy:.4f}")
            + f" ({metrics['epoch_seconds'][-1]:.1f}s)",
        )
    metrics.update(
        train_seconds=time.perf_counter() - start,
        final_test_accuracy=metrics["test_accuracy"][-1],
        num_params=models_lib.param_count(params),
    )
    return {"params": params, **state}, metrics


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


# Cached on the (hashable) model and settings, so that runs differing only in seed or
# data reuse one compiled step.
@functools.lru_cache(maxsize=32)
def _train_step(
    model: nn.Module,
    optimizer: str,
    learning_rate: float,
    total_steps: int,
    momentum: float,
    weight_decay: float,
) -> tuple[optax.GradientTransformation, Callable[..., Any]]:
    """The optimizer and a jitted step; BatchNorm statistics (non-param collections) update alongside."""
    tx = _optimizer(optimizer, learning_rate, total_steps, momentum, weight_decay)

    def loss_fn(params: Any, state: Variables, x: jax.Array, y: jax.Array, key: jax.Array) -> Any:
        mutable = list(state) or False
        out = model.apply({"params": params, **state}, x, train=True, rngs={"dropout": key}, mutable=mutable)
        logits, new_state = out if mutable else (out, {})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, new_state

    @jax.jit
    def step(
        params: Any, state: Variables, opt_state: Any, x: jax.Array, y: jax.Array, key: jax.Array
    ) -> Any:
        (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), {**state, **new_state}, opt_state, loss

    return tx, step


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
    blob = flax.serialization.to_bytes(jax.tree.map(np.asarray, variables))
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
    variables = flax.serialization.msgpack_restore(blob)
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
