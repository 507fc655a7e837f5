"""Explicit fault lists: exhaustive, targeted and replayed campaigns."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxfi

RNG = np.random.default_rng(1)
PARAMS = {"w": jnp.asarray(RNG.normal(size=(4, 3)), jnp.float32),
          "b": jnp.asarray(RNG.normal(size=(3,)), jnp.float32)}
X = RNG.normal(size=(6, 4)).astype(np.float32)


def model(params, x):
    return jnp.tanh(x @ params["w"] + params["b"])


def test_replayed_faults_give_the_original_records_and_outputs():
    plans = [jaxfi.Plan(jaxfi.Params(), count=2),
             jaxfi.Plan(jaxfi.Activations(primitive="tanh"), count=2, permanent=True)]
    first = jaxfi.Campaign(model, PARAMS, X, None, plans, seed=4)
    original = first.run(12, executor="loop", quiet=True)
    faults = original.faults()
    keep = [2, 5, 11]
    replay_plans = [jaxfi.Plan(p.sites, permanent=p.permanent,
                               faults=jaxfi.FaultList(faults[(faults.plan == j) & faults.trial.isin(keep)]))
                    for j, p in enumerate(plans)]
    second = jaxfi.Campaign(model, PARAMS, X, None, replay_plans, seed=99)
    replayed = second.run(3, executor="map", quiet=True)
    for a, b in zip(replayed.records, original.records):
        for field in ("site", "index", "mask", "before", "after", "valid"):
            assert np.array_equal(getattr(a, field), getattr(b, field)[keep]), field
    outcomes = [c for c in replayed.table.columns if c != "trial"]
    assert replayed.table[outcomes].equals(original.table.iloc[keep][outcomes].reset_index(drop=True))
    for n, i in enumerate(keep):
        assert np.array_equal(second.replay(n).output, first.replay(i).output)


def test_exhaustive_list_covers_every_value_and_bit_once():
    site = next(s for s in jaxfi.param_sites(PARAMS) if s.name == "b")
    plan = jaxfi.Plan(jaxfi.Params("b"), faults=jaxfi.FaultList.exhaustive(site, bits=[30, 31]))
    result = jaxfi.Campaign(model, PARAMS, X, None, plan).run(6, executor="vmap", quiet=True)
    assert list(zip(result.table["first_index"], result.table["first_bit"])) == [
        (i, b) for i in range(3) for b in (30, 31)]
    before = np.asarray(PARAMS["b"]).view(np.uint32)
    after = np.asarray(result.records[0].after)[:, 0]
    expected = [before[i] ^ np.uint32(1 << b) for i in range(3) for b in (30, 31)]
    assert np.array_equal(after, expected)
    with pytest.raises(ValueError, match="exceeds the 6 trials"):
        jaxfi.Campaign(model, PARAMS, X, None, plan).run(7, quiet=True)
    unlisted = jaxfi.Campaign(model, PARAMS, X, None, jaxfi.Plan(jaxfi.Params(), ber=1e-3))
    with pytest.raises(ValueError, match="trials is required unless a plan has a fault list"):
        unlisted.run(quiet=True)


def test_targeted_list_with_multi_indices_and_several_faults_per_trial():
    rows = [(7, "w", (0, 1), 3), (7, "w", (3, 2), 31), (9, "b", 2, 0)]
    plan = jaxfi.Plan(jaxfi.Params(), faults=jaxfi.FaultList(rows))
    assert plan.count == 2 and len(plan.faults) == 2
    table = jaxfi.Campaign(model, PARAMS, X, None, plan).run(executor="loop", quiet=True).faults()
    assert list(zip(table["trial"], table["site"], table["index"], table["bit"])) == [
        (0, "w", (0, 1), 3), (0, "w", (3, 2), 31), (1, "b", (2,), 0)]


def test_bad_fault_lists_are_refused():
    campaign = lambda rows: jaxfi.Campaign(  # noqa: E731
        model, PARAMS, X, None, jaxfi.Plan(jaxfi.Params(), faults=jaxfi.FaultList(rows)))
    with pytest.raises(ValueError, match=r"site 'ww' is not selected.*\['w'\]"):
        campaign([(0, "ww", 0, 1)])
    with pytest.raises(ValueError, match="out of range"):
        campaign([(0, "w", 12, 1)])
    with pytest.raises(ValueError, match="out of range"):
        campaign([(0, "w", (4, 0), 1)])
    with pytest.raises(ValueError, match="bit 32"):
        campaign([(0, "w", 0, 32)])
    with pytest.raises(ValueError, match="twice"):
        campaign([(0, "w", 0, 1), (0, "w", 0, 1)])
    with pytest.raises(ValueError, match="takes no"):
        jaxfi.Plan(jaxfi.Params(), count=1, faults=jaxfi.FaultList([(0, "w", 0, 1)]))
    with pytest.raises(ValueError, match="trial's index"):
        jaxfi.faulty(model, jaxfi.Plan(jaxfi.Params(), faults=jaxfi.FaultList([(0, "w", 0, 1)])))(
            jax.random.key(0), PARAMS, X)
