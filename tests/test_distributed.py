"""Campaigns over several processes: JAX's distributed runtime on 127.0.0.1, CPU, gloo.

The tests start two worker processes at a time (``_worker`` in a fresh Python,
this module imported by name so that the model's name matches) and compare
what they return with the campaign run here, in one process.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from absl import flags

import jaxfi
from jaxfi import Store
from jaxfi._src.distributed import Layout
from jaxfi.executors import same_bits

PACE = "JAXFI_TEST_PACE"  # seconds each trial's outcome sleeps, to slow a worker down
FAIL = "JAXFI_TEST_FAIL"  # set: the outcome raises on the first trial whose output changed
TRIALS, CHUNK = 150, 16   # 150 is no multiple of 16: the last chunk is short
WAIT_S = 120


def mlp(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return h @ params["w2"]


def deviation(golden, faulty, labels):
    """A float64 custom outcome (it must cross processes unrounded); obeys PACE and FAIL."""
    time.sleep(float(os.environ.get(PACE, 0)))
    if os.environ.get(FAIL) and not np.array_equal(faulty, golden):
        raise ArithmeticError("injected failure")
    return {"l1": float(np.abs(faulty.astype(np.float64) - golden).sum())}


def make_campaign(seed: int = 5) -> jaxfi.Campaign:
    k = jax.random.split(jax.random.key(1), 4)
    params = {"w1": jax.random.normal(k[0], (6, 16)), "b1": jax.random.normal(k[1], (16,)),
              "w2": jax.random.normal(k[2], (16, 4))}
    x = jax.random.normal(k[3], (24, 6))
    labels = np.asarray(jnp.argmax(mlp(params, x), axis=1))
    plan = jaxfi.Plan(jaxfi.Params(), jaxfi.BitFlip())  # one fault: compiles fastest
    return jaxfi.Campaign(mlp, params, x, labels, plan, seed=seed, outcomes=[deviation])


# ------------------------------------------------------------------ workers


def _worker(text: str) -> None:
    """One process of a two-process campaign, as the JSON ``text`` says; pickles its result."""
    spec = json.loads(text)
    os.environ[PACE] = str(spec.get("pace", 0))
    os.environ[FAIL] = "1" if spec.get("fail") else ""
    jaxfi.distributed.initialize(f"127.0.0.1:{spec['port']}", spec["processes"], spec["id"],
                                 initialization_timeout=60, shutdown_timeout_seconds=30)
    result = make_campaign(spec.get("seed", 5)).run(
        trials=TRIALS, executor=spec.get("executor", "loop"), chunk_size=spec.get("chunk", CHUNK),
        store=spec.get("store"), quiet=True)
    with open(spec["out"], "wb") as f:
        pickle.dump({"table": result.table, "records": result.records,
                     "devices": len(jax.devices()), "processes": jax.process_count()}, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp: Path, devices: int, **spec) -> list[subprocess.Popen]:
    """Two workers of one campaign, with ``devices`` CPU devices each; a tuple is per worker."""
    port = _free_port()
    child_env = dict(os.environ, JAX_PLATFORMS="cpu",
                     XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    procs = []
    for i in range(2):
        worker = {"port": port, "processes": 2, "id": i, "out": str(tmp / f"out{i}.pkl"),
                  **{k: (v[i] if isinstance(v, tuple) else v) for k, v in spec.items()}}
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import "
                f"test_distributed; test_distributed._worker({json.dumps(worker)!r})")
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=child_env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    """Each worker's exit code and stderr; any worker still running after WAIT_S is killed."""
    deadline, done = time.monotonic() + WAIT_S, []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a worker ran for more than {WAIT_S} s")
        done.append((p.returncode, err))
    return done


def _run(tmp: Path, devices: int, **spec) -> list[dict]:
    """Both workers' results, after checking they exited cleanly."""
    for code, err in _finish(_start(tmp, devices, **spec)):
        assert code == 0, err[-3000:]
    return [pickle.loads((tmp / f"out{i}.pkl").read_bytes()) for i in range(2)]


# -------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def campaign():
    return make_campaign()


@pytest.fixture(scope="module")
def reference(campaign):
    return campaign.run(trials=TRIALS, executor="loop", chunk_size=64, quiet=True)


def assert_same(got: dict, want: jaxfi.Result) -> None:
    pd.testing.assert_frame_equal(got["table"], want.table, check_exact=True)
    for col in want.table:
        if want.table[col].dtype.kind in "biuf":
            got_bytes = got["table"][col].to_numpy().tobytes()
            assert got_bytes == want.table[col].to_numpy().tobytes(), col
    assert same_bits(got["records"], want.records)


def _ranges(store: Path) -> set[tuple[int, int]]:
    return {(int(p.name[:12]), int(p.name[13:25])) for p in (store / "chunks").glob("*.npz")}


@pytest.mark.parametrize("devices,executor", [(1, "loop"), (2, "map")])
def test_two_processes_give_the_single_process_table(tmp_path, campaign, reference, devices,
                                                     executor):
    store = tmp_path / "store"
    results = _run(tmp_path, devices, store=str(store), executor=executor)
    for got in results:  # every process has the whole table
        assert (got["processes"], got["devices"]) == (2, 2 * devices)
        assert list(got["table"]["trial"]) == list(range(TRIALS))
        assert_same(got, reference)
    layout = Layout(0, (devices, devices), CHUNK)
    chunks = [(a, min(a + CHUNK, TRIALS)) for a in range(0, TRIALS, CHUNK)]
    assert _ranges(store) == {layout.share(a, b, p) for a, b in chunks for p in range(2)}
    stored = campaign.load(store)
    assert_same({"table": stored.table, "records": stored.records}, reference)


def test_a_killed_process_is_resumed_without_losing_or_repeating_a_trial(
        tmp_path, campaign, reference):
    store = tmp_path / "store"
    # Process 0 is slow: once process 1 has stored its share of the second
    # chunk, process 0 is still computing its own, and dies with it unstored.
    procs = _start(tmp_path, 1, pace=(0.1, 0), store=str(store))
    layout = Layout(1, (1, 1), CHUNK)
    a, b = layout.share(CHUNK, 2 * CHUNK)
    ahead = store / "chunks" / f"{a:012d}-{b:012d}.npz"
    deadline = time.monotonic() + WAIT_S
    while not ahead.exists():
        dead = [p for p in procs if p.poll() is not None]
        assert not dead, dead[0].stderr.read()[-3000:]
        assert time.monotonic() < deadline, "process 1 never stored its second share"
        time.sleep(0.01)
    procs[0].send_signal(signal.SIGKILL)
    time.sleep(0.3)  # process 1 is left waiting for process 0; it goes too
    procs[1].send_signal(signal.SIGKILL)
    _finish(procs)
    before = _ranges(store)
    assert layout.share(0, CHUNK, 0) in before and layout.share(CHUNK, 2 * CHUNK, 0) not in before
    done = sum(b - a for a, b in before)

    results = _run(tmp_path, 1, store=str(store), executor="map", chunk=12)
    for got in results:
        assert_same(got, reference)
    new = _ranges(store) - before
    assert sum(b - a for a, b in new) == TRIALS - done  # each missing trial computed once
    assert list(Store(store, campaign.config).completed()) == list(range(TRIALS))


def test_processes_that_disagree_on_the_campaign_get_a_clear_error(tmp_path):
    for code, err in _finish(_start(tmp_path, 1, seed=(5, 6))):
        assert code != 0
        assert "processes disagree on the campaign configuration" in err, err[-3000:]
        assert "campaign.seed: 5 -> 6" in err, err[-3000:]


def test_a_process_that_fails_stops_the_others(tmp_path):
    (_, err0), (code, err1) = _finish(_start(tmp_path, 1, fail=(False, True)))
    assert code != 0 and "ArithmeticError: injected failure" in err1, err1[-3000:]
    assert "RuntimeError: process(es) [1] failed on trials [" in err0, err0[-3000:]


def test_initialize_is_a_no_op_for_one_process(monkeypatch):
    for cluster_variable in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri",
                             "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(cluster_variable, raising=False)
    jaxfi.distributed.initialize()
    jaxfi.distributed.initialize(num_processes=1)
    assert not jax.distributed.is_initialized()
    with pytest.raises(ValueError, match="process_id must be 0"):
        jaxfi.distributed.initialize(num_processes=1, process_id=1)


def test_flags_are_defined_once_and_read():
    values = flags.FlagValues()
    jaxfi.distributed.define_flags(values)
    jaxfi.distributed.define_flags(values)
    values(["prog", "--num_processes=1", "--process_id=0"])
    assert (values.coordinator_address, values.num_processes, values.process_id) == (None, 1, 0)
    jaxfi.distributed.initialize_from_flags(values)
    assert not jax.distributed.is_initialized()

