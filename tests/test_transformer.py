"""The scanned transformer: task, training, loop sites, and the sequence outcomes."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxfi
from jaxfi.models import transformer as tf

TINY = tf.Config(length=4, layers=3, dim=16, heads=2, mlp=32)


def test_sorting_task_is_the_digits_then_their_sorted_prefix():
    tokens, targets = tf.sorting_task(5, TINY, seed=1)
    assert tokens.shape == (5, TINY.context) and targets.shape == (5, TINY.length)
    digits = tokens[:, :TINY.length]
    np.testing.assert_array_equal(targets, np.sort(digits, axis=1))
    assert (tokens[:, TINY.length] == tf.SEPARATOR).all()
    np.testing.assert_array_equal(tokens[:, TINY.length + 1:], targets[:, :-1])


@pytest.fixture(scope="module")
def trained():
    params, metrics = tf.train(TINY, steps=40, batch_size=64)
    return params, metrics


def test_training_lowers_the_loss(trained):
    _, metrics = trained
    assert metrics["first_loss"] > 2.0  # about log(vocab) or more at initialisation
    assert metrics["loss"] < 0.7 * metrics["first_loss"]
    assert metrics["token_accuracy"] > 0.3


def test_bfloat16_weights_and_activations():
    config = dataclasses.replace(TINY, dtype="bfloat16")
    params = tf.cast(tf.init(config), "bfloat16")
    tokens, _ = tf.sorting_task(4, config)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    sites = jaxfi.activation_sites(tf.bind(config), params, tokens)
    fc1 = [s for s in sites if s.name.endswith("layers/fc1/dot_general:0")]
    assert fc1 and fc1[0].dtype == jnp.bfloat16 and fc1[0].iterations == TINY.layers


def test_sequence_outcomes_on_hand_made_logits():
    targets = np.array([[1, 2], [0, 0]])
    golden = np.zeros((2, 2, 3), np.float32)
    golden[0, 0, 1] = golden[0, 1, 2] = 2.0  # sequence 0 exactly right
    golden[1, 0, 0] = golden[1, 1, 1] = 2.0  # sequence 1 wrong at position 1
    fn = jaxfi.sequence_outcomes(targets)
    same = fn(golden, golden.copy(), None)
    assert same == {"token_sdc": False, "token_sdc_rate": 0.0, "exact_match_lost": False,
                    "exact_match": 0.5, "delta_ce": 0.0}
    faulty = golden.copy()
    faulty[0, 1, 0] = 5.0  # sequence 0, position 1 now says 0 instead of 2
    out = fn(golden, faulty, None)
    assert out["token_sdc"] and out["token_sdc_rate"] == 0.25
    assert out["exact_match_lost"] and out["exact_match"] == 0.0

    def ce(logits):
        logits = logits.astype(np.float64)
        z = np.log(np.exp(logits).sum(-1))
        return np.mean(z - np.take_along_axis(logits, targets[..., None], -1)[..., 0])

    assert out["delta_ce"] == pytest.approx(ce(faulty) - ce(golden), rel=1e-12)
    faulty[1, 1, 2] = np.nan
    out = fn(golden, faulty, None)
    assert out["delta_ce"] == np.inf and out["token_sdc_rate"] == 0.5
    with pytest.raises(ValueError, match="integer tokens"):
        jaxfi.sequence_outcomes(np.zeros((2, 2), np.float32))


@pytest.fixture(scope="module")
def campaign(trained):
    params, _ = trained
    tokens, targets = tf.sorting_task(8, TINY, seed=4)
    plan = jaxfi.Plan(jaxfi.Activations(name=r"scan:0/jaxpr/layers/fc2/add"), jaxfi.BitFlip(bits=(30, 22)))
    campaign = jaxfi.Campaign(tf.bind(TINY), params, tokens, None, plan, seed=0,
                              outcomes=[jaxfi.sequence_outcomes(targets)])
    return campaign, campaign.run(trials=10, executor="loop", chunk_size=10, quiet=True)


def test_scanned_layers_are_loop_sites_and_a_fault_respects_causality(campaign):
    campaign, result = campaign
    (site,) = campaign.sites[0]
    assert site.name == "Transformer/scan:0/jaxpr/layers/fc2/add:0"
    assert site.shape == (TINY.layers, 8, TINY.context, TINY.dim) and site.iterations == TINY.layers
    golden = campaign.golden.output
    checked = 0
    for i in range(4):
        trial = campaign.replay(i)
        after = np.asarray(trial.records[0].after[:1], np.uint32).view(np.float32)
        if not np.isfinite(after).all():
            # An infinite value at a later position reaches earlier ones
            # through masked attention (0 x inf): no causality to check.
            continue
        layer, row, position, _ = np.unravel_index(int(trial.records[0].index[0]), site.shape)
        assert jaxfi.loop_iteration(site, trial.records[0].index[0]) == layer
        changed = (trial.output != golden).any(axis=-1)
        # Output j predicts context position TINY.length - 1 + j.
        first = max(0, position - (TINY.length - 1))
        assert not np.delete(changed, row, axis=0).any() and not changed[row, :first].any()
        checked += 1
    assert checked


def test_campaign_over_scanned_activations_by_layer(campaign):
    campaign, result = campaign
    (site,) = campaign.sites[0]
    table = result.table
    table["layer"] = jaxfi.loop_iteration(site, table["first_index"])
    assert set(table["layer"]) <= set(range(TINY.layers)) and len(set(table["layer"])) > 1
    assert table["token_sdc"].any() and {"delta_ce", "exact_match_lost"} <= set(table.columns)
    by_layer = result.summary(by="layer")
    token_sdc = by_layer[by_layer["outcome"] == "token_sdc"].set_index("layer")
    counts = table.groupby("layer")["token_sdc"].agg(["sum", "count"])
    np.testing.assert_array_equal(token_sdc["k"], counts["sum"])
    np.testing.assert_array_equal(token_sdc["n"], counts["count"])
