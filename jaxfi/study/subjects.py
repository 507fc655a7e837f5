"""Subjects of a study (a model with its evaluation inputs) and what counts as their weights and layers."""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxfi
from jaxfi import data as data_lib
from jaxfi import models as models_lib
from jaxfi import training

Log = Callable[[str], Any] | None

DTYPES = ("float32", "bfloat16", "float16")
# Random ImageNet-shaped inputs made in code (no download), labelled by each
# model's own fault-free prediction: the paper-scale path without the data.
SYNTHETIC = "synthetic_imagenet"
SYNTHETIC_SHAPE = (224, 224, 3)
SYNTHETIC_CLASSES = 1000


@dataclasses.dataclass(frozen=True, eq=False)
class Subject:
    """A model under study with its evaluation inputs.

    Attributes:
      name: the model's name (``mlp``, ``lenet5``, ...).
      apply_fn: ``apply_fn(params, images)`` gives logits.
      params: the variables pytree.
      images: the evaluation inputs.
      labels: their labels.
      info: JSON-ready provenance (source, accuracy, size).
      dtype: the storage format of the weights (``int8`` for a ``quantized`` subject).
    """

    name: str
    apply_fn: Callable[[Any, Any], Any]
    params: Any
    images: np.ndarray
    labels: np.ndarray
    info: dict[str, Any]
    dtype: str = "float32"

    @property
    def label(self) -> str:
        """The name, suffixed with the dtype when it is not float32."""
        return self.name if self.dtype == "float32" else f"{self.name}-{self.dtype}"


def load_subjects(names: Sequence[str], workdir: str | pathlib.Path, *,
                  dataset: str = data_lib.EMBEDDED, data_dir: str | None = None,
                  weights: str | None = None, eval_size: int = 256, seed: int = 0,
                  epochs: int | None = None, batch_size: int | None = None,
                  log: Log = print) -> list[Subject]:
    """The models ``names`` and an evaluation subset of ``eval_size`` test inputs.

    Every model sees the same inputs, chosen by ``seed``. With ``dataset``
    ``"synthetic_imagenet"`` (``SYNTHETIC``) the inputs are ``eval_size``
    standard normal 224x224x3 images drawn with ``seed`` and each model's
    labels are its own fault-free top-1 classes (golden accuracy 100%, so
    the top-1 error of a trial is its share of changed classes); it needs
    ``weights``.

    Args:
      names: model names from ``jaxfi.models.MODELS``.
      workdir: without ``weights``, each model is trained on ``dataset`` once
        and cached in ``workdir/models`` (``jaxfi.training.train_or_load``).
      dataset: ``"mnist5k"`` or a prepared TFDS dataset.
      data_dir: the TFDS data directory.
      weights: a directory of torchvision state dicts ``NAME.safetensors`` or
        ``NAME.npz``, converted with ``jaxfi.models.convert.from_torchvision``.
      eval_size: the number of test inputs.
      seed: chooses the test inputs.
      epochs: overrides each model's default training epochs.
      batch_size: inputs per forward pass when labelling synthetic inputs
        (None: all at once).
      log: where progress lines go (None: nowhere).

    Returns:
      One ``Subject`` per name.

    Raises:
      ValueError: an unknown model or dataset, ``eval_size`` out of range,
        or synthetic inputs without ``weights``.
      FileNotFoundError: ``weights`` lacks a model's file.
    """
    if dataset == SYNTHETIC and weights is None:
        raise ValueError(f"dataset {SYNTHETIC!r} needs weights (a directory of torchvision state dicts): "
                         "there is nothing to train on")
    evaluation = (synthetic_images(eval_size, seed) if dataset == SYNTHETIC else
                  data_lib.load(dataset, data_lib.eval_split(dataset), data_dir,
                                num_examples=eval_size, seed=seed))
    subjects = []
    for name in names:
        if weights is None:
            model, variables, info = _trained(name, workdir, dataset, data_dir, epochs, log)
        else:
            model, variables, info = _converted(name, weights, evaluation.num_classes)
        apply_fn, params = models_lib.bind_inference(model, variables)
        info["parameters"] = models_lib.param_count(params.get("params", params))
        labels = (predict(apply_fn, params, evaluation.images, batch_size) if dataset == SYNTHETIC
                  else evaluation.labels)
        subjects.append(Subject(name, apply_fn, params, evaluation.images, labels, info))
    return subjects


def synthetic_images(n: int, seed: int = 0) -> data_lib.Dataset:
    """``n`` standard normal ImageNet-shaped images (224x224x3, float32) drawn with ``seed``, labels 0.

    Standard normal, like ImageNet images after the usual per-channel
    normalisation. Made in code: nothing is downloaded.

    Raises:
      ValueError: ``n`` below 1.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"the number of synthetic images must be a positive integer, got {n!r}")
    images = np.random.default_rng(seed).standard_normal((n, *SYNTHETIC_SHAPE), dtype=np.float32)
    return data_lib.Dataset(images, np.zeros(n, np.int32), SYNTHETIC_CLASSES, SYNTHETIC, "test")


def predict(apply_fn: Callable[[Any, Any], Any], params: Any, images: np.ndarray,
            batch_size: int | None = None) -> np.ndarray:
    """The top-1 classes of ``apply_fn(params, images)``, ``batch_size`` inputs per forward pass.

    Raises:
      ValueError: ``batch_size`` below 1.
    """
    if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    forward = jax.jit(apply_fn)
    step = len(images) if batch_size is None else batch_size
    return np.concatenate([np.asarray(jnp.argmax(forward(params, images[i:i + step]), axis=-1))
                           for i in range(0, len(images), step)]).astype(np.int32)


def accuracy(subject: Subject, batch_size: int | None = None) -> float:
    """The fault-free top-1 accuracy of ``subject`` on its evaluation inputs."""
    return float(np.mean(predict(subject.apply_fn, subject.params, subject.images, batch_size)
                         == subject.labels))


def quantized(subject: Subject) -> Subject:
    """``subject`` with its kernels stored as int8 with per-channel float32 scales.

    Post-training symmetric quantization (``jaxfi.models.quantized``): each
    ``kernel`` becomes ``kernel_q`` (int8) and ``kernel_scale`` (float32 per
    output channel), dequantized in the forward pass, so faults in
    ``kernel_q`` hit the int8 storage. Biases and other leaves stay float32.

    Returns:
      A new subject with dtype ``"int8"``; its info adds the fault-free
      accuracy of both versions on the subject's inputs.
    """
    from jaxfi.models import quantized as quantized_lib  # deferred: only the int8 study needs it

    params = jax.tree.map(jnp.asarray, quantized_lib.quantize(subject.params))
    apply_fn = quantized_lib.dequantized_apply(subject.apply_fn)
    info = {**subject.info, "source": f"int8 quantization of {subject.info.get('source', subject.name)}",
            "eval_accuracy_float32": accuracy(subject)}
    result = dataclasses.replace(subject, apply_fn=apply_fn, params=params, info=info, dtype="int8")
    return dataclasses.replace(result, info={**info, "eval_accuracy_int8": accuracy(result)})


def _trained(name: str, workdir: str | pathlib.Path, dataset: str, data_dir: str | None,
             epochs: int | None, log: Log) -> tuple[Any, Any, dict[str, Any]]:
    model, variables, meta = training.train_or_load(
        name, pathlib.Path(workdir) / "models", dataset, data_dir=data_dir, epochs=epochs, log=log)
    metrics = meta["metrics"]
    return model, variables, {"source": "trained", "training": meta["config"],
                              "test_accuracy": metrics["final_test_accuracy"],
                              "train_seconds": metrics["train_seconds"]}


def _converted(name: str, weights: str, num_classes: int) -> tuple[Any, Any, dict[str, Any]]:
    from jaxfi.models import convert  # deferred: only the ImageNet path needs it

    candidates = [pathlib.Path(weights) / f"{name}{ext}" for ext in (".safetensors", ".npz")]
    found = [p for p in candidates if p.exists()]
    if not found:
        raise FileNotFoundError(f"no torchvision weights for {name!r}: expected one of "
                                f"{[str(p) for p in candidates]}")
    model = models_lib.get_model(name, num_classes=num_classes)
    return model, convert.from_torchvision(model, found[0]), {"source": str(found[0])}


def cast(subject: Subject, dtype: str) -> Subject:
    """``subject`` with every floating variable stored as ``dtype``.

    Flax promotes mixed operands, so the layers still compute in float32 from
    the float32 inputs: the format under test is the storage of the weights.

    Args:
      subject: the subject to convert.
      dtype: one of ``DTYPES``.

    Returns:
      A new subject; integer variables are left as they are.

    Raises:
      ValueError: ``dtype`` is not one of ``DTYPES``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    target = jnp.dtype(dtype)
    params = jax.tree.map(lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                          subject.params)
    return dataclasses.replace(subject, params=params, dtype=dtype)


def weight_selector(batch_stats: bool = False) -> jaxfi.Params:
    """Every leaf of the ``params`` collection; BatchNorm running statistics too if ``batch_stats``."""
    return jaxfi.Params() if batch_stats else jaxfi.Params(r"^params/")


def weight_leaves(subject: Subject, batch_stats: bool = False) -> list[jaxfi.Site]:
    """The weight sites of ``subject`` in program order (the order their modules first run)."""
    leaves = weight_selector(batch_stats).select(jaxfi.param_sites(subject.params))
    scopes = [s.scope.partition("/")[2] for s in
              jaxfi.activation_sites(subject.apply_fn, subject.params, subject.images[:1])]
    first = {scope: i for i, scope in reversed(list(enumerate(scopes)))}
    # "params/layer1_0/bn1/scale" belongs to module "layer1_0/bn1"; the root scope is the model.
    return sorted(leaves, key=lambda leaf: first.get(leaf.name.split("/", 1)[1].rpartition("/")[0],
                                                     len(scopes)))


def layer_outputs(subject: Subject) -> jaxfi.ModuleOutput:
    """The outputs of every leaf module (Conv, Dense, BatchNorm) of ``subject``.

    A leaf module is a scope that holds no other module scope; its output is
    the value leaving it (for Dense and Conv the bias add, for BatchNorm the
    final affine), so each tensor passed between layers is selected once.

    Raises:
      ValueError: the model has no module outputs.
    """
    sites = jaxfi.activation_sites(subject.apply_fn, subject.params, subject.images[:1])
    scopes = {scope for site in sites for scope in site.output_of}
    leaves = sorted(s for s in scopes if not any(t.startswith(s + "/") for t in scopes))
    if not leaves:
        raise ValueError(f"model {subject.name!r} has no module outputs to fault")
    return jaxfi.ModuleOutput("|".join(re.escape(s) for s in leaves))
