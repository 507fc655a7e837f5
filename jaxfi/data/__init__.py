"""Offline image-classification data for jaxfi.

Two sources, neither of which ever downloads:

- ``"mnist5k"``: 5,000 real MNIST images (500 per class) shipped inside the
  package (see ``NOTICE.md``). It is split once, with a fixed seed, into a
  class-stratified ``"train"`` split of 4,000 images (400 per class) and a
  ``"test"`` split of 1,000 images (100 per class). The split never changes, so
  a model trained on ``"train"`` has never seen ``"test"``.
- Any other name is read with tensorflow-datasets, without TensorFlow, through
  ``tfds.data_source`` over an already prepared ``array_record`` copy. Prepare
  it once on a machine with internet::

      tfds build NAME --data_dir=DIR --file_format=array_record

Images come back as float32 NHWC arrays, preprocessed per dataset:

- mnist5k, mnist, fashion_mnist: scaled to [0, 1], normalised with the
  dataset's mean and standard deviation.
- cifar10: scaled to [0, 1], normalised per channel.
- imagenette, imagenet2012: shorter side resized to 256 (bilinear,
  antialiased), centre crop 224x224, scaled to [0, 1], normalised with the
  ImageNet per-channel mean and standard deviation (torchvision's recipe).
- any other dataset: scaled to [0, 1].
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from jaxfi._src.extras import require

__all__ = ["Dataset", "load", "eval_subset", "batches", "eval_split", "EMBEDDED", "EMBEDDED_SIZES"]

EMBEDDED = "mnist5k"
# Examples per split of mnist5k (400 and 100 per class).
EMBEDDED_SIZES = {"train": 4000, "test": 1000}
_MNIST5K_TRAIN_PER_CLASS = 400
# The mnist5k split is part of the data, not an experiment knob: a constant seed
# keeps train and test disjoint for every user and every run.
_MNIST5K_SPLIT_SEED = 20240501

_MNIST_STATS = ((0.1307,), (0.3081,))
_NORMALISATION = {
    "mnist5k": _MNIST_STATS,
    "mnist": _MNIST_STATS,
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenette": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
_CENTRE_CROPPED = {"imagenette", "imagenet2012"}
_RESIZE_SHORT, _CROP = 256, 224
_EVAL_SPLITS = {"imagenette": "validation", "imagenet2012": "validation"}


class Dataset(NamedTuple):
    """An in-memory split: float32 NHWC ``images`` and int32 ``labels``."""

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str
    split: str


def load(
    name: str = EMBEDDED,
    split: str = "test",
    data_dir: str | None = None,
    *,
    num_examples: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Loads a preprocessed split into memory, never downloading.

    Args:
      name: ``"mnist5k"`` (embedded) or a TFDS dataset name, e.g. ``"mnist"``,
        ``"cifar10"``, ``"imagenette/320px-v2"``.
      split: ``"train"`` or ``"test"`` for mnist5k; any TFDS split string
        otherwise (see ``eval_split`` for each dataset's evaluation split).
      data_dir: TFDS data directory holding the prepared dataset (TFDS's
        default when None); ignored for mnist5k.
      num_examples: if given, read only this many examples: the same ones, in
        the same order, as ``eval_subset(load(name, split), num_examples, seed)``.
        Use it for large splits (ImageNet) that do not fit in memory.
      seed: chooses the examples when ``num_examples`` is given.

    Raises:
      ValueError: unknown dataset or split, bad ``num_examples``.
      FileNotFoundError: a TFDS dataset that is not prepared in ``data_dir``.
    """
    if name == EMBEDDED:
        ds = _load_mnist5k(split)
        return ds if num_examples is None else eval_subset(ds, num_examples, seed)
    return _load_tfds(name, split, data_dir, num_examples, seed)


def eval_subset(ds: Dataset, n: int, seed: int = 0) -> Dataset:
    """The first ``n`` examples of a permutation of ``ds`` seeded by ``seed``.

    Deterministic: the same (ds, n, seed) always gives the same examples, and
    a smaller ``n`` gives a prefix of a larger one.
    """
    return _take(ds, _subset_indices(len(ds.labels), n, seed))


def batches(
    ds: Dataset,
    batch_size: int,
    *,
    seed: int | Sequence[int] | None = None,
    drop_remainder: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields ``(images, labels)`` batches, shuffled with ``seed`` if given.

    ``seed`` is anything ``np.random.default_rng`` takes, e.g. ``(seed, epoch)``.
    Without it the dataset order is kept. The last, smaller batch is
    yielded unless ``drop_remainder``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    size = len(ds.labels)
    order = np.arange(size) if seed is None else np.random.default_rng(seed).permutation(size)
    stop = size - size % batch_size if drop_remainder else size
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield ds.images[idx], ds.labels[idx]


def eval_split(name: str) -> str:
    """The split used to measure accuracy for dataset ``name`` ("test" or "validation")."""
    return _EVAL_SPLITS.get(_base_name(name), "test")


def _base_name(name: str) -> str:
    """``"imagenette/320px-v2:1.0.0"`` -> ``"imagenette"``."""
    return name.split("/")[0].split(":")[0]


def _subset_indices(size: int, n: int, seed: int) -> np.ndarray:
    if not 0 < n <= size:
        raise ValueError(f"subset size n must be in 1..{size} (the dataset size), got {n}")
    return np.random.default_rng(seed).permutation(size)[:n]


def _take(ds: Dataset, idx: np.ndarray) -> Dataset:
    return ds._replace(images=ds.images[idx], labels=ds.labels[idx])


def _load_mnist5k(split: str) -> Dataset:
    if split not in EMBEDDED_SIZES:
        raise ValueError(f"mnist5k has splits 'train' and 'test', got split={split!r}")
    with importlib.resources.files(__name__).joinpath("mnist5k.npz").open("rb") as f, np.load(f) as npz:
        images, labels = npz["images"], npz["labels"]
    train_idx, test_idx = _stratified_split(labels, _MNIST5K_TRAIN_PER_CLASS, _MNIST5K_SPLIT_SEED)
    idx = train_idx if split == "train" else test_idx
    return Dataset(
        images=_preprocess(EMBEDDED, images[idx][..., None]),
        labels=labels[idx].astype(np.int32),
        num_classes=10,
        name=EMBEDDED,
        split=split,
    )


def _stratified_split(labels: np.ndarray, train_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, ``train_per_class`` random indices to train, the rest to test; both shuffled."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        train.append(members[:train_per_class])
        test.append(members[train_per_class:])
    # Shuffle across classes so that an unshuffled pass is not sorted by class.
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _load_tfds(name: str, split: str, data_dir: str | None, num_examples: int | None, seed: int) -> Dataset:
    source = _tfds_source(name, split, data_dir)
    info = source.dataset_info
    image_key, label_key = info.supervised_keys or ("image", "label")
    idx = np.arange(len(source)) if num_examples is None else _subset_indices(len(source), num_examples, seed)
    images, labels = [], []
    for i in idx:
        example = source[int(i)]
        images.append(_crop_if_needed(name, example[image_key]))
        labels.append(example[label_key])
    if len({im.shape for im in images}) > 1:
        raise ValueError(
            f"dataset {name!r} has images of different shapes and no known preprocessing to unify them"
        )
    return Dataset(
        images=_preprocess(name, np.stack(images)),
        labels=np.asarray(labels, dtype=np.int32),
        num_classes=int(info.features[label_key].num_classes),
        name=name,
        split=split,
    )


def _tfds_source(name: str, split: str, data_dir: str | None) -> Any:
    """Opens a prepared array_record TFDS split, failing at once if it is not there."""
    tfds = require("tensorflow_datasets", "data")

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"unknown dataset {name!r}: it is neither the embedded {EMBEDDED!r} nor in the "
            "tensorflow-datasets registry (see tfds.list_builders())"
        ) from None
    except (NotImplementedError, FileNotFoundError) as err:
        # TFDS reports a missing dataset as an unsupported file format; say what is wrong.
        raise _not_prepared_error(tfds, name, data_dir) from err


def _not_prepared_error(tfds: Any, name: str, data_dir: str | None) -> Exception:
    builder = tfds.builder(name, data_dir=data_dir)
    root = builder.data_dir_root
    if builder.is_prepared():
        return ValueError(
            f"dataset {name!r} is prepared at {builder.data_dir} as {builder.info.file_format.value}, "
            "but jaxfi reads only array_record (no TensorFlow). Convert it with "
            f"`tfds convert_format --dataset_version_dir={builder.data_dir} --out_file_format=array_record` "
            f"or rebuild it with `tfds build {name} --data_dir={root} --file_format=array_record`."
        )
    return FileNotFoundError(
        f"dataset {name!r} is not prepared in {builder.data_dir} and jaxfi never downloads. "
        f"Prepare it once on a machine with internet: `tfds build {name} --data_dir={root} "
        "--file_format=array_record` (or in Python: tfds.builder(name, data_dir=..., "
        "file_format='array_record').download_and_prepare()), then copy the data directory here "
        "and pass it as data_dir."
    )


def _crop_if_needed(name: str, image: np.ndarray) -> np.ndarray:
    if _base_name(name) not in _CENTRE_CROPPED:
        return image
    return _resize_centre_crop(np.asarray(image, np.float32), _RESIZE_SHORT, _CROP)


def _preprocess(name: str, images: np.ndarray) -> np.ndarray:
    """Scales 0..255 pixels to [0, 1] and normalises with the dataset's statistics."""
    x = images.astype(np.float32) / np.float32(255.0)
    stats = _NORMALISATION.get(_base_name(name))
    if stats is None:
        return x
    mean, std = (np.asarray(s, np.float32) for s in stats)
    return (x - mean) / std


def _resize_centre_crop(image: np.ndarray, short: int, crop: int) -> np.ndarray:
    """torchvision's Resize(short) + CenterCrop(crop) on an HWC float image."""
    h, w = image.shape[:2]
    # Same size rule as torchvision: the long side is truncated, not rounded.
    if h <= w:
        new_h, new_w = short, int(short * w / h)
    else:
        new_h, new_w = int(short * h / w), short
    top, left = int(round((new_h - crop) / 2)), int(round((new_w - crop) / 2))
    rows = _resize_matrix(h, new_h, top, crop)
    cols = _resize_matrix(w, new_w, left, crop)
    return np.einsum("oh,hwc,pw->opc", rows, image, cols, optimize=True)


def _resize_matrix(in_size: int, out_size: int, start: int, length: int) -> np.ndarray:
    """Rows ``start:start+length`` of the antialiased bilinear resize operator in_size -> out_size."""
    scale = in_size / out_size
    # Widening the triangle kernel by the shrink factor averages every input pixel: antialiasing.
    support = max(scale, 1.0)
    centres = (np.arange(start, start + length) + 0.5) * scale
    pixels = np.arange(in_size) + 0.5
    weights = np.maximum(0.0, 1.0 - np.abs(pixels[None, :] - centres[:, None]) / support)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)
