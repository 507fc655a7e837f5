"""Faults during training: outcome shares by site kind and bit, loss trajectories, a spike detector.

    python experiments/training_faults.py --workdir=/tmp/training_faults

For each --models entry, trains from a fresh initialisation (--seed) for
--steps Adam steps (batch --batch_size, the same batches in every trial) on
the embedded mnist5k, or for "transformer" (the scanned transformer of
``jaxfi.models.transformer``) on sorting 8 digits, and runs one
``jaxfi.TrainingCampaign`` per site kind:
one random bit flip (uniform over all 32 bits of the selected values) at a
step drawn uniformly from the whole run, in

- forward: a value of the forward pass (reshapes and broadcasts left out);
- backward: a value of the backward pass (activation and weight gradients);
- weights: a parameter, kept and trained on from then on;
- optimizer: Adam's first or second moment, or its step count.

Each trial is classified (``jaxfi.classify_training``) as Masked, Immediate
INF/NaN, SlowDegrade or Recovered, with the final test accuracy on --eval_size
test images (the transformer: greedy token accuracy on --eval_size held-out
sequences) as the metric; the transformer needs --executor=loop (the map
executor refuses it: XLA:CPU rounds its hooked backward step differently
inside a loop). A loss or gradient-norm spike detector
(``jaxfi.spike_flags``) is scored on the trials. Writes to --workdir:

- training_faults.csv: one row per trial (model, kind, fault step, site, bit,
  values before/after, final accuracy, outcome, detected);
- training_faults_shares.csv: outcome shares per model and kind, and per
  model, kind and bit field, with 95% Wilson intervals;
- training_faults_paired.csv: per model and pair of site kinds, the paired
  difference of the share of trials that were not masked (trial i of every
  kind starts from the same key), with a 95% ``jaxfi.stats.paired_interval``;
- training_faults_detector.csv: detector recall per outcome and false alarms;
- training_faults.png: loss trajectories per outcome class;
- training_faults.json: flags, golden runs, timings and versions;
- stores/MODEL/KIND/: the campaigns' stores (a rerun resumes them).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

import jaxfi
from jaxfi import data, models, stats
from jaxfi._src.extras import require
from jaxfi.models import transformer
from jaxfi.study import flags as study_flags
from jaxfi.study import report

optax = require("optax", "models")
flags = study_flags.flags

_NAME = "training_faults"
_MODELS = ("mlp", "lenet5", "transformer")
# Values that only move data (the input flatten, bias reshapes and broadcasts) are left out.
_COMPUTED = r"(?!(.*/)?(reshape|broadcast_in_dim|convert_element_type|stop_gradient):)"
KIND_SITES: dict[str, jaxfi.Selector] = {
    "forward": jaxfi.Activations(name="^forward/" + _COMPUTED),
    "backward": jaxfi.Activations(name="^backward/" + _COMPUTED),
    "weights": jaxfi.Params(name="^weights/"),
    "optimizer": jaxfi.Params(name="^optimizer/"),
}
_FIELDS = (("sign", (31,)), ("exponent MSB", (30,)), ("other exponent", range(23, 30)), ("mantissa", range(23)))


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a training campaign needs: loss, start params, optimizer, batches [steps, ...], metric."""

    loss_fn: Any
    params: Any
    optimizer: Any
    batches: tuple[jax.Array, jax.Array]
    metric_fn: Any


def training_setup(model_name: str, *, steps: int, batch_size: int, learning_rate: float, seed: int,
                   eval_size: int) -> Setup:
    """``model_name`` from a fresh init: ``steps`` batches in a fixed order, an accuracy metric, Adam.

    "mlp" and "lenet5" train on mnist5k (softmax cross-entropy, test accuracy
    on ``eval_size`` test images); "transformer" is the scanned transformer of
    ``jaxfi.models.transformer`` on sorting 8 digits (token cross-entropy,
    greedy token accuracy on ``eval_size`` held-out sequences).
    """
    if model_name == "transformer":
        return _transformer_setup(steps=steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                                  eval_size=eval_size)
    train, test = data.load(data.EMBEDDED, "train"), data.load(data.EMBEDDED, "test")
    model = models.get_model(model_name, num_classes=train.num_classes)
    params = models.init_variables(model, train.images.shape[1:], seed)["params"]
    order = np.concatenate([np.random.default_rng((seed, epoch)).permutation(len(train.labels))
                            for epoch in range(-(-steps * batch_size // len(train.labels)))])
    idx = order[:steps * batch_size].reshape(steps, batch_size)
    batches = (jnp.asarray(train.images[idx]), jnp.asarray(train.labels[idx]))
    evaluation = data.eval_subset(test, eval_size, seed)
    ex, ey = jnp.asarray(evaluation.images), jnp.asarray(evaluation.labels)

    def loss_fn(params: Any, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, y = batch
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy(logits, jax.nn.one_hot(y, train.num_classes)).mean()

    def metric_fn(params: Any) -> jax.Array:
        return jnp.mean(jnp.argmax(model.apply({"params": params}, ex), -1) == ey)

    return Setup(loss_fn, params, optax.adam(learning_rate), batches, metric_fn)


def _transformer_setup(*, steps: int, batch_size: int, learning_rate: float, seed: int, eval_size: int) -> Setup:
    config = transformer.Config()
    apply_fn = transformer.bind(config)
    tokens, targets = transformer.sorting_task(steps * batch_size, config, seed=(seed, 1))
    batches = (jnp.asarray(tokens.reshape(steps, batch_size, -1)), jnp.asarray(targets.reshape(steps, batch_size, -1)))
    # Held out: another seed than the training stream's.
    et, ey = (jnp.asarray(a) for a in transformer.sorting_task(eval_size, config, seed=(seed, 2)))

    def loss_fn(params: Any, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, y = batch
        return transformer.cross_entropy(apply_fn({"params": params}, x), y)

    def metric_fn(params: Any) -> jax.Array:
        return jnp.mean(jnp.argmax(apply_fn({"params": params}, et), -1) == ey)

    return Setup(loss_fn, transformer.init(config, seed)["params"], optax.adam(learning_rate), batches, metric_fn)


@dataclasses.dataclass(frozen=True)
class Flags:
    """The holders of this script's flags."""

    workdir: Any
    models: Any
    kinds: Any
    trials: Any
    steps: Any
    batch_size: Any
    learning_rate: Any
    eval_size: Any
    chunk_size: Any
    executor: Any
    seed: Any
    window: Any
    tolerance: Any
    deviation: Any
    detector_factor: Any
    detector_window: Any


def define_flags() -> Flags:
    """Defines the script's flags and their validators."""
    flags.disclaim_key_flags()
    defined = Flags(
        workdir=flags.DEFINE_string("workdir", None, "Output directory.", required=True),
        models=flags.DEFINE_list("models", ["mlp"], f"Models, from {', '.join(_MODELS)}."),
        kinds=flags.DEFINE_list("kinds", list(KIND_SITES), "Site kinds to fault."),
        trials=flags.DEFINE_integer("trials", 160, "Trials per model and site kind.", lower_bound=1),
        steps=flags.DEFINE_integer("steps", 100, "Training steps per trial.", lower_bound=2),
        batch_size=flags.DEFINE_integer("batch_size", 64, "Training batch size.", lower_bound=1),
        learning_rate=flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.", lower_bound=0.0),
        eval_size=flags.DEFINE_integer("eval_size", 1000, "Test images for the final accuracy.", lower_bound=1),
        chunk_size=flags.DEFINE_integer("chunk_size", 16, "Trials per compiled call.", lower_bound=1),
        executor=flags.DEFINE_enum("executor", "map", ["map", "loop"],
                                   "How trials run: map (one program per chunk) or loop (jitted steps)."),
        seed=flags.DEFINE_integer("seed", 0, "Seed of the init, the batch order and the faults."),
        window=flags.DEFINE_integer("window", 5, "Steps after the fault for Immediate INF/NaN.", lower_bound=1),
        tolerance=flags.DEFINE_float("tolerance", 0.01, "Accuracy drop beyond which a run degraded.",
                                     lower_bound=0.0),
        deviation=flags.DEFINE_float("deviation", 0.1, "Relative loss deviation that counts as deviated.",
                                     lower_bound=0.0),
        detector_factor=flags.DEFINE_float("detector_factor", 3.0, "Detector: jump factor over the median.",
                                           lower_bound=1.0),
        detector_window=flags.DEFINE_integer("detector_window", 10, "Detector: history length in steps.",
                                             lower_bound=1))
    study_flags.validate("models", lambda names: study_flags.check_choices(names, _MODELS, "model"))
    study_flags.validate("kinds", lambda names: study_flags.check_choices(names, list(KIND_SITES), "kind"))
    return defined


def run(defined: Flags, argv: list[str]) -> None:
    """Runs the study with the parsed flags (see the module docstring)."""
    study_flags.check_no_arguments(argv)
    began = time.perf_counter()
    workdir = pathlib.Path(study_flags.user_path(defined.workdir.value))
    workdir.mkdir(parents=True, exist_ok=True)
    thresholds = jaxfi.TrainingThresholds(defined.window.value, defined.tolerance.value, defined.deviation.value)
    tables, curves, goldens, timings = [], {}, {}, {}
    for name in defined.models.value:
        setup = training_setup(name, steps=defined.steps.value, batch_size=defined.batch_size.value,
                               learning_rate=defined.learning_rate.value, seed=defined.seed.value,
                               eval_size=defined.eval_size.value)
        for kind in defined.kinds.value:
            start = time.perf_counter()
            campaign = jaxfi.TrainingCampaign(setup.loss_fn, setup.params, setup.optimizer, setup.batches,
                                              jaxfi.Plan(KIND_SITES[kind]), metric_fn=setup.metric_fn,
                                              seed=defined.seed.value)
            result = campaign.run(defined.trials.value, store=workdir / "stores" / name / kind,
                                  chunk_size=defined.chunk_size.value, executor=defined.executor.value)
            flags_ = (jaxfi.spike_flags(result.losses, factor=defined.detector_factor.value,
                                        window=defined.detector_window.value)
                      | jaxfi.spike_flags(result.arrays["grad_norms"], factor=defined.detector_factor.value,
                                          window=defined.detector_window.value))
            table = result.table(thresholds).assign(model=name, kind=kind)
            table["detected"] = np.any(flags_ & (np.arange(flags_.shape[1]) >= table["fault_step"].to_numpy()[:, None]),
                                       axis=1)
            tables.append(table)
            curves[name, kind] = result.losses
            goldens[name] = {"losses": result.golden.losses.tolist(), "accuracy": result.golden.metric}
            timings[f"{name}/{kind}"] = time.perf_counter() - start
            counts = table["outcome"].value_counts().to_dict()
            print(f"{name} {kind}: {counts} ({timings[f'{name}/{kind}']:.1f}s)", flush=True)
    table = pd.concat(tables, ignore_index=True)
    table["field"] = table["bit"].map(_field)
    table.to_csv(workdir / f"{_NAME}.csv", index=False)
    shares = pd.concat([_shares(table, ["model", "kind"]), _shares(table, ["model", "kind", "field"])])
    shares.to_csv(workdir / f"{_NAME}_shares.csv", index=False)
    _paired(table).to_csv(workdir / f"{_NAME}_paired.csv", index=False)
    detector = _detector(table)
    detector.to_csv(workdir / f"{_NAME}_detector.csv", index=False)
    plot_trajectories(table, curves, goldens, workdir / f"{_NAME}.png")
    print(_shares(table, ["model", "kind"]).to_string(index=False))
    print(detector.to_string(index=False))
    report.write_json(workdir / f"{_NAME}.json", {
        "flags": study_flags.flag_values([f.name for f in dataclasses.fields(Flags)]),
        "golden": goldens, "seconds": timings, "wall_seconds": time.perf_counter() - began,
        "versions": report.versions()})


def _field(bit: int) -> str:
    return next((name for name, bits in _FIELDS if bit in bits), "none")


def _shares(table: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Outcome shares per group with 95% Wilson intervals, one row per group."""
    rows = []
    for key, part in table.groupby(by, sort=False):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)), trials=len(part))
        for outcome in jaxfi.TRAINING_OUTCOMES:
            k = int((part["outcome"] == outcome).sum())
            lo, hi = stats.wilson(k, len(part))
            row.update({outcome: k / len(part), f"{outcome}_lo": lo, f"{outcome}_hi": hi})
        rows.append(row)
    return pd.DataFrame(rows)


def _paired(table: pd.DataFrame) -> pd.DataFrame:
    """Paired differences of the share of non-masked trials between site kinds, per model.

    Every kind's campaign uses one seed, so trial i of two kinds starts from
    the same key: the pair is compared trial by trial (``paired_interval``).
    """
    rows = []
    for model, part in table.groupby("model", sort=False):
        harmed = {kind: (rows_["outcome"] != "masked").to_numpy(float)
                  for kind, rows_ in part.sort_values("trial").groupby("kind", sort=False)}
        kinds = list(harmed)
        for i, a in enumerate(kinds):
            for b in kinds[i + 1:]:
                n = min(len(harmed[a]), len(harmed[b]))
                s = stats.paired_interval(harmed[a][:n], harmed[b][:n])
                rows.append({"model": model, "a": a, "b": b, "trials": n, "harmed_a": harmed[a][:n].mean(),
                             "harmed_b": harmed[b][:n].mean(), "diff": s["mean"], "diff_lo": s["lo"],
                             "diff_hi": s["hi"]})
    return pd.DataFrame(rows)


def _detector(table: pd.DataFrame) -> pd.DataFrame:
    """Detector recall per outcome class and false alarms on masked trials, per model and overall."""
    parts = []
    for name, part in [("all", table), *table.groupby("model", sort=False)]:
        flags_ = part["detected"].to_numpy()[:, None]
        scores = jaxfi.detector_scores(flags_, np.zeros(len(part), int), part["outcome"].to_numpy())
        parts.append(scores.assign(model=name))
    return pd.concat(parts, ignore_index=True)


def plot_trajectories(table: pd.DataFrame, curves: dict[tuple[str, str], np.ndarray],
                      goldens: dict[str, dict[str, Any]], path: pathlib.Path, per_class: int = 12) -> None:
    """Loss curves per outcome class (columns) and model (rows): golden in black, trials by site kind."""
    figure = require("matplotlib.figure", "plots")
    agg = require("matplotlib.backends.backend_agg", "plots")
    names = list(dict.fromkeys(table["model"]))
    outcomes = jaxfi.TRAINING_OUTCOMES
    fig = figure.Figure(figsize=(4 * len(outcomes), 3.2 * len(names)))
    agg.FigureCanvasAgg(fig)
    axes = fig.subplots(len(names), len(outcomes), squeeze=False)
    colors = dict(zip(KIND_SITES, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    for r, name in enumerate(names):
        rows = table[table["model"] == name]
        for c, outcome in enumerate(outcomes):
            ax = axes[r, c]
            chosen = rows[rows["outcome"] == outcome]
            ax.set_title(f"{name}: {outcome} ({len(chosen)}/{len(rows)})", fontsize=9)
            # At most per_class curves, shared among the site kinds present.
            each = max(1, per_class // max(1, chosen["kind"].nunique()))
            for kind, part in chosen.groupby("kind", sort=False):
                for i in part.index[:each]:
                    curve = curves[name, kind][int(part.loc[i, "trial"])]
                    ax.plot(np.where(np.isfinite(curve), curve, np.nan), color=colors[kind], lw=0.8, alpha=0.7)
                    ax.axvline(part.loc[i, "fault_step"], color=colors[kind], lw=0.4, ls=":")
            ax.plot(goldens[name]["losses"], color="black", lw=1.4)
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_ylabel("training loss")
    legend = [axes[0, 0].plot([], [], color="black", label="golden")[0]]
    legend += [axes[0, 0].plot([], [], color=color, label=kind)[0] for kind, color in colors.items()]
    axes[0, 0].legend(handles=legend, fontsize=7, loc="upper right")
    fig.suptitle("Training loss per outcome class (dotted: fault step; NaN/inf not drawn)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    """The ``jaxfi-training-faults`` command: defines the flags, parses them and runs."""
    study_flags.run_script(functools.partial(run, define_flags()), __doc__)
