"""Microbatched campaigns: each trial's faults on every microbatch, outcomes of the whole batch."""

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import jaxfi

N, FEATURES, CLASSES = 10, 5, 4


def mlp(params, x):
    """Treats inputs independently, with per-row reductions whose rounding does
    not depend on the batch size (XLA:CPU's matmuls may round differently for
    another number of rows), so microbatches give the one-batch bits."""
    h = jnp.tanh(jnp.sum(x[:, :, None] * params["w1"][None], axis=1))
    return jnp.sum(h[:, :, None] * params["w2"][None], axis=1)


def matmul_mlp(params, x):
    return jnp.tanh(x @ params["w1"]) @ params["w2"]


RNG = np.random.default_rng(0)
PARAMS = {"w1": jnp.asarray(RNG.normal(size=(FEATURES, 8)), jnp.float32),
          "w2": jnp.asarray(RNG.normal(size=(8, CLASSES)), jnp.float32)}
X = RNG.normal(size=(N, FEATURES)).astype(np.float32)
Y = np.asarray(jnp.argmax(mlp(PARAMS, X), axis=1)) ^ (np.arange(N) % 3 == 0)
PARAMS_PLAN = jaxfi.Plan(jaxfi.Params(), fault=jaxfi.BitFlip(bits=(30, 29, 28, 22)), count=2)
PERMANENT_PLAN = jaxfi.Plan(jaxfi.Activations(primitive="tanh"), permanent=True)
TRIALS = 24


def _same_table(a: pd.DataFrame, b: pd.DataFrame) -> None:
    for column in a.columns:
        assert np.array_equal(a[column].to_numpy(), b[column].to_numpy()), column


@pytest.fixture(scope="module")
def whole():
    return {plan: jaxfi.Campaign(mlp, PARAMS, X, Y, plan, seed=3).run(TRIALS, executor="loop", quiet=True)
            for plan in (PARAMS_PLAN, PERMANENT_PLAN)}


@pytest.mark.parametrize("plan, executor", [(PARAMS_PLAN, "loop"), (PERMANENT_PLAN, "map")])
def test_microbatches_give_the_one_batch_table(whole, plan, executor):
    campaign = jaxfi.Campaign(mlp, PARAMS, X, Y, plan, seed=3, batch_size=4)
    assert campaign._spans == [(0, 4), (4, 8), (8, 10)]  # the last one is padded
    result = campaign.run(TRIALS, executor=executor, chunk_size=10, quiet=True)
    _same_table(result.table, whole[plan].table)
    assert result.table["sdc"].any() and not result.table["sdc"].all()
    for a, b in zip(result.records, whole[plan].records):
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert campaign.golden.batch == N and np.array_equal(campaign.golden.output, whole[plan].golden.output)


def test_matmul_model_agrees_on_every_event():
    tables = [jaxfi.Campaign(matmul_mlp, PARAMS, X, Y, PARAMS_PLAN, seed=3, batch_size=size)
              .run(12, executor="loop", quiet=True).table for size in (None, 4)]
    events = ["sdc", "sdc5", "due", "masked", "sdc_inputs", "sdc5_inputs", "due_inputs",
              "sdc_correct_inputs", "accuracy", "faults", "first_index", "first_bit"]
    _same_table(tables[0][events], tables[1][events])
    # Matmuls over 4 rows may round differently than over 10: deviations agree closely.
    np.testing.assert_allclose(tables[0]["max_abs_dev"], tables[1]["max_abs_dev"], rtol=1e-5)


def test_grouped_executor_runs_microbatches_with_the_one_batch_events():
    """The grouped executor's programs serve every microbatch (Runner.on): the
    events equal the one-batch grouped run's (their golden runs are per program)."""
    tables = [jaxfi.Campaign(matmul_mlp, PARAMS, X, Y, PARAMS_PLAN, seed=3, batch_size=size)
              .run(12, executor="grouped", quiet=True).table for size in (None, 4)]
    events = ["sdc", "sdc5", "due", "masked", "sdc_inputs", "due_inputs", "accuracy", "faults", "program"]
    _same_table(tables[0][events], tables[1][events])
    assert tables[0]["sdc"].any()


def test_replay_of_a_microbatched_trial_equals_its_row(whole):
    campaign = jaxfi.Campaign(mlp, PARAMS, X, Y, PERMANENT_PLAN, seed=3, batch_size=3)
    trial = campaign.replay(5)
    one = jaxfi.Campaign(mlp, PARAMS, X, Y, PERMANENT_PLAN, seed=3).replay(5)
    assert trial.output.shape == (N, CLASSES)
    assert np.array_equal(trial.output, one.output) and trial.outcomes == one.outcomes
    row = whole[PERMANENT_PLAN].table.iloc[5]
    assert trial.outcomes["sdc_inputs"] == row["sdc_inputs"]


def test_custom_outcomes_see_the_whole_batch():
    def rows(golden, faulty, labels):
        return {"rows": float(faulty.shape[0]), "changed": bool((golden != faulty).any())}

    tables = [jaxfi.Campaign(mlp, PARAMS, X, Y, PARAMS_PLAN, seed=1, outcomes=[rows], batch_size=size)
              .run(8, executor="loop", quiet=True).table for size in (None, 4)]
    _same_table(*tables)
    assert (tables[1]["rows"] == N).all() and (tables[1]["changed"] == ~tables[1]["identical"]).all()


def test_microbatched_store_resumes_to_the_same_table(tmp_path, whole):
    campaign = jaxfi.Campaign(mlp, PARAMS, X, Y, PARAMS_PLAN, seed=3, batch_size=4)
    campaign.run(10, executor="loop", chunk_size=4, store=tmp_path / "s", quiet=True)
    resumed = campaign.run(TRIALS, executor="auto", chunk_size=8, store=tmp_path / "s", quiet=True)
    _same_table(resumed.table, whole[PARAMS_PLAN].table)
    # batch_size is part of the campaign's identity.
    assert campaign.config["batch_size"] == 4
    assert "batch_size" not in jaxfi.Campaign(mlp, PARAMS, X, Y, PARAMS_PLAN, seed=3).config
    with pytest.raises(ValueError, match="batch_size"):
        jaxfi.Campaign(mlp, PARAMS, X, Y, PARAMS_PLAN, seed=3, batch_size=5).run(
            2, store=tmp_path / "s", quiet=True)


def test_auto_runs_microbatches_with_executors_that_can():
    campaign = jaxfi.Campaign(mlp, PARAMS, X, Y, PERMANENT_PLAN, seed=3, batch_size=4)
    result = campaign.run(4, executor=jaxfi.AutoExecutor(probe=2, sample=2), quiet=True)
    assert "grouped" not in result.executor
    with pytest.raises(ValueError, match="cannot run this campaign"):
        campaign.run(4, executor="grouped", quiet=True)


def test_bad_microbatch_arguments_are_refused():
    transient = jaxfi.Plan(jaxfi.Activations(primitive="tanh"))
    with pytest.raises(ValueError, match="transient faults"):
        jaxfi.Campaign(mlp, PARAMS, X, Y, transient, batch_size=4)
    jaxfi.Campaign(mlp, PARAMS, X, Y, transient, batch_size=N)  # one microbatch: allowed
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        jaxfi.Campaign(mlp, PARAMS, X, Y, PARAMS_PLAN, batch_size=0)
    with pytest.raises(ValueError, match="same leading"):
        jaxfi.Campaign(lambda p, xs: mlp(p, xs[0]), PARAMS, (X, X[:3]), None, PARAMS_PLAN, batch_size=4)
