"""The absl flags the study scripts share, and checks that refuse bad values before any training.

Nothing is defined on import: a script calls ``define_common_flags`` (and the
``check_*`` functions serve as flag validators), so the flags show under the
script's name in ``--help``. Needs absl-py (the ``experiments`` extra).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.experimental import multihost_utils

from jaxfi import data, distributed, executors, models
from jaxfi._src.extras import require
from jaxfi.study.subjects import Subject, load_subjects
from jaxfi.study.sweeps import Done, Job, Target, run_sweep

app = require("absl.app", "experiments")
flags = require("absl.flags", "experiments")

EXECUTOR_HELP = (
    "Campaign executor: loop, auto, grouped, vmap or map. auto decides once per campaign, from the "
    "work its trials need (estimated from the fault populations, nothing compiled) and, where grouped "
    "may win, a timed probe; a campaign's store keeps the executor family that computed it, and "
    "resuming it with another is an error.")


BATCH_HELP = (
    "Evaluate each trial's --eval_size inputs this many at a time (microbatches, jaxfi.Campaign "
    "batch_size): memory is bounded by one microbatch, results equal one batch where the model treats "
    "inputs independently. Weight faults only: transient activation faults need the whole batch. "
    "Default: all at once.")


CACHE_HELP = (
    "Directory of JAX's persistent compilation cache (jaxfi.executors.cache_compilation): a resumed or "
    "repeated run, and the other processes of a distributed one, load compiled programs from it instead "
    "of compiling them again (the same executables, so the same bits). Default: WORKDIR/compilation_cache; "
    "'none' turns it off.")


def check_rates(values: Sequence[str]) -> list[float]:
    """Bit error rates from flag strings.

    Args:
      values: the strings of a list flag.

    Returns:
      The rates, as floats.

    Raises:
      ValueError: no value, or one that is not a number in (0, 1].
    """
    if not values:
        raise ValueError("give at least one bit error rate")
    rates = []
    for value in values:
        try:
            rate = float(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a number") from None
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"a bit error rate must be in (0, 1], got {value!r}")
        rates.append(rate)
    return rates


def check_counts(values: Sequence[str]) -> list[int]:
    """Fault counts from flag strings.

    Raises:
      ValueError: no value, or one that is not a positive integer.
    """
    if not values:
        raise ValueError("give at least one fault count")
    counts = []
    for value in values:
        try:
            count = int(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an integer") from None
        if count < 1:
            raise ValueError(f"a fault count must be a positive integer, got {value!r}")
        counts.append(count)
    return counts


def check_choices(values: Sequence[str], allowed: Sequence[str], what: str) -> list[str]:
    """``values`` if it is a non-empty list of ``allowed`` names.

    Raises:
      ValueError: no value, or one not in ``allowed``.
    """
    if not values:
        raise ValueError(f"give at least one {what}")
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; choose from {list(allowed)}")
    return list(values)


def check_target(trials: int, max_trials: int, half_width: float) -> Target:
    """The sequential sample size of the flags --trials, --max_trials and --half_width.

    Raises:
      ValueError: --max_trials below --trials, or --half_width not in (0, 1).
    """
    if max_trials < trials:
        raise ValueError(f"--max_trials ({max_trials}) must be at least --trials ({trials})")
    if not 0.0 < half_width < 1.0:
        raise ValueError(f"--half_width must be a fraction in (0, 1), e.g. 0.03 for 3 points, got {half_width}")
    return Target(half_width=half_width, min_trials=trials, max_trials=max_trials)


def check_executor(name: str) -> str:
    """``name`` if it names an executor of ``jaxfi.executors``.

    Raises:
      ValueError: an unknown name.
    """
    executors.executor(name)
    return name


def check_eval_size(eval_size: int, dataset: str) -> int:
    """``eval_size`` if the test split of ``dataset`` has that many inputs (known for the embedded set).

    Raises:
      ValueError: more inputs than the embedded test split holds.
    """
    size = data.EMBEDDED_SIZES[data.eval_split(dataset)] if dataset == data.EMBEDDED else None
    if size is not None and eval_size > size:
        raise ValueError(f"{dataset} has {size} test images, got {eval_size}")
    return eval_size


def validate(names: str | Sequence[str], check: Callable[..., Any]) -> None:
    """Registers ``check`` (raising ValueError on a bad value) as a flag validator.

    absl then refuses a bad value while parsing, before the script runs, with
    an error that names the flag.

    Args:
      names: one flag name, called as ``check(value)``; or several, called as
        ``check(**values)``.
      check: raises ValueError with the reason on a bad value.
    """
    def checker(value: Any) -> bool:
        try:
            check(value) if isinstance(names, str) else check(**value)
        except ValueError as err:
            raise flags.ValidationError(str(err)) from None
        return True

    if isinstance(names, str):
        flags.register_validator(names, checker)
    else:
        flags.register_multi_flags_validator(list(names), checker)


@dataclasses.dataclass(frozen=True)
class CommonFlags:
    """The flags every study script shares, from ``define_common_flags``."""

    workdir: Any
    models: Any
    eval_size: Any
    executor: Any
    chunk_size: Any
    seed: Any
    epochs: Any
    batch_size: Any
    compilation_cache: Any

    def load(self, **options: Any) -> tuple[pathlib.Path, list[Subject]]:
        """Joins the processes of the distributed flags, creates the workdir, turns on the
        compilation cache of ``--compilation_cache`` and runs ``load_subjects``.

        With several processes the workdir must be on a file system they all
        share (their stores are there too): process 0 trains the models that
        are not cached yet while the others wait, then they load its
        checkpoints. Training once keeps every process on the same weights
        (the campaigns check that they agree) and does not spend the
        others' cores on duplicate work.

        Args:
          **options: passed to ``load_subjects``.

        Returns:
          The workdir and the subjects. Exits on a bad model or weights file.
        """
        distributed.initialize_from_flags()
        workdir = pathlib.Path(user_path(self.workdir.value))
        workdir.mkdir(parents=True, exist_ok=True)
        lead = jax.process_index() == 0
        try:
            if self.compilation_cache.value != "none":
                executors.cache_compilation(user_path(self.compilation_cache.value) or workdir / "compilation_cache")
            subjects = self._subjects(workdir, lead, **options) if lead else None
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("jaxfi.study: models ready")
            return workdir, subjects or self._subjects(workdir, lead, **options)
        except (ValueError, FileNotFoundError) as err:
            sys.exit(f"error: {err}")

    def _subjects(self, workdir: pathlib.Path, lead: bool, **options: Any) -> list[Subject]:
        return load_subjects(self.models.value, workdir, eval_size=self.eval_size.value, seed=self.seed.value,
                             epochs=self.epochs.value, batch_size=self.batch_size.value,
                             log=print if lead else None, **options)

    def sweep(self, jobs: Sequence[Job], root: str | pathlib.Path, trials: int | Target) -> list[Done]:
        """``run_sweep`` with the seed, executor, chunk and batch size of the flags (progress from process 0)."""
        return run_sweep(jobs, root, trials=trials, seed=self.seed.value, executor=self.executor.value,
                         chunk_size=self.chunk_size.value, batch_size=self.batch_size.value,
                         log=print if jax.process_index() == 0 else None)


def user_path(value: str | None) -> str | None:
    """A path flag's value with a leading ``~`` expanded: bash leaves ``--flag=~/x`` as it is."""
    return os.path.expanduser(value) if value else value


def define_common_flags(*, eval_size: int, chunk_size: int, executor: str = "loop",
                        chunk_help: str = "Trials per stored chunk.") -> CommonFlags:
    """Defines the flags of ``CommonFlags`` for the calling script, with their validators.

    The flags belong to the calling script: they show under its name in
    ``--help``. The distributed flags of ``jaxfi.distributed.define_flags``
    (--coordinator_address, --num_processes, --process_id) come with them,
    so every study script runs over several processes and hosts.

    Args:
      eval_size: the default of ``--eval_size``.
      chunk_size: the default of ``--chunk_size``.
      executor: the default of ``--executor``.
      chunk_help: the help of ``--chunk_size``.

    Returns:
      The flag holders.
    """
    flags.disclaim_key_flags()
    common = CommonFlags(
        workdir=flags.DEFINE_string("workdir", None, "Directory for models, stores and outputs.",
                                    required=True),
        models=flags.DEFINE_list("models", ["mlp", "lenet5", "resnet8"], "Models to study."),
        eval_size=flags.DEFINE_integer("eval_size", eval_size, "Test images evaluated in every trial.",
                                       lower_bound=1),
        executor=flags.DEFINE_string("executor", executor, EXECUTOR_HELP),
        chunk_size=flags.DEFINE_integer("chunk_size", chunk_size, chunk_help, lower_bound=1),
        seed=flags.DEFINE_integer("seed", 0, "Seed of the faults and of the evaluation subset."),
        epochs=flags.DEFINE_integer("epochs", None, "Training epochs (default: per model).", lower_bound=1),
        batch_size=flags.DEFINE_integer("batch_size", None, BATCH_HELP, lower_bound=1),
        compilation_cache=flags.DEFINE_string("compilation_cache", "", CACHE_HELP))
    validate("models", lambda names: check_choices(names, models.MODELS, "model"))
    validate("executor", check_executor)
    distributed.define_flags()
    return common


def run_script(main: Callable[[list[str]], None], doc: str | None) -> None:
    """Parses the flags and runs ``main(argv)`` with absl, ``doc`` being the usage text of --help.

    absl prints the docstring of ``__main__`` as the usage; a console command
    (``jaxfi-resilience``) or a thin script has none of its own, so it gets ``doc``.
    """
    entry = sys.modules["__main__"]
    if not entry.__doc__:
        entry.__doc__ = doc
    app.run(main)


def check_no_arguments(argv: Sequence[str]) -> None:
    """Raises ``app.UsageError`` if a script got positional arguments besides its name."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")


def flag_values(names: Sequence[str]) -> dict[str, Any]:
    """The values of the flags ``names``, for a script's JSON."""
    return {name: flags.FLAGS[name].value for name in names}
