"""Tests for fault-aware training (jaxfi.fault_aware_step, training.train with plans) and range restriction."""

import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
import pytest

import jaxfi
from jaxfi import data, models, training

REPO = pathlib.Path(__file__).resolve().parent.parent
LR = 0.1


def mlp_loss(params, batch, model_state):
    """A two-layer ReLU regression, named so that activation sites are stable."""
    x, y = batch
    with jax.named_scope("hidden"):
        h = jax.nn.relu(x @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] - y) ** 2), model_state


@pytest.fixture(scope="module")
def setup():
    k = jax.random.split(jax.random.key(0), 4)
    params = {"w1": jax.random.normal(k[0], (8, 16)) / 3, "b1": jnp.zeros(16),
              "w2": jax.random.normal(k[1], (16, 2)) / 4}
    batch = (jax.random.normal(k[2], (32, 8)), jax.random.normal(k[3], (32, 2)))
    return params, batch


def bits(tree):
    return [np.asarray(x).view(np.uint32) for x in jax.tree.leaves(tree)]


def same_bits(a, b):
    return all(np.array_equal(x, y) for x, y in zip(bits(a), bits(b)))


def run(plans, params, batch, steps=3, optimizer=None):
    tx = optimizer or optax.adam(1e-2)
    step = jaxfi.fault_aware_step(mlp_loss, tx, *plans)
    state, infos = jaxfi.init_state(params, tx), []
    for _ in range(steps):
        state, info = step(state, batch, jax.random.key(7))
        infos.append(info)
    return state, infos


def test_faulty_step_jits_with_finite_loss_and_nonzero_gradients(setup):
    params, batch = setup
    plans = (jaxfi.Plan(jaxfi.Params(), count=3), jaxfi.Plan(jaxfi.Activations("hidden"), count=2))
    state, infos = run(plans, params, batch, steps=2, optimizer=optax.sgd(LR))
    assert int(state.step) == 2
    for info in infos:
        assert bool(info.applied) and np.isfinite(float(info.loss))
        assert [int(r.count) for r in info.records] == [3, 2]
    moved = jax.tree.map(lambda a, b: np.asarray(a != b).mean(), state.params, params)
    assert all(m > 0.5 for m in jax.tree.leaves(moved)), moved


def test_each_step_draws_new_faults(setup):
    params, batch = setup
    _, infos = run((jaxfi.Plan(jaxfi.Params(), count=4),), params, batch, steps=2)
    first, second = (np.asarray(i.records[0].index) for i in infos)
    assert not np.array_equal(first, second)


def test_gradient_is_straight_through_except_at_hit_weights(setup):
    params, batch = setup
    plan = jaxfi.Plan(jaxfi.Params("w1"), count=5)
    key = jax.random.key(7)
    state, (info,) = run((plan,), params, batch, steps=1, optimizer=optax.sgd(LR))
    # Step 0 draws from fold_in(key, 0); faulty gives plan 0 fold_in(that, 0).
    faulty_params, record = jaxfi.inject(jax.random.fold_in(jax.random.fold_in(key, 0), 0), params, plan)
    grads = jax.grad(lambda p: mlp_loss(p, batch, ())[0])(faulty_params)
    hit = np.zeros(params["w1"].size, bool)
    hit[np.asarray(record.index)[np.asarray(record.valid)]] = True
    expected = jax.tree.map(lambda p, g: np.asarray(p - LR * g).reshape(-1), params, grads)
    got = jax.tree.map(lambda p: np.asarray(p).reshape(-1), state.params)
    assert hit.sum() == 5 and np.all(got["w1"][hit] == np.asarray(params["w1"]).reshape(-1)[hit])
    np.testing.assert_allclose(got["w1"][~hit], expected["w1"][~hit], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["w2"], expected["w2"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("plan", [
    jaxfi.Plan(jaxfi.Params(), count=0),
    jaxfi.Plan(jaxfi.Params(), ber=0.0),
    jaxfi.Plan(jaxfi.Activations(), ber=0.0),
], ids=["params-count0", "params-ber0", "activations-ber0"])
def test_rate_zero_is_bitwise_the_plain_step(setup, plan):
    params, batch = setup
    plain, _ = run((), params, batch)
    faulty, infos = run((plan,), params, batch)
    assert same_bits(plain, faulty)
    assert all(int(i.records[0].count) == 0 for i in infos)


def test_non_finite_step_is_skipped(setup):
    params, batch = setup
    to_inf = jaxfi.Plan(jaxfi.Params("w2"), fault=jaxfi.StuckAt(1, bits="exponent"), count=1)
    tx = optax.adam(1e-2)
    state, (info,) = run((to_inf,), params, batch, steps=1, optimizer=tx)
    assert not bool(info.applied) and int(state.step) == 1
    assert same_bits(state.params, params) and same_bits(state.opt_state, tx.init(params))


class ConvBN(nn.Module):
    """Tiny, with BatchNorm: a select fused into its step once changed the running means' rounding."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3), strides=2)(x)))
        return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


@pytest.mark.parametrize("model,optimizer", [
    (models.get_model("mlp", hidden=(32,)), "adam"),
    (ConvBN(), "sgd"),
], ids=["mlp", "conv-batchnorm"])
def test_train_without_plans_is_bitwise_a_plain_optax_loop(model, optimizer):
    subset = data.eval_subset(data.load("mnist5k", "train"), 256)
    got, metrics = training.train(model, subset, epochs=1, batch_size=64, learning_rate=1e-2,
                                  optimizer=optimizer, weight_decay=1e-3, log=None)
    variables = models.init_variables(model, subset.images.shape[1:], 0)
    params, state = variables.pop("params"), variables
    tx = training._optimizer(optimizer, 1e-2, 4, 0.9, 1e-3)

    def loss_fn(params, state, x, y):
        logits, new_state = model.apply({"params": params, **state}, x, train=True, mutable=list(state))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_state

    @jax.jit
    def step(params, state, opt_state, x, y):
        (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_state, opt_state, loss

    opt_state, losses = tx.init(params), []
    for x, y in data.batches(subset, 64, seed=(0, 0), drop_remainder=True):
        params, state, opt_state, loss = step(params, state, opt_state, x, y)
        losses.append(loss)
    assert same_bits({"params": params, **state}, got)
    assert metrics["train_loss"] == [float(jnp.mean(jnp.stack(losses)))]
    assert metrics["skipped_steps"] == [0] and metrics["faults_per_step"] == [0.0]


def test_train_with_faults_reports_them():
    """Faults change the trained weights (against the same run without plans), every step reports
    its three faults, and the reported test accuracy is that of the returned weights."""
    subset = data.eval_subset(data.load("mnist5k", "train"), 256)
    model = models.get_model("mlp", hidden=(32,))
    plans = [jaxfi.Plan(jaxfi.Params("kernel"), count=2), jaxfi.Plan(jaxfi.Inputs("arg1/0"), count=1)]
    settings = dict(epochs=1, batch_size=64, learning_rate=1e-3, log=None)
    got, metrics = training.train(model, subset, subset, plans=plans, **settings)
    plain, _ = training.train(model, subset, subset, **settings)
    assert metrics["faults_per_step"] == [3.0]
    assert not same_bits(got, plain)
    predictions = np.argmax(np.asarray(model.apply(got, subset.images, train=False)), axis=-1)
    assert metrics["final_test_accuracy"] == np.mean(predictions == subset.labels)


# ----------------------------------------------------------------------------- range restriction


def relu_scaled(params, x):
    """Output is the ReLU site itself, so restriction is visible in the output."""
    with jax.named_scope("act"):
        return jax.nn.relu(x * params["scale"])


SITE = "act/max:0"


def test_record_bounds_are_min_and_max_over_batches():
    params = {"scale": jnp.float32(2.0)}
    batches = [jnp.linspace(-1, 1, 7), jnp.linspace(0, 3, 5)]
    bounds = jaxfi.record_bounds(relu_scaled, SITE, params, batches)
    assert bounds == {SITE: (0.0, 6.0)}


def test_restrict_clamps_and_leaves_in_range_values_bitwise():
    params = {"scale": jnp.float32(1.0)}
    x = jnp.array([-0.0, 0.0, 1e-30, 0.3, 1.0, 1.5, 1e30, jnp.inf, jnp.nan], jnp.float32)
    out = jax.jit(jaxfi.restrict(relu_scaled, {SITE: (0.0, 1.0)}))(params, x)
    plain = relu_scaled(params, x)
    np.testing.assert_array_equal(bits(out[:5]), bits(plain[:5]))
    np.testing.assert_array_equal(np.asarray(out[5:]), [1.0, 1.0, 1.0, 0.0])


def test_restrict_keeps_site_names_and_composes_with_vmap():
    params = {"scale": jnp.float32(3.0)}
    x = jnp.linspace(-1, 1, 12).reshape(3, 4)
    restricted = jaxfi.restrict(relu_scaled, {SITE: (0.0, 1.5)})

    def names(fn):
        return [s.name for s in jaxfi.activation_sites(fn, params, x)]

    extra = [s for s in jaxfi.activation_sites(restricted, params, x) if s.name not in names(relu_scaled)]
    assert set(names(relu_scaled)) <= set(names(restricted))
    assert extra and all(s.scope.endswith("jaxfi") for s in extra)
    batched = jax.jit(jax.vmap(restricted, in_axes=(None, 0)))(params, x)
    np.testing.assert_array_equal(batched, jnp.clip(relu_scaled(params, x), 0.0, 1.5))


@pytest.mark.parametrize("fault,where", [
    (jaxfi.StuckAt(1, bits="exponent"), "activations"),
    (jaxfi.StuckAt(1, bits=30), "activations"),
    (jaxfi.StuckAt(1, bits="exponent"), "params"),
])
def test_restriction_acts_after_faults(fault, where):
    params = {"scale": jnp.float32(0.5)}
    x = jnp.linspace(0.1, 1.0, 16)
    sites = jaxfi.Activations(SITE) if where == "activations" else jaxfi.Params()
    plan = jaxfi.Plan(sites, fault=fault, count=3 if where == "activations" else 1)
    keys = jax.random.split(jax.random.key(1), 8)
    trial = jax.jit(jax.vmap(jaxfi.faulty(jaxfi.restrict(relu_scaled, {SITE: (0.0, 0.5)}), plan),
                             in_axes=(0, None, None)))
    unprotected = jax.vmap(jaxfi.faulty(relu_scaled, plan), in_axes=(0, None, None))
    out, _ = trial(keys, params, x)
    raw, _ = unprotected(keys, params, x)
    assert not np.all(np.isfinite(raw) & (raw <= 0.5))  # the faults do leave the range
    assert np.all((out >= 0.0) & (out <= 0.5))


def test_restrict_rejects_bad_bounds_and_unknown_sites():
    params = {"scale": jnp.float32(1.0)}
    with pytest.raises(ValueError, match="lo <= hi"):
        jaxfi.restrict(relu_scaled, {SITE: (1.0, 0.0)})
    with pytest.raises(ValueError, match="unknown activation site"):
        jaxfi.restrict(relu_scaled, {"act/max:7": (0.0, 1.0)})(params, jnp.ones(3))


# ----------------------------------------------------------------------------- the experiment


def test_experiment_smoke(tmp_path):
    """The quick experiment: faults land at the stated rates in training and in the sweep (the
    same trials in every variant), they raise the error, and range restriction lowers it."""
    cmd = [sys.executable, str(REPO / "experiments" / "fault_aware.py"), f"--workdir={tmp_path}",
           "--quick", "--model=mlp", "--rates=1e-4", "--trials=2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_csv(tmp_path / "fault_aware.csv").set_index("variant")
    assert len(table) == 4 and table["error"].between(0, 1).all()
    assert (table["lo"] <= table["error"]).all() and (table["error"] <= table["hi"]).all()
    bits = 32 * 235_146  # the MLP's weights
    # Poisson counts, fixed seed: 2 trials at 1e-4 (sd 19 for the mean), a 16-step epoch at 1e-5 (sd 2.2).
    assert table["faults_per_trial"].nunique() == 1 and abs(table["faults_per_trial"].iloc[0] - 1e-4 * bits) < 100
    normal = table.loc["normal"]
    assert normal["golden_error"] < 0.5 and normal["error"] > normal["golden_error"] + 0.3
    assert table.loc["normal + range restriction", "error"] < normal["error"]
    for variant, row in table[table["reference"].notna()].iterrows():
        assert row["diff"] == pytest.approx(row["error"] - table.loc[row["reference"], "error"]), variant
    assert (tmp_path / "fault_aware.png").stat().st_size > 10_000
    meta = json.loads((tmp_path / "fault_aware.json").read_text())
    assert meta["quick"] is True
    steps = meta["results"]["training"]
    assert steps["normal"]["faults_per_step"] == [0.0]
    assert abs(steps["fault-aware"]["faults_per_step"][0] - 1e-5 * bits) < 11
