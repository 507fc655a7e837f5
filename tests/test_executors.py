"""Executors under the exactness contract.

Every executor draws the reference's faults (records bitwise equal); the
reference family (loop, map, vmap) gives the unbatched trial's outputs bit for
bit; the grouped executor's outputs are reproducible across chunk sizes,
group widths and device counts, and a trial without a landed fault equals its
program's golden run.

Run as a script (``python tests/test_executors.py OUT``), this file computes
trials on however many devices JAX sees and saves them to OUT: the 4-device
test runs it in a subprocess with XLA_FLAGS set before jax starts.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxfi
from jaxfi._src import executors as ex
from jaxfi._src.batching import batch_invariant
from jaxfi._src.trial import restricted, trial_function

TRIALS = 70  # not a multiple of 64 or 7: the last chunk is padded


def cnn(params, x):
    """A tiny CNN with a convolution, a float reduction, tanh and two matmuls."""
    h = lax.conv_general_dilated(x, params["conv"], (1, 1), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jnp.tanh(h).mean(axis=(1, 2))
    h = jax.nn.relu(h @ params["w1"] + params["b1"])
    return h @ params["w2"]


def make_trials() -> ex.Trials:
    """Weight faults at a bit error rate (several per trial) plus one input fault."""
    k = jax.random.split(jax.random.key(42), 5)
    params = {"conv": jax.random.normal(k[0], (3, 3, 1, 4)),
              "w1": jax.random.normal(k[1], (4, 8)), "b1": jax.random.normal(k[2], (8,)),
              "w2": jax.random.normal(k[3], (8, 3))}
    x = jax.random.normal(k[4], (16, 6, 6, 1))
    plans = (jaxfi.Plan(jaxfi.Params(), jaxfi.BitFlip(), ber=1e-3),
             jaxfi.Plan(jaxfi.Inputs(), jaxfi.BitFlip(bits="mantissa")))
    return ex.Trials(trial_function(jaxfi.faulty(cnn, *plans)), jax.random.key(7), params, x,
                     cnn, plans)


def compute(executor, chunk_size: int, trials: ex.Trials, devices=None) -> ex.Computed:
    """Trials 0..TRIALS-1 in chunks, concatenated."""
    runner = executor.build(trials, chunk_size, devices or jax.local_devices())
    parts = [runner(a, min(a + chunk_size, TRIALS)) for a in range(0, TRIALS, chunk_size)]
    return ex.Computed(*jax.tree.map(lambda *xs: np.concatenate(xs), *parts))


REFERENCE_FAMILY = [(ex.VmapExecutor(), 1), (ex.VmapExecutor(), 7), (ex.VmapExecutor(), 64),
                    (ex.MapExecutor(), 7), (ex.MapExecutor(batch_size=3), 7), (ex.LoopExecutor(), 7)]
GROUPED = [(ex.GroupedExecutor(4), 7), (ex.GroupedExecutor(4), 64), (ex.GroupedExecutor(16), 7)]


@pytest.fixture(scope="module")
def trials():
    return make_trials()


@pytest.fixture(scope="module")
def reference(trials):
    """Every trial computed alone by the jitted single trial (the definition)."""
    outs = [trials.replay(i) for i in range(TRIALS)]
    return jax.tree.map(lambda *xs: np.stack(xs), *outs)


def test_reference_has_multi_fault_trials(reference):
    _, (weights, inputs) = reference
    assert weights.valid.sum(axis=1).max() >= 2
    assert inputs.valid.all()


@pytest.mark.parametrize("executor,chunk_size", REFERENCE_FAMILY, ids=lambda c: getattr(c, "name", str(c)))
def test_reference_family_is_bitwise_equal_to_single_trials(trials, reference, executor, chunk_size):
    out = compute(executor, chunk_size, trials)
    assert ex.same_bits(out[:2], reference)
    assert (out.program == 0).all()


@pytest.fixture(scope="module")
def grouped(trials):
    return compute(*GROUPED[0], trials)


@pytest.mark.parametrize("executor,chunk_size", GROUPED[1:], ids=lambda c: getattr(c, "name", str(c)))
def test_grouped_is_reproducible_across_chunk_sizes_and_widths(trials, grouped, executor, chunk_size):
    assert ex.same_bits(compute(executor, chunk_size, trials), grouped)


def test_grouped_draws_the_reference_faults_and_stays_close(reference, grouped):
    """Same records; outputs within float rounding of the reference where finite
    (other programs, incremental layers), and the same argmax in every trial."""
    output, records = reference
    assert ex.same_bits(grouped.records, records)
    finite = np.isfinite(output).all(axis=(1, 2)) & np.isfinite(grouped.output).all(axis=(1, 2))
    assert finite.sum() >= TRIALS // 2
    np.testing.assert_allclose(grouped.output[finite], output[finite], rtol=1e-4, atol=1e-4)
    assert (grouped.output[finite].argmax(-1) == output[finite].argmax(-1)).all()
    assert (np.isfinite(grouped.output).all(axis=(1, 2)) == np.isfinite(output).all(axis=(1, 2))).all()


def test_trial_without_a_fault_equals_its_programs_golden(trials):
    """Exponent flips in the convolution (every path from it to the output is live) at a rate where
    about half the trials draw none: those equal the golden run of the program that computed them
    bit for bit, and every trial with a fault differs from it."""
    plan = jaxfi.Plan(jaxfi.Params("conv"), jaxfi.BitFlip(bits="exponent"), ber=2.5e-3)
    sparse = ex.Trials(trial_function(jaxfi.faulty(cnn, plan)), trials.base_key, trials.params,
                       trials.inputs, cnn, (plan,))
    runner = ex.GroupedExecutor(4).build(sparse, 8, jax.local_devices())
    out = ex.Computed(*jax.tree.map(lambda *xs: np.concatenate(xs), runner(0, 8), runner(8, 16)))
    faulted = out.records[0].valid.any(axis=1)
    assert 4 <= faulted.sum() <= 12
    for row, program, hit in zip(out.output, out.program, faulted):
        assert (row.tobytes() == runner.golden(int(program)).tobytes()) != hit


def test_grouped_evaluates_faulted_layers_incrementally(trials):
    """One weight flip per trial: the matmul and convolution groups add the
    changed weights' terms to golden results instead of recomputing."""
    plan = jaxfi.Plan(jaxfi.Params(), jaxfi.BitFlip(), count=1)
    single = ex.Trials(trial_function(jaxfi.faulty(cnn, plan)), trials.base_key, trials.params,
                       trials.inputs, cnn, (plan,))
    runner = ex.GroupedExecutor(4).build(single, 32, jax.local_devices())
    out = runner(0, 32)
    paths = runner.paths()
    assert {"conv_general_dilated", "dot_general"} <= {p for c in paths["corrected"] for p in c}
    assert set(paths["program"]) == set(np.unique(out.program))
    exact = ex.GroupedExecutor(4, incremental=False).build(single, 32, jax.local_devices())
    recomputed = exact(0, 32)
    assert all(c == () for c in exact.paths()["corrected"])
    assert ex.same_bits(recomputed.records, out.records)
    assert (recomputed.output.argmax(-1) == out.output.argmax(-1)).all()


def test_trial_key_is_fold_in_of_seed(trials):
    g = jaxfi.faulty(cnn, *[jaxfi.Plan(jaxfi.Params(), jaxfi.BitFlip(), ber=1e-3),
                            jaxfi.Plan(jaxfi.Inputs(), jaxfi.BitFlip(bits="mantissa"))])
    direct = jax.jit(g)(jax.random.fold_in(jax.random.key(7), 5), trials.params, trials.inputs)
    assert ex.same_bits(jax.device_get(direct), trials.replay(5))


@pytest.fixture(scope="module", autouse=True)
def four_devices(request, tmp_path_factory):
    """``(process, path)``: this file run as a script on 4 CPU devices, started with the module's
    first test (when test_four_devices_match_one is selected) so that it computes while the
    other tests do; None when that test is not selected."""
    if not any(item.name == "test_four_devices_match_one" for item in request.session.items):
        yield None
        return
    out = tmp_path_factory.mktemp("four-devices") / "four.npz"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    with open(out.with_suffix(".log"), "w") as log:  # a file, not a pipe: nothing blocks the child
        process = subprocess.Popen([sys.executable, __file__, str(out)], env=env, stdout=log, stderr=log)
    yield process, out
    if process.poll() is None:
        process.kill()
        process.wait()


def test_four_devices_match_one(four_devices, reference, grouped):
    process, out = four_devices
    assert process.wait(timeout=600) == 0, out.with_suffix(".log").read_text()[-3000:]
    saved = np.load(out)
    assert int(saved["devices"]) == 4
    for name in sorted({k.rsplit("/", 1)[0] for k in saved.files if "/" in k}):
        expected = grouped if name.startswith("grouped") else ex.Computed(
            *reference, np.zeros(TRIALS, np.int64))
        leaves = jax.tree.leaves(expected)
        got = [saved[f"{name}/{i}"] for i in range(len(leaves))]
        assert ex.same_bits(got, leaves), name


def _main(path: str) -> None:
    trials = make_trials()
    saved = {"devices": np.asarray(len(jax.local_devices()))}
    for executor, chunk_size in [(ex.VmapExecutor(), 7), (ex.VmapExecutor(), 1),
                                 (ex.MapExecutor(), 7), (ex.LoopExecutor(), 7), GROUPED[0]]:
        leaves = jax.tree.leaves(compute(executor, chunk_size, trials))
        saved.update({f"{executor.name}-{chunk_size}/{i}": a for i, a in enumerate(leaves)})
    np.savez(path, **saved)


def test_batch_invariant_matches_unbatched_for_every_width():
    def f(w, x):
        y = jnp.tanh(x @ w)
        y = y + jnp.sum(y * y, axis=-1, keepdims=True)
        return jnp.cumsum(y, axis=0) / jnp.prod(1.0 + 0.01 * y)
    k1, k2 = jax.random.split(jax.random.key(0))
    ws, x = jax.random.normal(k1, (64, 24, 40)), jax.random.normal(k2, (32, 24))
    alone = np.stack([np.asarray(jax.jit(f)(ws[i], x)) for i in range(64)])
    g = batch_invariant(f, ws[0], x)
    for width in (1, 3, 7, 64):
        got = np.asarray(jax.jit(jax.vmap(g, in_axes=(0, None)))(ws[:width], x))
        assert got.tobytes() == alone[:width].tobytes(), width


def test_batch_invariant_rewrites_scan_bodies():
    def f(ws, x):
        return lax.scan(lambda h, w: (jnp.tanh(h @ w) + 0.1 * h.sum(), None), x, ws)[0]
    k1, k2 = jax.random.split(jax.random.key(1))
    ws, x = jax.random.normal(k1, (16, 3, 20, 20)) / 4, jax.random.normal(k2, (30, 20))
    alone = np.stack([np.asarray(jax.jit(f)(ws[i], x)) for i in range(16)])
    g = batch_invariant(f, ws[0], x)
    for width in (5, 16):
        got = np.asarray(jax.jit(jax.vmap(g, in_axes=(0, None)))(ws[:width], x))
        assert got.tobytes() == alone[:width].tobytes(), width


def test_batch_invariant_is_the_function_when_unbatched(trials):
    direct = trials.single(trials.base_key, np.int32(3), trials.params, trials.inputs)
    invariant = batch_invariant(trials.fn, trials.base_key, np.int32(0), trials.params, trials.inputs)
    rewritten = jax.jit(invariant)(trials.base_key, np.int32(3), trials.params, trials.inputs)
    assert ex.same_bits(jax.device_get(direct), jax.device_get(rewritten))


class _Corrupting(ex.VmapExecutor):
    """A reference-family candidate whose results differ from the unbatched trial in one bit."""

    name = "corrupt"

    def build(self, trials, chunk_size, devices):
        inner = ex.LoopExecutor().build(trials, chunk_size, devices)

        class Runner:
            name, width, compile_seconds = "corrupt", chunk_size, 0.0

            def __call__(self, start, stop):
                output, records, program = inner(start, stop)
                output = output.copy()
                output.view(np.uint32)[0, 0, 0] ^= 1
                return ex.Computed(output, records, program)

            def golden(self, program):
                return inner.golden(program)

        return Runner()


def test_verify_refuses_different_bits(trials):
    out = _Corrupting().build(trials, 4, jax.local_devices())(0, 4)
    with pytest.raises(ex.NotBitwiseError, match="trial 0"):
        ex.verify("corrupt", out, trials, 0, 4)
    good = ex.LoopExecutor().build(trials, 4, jax.local_devices())(0, 4)
    ex.verify("loop", good, trials, 0, 4)


class _LateCorruption:
    """A runner that gives other bits from trial ``first`` on (a batched program gone wrong later)."""

    def __init__(self, inner, first: int):
        self._inner, self._first = inner, first
        self.name, self.width, self.compile_seconds = inner.name, inner.width, inner.compile_seconds

    def __call__(self, start, stop):
        output, records, program = self._inner(start, stop)
        output = np.array(output)
        if start >= self._first:
            output.view(np.uint32)[:, 0, 0] ^= 1
        return ex.Computed(output, records, program)

    def golden(self, program):
        return self._inner.golden(program)


def test_a_batched_executor_is_checked_beyond_its_first_chunk(toy_mlp, monkeypatch):
    """The third chunk of a vmap run gives other bits: the campaign refuses it there."""
    build = ex.VmapExecutor.build
    monkeypatch.setattr(ex.VmapExecutor, "build",
                        lambda self, *args: _LateCorruption(build(self, *args), first=8))
    campaign = jaxfi.Campaign(toy_mlp.apply_fn, toy_mlp.params, toy_mlp.x, None,
                              jaxfi.Plan(jaxfi.Params(), ber=1e-2), seed=0)
    with pytest.raises(ex.NotBitwiseError, match="trial 8"):
        campaign.run(16, executor="vmap", chunk_size=4, quiet=True)
    assert len(campaign.run(8, executor="vmap", chunk_size=4, quiet=True)) == 8  # before the corruption


def test_auto_never_chooses_an_inconsistent_reference_executor(trials):
    auto = ex.AutoExecutor(candidates=(_Corrupting(), "vmap"), probe=4, sample=8)
    chosen, runner, table = ex.choose(auto, trials, 8, jax.local_devices(), 0, 10**6)
    assert runner.name in ("vmap", "loop")
    assert table.set_index("executor")["usable"].to_dict() == {"loop": True, "corrupt": False, "vmap": True}
    assert table["chosen"].sum() == 1


def test_auto_skips_candidates_that_would_not_pay_off(trials):
    """Three trials: the loop finishes before grouped would have compiled."""
    def fresh(params, x):  # a program no other test compiled (compiles are cached in-process)
        return cnn(params, x) * 2.0

    plan = jaxfi.Plan(jaxfi.Params(), count=1)
    few = ex.Trials(trial_function(jaxfi.faulty(fresh, plan)), trials.base_key, trials.params,
                    trials.inputs, fresh, (plan,))
    chosen, runner, table = ex.choose(ex.AutoExecutor(), few, 8, jax.local_devices(), 0, 3)
    assert runner.name == "loop" and isinstance(chosen, ex.LoopExecutor)
    rows = table.set_index("executor")
    assert not rows.loc[ex.GroupedExecutor().name, "usable"]
    # Skipped unbuilt: its best case (work plus a second per program) says why.
    assert rows.loc["loop", "estimate_s"] <= rows.loc[ex.GroupedExecutor().name, "estimate_s"] < np.inf
    # Planning for a long sequential study, the same probe times grouped too.
    _, _, table = ex.choose(ex.AutoExecutor(horizon=10**7), few, 8, jax.local_devices(), 0, 3)
    assert table.set_index("executor").loc[ex.GroupedExecutor().name, "usable"]
    with pytest.raises(ValueError, match="horizon must be a positive int"):
        ex.AutoExecutor(horizon=0)


def test_executor_names_and_errors():
    assert isinstance(ex.executor("vmap"), ex.VmapExecutor)
    assert ex.executor(ex.MapExecutor(4)).name == "map(batch_size=4)"
    assert ex.AutoExecutor().candidates[0].name == "grouped(width=64, programs=8)"
    assert ex.from_spec(ex.spec(ex.GroupedExecutor(8, max_programs=3))) == ex.GroupedExecutor(8, max_programs=3)
    assert ex.spec(ex.MapExecutor(4)) == ex.spec(ex.LoopExecutor())  # one family of programs
    with pytest.raises(ValueError, match="executor must be one of"):
        ex.executor("pmap")
    with pytest.raises(ValueError, match="batch_size"):
        ex.MapExecutor(0)
    with pytest.raises(ValueError, match="none of them 'auto'"):
        ex.AutoExecutor(candidates=("auto",))


if __name__ == "__main__":
    _main(sys.argv[1])


def test_grouped_and_only_bad_inputs():
    base = make_trials()
    with pytest.raises(ValueError, match="group_width must be a positive int"):
        ex.GroupedExecutor(0)
    with pytest.raises(ValueError, match="max_programs must be a positive int"):
        ex.GroupedExecutor(max_programs=True)
    bare = ex.Trials(base.fn, base.base_key, base.params, base.inputs)
    with pytest.raises(ValueError, match="needs a campaign's apply_fn and plans"):
        ex.GroupedExecutor().build(bare, 4, jax.local_devices())
    plan = jaxfi.Plan(jaxfi.Params(), count=1)
    with pytest.raises(ValueError, match="only needs one entry per plan: 1 plans, 2 entries"):
        restricted(cnn, (plan,), (frozenset(), frozenset()))
