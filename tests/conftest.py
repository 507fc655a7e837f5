"""Shared fixtures: the embedded data, models trained once per session, and a toy MLP.

The session keeps one JAX persistent compilation cache, shared with every
process the tests start (through ``JAX_COMPILATION_CACHE_DIR``, which child
processes inherit): a program compiled once, here or in a child, is loaded
from disk wherever it is needed again. A loaded program is the same
executable, so it computes the same bits.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import pytest

CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
MIN_COMPILE_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"


def pytest_configure(config: pytest.Config) -> None:
    """Points this process and its children at one compilation cache for the session.

    A cache named by the environment is used as it is (and kept); otherwise a
    fresh directory is made and removed when the session ends.
    """
    if CACHE_ENV not in os.environ:
        path = tempfile.mkdtemp(prefix="jaxfi-tests-compilation-cache-")
        os.environ[CACHE_ENV] = path
        config.add_cleanup(lambda: shutil.rmtree(path, ignore_errors=True))
    # Every program: most of the tests' programs compile in well under JAX's default 1 s.
    os.environ.setdefault(MIN_COMPILE_ENV, "0")
    jax.config.update("jax_compilation_cache_dir", os.environ[CACHE_ENV])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(os.environ[MIN_COMPILE_ENV]))


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
