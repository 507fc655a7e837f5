"""Row slicing: trials computed on the faulted rows equal whole-batch trials bit for bit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import lax

import jaxfi
from jaxfi._src import executors as ex
from jaxfi._src.inject import apply_rows, apply_site, sample_faults
from jaxfi._src.rows import RowProgram, kernel_element_term, put_rows, row_sites, take_rows
from jaxfi._src.trial import restricted, sites_of, trial_function

BATCH = 16


def convnet(params, x):
    """Conv, bias, ReLU, max pooling, flatten, then a matmul (where rows merge)."""
    h = lax.conv_general_dilated(x, params["conv"], (1, 1), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.relu(h + params["bias"].reshape(1, 1, 1, -1))
    h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return jnp.tanh(h.reshape(h.shape[0], -1) @ params["w"])


def batch_mixing(params, x):
    """Normalises over the batch between the two convolutions: rows do not stay apart."""
    dn = ("NHWC", "HWIO", "NHWC")
    h = lax.conv_general_dilated(x, params["conv"], (1, 1), "SAME", dimension_numbers=dn)
    h = h - h.mean(axis=0, keepdims=True)
    h = lax.conv_general_dilated(h, params["conv2"], (1, 1), "SAME", dimension_numbers=dn)
    return h.reshape(h.shape[0], -1) @ params["w2"]


def residual(params, x):
    """A ResNet-like block: conv, inference BatchNorm, ReLU, conv, BatchNorm,
    shortcut add, ReLU, global average pool, dense."""
    dn = ("NHWC", "HWIO", "NHWC")

    def bn(h, n):
        normed = (h - params["mean"][n]) * jax.lax.rsqrt(params["var"][n] + 1e-5)
        return normed * params["scale"][n] + params["shift"][n]

    h = jax.nn.relu(bn(lax.conv_general_dilated(x, params["c1"], (1, 1), "SAME", dimension_numbers=dn), 0))
    y = bn(lax.conv_general_dilated(h, params["c2"], (1, 1), "SAME", dimension_numbers=dn), 1)
    return jax.nn.relu(y + h).mean(axis=(1, 2)) @ params["w"]


@pytest.fixture(scope="module")
def setup():
    k = jax.random.split(jax.random.key(3), 6)
    params = {"conv": jax.random.normal(k[0], (3, 3, 1, 4)), "bias": jax.random.normal(k[1], (4,)),
              "conv2": jax.random.normal(k[2], (3, 3, 4, 4)), "w": jax.random.normal(k[3], (36, 5)),
              "w2": jax.random.normal(k[5], (144, 5))}
    x = jax.random.normal(k[4], (BATCH, 6, 6, 1))
    return params, x


def _program(fn, params, x, plans):
    """A RowProgram over the row sites of every plan (no incremental layers: they
    round differently), and the plain faulty trial."""
    rowed = row_sites(fn, params, x)
    pops = [p.population(tuple(sites_of(fn, p, params, x))) for p in plans]
    only = [frozenset(s for s, site in enumerate(pop.sites) if p.kind == "params" or site.name in rowed)
            for p, pop in zip(plans, pops)]
    program = RowProgram(fn, params, x, plans, pops, only, incremental=False)
    return program, jax.jit(restricted(fn, plans, only))


def _batches(program, params, golden, primitive: str = "conv_general_dilated") -> list[int]:
    """Leading sizes of the ``primitive`` operations a trial computes."""
    jaxpr = jax.make_jaxpr(program.trial)(jax.random.key(0), params, golden)
    return [e.invars[0].aval.shape[0] for e in jaxpr.eqns if e.primitive.name == primitive]


def test_row_sites_are_values_with_a_batch_axis_and_those_after_the_last(setup):
    params, x = setup
    rowed = row_sites(convnet, params, x)
    sites = {s.name: s for s in jaxfi.activation_sites(convnet, params, x)}
    assert "arg1" in rowed  # the input batch
    assert {"conv_general_dilated:0", "add:0", "reduce_window_max:0", "reshape:1"} <= rowed
    # The bias broadcast has no batch axis: a fault there changes every row.
    assert "reshape:0" not in rowed and sites["reshape:0"].shape == (1, 1, 1, 4)
    # After the matmul the trial runs on the whole batch anyway.
    assert {"dot_general:0", "tanh:0"} <= rowed


@pytest.mark.parametrize("plans", [
    (jaxfi.Plan(jaxfi.Activations(), jaxfi.BitFlip(bits="exponent"), count=1),),
    (jaxfi.Plan(jaxfi.Activations(), jaxfi.BitFlip(), count=3),
     jaxfi.Plan(jaxfi.Inputs(), jaxfi.BitFlip(), count=2)),
    (jaxfi.Plan(jaxfi.Activations(), jaxfi.RandomValue(), count=2),),
], ids=["one-exponent-bit", "activations+inputs", "random-value"])
def test_row_program_is_bitwise_equal_to_the_whole_batch_trial(setup, plans):
    params, x = setup
    program, reference = _program(convnet, params, x, plans)
    golden = program.golden(params, x)
    trial = jax.jit(program.trial)
    assert program.rows == sum(p.population(tuple(sites_of(convnet, p, params, x))).cap for p in plans)
    assert _batches(program, params, golden, "reduce_window_max") == [program.rows]
    assert _batches(program, params, golden, "dot_general") == [BATCH]
    golden_out = np.asarray(jax.jit(convnet)(params, x))
    changed = 0
    for i in range(24):
        key = jax.random.fold_in(jax.random.key(1), i)
        expected = jax.device_get(reference(key, params, x))
        assert ex.same_bits(jax.device_get(trial(key, params, golden)), expected), i
        changed += not np.array_equal(expected[0], golden_out)
    assert changed >= 5  # the trials really change outputs, so equality is not vacuous


def test_row_program_matches_where_xla_fuses_batchnorm():
    """Golden values carry the trial's fault-writing operations (with no
    fault), so XLA fuses the BatchNorm arithmetic the same way in both."""
    k = jax.random.split(jax.random.key(8), 8)
    params = {"c1": jax.random.normal(k[0], (3, 3, 1, 8)), "c2": jax.random.normal(k[1], (3, 3, 8, 8)) / 8,
              "mean": jax.random.normal(k[2], (2, 8)), "var": jax.random.uniform(k[3], (2, 8)) + 0.5,
              "scale": jax.random.normal(k[4], (2, 8)), "shift": jax.random.normal(k[5], (2, 8)),
              "w": jax.random.normal(k[6], (8, 5))}
    x = jax.random.normal(k[7], (BATCH, 8, 8, 1))
    plan = jaxfi.Plan(jaxfi.Activations(), jaxfi.BitFlip(), count=1)
    program, reference = _program(residual, params, x, (plan,))
    golden = program.golden(params, x)
    assert _batches(program, params, golden)[-1] == program.rows == 1
    trial = jax.jit(program.trial)
    for i in range(16):
        key = jax.random.fold_in(jax.random.key(6), i)
        assert ex.same_bits(jax.device_get(trial(key, params, golden)), jax.device_get(reference(key, params, x))), i


def test_rows_are_not_sliced_through_an_operation_that_mixes_them(setup):
    params, x = setup
    plan = jaxfi.Plan(jaxfi.Inputs(), jaxfi.BitFlip(bits="exponent"), count=1)
    program, reference = _program(batch_mixing, params, x, (plan,))
    golden = program.golden(params, x)
    assert _batches(program, params, golden) == [1, BATCH]
    golden_out = np.asarray(jax.jit(batch_mixing)(params, x))
    for i in range(8):
        key = jax.random.fold_in(jax.random.key(2), i)
        out = jax.device_get(jax.jit(program.trial)(key, params, golden))
        assert ex.same_bits(out, jax.device_get(reference(key, params, x)))
        assert (out[0] != golden_out).any(axis=1).sum() > 1  # the fault reached other rows


def test_too_many_rows_run_on_the_whole_batch(setup):
    params, x = setup
    plan = jaxfi.Plan(jaxfi.Inputs(), jaxfi.BitFlip(), count=BATCH)
    program, reference = _program(convnet, params, x, (plan,))
    golden = program.golden(params, x)
    assert program.rows == 0 and _batches(program, params, golden) == [BATCH]
    key = jax.random.key(5)
    assert ex.same_bits(jax.device_get(jax.jit(program.trial)(key, params, golden)),
                        jax.device_get(reference(key, params, x)))


def _close_to_single_trials(out, trials, n):
    """Records bitwise equal to the single trials', outputs within rounding."""
    output, records = jax.tree.map(lambda *xs: np.stack(xs), *[trials.replay(i) for i in range(n)])
    assert ex.same_bits(out.records, records)
    np.testing.assert_allclose(out.output, output, rtol=1e-5, atol=1e-5)


def test_grouped_executor_with_activation_faults(setup):
    """Activation faults: row-sliced programs, reproducible across group widths."""
    params, x = setup
    plan = jaxfi.Plan(jaxfi.Activations(), jaxfi.BitFlip(bits="mantissa"), count=2)
    trials = ex.Trials(trial_function(jaxfi.faulty(convnet, plan)), jax.random.key(9), params, x,
                       convnet, (plan,))
    runner = ex.GroupedExecutor(4).build(trials, 32, jax.local_devices())
    out = runner(0, 32)
    _close_to_single_trials(out, trials, 32)
    assert (runner.paths()["rows"] > 0).any()
    assert ex.same_bits(ex.GroupedExecutor(16).build(trials, 32, jax.local_devices())(0, 32), out)


def test_grouped_executor_with_faults_on_sites_without_a_batch_axis(setup):
    """A trial that also hits the bias broadcast runs a whole-batch program."""
    params, x = setup
    plans = (jaxfi.Plan(jaxfi.Activations("conv_general_dilated"), jaxfi.BitFlip(bits="mantissa"), count=1),
             jaxfi.Plan(jaxfi.Activations("^reshape:0$"), jaxfi.BitFlip(bits="mantissa"), count=1))
    trials = ex.Trials(trial_function(jaxfi.faulty(convnet, *plans)), jax.random.key(4), params, x,
                       convnet, plans)
    runner = ex.GroupedExecutor(4).build(trials, 16, jax.local_devices())
    assert all(wide for _, wide in runner.keys(np.arange(16)))
    _close_to_single_trials(runner(0, 16), trials, 16)


def test_apply_rows_equals_apply_site_on_those_rows():
    site = jaxfi.Site("activations", "h", (8, 3, 2), np.dtype(np.float32))
    plan = jaxfi.Plan(jaxfi.Activations(), jaxfi.BitFlip(), count=3)
    pop = plan.population((site,))
    values = jax.random.normal(jax.random.key(0), site.shape)
    for i in range(10):
        faults = sample_faults(jax.random.key(i), pop)
        whole, expected = apply_site(jax.random.key(99), values, 0, faults, pop)
        rows = jnp.unique(jnp.where(faults.valid, faults.index // 6, 8), size=3, fill_value=8)
        part, fields = apply_rows(jax.random.key(99), take_rows(values, rows), rows, 0, faults, pop)
        assert ex.same_bits(fields, expected)
        assert ex.same_bits(put_rows(values, rows, part), whole)


def test_take_and_put_rows_keep_signalling_nans():
    raw = np.array([[0x7F81, 0x3F80], [0xFF81, 0x0001], [0x7FC0, 0x7F80]], np.uint16)
    values = jnp.asarray(raw.view(ml_dtypes.bfloat16))
    rows = jnp.asarray([2, 0, 3])  # 3 is out of range: read as zeros, dropped when written
    taken = take_rows(values, rows)
    assert np.asarray(taken).view(np.uint16).tolist() == [raw[2].tolist(), raw[0].tolist(), [0, 0]]
    back = put_rows(jnp.zeros_like(values), rows, taken)
    assert np.asarray(back).view(np.uint16).tolist() == [raw[0].tolist(), [0, 0], raw[2].tolist()]


def _incremental(params, x, plan, corrected: str, seed: int, fn=convnet, trials: int = 8) -> RowProgram:
    """A RowProgram of ``plan`` over all its sites: it corrects ``corrected``
    incrementally, draws the plain trial's records bit for bit and stays
    within float rounding of its outputs (non-finite exactly where they are)."""
    pops = [plan.population(tuple(sites_of(fn, plan, params, x)))]
    program = RowProgram(fn, params, x, (plan,), pops, (frozenset(range(len(pops[0].sites))),))
    assert program.corrected == corrected
    golden = program.golden(params, x)
    reference = jax.jit(jaxfi.faulty(fn, plan))
    trial = jax.jit(program.trial)
    for i in range(trials):
        key = jax.random.fold_in(jax.random.key(seed), i)
        (out, records), (expected, expected_records) = trial(key, params, golden), reference(key, params, x)
        assert ex.same_bits(records, expected_records)
        finite = np.isfinite(expected)
        assert (np.isfinite(out) == finite).all()
        np.testing.assert_allclose(out[finite], expected[finite], rtol=1e-4, atol=1e-4)  # float32 ulps
    return program


def test_incremental_dense_layers_add_the_changed_weights_terms(setup):
    """A faulted dense weight is applied as a correction to the golden product:
    no matmul with the faulty weight, and results within float rounding."""
    params, x = setup
    plan = jaxfi.Plan(jaxfi.Params("w$"), jaxfi.BitFlip(bits="mantissa"), count=2)
    program = _incremental(params, x, plan, ("dot_general",), 11)
    assert _batches(program, params, program.golden(params, x), "dot_general") == []
    pops = [plan.population(tuple(sites_of(convnet, plan, params, x)))]
    recomputing = RowProgram(convnet, params, x, (plan,), pops, (frozenset({0}),), incremental=False)
    assert recomputing.corrected == ()


def test_incremental_convolutions_add_the_changed_kernel_elements(setup):
    """A faulted kernel element changes one output channel: the correction is a
    one-channel convolution added to the golden result (exponent flips: some
    trials overflow to inf, which must stay non-finite)."""
    params, x = setup
    _incremental(params, x, jaxfi.Plan(jaxfi.Params("^conv$"), jaxfi.BitFlip(bits="exponent"), count=3),
                 ("conv_general_dilated",), 12)


def two_convs(params, x):
    """Conv (16 channels), ReLU, conv (8 channels, VALID), flatten, dense, tanh."""
    dn = ("NHWC", "HWIO", "NHWC")
    h = jax.nn.relu(lax.conv_general_dilated(x, params["c1"], (1, 1), "SAME", dimension_numbers=dn))
    h = lax.conv_general_dilated(h, params["c2"], (1, 1), "VALID", dimension_numbers=dn)
    return jnp.tanh(h.reshape(h.shape[0], -1) @ params["w"])


def test_a_matmul_after_a_fault_updates_the_golden_result_where_few_input_features_changed():
    """A fault in c2 changes 4 of the dense layer's 32 inputs: the dense layer
    is its golden result plus those features' terms. A fault in c1 changes
    every input of the dense layer (through c2, recomputed): it recomputes."""
    k = jax.random.split(jax.random.key(5), 3)
    params = {"c1": jax.random.normal(k[0], (3, 3, 1, 16)), "c2": jax.random.normal(k[1], (3, 3, 16, 8)) / 4,
              "w": jax.random.normal(k[2], (32, 5)) / 4}
    x = jax.random.normal(jax.random.key(6), (BATCH, 4, 4, 1))
    plan = jaxfi.Plan(jaxfi.Params("^c"), jaxfi.BitFlip(bits="mantissa"), count=1)
    program = _incremental(params, x, plan, ("conv_general_dilated",), 13, two_convs, 16)
    assert program.sparse == ("dot_general",)
    golden = program.golden(params, x)
    no_fault = jax.jit(program.trial)(jax.random.key(0), params, golden, live=False)[0]
    assert ex.same_bits(no_fault, jax.jit(two_convs)(params, x))


def test_incremental_rows_go_through_matmuls_and_keep_golden_bits_where_nothing_changed(setup):
    """With incremental layers a matmul also runs on the faulted rows alone;
    rows whose input kept its golden bits keep the golden output bits: a
    mantissa flip of a negative value before the ReLU leaves the output
    bit-identical to the program's golden run."""
    params, x = setup
    plan = jaxfi.Plan(jaxfi.Activations(primitive="add"), jaxfi.BitFlip(bits="mantissa"), count=1)
    pop = plan.population(tuple(sites_of(convnet, plan, params, x)))
    program = RowProgram(convnet, params, x, (plan,), (pop,), (frozenset(range(len(pop.sites))),))
    golden = program.golden(params, x)
    assert _batches(program, params, golden, "dot_general") == [program.rows] == [1]
    reference = jax.jit(restricted(convnet, (plan,), (frozenset(range(len(pop.sites))),)))
    trial = jax.jit(program.trial)
    own_golden = trial(jax.random.key(0), params, golden, live=False)[0]
    killed = 0
    for i in range(32):
        key = jax.random.fold_in(jax.random.key(2), i)
        (out, records), (expected, expected_records) = trial(key, params, golden), reference(key, params, x)
        assert ex.same_bits(records, expected_records), i
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
        if int(records[0].before[0]) >> 31:  # negative before and after: the ReLU gives 0 either way
            killed += 1
            assert ex.same_bits(out, own_golden), i
    assert killed >= 5


@pytest.mark.parametrize("layout, strides, padding, dilation", [
    (("NHWC", "HWIO", "NHWC"), (1, 1), "SAME", (1, 1)),
    (("NHWC", "HWIO", "NHWC"), (2, 2), ((1, 0), (0, 1)), (1, 1)),
    (("NCHW", "OIHW", "NCHW"), (2, 1), "VALID", (2, 1)),
])
def test_one_kernelkernel_element_term_equals_the_convolution_of_its_delta(layout, strides, padding, dilation):
    """The correction of one changed kernel element (a strided window of one
    input channel times the change) equals the convolution with a kernel
    holding only that change."""
    rng = np.random.default_rng(4)
    lhs, rhs, _ = layout
    x = jnp.asarray(rng.normal(size=(2, 3, 7, 6) if lhs == "NCHW" else (2, 7, 6, 3)), jnp.float32)
    kernel_shape = (4, 3, 3, 2) if rhs == "OIHW" else (3, 2, 3, 4)
    w = jnp.zeros(kernel_shape, jnp.float32)

    def conv(x, w):
        return lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=layout)

    eqn = jax.make_jaxpr(conv)(x, w).eqns[0]
    dn = eqn.params["dimension_numbers"]
    for element in [(0, 1, 2, 1), (3, 2, 0, 1)] if rhs == "OIHW" else [(2, 1, 1, 3), (0, 0, 2, 0)]:
        delta = jnp.float32(0.75)
        expected = conv(x, w.at[element].set(delta))
        out_channel = element[dn.rhs_spec[0]]
        expected = lax.dynamic_slice_in_dim(expected, out_channel, 1, axis=dn.out_spec[1])
        term = kernel_element_term(eqn, x, [element[d] for d in dn.rhs_spec[2:]], element[dn.rhs_spec[1]], delta,
                             eqn.outvars[0].aval.shape)
        np.testing.assert_allclose(term, expected, rtol=1e-6, atol=1e-6)
