"""Sweeps: fault settings (``Point``), their plans, and the campaigns of a sweep run with stores."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

import jaxfi
from jaxfi import stats
from jaxfi.study.subjects import Subject, layer_outputs, weight_selector

Log = Callable[[str], Any] | None

WEIGHTS, ACTIVATIONS, BOTH = "weights", "activations", "both"
SITES = (WEIGHTS, ACTIVATIONS, BOTH)
# From no visible effect to collapse for mlp, lenet5 and resnet8 on mnist5k: the
# error leaves golden near 8 flips per inference (1e-6 for mlp's 235k weights,
# 3e-6 for lenet5 and resnet8) and passes 90% by 3e-4. 3e-7 is left out: it was
# flat like 1e-7 for all three, and each point costs its compilations.
DEFAULT_RATES = (1e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4)
DEFAULT_COUNTS = (1, 2, 5, 10, 20, 50, 100)


@dataclasses.dataclass(frozen=True)
class Point:
    """One fault setting: where (``site``) and how many (a bit error ``rate`` or a ``count``).

    Attributes:
      site: ``"weights"``, ``"activations"`` or ``"both"``.
      rate: flips each selected bit independently with this probability, in (0, 1].
      count: places exactly this many single-bit flips per trial (per selected
        kind of site, for ``both``).
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


def plans_for(subject: Subject, point: Point | Sequence[Point], batch_stats: bool = False) -> tuple[jaxfi.Plan, ...]:
    """Single-bit-flip plans of ``point`` on ``subject``: weights, activations or both.

    Several rate points of one site make one sweep: each plan's ``ber`` is
    their rates, so one compiled program serves them all
    (``jaxfi.Campaign.run(point=j)``).
    """
    points = (point,) if isinstance(point, Point) else tuple(point)
    if len({p.site for p in points}) != 1 or (len(points) > 1 and any(p.rate is None for p in points)):
        raise ValueError(f"a sweep's points must share one site and each have a rate, got {points}")
    how = ({"ber": points[0].rate} if len(points) == 1 else {"ber": tuple(p.rate for p in points)}) \
        if points[0].rate is not None else {"count": points[0].count}
    selectors = []
    if points[0].site in (WEIGHTS, BOTH):
        selectors.append(weight_selector(batch_stats))
    if points[0].site in (ACTIVATIONS, BOTH):
        selectors.append(layer_outputs(subject))
    return tuple(jaxfi.Plan(s, jaxfi.BitFlip(), **how) for s in selectors)


def logit_deviation(golden: np.ndarray, faulty: np.ndarray, labels: np.ndarray | None) -> dict[str, float]:
    """Campaign outcome ``logit_dev``: mean |faulty - golden| over the inputs whose logits are finite."""
    g = golden.reshape(golden.shape[0], -1).astype(np.float64)
    f = faulty.reshape(faulty.shape[0], -1).astype(np.float64)
    finite = np.isfinite(f).all(axis=1)
    return {"logit_dev": float(np.abs(f[finite] - g[finite]).mean()) if finite.any() else math.nan}


@dataclasses.dataclass(frozen=True, eq=False)
class Job:
    """One campaign of a sweep: a subject, its plans, its store directory and its row keys.

    Attributes:
      subject: the model and its evaluation data.
      plans: the campaign's plans; plans whose rate is a sweep give the
        campaign several points.
      path: the store directory, under the sweep's root.
      keys: row keys shared by every point.
      points: per sweep point, its own row keys (e.g. its rate); one empty
        entry for a campaign without a sweep.
    """

    subject: Subject
    plans: tuple[jaxfi.Plan, ...]
    path: str
    keys: dict[str, Any]
    points: tuple[dict[str, Any], ...] = ({},)

    def __post_init__(self):
        swept = max(p.points for p in self.plans)
        if len(self.points) != swept:
            raise ValueError(f"job {self.path}: {swept} sweep points in the plans, {len(self.points)} in points")


@dataclasses.dataclass(frozen=True)
class Target:
    """Sequential sample size: trials until the top-1 error is known to ``half_width``.

    A point first runs ``min_trials``; while the interval of its mean top-1
    error over trials is wider than ``half_width`` on either side and fewer
    than ``max_trials`` ran, it grows to the trials the current sample says
    are needed (at least ``min_trials`` more). The interval is
    ``jaxfi.stats.mean_interval`` with the golden error as baseline: while
    fewer than ``jaxfi.stats.MIN_CHANGED`` trials changed the error, it is the
    changed-share bound (about 3/n wide at 95% when none changed), else the
    Student-t interval. A point whose first trials all keep the golden error
    therefore cannot stop on a zero-width interval. Coverage under this
    sequential use is simulated in the tests on samples shaped like the
    study's (a point mass with a rare tail, bimodal, small shifts): 0.95 to
    0.99 at 95% nominal, asserted at least 0.93 from 1,500 runs each.

    Attributes:
      half_width: the largest half-width accepted, as a fraction (0.03: 3 points).
      min_trials: trials every point runs first (at least 2).
      max_trials: trials no point exceeds, even if its interval is still wider.
      confidence: the interval's confidence level.
    """

    half_width: float = 0.03
    min_trials: int = 32
    max_trials: int = 2048
    confidence: float = 0.95

    def __post_init__(self):
        if not 0.0 < self.half_width < 1.0:
            raise ValueError(f"half_width must be in (0, 1), got {self.half_width!r}")
        if isinstance(self.min_trials, bool) or not isinstance(self.min_trials, int) or self.min_trials < 2:
            raise ValueError(f"min_trials must be an integer >= 2, got {self.min_trials!r}")
        if isinstance(self.max_trials, bool) or not isinstance(self.max_trials, int) \
                or self.max_trials < self.min_trials:
            raise ValueError(f"max_trials must be an integer >= min_trials ({self.min_trials}), "
                             f"got {self.max_trials!r}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence!r}")

    def interval(self, errors: np.ndarray, golden_error: float) -> dict[str, Any]:
        """The interval the rule stops on: ``mean_interval`` with the golden error as baseline."""
        return stats.mean_interval(errors, self.confidence, (0.0, 1.0), baseline=golden_error)

    def next_trials(self, errors: np.ndarray, golden_error: float, step: int = 1) -> int | None:
        """The trials to run next given per-trial ``errors``, or None once the target or the cap is met.

        Args:
          errors: the top-1 error of every trial run so far.
          golden_error: the fault-free model's error (a trial whose faults
            changed nothing has exactly this error).
          step: the result is rounded up to a multiple of it (the chunk size,
            so that stored chunks stay full), but never past ``max_trials``.
        """
        n = len(errors)
        interval = self.interval(errors, golden_error)
        if n >= self.max_trials or interval["half_width"] <= self.half_width:
            return None
        if interval["method"] == "t":
            t = scipy_stats.t.ppf((1.0 + self.confidence) / 2.0, n - 1)
            needed = math.ceil((t * float(np.std(errors, ddof=1)) / self.half_width) ** 2)
        else:  # the changed-share bound shrinks about as 1/n
            needed = math.ceil(n * interval["half_width"] / self.half_width)
        wanted = max(needed, n + self.min_trials)
        return min(self.max_trials, -(-wanted // step) * step)


def half_width(errors: np.ndarray, confidence: float = 0.95, golden_error: float | None = None) -> float:
    """The half-width of the interval of the mean of ``errors`` (``Target.interval`` with a golden error)."""
    bounds = None if golden_error is None else (0.0, 1.0)
    return stats.mean_interval(errors, confidence, bounds, baseline=golden_error)["half_width"]


@dataclasses.dataclass(frozen=True, eq=False)
class Done:
    """A finished sweep point.

    Attributes:
      job: the job.
      result: the point's campaign result (every trial it kept).
      computed: trials computed in this call (0: read back from the store).
      seconds: the seconds this call spent on the point (its share of the
        job's compiles included, for the point that paid them).
      executor: the executor that computed them ("" when nothing was computed).
      timings: what ``executor="auto"`` measured when it decided in this call, else None.
      point: the sweep point (0 for a job without a sweep).
      compile_seconds: what the job's executor spent compiling, the golden
        forward's compile included (None when nothing was computed).
    """

    job: Job
    result: jaxfi.Result
    computed: int
    seconds: float
    executor: str
    timings: pd.DataFrame | None = None
    point: int = 0
    compile_seconds: float | None = None

    @property
    def keys(self) -> dict[str, Any]:
        """The row keys of this point: the job's and the point's own."""
        return {**self.job.keys, **self.job.points[self.point]}


def run_sweep(jobs: Sequence[Job], root: str | pathlib.Path, *, trials: int | Target, seed: int,
              executor: Any = "auto", chunk_size: int = 32, batch_size: int | None = None,
              log: Log = print) -> list[Done]:
    """Runs every job's campaign with a store under ``root``: one ``Done`` per job and sweep point.

    Every campaign uses the same seed: trial ``i`` starts from the same key at
    every point and in every job, so points and models are paired (common
    random numbers; compare them with ``jaxfi.stats.paired_interval``).
    Within a job, every point runs on the same compiled programs and one
    store. With a ``Target`` the points are scheduled in rounds: each round
    extends every unfinished point to the trials it asks for (the first
    round starts at the middle point, where ``executor="auto"`` measures the
    candidates, and "auto" plans with every point's ``max_trials`` / 4 as
    its horizon). A re-run takes the same steps (they depend only on the
    stored trials) without computing anything.

    Args:
      jobs: the campaigns.
      root: the directory holding one store per job (at ``root/job.path``).
      trials: trials per point, or a ``Target`` that sizes each one.
      seed: the campaigns' seed.
      executor: an executor name or object (``jaxfi.executors``); "auto"
        decides once per job, and its store keeps that choice.
      chunk_size: trials per stored chunk.
      batch_size: evaluate each trial's inputs this many at a time
        (``jaxfi.Campaign(batch_size=...)``; None: all at once).
      log: where one progress line per point goes (None: nowhere).

    Returns:
      One ``Done`` per job and point, in order.
    """
    done = []
    for i, job in enumerate(jobs, start=1):
        for d in _run_job(job, pathlib.Path(root) / job.path, trials, seed, executor, chunk_size, batch_size):
            done.append(d)
            if log is not None:
                where = job.path if len(job.points) == 1 else f"{job.path} point {d.point}"
                log(f"[{i}/{len(jobs)}] {where}: {_brief(d)}")
    return done


def _run_job(job: Job, path: pathlib.Path, trials: int | Target, seed: int, executor: Any,
             chunk_size: int, batch_size: int | None = None) -> list[Done]:
    began = time.perf_counter()
    campaign = jaxfi.Campaign(job.subject.apply_fn, job.subject.params, job.subject.images,
                              job.subject.labels, job.plans, seed=seed, outcomes=(logit_deviation,),
                              batch_size=batch_size)
    setup = time.perf_counter() - began
    points = len(job.points)
    stored = _stored_per_point(campaign, path, points)
    target = trials if isinstance(trials, Target) else None
    if executor == "auto":
        horizon = points * (max(target.max_trials // 4, target.min_trials) if target is not None else trials)
        executor = jaxfi.executors.AutoExecutor(horizon=max(horizon, 1))
    wanted = {p: target.min_trials if target is not None else trials for p in _middle_first(points)}
    results: dict[int, jaxfi.Result] = {}
    seconds = dict.fromkeys(range(points), 0.0)
    seconds[next(iter(wanted))] += setup
    names: dict[int, list[str]] = {p: [] for p in range(points)}
    timings = None
    while wanted:
        for p in list(wanted):
            clock = time.perf_counter()
            # The same Campaign object each time: its compiled programs are reused.
            result = campaign.run(wanted[p], point=p, executor=executor, chunk_size=chunk_size, store=path,
                                  quiet=True)
            seconds[p] += time.perf_counter() - clock
            if result.executor and result.executor not in names[p]:
                names[p].append(result.executor)
            timings = result.timings if result.timings is not None else timings
            results[p] = result
            errors = 1.0 - result.table["accuracy"].to_numpy()
            wanted[p] = (target.next_trials(errors, 1.0 - result.golden.accuracy, chunk_size)
                         if target is not None else None)
            if wanted[p] is None:
                del wanted[p]
    compiled = [r.compile_seconds for r in results.values() if r.compile_seconds is not None]
    compile_seconds = max(compiled) + campaign.golden_compile_seconds if compiled else None
    return [Done(job, results[p], max(len(results[p]) - stored[p], 0), seconds[p], ",".join(names[p]),
                 timings, p, compile_seconds) for p in range(points)]


def _middle_first(points: int) -> list[int]:
    """Point indices starting from the middle one, then the others in order."""
    middle = points // 2
    return [middle] + [p for p in range(points) if p != middle]


def _stored_per_point(campaign: jaxfi.Campaign, path: pathlib.Path, points: int) -> dict[int, int]:
    """Trials already in the store at ``path``, per sweep point."""
    if not (path / "manifest.json").exists():
        return dict.fromkeys(range(points), 0)
    table = campaign.load(path).table
    column = table["point"] if "point" in table else pd.Series(0, index=table.index)
    return {p: int((column == p).sum()) for p in range(points)}


def _brief(done: Done) -> str:
    errors = 1.0 - done.result.table["accuracy"].to_numpy()
    golden = 1.0 - done.result.golden.accuracy
    how = f"computed {done.computed} with {done.executor}" if done.computed else "loaded"
    return (f"{len(errors)} trials, error {errors.mean():.4f} +- {half_width(errors, golden_error=golden):.4f}, "
            f"{how} ({done.seconds:.1f}s)")
