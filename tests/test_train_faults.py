"""Tests for faults during training: site names, a backward fault against the hand-derived
gradient, campaigns against independent runs, the store, outcome classes and the detector."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxfi
from jaxfi.models import transformer as tf


def two_layer(params, x):
    """y = W2 relu(W1 x), each layer in its own scope so that sites are named by layer."""
    with jax.named_scope("layer1"):
        h = jax.nn.relu(x @ params["w1"])
    with jax.named_scope("layer2"):
        return h @ params["w2"]


def sq_loss(params, batch):
    x, y = batch
    return 0.5 * jnp.sum((two_layer(params, x) - y) ** 2)


def mlp_loss(params, batch):
    """A two-layer tanh regression for campaigns."""
    x, y = batch
    with jax.named_scope("hidden"):
        h = jnp.tanh(x @ params["w1"] + params["b1"])
    with jax.named_scope("out"):
        return jnp.mean((h @ params["w2"] - y) ** 2)


def neg_loss_metric(x, y):
    return lambda params: -mlp_loss(params, (x, y))


@pytest.fixture(scope="module")
def toy():
    """Params, 12 batches of 8 and an evaluation set for ``mlp_loss``."""
    k = jax.random.split(jax.random.key(3), 6)
    params = {"w1": jax.random.normal(k[0], (6, 8)) / 2, "b1": jnp.zeros(8),
              "w2": jax.random.normal(k[1], (8, 2)) / 3}
    batches = (jax.random.normal(k[2], (12, 8, 6)), jax.random.normal(k[3], (12, 8, 2)))
    evaluation = (jax.random.normal(k[4], (32, 6)), jax.random.normal(k[5], (32, 2)))
    return params, batches, evaluation


def campaign(toy, *plans, seed=0):
    params, batches, (ex, ey) = toy
    return jaxfi.TrainingCampaign(mlp_loss, params, optax.adam(0.05), batches, *plans,
                                  metric_fn=neg_loss_metric(ex, ey), fault_steps=(3, 10), seed=seed)


# ----------------------------------------------------------------------------- sites


def test_training_site_names_cover_all_kinds():
    params = {"w1": jnp.ones((5, 4)), "w2": jnp.ones((4, 3))}
    batch = (jnp.ones((1, 5)), jnp.ones((1, 3)))
    table = jaxfi.training_sites_table(sq_loss, params, optax.adam(0.1).init(params), batch)
    assert list(table["kind"].unique()) == ["forward", "backward", "weights", "optimizer"]
    names = set(table["name"])
    assert {"forward/layer1/dot_general:0", "forward/layer2/dot_general:0", "weights/w1", "optimizer/count",
            "optimizer/mu/w1", "optimizer/nu/w2"} <= names
    backward = table[table["kind"] == "backward"]
    # The transpose of layer2's matmul gives dh [1, 4] and dW2 (as [3, 4], then a transpose to [4, 3]).
    layer2 = backward[backward["name"].str.startswith("backward/layer2/")]
    assert sorted(zip(layer2["primitive"], map(tuple, layer2["shape"]))) == [
        ("dot_general", (1, 4)), ("dot_general", (3, 4)), ("transpose", (4, 3))]
    assert table["name"].is_unique


def test_backward_fault_changes_exactly_the_hand_derived_gradient():
    # Small integers: every product and sum below is exact in float32, so numpy and XLA agree bitwise.
    x = np.array([[1.0, -2.0, 3.0, 1.0, 2.0]], np.float32)
    w1 = np.array([[1, -1, 2, 1], [0, 1, 1, -1], [1, 2, -1, 1], [2, 0, 1, 1], [-1, 1, 0, 2]], np.float32)
    w2 = np.array([[1, 2, -1], [2, -1, 1], [-1, 1, 2], [1, 1, 1]], np.float32)
    y = np.array([[1.0, -3.0, 2.0]], np.float32)
    params = {"w1": jnp.asarray(w1), "w2": jnp.asarray(w2)}
    z = x @ w1
    assert np.all(z != 0)  # relu'(0) never matters
    h = np.maximum(z, 0)
    dy = h @ w2 - y
    dh = dy @ w2.T  # the cotangent of the hidden activation
    table = jaxfi.training_sites_table(sq_loss, params, (), (x, y))
    (dh_site,) = table[(table["kind"] == "backward") & table["name"].str.startswith("backward/layer2/")
                       & (table["shape"] == (1, 4))]["name"]
    plan = jaxfi.Plan(jaxfi.Activations(name=f"^{dh_site}$"), jaxfi.BitFlip(bits=(20,)))
    g = jax.jit(jaxfi.faulty_value_and_grad(sq_loss, plan))
    (loss, grads), (rec,) = g(jax.random.split(jax.random.key(7), 1), params, (x, y))
    i = int(rec.index[0])
    assert bool(rec.valid[0]) and int(rec.mask[0]) == 1 << 20
    assert int(rec.before[0]) == int(dh[0, i:i + 1].view(np.uint32)[0])
    faulty_dh = dh.copy()
    faulty_dh.view(np.uint32)[0, i] ^= np.uint32(1 << 20)
    assert int(rec.after[0]) == int(faulty_dh[0, i:i + 1].view(np.uint32)[0])
    # Batch 1: each gradient entry is a single product (signed zeros included), as XLA computes it.
    expected_w1 = x.T * np.where(z > 0, faulty_dh, np.float32(0))
    expected_w2 = h.T * dy  # upstream of the fault: unchanged
    np.testing.assert_array_equal(np.asarray(grads["w1"]).view(np.uint32), expected_w1.view(np.uint32))
    np.testing.assert_array_equal(np.asarray(grads["w2"]).view(np.uint32), expected_w2.view(np.uint32))
    assert float(loss) == float(0.5 * np.sum(dy ** 2))
    assert not np.array_equal(expected_w1, x.T * np.where(z > 0, dh, np.float32(0)))  # the fault changed dW1


def test_unknown_training_site_is_an_error(toy):
    with pytest.raises(ValueError, match="matches no"):
        campaign(toy, jaxfi.Plan(jaxfi.Activations(name="^backward/nowhere/")))
    with pytest.raises(ValueError, match="Params .*or Activations"):
        campaign(toy, jaxfi.Plan(jaxfi.Inputs()))
    with pytest.raises(ValueError, match="at least one plan"):
        campaign(toy)


def test_bad_campaign_arguments(toy):
    params, batches, (ex, ey) = toy
    plan = jaxfi.Plan(jaxfi.Params(name="^weights/"))
    with pytest.raises(ValueError, match="fault_steps"):
        jaxfi.TrainingCampaign(mlp_loss, params, optax.sgd(0.1), batches, plan,
                               metric_fn=neg_loss_metric(ex, ey), fault_steps=(5, 13))
    with pytest.raises(ValueError, match="leading step axis"):
        jaxfi.TrainingCampaign(mlp_loss, params, optax.sgd(0.1), (batches[0], batches[1][:5]), plan,
                               metric_fn=neg_loss_metric(ex, ey))
    with pytest.raises(ValueError, match="n_trials"):
        campaign(toy, plan).run(0)


# ----------------------------------------------------------------------------- campaigns


class Reference(NamedTuple):
    """A training run computed by the test's own loop: fault step, curves, final metric and state."""

    fault_step: int
    losses: np.ndarray
    grad_norms: np.ndarray
    metric: np.ndarray
    final: Any
    records: tuple


def reference_step(loss_fn, tx, plans):
    """A jitted ``jaxfi.train_step`` written here, not the campaign's: the plain loss and
    gradients, or ``jaxfi.faulty_value_and_grad`` of the activations ``plans`` (``live`` decides)."""
    hooked = jaxfi.faulty_value_and_grad(loss_fn, *plans) if plans else None

    @jax.jit
    def step(state, batch, keys, live):
        def value_and_grad(params, batch, model_state):
            if hooked is None:
                (loss, grads), records = jax.value_and_grad(loss_fn)(params, batch), ()
            else:
                (loss, grads), records = hooked(keys, params, batch, live=live)
            return (loss, model_state), grads, records

        out = jaxfi.train_step(value_and_grad, tx, *state, (), batch, skip_non_finite=False)
        return (out.params, out.opt_state), out.loss, optax.tree.norm(out.grads), out.records

    return step


def with_recorded_faults(state, names, arrays, prefix):
    """``state`` (params, adam state) with each valid fault that ``arrays`` (a result's
    columns of one trial) record under ``prefix`` (``p0_``) written in; ``names`` are the
    plan's site names. The value a fault names must hold the record's ``before`` bits."""
    params, (adam, *rest) = state
    trees = {"weights": params, "mu": adam.mu, "nu": adam.nu}
    trees = {k: {leaf: np.asarray(v).copy() for leaf, v in t.items()} for k, t in trees.items()}
    valid = arrays[prefix + "valid"]
    for site, index, before, after in zip(*(arrays[prefix + f][valid] for f in ("site", "index", "before", "after"))):
        kind, *path = names[int(site)].split("/")
        flat = trees[path[0] if kind == "optimizer" else kind][path[-1]].reshape(-1).view(np.uint32)
        assert flat[index] == before, names[int(site)]
        flat[index] = after
    adam = adam._replace(mu=trees["mu"], nu=trees["nu"])
    return jax.tree.map(jnp.asarray, (trees["weights"], (adam, *rest)))


def reference_run(c, step, metric_fn, index, arrays=None):
    """Trial ``index`` as a whole training run of the test's own jitted steps from step 0,
    stopped (NaN after) at a non-finite loss, as the campaign documents its curves.

    Weights/optimizer faults are the campaign's records written into the state at
    the fault step; activations faults are drawn by ``faulty_value_and_grad`` from
    the documented keys (trial key ``fold_in(key(seed), index)``, its fault key
    ``fold_in(trial, 1)``, plan ``j``'s key ``fold_in(fault key, j)``).
    ``step`` is ``reference_step`` of the campaign's loss, optimizer and activations plans;
    ``arrays`` are the result's columns of this trial. A negative ``index`` is the
    fault-free run. Returns a ``Reference``.
    """
    act = [j for j, p in enumerate(c.plans) if p.kind == "activations"]
    trial = jax.random.fold_in(jax.random.key(c.seed), max(index, 0))
    s = int(jax.random.randint(jax.random.fold_in(trial, 0), (), *c.fault_steps)) if index >= 0 else -1
    keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(trial, 1), j) for j in act or [0]])
    state, losses, norms = (c.params, c.opt_state), np.full(c.steps, np.nan, np.float32), np.full(c.steps, np.nan)
    records = ()
    for t in range(c.steps):
        for j in (j for j, p in enumerate(c.plans) if p.kind == "params" and t == s):
            state = with_recorded_faults(state, c.sites[j], arrays, f"p{j}_")
        batch = jax.tree.map(lambda b, t=t: b[t], c.batches)
        state, loss, norm, out = step(state, batch, keys, np.bool_(t == s))
        losses[t], norms[t], records = loss, norm, out if t == s else records
        if not np.isfinite(loss):
            break
    return Reference(s, losses, norms, np.float32(metric_fn(state[0])), jax.device_get(state),
                     jax.device_get(records))


def check_against_independent(c, result, indices, loss_fn=mlp_loss, tx=None, metric_fn=None):
    """Trials ``indices`` of ``result`` against the test's own training runs: loss curves bit for
    bit, gradient norms and final metric to float rounding, fault steps, activations faults'
    records, whether the final state is the golden one, and outcome classes; and the loop
    executor gives ``result``'s bits."""
    tx = tx or optax.adam(0.05)
    metric_fn = metric_fn or c.metric_fn
    loop = c.run_trials(list(indices), executor="loop")
    for name, column in jaxfi._src.train_faults._columns(loop).items():
        np.testing.assert_array_equal(column, result.arrays[name][list(indices)], err_msg=name)
    step = reference_step(loss_fn, tx, [p for p in c.plans if p.kind == "activations"])
    golden = reference_run(c, step, metric_fn, -1)
    np.testing.assert_array_equal(golden.losses.view(np.uint32), result.golden.losses.view(np.uint32))
    runs = [reference_run(c, step, metric_fn, i, {k: v[i] for k, v in result.arrays.items()}) for i in indices]
    for i, run in zip(indices, runs):
        assert run.fault_step == result.arrays["fault_step"][i], i
        act = [j for j, p in enumerate(c.plans) if p.kind == "activations"]
        for j, rec in zip(act, run.records):
            for field in jaxfi.Record._fields:
                np.testing.assert_array_equal(getattr(rec, field), result.arrays[f"p{j}_{field}"][i], err_msg=field)
        np.testing.assert_array_equal(run.losses.view(np.uint32), result.losses[i].view(np.uint32), err_msg=str(i))
        np.testing.assert_allclose(run.grad_norms, result.arrays["grad_norms"][i], rtol=1e-6, err_msg=str(i))
        np.testing.assert_allclose(run.metric, result.arrays["metric"][i], rtol=1e-6, err_msg=str(i))
        assert bool(result.arrays["identical"][i]) == jaxfi.executors.same_bits(run.final, golden.final), i
    ref = np.stack([run.losses for run in runs])
    expected = jaxfi.classify_training(ref, golden.losses, np.array([run.metric for run in runs]), golden.metric,
                                       result.arrays["identical"][list(indices)],
                                       result.arrays["fault_step"][list(indices)])
    assert list(result.outcomes()[list(indices)]) == list(expected)


@pytest.fixture(scope="module")
def activation_campaign(toy):
    plans = (jaxfi.Plan(jaxfi.Activations(name="^backward/out/")),
             jaxfi.Plan(jaxfi.Activations(name="^forward/hidden/")))
    c = campaign(toy, *plans)
    return c, c.run(6, chunk_size=6)


def test_vectorized_trials_equal_independent_runs(activation_campaign):
    c, result = activation_campaign
    assert result.losses.shape == (6, 12) and result.losses.dtype == np.float32
    assert np.all((result.arrays["fault_step"] >= 3) & (result.arrays["fault_step"] < 10))
    assert result.arrays["p0_valid"].sum() == 6 and result.arrays["p1_valid"].sum() == 6
    assert all(name.startswith("backward/out/") for name in result.sites[0])
    assert all(name.startswith("forward/hidden/") for name in result.sites[1])
    check_against_independent(c, result, range(6))
    table = result.table()
    assert all(s.startswith("backward/out/") for s in table["site"])
    mask = result.arrays["p0_mask"][:, 0].astype(np.uint64)
    assert list(table["bit"]) == [int(m).bit_length() - 1 for m in mask] and np.all(table["faults"] == 1)
    shares = result.shares(by="site")
    assert shares["count"].sum() == 6 and set(shares["outcome"]) == set(jaxfi.TRAINING_OUTCOMES)
    counts = table.groupby(["site", "outcome"]).size()
    assert shares.set_index(["group", "outcome"])["count"].loc[counts.index].tolist() == counts.tolist()
    # A failed run stops at its first non-finite loss (NaN after it).
    failed = table["outcome"] == "immediate_inf_nan"
    first_bad = np.argmax(~np.isfinite(result.losses), axis=1)
    assert failed.sum() == 1 and np.array_equal(table["stopped"][failed], first_bad[failed])


def test_state_faults_equal_independent_runs(toy):
    # Flipping an exponent's top bit in Adam's moments makes one huge: Adam's normalisation keeps
    # every run finite here, but half of them end worse than golden or deviate on the way.
    c = campaign(toy, jaxfi.Plan(jaxfi.Params(name="^optimizer/(mu|nu)/"), jaxfi.BitFlip(bits=(30,))))
    result = c.run(6, chunk_size=6)
    check_against_independent(c, result, range(6))
    outcomes = result.outcomes()
    assert np.sum(outcomes != "masked") >= 3 and not result.arrays["identical"].any()


def test_scanned_layers_fault_forward_and_backward_like_independent_runs():
    # nn.scan over layers: forward values and their transposes (the backward scan) are loop
    # sites whose leading axis is the layer; trials still equal independent runs bit for bit.
    config = tf.Config(length=3, layers=2, dim=8, heads=2, mlp=16)
    apply_fn = tf.bind(config)
    tokens, targets = tf.sorting_task(6 * 4, config, seed=1)
    batches = (jnp.asarray(tokens.reshape(6, 4, -1)), jnp.asarray(targets.reshape(6, 4, -1)))
    params = tf.init(config, 0)["params"]

    def loss_fn(p, batch):
        return tf.cross_entropy(apply_fn({"params": p}, batch[0]), batch[1])

    table = jaxfi.training_sites_table(loss_fn, params, optax.adam(0.01).init(params), (tokens[:4], targets[:4]))
    scanned = table[table["iterations"] > 0]
    assert set(scanned["kind"]) == {"forward", "backward"} and set(scanned["iterations"]) == {2}
    assert "forward/Transformer/scan:0/jaxpr/layers/fc1/dot_general:0" in set(scanned["name"])
    plan = jaxfi.Plan(jaxfi.Activations(name="^(forward|backward)/Transformer/scan:0/jaxpr/layers/fc1/dot_general:0$"))
    c = jaxfi.TrainingCampaign(loss_fn, params, optax.adam(0.01), batches, plan, fault_steps=(2, 5),
                               metric_fn=lambda p: -loss_fn(p, (tokens, targets)))
    assert [n.split("/")[0] for n in c.sites[0]] == ["forward", "backward"]
    # The loop executor: the same jitted steps as the independent runs, compiled once (the map
    # executor's bits equal the loop's: test_vectorized_trials_equal_independent_runs).
    result = c.run(4, executor="loop")
    assert result.arrays["p0_valid"].sum() == 4 and set(result.arrays["p0_site"][:, 0]) == {0, 1}
    check_against_independent(c, result, range(4), loss_fn, optax.adam(0.01))


def test_campaign_trains_with_the_fault_aware_step(toy):
    # One training loop with faults: a weights-fault trial is the fault-aware step
    # (jaxfi.fault_aware_step, what training.train runs) from the state the fault corrupted.
    params, batches, _ = toy
    c = campaign(toy, jaxfi.Plan(jaxfi.Params(name="^weights/"), jaxfi.BitFlip(bits=(20,))))
    losses, _, final, (rec,) = c.independent(2)
    s = int(c.run_trials([2], executor="loop").fault_step[0])
    tx = optax.adam(0.05)
    step = jaxfi.fault_aware_step(lambda p, b, m: (mlp_loss(p, b), m), tx)
    state, got = jaxfi.init_state(params, tx), []
    for t in range(c.steps):
        if t == s:  # the record's faulty value, written into the weight it names
            leaf = c.sites[0][int(rec.site[0])].removeprefix("weights/")
            value = np.asarray(state.params[leaf]).copy()
            value.reshape(-1).view(np.uint32)[int(rec.index[0])] = rec.after[0]
            state = state._replace(params={**state.params, leaf: jnp.asarray(value)})
        state, info = step(state, (batches[0][t], batches[1][t]), jax.random.key(0))
        got.append(info.loss)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint32), losses.view(np.uint32))
    assert jaxfi._src.trial.same_bits((state.params, state.opt_state), final)
    assert not np.array_equal(losses, c.golden.losses)  # the fault changed the run


def test_store_resumes_and_refuses_another_campaign(toy, activation_campaign, tmp_path):
    c, whole = activation_campaign
    c.run(4, store=tmp_path / "s", chunk_size=6)
    resumed = c.run(6, store=tmp_path / "s", chunk_size=6)  # computes trials 4 and 5 only (a padded chunk)
    for name, column in whole.arrays.items():
        np.testing.assert_array_equal(resumed.arrays[name], column, err_msg=name)
    other = campaign(toy, *c.plans, seed=1)
    with pytest.raises(ValueError, match="different config"):
        other.run(2, store=tmp_path / "s")
    with pytest.raises(ValueError, match="different config"):  # each executor has its own golden run
        c.run(6, store=tmp_path / "s", executor="loop")


# ----------------------------------------------------------------------------- outcomes


def test_outcomes_are_classified_as_defined():
    """Curves as campaigns write them: golden before the fault step, NaN from a non-finite loss on
    (the run stopped), and a NaN final metric after a non-finite update."""
    golden = np.ones(10, np.float32)
    curves = np.ones((8, 10), np.float32)
    curves[1, 6:] = 1.0001  # tiny deviation, metric within tolerance: masked
    curves[2, 6:] = np.nan  # non-finite 2 steps after the fault: immediate
    curves[3, 5:] = 2.0  # deviates and ends worse: slow degrade
    curves[4, 5] = 3.0  # spike, then back, final metric fine: recovered
    curves[5, 6:] = np.nan  # non-finite at the window's last step (fault at 2): immediate
    curves[6, 7:] = np.nan  # non-finite just after the window: slow degrade (the metric is NaN)
    curves[7, 4:] = 1.05  # deviates by less than 10%, metric fine, state not golden: masked
    metric = np.array([0.9, 0.895, np.nan, 0.8, 0.9, np.nan, np.nan, 0.9])
    identical = np.array([True] + [False] * 7)
    fault_step = np.array([4, 4, 4, 4, 4, 2, 2, 4])
    got = jaxfi.classify_training(curves, golden, metric, 0.9, identical, fault_step, jaxfi.TrainingThresholds())
    assert list(got) == ["masked", "masked", "immediate_inf_nan", "slow_degrade", "recovered",
                         "immediate_inf_nan", "slow_degrade", "masked"]
    tight = jaxfi.TrainingThresholds(tolerance=0.001, deviation=0.01)
    assert list(jaxfi.classify_training(curves, golden, metric, 0.9, identical, fault_step, tight)[[1, 7]]) == [
        "slow_degrade", "recovered"]


def test_spike_detector_flags_jumps_and_scores():
    values = np.ones((3, 12))
    values[0, 8] = 11.0  # above 10x the median of the previous 4
    values[1, 8] = 9.0  # below
    values[2, 2] = np.nan  # non-finite: flagged even without history
    flags = jaxfi.spike_flags(values, factor=10.0, window=4)
    assert flags.tolist()[0] == [False] * 8 + [True] + [False] * 3
    assert not flags[1].any()
    assert np.flatnonzero(flags[2]).tolist() == [2]
    scores = jaxfi.detector_scores(flags, np.array([5, 5, 5]), np.array(["slow_degrade", "masked", "recovered"]))
    by = scores.set_index("group")
    assert by.loc["slow_degrade", "detected"] == 1 and by.loc["recovered", "detected"] == 0  # flag before fault
    assert by.loc["recall (all non-masked)", "rate"] == 0.5 and by.loc["false alarms (masked)", "detected"] == 0
    with pytest.raises(ValueError, match="factor"):
        jaxfi.spike_flags(values, factor=1.0)
    with pytest.raises(ValueError, match="window"):
        jaxfi.spike_flags(values, window=0)
