"""Activation sites, faults in intermediate values, capture, NNX scopes."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxfi
from jaxfi._src.activations import run_with_faults

BATCH = 4


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), name="conv1")(x))
        x = nn.relu(nn.Conv(4, (3, 3), name="conv2")(x))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(10, name="fc")(x)


class NnxCNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.layers = nnx.List([nnx.Linear(256, 16, rngs=rngs), nnx.Linear(16, 10, rngs=rngs)])

    def __call__(self, x):
        x = nnx.relu(self.conv1(x)).reshape(x.shape[0], -1)
        return self.layers[1](nnx.relu(self.layers[0](x)))


def mlp(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


@dataclasses.dataclass(frozen=True)
class Model:
    fn: object
    params: object
    x: jax.Array
    site: str       # a site to fault
    upstream: str   # a site computed before it
    downstream: str  # a site computed after it


def _normal(seed: int, shape) -> jax.Array:
    # numpy draws: eager jax ops would each compile on first use.
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@functools.cache
def _linen():
    x = _normal(1, (BATCH, 8, 8, 1))
    model = CNN()
    params = jax.jit(model.init)(jax.random.key(0), x)
    return Model(model.apply, params, x, "CNN/conv2/add:0",
                 "CNN/conv1/conv_general_dilated:0", "CNN/fc/add:0")


@functools.cache
def _plain_nnx() -> NnxCNN:
    # Built under jit: eager initialisation would compile every op on its own.
    return nnx.jit(lambda: NnxCNN(nnx.Rngs(0)))()


@functools.cache
def _nnx_parts():
    return nnx.split(jaxfi.named_scopes(nnx.clone(_plain_nnx())))


@functools.cache
def _nnx():
    graphdef, state = _nnx_parts()

    def apply(state, x):
        return nnx.merge(graphdef, state)(x)

    x = _normal(2, (BATCH, 8, 8, 1))
    return Model(apply, state, x, "NnxCNN/layers/0/add:0",
                 "NnxCNN/conv1/conv_general_dilated:0", "NnxCNN/layers/1/add:0")


@functools.cache
def _mlp():
    params = {"w1": _normal(3, (16, 32)), "b1": jnp.zeros(32),
              "w2": _normal(4, (32, 10)), "b2": jnp.zeros(10)}
    x = _normal(5, (BATCH, 16))
    return Model(mlp, params, x, "tanh:0", "dot_general:0", "dot_general:1")


@pytest.fixture(scope="module", params=["linen", "nnx", "mlp"])
def model(request) -> Model:
    return {"linen": _linen, "nnx": _nnx, "mlp": _mlp}[request.param]()


@pytest.fixture(scope="module")
def linen() -> Model:
    return _linen()


@pytest.fixture(scope="module")
def faulty_capture(model):
    """jit(faulty(capture(fn, three sites), 3 bit flips on model.site))."""
    names = [model.upstream, model.site, model.downstream]
    plan = jaxfi.Plan(jaxfi.Activations(name=f"^{model.site}$"), count=3)
    g = jax.jit(jaxfi.faulty(jaxfi.capture(model.fn, names), plan))
    clean = jax.jit(jaxfi.capture(model.fn, names))(model.params, model.x)
    return g, clean


def _raw(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view(np.dtype(f"uint{x.dtype.itemsize * 8}"))


def _shapes(sites) -> dict:
    return {s.name: s.shape for s in sites}


def test_linen_sites(linen):
    sites = _shapes(jaxfi.activation_sites(linen.fn, linen.params, linen.x))
    assert sites["CNN/conv1/conv_general_dilated:0"] == (BATCH, 8, 8, 4)
    assert sites["CNN/conv2/add:0"] == (BATCH, 8, 8, 4)
    assert sites["CNN/fc/dot_general:0"] == (BATCH, 10)
    assert sites["CNN/reshape:0"] == (BATCH, 256)


def test_nnx_sites_have_module_paths():
    m = _nnx()
    sites = _shapes(jaxfi.activation_sites(m.fn, m.params, m.x))
    assert sites["NnxCNN/conv1/conv_general_dilated:0"] == (BATCH, 8, 8, 4)
    assert sites["NnxCNN/layers/0/dot_general:0"] == (BATCH, 16)
    assert sites["NnxCNN/layers/1/add:0"] == (BATCH, 10)
    # The model object itself (not only split/merge) gets the same names.
    model = nnx.merge(*_nnx_parts())
    assert _shapes(jaxfi.activation_sites(lambda x: model(x), m.x)) == sites


def test_nnx_without_helper_has_primitive_names_only():
    model = _plain_nnx()
    names = [s.name for s in jaxfi.activation_sites(lambda x: model(x), jnp.ones((1, 8, 8, 1)))]
    assert "conv_general_dilated:0" in names and "dot_general:1" in names


def test_mlp_sites_and_table():
    m = _mlp()
    sites = jaxfi.activation_sites(m.fn, m.params, m.x)
    assert [s.name for s in sites] == ["dot_general:0", "broadcast_in_dim:0", "add:0", "tanh:0",
                                      "dot_general:1", "broadcast_in_dim:1", "add:1"]
    table = jaxfi.sites_table(sites)
    assert list(table.columns[:6]) == ["name", "primitive", "shape", "dtype", "values", "bits"]
    row = table.set_index("name").loc["tanh:0"]
    assert row["shape"] == (BATCH, 32) and row["values"] == BATCH * 32 and row["bits"] == BATCH * 32 * 32


def test_named_scope_in_plain_jax():
    def f(x):
        with jax.named_scope("block"):
            return jnp.sin(x) * 2
    assert [s.name for s in jaxfi.activation_sites(f, jnp.ones(3))] == ["block/sin:0", "block/mul:0"]


@jax.custom_vjp
def _clip_grad(x):
    return jnp.sin(x)


_clip_grad.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (jnp.clip(g * jnp.cos(x), -1, 1),))


def _nested(x):
    y = jax.jit(lambda v: jnp.exp(v) + 1)(x)
    y = jax.checkpoint(lambda v: jnp.tanh(v) * 3)(y)
    return jnp.sum(_clip_grad(y) ** 2)


def test_sites_inside_calls_can_be_faulted():
    """Sites inside jit, checkpoint and custom_vjp calls; grad still runs."""
    x = _normal(6, (8,))
    names = [s.name for s in jaxfi.activation_sites(_nested, x)]
    assert names[:5] == ["exp:0", "add:0", "tanh:0", "mul:0", "sin:0"]
    reference = jax.jit(_nested)(x)
    for name in ("exp:0", "tanh:0", "sin:0"):
        plan = jaxfi.Plan(jaxfi.Activations(name=f"^{name}$"), jaxfi.BitFlip(bits="exponent"))
        g = jax.jit(jaxfi.faulty(_nested, plan))
        out, (record,) = g(jax.random.key(0), x)
        assert int(record.count) == 1 and not np.array_equal(_raw(out), _raw(reference))
        grads = jax.jit(jax.grad(lambda v, g=g: g(jax.random.key(0), v)[0]))(x)
        assert grads.shape == x.shape


def test_module_output_selects_value_leaving_the_module(linen):
    sites = jaxfi.sites_of(linen.fn, jaxfi.Plan(jaxfi.ModuleOutput("CNN/conv1")), linen.params, linen.x)
    assert [s.name for s in sites] == ["CNN/conv1/add:0"]
    both = jaxfi.sites_of(linen.fn, jaxfi.Plan(jaxfi.ModuleOutput(r"CNN/conv\d")), linen.params, linen.x)
    assert [s.name for s in both] == ["CNN/conv1/add:0", "CNN/conv2/add:0"]
    whole = jaxfi.sites_of(linen.fn, jaxfi.Plan(jaxfi.ModuleOutput("CNN")), linen.params, linen.x)
    assert [s.name for s in whole] == ["CNN/fc/add:0"]


def test_fault_changes_exactly_recorded_values(model, faulty_capture):
    g, (clean_out, clean) = faulty_capture
    (out, caps), (record,) = g(jax.random.key(7), model.params, model.x)
    assert int(record.count) == 3
    before, after = _raw(clean[model.site]).ravel(), _raw(caps[model.site]).ravel()
    changed = np.nonzero(before != after)[0]
    index = np.asarray(record.index)[np.asarray(record.valid)]
    assert set(changed) == set(index)
    np.testing.assert_array_equal(np.asarray(record.before), before[index])
    np.testing.assert_array_equal(np.asarray(record.after), after[index])
    np.testing.assert_array_equal(_raw(caps[model.upstream]), _raw(clean[model.upstream]))
    assert not np.array_equal(_raw(caps[model.downstream]), _raw(clean[model.downstream]))


def test_vmap_over_keys_equals_loop(model, faulty_capture):
    g, _ = faulty_capture
    keys = jax.random.split(jax.random.key(11), 3)
    batched = jax.jit(jax.vmap(g, in_axes=(0, None, None)))(keys, model.params, model.x)
    for i in range(keys.shape[0]):
        single = g(keys[i], model.params, model.x)
        for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(batched)):
            np.testing.assert_array_equal(_raw(a), _raw(b[i]))


def test_lax_map_equals_loop(linen):
    plan = jaxfi.Plan(jaxfi.Activations(primitive="conv_general_dilated"), count=2)
    g = jaxfi.faulty(linen.fn, plan)
    keys = jax.random.split(jax.random.key(5), 3)
    # Params and inputs go in as arguments: closed over, XLA would constant-fold them.
    mapped = jax.jit(lambda k, p, x: jax.lax.map(lambda key: g(key, p, x), k))(
        keys, linen.params, linen.x)
    single = jax.jit(g)
    for i in range(keys.shape[0]):
        for a, b in zip(jax.tree.leaves(single(keys[i], linen.params, linen.x)),
                        jax.tree.leaves(mapped)):
            np.testing.assert_array_equal(_raw(a), _raw(b[i]))


def test_no_fault_is_bitwise_jit(model):
    reference = jax.jit(model.fn)(model.params, model.x)
    captured, _ = jax.jit(jaxfi.capture(model.fn, [model.site]))(model.params, model.x)
    np.testing.assert_array_equal(_raw(captured), _raw(reference))
    # count=0 leaves the program alone; ber=0 runs the fault code on every site.
    for rate in ({"count": 0}, {"ber": 0.0}):
        none = jaxfi.Plan(jaxfi.Activations(), **rate)
        out, _ = jax.jit(jaxfi.faulty(model.fn, none))(jax.random.key(0), model.params, model.x)
        np.testing.assert_array_equal(_raw(out), _raw(reference))


def test_keys_do_not_reach_upstream_of_first_fault(linen):
    """Under vmap over keys the computation before the faulted site stays unbatched."""
    plan = jaxfi.Plan(jaxfi.Activations(name="^CNN/fc/add:0$"))
    g = jax.vmap(jaxfi.faulty(linen.fn, plan), in_axes=(0, None, None))
    jaxpr = jax.make_jaxpr(g)(jax.random.split(jax.random.key(0), 8), linen.params, linen.x)
    convs = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert [e.outvars[0].aval.shape for e in convs] == [(BATCH, 8, 8, 4)] * 2


def test_grad_runs_through_faults(linen):
    @functools.partial(jax.jit, static_argnums=1)
    def grad(params, plan, key):
        def loss(params):
            out, _ = jaxfi.faulty(linen.fn, plan)(key, params, linen.x)
            return jnp.sum(out ** 2)
        return jax.grad(loss)(params)

    clean = jax.jit(jax.grad(lambda p: jnp.sum(linen.fn(p, linen.x) ** 2)))(linen.params)
    # ber=0: every site passes through the fault code, no value changes.
    none = jaxfi.Plan(jaxfi.ModuleOutput("CNN/conv2"), ber=0.0)
    for a, b in zip(jax.tree.leaves(grad(linen.params, none, jax.random.key(0))),
                    jax.tree.leaves(clean)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    hit = jaxfi.Plan(jaxfi.ModuleOutput("CNN/conv2"), jaxfi.BitFlip(bits="mantissa"), count=5)
    kernel = grad(linen.params, hit, jax.random.key(1))["params"]["conv1"]["kernel"]
    assert np.all(np.isfinite(kernel)) and np.any(kernel != 0)


def test_faulted_value_is_a_constant_for_grad():
    plan = jaxfi.Plan(jaxfi.Activations(name="^mul:0$"), count=2)
    g = jaxfi.faulty(lambda x: jnp.sum(x * 3.0), plan)
    key = jax.random.key(2)
    grads, (record,) = jax.jit(jax.grad(g, argnums=1, has_aux=True))(key, jnp.ones(16))
    expected = np.full(16, 3.0, np.float32)
    expected[np.asarray(record.index)] = 0.0
    np.testing.assert_array_equal(grads, expected)


def test_mixed_weight_and_activation_trial(linen):
    names = ["CNN/conv1/add:0", "CNN/fc/add:0"]
    weight = jaxfi.Plan(jaxfi.Params("conv1/kernel"), jaxfi.BitFlip(bits="exponent"))
    act = jaxfi.Plan(jaxfi.ModuleOutput("CNN/fc"))
    g = jax.jit(jaxfi.faulty(jaxfi.capture(linen.fn, names), weight, act))
    (_, caps), (w_rec, a_rec) = g(jax.random.key(3), linen.params, linen.x)
    _, clean = jaxfi.capture(linen.fn, names)(linen.params, linen.x)
    assert int(w_rec.count) == 1 and int(a_rec.count) == 1
    kernel = _raw(linen.params["params"]["conv1"]["kernel"]).ravel()
    assert int(w_rec.before[0]) == kernel[int(w_rec.index[0])]
    assert not np.array_equal(_raw(caps[names[0]]), _raw(clean[names[0]]))
    assert _raw(caps[names[1]]).ravel()[int(a_rec.index[0])] == int(a_rec.after[0])
    table = jaxfi.record_table(a_rec, jaxfi.sites_of(linen.fn, act, linen.params, linen.x))
    assert list(table.site) == ["CNN/fc/add:0"]


def test_inputs_plan_with_activations(linen):
    inputs = jaxfi.Plan(jaxfi.Inputs())
    act = jaxfi.Plan(jaxfi.Activations(name="^CNN/conv1/add:0$"), count=2)
    g = jax.jit(jaxfi.faulty(jaxfi.capture(linen.fn, ["CNN/conv1/conv_general_dilated:0"]), inputs, act))
    (_, caps), (in_rec, act_rec) = g(jax.random.key(4), linen.params, linen.x)
    _, clean = jaxfi.capture(linen.fn, ["CNN/conv1/conv_general_dilated:0"])(linen.params, linen.x)
    assert int(in_rec.count) == 1 and int(act_rec.count) == 2
    assert int(in_rec.before[0]) == _raw(linen.x).ravel()[int(in_rec.index[0])]
    name = "CNN/conv1/conv_general_dilated:0"
    assert not np.array_equal(_raw(caps[name]), _raw(clean[name]))


def test_run_with_faults_needs_one_key_per_plan(linen):
    plan = jaxfi.Plan(jaxfi.Activations(name="^CNN/conv1/add:0$"))
    with pytest.raises(ValueError, match="one key per plan"):
        run_with_faults(linen.fn, (linen.params, linen.x), [plan], [])


def test_integer_sites_only_when_asked():
    def f(x):
        return x * jnp.argmax(x, axis=-1, keepdims=True).astype(x.dtype)

    x = jnp.arange(6.0).reshape(2, 3)
    assert all(s.dtype == np.float32 for s in jaxfi.activation_sites(f, x))
    ints = jaxfi.sites_of(f, jaxfi.Plan(jaxfi.Activations(dtype=jnp.int32)), x)
    assert ints and all(s.dtype == np.int32 for s in ints)


def _scanned(x):
    def body(carry, row):
        carry = jnp.tanh(carry + row)
        return carry, carry * 2
    carry, ys = jax.lax.scan(body, jnp.zeros(x.shape[1:]), x)
    return carry.sum() + ys.sum()


def test_control_flow_outputs_and_bodies_are_sites_capture_refuses_bodies():
    x = jnp.ones((3, 4))
    sites = {s.name: s for s in jaxfi.activation_sites(_scanned, x)}
    assert sites["scan:0/jaxpr/tanh:0"].control_flow == "scan"
    assert sites["scan:0/jaxpr/tanh:0"].shape == (3, 4) and sites["scan:0/jaxpr/tanh:0"].iterations == 3
    assert sites["scan:0.1"].shape == (3, 4) and not sites["scan:0.1"].control_flow
    g = jaxfi.faulty(_scanned, jaxfi.Plan(jaxfi.Activations(name=r"^scan:0\.1$")))
    out, (record,) = jax.jit(g)(jax.random.key(0), x)
    assert int(record.count) == 1 and out.shape == ()
    with pytest.raises(ValueError, match="capture takes values outside scan/while/cond bodies"):
        jaxfi.capture(_scanned, "scan:0/jaxpr/tanh:0")(x)


def test_bad_selections(linen):
    key, args = jax.random.key(0), (linen.params, linen.x)
    with pytest.raises(ValueError, match="(?s)matches no activations site.*CNN/conv1/add:0"):
        jaxfi.faulty(linen.fn, jaxfi.Plan(jaxfi.Activations(name="CNN/conv9")))(key, *args)
    with pytest.raises(ValueError, match="matches no activations site"):
        jaxfi.faulty(linen.fn, jaxfi.Plan(jaxfi.ModuleOutput("CNN/conv")))(key, *args)
    with pytest.raises(ValueError, match="(?s)unknown activation site.*CNN/conv1/add:0"):
        jaxfi.capture(linen.fn, ["CNN/conv9/add:0"])(*args)
    with pytest.raises(ValueError, match="bit 40 is outside format float32"):
        jaxfi.faulty(linen.fn, jaxfi.Plan(jaxfi.Activations(), jaxfi.BitFlip(bits=40)))(key, *args)
    with pytest.raises(ValueError, match="not a valid regex"):
        jaxfi.ModuleOutput("CNN/(")
    with pytest.raises(TypeError, match="flax.nnx.Module"):
        jaxfi.named_scopes(linen.fn)


def test_output_of_a_primitive_with_a_body_is_a_site():
    """scatter-add carries an update body; its own output is an ordinary site
    (it appears in the gradient of an integer-label cross-entropy)."""
    def fn(params, x):
        return jnp.tanh(jnp.zeros((x.shape[0], 4)).at[:, 1].add(x @ params["w"]))

    params = {"w": jnp.ones((3,), jnp.float32)}
    x = jnp.arange(6, dtype=jnp.float32).reshape(2, 3) / 10
    plan = jaxfi.Plan(jaxfi.Activations(primitive="scatter-add"), jaxfi.BitFlip(bits=(30,)), count=1)
    out, (record,) = jax.jit(jaxfi.faulty(fn, plan))(jax.random.key(0), params, x)
    golden = fn(params, x)
    assert bool(record.valid[0])
    changed = np.argwhere(np.asarray(out) != np.asarray(golden))
    assert changed.tolist() == [list(np.unravel_index(int(record.index[0]), (2, 4)))]
