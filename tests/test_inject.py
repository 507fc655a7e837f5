"""Parameter-pytree injection: records, sampling statistics, purity, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import jaxfi
from jaxfi._src import inject as inject_lib

PARAMS = {
    "dense": {"kernel": jnp.linspace(-1, 1, 600, dtype=jnp.float32).reshape(30, 20),
              "bias": jnp.full((20,), 0.5, jnp.float32)},
    "head": {"kernel": jnp.full((20, 10), 0.25, jnp.bfloat16)},
    "step": jnp.arange(4, dtype=jnp.int32),
}


@functools.partial(jax.jit, static_argnums=2)
def jit_inject(key, params, plan):
    return jaxfi.inject(key, params, plan)


def vmap_inject(keys, params, plan):
    return jax.jit(jax.vmap(jaxfi.inject, in_axes=(0, None, None)), static_argnums=2)(keys, params, plan)


def _raw(x):
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).reshape(-1)


def test_record_names_exactly_the_changed_values():
    plan = jaxfi.Plan(jaxfi.Params(dtype=[jnp.float32, jnp.bfloat16]), count=7)
    faulty, rec = jit_inject(jax.random.key(3), PARAMS, plan)
    sites = jaxfi.population_of(PARAMS, plan).sites
    changed = {}
    for site in sites:
        path = site.name.split("/")
        before = _raw(functools.reduce(lambda t, k: t[k], path, PARAMS))
        after = _raw(functools.reduce(lambda t, k: t[k], path, faulty))
        for i in np.nonzero(before != after)[0]:
            changed[(site.name, int(i))] = (int(before[i]), int(after[i]))
    table = jaxfi.record_table(rec, sites)
    assert len(table) == 7 and int(rec.count) == 7
    assert {(r.site, int(np.ravel_multi_index(r.index, s.shape)))
            for r, s in zip(table.itertuples(), [sites[int(i)] for i in rec.site])} == set(changed)
    for r in table.itertuples():
        site = next(s for s in sites if s.name == r.site)
        before, after = changed[(r.site, int(np.ravel_multi_index(r.index, site.shape)))]
        assert (r.before_bits, r.after_bits) == (before, after)
        assert bin(before ^ after).count("1") >= 1


def test_unselected_leaves_are_returned_untouched_and_unbatched():
    plan = jaxfi.Plan(jaxfi.Params("dense/kernel"), count=1)
    faulty, _ = jaxfi.inject(jax.random.key(0), PARAMS, plan)
    assert faulty["head"]["kernel"] is PARAMS["head"]["kernel"]
    jaxpr = jax.make_jaxpr(jax.vmap(lambda k: jaxfi.inject(k, PARAMS, plan)[0]["dense"]["bias"] * 2))(
        jax.random.split(jax.random.key(0), 4))
    # The bias is not selected: under vmap it stays a plain (unbatched) value.
    assert jaxpr.out_avals[0].shape == (4, 20)
    assert not any(e.primitive.name == "scatter" and e.outvars[0].aval.shape == (4, 20)
                   for e in jaxpr.jaxpr.eqns)


def test_vmap_over_64_keys_equals_loop_bitwise():
    plan = jaxfi.Plan(jaxfi.Params(dtype=[jnp.float32, jnp.bfloat16]), ber=2e-3)
    keys = jax.random.split(jax.random.key(7), 64)
    batched, brec = vmap_inject(keys, PARAMS, plan)
    for i in range(0, 64, 9):
        single, rec = jit_inject(keys[i], PARAMS, plan)
        for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(batched)):
            np.testing.assert_array_equal(_raw(a) if a.dtype != jnp.int32 else a,
                                          _raw(b[i]) if b.dtype != jnp.int32 else b[i])
        for field in jaxfi.Record._fields:
            np.testing.assert_array_equal(getattr(rec, field), getattr(brec, field)[i])
    again, rec2 = jit_inject(keys[5], PARAMS, plan)
    for field in jaxfi.Record._fields:
        np.testing.assert_array_equal(getattr(rec2, field), getattr(brec, field)[5])


def test_bit_positions_uniform_within_set_chi_square():
    plan = jaxfi.Plan(jaxfi.Params("dense/kernel"), jaxfi.BitFlip(bits="exponent"), count=1)
    rec = vmap_inject(jax.random.split(jax.random.key(11), 8000), PARAMS, plan)[1]
    bits = np.log2(np.asarray(rec.mask[:, 0])).astype(int)
    counts = np.bincount(bits, minlength=32)[23:31]
    assert counts.sum() == 8000
    # Fixed seed; the test fails only if uniformity is rejected at the 0.1% level.
    assert stats.chisquare(counts).pvalue > 1e-3


def test_leaf_hit_rates_proportional_to_size_times_width():
    plan = jaxfi.Plan(jaxfi.Params(dtype=[jnp.float32, jnp.bfloat16]), count=1)
    rec = vmap_inject(jax.random.split(jax.random.key(12), 20000), PARAMS, plan)[1]
    sites = jaxfi.population_of(PARAMS, plan).sites
    weights = np.array([s.size * s.dtype.itemsize * 8 for s in sites], float)
    counts = np.bincount(np.asarray(rec.site[:, 0]), minlength=len(sites))
    assert stats.chisquare(counts, weights / weights.sum() * counts.sum()).pvalue > 1e-3


def test_binomial_count_mean_and_variance_for_a_billion_bits():
    big = {"w": jax.ShapeDtypeStruct((31_250_000,), jnp.float32)}
    sites = jaxfi.param_sites(big)
    plan = jaxfi.Plan(jaxfi.Params(), ber=1e-7)
    pop = plan.population(tuple(sites))
    assert pop.total == 10**9
    draw = jax.jit(jax.vmap(lambda k: inject_lib._draw_count(k, pop)[0]))
    counts = np.asarray(draw(jax.random.split(jax.random.key(0), 20000)))
    # Mean 100, variance n p (1-p) ~ 100; standard errors 0.07 and ~1.0.
    assert abs(counts.mean() - 100) < 0.5
    assert abs(counts.var() - 100) < 5


def test_rate_zero_and_tiny_rate():
    """ber=0 never flips a bit. ber=1e-6 over dense's 19,840 bits flips each independently:
    20,000 trials draw Binomial(20,000 x 19,840, 1e-6) faults in all (mean 396.8, sd 19.9),
    few trials draw two (Poisson: about 4), and every drawn flip lands in the values."""
    zero = jaxfi.Plan(jaxfi.Params("dense"), ber=0.0)
    faulty, rec = vmap_inject(jax.random.split(jax.random.key(0), 64), PARAMS, zero)
    assert int(np.asarray(rec.count).max()) == 0
    np.testing.assert_array_equal(faulty["dense"]["kernel"], np.broadcast_to(PARAMS["dense"]["kernel"], (64, 30, 20)))
    tiny = jaxfi.Plan(jaxfi.Params("dense"), ber=1e-6)
    faulty, rec = vmap_inject(jax.random.split(jax.random.key(6), 20000), PARAMS, tiny)
    counts = np.asarray(rec.count)
    assert abs(counts.sum() - 396.8) < 4 * 19.9  # fixed seed; 4 sd
    assert 1 <= (counts >= 2).sum() <= 15
    hit = np.flatnonzero(counts)
    flipped = sum(np.bitwise_count(_raw(faulty["dense"][leaf][hit]).reshape(len(hit), -1)
                                   ^ _raw(PARAMS["dense"][leaf])).sum(axis=1) for leaf in ("kernel", "bias"))
    np.testing.assert_array_equal(flipped, counts[hit])


def test_value_rate_hits_values_and_counts():
    plan = jaxfi.Plan(jaxfi.Params("dense"), jaxfi.Zero(), value_rate=0.1)
    recs = vmap_inject(jax.random.split(jax.random.key(4), 2000), PARAMS, plan)[1]
    counts = np.asarray(recs.count)
    assert abs(counts.mean() - 62.0) < 0.5
    assert (np.asarray(recs.after)[np.asarray(recs.valid)] == 0).all()


def test_overflow_is_recorded_not_hidden():
    plan = jaxfi.Plan(jaxfi.Params("dense"), ber=1e-2, max_faults=3)
    recs = vmap_inject(jax.random.split(jax.random.key(5), 16), PARAMS, plan)[1]
    assert np.asarray(recs.overflow).all()
    assert (np.asarray(recs.count) == 3).all()


def test_without_replacement_small_population_exact_count():
    params = {"w": jnp.ones((1,), jnp.float32)}
    plan = jaxfi.Plan(jaxfi.Params(), count=32)
    faulty, rec = jit_inject(jax.random.key(0), params, plan)
    np.testing.assert_array_equal(_raw(faulty["w"]), ~np.uint32(0x3F800000))
    assert sorted(np.log2(np.asarray(rec.mask)).astype(int)) == list(range(32))


def test_duplicate_values_combine_bits():
    params = {"w": jnp.ones((4,), jnp.float32)}
    plan = jaxfi.Plan(jaxfi.Params(), count=20)
    faulty, rec = jit_inject(jax.random.key(1), params, plan)
    flipped = sum(bin(int(v)).count("1") for v in _raw(faulty["w"]) ^ np.uint32(0x3F800000))
    assert flipped == 20


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="(?s)matches no params site; available:.*dense/kernel"):
        jaxfi.inject(jax.random.key(0), PARAMS, jaxfi.Plan(jaxfi.Params("conv")))
    with pytest.raises(ValueError, match=r"ber must be a probability in \[0, 1\], got 1.5"):
        jaxfi.Plan(jaxfi.Params(), ber=1.5)
    with pytest.raises(ValueError, match="value_rate must be a probability"):
        jaxfi.Plan(jaxfi.Params(), value_rate=-0.1)
    with pytest.raises(ValueError, match="give only one of"):
        jaxfi.Plan(jaxfi.Params(), count=1, ber=0.1)
    with pytest.raises(ValueError, match="ber needs a single-bit fault model"):
        jaxfi.Plan(jaxfi.Params(), jaxfi.Zero(), ber=0.1)
    with pytest.raises(ValueError, match="count=10000 faults per trial exceeds"):
        jaxfi.inject(jax.random.key(0), PARAMS, jaxfi.Plan(jaxfi.Params("bias"), count=10000))
    with pytest.raises(ValueError, match="bit 16 is outside format bfloat16"):
        jaxfi.inject(jax.random.key(0), PARAMS, jaxfi.Plan(jaxfi.Params("head"), jaxfi.BitFlip(bits=16)))
    with pytest.raises(ValueError, match="not a valid regex"):
        jaxfi.Params("(")
    with pytest.raises(TypeError, match="must be a selector"):
        jaxfi.Plan("dense")


def test_selection_by_predicate_and_dtype():
    plan = jaxfi.Plan(jaxfi.Params(where=lambda s: s.size == 20), count=1)
    assert [s.name for s in jaxfi.population_of(PARAMS, plan).sites] == ["dense/bias"]
    plan = jaxfi.Plan(jaxfi.Params(dtype=jnp.int32), count=1)
    assert [s.name for s in jaxfi.population_of(PARAMS, plan).sites] == ["step"]


def test_count_zero_is_the_identity():
    faulty, rec = jit_inject(jax.random.key(0), PARAMS, jaxfi.Plan(jaxfi.Params(), count=0))
    assert rec.valid.shape == (0,)
    for a, b in zip(jax.tree.leaves(faulty), jax.tree.leaves(PARAMS)):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
