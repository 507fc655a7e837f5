"""Permanent faults: one position of the unit, hit in every input of the batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxfi

BATCH = 6


def model(params, x):
    h = jax.nn.relu(x @ params["w1"])
    return h @ params["w2"]


PARAMS = {"w1": jnp.linspace(-1, 1, 20, dtype=jnp.float32).reshape(5, 4),
          "w2": jnp.linspace(1, -1, 12, dtype=jnp.float32).reshape(4, 3)}
X = jnp.asarray(np.random.default_rng(0).normal(size=(BATCH, 5)), jnp.float32)


def _flip_every_row(values, index, mask):
    """numpy: XOR ``mask`` into position ``index`` of the unit, in every row."""
    raw = np.asarray(values).copy().view(np.uint32)
    raw[(slice(None), *index)] ^= np.uint32(mask)
    return raw.view(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_permanent_activation_fault_hits_every_input(seed):
    site = next(s.name for s in jaxfi.activation_sites(model, PARAMS, X) if s.primitive == "dot_general")
    plan = jaxfi.Plan(jaxfi.Activations(site), permanent=True)
    pop_sites = jaxfi.sites_of(model, plan, PARAMS, X)
    assert [s.shape for s in pop_sites] == [(4,)]  # the unit: no batch axis
    traced = jaxfi.capture(model, site)
    (out, values), (record,) = jax.jit(jaxfi.faulty(traced, plan))(jax.random.key(seed), PARAMS, X)
    golden = jax.jit(traced)(PARAMS, X)[1][site]
    table = jaxfi.record_table(record, pop_sites)
    assert len(table) == 1
    row = table.iloc[0]
    expected = _flip_every_row(golden, row["index"], 1 << row["bit"])
    assert np.array_equal(np.asarray(values[site]).view(np.uint32), expected.view(np.uint32))
    # Every input differs at the unit position (and only there).
    changed = np.asarray(values[site]).view(np.uint32) != np.asarray(golden).view(np.uint32)
    assert changed.sum() == BATCH and changed[:, row["index"][0]].all()
    # The record holds the first input's values.
    assert row["before_bits"] == int(np.asarray(golden).view(np.uint32)[0, row["index"][0]])
    assert row["after_bits"] == int(expected.view(np.uint32)[0, row["index"][0]])
    assert np.array_equal(np.asarray(out), np.asarray(jax.jit(lambda h: jax.nn.relu(h) @ PARAMS["w2"])(expected)))


def test_permanent_input_faults_match_numpy():
    plan = jaxfi.Plan(jaxfi.Inputs(), count=3, permanent=True)
    out, (record,) = jaxfi.faulty(model, plan)(jax.random.key(5), PARAMS, X)
    table = jaxfi.record_table(record, jaxfi.sites_of(model, plan, PARAMS, X))
    assert len(table) == 3 and set(table["site"]) == {"arg1"}
    x = np.asarray(X)
    for r in table.itertuples():
        x = _flip_every_row(x, r.index, 1 << r.bit)
    assert np.array_equal(np.asarray(out), np.asarray(model(PARAMS, jnp.asarray(x))))


def test_random_value_is_one_draw_shared_by_every_input():
    plan = jaxfi.Plan(jaxfi.Inputs(), fault=jaxfi.RandomValue(), count=2, permanent=True)
    g = jaxfi.faulty(lambda p, x: x, plan)
    out, (record,) = jax.jit(g)(jax.random.key(1), PARAMS, X)
    diff = np.asarray(out) != np.asarray(X)
    columns = np.nonzero(diff.any(axis=0))[0]
    assert len(columns) == 2 and diff[:, columns].all()
    assert (np.asarray(out)[:, columns] == np.asarray(out)[:1, columns]).all()


def test_permanent_sampling_is_uniform_over_the_unit():
    plan = jaxfi.Plan(jaxfi.Inputs(), fault=jaxfi.BitFlip(bits=(31,)), permanent=True)
    keys = jax.random.split(jax.random.key(0), 2000)
    _, (record,) = jax.jit(jax.vmap(jaxfi.faulty(model, plan), in_axes=(0, None, None)))(keys, PARAMS, X)
    counts = np.bincount(np.asarray(record.index)[:, 0], minlength=5)
    assert np.asarray(record.valid).all() and counts.min() > 330  # 400 expected per position


def test_permanent_params_plan_is_refused():
    with pytest.raises(ValueError, match="permanent=True is for activations and inputs"):
        jaxfi.Plan(jaxfi.Params(), permanent=True)
    with pytest.raises(TypeError, match="permanent must be a bool"):
        jaxfi.Plan(jaxfi.Inputs(), permanent="yes")


def test_scalar_sites_are_refused():
    plan = jaxfi.Plan(jaxfi.Activations(), permanent=True)
    with pytest.raises(ValueError, match="leading batch axis"):
        jaxfi.faulty(lambda p, x: jnp.sum(x @ p["w1"]), plan)(jax.random.key(0), PARAMS, X)
