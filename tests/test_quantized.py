"""Tests for jaxfi.models.quantized, the int8 study subject and the quantized experiment script."""

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import jaxfi
from jaxfi import models, study
from jaxfi.models import quantized
from jaxfi.study import subjects as subjects_lib

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny():
    """A small LeNet-5 on 12x12 inputs with random weights (one all-zero channel), its inputs and params."""
    model = models.LeNet5(num_classes=10)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 12, 12, 1)))
    rng = np.random.default_rng(3)
    variables = jax.tree.map(lambda leaf: 0.3 * rng.standard_normal(leaf.shape, dtype=np.float32), abstract)
    variables["params"]["fc2"]["kernel"][:, 5] = 0.0
    apply_fn, params = models.bind_inference(model, variables)
    x = jax.random.normal(jax.random.key(4), (16, 12, 12, 1))
    return apply_fn, params, x


def test_quantize_stores_int8_kernels_with_per_channel_scales_within_half_a_step(tiny):
    _, params, _ = tiny
    qparams = quantized.quantize(params)
    assert set(qparams["params"]["conv1"]) == {"kernel_q", "kernel_scale", "bias"}
    for name, layer in params["params"].items():
        kernel = np.asarray(layer["kernel"])
        q, scale = qparams["params"][name]["kernel_q"], qparams["params"][name]["kernel_scale"]
        assert q.dtype == np.int8 and q.shape == kernel.shape
        assert scale.dtype == np.float32 and scale.shape == kernel.shape[-1:]
        assert np.abs(q.astype(int)).max() <= 127
        peak = np.abs(kernel).reshape(-1, kernel.shape[-1]).max(axis=0)
        # Each channel's largest weight maps to +-127 exactly; a zero channel keeps scale 1.
        np.testing.assert_array_equal(np.abs(q.astype(int)).reshape(-1, q.shape[-1]).max(axis=0),
                                      np.where(peak > 0, 127, 0))
        np.testing.assert_array_equal(scale[peak == 0], 1.0)
        restored = np.asarray(quantized.dequantize(qparams)["params"][name]["kernel"])
        assert restored.dtype == np.float32
        # Round to nearest: at most half a quantization step off (plus float32 rounding).
        assert (np.abs(restored - kernel) <= scale / 2 * (1 + 1e-6)).all()
        np.testing.assert_array_equal(qparams["params"][name]["bias"], layer["bias"])


def test_int8_bit_flip_changes_exactly_one_dequantized_weight_by_the_flipped_step(tiny):
    _, params, _ = tiny
    qparams = jax.tree.map(jnp.asarray, quantized.quantize(params))
    plan = jaxfi.Plan(jaxfi.Params(r"kernel_q$"), jaxfi.BitFlip(), count=4)
    sites = jaxfi.population_of(qparams, plan).sites
    assert {s.format.dtype for s in sites} == {np.dtype(np.int8)}
    clean = quantized.dequantize(qparams)
    for trial in range(3):
        bad_q, record = jax.jit(jaxfi.inject, static_argnums=2)(jax.random.key(trial), qparams, plan)
        bad = quantized.dequantize(bad_q)
        faults = jaxfi.record_table(record, sites)
        assert len(faults) == 4
        expected = jax.tree.map(lambda x: np.array(x, copy=True), clean)
        for _, f in faults.iterrows():
            layer = f["site"].split("/")[1]
            q = np.asarray(qparams["params"][layer]["kernel_q"])[f["index"]]
            flipped = (q.view(np.uint8) ^ np.uint8(1 << f["bit"])).view(np.int8)
            scale = np.asarray(qparams["params"][layer]["kernel_scale"])[f["index"][-1]]
            expected["params"][layer]["kernel"][f["index"]] = np.float32(flipped) * scale
            assert f["before"] == q and f["after"] == flipped
        # Bitwise: the faulted weights are (flipped int) * scale, every other value is untouched.
        for got, want in zip(jax.tree.leaves(bad), jax.tree.leaves(expected), strict=True):
            np.testing.assert_array_equal(np.asarray(got).view(np.uint32), want.view(np.uint32))


def test_int8_bit_7_is_the_twos_complement_sign():
    q = np.array([[0, 5, -128, 127]], np.int8).reshape(1, 4)
    flipped = jaxfi.flip_bits(jnp.asarray(q), jnp.full(q.shape, 1 << 7, jnp.uint8))
    np.testing.assert_array_equal(np.asarray(flipped), np.array([[-128, -123, 0, -1]], np.int8))


def test_campaign_on_the_int8_model_faults_only_the_selected_storage(tiny):
    apply_fn, params, x = tiny
    qparams = jax.tree.map(jnp.asarray, quantized.quantize(params))
    apply_q = quantized.dequantized_apply(apply_fn)
    exact, approx = np.asarray(apply_fn(params, x)), np.asarray(apply_q(qparams, x))
    # Rounding each weight to 1/254 of its channel's range moves the logits by a few percent at most.
    assert 0 < np.linalg.norm(approx - exact) < 0.05 * np.linalg.norm(exact)
    for pattern, dtype in ((r"kernel_q$", np.int8), (r"/bias$", np.float32)):
        plan = jaxfi.Plan(jaxfi.Params(pattern), jaxfi.BitFlip(), ber=0.01)
        campaign = jaxfi.Campaign(apply_q, qparams, x, None, plan, seed=1)
        result = campaign.run(6, executor="loop", quiet=True)
        faults = jaxfi.record_table(result.records[0], campaign.sites[0])
        assert len(faults) == result.table["faults"].sum() > 0
        assert faults["site"].str.contains(pattern.rstrip("$")).all()
        assert {s.format.dtype for s in campaign.sites[0]} == {np.dtype(dtype)}
        assert faults["bit"].between(0, 8 * np.dtype(dtype).itemsize - 1).all()


def test_quantize_refuses_bad_kernels_and_quantized_input(tiny):
    with pytest.raises(ValueError, match="floating array with at least 2 dimensions"):
        quantized.quantize({"dense": {"kernel": np.ones((3, 2), np.int32)}})
    with pytest.raises(ValueError, match="floating array with at least 2 dimensions"):
        quantized.quantize({"dense": {"kernel": np.ones(3, np.float32)}})
    with pytest.raises(ValueError, match="already hold 'kernel_q'"):
        quantized.quantize(quantized.quantize(tiny[1]))
    with pytest.raises(ValueError, match="needs both 'kernel_q' and 'kernel_scale'"):
        quantized.dequantize({"dense": {"kernel_q": np.ones((2, 2), np.int8)}})


def test_quantized_subject_reports_both_accuracies(tiny):
    apply_fn, params, x = tiny
    labels = np.array(jnp.argmax(apply_fn(params, x), -1))
    labels[:4] = (labels[:4] + 1) % 10
    subject = study.Subject("lenet5", apply_fn, params, np.asarray(x), labels, {"source": "random"})
    q = subjects_lib.quantized(subject)
    assert (q.dtype, q.label) == ("int8", "lenet5-int8")
    assert q.info["eval_accuracy_float32"] == 0.75
    expected = np.mean(np.argmax(q.apply_fn(q.params, x), -1) == labels)
    assert q.info["eval_accuracy_int8"] == expected
    assert q.info["source"] == "int8 quantization of random"


def test_quantized_script_writes_both_sweeps(trained_workdir, tmp_path):
    shutil.copytree(trained_workdir / "models", tmp_path / "models")  # the session's mlp, one epoch
    command = [sys.executable, str(REPO / "experiments" / "quantized.py"), f"--workdir={tmp_path}",
               "--models=mlp", "--trials_per_bit=3", "--rates=1e-2", "--trials=4", "--max_trials=4",
               "--eval_size=16", "--executor=loop", "--epochs=1"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = pd.read_csv(tmp_path / "quantized.csv")
    keys = ["sweep", "model", "dtype", "bit", "rate", "eval_size", "seed", "population_bits"]
    assert list(table.columns) == keys + list(study.summary_columns())
    bits = table[table["sweep"] == "bit"]
    for dtype, width in (("float32", 32), ("int8", 8)):
        rows = bits[bits["dtype"] == dtype]
        assert set(rows["bit"]) <= set(range(width)) and rows["trials"].sum() == 3 * width
        flip = table[(table["sweep"] == "flip") & (table["dtype"] == dtype)]
        assert flip["trials"].tolist() == [3 * width]
    rates = table[table["sweep"] == "rate"]
    assert sorted(rates["dtype"]) == ["float32", "int8"] and (rates["rate"] == 1e-2).all()
    # The same kernels, 32 against 8 bits per weight.
    population = rates.set_index("dtype")["population_bits"]
    assert population["float32"] == 4 * population["int8"]
    assert (table.loc[table["dtype"] == "int8", "due"] == 0).all()
    # int8 and float32 share trial keys: their difference is paired, trial by trial.
    paired = pd.read_csv(tmp_path / "quantized_paired.csv")
    assert paired[["model", "rate", "trials"]].values.tolist() == [["mlp", 1e-2, 4]]
    errors = rates.set_index("dtype")["error"]
    assert paired["diff"].iloc[0] == pytest.approx(errors["int8"] - errors["float32"])
    assert paired["diff_lo"].iloc[0] <= paired["diff"].iloc[0] <= paired["diff_hi"].iloc[0]
    meta = json.loads((tmp_path / "quantized.json").read_text())
    assert {"eval_accuracy_float32", "eval_accuracy_int8"} <= set(meta["models"]["mlp-int8"])
    assert (tmp_path / "quantized.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
