"""Shared fixtures: the embedded data, models trained once per session, and a toy MLP."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import pytest


class Toy(NamedTuple):
    """A plain-jax function with its params and inputs."""

    apply_fn: Any
    params: Any
    x: jax.Array


def toy_mlp_apply(params: Any, x: jax.Array) -> jax.Array:
    """A two-layer tanh classifier, ``tanh(x @ w1 + b1) @ w2 + b2``."""
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


@pytest.fixture(scope="session")
def toy_mlp() -> Toy:
    """The toy MLP with 6 inputs, 16 hidden units and 4 classes, on 24 random inputs."""
    k = jax.random.split(jax.random.key(1), 4)
    params = {"w1": jax.random.normal(k[0], (6, 16)), "b1": jax.random.normal(k[1], (16,)),
              "w2": jax.random.normal(k[2], (16, 4)), "b2": jnp.zeros(4)}
    return Toy(toy_mlp_apply, params, jax.random.normal(k[3], (24, 6)))


@pytest.fixture(scope="session")
def mnist5k():
    """The embedded (train, test) splits."""
    from jaxfi import data

    return data.load("mnist5k", "train"), data.load("mnist5k", "test")


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
    """A workdir whose ``models/`` holds mlp and lenet5 trained for one epoch by ``train_or_load``.

    Tests may add files to the workdir but must leave ``models/`` as it is.
    """
    from jaxfi import training

    path = tmp_path_factory.mktemp("trained")
    for name in ("mlp", "lenet5"):
        training.train_or_load(name, path / "models", epochs=1, log=None)
    return path
