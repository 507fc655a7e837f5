"""Campaigns: outcomes on models with known answers, identity across executors,
statistics, early stopping, the store (resume, refusal, corruption) and replay."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import jaxfi
from jaxfi._src import stats
from jaxfi._src.executors import same_bits
from jaxfi._src.store import CorruptChunkError, Store

BATCH = 8
PACE = "JAXFI_TEST_PACE"  # set in the child of the resume test to slow it down


def sign_model(params, x):
    """Two classes decided by the sign of x * w: class 0 when positive."""
    z = x * params["w"]
    return jnp.stack([z, -z], axis=-1)


def dead_unit_model(params, x):
    """A ReLU unit that is dead for positive x: its outgoing weights are multiplied by 0."""
    h = jax.nn.relu(x[:, None] * jnp.array([1.0, -1.0]))
    return h[:, :1] * params["live"] + h[:, 1:] * params["dead"]


def mlp(params, x):
    """A small classifier used where the answer is not known in closed form."""
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return h @ params["w2"]


def loss_delta(golden, faulty, labels):
    """Cross-entropy of the faulty run minus golden's (a custom outcome)."""
    if os.environ.get(PACE):
        time.sleep(0.02)

    def loss(logits):
        logits = logits.astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            shifted = logits - logits.max(axis=1, keepdims=True)
            lse = np.log(np.exp(shifted).sum(axis=1))
            return float(np.mean(lse - shifted[np.arange(len(labels)), labels]))

    return {"loss_delta": loss(faulty) - loss(golden)}


def big_change(golden, faulty, labels):
    """A custom per-trial event."""
    return {"big_change": bool(np.abs(faulty - golden).max() > 1.0)}


def positive_inputs():
    return jnp.linspace(0.5, 2.0, BATCH, dtype=jnp.float32)


def mlp_campaign(plan=None, outcomes=(loss_delta, big_change)) -> jaxfi.Campaign:
    k = jax.random.split(jax.random.key(3), 4)
    params = {"w1": jax.random.normal(k[0], (6, 12)), "b1": jax.random.normal(k[1], (12,)),
              "w2": jax.random.normal(k[2], (12, 4))}
    x = jax.random.normal(k[3], (32, 6))
    labels = np.array(jnp.argmax(mlp(params, x), axis=1))
    labels[::4] = (labels[::4] + 1) % 4  # golden gets 3/4 right
    plan = plan or jaxfi.Plan(jaxfi.Params(), jaxfi.BitFlip(), ber=3e-4)
    return jaxfi.Campaign(mlp, params, x, labels, [plan], seed=11, outcomes=outcomes)


@pytest.fixture(scope="module")
def campaign():
    return mlp_campaign()


@pytest.fixture(scope="module")
def reference(campaign):
    """The loop executor: each trial is the jitted single trial."""
    return campaign.run(trials=70, executor="loop", chunk_size=64, quiet=True)


def assert_same_result(a: jaxfi.Result, b: jaxfi.Result) -> None:
    pd.testing.assert_frame_equal(a.table, b.table, check_exact=True)
    for col in a.table:
        if a.table[col].to_numpy().dtype.kind in "biuf":
            assert a.table[col].to_numpy().tobytes() == b.table[col].to_numpy().tobytes(), col
    assert same_bits(a.records, b.records)


# --------------------------------------------------------------- known answers


def test_sign_bit_of_the_only_weight_flips_every_prediction():
    c = jaxfi.Campaign(sign_model, {"w": jnp.float32(1.5)}, positive_inputs(),
                       np.zeros(BATCH, np.int32), jaxfi.Plan(jaxfi.Params(), jaxfi.BitFlip(bits="sign")))
    t = c.run(trials=5, executor="vmap", chunk_size=4, quiet=True).table
    assert (t["sdc_inputs"] == BATCH).all() and (t["sdc_correct_inputs"] == BATCH).all()
    assert t["sdc"].all() and not t["masked"].any() and not t["due"].any()
    assert (t["accuracy"] == 0).all()
    assert (t["sdc5_inputs"] == 0).all()  # with two classes the top-1 never leaves the top-5
    assert (t["first_bit"] == 31).all() and (t["bit"] == 31).all() and (t["site"] == "w").all()


def test_fault_in_a_dead_unit_is_masked():
    params = {"live": jnp.float32(2.0), "dead": jnp.float32(3.0)}
    c = jaxfi.Campaign(dead_unit_model, params, positive_inputs(), None,
                       jaxfi.Plan(jaxfi.Params("dead"), jaxfi.BitFlip(bits="mantissa")))
    t = c.run(trials=20, executor="vmap", chunk_size=7, quiet=True).table
    assert t["masked"].all() and t["identical"].all()
    assert (t["max_abs_dev"] == 0).all() and (t["rel_l2"] == 0).all()
    assert (t["first_site"] == "dead").all() and t["first_bit"].between(0, 22).all()


@pytest.mark.parametrize("w,what", [(1.0, "inf"), (1.5, "nan")])
def test_exponent_all_ones_is_a_due_not_a_crash(w, what):
    c = jaxfi.Campaign(sign_model, {"w": jnp.float32(w)}, positive_inputs(),
                       np.zeros(BATCH, np.int32),
                       jaxfi.Plan(jaxfi.Params(), jaxfi.StuckAt(1, bits="exponent")))
    r = c.run(trials=3, executor="loop", quiet=True)
    t = r.table
    assert (t["due_inputs"] == BATCH).all() and t["due"].all()
    assert (t["sdc_inputs"] == 0).all() and not t["masked"].any()
    assert np.isinf(t["max_abs_dev"]).all() and np.isinf(t["rel_l2"]).all()
    assert (t["accuracy"] == 0).all()
    assert r.summary().loc["due", "rate"] == 1.0
    assert r.continuous().loc["rel_l2", "n"] == 0  # non-finite deviations are left out


def test_golden_must_be_finite():
    with pytest.raises(ValueError, match="non-finite"):
        jaxfi.Campaign(sign_model, {"w": jnp.float32(np.inf)}, positive_inputs(), None,
                       jaxfi.Plan(jaxfi.Params()))


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="at least one plan"):
        jaxfi.Campaign(sign_model, {"w": jnp.float32(1)}, positive_inputs())
    c = jaxfi.Campaign(sign_model, {"w": jnp.float32(1)}, positive_inputs(), None,
                       jaxfi.Plan(jaxfi.Params()))
    with pytest.raises(ValueError, match="trials"):
        c.run(trials=-1)
    with pytest.raises(ValueError, match="chunk_size"):
        c.run(trials=3, chunk_size=0)
    with pytest.raises(ValueError, match="labels"):
        jaxfi.Campaign(sign_model, {"w": jnp.float32(1)}, positive_inputs(), np.zeros(3),
                       jaxfi.Plan(jaxfi.Params()))


# ---------------------------------------------------------- bitwise identity


@pytest.mark.parametrize("executor,chunk_size", [
    ("vmap", 1), ("vmap", 7), ("vmap", 64), ("map", 7), (jaxfi.MapExecutor(3), 64)])
def test_reference_executors_give_the_loop_table(campaign, reference, executor, chunk_size):
    r = campaign.run(trials=70, executor=executor, chunk_size=chunk_size, quiet=True)
    assert_same_result(r, reference)


@pytest.fixture(scope="module")
def grouped(campaign):
    return campaign.run(trials=70, executor="grouped", chunk_size=64, quiet=True)


def test_grouped_table_does_not_depend_on_chunk_size(campaign, grouped):
    assert_same_result(campaign.run(trials=70, executor="grouped", chunk_size=7, quiet=True), grouped)


def test_grouped_table_does_not_depend_on_resuming(grouped, tmp_path):
    fresh = mlp_campaign()  # a new campaign: nothing compiled or decided yet
    fresh.run(trials=30, executor="grouped", chunk_size=16, quiet=True, store=tmp_path)
    resumed = fresh.run(trials=70, executor="auto", chunk_size=9, quiet=True, store=tmp_path)
    assert resumed.executor == grouped.executor
    assert_same_result(resumed, grouped)


def test_grouped_draws_the_loop_faults_and_agrees_on_verdicts(reference, grouped):
    """Records are bitwise the loop's; outputs come from other programs, so
    verdicts are compared (every one agrees on this model) and each trial
    names its program."""
    assert same_bits(grouped.records, reference.records)
    for outcome in ("sdc", "sdc5", "due", "masked"):
        assert (grouped.table[outcome] == reference.table[outcome]).all(), outcome
    assert (reference.table["program"] == 0).all()
    assert grouped.table["program"].nunique() >= 3  # w1, b1 and w2 each have a program


def test_trials_without_a_fault_are_identical_to_their_programs_golden(reference, grouped):
    """Masked means bit-identical: a trial whose plan draws nothing equals the golden run of
    the program that computed it, whatever the executor; trials with a fault do not (all 55
    of them with the loop: no flip in this tanh MLP is absorbed by rounding)."""
    for result in (reference, grouped):
        t = result.table
        quiet = t["faults"] == 0
        assert quiet.sum() == 15, result.executor
        assert t.loc[quiet, "identical"].all() and (t.loc[quiet, "max_abs_dev"] == 0).all()
        assert t.loc[quiet, "masked"].all()
        assert (~t.loc[~quiet, "identical"]).mean() > 0.9, result.executor


def test_auto_decides_once_and_a_store_keeps_its_executor(campaign, grouped, tmp_path):
    fresh = mlp_campaign()
    first = fresh.run(trials=70, executor="auto", chunk_size=64, quiet=True, store=tmp_path)
    assert fresh._decided is not None and first.timings is not None
    assert set(first.timings["executor"]) >= {"loop"} and first.timings["chosen"].sum() == 1
    again = fresh.run(trials=80, executor="auto", chunk_size=64, quiet=True, store=tmp_path)
    assert again.executor == first.executor and len(again.table) == 80
    with pytest.raises(ValueError, match="resumed with the executor that computed it"):
        other = "loop" if first.executor != "loop" else "grouped"
        fresh.run(trials=90, executor=other, quiet=True, store=tmp_path)


def test_replay_equals_the_table_row(campaign, reference):
    for i in (0, 17, 69):
        one = campaign.replay(i)
        row = reference.table.iloc[i]
        assert one.index == i
        for name, value in one.outcomes.items():
            assert np.asarray(value).tobytes() == np.asarray(row[name]).astype(
                np.asarray(value).dtype).tobytes(), name
        for rec, stacked in zip(one.records, reference.records):
            assert same_bits(rec, jax.tree.map(lambda a, i=i: a[i], stacked))


def test_table_has_fault_summary_and_raw_records(reference):
    t = reference.table
    assert list(t["trial"]) == list(range(70))
    rec = reference.records[0]
    assert (t["faults"].to_numpy() == rec.valid.sum(axis=1)).all()
    assert set(t["site"]) <= {"w1", "b1", "w2", "mixed", "none"}
    assert (t["faults"] > 1).any() and (t["faults"] == 1).any()
    none = t["faults"] == 0
    assert none.any() and (t.loc[none, "site"] == "none").all() and (t.loc[none, "bit"] == -1).all()
    one = t["faults"] == 1
    assert (t.loc[one, "site"] == t.loc[one, "first_site"]).all()
    assert (t.loc[one, "bit"] == t.loc[one, "first_bit"]).all()
    faults = reference.faults()
    assert len(faults) == t["faults"].sum()
    assert {"loss_delta", "big_change"} <= set(t.columns)


# -------------------------------------------------------------- statistics


def test_summary_intervals_are_wilson_per_trial_and_clustered_per_input(reference):
    s = reference.summary()
    t = reference.table
    k = int(t["sdc"].sum())
    assert s.loc["sdc", "k"] == k and s.loc["sdc", "n"] == 70
    assert (s.loc["sdc", "lo"], s.loc["sdc", "hi"]) == pytest.approx(stats.wilson(k, 70), abs=0)
    k_in = int(t["sdc_inputs"].sum())
    assert s.loc["sdc_inputs", "n"] == 70 * 32
    # Inputs of a trial share its faults: the trial is the cluster, so the
    # interval is cluster_interval's, wider than a binomial one over inputs.
    clustered = stats.cluster_interval(t["sdc_inputs"], np.full(70, 32))
    assert (s.loc["sdc_inputs", "lo"], s.loc["sdc_inputs", "hi"]) == clustered
    assert clustered[1] - clustered[0] > np.subtract(*stats.wilson(k_in, 70 * 32)[::-1])
    correct = reference.golden.n_correct
    assert correct == 24 and s.loc["sdc_correct_inputs", "n"] == 70 * correct
    assert "big_change" in s.index  # a boolean custom outcome is a per-trial rate
    cp = reference.summary(method="clopper_pearson")
    assert (cp.loc["sdc", "lo"], cp.loc["sdc", "hi"]) == stats.clopper_pearson(k, 70)


def test_summary_by_stratum(reference):
    s = reference.summary(by="site")
    sdc = s[s["outcome"] == "sdc"].set_index("site")
    t = reference.table
    for site, group in t.groupby("site"):
        assert sdc.loc[site, "k"] == group["sdc"].sum() and sdc.loc[site, "n"] == len(group)
    assert set(reference.summary(by=["bit"])["bit"]) == set(t["bit"])


def test_early_stopping_stops_before_the_budget_and_is_reproducible(tmp_path):
    c = jaxfi.Campaign(sign_model, {"w": jnp.float32(1.5)}, positive_inputs(),
                       np.zeros(BATCH, np.int32), jaxfi.Plan(jaxfi.Params(), jaxfi.BitFlip(bits="sign")))
    r = c.run(trials=10_000, executor="vmap", chunk_size=16, margin=0.05, quiet=True,
              store=tmp_path / "s")
    assert r.stopped_early and 0 < len(r) < 10_000 and len(r) % 16 == 0
    assert (r.summary()["half_width"] <= 0.05).all()
    again = c.run(trials=10_000, executor="loop", chunk_size=16, margin=0.05, quiet=True,
                  store=tmp_path / "s")
    assert len(again) == len(r) and again.stopped_early
    assert_same_result(again, r)
    assert len(Store(tmp_path / "s", c.config).completed()) == len(r)


# -------------------------------------------------------------------- store


def _chunks(path: Path) -> list[Path]:
    return sorted((path / "chunks").glob("*.npz"))


def _child_resume(store: str) -> None:
    mlp_campaign().run(trials=300, executor="loop", chunk_size=5, store=store, quiet=True)


def test_killed_run_resumes_without_losing_or_repeating_a_trial(tmp_path, campaign):
    store = tmp_path / "store"
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import test_campaign; test_campaign._child_resume({str(store)!r})")
    env = dict(os.environ, **{PACE: "1"})
    child = subprocess.Popen([sys.executable, "-c", code], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (store / "chunks").exists() or not _chunks(store):
        assert child.poll() is None, child.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the child never wrote a chunk"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stderr.close()
    done_before = len(Store(store, campaign.config).completed())
    assert 0 < done_before < 300

    resumed = campaign.run(trials=300, executor="vmap", chunk_size=7, store=store, quiet=True)
    whole = campaign.run(trials=300, executor="vmap", chunk_size=64, quiet=True)
    assert_same_result(resumed, whole)
    completed = Store(store, campaign.config).completed()
    assert list(completed) == list(range(300))  # no duplicate, no gap
    assert_same_result(campaign.load(store), whole)


def test_a_changed_plan_is_refused(tmp_path, campaign):
    campaign.run(trials=5, executor="loop", store=tmp_path / "s", quiet=True)
    other = mlp_campaign(jaxfi.Plan(jaxfi.Params(), jaxfi.BitFlip(bits="sign")))
    with pytest.raises(ValueError, match="plans"):
        other.run(trials=5, store=tmp_path / "s", quiet=True)


def test_a_truncated_chunk_is_reported_by_name(tmp_path, campaign):
    campaign.run(trials=12, executor="loop", chunk_size=4, store=tmp_path / "s", quiet=True)
    victim = _chunks(tmp_path / "s")[1]
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(CorruptChunkError, match=victim.name):
        campaign.run(trials=12, store=tmp_path / "s", quiet=True)


def test_config_names_what_defines_results(campaign):
    config = campaign.config
    assert config["seed"] == 11 and config["function"].endswith("mlp")
    assert config["outcomes"][-2:] == ["loss_delta", "big_change"]
    assert "executor" not in config and "chunk_size" not in config
    assert len(config["data_sha256"]) == 64
    assert "BitFlip(bits='all', n=1)" in config["plans"][0]


# -------------------------------------------------------------- activations


def test_activation_faults_run_through_the_same_campaign(campaign):
    pytest.importorskip("jaxfi._src.activations")
    c = mlp_campaign(jaxfi.Plan(jaxfi.Activations(), jaxfi.BitFlip(bits="exponent")), outcomes=())
    a = c.run(trials=30, executor="vmap", chunk_size=7, quiet=True)
    b = c.run(trials=30, executor="loop", quiet=True)
    assert_same_result(a, b)
    assert (a.table["faults"] == 1).all() and (a.table["site"] != "none").all()
