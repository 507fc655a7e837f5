"""The work a grouped trial needs, and auto skipping the grouped executor when even its best case loses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxfi
from jaxfi._src import interpret
from jaxfi._src.grouped import GroupedExecutor, suffix_work

SIZES = (32, 64, 48, 10)


def mlp(params, x):
    for n in range(len(SIZES) - 1):
        x = jnp.tanh(x @ params[f"w{n}"])
    return x


@pytest.fixture(scope="module")
def setup():
    keys = jax.random.split(jax.random.key(0), len(SIZES))
    params = {f"w{n}": jax.random.normal(keys[n], (SIZES[n], SIZES[n + 1])) / 4 for n in range(len(SIZES) - 1)}
    x = jax.random.normal(keys[-1], (16, SIZES[0]))
    return params, x


def test_suffix_work_is_the_share_of_multiply_adds_after_each_op(setup):
    params, x = setup
    program, _ = interpret.trace(mlp, (params, x))
    macs = [16 * SIZES[n] * SIZES[n + 1] for n in range(len(SIZES) - 1)]
    dots = [n for n, op in enumerate(program.ops) if op.eqn.primitive.name == "dot_general"]
    work = suffix_work(program)
    for k, n in enumerate(dots):
        assert work[n] == pytest.approx(sum(macs[k + 1:]) / sum(macs), abs=1e-12)
    assert work[-1] == 0.0


@pytest.mark.parametrize("how", [{"count": 1}, {"count": 3}, {"ber": 2e-4}])
def test_expected_work_matches_the_sampled_trials(setup, how):
    """The estimate from the populations alone agrees with the mean over 2,000
    drawn trials within 0.03 (work is in [0, 1]: three standard errors at most 0.034)."""
    params, x = setup
    plan = jaxfi.Plan(jaxfi.Params(), jaxfi.BitFlip(), **how)
    trials = jaxfi.Campaign(mlp, params, x, None, plan, seed=1)._trials
    grouped = GroupedExecutor()
    work, programs = grouped.estimate(trials, 128)
    runner = grouped.build(trials, 256, jax.local_devices()[:1])
    indices = np.arange(2000, dtype=np.int32)
    assert work == pytest.approx(float(runner.work(indices).mean()), abs=0.03)
    assert 1 <= programs <= len(SIZES)


def test_auto_does_not_build_a_grouped_executor_that_cannot_win(setup):
    """At a rate that hits the first layer in most trials, eight trials cannot
    repay several programs' compiles: auto picks the loop without compiling them."""
    params, x = setup
    plan = jaxfi.Plan(jaxfi.Params(), jaxfi.BitFlip(), ber=1e-3)
    result = jaxfi.Campaign(mlp, params, x, None, plan, seed=0).run(8, executor="auto", quiet=True)
    table = result.timings.set_index("executor")
    grouped = [name for name in table.index if name.startswith("grouped")]
    assert result.executor == "loop" and len(grouped) == 1
    assert not table.loc[grouped[0], "usable"] and np.isnan(table.loc[grouped[0], "compile_s"])
