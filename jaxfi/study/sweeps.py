"""Sweeps: fault settings (``Point``), their plans, and the campaigns of a sweep run with stores."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import jaxfi
from jaxfi.study.subjects import Subject, layer_outputs, weight_selector

Log = Callable[[str], Any] | None

WEIGHTS, ACTIVATIONS, BOTH = "weights", "activations", "both"
SITES = (WEIGHTS, ACTIVATIONS, BOTH)
# From no visible effect to collapse for mlp, lenet5 and resnet8 on mnist5k: the
# error leaves golden near 8 flips per inference (1e-6 for mlp's 235k weights,
# 3e-6 for lenet5 and resnet8) and passes 90% by 3e-4.
DEFAULT_RATES = (1e-7, 3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4)
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


@dataclasses.dataclass(frozen=True, eq=False)
class Done:
    """A finished job: its result, the trials computed in this call, the seconds it took, the executor."""

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
    """Runs every job's campaign with a store under ``root``.

    Every campaign uses the same seed: trial ``i`` starts from the same key at
    every point, so neighbouring points are positively correlated and curves
    are smoother than with independent seeds. A finished campaign is read
    back from its store without computing anything.

    Args:
      jobs: the campaigns.
      root: the directory holding one store per job (at ``root/job.path``).
      trials: trials per campaign.
      seed: the campaigns' seed.
      executor: an executor name or object (``jaxfi.executors``).
      chunk_size: trials per stored chunk.
      log: where one progress line per job goes (None: nowhere).

    Returns:
      One ``Done`` per job, in order.
    """
    executors = _Executors(executor)
    done = []
    for i, job in enumerate(jobs, start=1):
        done.append(_run_job(job, pathlib.Path(root) / job.path, trials, seed, executors, chunk_size))
        if log is not None:
            log(f"[{i}/{len(jobs)}] {job.path}: {_brief(done[-1])}")
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
