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


def plans_for(subject: Subject, point: Point, batch_stats: bool = False) -> tuple[jaxfi.Plan, ...]:
    """Single-bit-flip plans of ``point`` on ``subject``: weights, activations or both."""
    how = {"ber": point.rate} if point.rate is not None else {"count": point.count}
    selectors = []
    if point.site in (WEIGHTS, BOTH):
        selectors.append(weight_selector(batch_stats))
    if point.site in (ACTIVATIONS, BOTH):
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
    """One campaign of a sweep: a subject, its plans, its store directory and its row keys."""

    subject: Subject
    plans: tuple[jaxfi.Plan, ...]
    path: str
    keys: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Target:
    """Sequential sample size: trials until the top-1 error is known to ``half_width``.

    A point first runs ``min_trials``; while the Student-t interval of its
    mean top-1 error over trials (``jaxfi.stats.mean_interval``, unclipped)
    is wider than ``half_width`` on either side and fewer than
    ``max_trials`` ran, it grows to the number of trials the current
    per-trial standard deviation says is needed, ``(t * sd / half_width)**2``,
    at least ``min_trials`` more. Steep points (large spread between trials)
    get many trials, flat ones stop at ``min_trials``. Stopping on the data
    seen (optional stopping) makes the nominal 95% coverage slightly
    optimistic.

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

    def next_trials(self, errors: np.ndarray, step: int = 1) -> int | None:
        """The trials to run next given per-trial ``errors``, or None once the target or the cap is met.

        Args:
          errors: the top-1 error of every trial run so far.
          step: the result is rounded up to a multiple of it (the chunk size,
            so that stored chunks stay full), but never past ``max_trials``.
        """
        n = len(errors)
        if n >= self.max_trials or half_width(errors, self.confidence) <= self.half_width:
            return None
        t = scipy_stats.t.ppf((1.0 + self.confidence) / 2.0, n - 1)
        needed = math.ceil((t * float(np.std(errors, ddof=1)) / self.half_width) ** 2)
        wanted = max(needed, n + self.min_trials)
        return min(self.max_trials, -(-wanted // step) * step)


def half_width(errors: np.ndarray, confidence: float = 0.95) -> float:
    """The half-width of the Student-t interval of the mean of ``errors`` (not clipped to [0, 1])."""
    return stats.mean_interval(errors, confidence)["half_width"]


@dataclasses.dataclass(frozen=True, eq=False)
class Done:
    """A finished job.

    Attributes:
      job: the job.
      result: its campaign's result (every trial it kept).
      computed: trials computed in this call (0: read back from the store).
      seconds: the seconds this call took.
      executor: the executor that computed them ("" when nothing was computed).
      timings: what ``executor="auto"`` measured when it decided in this call, else None.
    """

    job: Job
    result: jaxfi.Result
    computed: int
    seconds: float
    executor: str
    timings: pd.DataFrame | None = None


def run_sweep(jobs: Sequence[Job], root: str | pathlib.Path, *, trials: int | Target, seed: int,
              executor: Any = "auto", chunk_size: int = 32, batch_size: int | None = None,
              log: Log = print) -> list[Done]:
    """Runs every job's campaign with a store under ``root``.

    Every campaign uses the same seed: trial ``i`` starts from the same key at
    every point, so neighbouring points are positively correlated and curves
    are smoother than with independent seeds. A finished campaign is read
    back from its store without computing anything; with a ``Target`` each
    extension resumes the store, and a re-run takes the same steps (they
    depend only on the stored trials) without computing anything.

    Args:
      jobs: the campaigns.
      root: the directory holding one store per job (at ``root/job.path``).
      trials: trials per campaign, or a ``Target`` that sizes each one.
      seed: the campaigns' seed.
      executor: an executor name or object (``jaxfi.executors``); "auto"
        decides once per campaign, and its store keeps that choice.
      chunk_size: trials per stored chunk.
      batch_size: evaluate each trial's inputs this many at a time
        (``jaxfi.Campaign(batch_size=...)``; None: all at once).
      log: where one progress line per job goes (None: nowhere).

    Returns:
      One ``Done`` per job, in order.
    """
    done = []
    for i, job in enumerate(jobs, start=1):
        done.append(_run_job(job, pathlib.Path(root) / job.path, trials, seed, executor, chunk_size,
                             batch_size))
        if log is not None:
            log(f"[{i}/{len(jobs)}] {job.path}: {_brief(done[-1])}")
    return done


def _run_job(job: Job, path: pathlib.Path, trials: int | Target, seed: int, executor: Any,
             chunk_size: int, batch_size: int | None = None) -> Done:
    began = time.perf_counter()
    campaign = jaxfi.Campaign(job.subject.apply_fn, job.subject.params, job.subject.images,
                              job.subject.labels, job.plans, seed=seed, outcomes=(logit_deviation,),
                              batch_size=batch_size)
    stored = len(campaign.load(path)) if (path / "manifest.json").exists() else 0
    target = trials if isinstance(trials, Target) else None
    n: int | None = target.min_trials if target is not None else trials
    names, timings = [], None
    while n is not None:
        # The same Campaign object each time: its compiled programs are reused.
        result = campaign.run(n, executor=executor, chunk_size=chunk_size, store=path, quiet=True)
        if result.executor and result.executor not in names:
            names.append(result.executor)
        if result.timings is not None:
            timings = result.timings
        errors = 1.0 - result.table["accuracy"].to_numpy()
        n = target.next_trials(errors, chunk_size) if target is not None else None
    computed = max(len(result) - stored, 0)
    return Done(job, result, computed, time.perf_counter() - began, ",".join(names), timings)


def _brief(done: Done) -> str:
    errors = 1.0 - done.result.table["accuracy"].to_numpy()
    how = f"computed {done.computed} with {done.executor}" if done.computed else "loaded"
    return (f"{len(errors)} trials, error {errors.mean():.3f} +- {half_width(errors):.3f}, "
            f"{how} ({done.seconds:.1f}s)")
