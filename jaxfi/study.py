"""Resilience studies: sweeps of fault campaigns over models, tidy result rows, plots.

The scripts in ``experiments/`` (resilience, bit and layer sensitivity) share
this code. A sweep is a list of ``Job``s, one ``jaxfi.Campaign`` each, every
one with its own ``Store`` under ``WORKDIR/campaigns/``: running a sweep again
continues an interrupted campaign where it stopped and reads finished ones
back without computing a trial. Workdir layout::

    models/NAME.msgpack, NAME.json       trained models (jaxfi.training.train_or_load)
    campaigns/STUDY/SUBJECT/POINT/       one jaxfi Store per campaign

What counts as a weight: every leaf of the ``params`` collection (conv and
dense kernels and biases, BatchNorm scale and bias), i.e. what PyTorch calls
``model.parameters()`` and what the seed study (Rojas et al., CARLA 2019)
corrupted. BatchNorm running statistics (the ``batch_stats`` collection) are
buffers, not weights, and are left out unless asked for (``batch_stats=True``).

Activations are the outputs of the leaf modules (every Conv, Dense and
BatchNorm): the tensors one layer hands to the next, each counted once. The
ReLU and pooling after a layer act on the corrupted value. A bit error rate on
activations applies to every activation bit of every evaluated input.

Statistics. The unit of replication is the trial: one independent fault
scenario, applied to the whole evaluation batch. The inputs of a trial share
its faults, so pooling inputs over trials and giving binomial intervals would
assume an independence that does not hold (intervals far too narrow). Hence:

* per-input figures (top-1 error, SDC over golden-correct inputs, SDC-5, DUE,
  mean logit deviation) are computed per trial, averaged over trials, and get
  a Student-t interval over trials, clipped to the figure's range ([0, 1] for fractions);
* per-trial events (at least one SDC input, at least one DUE input, any
  effect at all) are binomial over trials, with Wilson intervals.

A t interval has zero width when every trial gave the same value (e.g. no
trial drew a fault that mattered); ``sdc_trial_hi`` and ``harm_trial_hi``
then bound how often a trial could change anything.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pandas as pd
from absl import app, flags
from scipy import stats as sps

import jaxfi
from jaxfi import data as data_lib
from jaxfi import models as models_lib
from jaxfi import training
from jaxfi._src import stats as stats_lib

matplotlib.use("Agg")
import matplotlib.colors as mcolors  # noqa: E402  (after choosing the non-interactive backend)
import matplotlib.pyplot as plt  # noqa: E402

# The flags define_common_flags defines belong to the script that calls it.
flags.disclaim_key_flags()

Log = Callable[[str], Any] | None

WEIGHTS, ACTIVATIONS, BOTH = "weights", "activations", "both"
SITES = (WEIGHTS, ACTIVATIONS, BOTH)
DTYPES = ("float32", "bfloat16", "float16")
# From no visible effect to collapse for mlp, lenet5 and resnet8 on mnist5k: the
# error leaves golden near 8 flips per inference (1e-6 for mlp's 235k weights,
# 3e-6 for lenet5 and resnet8) and passes 90% by 3e-4.
DEFAULT_RATES = (1e-7, 3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4)
DEFAULT_COUNTS = (1, 2, 5, 10, 20, 50, 100)
CONFIDENCE = 0.95
EXECUTOR_HELP = (
    "Campaign executor: loop, auto, grouped, vmap or map. Results do not depend on it. auto times "
    "every executor on each model's first computed campaign and reuses its choice; on 2 CPU cores "
    "that probe costs about a minute per model, more than it saves on these small models.")

# Per-trial figures averaged over trials (t interval) and per-trial events (Wilson).
MEANS = ("error", "sdc", "sdc5", "due", "logit_dev")
EVENTS = ("sdc_trial", "due_trial", "harm_trial")
_NON_NEGATIVE = ("logit_dev",)  # not a fraction: bounded below only

COLUMNS = {
    "trials": "trials in the campaign",
    "golden_error": "top-1 error of the fault-free model on the evaluation inputs",
    "faults_mean": "mean number of faults placed per trial",
    "overflow": "trials whose drawn fault count exceeded the static cap (should be 0)",
    "error": "top-1 error of the faulty model (DUE inputs count as wrong), mean over trials",
    "sdc": "fraction of golden-correct inputs whose top-1 changed (finite output), mean over trials",
    "sdc5": "fraction of inputs whose top-1 left golden's top-5, mean over trials",
    "due": "fraction of inputs with a non-finite logit, mean over trials",
    "logit_dev": "mean |faulty - golden| logit over inputs with finite logits, mean over trials",
    "sdc_trial": "fraction of trials with at least one SDC input",
    "due_trial": "fraction of trials with at least one DUE input",
    "harm_trial": "fraction of trials with any SDC or DUE (not masked)",
}
_INTERVALS = {f"{name}_{end}": f"95% {kind} interval of {name}, {end} bound"
              for names, kind in ((MEANS, "Student-t (over trials)"), (EVENTS, "Wilson"))
              for name in names for end in ("lo", "hi")}


def summary_columns() -> dict[str, str]:
    """Every column ``summarize`` writes (besides group keys), with its meaning."""
    order = ["trials", "golden_error", "faults_mean", "overflow"]
    for name in MEANS + EVENTS:
        order += [name, f"{name}_lo", f"{name}_hi"]
    return {name: COLUMNS.get(name) or _INTERVALS[name] for name in order}


# ---------------------------------------------------------------- subjects


@dataclasses.dataclass(frozen=True, eq=False)
class Subject:
    """A model under study with its evaluation inputs.

    ``apply_fn(params, images)`` gives logits; ``info`` is JSON-ready
    provenance (source, accuracy, size); ``dtype`` names the storage format of
    its floating variables.
    """

    name: str
    apply_fn: Callable[[Any, Any], Any]
    params: Any
    images: np.ndarray
    labels: np.ndarray
    info: dict[str, Any]
    dtype: str = "float32"

    @property
    def label(self) -> str:
        """The name, suffixed with the dtype when it is not float32."""
        return self.name if self.dtype == "float32" else f"{self.name}-{self.dtype}"


def load_subjects(names: Sequence[str], workdir: str | pathlib.Path, *,
                  dataset: str = data_lib.EMBEDDED, data_dir: str | None = None,
                  weights: str | None = None, eval_size: int = 256, seed: int = 0,
                  epochs: int | None = None, log: Log = print) -> list[Subject]:
    """The models ``names`` and an evaluation subset of ``eval_size`` test inputs.

    Without ``weights`` each model is trained on ``dataset`` once and cached
    in ``workdir/models`` (``jaxfi.training.train_or_load``; ``epochs``
    overrides the per-model default). With ``weights``, a directory of
    torchvision state dicts ``NAME.safetensors`` or ``NAME.npz``, each model
    is converted with ``jaxfi.models.convert.from_torchvision``. Every model
    sees the same ``eval_size`` inputs, chosen by ``seed``.
    """
    evaluation = data_lib.load(dataset, data_lib.eval_split(dataset), data_dir,
                               num_examples=eval_size, seed=seed)
    subjects = []
    for name in names:
        if weights is None:
            model, variables, info = _trained(name, workdir, dataset, data_dir, epochs, log)
        else:
            model, variables, info = _converted(name, weights, evaluation.num_classes)
        apply_fn, params = models_lib.bind_inference(model, variables)
        info["parameters"] = models_lib.param_count(params.get("params", params))
        subjects.append(Subject(name, apply_fn, params, evaluation.images, evaluation.labels, info))
    return subjects


def _trained(name: str, workdir: str | pathlib.Path, dataset: str, data_dir: str | None,
             epochs: int | None, log: Log) -> tuple[Any, Any, dict[str, Any]]:
    model, variables, meta = training.train_or_load(
        name, pathlib.Path(workdir) / "models", dataset, data_dir=data_dir, epochs=epochs, log=log)
    metrics = meta["metrics"]
    return model, variables, {"source": "trained", "training": meta["config"],
                              "test_accuracy": metrics["final_test_accuracy"],
                              "train_seconds": metrics["train_seconds"]}


def _converted(name: str, weights: str, num_classes: int) -> tuple[Any, Any, dict[str, Any]]:
    from jaxfi.models import convert  # deferred: only the ImageNet path needs it

    candidates = [pathlib.Path(weights) / f"{name}{ext}" for ext in (".safetensors", ".npz")]
    found = [p for p in candidates if p.exists()]
    if not found:
        raise FileNotFoundError(f"no torchvision weights for {name!r}: expected one of "
                                f"{[str(p) for p in candidates]}")
    model = models_lib.get_model(name, num_classes=num_classes)
    return model, convert.from_torchvision(model, found[0]), {"source": str(found[0])}


def cast(subject: Subject, dtype: str) -> Subject:
    """``subject`` with every floating variable stored as ``dtype``.

    Flax promotes mixed operands, so the layers still compute in float32 from
    the float32 inputs: the format under test is the storage of the weights.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    target = jnp.dtype(dtype)
    params = jax.tree.map(lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                          subject.params)
    return dataclasses.replace(subject, params=params, dtype=dtype)


# --------------------------------------------------------------- selections


def weight_selector(batch_stats: bool = False) -> jaxfi.Selector:
    """Every leaf of the ``params`` collection; BatchNorm running statistics too if ``batch_stats``."""
    return jaxfi.Params() if batch_stats else jaxfi.Params(r"^params/")


def weight_leaves(subject: Subject, batch_stats: bool = False) -> list[jaxfi.Site]:
    """The weight sites of ``subject`` in program order (the order their modules first run)."""
    leaves = weight_selector(batch_stats).select(jaxfi.param_sites(subject.params))
    scopes = [s.scope.partition("/")[2] for s in
              jaxfi.activation_sites(subject.apply_fn, subject.params, subject.images[:1])]
    first = {scope: i for i, scope in reversed(list(enumerate(scopes)))}
    # "params/layer1_0/bn1/scale" belongs to module "layer1_0/bn1"; the root scope is the model.
    return sorted(leaves, key=lambda leaf: first.get(leaf.name.split("/", 1)[1].rpartition("/")[0],
                                                     len(scopes)))


def layer_outputs(subject: Subject) -> jaxfi.Selector:
    """The outputs of every leaf module (Conv, Dense, BatchNorm) of ``subject``.

    A leaf module is a scope that holds no other module scope; its output is
    the value leaving it (for Dense and Conv the bias add, for BatchNorm the
    final affine), so each tensor passed between layers is selected once.
    """
    sites = jaxfi.activation_sites(subject.apply_fn, subject.params, subject.images[:1])
    scopes = {scope for site in sites for scope in site.output_of}
    leaves = sorted(s for s in scopes if not any(t.startswith(s + "/") for t in scopes))
    if not leaves:
        raise ValueError(f"model {subject.name!r} has no module outputs to fault")
    return jaxfi.module_output("|".join(re.escape(s) for s in leaves))


@dataclasses.dataclass(frozen=True)
class Point:
    """One fault setting: where (``site``) and how many (a bit error ``rate`` or a ``count``).

    ``rate`` flips each selected bit independently with that probability;
    ``count`` places exactly that many single-bit flips per trial (per
    selected kind of site, for ``both``).
    """

    site: str
    rate: float | None = None
    count: int | None = None

    def __post_init__(self):
        if self.site not in SITES:
            raise ValueError(f"site must be one of {SITES}, got {self.site!r}")
        if (self.rate is None) == (self.count is None):
            raise ValueError(f"give exactly one of rate or count, got rate={self.rate!r}, count={self.count!r}")
        if self.rate is not None and not 0.0 < self.rate <= 1.0:
            raise ValueError(f"rate must be a bit error rate in (0, 1], got {self.rate!r}")
        if self.count is not None and (isinstance(self.count, bool) or self.count < 1):
            raise ValueError(f"count must be a positive integer, got {self.count!r}")

    @property
    def mode(self) -> str:
        """"rate" or "count"."""
        return "rate" if self.rate is not None else "count"

    @property
    def label(self) -> str:
        """A directory name, e.g. ``weights-ber1e-06`` or ``both-count5``."""
        return f"{self.site}-ber{self.rate:.6g}" if self.rate is not None else f"{self.site}-count{self.count}"


def plans_for(subject: Subject, point: Point, batch_stats: bool = False) -> tuple[jaxfi.Plan, ...]:
    """Single-bit-flip plans of ``point`` on ``subject``: weights, activations or both."""
    how = {"ber": point.rate} if point.rate is not None else {"count": point.count}
    selectors = []
    if point.site in (WEIGHTS, BOTH):
        selectors.append(weight_selector(batch_stats))
    if point.site in (ACTIVATIONS, BOTH):
        selectors.append(layer_outputs(subject))
    return tuple(jaxfi.Plan(s, jaxfi.BitFlip(), **how) for s in selectors)


# ------------------------------------------------------------------ sweeps


def logit_deviation(golden: np.ndarray, faulty: np.ndarray, labels: np.ndarray | None) -> dict[str, float]:
    """Campaign outcome ``logit_dev``: mean |faulty - golden| over the inputs whose logits are finite."""
    g = golden.reshape(golden.shape[0], -1).astype(np.float64)
    f = faulty.reshape(faulty.shape[0], -1).astype(np.float64)
    finite = np.isfinite(f).all(axis=1)
    return {"logit_dev": float(np.abs(f[finite] - g[finite]).mean()) if finite.any() else math.nan}


@dataclasses.dataclass(frozen=True, eq=False)
class Job:
    """One campaign of a sweep: a subject, its plans, its store directory and its row keys."""

    subject: Subject
    plans: tuple[jaxfi.Plan, ...]
    path: str
    keys: dict[str, Any]


@dataclasses.dataclass(frozen=True, eq=False)
class Done:
    """A finished job: its result, the trials computed in this call, the seconds it took."""

    job: Job
    result: jaxfi.Result
    computed: int
    seconds: float
    executor: str


class _Executors:
    """The executor for each subject.

    "auto" times every candidate on a campaign's first chunk, which costs
    several compilations per campaign; a sweep has many, so the choice made
    on a subject's first computed campaign is reused for its other ones.
    """

    def __init__(self, spec: Any):
        self._spec = spec
        self._chosen: dict[str, Any] = {}

    def get(self, subject: Subject) -> Any:
        return self._chosen.get(subject.label, self._spec)

    def update(self, subject: Subject, result: jaxfi.Result) -> None:
        if self._spec != "auto" or subject.label in self._chosen or not result.executor:
            return
        named = {c.name: c for c in jaxfi.AutoExecutor().candidates}
        if result.executor in named:
            self._chosen[subject.label] = named[result.executor]

    def forget(self, subject: Subject) -> None:
        self._chosen.pop(subject.label, None)


def run_sweep(jobs: Sequence[Job], root: str | pathlib.Path, *, trials: int, seed: int,
              executor: Any = "auto", chunk_size: int = 32, log: Log = print) -> list[Done]:
    """Run every job's campaign (``trials`` trials, ``seed``) with a store under ``root``.

    Every campaign uses the same seed: trial ``i`` starts from the same key at
    every point, so neighbouring points are positively correlated and curves
    are smoother than with independent seeds. A finished campaign is read
    back from its store without computing anything.
    """
    executors = _Executors(executor)
    done = []
    for i, job in enumerate(jobs, start=1):
        done.append(_run_job(job, pathlib.Path(root) / job.path, trials, seed, executors, chunk_size))
        _log(log, f"[{i}/{len(jobs)}] {job.path}: {_brief(done[-1])}")
    return done


def _run_job(job: Job, path: pathlib.Path, trials: int, seed: int, executors: _Executors,
             chunk_size: int) -> Done:
    began = time.perf_counter()
    campaign = jaxfi.Campaign(job.subject.apply_fn, job.subject.params, job.subject.images,
                              job.subject.labels, job.plans, seed=seed, outcomes=(logit_deviation,))
    stored = len(campaign.load(path)) if (path / "manifest.json").exists() else 0
    try:
        result = _run(campaign, trials, executors.get(job.subject), chunk_size, path)
    except jaxfi.NotBitwiseError:
        # A reused choice can disagree with the unbatched trial on another
        # plan; nothing was stored, so let auto choose again for this one.
        executors.forget(job.subject)
        result = _run(campaign, trials, "auto", chunk_size, path)
    executors.update(job.subject, result)
    computed = min(len(result), trials) - min(stored, trials)
    return Done(job, result, computed, time.perf_counter() - began, result.executor)


def _run(campaign: jaxfi.Campaign, trials: int, executor: Any, chunk_size: int,
         path: pathlib.Path) -> jaxfi.Result:
    return campaign.run(trials, executor=executor, chunk_size=chunk_size, store=path, quiet=True)


def _brief(done: Done) -> str:
    error = 1.0 - done.result.table["accuracy"].mean()
    how = f"computed {done.computed} trials with {done.executor}" if done.computed else "loaded"
    return f"error {error:.3f}, {how} ({done.seconds:.1f}s)"


def _log(log: Log, message: str) -> None:
    if log is not None:
        log(message)


# -------------------------------------------------------------- statistics


def mean_interval(values: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE,
                  bounds: tuple[float, float] | None = None) -> tuple[float, float, float]:
    """(mean, lo, hi) of the finite ``values`` with a Student-t interval, clipped to ``bounds``.

    NaN for no finite value; NaN bounds for one.
    """
    x = np.asarray(values, np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    half = float(sps.t.ppf((1.0 + confidence) / 2.0, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return mean, lo, hi


def per_trial(result: jaxfi.Result) -> pd.DataFrame:
    """One row per trial: the figures ``summarize`` averages, the events it counts, and strata."""
    t, g = result.table, result.golden
    sdc = t["sdc_correct_inputs"] / g.n_correct if g.n_correct else pd.Series(math.nan, index=t.index)
    return pd.DataFrame({
        "error": 1.0 - t["accuracy"],
        "sdc": sdc,
        "sdc5": t["sdc5_inputs"] / g.batch,
        "due": t["due_inputs"] / g.batch,
        "logit_dev": t["logit_dev"],
        "sdc_trial": t["sdc"],
        "due_trial": t["due"],
        "harm_trial": ~t["masked"],
        "faults": t["faults"],
        "overflow": t["overflow"],
        "bit": t["bit"],
        "site": t["site"],
    })


def summarize(result: jaxfi.Result, by: str | None = None,
              confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Figures of a campaign with intervals (``summary_columns``), one row per ``by`` stratum."""
    frame = per_trial(result)
    golden_error = 1.0 - result.golden.accuracy
    groups = [(None, frame)] if by is None else list(frame.groupby(by, sort=True))
    rows = []
    for key, rows_of in groups:
        row: dict[str, Any] = {} if by is None else {by: key}
        row.update(trials=len(rows_of), golden_error=golden_error,
                   faults_mean=float(rows_of["faults"].mean()), overflow=int(rows_of["overflow"].sum()))
        for name in MEANS:
            bounds = (0.0, math.inf) if name in _NON_NEGATIVE else (0.0, 1.0)
            row[name], row[f"{name}_lo"], row[f"{name}_hi"] = mean_interval(
                rows_of[name].to_numpy(), confidence, bounds)
        for name in EVENTS:
            k, n = int(rows_of[name].sum()), len(rows_of)
            lo, hi = stats_lib.wilson(k, n, confidence)
            row[name], row[f"{name}_lo"], row[f"{name}_hi"] = k / n, lo, hi
        rows.append(row)
    return pd.DataFrame(rows)


def bit_field(dtype: str, bit: int) -> str:
    """"sign", "exponent" or "mantissa": the field of ``dtype`` that holds ``bit``."""
    fmt = jaxfi.format_of(dtype)
    return "sign" if bit in fmt.sign else "exponent" if bit in fmt.exponent else "mantissa"


# ------------------------------------------------------------------ scripts


@dataclasses.dataclass(frozen=True)
class CommonFlags:
    """The flags every study script shares, from ``define_common_flags``."""

    workdir: flags.FlagHolder[str]
    models: flags.FlagHolder[list[str]]
    eval_size: flags.FlagHolder[int]
    executor: flags.FlagHolder[str]
    chunk_size: flags.FlagHolder[int]
    seed: flags.FlagHolder[int]
    epochs: flags.FlagHolder[int | None]

    def load(self, **options: Any) -> tuple[pathlib.Path, list[Subject]]:
        """Create the workdir and ``load_subjects`` (with ``options``); exit on a bad model or file."""
        workdir = pathlib.Path(self.workdir.value)
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            return workdir, load_subjects(self.models.value, workdir, eval_size=self.eval_size.value,
                                          seed=self.seed.value, epochs=self.epochs.value, **options)
        except (ValueError, FileNotFoundError) as err:
            sys.exit(f"error: {err}")

    def sweep(self, jobs: Sequence[Job], root: str | pathlib.Path, trials: int) -> list[Done]:
        """``run_sweep`` with the seed, executor and chunk size of the flags."""
        return run_sweep(jobs, root, trials=trials, seed=self.seed.value,
                         executor=self.executor.value, chunk_size=self.chunk_size.value)


def define_common_flags(*, eval_size: int, chunk_size: int,
                        chunk_help: str = "Trials per stored chunk.") -> CommonFlags:
    """Define the flags of ``CommonFlags`` for the calling script (they show under its name in --help)."""
    return CommonFlags(
        workdir=flags.DEFINE_string("workdir", None, "Directory for models, stores and outputs.",
                                    required=True),
        models=flags.DEFINE_list("models", ["mlp", "lenet5", "resnet8"], "Models to study."),
        eval_size=flags.DEFINE_integer("eval_size", eval_size, "Test images evaluated in every trial.",
                                       lower_bound=1),
        executor=flags.DEFINE_string("executor", "loop", EXECUTOR_HELP),
        chunk_size=flags.DEFINE_integer("chunk_size", chunk_size, chunk_help, lower_bound=1),
        seed=flags.DEFINE_integer("seed", 0, "Seed of the faults and of the evaluation subset."),
        epochs=flags.DEFINE_integer("epochs", None, "Training epochs (default: per model).", lower_bound=1))


def check_no_arguments(argv: Sequence[str]) -> None:
    """Raise ``app.UsageError`` if a script got positional arguments besides its name."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")


# ------------------------------------------------------------------- files


def versions() -> dict[str, str]:
    """Versions of Python, the platform and the libraries the results depend on."""
    import flax
    import jaxlib
    import optax
    import scipy

    return {"python": platform.python_version(), "platform": platform.platform(),
            "jaxfi": jaxfi.__version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "backend": jax.default_backend(), "devices": str(jax.devices()),
            "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__,
            "pandas": pd.__version__, "scipy": scipy.__version__, "matplotlib": matplotlib.__version__}


def write_json(path: str | pathlib.Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` plus software versions as indented JSON."""
    text = json.dumps({**payload, "versions": versions()}, indent=2, default=_jsonable)
    pathlib.Path(path).write_text(text + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (pathlib.Path, np.dtype)):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON: {value!r}")


def timings(done: Sequence[Done]) -> list[dict[str, Any]]:
    """Per job: its path, trials computed in this call, executor and seconds (for the JSON)."""
    return [{"path": d.job.path, "computed": d.computed, "executor": d.executor,
             "seconds": round(d.seconds, 2)} for d in done]


def write_report(stem: str | pathlib.Path, table: pd.DataFrame, *, name: str,
                 plot: Callable[[pd.DataFrame, str, str], None], title: str,
                 flag_values: dict[str, Any], subjects: Sequence[Subject], done: Sequence[Done],
                 began: float, show: Callable[[pd.DataFrame], None]) -> None:
    """Write ``table`` to STEM.csv, its ``plot`` to STEM.png and STEM.json, then ``show`` it.

    ``plot`` is called as ``plot(table, path, title)``. The JSON holds the
    study ``name``, the command line, ``flag_values``, the subjects' info, the
    jobs' ``timings`` and the seconds since ``began`` (a ``time.perf_counter()``
    reading).
    """
    table.to_csv(f"{stem}.csv", index=False)
    plot(table, f"{stem}.png", title)
    wall = time.perf_counter() - began
    write_json(f"{stem}.json", {
        "study": name, "command": sys.argv, "flags": flag_values,
        "models": {s.label: s.info for s in subjects}, "points": timings(done),
        "wall_seconds": round(wall, 1)})
    show(table)
    print(f"wrote {stem}.{{csv,json,png}} in {wall:.0f}s")


# ------------------------------------------------------------------- plots


def _finish(fig: plt.Figure, path: str | pathlib.Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_sweep(table: pd.DataFrame, path: str | pathlib.Path, title: str) -> None:
    """Error, SDC and DUE against the fault rate (or count), one curve and band per model."""
    x, xlabel = _sweep_axis(table)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    for i, (model, rows) in enumerate(table.groupby("model", sort=False)):
        color = f"C{i}"
        rows = rows.sort_values(x)
        left.plot(rows[x], 100 * rows["error"], "o-", color=color,
                  label=f"{model} (fault-free {100 * rows['golden_error'].iloc[0]:.1f}%)")
        left.fill_between(rows[x], 100 * rows["error_lo"], 100 * rows["error_hi"], color=color, alpha=0.2)
        left.axhline(100 * rows["golden_error"].iloc[0], color=color, lw=0.8, ls=":")
        for name, style in (("sdc", "o-"), ("due", "s--")):
            right.plot(rows[x], 100 * rows[name], style, color=color, label=f"{model} {name.upper()}")
            right.fill_between(rows[x], 100 * rows[f"{name}_lo"], 100 * rows[f"{name}_hi"],
                               color=color, alpha=0.15)
    left.set_ylabel("top-1 error of the faulty model (%)")
    left.set_title("Top-1 error (dotted: fault-free)")
    right.set_ylabel("inputs affected (%)")
    right.set_title("SDC (of golden-correct inputs) and DUE (non-finite output)")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title + "\nbands: 95% Student-t intervals over trials", fontsize=10)
    _finish(fig, path)


def _sweep_axis(table: pd.DataFrame) -> tuple[str, str]:
    if table["rate"].notna().all():
        return "rate", "bit error rate (probability that each bit flips)"
    return "count", "single-bit flips per trial (exact count)"


def plot_bits(table: pd.DataFrame, path: str | pathlib.Path, title: str) -> None:
    """Heat maps of SDC and DUE per trial by bit position: a row per model, a panel row per dtype."""
    dtypes = list(dict.fromkeys(table["dtype"]))
    models = list(dict.fromkeys(table["model"]))
    height = 0.8 + len(dtypes) * (1.3 + 0.35 * len(models))
    fig, axes = plt.subplots(len(dtypes), 2, figsize=(14, height), squeeze=False)
    norm = mcolors.PowerNorm(0.5, vmin=0.0, vmax=1.0)
    for row, dtype in enumerate(dtypes):
        width = jaxfi.format_of(dtype).width
        for col, (name, label) in enumerate((("sdc_trial", "SDC"), ("due_trial", "DUE"))):
            ax = axes[row, col]
            grid = np.full((len(models), width), np.nan)
            for _, r in table[table["dtype"] == dtype].iterrows():
                grid[models.index(r["model"]), int(r["bit"])] = r[name]
            image = ax.imshow(grid[:, ::-1], aspect="auto", cmap="magma_r", norm=norm,
                              extent=(width - 0.5, -0.5, len(models) - 0.5, -0.5))
            _mark_fields(ax, dtype)
            ax.set_yticks(range(len(models)), models)
            ax.set_xlabel(f"bit position in {dtype} (0 = least significant; "
                          "blue lines: sign | exponent | mantissa)", fontsize=8)
            ax.set_title(f"{dtype}: P({label}) per single-bit flip", fontsize=9)
            fig.colorbar(image, ax=ax, label=f"P({label}) per trial")
    fig.suptitle(title, fontsize=10)
    _finish(fig, path)


def _mark_fields(ax: plt.Axes, dtype: str) -> None:
    """Lines around the exponent field and a tick per bit."""
    fmt = jaxfi.format_of(dtype)
    for edge in (min(fmt.exponent) - 0.5, max(fmt.exponent) + 0.5):
        ax.axvline(edge, color="tab:blue", lw=1.2)
    ax.set_xticks(range(fmt.width), [str(b) for b in range(fmt.width)], fontsize=6)


def plot_layers(table: pd.DataFrame, path: str | pathlib.Path, title: str) -> None:
    """Per model: SDC per single-bit flip in each layer leaf, raw and weighted by its share of bits."""
    models = list(dict.fromkeys(table["model"]))
    sizes = [max(2, (table["model"] == m).sum()) for m in models]
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 1.2 + 0.26 * sum(sizes)), squeeze=False,
                             gridspec_kw={"height_ratios": sizes})
    for row, model in enumerate(models):
        rows = table[table["model"] == model]
        y = np.arange(len(rows))
        names = [n.removeprefix("params/") for n in rows["leaf"]]
        for col, (value, lo, hi, xlabel) in enumerate((
                ("sdc_trial", "sdc_trial_lo", "sdc_trial_hi", "P(SDC) per single-bit flip in the leaf"),
                ("sdc_weighted", "sdc_weighted_lo", "sdc_weighted_hi",
                 "P(SDC) x leaf's share of weight bits (sums to the model's)"))):
            ax = axes[row, col]
            err = np.vstack([rows[value] - rows[lo], rows[hi] - rows[value]])
            ax.barh(y, rows[value], xerr=err, color=f"C{row}", alpha=0.8, capsize=2)
            ax.set_yticks(y, names, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel(xlabel, fontsize=8)
            ax.grid(True, axis="x", alpha=0.3)
            ax.set_title(f"{model}", fontsize=9)
    fig.suptitle(title + "\nerror bars: 95% Wilson intervals over trials", fontsize=10)
    _finish(fig, path)
