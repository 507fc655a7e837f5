"""Which layer of a scanned transformer matters: single-bit flips in its weights and activations.

    python experiments/transformer.py --workdir=runs/transformer

Trains (once, cached in WORKDIR/models) the decoder-only transformer of
``jaxfi.models.transformer``, whose blocks run under ``nn.scan``, on sorting
--length digits, then runs one campaign per (--dtypes, target): each trial
flips one uniformly drawn bit among all bits of the weights ("weights":
every ``params`` leaf; the scanned blocks' leaves have a leading layer axis)
or of the activations of one forward pass ("activations": every floating
value the program computes, those inside the scanned block being loop sites
whose iteration is the layer). bfloat16 runs cast the trained float32
weights and compute in bfloat16.

A trial's outcomes, over --eval_size held-out sequences (teacher forcing:
the greedy token at each position is the argmax given the correct prefix):
``token_sdc`` (a greedy token changed), ``exact_match_lost`` (a sequence the
golden run sorted exactly is no longer exact), ``delta_ce`` (change in mean
token cross-entropy), ``due`` (a non-finite logit). The layer of a trial's
fault is the scan iteration of its flat index (``jaxfi.loop_iteration``) or
the leading axis of a scanned weight; faults outside the blocks are
"embed/head".

Writes to --workdir:

- transformer.csv: one row per (dtype, target, layer): trials, the share of
  trials in that layer, rates and Wilson intervals of token_sdc,
  exact_match_lost and due, the mean change of cross-entropy with its
  Student-t interval (finite trials), and the overall row "all".
- transformer.json: flags, training metrics, timings, versions.
- transformer.png: token SDC per layer with intervals, weights and activations.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from typing import Any

import numpy as np
import pandas as pd

import jaxfi
from jaxfi import study, training
from jaxfi._src.extras import require
from jaxfi.models import transformer as tf
from jaxfi.study import flags as study_flags

flags = study_flags.flags

_NAME = "transformer"
_TARGETS = ("weights", "activations")
_DTYPES = ("float32", "bfloat16")
_OUTSIDE = "embed/head"


@dataclasses.dataclass(frozen=True)
class Flags:
    """The holders of this script's flags."""

    workdir: Any
    trials: Any
    eval_size: Any
    dtypes: Any
    steps: Any
    layers: Any
    length: Any
    executor: Any
    chunk_size: Any
    seed: Any


def define_flags() -> Flags:
    """Defines the script's flags (they show under the script's name in --help)."""
    flags.disclaim_key_flags()
    return Flags(
        workdir=flags.DEFINE_string("workdir", "runs/transformer", "Where models, campaigns and results go."),
        trials=flags.DEFINE_integer("trials", 1000, "Trials per (dtype, target).", lower_bound=2),
        eval_size=flags.DEFINE_integer("eval_size", 64, "Held-out sequences per trial.", lower_bound=1),
        dtypes=flags.DEFINE_list("dtypes", list(_DTYPES), "Weight and computation dtypes: float32, bfloat16."),
        steps=flags.DEFINE_integer("steps", 300, "Training steps (batch 128).", lower_bound=1),
        layers=flags.DEFINE_integer("layers", 4, "Scanned blocks.", lower_bound=1),
        length=flags.DEFINE_integer("length", 8, "Digits to sort.", lower_bound=2),
        executor=flags.DEFINE_string("executor", "loop", "Executor: loop, map or vmap (map and vmap are "
                                     "checked bit for bit against the loop and may refuse)."),
        chunk_size=flags.DEFINE_integer("chunk_size", 100, "Trials per chunk.", lower_bound=1),
        seed=flags.DEFINE_integer("seed", 0, "Training and campaign seed.", lower_bound=0))


def run(defined: Flags, argv: list[str]) -> None:
    """Trains or loads the model, runs the campaigns, writes CSV, JSON and figure."""
    study_flags.check_no_arguments(argv)
    began = time.perf_counter()
    dtypes = study_flags.check_choices(defined.dtypes.value, _DTYPES, "dtype")
    workdir = pathlib.Path(study_flags.user_path(defined.workdir.value))
    config = tf.Config(length=defined.length.value, layers=defined.layers.value)
    params, metrics = _trained(config, workdir, defined.steps.value, defined.seed.value)
    tokens, targets = tf.sorting_task(defined.eval_size.value, config, seed=2**31 + defined.seed.value)
    rows, timings = [], []
    for dtype in dtypes:
        typed = dataclasses.replace(config, dtype=dtype)
        weights = tf.cast(params, dtype)
        token_acc, seq_acc = tf.accuracy(tf.bind(typed), weights, tokens, targets)
        print(f"{dtype}: golden token accuracy {token_acc:.4f}, exact match {seq_acc:.4f}")
        for target in _TARGETS:
            start = time.perf_counter()
            table, sites = _campaign(defined, typed, weights, tokens, targets, target, workdir)
            timings.append({"dtype": dtype, "target": target, "seconds": time.perf_counter() - start})
            rows.extend(_layer_rows(table, sites, typed, dtype, target))
    table = pd.DataFrame(rows)
    stem = workdir / _NAME
    table.to_csv(stem.with_suffix(".csv"), index=False)
    study.write_json(stem.with_suffix(".json"), {
        "flags": {f.name: getattr(defined, f.name).value for f in dataclasses.fields(defined)},
        "training": metrics, "timings": timings, "seconds": time.perf_counter() - began,
        "versions": study.versions()})
    _plot(table, stem.with_suffix(".png"), defined.trials.value, defined.eval_size.value)
    _print(table)
    print(f"wrote {stem}.csv, .json, .png in {time.perf_counter() - began:.0f} s")


def _trained(config: tf.Config, workdir: pathlib.Path, steps: int, seed: int) -> tuple[Any, dict[str, Any]]:
    """The float32 model, trained once per (config, steps, seed) and cached."""
    name = f"transformer-L{config.layers}-n{config.length}-s{steps}-seed{seed}"
    path = workdir / "models" / f"{name}.msgpack"
    like = tf.init(config, seed)
    try:
        params, meta = training.load_checkpoint(path, "transformer", like=like)
        return params, meta["metrics"]
    except FileNotFoundError:
        pass
    params, metrics = tf.train(config, steps=steps, seed=seed)
    print(f"trained in {metrics['seconds']:.0f} s: loss {metrics['loss']:.4f}, token accuracy "
          f"{metrics['token_accuracy']:.4f}, exact match {metrics['sequence_accuracy']:.4f}")
    training.save_checkpoint(path, params, {"model": "transformer", "config": dataclasses.asdict(config),
                                            "metrics": metrics})
    return params, metrics


def _campaign(defined: Flags, config: tf.Config, params: Any, tokens: np.ndarray, targets: np.ndarray,
              target: str, workdir: pathlib.Path) -> tuple[pd.DataFrame, tuple[jaxfi.Site, ...]]:
    selector = jaxfi.Params() if target == "weights" else jaxfi.Activations()
    campaign = jaxfi.Campaign(tf.bind(config), params, tokens, None, jaxfi.Plan(selector, jaxfi.BitFlip()),
                              seed=defined.seed.value, outcomes=[jaxfi.sequence_outcomes(targets)])
    store = workdir / "campaigns" / _NAME / f"{config.dtype}-{target}"
    result = campaign.run(trials=defined.trials.value, executor=defined.executor.value,
                          chunk_size=defined.chunk_size.value, store=store)
    return result.table, campaign.sites[0]


def _layer_of(site: jaxfi.Site, index: int, layers: int) -> str:
    """The scanned block a fault lies in, from its site and flat index."""
    if getattr(site, "iterations", 0):
        return f"layer {int(jaxfi.loop_iteration(site, index))}"
    if site.kind == "params" and site.name.startswith("params/layers/") and site.shape[:1] == (layers,):
        return f"layer {int(np.unravel_index(index, site.shape)[0])}"
    return _OUTSIDE


def _layer_rows(table: pd.DataFrame, sites: tuple[jaxfi.Site, ...], config: tf.Config, dtype: str,
                target: str) -> list[dict[str, Any]]:
    by_name = {s.name: s for s in sites}
    layer = [_layer_of(by_name[name], int(i), config.layers)
             for name, i in zip(table["first_site"], table["first_index"])]
    table = table.assign(layer=layer)
    groups = [("all", table)] + sorted(table.groupby("layer"), key=lambda g: g[0])
    return [_row(dtype, target, name, group, len(table)) for name, group in groups]


def _row(dtype: str, target: str, layer: str, group: pd.DataFrame, total: int) -> dict[str, Any]:
    row: dict[str, Any] = {"dtype": dtype, "target": target, "layer": layer, "trials": len(group),
                           "share": len(group) / total}
    for name in ("token_sdc", "exact_match_lost", "due"):
        k = int(group[name].sum())
        lo, hi = jaxfi.wilson(k, len(group))
        row.update({name: k / len(group), f"{name}_lo": lo, f"{name}_hi": hi})
    mean = jaxfi.stats.mean_interval(group["delta_ce"].to_numpy())
    row.update({"delta_ce": mean["mean"], "delta_ce_lo": mean["lo"], "delta_ce_hi": mean["hi"]})
    return row


def _plot(table: pd.DataFrame, path: pathlib.Path, trials: int, eval_size: int) -> None:
    figure = require("matplotlib.figure", "plots")
    agg = require("matplotlib.backends.backend_agg", "plots")
    fig = figure.Figure(figsize=(9, 3.6))
    agg.FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(_TARGETS), sharey=True)
    for ax, target in zip(np.atleast_1d(axes), _TARGETS):
        part = table[(table["target"] == target) & (table["layer"] != "all")]
        layers = sorted(set(part["layer"]))
        for j, (dtype, rows) in enumerate(part.groupby("dtype", sort=False)):
            rows = rows.set_index("layer").reindex(layers)
            x = np.arange(len(layers)) + (j - 0.5) * 0.35
            err = np.stack([rows["token_sdc"] - rows["token_sdc_lo"], rows["token_sdc_hi"] - rows["token_sdc"]])
            ax.bar(x, 100 * rows["token_sdc"], 0.35, yerr=100 * err, capsize=3, label=dtype)
        ax.set_xticks(np.arange(len(layers)), layers, rotation=30)
        ax.set_title(f"one bit flip in the {target}")
        ax.set_ylabel("trials with a changed token (%)")
        ax.legend()
    fig.suptitle(f"Scanned transformer, per layer: {trials} trials per panel and dtype x {eval_size} "
                 "sequences (95% Wilson)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def _print(table: pd.DataFrame) -> None:
    view = table[["dtype", "target", "layer", "trials", "token_sdc", "token_sdc_lo", "token_sdc_hi",
                  "exact_match_lost", "due", "delta_ce"]]
    print(view.round(4).to_string(index=False))


def main() -> None:
    """The ``jaxfi-transformer`` command: defines the flags, parses them and runs."""
    study_flags.run_script(functools.partial(run, define_flags()), __doc__)
