"""Fault-aware training of the models under test: ``jaxfi.training.train`` with faults.

``train(model, train_data, test_data, plans=[...], **settings)`` takes the same
settings as ``jaxfi.training.train`` (optimiser, cosine schedule, weight decay
on kernels, shuffling, seed) and runs every step through
``jaxfi.fault_aware_step``: each step's forward pass sees a fresh trial of
``plans``. Params plans select leaves of the trainable params, named without
the ``params/`` prefix that ``bind_inference`` variables carry (``conv1/kernel``;
regexes such as ``r"conv1/kernel"`` match both). With no plans it returns
bitwise what ``jaxfi.training.train`` returns.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxfi import data as data_lib
from jaxfi import models as models_lib
from jaxfi import training
from jaxfi._src.fault_aware import LossFn, fault_aware_step, init_state
from jaxfi._src.plan import Plan

__all__ = ["classifier_loss", "train"]

# Fault keys are fold_in(key(seed), 2); training.train uses 1 for dropout.
_FAULT_STREAM = 2


def classifier_loss(model: nn.Module) -> LossFn:
    """``loss_fn(params, (images, labels), model_state) -> (loss, new_model_state)``.

    Mean softmax cross-entropy of ``model`` in training mode; non-param
    collections (BatchNorm statistics) are updated through ``model_state``.
    No dropout rng is passed (none of the models in ``jaxfi.models`` uses one).
    """

    def loss_fn(params: Any, batch: tuple[jax.Array, jax.Array],
                model_state: Any) -> tuple[jax.Array, Any]:
        images, labels = batch
        mutable = list(model_state) or False
        out = model.apply({"params": params, **model_state}, images, train=True, mutable=mutable)
        logits, new_state = out if mutable else (out, {})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, {**model_state, **new_state}

    return loss_fn


def train(
    model: nn.Module,
    train_data: data_lib.Dataset,
    test_data: data_lib.Dataset | None = None,
    *,
    plans: Sequence[Plan] = (),
    epochs: int,
    batch_size: int,
    learning_rate: float,
    optimizer: str = "adam",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
    seed: int = 0,
    log: training.Log = print,
) -> tuple[training.Variables, dict[str, Any]]:
    """Trains ``model`` from scratch like ``jaxfi.training.train``, every step under ``plans``.

    ``clip_norm`` clips each step's gradient to that global norm first. Use it
    with weight faults: an exponent flip gives a finite loss near 1e34 whose
    gradient would otherwise swamp Adam's second moment and stall training
    (measured: lenet5 at BER 1e-6 lost 3 points of test accuracy without it).

    Returns (variables, metrics): metrics has everything ``training.train``
    reports (the per-epoch loss is the faulty forward's, over applied steps)
    plus per-epoch ``skipped_steps`` (non-finite loss or gradient) and
    ``faults_per_step`` (mean faults placed per step).
    """
    training._check_hyperparameters(epochs, batch_size, learning_rate, optimizer)
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm!r}")
    start = time.perf_counter()
    steps_per_epoch = len(train_data.labels) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} exceeds the {len(train_data.labels)} training examples")
    variables = models_lib.init_variables(model, train_data.images.shape[1:], seed)
    model_state = {k: v for k, v in variables.items() if k != "params"}
    tx = training._optimizer(optimizer, learning_rate, epochs * steps_per_epoch, momentum, weight_decay)
    if clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    step_fn = fault_aware_step(classifier_loss(model), tx, *plans)
    state = init_state(variables["params"], tx, model_state)
    fault_key = jax.random.fold_in(jax.random.key(seed), _FAULT_STREAM)
    predict = functools.partial(training._logits, model)
    metrics: dict[str, Any] = {"train_loss": [], "test_accuracy": [], "epoch_seconds": [],
                               "skipped_steps": [], "faults_per_step": []}
    for epoch in range(epochs):
        epoch_start, infos = time.perf_counter(), []
        for x, y in data_lib.batches(train_data, batch_size, seed=(seed, epoch), drop_remainder=True):
            state, info = step_fn(state, (x, y), fault_key)
            infos.append(info)
        _record_epoch(metrics, infos)
        variables = {"params": state.params, **state.model_state}
        accuracy = None if test_data is None else training._accuracy(predict, variables, test_data, 500)
        metrics["test_accuracy"].append(accuracy)
        metrics["epoch_seconds"].append(time.perf_counter() - epoch_start)
        training._log(log, _epoch_line(metrics, epoch, epochs))
    metrics.update(
        train_seconds=time.perf_counter() - start,
        final_test_accuracy=metrics["test_accuracy"][-1],
        num_params=models_lib.param_count(state.params),
    )
    return {"params": state.params, **state.model_state}, metrics


def _record_epoch(metrics: dict[str, Any], infos: list[Any]) -> None:
    """Appends the epoch's mean loss over applied steps, skipped steps and faults per step."""
    applied = np.asarray(jnp.stack([i.applied for i in infos]))
    losses = np.asarray(jnp.stack([i.loss for i in infos]))
    faults = np.asarray(jnp.stack([jnp.asarray(sum(r.count for r in i.records)) for i in infos]))
    # jnp.mean as in training.train, so that a run without faults reports the same loss.
    metrics["train_loss"].append(float(jnp.mean(losses[applied])) if applied.any() else float("nan"))
    metrics["skipped_steps"].append(int((~applied).sum()))
    metrics["faults_per_step"].append(float(np.mean(faults)))


def _epoch_line(metrics: dict[str, Any], epoch: int, epochs: int) -> str:
    accuracy = metrics["test_accuracy"][-1]
    return (f"epoch {epoch + 1}/{epochs}: train loss {metrics['train_loss'][-1]:.4f}"
            + ("" if accuracy is None else f", test accuracy {accuracy:.4f}")
            + f", {metrics['faults_per_step'][-1]:.2f} faults/step, "
            f"{metrics['skipped_steps'][-1]} skipped ({metrics['epoch_seconds'][-1]:.1f}s)")
