"""What a study script writes: its table as CSV, a figure, and a JSON of flags, models, timings and versions."""

from __future__ import annotations

import importlib.metadata
import json
import pathlib
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import pandas as pd

import jaxfi
from jaxfi.study.subjects import Subject
from jaxfi.study.sweeps import Done

# The distributions whose versions the results depend on, where installed.
_DISTRIBUTIONS = ("jaxlib", "flax", "optax", "numpy", "pandas", "scipy", "matplotlib")


def versions() -> dict[str, str]:
    """Versions of Python, the platform, the devices and the libraries the results depend on."""
    found = {"python": platform.python_version(), "platform": platform.platform(),
             "jaxfi": jaxfi.__version__, "jax": jax.__version__,
             "backend": jax.default_backend(), "devices": str(jax.devices())}
    for name in _DISTRIBUTIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def write_json(path: str | pathlib.Path, payload: dict[str, Any]) -> None:
    """Writes ``payload`` plus software ``versions()`` as indented JSON."""
    text = json.dumps({**payload, "versions": versions()}, indent=2, default=_jsonable)
    pathlib.Path(path).write_text(text + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (pathlib.Path, np.dtype)):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON: {value!r}")


def timings(done: Sequence[Done]) -> list[dict[str, Any]]:
    """Per job and point, for the JSON: its path and point, trials kept, trials computed in this
    call, the executor that computed them, seconds, the job's compile seconds, and what
    ``executor="auto"`` measured when it decided."""
    return [{"path": d.job.path, "point": d.point, "trials": len(d.result), "computed": d.computed,
             "executor": d.executor, "seconds": round(d.seconds, 2),
             "job_compile_seconds": None if d.compile_seconds is None else round(d.compile_seconds, 2),
             "auto": None if d.timings is None else d.timings.to_dict("records")} for d in done]


def compile_seconds(done: Sequence[Done]) -> float:
    """The compile seconds of every job that computed trials, each job counted once."""
    per_job = {id(d.job): d.compile_seconds for d in done if d.compile_seconds is not None}
    return float(sum(per_job.values()))


def write_report(stem: str | pathlib.Path, table: pd.DataFrame, *, name: str,
                 plot: Callable[[pd.DataFrame, str, str], None], title: str,
                 flag_values: dict[str, Any], subjects: Sequence[Subject], done: Sequence[Done],
                 began: float, show: Callable[[pd.DataFrame], None]) -> None:
    """Writes ``table`` to STEM.csv, its ``plot`` to STEM.png and STEM.json, then ``show``s it.

    With several processes (``jaxfi.distributed``) every process holds the
    same table; only process 0 writes and shows it.

    Args:
      stem: the output path without suffix.
      table: the study's table.
      name: the study's name, written to the JSON.
      plot: called as ``plot(table, path, title)``.
      title: the figure's title.
      flag_values: the script's flags, written to the JSON.
      subjects: the models studied; their ``info`` goes to the JSON.
      done: the finished jobs; their ``timings`` go to the JSON.
      began: a ``time.perf_counter()`` reading at the start of the study.
      show: prints the table.
    """
    if jax.process_index() != 0:
        return
    table.to_csv(f"{stem}.csv", index=False)
    plot(table, f"{stem}.png", title)
    wall = time.perf_counter() - began
    write_json(f"{stem}.json", {
        "study": name, "command": sys.argv, "flags": flag_values,
        "models": {s.label: s.info for s in subjects}, "points": timings(done),
        "compile_seconds": round(compile_seconds(done), 1), "wall_seconds": round(wall, 1)})
    show(table)
    print(f"wrote {stem}.{{csv,json,png}} in {wall:.0f}s")
