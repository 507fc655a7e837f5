"""Compiled programs persist across processes (``jaxfi.executors.cache_compilation``).

Each run is a fresh process: JAX's cache is set once per process, and this
test's own process must not start writing one.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import jaxfi

CHILD = """
import sys
import jax, jax.numpy as jnp
import jaxfi

jaxfi.executors.cache_compilation(sys.argv[1])

def mlp(params, x):
    return jnp.tanh(x @ params["w1"]) @ params["w2"]

k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
params = {"w1": jax.random.normal(k1, (6, 8)), "w2": jax.random.normal(k2, (8, 3))}
x = jax.random.normal(k3, (4, 6))
campaign = jaxfi.Campaign(mlp, params, x, None, jaxfi.Plan(jaxfi.Params(), jaxfi.BitFlip(), count=1), seed=3)
campaign.run(24, executor="grouped", chunk_size=8, quiet=True).table.to_csv(sys.argv[2], index=False)
"""


def _run(cache: Path, out: Path) -> pd.DataFrame:
    done = subprocess.run([sys.executable, "-c", CHILD, str(cache), str(out)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return pd.read_csv(out)


def test_a_second_process_loads_every_program_and_gets_the_same_table(tmp_path):
    cache = tmp_path / "cache"
    first = _run(cache, tmp_path / "first.csv")
    entries = sorted(p.name for p in cache.iterdir())
    assert entries, "the first process wrote no compiled program"
    second = _run(cache, tmp_path / "second.csv")
    assert sorted(p.name for p in cache.iterdir()) == entries  # nothing compiled again
    pd.testing.assert_frame_equal(first, second)


def test_a_cache_path_that_is_a_file_is_refused(tmp_path):
    taken = tmp_path / "cache"
    taken.write_text("not a directory")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        jaxfi.executors.cache_compilation(taken)
