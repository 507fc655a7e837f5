"""Tests for jaxfi.data: the embedded mnist5k and the offline TFDS path."""

import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxfi import data


def test_mnist5k_shapes_and_types(mnist5k):
    train, test = mnist5k
    assert train.images.shape == (4000, 28, 28, 1) and test.images.shape == (1000, 28, 28, 1)
    assert train.images.dtype == np.float32 and train.labels.dtype == np.int32
    assert (train.num_classes, train.name, train.split, test.split) == (10, "mnist5k", "train", "test")
    assert data.EMBEDDED_SIZES == {"train": len(train.labels), "test": len(test.labels)}


def test_mnist5k_is_class_balanced_and_normalised(mnist5k):
    train, test = mnist5k
    np.testing.assert_array_equal(np.bincount(train.labels), [400] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels), [100] * 10)
    assert abs(float(train.images.mean())) < 0.05 and abs(float(train.images.std()) - 1) < 0.05
    # Stored class-sorted; an unshuffled pass must not be.
    assert len(set(train.labels[:50].tolist())) == 10


def test_mnist5k_train_and_test_are_disjoint(mnist5k):
    train, test = mnist5k
    seen = {image.tobytes() for image in train.images}
    assert not any(image.tobytes() in seen for image in test.images)


def test_mnist5k_is_deterministic(mnist5k):
    again = data.load("mnist5k", "test")
    np.testing.assert_array_equal(again.images, mnist5k[1].images)
    np.testing.assert_array_equal(again.labels, mnist5k[1].labels)


def test_mnist5k_unknown_split():
    with pytest.raises(ValueError, match="mnist5k has splits 'train' and 'test', got split='validation'"):
        data.load("mnist5k", "validation")


def test_eval_subset_is_a_seeded_deterministic_prefix(mnist5k):
    test = mnist5k[1]
    small, large = data.eval_subset(test, 10, seed=3), data.eval_subset(test, 100, seed=3)
    np.testing.assert_array_equal(small.images, large.images[:10])
    np.testing.assert_array_equal(small.labels, data.eval_subset(test, 10, seed=3).labels)
    assert not np.array_equal(small.images, data.eval_subset(test, 10, seed=4).images)
    np.testing.assert_array_equal(data.load("mnist5k", num_examples=10, seed=3).labels, small.labels)
    with pytest.raises(ValueError, match="n must be in 1..1000"):
        data.eval_subset(test, 1001)


def test_batches_cover_the_data_in_order_or_shuffled(mnist5k):
    test = mnist5k[1]
    in_order = list(data.batches(test, 300))
    assert [len(y) for _, y in in_order] == [300, 300, 300, 100]
    np.testing.assert_array_equal(np.concatenate([y for _, y in in_order]), test.labels)
    shuffled = np.concatenate([y for _, y in data.batches(test, 300, seed=1)])
    assert not np.array_equal(shuffled, test.labels)
    np.testing.assert_array_equal(np.sort(shuffled), np.sort(test.labels))
    np.testing.assert_array_equal(shuffled, np.concatenate([y for _, y in data.batches(test, 300, seed=1)]))
    assert [len(y) for _, y in data.batches(test, 300, seed=1, drop_remainder=True)] == [300] * 3


def test_tfds_mock_mnist_through_data_source(tmp_path):
    with tfds.testing.mock_data(num_examples=12):
        ds = data.load("mnist", "test", data_dir=str(tmp_path))
        subset = data.load("mnist", "test", data_dir=str(tmp_path), num_examples=5, seed=7)
    assert ds.images.shape == (12, 28, 28, 1) and ds.images.dtype == np.float32
    assert ds.labels.dtype == np.int32 and ds.num_classes == 10
    # MNIST normalisation: 0 maps to -mean/std.
    assert float(ds.images.min()) == pytest.approx(-0.1307 / 0.3081, rel=1e-5)
    np.testing.assert_array_equal(subset.images, data.eval_subset(ds, 5, seed=7).images)


def test_tfds_mock_cifar10_and_imagenette_preprocessing(tmp_path):
    with tfds.testing.mock_data(num_examples=3):
        cifar = data.load("cifar10", "train", data_dir=str(tmp_path))
        imagenette = data.load("imagenette", "validation", data_dir=str(tmp_path))
        other = data.load("svhn_cropped", "test", data_dir=str(tmp_path))
    assert cifar.images.shape == (3, 32, 32, 3)
    assert imagenette.images.shape == (3, 224, 224, 3) and imagenette.num_classes == 10
    assert other.images.min() >= 0 and other.images.max() <= 1
    assert data.eval_split("imagenette/320px-v2") == "validation" and data.eval_split("mnist") == "test"


def test_unprepared_dataset_fails_fast_with_instructions(tmp_path):
    start = time.perf_counter()
    with pytest.raises(
        FileNotFoundError, match=r"not prepared.*tfds build mnist --data_dir=.*--file_format=array_record"
    ):
        data.load("mnist", "test", data_dir=str(tmp_path))
    assert time.perf_counter() - start < 10
    assert not any(tmp_path.iterdir()), "nothing may be downloaded or written"


def test_unknown_dataset_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'no_such_dataset'"):
        data.load("no_such_dataset", "test", data_dir=str(tmp_path))


def test_resize_centre_crop_matches_jax_image_resize():
    image = np.random.default_rng(0).uniform(0, 255, (300, 400, 3)).astype(np.float32)
    ours = data._resize_centre_crop(image, 256, 224)
    # 300x400 -> 256x341 (long side truncated), then the centre 224x224.
    reference = np.asarray(jax.image.resize(image, (256, 341, 3), "linear", antialias=True))[16:240, 58:282]
    np.testing.assert_allclose(ours, reference, atol=0.02)
