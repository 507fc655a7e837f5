"""Faults that make NaNs and infinities get the reference's verdicts from every executor.

Which value a max or a max-pool keeps when one is NaN is a property of the
compiled program (XLA:CPU's max-pool drops a NaN at some window positions),
so only the reference program (the loop) decides such a trial's verdict.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxfi

VERDICTS = ["sdc", "sdc5", "due", "masked"]
CONV = "conv_general_dilated:1"  # followed by bias, ReLU and a 2x2 max-pool
MATMUL = "dot_general:0"  # followed by a max over groups of features
BIT30 = 30  # the top exponent bit of float32: a value in [1, 2) becomes NaN (or inf for 1.0)


def cnn(params, x):
    """Plain jax: two conv, bias, ReLU, max-pool blocks, then a matmul whose
    outputs are reduced by a max over groups of four (maxout logits)."""
    for conv, bias in (("c1", "b1"), ("c2", "b2")):
        x = lax.conv_general_dilated(x, params[conv], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x = jax.nn.relu(x + params[bias])
        x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    h = x.reshape(x.shape[0], -1) @ params["w"]
    return jnp.max(h.reshape(h.shape[0], 10, 4), axis=-1)


@pytest.fixture(scope="module")
def subject():
    k = jax.random.split(jax.random.key(0), 4)
    params = {"c1": jax.random.normal(k[0], (3, 3, 1, 8)) / 2, "b1": jnp.full((8,), 0.1),
              "c2": jax.random.normal(k[1], (3, 3, 8, 16)) / 4, "b2": jnp.full((16,), 0.1),
              "w": jax.random.normal(k[2], (3 * 3 * 16, 40)) / 8}
    x = jax.random.uniform(k[3], (16, 12, 12, 1))
    labels = np.asarray(jnp.argmax(cnn(params, x), -1))
    return params, x, labels


def in_one_to_two(params, x, site: str, n: int) -> list[int]:
    """Flat indices of the first ``n`` golden values of ``site`` in [1, 2), spread over the value."""
    _, values = jaxfi.capture(cnn, site)(params, x)
    flat = np.asarray(values[site]).ravel()
    hits = np.flatnonzero((flat >= 1) & (flat < 2))
    assert len(hits) >= n, f"{site} has only {len(hits)} values in [1, 2)"
    return [int(i) for i in hits[np.linspace(0, len(hits) - 1, n).astype(int)]]


def verdicts(campaign: jaxfi.Campaign, trials: int, executor: str) -> np.ndarray:
    return campaign.run(trials, executor=executor, chunk_size=8, quiet=True).table[VERDICTS].to_numpy()


@pytest.mark.parametrize("site", [CONV, MATMUL])
@pytest.mark.parametrize("executor", ["map", "vmap"])
def test_listed_top_exponent_flips_get_the_loop_verdicts(subject, site, executor):
    """vmap's batched max over features drops a NaN the unbatched program
    keeps: batched executors recompute such trials with the reference."""
    params, x, labels = subject
    rows = [(t, site, i, BIT30) for t, i in enumerate(in_one_to_two(params, x, site, 16))]
    plan = jaxfi.Plan(jaxfi.Activations(name=f"^{site}$"), jaxfi.BitFlip(), faults=jaxfi.FaultList(rows))
    campaign = jaxfi.Campaign(cnn, params, x, labels, plan)
    loop = campaign.run(len(rows), executor="loop", quiet=True)
    after = np.asarray(loop.records[0].after)[:, 0].view(np.float32)
    assert not np.isfinite(after).any()  # every fault made a NaN or an infinity
    if site == CONV:
        # The reference's max-pool dropped some of those NaNs: masked, not DUE.
        assert loop.table["masked"].any()
    assert np.array_equal(verdicts(campaign, len(rows), executor), loop.table[VERDICTS].to_numpy())


@pytest.mark.parametrize("site", [CONV, MATMUL])
def test_grouped_gives_the_loop_verdicts_when_a_fault_makes_a_nan(subject, site):
    """The grouped executor draws its own faults (no fault lists): a fault that
    sets every exponent bit makes a value NaN or infinite, as the flips above do."""
    params, x, labels = subject
    plan = jaxfi.Plan(jaxfi.Activations(name=f"^{site}$"), jaxfi.StuckAt(1, bits="exponent"), count=1)
    campaign = jaxfi.Campaign(cnn, params, x, labels, plan, seed=1)
    loop = campaign.run(24, executor="loop", quiet=True)
    grouped = campaign.run(24, executor="grouped", quiet=True)
    assert np.array_equal(grouped.table[VERDICTS].to_numpy(), loop.table[VERDICTS].to_numpy())
    if site == CONV:
        assert loop.table["masked"].sum() >= 12  # NaNs the reference's max-pool dropped
    # Those trials were computed by the reference program, and say so.
    assert np.array_equal(grouped.table["program"], loop.table["program"])
    for executor in ("map", "vmap"):
        if (site, executor) != (MATMUL, "vmap"):
            assert np.array_equal(verdicts(campaign, 24, executor), loop.table[VERDICTS].to_numpy()), executor


def test_grouped_keeps_its_own_programs_for_finite_faults(subject):
    """Sign flips never make a value non-finite: no trial leaves the fast path."""
    params, x, labels = subject
    plan = jaxfi.Plan(jaxfi.Activations(), jaxfi.BitFlip(bits=(31,)), count=1)
    campaign = jaxfi.Campaign(cnn, params, x, labels, plan, seed=2)
    loop = campaign.run(24, executor="loop", quiet=True)
    grouped = campaign.run(24, executor="grouped", quiet=True)
    assert not np.isin(grouped.table["program"], loop.table["program"]).any()
    assert np.array_equal(grouped.table[VERDICTS].to_numpy(), loop.table[VERDICTS].to_numpy())
