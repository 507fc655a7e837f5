"""Issue 17: a store never mixes two campaigns, and valid input never crashes.

Every test here failed on the code before the fix: campaigns identified by a
function's name, chunks not tied to their campaign, plans whose static cap
exceeded their population, silent float64 -> float32 in the bit operations,
and error messages that hid their cause.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxfi
from jaxfi import models
from jaxfi._src import store as store_lib
from jaxfi._src.store import CorruptChunkError, Store, differences

BATCH = 8


def sign_model(params, x):
    """Two classes decided by the sign of x * w."""
    z = x * params["w"]
    return jnp.stack([z, -z], axis=-1)


def _inputs(n: int = BATCH) -> jax.Array:
    return jnp.linspace(0.5, 2.0, n, dtype=jnp.float32)


def _sign_campaign(plan=None, n=BATCH, **kw) -> jaxfi.Campaign:
    plan = plan or jaxfi.Plan(jaxfi.Params(), jaxfi.BitFlip(bits="sign"))
    return jaxfi.Campaign(sign_model, {"w": jnp.float32(1.5)}, _inputs(n),
                          np.zeros(n, np.int32), plan, **kw)


def _exec(source: str, name: str):
    """Define ``name`` from ``source`` in a fake module, as an edited file would between runs."""
    namespace = {"__name__": "user_code", "jnp": jnp, "np": np}
    exec(compile(source, "user_code.py", "exec"), namespace)  # noqa: S102 (test code)
    return namespace[name]


# ------------------------------------------- 1. identity is what determines results


class _Mlp(nn.Module):
    act: str

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(3)(getattr(jax.nn, self.act)(nn.Dense(8)(x)))


def _refused(tmp_path: Path, a: jaxfi.Campaign, b: jaxfi.Campaign, item: str) -> str:
    Store(tmp_path / "s", a.config)
    with pytest.raises(ValueError, match=item) as err:
        Store(tmp_path / "s", b.config)
    return str(err.value)


def test_models_bound_the_same_way_with_other_activations_are_other_campaigns(tmp_path):
    x = jax.random.normal(jax.random.key(0), (BATCH, 4))
    variables = _Mlp("relu").init(jax.random.key(1), x)
    relu = models.bind_inference(_Mlp("relu"), variables)
    tanh = models.bind_inference(_Mlp("tanh"), variables)
    plan = jaxfi.Plan(jaxfi.Params())
    a, b = (jaxfi.Campaign(fn, params, x, None, plan) for fn, params in (relu, tanh))
    assert a.config["function"] == b.config["function"]  # the name cannot tell them apart
    message = _refused(tmp_path, a, b, "program")
    assert "relu" in message or "max" in message
    assert "tanh" in message


def test_lambdas_and_edited_functions_are_other_campaigns(tmp_path):
    params, x, plan = {"w": jnp.ones((4, 2))}, jnp.ones((BATCH, 4)), jaxfi.Plan(jaxfi.Params())
    first = jaxfi.Campaign(lambda p, v: v @ p["w"], params, x, None, plan)
    second = jaxfi.Campaign(lambda p, v: (v @ p["w"]) * 2, params, x, None, plan)
    assert first.config["function"] == second.config["function"]
    assert first.config != second.config
    before = _exec("def model(p, v):\n    return v @ p['w']\n", "model")
    after = _exec("def model(p, v):\n    return jnp.tanh(v @ p['w'])\n", "model")
    a, b = (jaxfi.Campaign(fn, params, x, None, plan) for fn in (before, after))
    _refused(tmp_path, a, b, "program")


def test_the_same_campaign_built_twice_has_the_same_identity():
    def outcome(golden, faulty, labels):
        return {"spread": float(np.ptp(faulty))}

    a = _sign_campaign(outcomes=[outcome])
    b = _sign_campaign(outcomes=[outcome])
    assert a.config == b.config and Store.identity(a.config) == Store.identity(b.config)


def test_edited_outcome_functions_are_other_campaigns(tmp_path):
    src = "def gap(golden, faulty, labels):\n    return {'gap': float(np.abs(faulty - golden).{})}\n"
    old, new = (_exec(src.replace("{}", f), "gap") for f in ("max()", "sum()"))
    message = _refused(tmp_path, _sign_campaign(outcomes=[old]), _sign_campaign(outcomes=[new]),
                       "outcome_code")
    assert "user_code.gap" in message
    scale = 2.0
    closure = _exec("def make(s):\n    def d(g, f, l):\n        return {'d': float(s)}\n"
                    "    return d\n", "make")
    assert _sign_campaign(outcomes=[closure(scale)]).config != \
        _sign_campaign(outcomes=[closure(scale + 1)]).config


def test_edited_custom_fault_functions_are_other_campaigns(tmp_path):
    src = "def fault(key, values):\n    return {}\n"
    old, new = (_exec(src.format(body), "fault") for body in ("-values", "values * 2"))
    a, b = (_sign_campaign(jaxfi.Plan(jaxfi.Params(), jaxfi.Custom(fn))) for fn in (old, new))
    _refused(tmp_path, a, b, "plans")


def test_identity_is_stable_across_processes():
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_campaign; "
            "from jaxfi._src.store import Store; "
            "print(Store.identity(test_campaign.mlp_campaign().config))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    sys.path.insert(0, str(Path(__file__).parent))
    import test_campaign
    assert out.stdout.strip().splitlines()[-1] == Store.identity(test_campaign.mlp_campaign().config)


# ----------------------------------------------------- 2. chunks bound to their campaign


def _columns(start, stop):
    return {"sdc": np.arange(start, stop) % 2 == 0}


def test_chunks_without_a_manifest_are_refused(tmp_path):
    path = tmp_path / "s"
    Store(path, {"seed": 0}).write_chunk(0, 4, _columns(0, 4))
    (path / "manifest.json").unlink()
    for config in ({"seed": 1}, {"seed": 0}):
        with pytest.raises(ValueError, match="no manifest.json.*new store"):
            Store(path, config)
    assert not (path / "manifest.json").exists()  # nothing written, nothing lost
    assert len(list((path / "chunks").glob("*.npz"))) == 1


def test_a_chunk_copied_from_another_campaign_is_refused(tmp_path):
    ours, theirs = Store(tmp_path / "a", {"seed": 0}), Store(tmp_path / "b", {"seed": 1})
    ours.write_chunk(0, 4, _columns(0, 4))
    foreign = theirs.write_chunk(4, 8, _columns(4, 8))
    copied = shutil.copy(foreign, ours.path / "chunks")
    with pytest.raises(store_lib.ForeignChunkError, match="another campaign.*quarantine") as err:
        ours.load_arrays()
    assert isinstance(err.value, CorruptChunkError) and err.value.path == Path(copied)
    with pytest.raises(store_lib.ForeignChunkError):
        ours.load_arrays(verify=False)
    assert [p.path for p in ours.verify()] == [Path(copied)]
    ours.quarantine(copied)
    assert list(ours.load_arrays()["trial"]) == [0, 1, 2, 3]


def test_a_campaign_refuses_a_chunk_of_another_seed(tmp_path):
    a, b = _sign_campaign(seed=1), _sign_campaign(seed=2)
    a.run(trials=4, executor="loop", chunk_size=4, store=tmp_path / "a", quiet=True)
    Store(tmp_path / "b", b.config)
    shutil.copy(next((tmp_path / "a" / "chunks").glob("*.npz")), tmp_path / "b" / "chunks")
    with pytest.raises(store_lib.ForeignChunkError, match="quarantine"):
        b.run(trials=4, executor="loop", store=tmp_path / "b", quiet=True)


def _race(path: Path) -> dict[int, Store | ValueError]:
    """Two threads create a store at ``path`` at once, with seeds 0 and 1."""
    barrier, outcome = threading.Barrier(2), {}

    def create(seed: int) -> None:
        barrier.wait()
        try:
            outcome[seed] = Store(path, {"seed": seed})
        except ValueError as e:
            outcome[seed] = e

    threads = [threading.Thread(target=create, args=(seed,)) for seed in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcome


def test_concurrent_creators_with_different_configs_never_mix(tmp_path):
    for round_ in range(8):
        outcome = _race(tmp_path / f"s{round_}")
        won = [s for s, o in outcome.items() if isinstance(o, Store)]
        assert len(won) == 1, outcome
        lost = outcome[1 - won[0]]
        assert isinstance(lost, ValueError) and "different config" in str(lost)
        assert Store(tmp_path / f"s{round_}", {"seed": won[0]}).config == {"seed": won[0]}


def test_loading_a_missing_store_is_an_error(tmp_path):
    c = _sign_campaign()
    with pytest.raises(FileNotFoundError, match="typo"):
        c.load(tmp_path / "typo")
    assert not (tmp_path / "typo").exists()


# --------------------------------------------------------- 3. every valid plan runs


@pytest.mark.parametrize("plan", [
    jaxfi.Plan(jaxfi.Params("b"), jaxfi.Zero(), value_rate=0.1),
    jaxfi.Plan(jaxfi.Params("b"), jaxfi.Zero(), value_rate=1.0),
    jaxfi.Plan(jaxfi.Params("b"), jaxfi.BitFlip(), ber=1.0),
], ids=["value_rate=0.1", "value_rate=1", "ber=1"])
def test_caps_never_exceed_the_population(plan):
    params = {"b": jnp.arange(1, 11, dtype=jnp.float32)}
    pop = jaxfi.population_of(params, plan)
    assert pop.cap <= pop.total
    faulty, record = jax.jit(jaxfi.inject, static_argnums=2)(jax.random.key(0), params, plan)
    assert not bool(record.overflow)
    if plan.ber == 1.0:  # every bit flips: the bitwise complement
        assert np.array_equal(np.asarray(faulty["b"]).view(np.uint32),
                              ~np.asarray(params["b"]).view(np.uint32))
    if plan.value_rate == 1.0:
        assert int(record.count) == 10 and not np.asarray(faulty["b"]).any()


def test_a_dense_rate_over_a_large_population_runs():
    params = {"b": jnp.ones(70_000, jnp.float32)}  # over the old 65,536-element dense limit
    plan = jaxfi.Plan(jaxfi.Params("b"), jaxfi.Zero(), value_rate=0.5)
    faulty, record = jax.jit(jaxfi.inject, static_argnums=2)(jax.random.key(0), params, plan)
    hits = int(record.count)
    assert 34_000 < hits < 36_000 and not bool(record.overflow)  # mean 35,000, sd 132
    assert int((np.asarray(faulty["b"]) == 0).sum()) == hits  # distinct values


def test_count_zero_gives_zero_fault_trials():
    r = _sign_campaign(jaxfi.Plan(jaxfi.Params(), count=0)).run(trials=3, executor="loop",
                                                                quiet=True)
    t = r.table
    assert (t["faults"] == 0).all() and t["masked"].all() and (t["site"] == "none").all()
    assert (t["first_bit"] == -1).all() and not t["overflow"].any()


# -------------------------------------------------------------- 4. no silent float32


@pytest.mark.parametrize("op", [jaxfi.flip_bits, jaxfi.set_bits, jaxfi.clear_bits])
@pytest.mark.parametrize("bit", [3, 62])
def test_bit_operations_refuse_float64_without_x64(op, bit):
    assert not jax.config.jax_enable_x64
    with pytest.raises(ValueError, match="float64 needs 64-bit JAX"):
        op(np.ones(2, np.float64), bit)


def test_a_campaign_refuses_64_bit_arrays_without_x64():
    with pytest.raises(ValueError, match=r"params\['w'\].*float64 needs 64-bit JAX"):
        jaxfi.Campaign(sign_model, {"w": np.float64(1.5)}, _inputs(), None,
                       jaxfi.Plan(jaxfi.Params()))
    with pytest.raises(ValueError, match="inputs.*int64 needs 64-bit JAX"):
        jaxfi.Campaign(sign_model, {"w": jnp.float32(1.5)}, np.arange(BATCH), None,
                       jaxfi.Plan(jaxfi.Params()))


# ------------------------------------------------------- 5. errors that show the cause


def test_differences_show_where_long_values_differ():
    stem = "Plan(sites=Params(pattern=None, exclude=None), fault=BitFlip(bits='all', n=1), "
    old, new = stem + "count=None, ber=0.0003, max_faults=None)", stem + "count=None, ber=0.001, max_faults=None)"
    (line,) = differences({"plans": [old]}, {"plans": [new]})
    assert "ber=0.0003" in line and "ber=0.001" in line


def test_a_changed_evaluation_batch_names_the_inputs(tmp_path):
    message = _refused(tmp_path, _sign_campaign(), _sign_campaign(n=2 * BATCH), "inputs")
    assert f"float32[{BATCH}]" in message and f"float32[{2 * BATCH}]" in message


@pytest.mark.parametrize("kwargs,error,field", [
    ({"ber": True}, TypeError, "ber"),
    ({"value_rate": False}, TypeError, "value_rate"),
    ({"ber": "0.1"}, TypeError, "ber"),
    ({"ber": float("nan")}, ValueError, "ber"),
    ({"ber": 1e-3, "max_faults": 1.5}, TypeError, "max_faults"),
    ({"ber": 1e-3, "max_faults": True}, TypeError, "max_faults"),
    ({"count": True}, TypeError, "count"),
    ({"count": 2.0}, TypeError, "count"),
    ({"count": 2, "max_faults": 3}, ValueError, "max_faults"),
])
def test_plan_refuses_bad_numbers_naming_the_field(kwargs, error, field):
    with pytest.raises(error, match=field):
        jaxfi.Plan(jaxfi.Params(), **kwargs)


def test_plan_takes_numpy_scalars_as_numbers():
    p = jaxfi.Plan(jaxfi.Params(), ber=np.float32(1e-3), max_faults=np.int64(4))
    assert type(p.ber) is float and type(p.max_faults) is int
    assert p.ber == float(np.float32(1e-3)) and p.max_faults == 4
    assert type(jaxfi.Plan(jaxfi.Params(), count=np.int32(2)).count) is int


def test_labels_out_of_range_are_refused():
    with pytest.raises(ValueError, match=r"labels.*\[0, 2\).*99"):
        jaxfi.Campaign(sign_model, {"w": jnp.float32(1.5)}, _inputs(),
                       np.full(BATCH, 99), jaxfi.Plan(jaxfi.Params()))


def test_huge_indices_and_seeds_are_refused():
    c = _sign_campaign()
    with pytest.raises(ValueError, match="index"):
        c.replay(10**12)
    for seed in (2**64, 2**32, -1):
        with pytest.raises(ValueError, match="seed"):
            _sign_campaign(seed=seed)


def test_truncated_trials_warn_and_show_in_the_summary():
    c = _sign_campaign(jaxfi.Plan(jaxfi.Params(), ber=0.5, max_faults=1))
    with pytest.warns(UserWarning, match="3 of 3 trials.*max_faults"):
        r = c.run(trials=3, executor="loop", quiet=True)
    assert r.table["overflow"].all()
    assert (r.summary()["overflow"] == 3).all()
