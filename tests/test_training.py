"""Tests for jaxfi.training: short training runs, determinism, checkpoints, the train script."""

import functools
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfi import data, models, training

REPO = pathlib.Path(__file__).resolve().parent.parent
SMALL = ("mlp", "lenet5", "resnet8")


@pytest.fixture(scope="module")
def trained(mnist5k, trained_workdir):
    """name -> (model, variables, metrics) after one epoch with the model's default settings
    (mlp and lenet5 are the session's, trained by ``train_or_load`` with those settings)."""
    out = {}
    for name in ("mlp", "lenet5"):
        model, variables, meta = training.train_or_load(name, trained_workdir / "models", epochs=1, log=None)
        out[name] = (model, variables, meta["metrics"])
    model = models.get_model("resnet8")
    settings = {**training.DEFAULTS["resnet8"], "epochs": 1}
    out["resnet8"] = (model, *training.train(model, *mnist5k, log=None, **settings))
    return out


@pytest.mark.parametrize("name", SMALL)
def test_one_epoch_beats_chance_clearly(trained, name):
    _, _, metrics = trained[name]
    assert metrics["final_test_accuracy"] > 0.6, metrics
    assert len(metrics["train_loss"]) == 1 and np.isfinite(metrics["train_loss"][0])


def test_evaluate_agrees_with_training_metrics(trained, mnist5k):
    """The reported test accuracy, ``evaluate`` in padded batches of 300, and a count of
    correct argmaxes of the whole test set in one batch are the same fraction of 1,000."""
    model, variables, metrics = trained["resnet8"]
    test = mnist5k[1]
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, test.images)
    correct = int(np.sum(np.argmax(np.asarray(logits), axis=-1) == test.labels))
    assert metrics["final_test_accuracy"] == correct / len(test.labels)
    apply_fn, params = models.bind_inference(model, variables)
    assert training.evaluate(apply_fn, params, test, batch_size=300) == correct / len(test.labels)


def _short_run(model, train_data, seed, optimizer="adam"):
    variables, _ = training.train(
        model,
        train_data,
        epochs=1,
        batch_size=64,
        learning_rate=1e-2,
        optimizer=optimizer,
        weight_decay=1e-3,
        seed=seed,
        log=None,
    )
    return variables


@pytest.mark.parametrize("name,optimizer", [("mlp", "adam"), ("resnet8", "sgd")])
def test_training_is_bitwise_deterministic_for_a_seed(mnist5k, name, optimizer):
    subset, model = data.eval_subset(mnist5k[0], 256, seed=0), models.get_model(name)
    first, again = (_short_run(model, subset, 0, optimizer) for _ in range(2))
    jax.tree.map(np.testing.assert_array_equal, first, again)
    other = _short_run(model, subset, 1, optimizer)
    assert not np.array_equal(jax.tree.leaves(first)[0], jax.tree.leaves(other)[0])


def test_bad_hyperparameters_are_named(mnist5k):
    with pytest.raises(ValueError, match="optimizer must be one of .*'rmsprop'"):
        training.train(
            models.get_model("mlp"),
            mnist5k[1],
            epochs=1,
            batch_size=8,
            learning_rate=0.1,
            optimizer="rmsprop",
        )


def test_checkpoint_round_trip_gives_bitwise_identical_predictions(trained, mnist5k, tmp_path):
    model, variables, metrics = trained["resnet8"]
    path = tmp_path / "resnet8.msgpack"
    training.save_checkpoint(path, variables, {"model": "resnet8", "metrics": metrics})
    like = jax.eval_shape(lambda: variables)
    restored, meta = training.load_checkpoint(path, "resnet8", like=like)
    assert meta["model"] == "resnet8" and meta["versions"]["jax"] == jax.__version__
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet8.json", "resnet8.msgpack"]
    apply_fn, _ = models.bind_inference(model, variables)
    predict = jax.jit(apply_fn)
    x = mnist5k[1].images[:64]
    np.testing.assert_array_equal(predict(variables, x), predict(restored, x))


def test_checkpoint_from_another_model_is_refused(trained, tmp_path):
    _, variables, _ = trained["resnet8"]
    path = tmp_path / "model.msgpack"
    training.save_checkpoint(path, variables, {"model": "resnet8"})
    with pytest.raises(ValueError, match="holds model 'resnet8', not 'lenet5'"):
        training.load_checkpoint(path, "lenet5")
    lenet_like = jax.eval_shape(lambda: trained["lenet5"][1])
    with pytest.raises(ValueError, match="is for another model: missing .*conv2"):
        training.load_checkpoint(path, like=lenet_like)
    wider = jax.eval_shape(
        functools.partial(models.get_model("resnet8", widths=(16, 32, 128)).init, train=False),
        jax.random.key(0),
        jnp.zeros((1, 28, 28, 1)),
    )
    with pytest.raises(ValueError, match=r"\['layer3_0'\].* has shape/dtype .*the model expects"):
        training.load_checkpoint(path, like=wider)


def test_damaged_or_missing_checkpoints_are_errors(trained, tmp_path):
    path = tmp_path / "mlp.msgpack"
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        training.load_checkpoint(path)
    training.save_checkpoint(path, trained["mlp"][1], {"model": "mlp"})
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    with pytest.raises(ValueError, match="does not match the hash"):
        training.load_checkpoint(path)
    with pytest.raises(ValueError, match="must not end in .json"):
        training.save_checkpoint(tmp_path / "x.json", {}, {})


@pytest.fixture(scope="module")
def workdir(trained_workdir):
    """A workdir holding an mlp trained for one epoch by train_or_load."""
    return trained_workdir / "models"


def test_train_or_load_reuses_an_identical_run(workdir):
    messages = []
    model, variables, meta = training.train_or_load("mlp", workdir, epochs=1, log=messages.append)
    assert messages == [
        f"using existing checkpoint {workdir / 'mlp.msgpack'} "
        f"(test accuracy {meta['metrics']['final_test_accuracy']})"
    ]
    assert isinstance(model, models.MLP) and meta["config"]["epochs"] == 1
    assert meta["config"]["learning_rate"] == training.DEFAULTS["mlp"]["learning_rate"]


def test_train_or_load_refuses_a_different_run_unless_overwrite(workdir, tmp_path):
    for suffix in (".msgpack", ".json"):  # the session's mlp: batch size 64
        shutil.copy(workdir / f"mlp{suffix}", tmp_path)
    with pytest.raises(ValueError, match=r"holds a different run .*'batch_size': \(64, 250\).*overwrite"):
        training.train_or_load("mlp", tmp_path, epochs=1, batch_size=250, log=None)
    _, _, meta = training.train_or_load("mlp", tmp_path, epochs=1, batch_size=250, overwrite=True, log=None)
    assert meta["config"]["batch_size"] == 250


def test_train_or_load_names_bad_models_and_datasets(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'lenet6'"):
        training.train_or_load("lenet6", tmp_path)
    with pytest.raises(ValueError, match="no default training settings for 'vgg16'"):
        training.train_or_load("vgg16", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset 'no_such_dataset'"):
        training.train_or_load("mlp", tmp_path, dataset="no_such_dataset")


def _train_script(*flags):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(
        [sys.executable, str(REPO / "experiments" / "train.py"), *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_train_script_reports_existing_and_refuses_other_flags(workdir):
    same = _train_script("--model=mlp", "--epochs=1", f"--workdir={workdir}")
    assert same.returncode == 0, same.stderr
    assert "using existing checkpoint" in same.stdout and '"test_accuracy"' in same.stdout
    other = _train_script("--model=mlp", "--epochs=2", f"--workdir={workdir}")
    assert other.returncode == 1
    assert "holds a different run" in other.stderr and "--overwrite" in other.stderr
