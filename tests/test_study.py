"""Tests for jaxfi.study and the study scripts in experiments/ (resilience, bit and layer sensitivity)."""

import dataclasses
import functools
import json
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import jaxfi
from jaxfi import models, study

REPO = pathlib.Path(__file__).resolve().parent.parent
MODELS = ("mlp", "lenet5")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def workdir(trained_workdir):
    """A workdir whose models/ holds mlp and lenet5 trained for one epoch, shared by every test."""
    return trained_workdir


@pytest.fixture(scope="module")
def subjects(workdir):
    return {s.name: s for s in study.load_subjects(MODELS, workdir, eval_size=64, epochs=1, log=None)}


def run_script(name, workdir, *flags):
    command = [sys.executable, str(REPO / "experiments" / f"{name}.py"), f"--workdir={workdir}",
               "--epochs=1", "--executor=loop", *flags]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000


def chunks(root):
    return {p: p.stat().st_mtime_ns for p in sorted(root.rglob("chunks/*.npz"))}


# ---------------------------------------------------------------- scripts


def test_resilience_script_writes_documented_outputs_and_resumes(workdir):
    flags = ("--models=mlp", "--trials=8", "--max_trials=8", "--rates=1e-7,1e-3", "--eval_size=32",
             "--chunk_size=4")
    run_script("resilience", workdir, *flags)
    stem = workdir / "resilience-weights-rate"
    table = pd.read_csv(f"{stem}.csv")
    keys = ["model", "site", "mode", "rate", "count", "eval_size", "seed", "population_bits"]
    assert list(table.columns) == keys + list(study.summary_columns())
    assert sorted(zip(table["model"], table["rate"])) == [("mlp", 1e-7), ("mlp", 1e-3)]
    assert (table["trials"] == 8).all() and (table["overflow"] == 0).all()
    meta = json.loads(pathlib.Path(f"{stem}.json").read_text())
    assert {"flags", "models", "points", "wall_seconds", "versions"} <= set(meta)
    assert [p["computed"] for p in meta["points"]] == [8, 8]
    assert_png(pathlib.Path(f"{stem}.png"))

    # An interruption after the first chunk of the second point: its later chunks are missing.
    stored = chunks(workdir / "campaigns" / "resilience")
    lost = [p for p in stored if "ber0.001" in str(p)][1:]
    for path in lost:
        path.unlink()
    run_script("resilience", workdir, *flags)
    meta = json.loads(pathlib.Path(f"{stem}.json").read_text())
    assert [p["computed"] for p in meta["points"]] == [0, 4 * len(lost)]
    kept = {p: t for p, t in stored.items() if p not in lost}
    assert {p: t for p, t in chunks(workdir / "campaigns" / "resilience").items() if p in kept} == kept
    pd.testing.assert_frame_equal(pd.read_csv(f"{stem}.csv"), table)


def test_bit_script_finds_the_exponent_top_bit_most_harmful(workdir):
    run_script("bit_sensitivity", workdir, "--models=mlp,lenet5", "--dtypes=float32,bfloat16",
               "--trials_per_bit=20", "--eval_size=32")
    table = pd.read_csv(workdir / "bit_sensitivity.csv")
    for (model, dtype), rows in table.groupby(["model", "dtype"]):
        width = jaxfi.format_of(dtype).width
        assert sorted(rows["bit"]) == list(range(width)), (model, dtype)
        assert rows["trials"].sum() == 20 * width
        top = max(jaxfi.format_of(dtype).exponent)
        worst = rows.set_index("bit")["harm_trial"]
        others = worst.drop(top)
        assert worst.idxmax() == top, (model, dtype, worst.sort_values().tail(3))
        # Its interval clears every other bit's rate: the ranking is not luck.
        assert rows.set_index("bit").loc[top, "harm_trial_lo"] > others.max(), (model, dtype)
    assert set(table["model"]) == set(MODELS)
    assert set(table.loc[table["bit"] == 31, "field"]) == {"sign"}
    assert_png(workdir / "bit_sensitivity.png")
    assert json.loads((workdir / "bit_sensitivity.json").read_text())["flags"]["dtypes"] == ["float32", "bfloat16"]


def test_layer_script_writes_one_row_per_leaf_in_program_order(workdir, subjects):
    run_script("layer_sensitivity", workdir, "--models=mlp", "--trials=8", "--eval_size=32")
    table = pd.read_csv(workdir / "layer_sensitivity.csv")
    assert list(table["leaf"]) == [leaf.name for leaf in study.weight_leaves(subjects["mlp"])]
    assert table["share"].sum() == pytest.approx(1.0)
    assert np.allclose(table["sdc_weighted"], table["sdc_trial"] * table["share"])
    assert (table["trials"] == 8).all() and (table["faults_mean"] == 1).all()
    assert_png(workdir / "layer_sensitivity.png")


def test_weight_leaves_follow_the_program_not_the_alphabet(subjects):
    model = models.get_model("resnet8")
    # Values do not matter: leaves are ordered by tracing the model, not by running it.
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            jnp.zeros((1, 28, 28, 1)))
    apply_fn, params = models.bind_inference(model, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))
    resnet = dataclasses.replace(subjects["mlp"], name="resnet8", apply_fn=apply_fn, params=params)
    names = [leaf.name.removeprefix("params/") for leaf in study.weight_leaves(resnet)]
    assert names[:4] == ["conv1/kernel", "bn1/bias", "bn1/scale", "layer1_0/conv1/kernel"]
    assert names[-2:] == ["fc/bias", "fc/kernel"] and len(names) == 29
    assert len(study.weight_leaves(resnet, batch_stats=True)) == 29 + 2 * 9


# ----------------------------------------------------- scientific sanity


class _Compiles:
    """Counts XLA backend compiles while active."""

    def __enter__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def _listen(self, event, duration, **kwargs):
        self.count += event == "/jax/core/compile/backend_compile_duration"

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)


def test_a_rate_sweep_is_one_program_paired_and_nested(subjects):
    """The lowest and highest default rates as one sweep per model: the second point compiles
    nothing, its trials' faults contain the first's, the low point's interval covers golden
    with a positive width, and the paired difference of the two points excludes 0."""
    rates = (min(study.DEFAULT_RATES), max(study.DEFAULT_RATES))
    points = [study.Point(study.WEIGHTS, rate=r) for r in rates]
    for s in subjects.values():
        campaign = jaxfi.Campaign(s.apply_fn, s.params, s.images, s.labels, study.plans_for(s, points), seed=0,
                                  outcomes=(study.logit_deviation,))
        low = campaign.run(16, point=0, executor="loop", quiet=True)
        with _Compiles() as compiles:
            high = campaign.run(16, point=1, executor="loop", quiet=True)
        assert compiles.count == 0, s.name
        row = study.trial_figures(low).iloc[0]
        assert row["error_lo"] <= row["golden_error"] <= row["error_hi"] and row["error_hi"] > row["error_lo"]
        high_row = study.trial_figures(high).iloc[0]
        assert high_row["error_lo"] > high_row["golden_error"] + 0.5 and high_row["harm_trial"] == 1.0
        faults = [set(zip(r.faults()["trial"], r.faults()["site"], r.faults()["index"], r.faults()["bit"]))
                  for r in (low, high)]
        assert faults[0] and faults[0] < faults[1], s.name
        diff = jaxfi.stats.paired_interval(1.0 - high.table["accuracy"], 1.0 - low.table["accuracy"])
        assert diff["lo"] > 0.5, (s.name, diff)


def test_activation_and_count_points_place_the_requested_faults(subjects, tmp_path):
    lenet5 = subjects["lenet5"]
    point = study.Point(study.BOTH, count=3)
    plans = study.plans_for(lenet5, point)
    assert [p.kind for p in plans] == ["params", "activations"]
    done = study.run_sweep([study.Job(lenet5, plans, point.label, {})], tmp_path, trials=4, seed=1,
                           executor="loop", log=None)
    assert (done[0].result.table["faults"] == 6).all()
    row = study.trial_figures(done[0].result).iloc[0]
    assert row["trials"] == 4 and row["faults_mean"] == 6


# ------------------------------------------------------------ building blocks


def test_layer_outputs_are_the_leaf_module_outputs(subjects):
    lenet5 = subjects["lenet5"]
    chosen = jaxfi.sites_of(lenet5.apply_fn, jaxfi.Plan(study.layer_outputs(lenet5)),
                            lenet5.params, lenet5.images)
    assert [s.name for s in chosen] == [f"LeNet5/{m}/add:0" for m in ("conv1", "conv2", "fc1", "fc2", "fc3")]


def test_weights_are_the_params_collection_unless_batch_stats():
    variables = {"params": {"bn": {"scale": jnp.ones(3), "bias": jnp.zeros(3)}, "fc": {"kernel": jnp.ones((3, 2))}},
                 "batch_stats": {"bn": {"mean": jnp.zeros(3), "var": jnp.ones(3)}}}
    sites = jaxfi.param_sites(variables)
    names = [s.name for s in study.weight_selector().select(sites)]
    assert names == ["params/bn/bias", "params/bn/scale", "params/fc/kernel"]
    assert len(study.weight_selector(batch_stats=True).select(sites)) == 5


def test_cast_stores_weights_in_the_format_and_keeps_predictions(subjects):
    mlp = subjects["mlp"]
    half = study.cast(mlp, "bfloat16")
    assert half.label == "mlp-bfloat16" and half.dtype == "bfloat16"
    assert {str(x.dtype) for x in jax.tree.leaves(half.params)} == {"bfloat16"}
    agree = np.mean(np.argmax(half.apply_fn(half.params, mlp.images), -1)
                    == np.argmax(mlp.apply_fn(mlp.params, mlp.images), -1))
    assert agree > 0.9
    with pytest.raises(ValueError, match="dtype must be one of"):
        study.cast(mlp, "int8")


@pytest.mark.parametrize("kwargs, message", [
    ({"site": "inputs", "rate": 1e-6}, "site must be one of"),
    ({"site": "weights"}, "exactly one of rate or count"),
    ({"site": "weights", "rate": 1e-6, "count": 1}, "exactly one of rate or count"),
    ({"site": "weights", "rate": 0.0}, "rate must be a bit error rate"),
    ({"site": "weights", "count": 0}, "count must be a positive integer"),
])
def test_bad_points_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        study.Point(**kwargs)


def test_point_labels_name_site_and_amount():
    assert study.Point("weights", rate=1e-6).label == "weights-ber1e-06"
    assert study.Point("both", count=5).label == "both-count5"
    assert study.Point("activations", rate=3e-5).mode == "rate"


def test_missing_torchvision_weights_name_the_files_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"resnet18\.safetensors.*resnet18\.npz"):
        study.load_subjects(["resnet18"], tmp_path, weights=str(tmp_path), eval_size=4)


def test_target_grows_steep_points_to_the_half_width_and_never_stops_on_an_unsupported_sample():
    target = study.Target(half_width=0.03, min_trials=32, max_trials=2048)
    rng = np.random.default_rng(0)
    # Every trial kept the golden error: no zero-width interval, the changed-share bound instead.
    flat = np.full(32, 0.05)
    assert target.interval(flat, 0.05)["method"] == "changed-share bound"
    assert target.interval(flat, 0.05)["half_width"] == pytest.approx((1 - 0.05 ** (1 / 32)) / 2)
    grown = target.next_trials(flat, 0.05, step=32)
    assert grown is not None and grown % 32 == 0 and grown >= 64
    assert target.next_trials(np.full(64, 0.05), 0.05) is None  # 3.0/64 / 2 < 0.03
    steep = rng.choice([0.05, 0.9], size=32)  # sd about 0.43: about (1.96 * 0.43 / 0.03)**2 trials
    grown = target.next_trials(steep, 0.05, step=32)
    assert target.interval(steep, 0.05)["method"] == "t"
    assert grown % 32 == 0 and 700 < grown < 1100
    assert target.next_trials(rng.choice([0.05, 0.9], size=grown), 0.05) in (None, *range(grown + 32, 2049))
    assert target.next_trials(rng.choice([0.05, 0.9], size=2048), 0.05) is None  # the cap
    assert study.half_width(steep) == pytest.approx(jaxfi.stats.mean_interval(steep)["half_width"])
    for bad in ({"half_width": 0.0}, {"min_trials": 1}, {"max_trials": 16}, {"confidence": 1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            study.Target(**bad)


GOLDEN = 0.055
# Per-trial top-1 errors over 128 images, shaped like the study's points: the
# golden error with a rare heavy tail (low rates), a bimodal mid-rate point,
# and many small shifts (where a t interval from few changed trials is skewed).
SHAPES = {
    "tail 3% +20 points": lambda rng, n: GOLDEN + 0.2 * (rng.random(n) < 0.03),
    "bimodal": lambda rng, n: np.where(rng.random(n) < 0.5, GOLDEN,
                                       np.clip(np.round(rng.normal(0.3, 0.1, n) * 128) / 128, 0, 1)),
    "10% shifted 1-3 images": lambda rng, n: GOLDEN + np.where(rng.random(n) < 0.1, rng.integers(1, 4, n) / 128, 0),
}


def _sequential_coverage(shape, target: study.Target, runs: int, interval) -> float:
    """Share of simulated sequential runs whose final interval covers the true mean."""
    truth = SHAPES[shape](np.random.default_rng(99), 2_000_000).mean()
    rng, covered = np.random.default_rng(1), 0
    for _ in range(runs):
        errors = SHAPES[shape](rng, target.max_trials)
        n = target.min_trials
        while (grown := target.next_trials(errors[:n], GOLDEN, step=32)) is not None:
            n = grown
        lo, hi = interval(errors[:n])
        covered += lo <= truth <= hi
    return covered / runs


@pytest.mark.parametrize("shape", list(SHAPES))
def test_sequential_target_covers_at_its_stated_rate(shape):
    """1,500 simulated runs of the sweep's rule (fixed seeds), +-2 points at 95%: coverage >= 93%.

    With 1,500 runs the coverage estimate's standard error is about 0.006, so
    0.93 is three of them below nominal. The rule's own simulations gave
    0.95-0.99 on these shapes (0.89-0.94 with MIN_CHANGED of 1 to 5).
    """
    target = study.Target(half_width=0.02, min_trials=32, max_trials=2048)
    coverage = _sequential_coverage(shape, target, 1500,
                                    lambda e: (target.interval(e, GOLDEN)["lo"], target.interval(e, GOLDEN)["hi"]))
    assert coverage >= 0.93, coverage


class _StudentT(study.Target):
    """The rule before: stop as soon as the Student-t half-width is small enough."""

    def interval(self, errors, golden_error):
        return jaxfi.stats.mean_interval(errors, self.confidence, (0.0, 1.0))


def test_the_former_student_t_rule_does_not_cover():
    """The same simulation with the former rule: zero-width intervals from 32 trials miss the tail."""
    old = _StudentT(half_width=0.02, min_trials=32, max_trials=2048)
    coverage = _sequential_coverage("tail 3% +20 points", old, 500,
                                    lambda e: (old.interval(e, GOLDEN)["lo"], old.interval(e, GOLDEN)["hi"]))
    assert coverage < 0.8, coverage


def test_sequential_sweep_resumes_its_store_and_meets_the_target(subjects, tmp_path):
    mlp = subjects["mlp"]
    point = study.Point(study.WEIGHTS, rate=1e-5)
    job = study.Job(mlp, study.plans_for(mlp, point), point.label, {})
    target = study.Target(half_width=0.1, min_trials=8, max_trials=64)
    done, = study.run_sweep([job], tmp_path, trials=target, seed=0, executor="loop", chunk_size=8, log=None)
    errors = 1.0 - done.result.table["accuracy"].to_numpy()
    assert 8 < len(errors) <= 64 and done.computed == len(errors) and done.executor == "loop"
    golden = 1.0 - done.result.golden.accuracy
    assert len(errors) == 64 or study.half_width(errors, golden_error=golden) <= 0.1
    again, = study.run_sweep([job], tmp_path, trials=target, seed=0, executor="loop", chunk_size=8, log=None)
    assert again.computed == 0 and again.executor == ""
    pd.testing.assert_frame_equal(again.result.table, done.result.table)


# ---------------------------------------------------------------- flags


def test_flag_checks_name_what_is_wrong():
    from jaxfi.study import flags as study_flags

    assert study_flags.check_rates(["1e-6", "0.5"]) == [1e-6, 0.5]
    assert study_flags.check_counts(["1", "20"]) == [1, 20]
    for bad, message in (([], "at least one"), (["x"], "not a number"), (["0"], r"\(0, 1\]"),
                         (["2"], r"\(0, 1\]")):
        with pytest.raises(ValueError, match=message):
            study_flags.check_rates(bad)
    with pytest.raises(ValueError, match="positive integer"):
        study_flags.check_counts(["0"])
    with pytest.raises(ValueError, match=r"unknown model \['vit'\]"):
        study_flags.check_choices(["mlp", "vit"], models.MODELS, "model")
    with pytest.raises(ValueError, match="executor must be one of"):
        study_flags.check_executor("fastest")
    with pytest.raises(ValueError, match=r"--max_trials \(16\) must be at least --trials \(32\)"):
        study_flags.check_target(32, 16, 0.03)
    with pytest.raises(ValueError, match="--half_width must be a fraction"):
        study_flags.check_target(32, 64, 0.0)
    assert study_flags.check_target(32, 64, 0.05) == study.Target(0.05, 32, 64)
    with pytest.raises(ValueError, match="mnist5k has 1000 test images"):
        study_flags.check_eval_size(1001, "mnist5k")
    assert study_flags.check_eval_size(1000, "mnist5k") == 1000


@pytest.mark.parametrize("script, flag, message", [
    ("resilience", "--rates=", "flag --rates=.*at least one bit error rate"),
    ("resilience", "--models=mlp,vit", "flag --models=.*unknown model"),
    ("resilience", "--eval_size=5000", "eval_size=5000.*1000 test images"),
    ("resilience", "--max_trials=16", "max_trials=16.*must be at least --trials"),
    ("fault_aware", "--rates=", "flag --rates=.*at least one bit error rate"),
    ("fault_aware", "--executor=fastest", "flag --executor=fastest"),
    ("bit_sensitivity", "--dtypes=int8", "flag --dtypes=.*unknown dtype"),
])
def test_scripts_refuse_bad_flags_before_training(script, flag, message, tmp_path):
    command = [sys.executable, str(REPO / "experiments" / f"{script}.py"), f"--workdir={tmp_path}", flag]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 1
    assert re.search(message, proc.stderr), proc.stderr[-2000:]
    assert not (tmp_path / "models").exists()


def test_importing_the_study_has_no_side_effects():
    code = ("import sys, jaxfi.study, jaxfi.experiments.resilience; from absl import flags; "
            "print('matplotlib' in sys.modules, 'workdir' in flags.FLAGS)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "False"]
