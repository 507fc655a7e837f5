"""Faults inside scan, fori_loop, while_loop, cond/switch, remat and custom_vjp bodies.

Each faulty trial is checked against a numpy recomputation of the program
with the recorded fault applied by hand at the recorded iteration. The
bodies use only exact or correctly rounded float32 operations (a product by
0.5 or 2, one addition), so the reference is bit for bit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxfi

T, B, D = 4, 2, 3
TRIALS = 24
MANTISSA = jaxfi.BitFlip(bits=tuple(range(23)))


def _flip(value: np.ndarray, flat: int, mask: int) -> np.ndarray:
    """``value`` with raw-bit ``mask`` XORed into element ``flat``."""
    out = np.array(value, np.float32).reshape(-1)
    out.view(np.uint32)[flat] ^= np.uint32(mask)
    return out.reshape(np.shape(value))


def _bits(x) -> np.ndarray:
    return np.asarray(x, np.float32).view(np.uint32)


XS = np.linspace(-1.5, 2.0, T * B * D, dtype=np.float32).reshape(T, B, D)


def scanned(xs):
    def body(c, row):
        h = c * 0.5 + row
        return h, h * 2.0
    return lax.scan(body, jnp.zeros(xs.shape[1:]), xs)


def scanned_by_hand(xs, fault=None):
    """``scanned`` in numpy; ``fault = (iteration, flat element, mask)`` hits ``h``."""
    c, ys = np.zeros(xs.shape[1:], np.float32), []
    for t in range(xs.shape[0]):
        h = c * np.float32(0.5) + xs[t]
        if fault is not None and fault[0] in (t, "every"):
            h = _flip(h, fault[1], fault[2]) if fault[0] == t else _every_row(h, fault[1], fault[2])
        c = h
        ys.append(h * np.float32(2.0))
    return c, np.stack(ys)


def _every_row(h: np.ndarray, unit: int, mask: int) -> np.ndarray:
    return np.stack([_flip(row, unit, mask) for row in h])


@functools.cache
def _compiled(fn, plan, n_args: int):
    g = jaxfi.faulty(fn, plan, params_argnum=None)
    return g, jax.jit(jax.vmap(g, in_axes=(0,) + (None,) * n_args))


def _run(fn, plan, *args, trials: int = TRIALS):
    """``trials`` trials of ``faulty(fn, plan)`` under jit(vmap); outputs and record as numpy."""
    g, batched = _compiled(fn, plan, len(args))
    keys = jax.random.split(jax.random.key(7), trials)
    out, (record,) = batched(keys, *args)
    return jax.device_get(out), jax.device_get(record), g, keys


def _check_record(record, n: int, golden_h: np.ndarray, iterations: bool = True) -> tuple:
    """The one fault of trial ``n``: (iteration, element, mask), checked against its before/after."""
    assert record.valid[n, 0]
    per = golden_h[0].size
    index, mask = int(record.index[n, 0]), int(record.mask[n, 0])
    t, e = divmod(index, per) if iterations else (None, index)
    before = golden_h.reshape(-1)[index] if iterations else golden_h[0].reshape(-1)[e]
    assert int(record.before[n, 0]) == int(_bits(before))
    assert int(record.after[n, 0]) == int(record.before[n, 0]) ^ mask
    return t, e, mask


SCAN_PLAN = jaxfi.Plan(jaxfi.Activations(name=r"scan:0/jaxpr/add"), MANTISSA)


@pytest.fixture(scope="module")
def scan_trials():
    return _run(scanned, SCAN_PLAN, XS)


def test_scan_fault_hits_the_recorded_iteration_only(scan_trials):
    (site,) = jaxfi.sites_of(scanned, SCAN_PLAN, XS, params_argnum=None)
    assert site.shape == (T, B, D) and site.iterations == T and site.trips == (T,)
    (_, golden_ys) = scanned_by_hand(XS)
    out, record, _, _ = scan_trials
    seen = set()
    for n in range(TRIALS):
        t, e, mask = _check_record(record, n, golden_ys / 2)
        want_c, want_ys = scanned_by_hand(XS, (t, e, mask))
        np.testing.assert_array_equal(_bits(out[0][n]), _bits(want_c))
        np.testing.assert_array_equal(_bits(out[1][n]), _bits(want_ys))
        seen.add(t)
        assert jaxfi.loop_iteration(site, record.index[n, 0]) == t
    assert len(seen) > 1


def test_vmap_and_jit_agree_with_single_trials(scan_trials):
    out, record, g, keys = scan_trials
    single = jax.jit(g)
    for n in range(3):
        one_out, (one,) = jax.device_get(single(keys[n], XS))
        for a, b in zip(jax.tree.leaves((one_out, one)), jax.tree.leaves((out, record))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[n])


def test_permanent_fault_hits_every_iteration_and_every_row():
    plan = jaxfi.Plan(jaxfi.Activations(name=r"scan:0/jaxpr/add"), MANTISSA, permanent=True)
    (site,) = jaxfi.sites_of(scanned, plan, XS, params_argnum=None)
    assert site.shape == (D,)
    out, record, _, _ = _run(scanned, plan, XS, trials=8)
    _, golden_ys = scanned_by_hand(XS)
    beyond_first = 0
    for n in range(8):
        _, e, mask = _check_record(record, n, golden_ys / 2, iterations=False)
        want_c, want_ys = scanned_by_hand(XS, ("every", e, mask))
        np.testing.assert_array_equal(_bits(out[1][n]), _bits(want_ys))
        changed = _bits(out[1][n]) != _bits(golden_ys)
        assert changed[0, :, e].all() and not np.delete(changed, e, axis=2).any()
        beyond_first += not np.array_equal(_bits(want_ys), _bits(scanned_by_hand(XS, (0, e, mask))[1]))
    assert beyond_first >= 4


def fori(xs):
    return lax.fori_loop(0, xs.shape[0], lambda i, c: c * 0.5 + xs[i], jnp.zeros(xs.shape[1:]))


def test_fori_loop_is_a_scan_with_iterations():
    plan = jaxfi.Plan(jaxfi.Activations(name="add"), MANTISSA)
    (site,) = jaxfi.sites_of(fori, plan, XS, params_argnum=None)
    assert site.control_flow == "scan" and site.shape == (T, B, D)
    out, record, _, _ = _run(fori, plan, XS, trials=8)
    _, golden_ys = scanned_by_hand(XS)
    for n in range(8):
        t, e, mask = _check_record(record, n, golden_ys / 2)
        np.testing.assert_array_equal(_bits(out[n]), _bits(scanned_by_hand(XS, (t, e, mask))[0]))


def looped(xs):
    """A while loop over the first three rows: its trip count is not static."""
    def body(carry):
        i, c = carry
        return i + 1, c * 0.5 + lax.dynamic_index_in_dim(xs, i, keepdims=False)
    return lax.while_loop(lambda carry: carry[0] < 3, body, (0, jnp.zeros(xs.shape[1:])))[1]


def test_while_loop_draws_among_the_bound_and_faults_past_the_trip_count_do_not_land():
    with pytest.raises(ValueError, match="iterations must be a positive integer"):
        jaxfi.Activations(iterations=0)
    with pytest.raises(TypeError, match="iterations must be a positive integer"):
        jaxfi.ModuleOutput("x", iterations=True)
    with pytest.raises(ValueError, match="iterations=N"):
        jaxfi.faulty(looped, jaxfi.Plan(jaxfi.Activations(name="add")), params_argnum=None)(
            jax.random.key(0), XS)
    plan = jaxfi.Plan(jaxfi.Activations(name="body_jaxpr/add:2", iterations=5), MANTISSA)
    (site,) = jaxfi.sites_of(looped, plan, XS, params_argnum=None)
    assert site.shape == (5, B, D) and site.conditional
    out, record, _, _ = _run(looped, plan, XS, trials=32)
    golden_c, golden_ys = scanned_by_hand(XS[:3])
    landed = record.valid[:, 0]
    assert landed.any() and not landed.all()
    for n in range(32):
        if not landed[n]:
            assert record.site[n, 0] == -1 and int(record.count[n]) == 0
            np.testing.assert_array_equal(_bits(out[n]), _bits(golden_c))
            continue
        t, e, mask = _check_record(record, n, golden_ys / 2)
        assert t < 3
        np.testing.assert_array_equal(_bits(out[n]), _bits(scanned_by_hand(XS[:3], (t, e, mask))[0]))


def branches(x, which):
    return lax.switch(which, [lambda a: a * 0.5 + 1.0, lambda a: a * 2.0 + 1.0, lambda a: a + 3.0], x)


def test_switch_faults_land_in_the_branch_taken_only():
    plan = jaxfi.Plan(jaxfi.Activations(name=r"cond:0/branches\d/add"), MANTISSA)
    sites = jaxfi.sites_of(branches, plan, XS[0], 0, params_argnum=None)
    assert [s.name for s in sites] == [f"cond:0/branches{k}/add:0" for k in range(3)]
    assert all(s.conditional and s.control_flow == "cond" for s in sites)
    for which in (0, 2):
        out, record, _, _ = _run(branches, plan, XS[0], np.int32(which), trials=16)
        golden = np.asarray(branches(XS[0], which))
        landed = record.valid[:, 0]
        assert landed.any() and not landed.all()
        for n in range(16):
            if landed[n]:
                assert record.site[n, 0] == which
                want = _flip(golden, int(record.index[n, 0]), int(record.mask[n, 0]))
            else:
                want = golden
            np.testing.assert_array_equal(_bits(out[n]), _bits(want))


def _affine(a):
    return a * 0.5 + 1.0


@jax.custom_vjp
def _custom(a):
    return a * 0.5 + 1.0


_custom.defvjp(lambda a: (_custom(a), None), lambda _, ct: (ct * 0.5,))


def remat_and_custom(x):
    return jax.checkpoint(_affine)(x), _custom(x)


def test_remat_and_custom_vjp_bodies_are_sites():
    plan = jaxfi.Plan(jaxfi.Activations(name="add"), MANTISSA)
    sites = jaxfi.sites_of(remat_and_custom, plan, XS[0], params_argnum=None)
    assert [s.name for s in sites] == ["add:0", "add:1"]
    assert all(not s.control_flow and s.shape == (B, D) for s in sites)
    out, record, _, _ = _run(remat_and_custom, plan, XS[0], trials=8)
    golden = XS[0] * np.float32(0.5) + np.float32(1.0)
    assert set(record.site[:, 0]) == {0, 1}
    for n in range(8):
        hit = int(record.site[n, 0])
        want = _flip(golden, int(record.index[n, 0]), int(record.mask[n, 0]))
        np.testing.assert_array_equal(_bits(out[hit][n]), _bits(want))
        np.testing.assert_array_equal(_bits(out[1 - hit][n]), _bits(golden))


def nested(xs):
    def outer(c, block):
        def inner(c2, row):
            h = c2 * 0.5 + row
            return h, h
        return lax.scan(inner, c, block)
    return lax.scan(outer, jnp.zeros(xs.shape[2:]), xs)[1]


def test_nested_loops_count_iterations_row_major_and_names_show_them():
    xs = XS.reshape(2, 2, B, D)
    plan = jaxfi.Plan(jaxfi.Activations(name="add"), MANTISSA)
    (site,) = jaxfi.sites_of(nested, plan, xs, params_argnum=None)
    assert site.name == "scan:0/jaxpr/scan:0/jaxpr/add:0" and site.trips == (2, 2)
    assert jaxfi.iteration_name(site, 3) == "scan:0[1]/jaxpr/scan:0[1]/jaxpr/add:0"
    assert jaxfi.iteration_name(site, 2) == "scan:0[1]/jaxpr/scan:0[0]/jaxpr/add:0"
    out, record, _, _ = _run(nested, plan, xs, trials=8)
    _, golden = scanned_by_hand(XS)
    for n in range(8):
        t, e, mask = _check_record(record, n, golden / 2)
        np.testing.assert_array_equal(_bits(out[n]).reshape(T, B, D),
                                      _bits(scanned_by_hand(XS, (t, e, mask))[1] / 2))


def test_sites_table_names_each_iteration():
    table = jaxfi.sites_table(jaxfi.activation_sites(scanned, XS), by_iteration=True)
    rows = table[table["primitive"] == "add"]
    assert list(rows["name"]) == [f"scan:0[{t}]/jaxpr/add:0" for t in range(T)]
    assert set(rows["shape"]) == {(B, D)} and set(rows["values"]) == {B * D}
    whole = jaxfi.sites_table(jaxfi.activation_sites(scanned, XS))
    (row,) = whole[whole["primitive"] == "add"].itertuples()
    assert row.shape == (T, B, D) and row.iterations == T and row.control_flow == "scan"


def layers(params, x):
    """A scanned MLP: one layer per iteration."""
    def layer(h, w):
        h = jnp.tanh(h @ w)
        return h, None
    return lax.scan(layer, x, params["w"])[0] @ params["out"]


@pytest.fixture(scope="module")
def layer_campaign():
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 4, 4)).astype(np.float32) / 2,
              "out": rng.normal(size=(4, 3)).astype(np.float32)}
    x = rng.normal(size=(8, 4)).astype(np.float32)
    labels = np.asarray(layers(params, x)).argmax(-1)
    plan = jaxfi.Plan(jaxfi.Activations(name="tanh"), jaxfi.BitFlip(bits=(30, 29, 22)))
    return jaxfi.Campaign(layers, params, x, labels, plan, seed=3)


def test_executors_agree_on_loop_sites(layer_campaign):
    tables = {name: layer_campaign.run(trials=12, executor=name, chunk_size=5, quiet=True)
              for name in ("loop", "vmap")}
    reference = tables["loop"].table.drop(columns=["program"], errors="ignore")
    for name in ("vmap",):
        other = tables[name].table.drop(columns=["program"], errors="ignore")
        assert other.equals(reference), name
    (site,) = layer_campaign.sites[0]
    faults = tables["loop"].faults()
    iterations = jaxfi.loop_iteration(site, reference["first_index"].to_numpy())
    assert list(iterations) == [i[0] for i in faults["index"]]
    assert set(iterations) <= {0, 1, 2} and len(set(iterations)) > 1
    assert (reference["faults"] == 1).all() and reference["sdc"].any()


def test_grouped_executor_leaves_loop_sites_to_the_others(layer_campaign):
    """Its row programs do not see body values: named, it is refused; auto skips it."""
    with pytest.raises(ValueError, match="scan/while/cond bodies"):
        layer_campaign.run(trials=12, executor="grouped", quiet=True)
    assert not layer_campaign.run(trials=12, executor="auto", quiet=True).executor.startswith("grouped")


def test_flax_nnx_scan_layers_are_loop_sites():
    nnx = pytest.importorskip("flax.nnx")

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(D, D, rngs=rngs)

        def __call__(self, x):
            return jnp.tanh(self.fc(x))

    class Stack(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=T)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return Block(rngs)
            self.layers = make(rngs)

        def __call__(self, x):
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def step(x, block):
                return block(x)
            return step(x, self.layers)

    graphdef, state = nnx.split(jaxfi.named_scopes(Stack(nnx.Rngs(0))))

    def apply(state, x):
        return nnx.merge(graphdef, state)(x)

    plan = jaxfi.Plan(jaxfi.Activations(name="layers/tanh"), jaxfi.BitFlip(bits=(22, 30)))
    (site,) = jaxfi.sites_of(apply, plan, state, XS[0])
    assert site.name == "Stack/scan:0/jaxpr/Stack/layers/tanh:0" and site.shape == (T, B, D)
    out, (record,) = jax.jit(jaxfi.faulty(apply, plan))(jax.random.key(3), state, XS[0])
    t, e = divmod(int(record.index[0]), B * D)
    kernel, bias = np.asarray(state["layers"]["fc"]["kernel"]), np.asarray(state["layers"]["fc"]["bias"])
    h = XS[0]
    for layer in range(T):
        h = np.tanh(h @ kernel[layer] + bias[layer])
        if layer == t:
            # numpy's tanh may differ from XLA's in the last bit: continue
            # from the value the record says the fault wrote.
            before, after = (np.uint32(v).view(np.float32) for v in (record.before[0], record.after[0]))
            np.testing.assert_allclose(h.reshape(-1)[e], before, rtol=1e-6)
            assert int(record.after[0]) == int(record.before[0]) ^ int(record.mask[0])
            h = h.reshape(-1).copy()
            h[e] = after
            h = h.reshape(B, D)
    np.testing.assert_allclose(np.asarray(out), h, rtol=1e-5, atol=1e-6)
