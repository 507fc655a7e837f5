"""The paper-scale path without ImageNet: synthetic inputs, torchvision-layout weights, microbatched campaigns."""

import functools
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from jaxfi import models, study
from jaxfi._src import identity
from jaxfi.models import convert
from jaxfi.study import subjects as subjects_lib

REPO = pathlib.Path(__file__).resolve().parent.parent
ALEXNET_PARAMS = 61_100_840


def torchvision_alexnet(num_classes=1000, hidden=4096, seed=0):
    """torchvision's alexnet state dict, written out by hand, with He-scaled random weights."""
    rng = np.random.default_rng(seed)
    shapes = {}
    for idx, (o, i, k) in {0: (64, 3, 11), 3: (192, 64, 5), 6: (384, 192, 3), 8: (256, 384, 3),
                           10: (256, 256, 3)}.items():
        shapes[f"features.{idx}.weight"], shapes[f"features.{idx}.bias"] = (o, i, k, k), (o,)
    for idx, (o, i) in {1: (hidden, 256 * 6 * 6), 4: (hidden, hidden), 6: (num_classes, hidden)}.items():
        shapes[f"classifier.{idx}.weight"], shapes[f"classifier.{idx}.bias"] = (o, i), (o,)
    return {key: (rng.standard_normal(shape, dtype=np.float32) *
                  np.float32(np.sqrt(2.0 / np.prod(shape[1:])) if len(shape) > 1 else 0.01))
            for key, shape in shapes.items()}


def random_variables(model, seed=1):
    """Random variables of ``model``'s shapes (from its abstract init: nothing is compiled)."""
    abstract = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                              jnp.zeros((1, 64, 64, 3), jnp.float32))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda leaf: rng.standard_normal(leaf.shape, dtype=np.float32), abstract)


@pytest.mark.parametrize("make", [lambda: models.AlexNet(num_classes=10, hidden=32),
                                  lambda: models.ResNet18(num_classes=10)], ids=["alexnet", "resnet18"])
def test_to_torchvision_is_the_inverse_of_from_torchvision(make):
    model = make()
    variables = random_variables(model)
    state = convert.to_torchvision(model, variables)
    if isinstance(model, models.AlexNet):
        expected = torchvision_alexnet(10, 32)
        assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in expected.items()}
    else:
        assert state["layer2.0.downsample.1.running_var"].shape == (128,)
        assert state["conv1.weight"].shape == (64, 3, 7, 7)
    back = convert.from_torchvision(model, state)
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_to_torchvision_first_dense_uses_torch_flatten_order():
    model = models.AlexNet(num_classes=10, hidden=32)
    variables = random_variables(model, seed=2)
    weight = convert.to_torchvision(model, variables)["classifier.1.weight"]
    features = np.random.default_rng(0).standard_normal((6, 6, 256), dtype=np.float32)
    flax_out = features.reshape(-1) @ np.asarray(variables["params"]["fc1"]["kernel"])
    torch_out = weight @ features.transpose(2, 0, 1).reshape(-1)
    np.testing.assert_allclose(torch_out, flax_out, rtol=1e-4, atol=1e-4)


def test_synthetic_images_are_seeded_imagenet_shaped_and_need_weights(tmp_path):
    a, b = subjects_lib.synthetic_images(3, seed=5), subjects_lib.synthetic_images(3, seed=5)
    assert a.images.shape == (3, 224, 224, 3) and a.images.dtype == np.float32 and a.num_classes == 1000
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, subjects_lib.synthetic_images(3, seed=6).images)
    assert abs(float(a.images.std()) - 1.0) < 0.01
    with pytest.raises(ValueError, match="needs weights"):
        study.load_subjects(["alexnet"], tmp_path, dataset=subjects_lib.SYNTHETIC, eval_size=2)
    with pytest.raises(ValueError, match="positive integer, got 0"):
        subjects_lib.synthetic_images(0)


def test_predict_in_microbatches_equals_one_batch(toy_mlp):
    whole = subjects_lib.predict(toy_mlp.apply_fn, toy_mlp.params, toy_mlp.x)
    np.testing.assert_array_equal(subjects_lib.predict(toy_mlp.apply_fn, toy_mlp.params, toy_mlp.x, 5), whole)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        subjects_lib.predict(toy_mlp.apply_fn, toy_mlp.params, toy_mlp.x, 0)


def test_imagenet_command_runs_alexnet_on_synthetic_data_in_microbatches(tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    state = torchvision_alexnet()
    assert sum(v.size for v in state.values()) == ALEXNET_PARAMS
    np.savez(weights / "alexnet.npz", **state)
    command = [sys.executable, str(REPO / "experiments" / "resilience.py"), f"--workdir={tmp_path}",
               "--dataset=synthetic_imagenet", f"--weights={weights}", "--models=alexnet", "--eval_size=2",
               "--batch_size=1", "--trials=2", "--max_trials=2", "--rates=1e-8", "--executor=loop"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    row = pd.read_csv(tmp_path / "resilience-weights-rate.csv").iloc[0]
    assert (row["model"], row["trials"], row["eval_size"]) == ("alexnet", 2, 2)
    # Labels are the fault-free predictions; every weight bit is in the population.
    assert row["golden_error"] == 0.0 and row["population_bits"] == 32 * ALEXNET_PARAMS
    assert row["faults_mean"] > 0 and row["overflow"] == 0
    meta = json.loads((tmp_path / "resilience-weights-rate.json").read_text())
    assert meta["models"]["alexnet"]["parameters"] == ALEXNET_PARAMS
    manifests = list((tmp_path / "campaigns").rglob("manifest.json"))
    assert len(manifests) == 1 and '"batch_size": 1' in manifests[0].read_text()
    # The campaign's weights, images and labels are this test's own: the state dict converted
    # here, the seed-0 synthetic images, and their classes from one forward pass of both images
    # (the script labelled them one at a time).
    model = models.AlexNet()
    variables = convert.from_torchvision(model, state)
    images = subjects_lib.synthetic_images(2, seed=0).images
    labels = np.argmax(np.asarray(jax.jit(functools.partial(model.apply, train=False))(variables, images)), -1)
    campaign_data = json.loads(manifests[0].read_text())["config"]["data"]
    for name, value in (("params", variables), ("inputs", images), ("labels", labels.astype(np.int32))):
        assert campaign_data[name]["sha256"] == identity.arrays(value)["sha256"], name
