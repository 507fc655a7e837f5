"""Campaigns: a golden run, many keyed trials, outcomes, statistics and a store.

::

    c = jaxfi.Campaign(apply_fn, params, images, labels, [plan], seed=0)
    result = c.run(trials=2000, executor="auto", chunk_size=64, store="runs/x")
    print(result.summary())          # rates with confidence intervals
    result.summary(by="site")        # per stratum
    c.replay(17)                     # trial 17 alone, bit for bit

Trial ``i`` is ``faulty(apply_fn, *plans)(fold_in(key(seed), i), params,
inputs)``. Its faults (the records) are the same whatever the executor. Its
output is computed by the executor's program for it (``program`` in the
table) and compared with that program's own golden run, so "identical" means
bit-identical and rounding never counts as a change. The table is the same
across runs, chunk sizes, resumes, devices and processes: a store records the
executor that computed it and every later run of that store uses it.

Strata: each trial gets a ``site`` and a ``bit``. A trial whose faults all
land in one site has that site's name ("mixed" if they span several sites,
"none" if the trial drew no fault); a trial whose faults all flip the same
single bit position has that bit (-1 otherwise: several positions, multi-bit
faults or no fault). Single-fault trials are thus stratified exactly, and
multi-fault trials only where they are homogeneous.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jaxlib
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from jaxfi._src import executors as exec_lib
from jaxfi._src import identity, stats
from jaxfi._src import outcomes as outcomes_lib
from jaxfi._src.bits import check_x64
from jaxfi._src.distributed import Layout
from jaxfi._src.inject import Record
from jaxfi._src.plan import TRIALS_PER_POINT, Plan, point_index, split_index
from jaxfi._src.record import record_table
from jaxfi._src.sites import Site
from jaxfi._src.store import CorruptChunkError, ForeignChunkError, Store
from jaxfi._src.trial import REFERENCE, Computed, Trials, faulty, sites_of, trial_function
from jaxfi._src.version import __version__

_RECORD_COLUMN = "r{plan}.{field}"
MAX_TRIALS = TRIALS_PER_POINT
# A batched executor's chunks checked against the unbatched trial (first and
# last trial of each) at the start of every run: a sample across chunks, not
# only the first one, for a few replays per chunk.
VERIFY_CHUNKS = 4
# Without x64 a PRNG key holds a 32-bit seed: larger seeds would alias smaller ones.
SEEDS = 2**32


class TrialResult(NamedTuple):
    """One trial: its index, model output, records (one per plan) and outcomes."""

    index: int
    output: np.ndarray
    records: tuple[Record, ...]
    outcomes: dict[str, Any]


class Campaign:
    """A fault-injection campaign over ``apply_fn(params, inputs)``.

    ``labels`` (integer classes, one per input) enable accuracy and
    SDC-over-correct figures; ``plans`` is a Plan or a list of them, all
    applied in every trial; ``outcomes`` adds custom per-trial figures
    ``fn(golden_output, faulty_output, labels) -> {name: scalar}``.
    ``seed`` is an integer in [0, 2**32). Arrays must keep their dtype in
    JAX: 64-bit ones need ``jax_enable_x64``. The golden run is computed
    once, here (``golden_compile_seconds``: its compile and first run).
    ``points`` is the number of sweep points the plans' rates give (1
    without a sweep; see ``Plan``).

    ``batch_size`` splits the inputs (every leaf, and the labels) along axis
    0 into microbatches of that many rows: each trial's faults are drawn
    once (from the trial's key) and every microbatch is evaluated with them,
    so the device holds one microbatch at a time. The last microbatch is
    padded to full size with its own rows again, whose outputs are dropped:
    one compiled program serves every microbatch. A trial's outcomes are
    those of the whole batch (counts summed over inputs, an event if any
    input has it, accuracy and deviations over all inputs), so where the
    model treats inputs independently the table equals the one-batch
    table. Params faults are the same on every microbatch by construction;
    permanent activation and input faults (``Plan(permanent=True)``) hit
    their position in every input of every microbatch, and their records
    hold the first input's values. Transient activation and input faults
    (one value of the whole batch) need the whole batch in one program, so
    a plan of them with more than one microbatch is refused. Custom outcomes
    are called with the whole batch's output, gathered on the host.
    """

    def __init__(self, apply_fn: Callable[[Any, Any], Any], params: Any, inputs: Any,
                 labels: Any = None, plans: Plan | Sequence[Plan] = (), *, seed: int = 0,
                 outcomes: Sequence[outcomes_lib.OutcomeFn] = (), batch_size: int | None = None):
        self.plans = (plans,) if isinstance(plans, Plan) else tuple(plans)
        if not self.plans:
            raise ValueError("Campaign needs at least one plan, e.g. jaxfi.Plan(jaxfi.Params())")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if not 0 <= seed < SEEDS:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
        check_x64(params, "params")
        check_x64(inputs, "inputs")
        self.apply_fn, self.params, self.inputs, self.seed = apply_fn, params, inputs, int(seed)
        self.labels = None if labels is None else np.asarray(labels)
        self.batch_size = None if batch_size is None else _positive("batch_size", batch_size, 1)
        self._spans = _spans(inputs, self.batch_size)
        self._check_transient()
        forward = jax.jit(apply_fn)
        began = time.perf_counter()
        first = jax.device_get(forward(params, self._microbatch(0)))
        compile_seconds = time.perf_counter() - began
        self.golden_compile_seconds = compile_seconds
        outputs = [first] + [jax.device_get(forward(params, self._microbatch(j)))
                             for j in range(1, len(self._spans))]
        self.golden = outcomes_lib.golden(
            np.concatenate([o[self._real(j)] for j, o in enumerate(outputs)]), self.labels)
        self.sites: tuple[tuple[Site, ...], ...] = tuple(
            tuple(sites_of(apply_fn, plan, params, self._microbatch(0))) for plan in self.plans)
        self.points = _points(self.plans)
        self._outcome_fns = tuple(outcomes)
        builtin = outcomes_lib.builtin_names(self.labels is not None)
        self._custom = outcomes_lib.custom_names(self._outcome_fns, self.golden, builtin)
        self.outcome_names: tuple[str, ...] = builtin + tuple(self._custom)
        self._trials = Trials(trial_function(faulty(apply_fn, *self.plans)),
                              jax.random.key(self.seed), params, self._microbatch(0), apply_fn, self.plans,
                              compile_seconds, self.sites)
        # Built once per campaign, reused by every later run() and resume.
        self._runners: dict[tuple[Any, ...], exec_lib.Runner] = {}
        self._decided: exec_lib.Executor | None = None
        self._decision_table: pd.DataFrame | None = None
        self._goldens: dict[tuple[Any, int], outcomes_lib.Golden] = {}

    def _check_transient(self) -> None:
        if len(self._spans) == 1:
            return
        transient = [p for p in self.plans if p.kind != "params" and not p.permanent]
        if transient:
            raise ValueError(
                f"batch_size={self.batch_size} splits the {self._spans[-1][1]} inputs into "
                f"{len(self._spans)} microbatches, but plan {identity.describe(transient[0])} places "
                "transient faults on single values of the whole batch, which needs it in one "
                "program: use permanent=True, a params plan, or batch_size=None")

    def _real(self, j: int) -> slice:
        """The rows of microbatch ``j`` that are inputs (not padding), counted from its start."""
        if len(self._spans) == 1:
            return slice(None)
        a, b = self._spans[j]
        return slice(0, b - a)

    def _microbatch(self, j: int) -> Any:
        """Microbatch ``j`` of the inputs, the last one padded with its own rows."""
        if len(self._spans) == 1:
            return self.inputs
        a, b = self._spans[j]
        rows = a + np.arange(self._spans[0][1]) % (b - a)
        return jax.tree.map(lambda v: v[rows], self.inputs)

    @functools.cached_property
    def config(self) -> dict[str, Any]:
        """Everything that defines the results (a store refuses any other config).

        ``program`` fingerprints the jaxpr of ``apply_fn`` on these params and
        inputs (``function`` is only a label); each plan carries the
        fingerprint of its fault model's traced program; ``outcome_code``
        fingerprints the custom outcome functions' code; ``data`` the
        params, inputs and labels (with their shapes); ``versions`` the
        software. The executor, chunk size and device count are left out:
        results do not depend on them.
        """
        data = {"params": identity.arrays(self.params), "inputs": identity.arrays(self.inputs),
                "labels": None if self.labels is None else identity.arrays(self.labels)}
        return {
            "versions": {"jaxfi": __version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
                         "numpy": np.__version__, "python": platform.python_version(),
                         "backend": jax.default_backend()},
            "function": identity.qualified(self.apply_fn),
            "program": identity.program(self.apply_fn, self.params, self.inputs),
            "seed": self.seed,
            "plans": [f"{identity.describe(p)}; fault program sha256 "
                      f"{identity.fault_program(p.fault, (s.format for s in sites))}"
                      for p, sites in zip(self.plans, self.sites)],
            "sites": [[s.name for s in sites] for sites in self.sites],
            "outcomes": list(self.outcome_names),
            "outcome_code": [f"{identity.qualified(fn)} sha256 {identity.code(fn)}"
                             for fn in self._outcome_fns],
            "data": data,
            "data_sha256": hashlib.sha256(" ".join(
                str(d and d["sha256"]) for d in data.values()).encode()).hexdigest(),
            **({} if self.batch_size is None else {"batch_size": self.batch_size}),
        }

    def run(self, trials: int | None = None, *, point: int = 0, executor: str | exec_lib.Executor = "auto",
            chunk_size: int = 64, store: str | os.PathLike | None = None,
            margin: float | None = None, confidence: float = 0.95, method: str = "wilson",
            quiet: bool = False, verify: bool = True,
            devices: Sequence[jax.Device] | None = None) -> Result:
        """Run trials 0..``trials``-1 of sweep ``point`` (those not already in ``store``) and return them.

        ``trials`` may be left out when a plan has a fault list: it is then
        the list's number of trials (the shortest list's, with several).

        ``point`` picks the rate of plans whose rate is a sweep (a sequence
        of rates): every point runs on the same compiled programs, and trial
        ``i`` draws from the same key at every point (paired). A campaign
        without a sweep has the one point 0. A store holds every point.

        ``executor``: "grouped", "vmap", "map", "loop", "auto" or an executor
        object. "auto" decides once per campaign (and per store, which
        records the executor that computed it; a store is always resumed
        with that executor, and naming another one is an error). Compiled
        programs are kept for later ``run`` calls.
        ``chunk_size`` trials are computed (and stored) at a time; memory grows
        with it, not with ``trials``. ``store``: a directory written chunk by
        chunk and resumed on the next call, with any chunk size (and the
        executor it records).
        ``margin``: before each chunk, stop if every per-trial rate's interval
        (``confidence``, ``method``) has a half-width of at most ``margin``; the
        trials kept are then a prefix, and the same call stops at the same
        trial again. ``verify`` checks a batched executor against the unbatched
        trial on the first and last trial of each of the run's first
        ``VERIFY_CHUNKS`` (4) chunks. ``devices``: this process's devices a chunk is split
        over (all local ones by default). ``quiet`` hides the progress bar.

        With several processes (``jaxfi.distributed``) every process makes the
        same call: each chunk is split over all processes' devices, each
        process stores its own share, and every process returns the whole
        table. The processes must agree on the campaign and on these
        arguments (but for ``executor``, ``verify``, ``quiet``, ``devices``
        and the store's path), or every process raises a ``ValueError``.
        """
        listed = [len(p.faults) for p in self.plans if p.faults is not None]
        if trials is None:
            if not listed:
                raise ValueError("trials is required unless a plan has a fault list")
            trials = min(listed)
        trials, chunk_size = _positive("trials", trials, 0), _positive("chunk_size", chunk_size, 1)
        if trials > MAX_TRIALS:
            raise ValueError(f"trials must be at most {MAX_TRIALS} per point, got {trials}")
        point = _positive("point", point, 0)
        if point >= self.points:
            raise ValueError(f"point must be in [0, {self.points}) (the plans' sweep points), got {point}")
        first = point_index(point, 0)
        if listed and trials > min(listed):
            raise ValueError(f"trials={trials} exceeds the {min(listed)} trials of the plan's fault list")
        devices = _own(devices)
        layout = Layout.current(len(devices), min(chunk_size, max(trials, 1)))
        layout.agree("the campaign configuration", {
            "campaign": self.config, "trials": trials, "point": point, "chunk_size": chunk_size, "margin": margin,
            "confidence": confidence, "method": method, "store": store is not None})
        quiet = quiet or layout.index != 0
        db = Store(store, self.config, process_index=layout.index) if store is not None else None
        session = _Session(self, exec_lib.executor(executor), layout, devices, verify, quiet, db)
        parts = self._stored(db, (first, first + trials))
        tally = _Tally(self, parts)
        ranges = db.missing(first + trials, start=first) if db is not None else [(first, first + trials)]
        if db is not None:
            layout.agree("the trials already stored", {"missing": ranges},
                         f"\nThe store {db.path} must be on a file system every process shares.")
        left = sum(b - a for a, b in ranges)
        stopped = False
        with tqdm(total=trials, initial=tally.trials, unit="trial", disable=quiet,
                  desc="campaign" if self.points == 1 else f"point {point}", dynamic_ncols=True) as bar:
            session.bar = bar
            for start, stop in _chunks(ranges, chunk_size):
                if margin is not None and tally.converged(margin, confidence, method):
                    stopped = True
                    break
                if not session.started:
                    session.start(start, left)
                parts.append(self._chunk(session, db, layout, start, stop))
                left -= stop - start
                tally.add(parts[-1])
                bar.update(stop - start)
        return self._result(parts, session.name, session.timings, stopped, trials, session.compile_seconds)

    def _golden_of(self, j: int, program: int, runner_golden: Callable[[int], np.ndarray]) -> outcomes_lib.Golden:
        """Microbatch ``j``'s golden run of ``program`` (padding dropped)."""
        if (j, program) not in self._goldens:
            a = self._spans[j][0]
            labels = None if self.labels is None else self.labels[a:][self._real(j)]
            self._goldens[j, program] = outcomes_lib.golden(np.asarray(runner_golden(program))[self._real(j)],
                                                            labels)
        return self._goldens[j, program]

    def _whole_golden(self, program: int) -> outcomes_lib.Golden:
        """The whole batch's golden run of ``program``, from its microbatches'."""
        if ("all", program) not in self._goldens:
            parts = [self._goldens[j, program].output for j in range(len(self._spans))]
            self._goldens["all", program] = outcomes_lib.golden(np.concatenate(parts), self.labels)
        return self._goldens["all", program]

    def _runner(self, chosen: exec_lib.Executor, width: int, devices: Sequence[jax.Device]) -> exec_lib.Runner:
        """The campaign's runner of ``chosen`` (built on first use, then kept)."""
        key = _runner_key(chosen, width, devices)
        if key not in self._runners:
            self._runners[key] = chosen.build(self._trials, width, devices)
        return self._runners[key]

    def _chunk(self, session: _Session, db: Store | None, layout: Layout,
               start: int, stop: int) -> dict[str, np.ndarray]:
        """Compute and store this process's share of trials [start, stop); return all of them."""
        a, b = layout.share(start, stop)
        template = {name: arr for name, arr in self._empty_columns.items() if name != "trial"}

        def share() -> dict[str, np.ndarray]:
            if a == b:
                return template
            columns = self._columns(session.microbatches(a, b))
            if db is not None:
                db.write_chunk(a, b, columns)
            return columns

        columns = layout.gather(share, template, start, stop)
        return {"trial": np.arange(start, stop, dtype=np.int64), **columns}

    def load(self, store: str | os.PathLike) -> Result:
        """The results already in ``store``, which this campaign's config must have created.

        Args:
          store: the store's directory.

        Returns:
          A Result of the stored trials.

        Raises:
          FileNotFoundError: there is no store at ``store``.
          ValueError: the store belongs to another campaign.
        """
        parts = self._stored(Store(store, self.config, create=False), None)
        return self._result(parts, "", None, False, None)

    def replay(self, index: int, point: int = 0) -> TrialResult:
        """Recompute trial ``index`` of sweep ``point`` alone; equal bit for bit to its row in any run.

        Args:
          index: a trial index in [0, MAX_TRIALS).
          point: the sweep point (0 without a sweep).

        Returns:
          The trial's output, records and outcomes.
        """
        index = _positive("index", index, 0)
        if index >= MAX_TRIALS:
            raise ValueError(f"index must be below {MAX_TRIALS} (trials per point), got {index}")
        point = _positive("point", point, 0)
        if point >= self.points:
            raise ValueError(f"point must be in [0, {self.points}) (the plans' sweep points), got {point}")
        runs, records = [], None
        for j in range(len(self._spans)):
            trials = self._trials if j == 0 else self._trials.on(self._microbatch(j))
            output, recorded = trials.replay(point_index(point, index))
            records = recorded if records is None else records
            computed = Computed(output[None], jax.tree.map(lambda a: a[None], recorded),
                                np.asarray([REFERENCE], np.int64))
            runs.append((j, computed, lambda program, trials=trials: trials.golden))
        columns = self._columns(runs)
        output = np.concatenate([c.output[0][self._real(j)] for j, c, _ in runs])
        return TrialResult(index, output, records,
                           {name: columns[name][0].item() for name in self.outcome_names})

    def _columns(self, runs: Iterable[tuple[int, Computed, Callable[[int], np.ndarray]]]) -> dict[str, np.ndarray]:
        """Per-trial columns of a chunk: outcomes against the golden run of
        each trial's own program, the program, then every record array.

        ``runs`` yields, per microbatch ``j``, its trials and its runner's
        ``golden(program)``; each is reduced to per-input figures before the
        next is computed. Records come from the first microbatch.
        """
        figures, outputs, first = [], [], None
        for j, out, golden in runs:
            programs = np.asarray(out.program).astype(np.int64)
            if first is None:
                first = out
            elif not np.array_equal(programs, first.program):
                raise ValueError("the executor computed a trial with different programs on two microbatches")
            batch = np.asarray(out.output)[:, self._real(j)]
            figures.append(self._per_input(j, batch, programs, golden))
            if self._outcome_fns:
                outputs.append(batch)
        programs = np.asarray(first.program).astype(np.int64)
        joined = {name: np.concatenate([f[name] for f in figures], axis=1) for name in figures[0]}
        columns = outcomes_lib.reduce_inputs(joined, self.labels is not None)
        if self._outcome_fns:
            columns.update(self._custom_columns(np.concatenate(outputs, axis=1), programs))
        columns["program"] = programs
        for j, record in enumerate(first.records):
            for field in Record._fields:
                columns[_RECORD_COLUMN.format(plan=j, field=field)] = np.asarray(getattr(record, field))
        return columns

    def _per_input(self, j: int, batch: np.ndarray, programs: np.ndarray,
                   golden: Callable[[int], np.ndarray]) -> dict[str, np.ndarray]:
        """Microbatch ``j``'s per-input figures, each trial against its program's golden run."""
        figures: dict[str, np.ndarray] = {}
        for program in np.unique(programs) if len(programs) else [REFERENCE]:
            rows = programs == program
            part = outcomes_lib.per_input(self._golden_of(j, int(program), golden), batch[rows])
            for name, a in part.items():
                figures.setdefault(name, np.empty((len(programs),) + a.shape[1:], a.dtype))[rows] = a
        return figures

    def _custom_columns(self, outputs: np.ndarray, programs: np.ndarray) -> dict[str, np.ndarray]:
        columns = {name: np.zeros(len(programs), dtype) for name, dtype in self._custom.items()}
        for program in np.unique(programs):
            rows = programs == program
            part = outcomes_lib.custom(self._outcome_fns, self._custom, self._whole_golden(int(program)),
                                       outputs[rows])
            for name, a in part.items():
                columns[name][rows] = a
        return columns

    def _stored(self, db: Store | None, span: tuple[int, int] | None) -> list[dict[str, np.ndarray]]:
        if db is None:
            return []
        try:
            arrays = db.load_arrays()
        except ForeignChunkError:
            raise  # its message already says how to recover
        except CorruptChunkError as err:
            raise CorruptChunkError(err.path, f"{err.problem}; move it aside with "
                                    "Store.quarantine and run again to recompute its trials") from err
        if arrays["trial"].size == 0:
            return []
        keep = ((arrays["trial"] >= span[0]) & (arrays["trial"] < span[1])) if span is not None else slice(None)
        return [{name: a[keep] for name, a in arrays.items()}]

    def _result(self, parts: list[dict[str, np.ndarray]], executor: str, timings: pd.DataFrame | None,
                stopped: bool, requested: int | None, compile_seconds: float | None = None) -> Result:
        columns = _merge(parts, self._empty_columns)
        records = tuple(
            Record(*(columns[_RECORD_COLUMN.format(plan=j, field=f)] for f in Record._fields))
            for j in range(len(self.plans)))
        point, trial = split_index(columns["trial"])
        table = pd.DataFrame({"trial": trial, **({"point": point} if self.points > 1 else {}),
                              **{n: columns[n] for n in self.outcome_names},
                              "program": columns["program"],
                              **fault_summary(records, self.sites)})
        return Result(table, records, self.golden, self.sites, executor, timings, stopped,
                      requested, tuple(self._custom), compile_seconds)

    @functools.cached_property
    def _empty_columns(self) -> dict[str, np.ndarray]:
        """Zero-row columns of every dtype and per-trial shape a table has."""
        output, records = jax.eval_shape(self._trials.fn, self._trials.base_key, np.int32(0),
                                         self.params, self._trials.inputs)
        empty = jax.tree.map(lambda s: np.zeros((0, *s.shape), s.dtype), (output, records))
        computed = Computed(*empty, np.zeros(0, np.int64))
        runs = [(j, computed, lambda program: self._trials.golden) for j in range(1)]
        return {"trial": np.zeros(0, np.int64), **self._columns(runs)}


class _Session:
    """The executor of one ``run``: decided and built before the first chunk, then reused."""

    def __init__(self, campaign: Campaign, chosen: exec_lib.Executor, layout: Layout,
                 devices: list[jax.Device], verify: bool, quiet: bool, db: Store | None):
        self._campaign, self._chosen, self._layout = campaign, chosen, layout
        self._devices, self._verify, self._quiet, self._db = devices, verify, quiet, db
        self._runner: exec_lib.Runner | None = None
        self._unverified = 0
        self.timings: pd.DataFrame | None = None
        self.bar: Any = None

    @property
    def name(self) -> str:
        return self._runner.name if self._runner is not None else ""

    @property
    def compile_seconds(self) -> float | None:
        return self._runner.compile_seconds if self._runner is not None else None

    @property
    def started(self) -> bool:
        return self._runner is not None

    def microbatches(self, start: int, stop: int) -> Iterator[tuple[int, Computed, Callable[[int], np.ndarray]]]:
        """Per microbatch: its index, trials [start, stop) on it, and its runner's golden."""
        campaign = self._campaign
        for j in range(len(campaign._spans)):
            runner = self._runner if j == 0 else self._runner.on(campaign._microbatch(j))
            out = runner(start, stop)
            if j == 0 and self._unverified:
                exec_lib.verify(runner.name, out, campaign._trials, start, stop)
                self._unverified -= 1
            yield j, out, runner.golden

    def start(self, start: int, trials_left: int) -> None:
        """Decide the executor and build its runner. Every process calls this
        before the first chunk: process 0 decides, the others follow."""
        decided: exec_lib.Executor | None = None
        message = {}
        if self._layout.index == 0:
            try:
                decided = self._decide(start, trials_left)
                message = exec_lib.spec(decided)
            except ValueError as err:
                message = {"error": str(err)}
        message = json.loads(self._layout.first(json.dumps(message)))
        if "error" in message:
            raise ValueError(message["error"])
        chosen = decided or (self._chosen if exec_lib.spec(self._chosen) == message else exec_lib.from_spec(message))
        self._runner = self._campaign._runner(chosen, self._layout.width(), self._devices)
        if len(self._campaign._spans) > 1 and not callable(getattr(self._runner, "on", None)):
            raise ValueError(f"executor {self._runner.name!r} cannot run microbatches (its runner has no "
                             "on(inputs)); with batch_size use 'loop', 'map', 'vmap' or 'auto'")
        batched = isinstance(chosen, (exec_lib.VmapExecutor, exec_lib.MapExecutor))
        self._unverified = VERIFY_CHUNKS if self._verify and batched else 0
        if self._db is not None and self._layout.index == 0:
            self._db.record("executor", message)
        self.bar.set_postfix(executor=self._runner.name)

    def _decide(self, start: int, trials_left: int) -> exec_lib.Executor:
        """The executor: the one the store recorded, else auto's decision (made
        once per campaign), else the one asked for."""
        campaign, db = self._campaign, self._db
        recorded = db.recorded("executor") if db is not None else None
        auto = isinstance(self._chosen, exec_lib.AutoExecutor)
        if recorded is not None:
            if not auto and recorded != exec_lib.spec(self._chosen):
                raise ValueError(
                    f"store {db.path} was computed by executor {recorded.get('name')!r}; a store "
                    f"is resumed with the executor that computed it, not {self._chosen.name!r}: "
                    f"pass executor='auto' (or that executor), or use a new store")
            chosen = exec_lib.from_spec(recorded) if auto else self._chosen
            if chosen is None:
                raise ValueError(f"store {db.path} was computed by the custom executor "
                                 f"{recorded.get('name')!r}: pass that executor object to resume it")
            return chosen
        if not auto:
            _check_fits(self._chosen, campaign)
            return self._chosen
        if campaign._decided is None:
            fitting = tuple(c for c in self._chosen.candidates if _fits(c, campaign)) or ("loop",)
            auto = dataclasses.replace(self._chosen, candidates=fitting)
            chosen, runner, table = exec_lib.choose(auto, campaign._trials, self._layout.width(),
                                                    self._devices, start, trials_left)
            if runner is not None:
                campaign._runners.setdefault(_runner_key(chosen, self._layout.width(), self._devices), runner)
            campaign._decided, campaign._decision_table = chosen, table
            if not self._quiet:
                self.bar.write(f"executor auto chose {chosen.name!r}:\n" + table.to_string(index=False))
        self.timings = campaign._decision_table
        return campaign._decided


def _fits(chosen: exec_lib.Executor, campaign: Campaign) -> bool:
    """Whether ``chosen`` can run ``campaign``: the grouped executor slices rows
    and draws faults itself, so no permanent or fault-list plans, and no sites
    inside loop or branch bodies, which its row programs do not see."""
    if not isinstance(chosen, exec_lib.GroupedExecutor):
        return True
    special = any(p.permanent or p.faults is not None for p in campaign.plans)
    return not special and not any(getattr(site, "control_flow", "") for sites in campaign.sites for site in sites)


def _check_fits(chosen: exec_lib.Executor, campaign: Campaign) -> None:
    if not _fits(chosen, campaign):
        raise ValueError(f"executor {chosen.name!r} cannot run this campaign (permanent or fault-list plans, "
                         "or sites inside scan/while/cond bodies): use 'loop', 'map', 'vmap' or 'auto'")


def _runner_key(chosen: exec_lib.Executor, width: int, devices: Sequence[jax.Device]) -> tuple[Any, ...]:
    return chosen.name, repr(exec_lib.spec(chosen)), width, tuple(devices)


class _Tally:
    """Running event counts, for the stopping rule without re-reading the table."""

    def __init__(self, campaign: Campaign, parts: Sequence[Mapping[str, np.ndarray]]):
        # Per-trial events only: a count of inputs needs the per-trial values
        # for its cluster interval, and is bounded by its per-trial event.
        self._groups = [g for g in rate_groups(campaign.golden, campaign.outcome_names, campaign._custom)
                        if g[2] == "trial"]
        self._sums = {name: 0 for names, _, _ in self._groups for name in names}
        self.trials = 0
        for part in parts:
            self.add(part)

    def add(self, part: Mapping[str, np.ndarray]) -> None:
        self.trials += len(part["trial"])
        for name in self._sums:
            self._sums[name] += int(np.sum(part[name]))

    def converged(self, margin: float, confidence: float, method: str) -> bool:
        k = [self._sums[n] for names, _, _ in self._groups for n in names]
        n = [self.trials * per for names, per, _ in self._groups for _ in names]
        return stats.converged((np.asarray(k), np.asarray(n)), margin, confidence, method)


def rate_groups(golden: outcomes_lib.Golden, names: Sequence[str],
                custom: Mapping[str, np.dtype]) -> list[tuple[tuple[str, ...], int, str]]:
    """(outcome columns, units per trial, unit name) for every rate a campaign reports."""
    events = tuple(n for n in outcomes_lib.EVENTS if n in names)
    events += tuple(n for n, dtype in custom.items() if dtype == np.dtype(bool))
    groups = [(events, 1, "trial"), (outcomes_lib.INPUT_COUNTS, golden.batch, "input")]
    if golden.n_correct:
        groups.append((("sdc_correct_inputs",), golden.n_correct, "correct input"))
    return groups


@dataclasses.dataclass
class Result:
    """A campaign's trials: ``table`` (one row per trial) and the raw ``records``.

    ``table`` has the trial index, every outcome, and a fault summary: number
    of faults, ``overflow`` (a rate plan drew more than its cap), the first
    fault's site, flat index and bit, and the strata ``site`` and ``bit``.
    ``records`` holds one Record per plan with arrays stacked by table row.
    ``executor`` names the executor used (the choice of "auto"), ``timings``
    what auto measured, ``stopped_early`` whether the margin was met before
    the trial budget, ``compile_seconds`` what the executor has spent
    compiling for this campaign so far (None when nothing was computed). A
    Result whose table has truncated (``overflow``) trials warns when it is
    made, and ``summary`` counts them per row.
    """

    table: pd.DataFrame
    records: tuple[Record, ...]
    golden: outcomes_lib.Golden
    sites: tuple[tuple[Site, ...], ...]
    executor: str
    timings: pd.DataFrame | None
    stopped_early: bool
    trials_requested: int | None
    custom_outcomes: tuple[str, ...] = ()
    compile_seconds: float | None = None

    def __post_init__(self):
        truncated = int(self.table["overflow"].sum())
        if truncated:
            warnings.warn(
                f"{truncated} of {len(self.table)} trials drew more faults than their plan's "
                "cap and were truncated, so rates are biased low: raise the plan's max_faults "
                "(or leave it out for the automatic cap)", UserWarning, stacklevel=3)

    def __len__(self) -> int:
        return len(self.table)

    def summary(self, by: str | Sequence[str] | None = None, confidence: float = 0.95,
                method: str = "wilson") -> pd.DataFrame:
        """Rates with confidence intervals, one row per outcome (and stratum, with ``by``).

        Per-trial rates (``per == "trial"``) are the probability that a trial
        has at least one such input; per-input rates divide the count of
        affected inputs by trials x batch size, or by trials x inputs golden
        got right for ``sdc_correct_inputs``. ``method`` is "wilson" or
        "clopper_pearson" (per-trial rates). Per-input rates get cluster
        intervals with the trial as the cluster (``stats.cluster_interval``):
        one fault changes many inputs at once, so inputs are not
        independent. Per-trial rates depend on the number of inputs a trial
        evaluates (``golden.batch``): quote them with it.
        ``overflow`` counts the row's trials that were truncated at a cap.
        """
        keys = [by] if isinstance(by, str) else list(by or [])
        frames = []
        custom = {n: self.table[n].dtype for n in self.custom_outcomes}
        for names, per, unit in rate_groups(self.golden, list(self.table.columns), custom):
            s = stats.stratified_rates(self.table, names, by=keys, confidence=confidence,
                                method=method, denominator=None if unit == "trial" else per)
            for name in names:
                frames.append(pd.DataFrame({
                    **{key: s[key] for key in keys}, "outcome": name, "per": unit,
                    "k": s[f"{name}_k"], "n": s[f"{name}_n"], "rate": s[f"{name}_rate"],
                    "lo": s[f"{name}_lo"], "hi": s[f"{name}_hi"]}))
        out = pd.concat(frames, ignore_index=True)
        out["half_width"] = (out["hi"] - out["lo"]) / 2
        if not keys:
            out["overflow"] = int(self.table["overflow"].sum())
            return out.set_index("outcome")
        truncated = self.table.groupby(keys)["overflow"].sum().rename("overflow").reset_index()
        return out.merge(truncated, on=keys, how="left")

    def continuous(self, by: str | Sequence[str] | None = None,
                   confidence: float = 0.95) -> pd.DataFrame:
        """Means and Student-t intervals (over trials) of the continuous outcomes (finite values only)."""
        names = [n for n in ("accuracy", "max_abs_dev", "rel_l2") if n in self.table]
        names += [n for n in self.custom_outcomes if self.table[n].dtype != bool]
        keys = [by] if isinstance(by, str) else list(by or [])
        if not keys:
            return pd.DataFrame({n: stats.mean_interval(self.table[n], confidence) for n in names}).T
        return stats.stratified_rates(self.table, [], by=keys, confidence=confidence, continuous=names)

    def faults(self) -> pd.DataFrame:
        """One row per placed fault: trial, plan, site, index, bits, values before and after."""
        frames = []
        for j, (record, sites) in enumerate(zip(self.records, self.sites)):
            rows = record_table(record, sites)
            rows["trial"] = self.table["trial"].to_numpy()[rows["trial"].to_numpy(int)]
            rows.insert(1, "plan", j)
            frames.append(rows)
        return pd.concat(frames, ignore_index=True).sort_values(["trial", "plan"], kind="stable")


def fault_summary(records: Sequence[Record], sites: Sequence[Sequence[Site]]) -> dict[str, np.ndarray]:
    """Per trial: faults, overflow, first_site, first_index, first_bit, and strata site, bit."""
    names: list[str] = []
    sid, index, bit, valid = [], [], [], []
    for record, plan_sites in zip(records, sites):
        ids = [_intern(names, s.name) for s in plan_sites]
        lookup = np.asarray(ids + [-1], np.int64)  # record site -1 (unused slot) -> -1
        sid.append(lookup[np.asarray(record.site)])
        index.append(np.asarray(record.index).astype(np.int64))
        bit.append(_single_bit(np.asarray(record.mask)))
        valid.append(np.asarray(record.valid))
    # One blank slot more, so that trials of plans with count=0 still have a column.
    blank = [np.full((len(valid[0]), 1), fill, a[0].dtype)
             for a, fill in ((sid, -1), (index, -1), (bit, -1), (valid, False))]
    sid, index, bit, valid = (np.concatenate(a + [b], axis=1)
                              for a, b in zip((sid, index, bit, valid), blank))
    rows = np.arange(len(valid))
    has = valid.any(axis=1)
    first = np.argmax(valid, axis=1)
    label = np.asarray(names + ["none"], dtype=object)
    lo = np.where(valid, sid, len(names)).min(axis=1)
    hi = np.where(valid, sid, -1).max(axis=1)
    lo_bit = np.where(valid, bit, 64).min(axis=1)
    hi_bit = np.where(valid, bit, -1).max(axis=1)
    overflow = np.stack([np.asarray(r.overflow) for r in records], axis=1).any(axis=1)
    return {
        "faults": valid.sum(axis=1),
        "overflow": overflow,
        "first_site": label[np.where(has, sid[rows, first], len(names))],
        "first_index": np.where(has, index[rows, first], -1),
        "first_bit": np.where(has, bit[rows, first], -1),
        "site": np.where(~has, "none", np.where(lo == hi, label[np.minimum(lo, len(names))], "mixed")),
        "bit": np.where(has & (lo_bit == hi_bit), lo_bit, -1),
    }


def _points(plans: Sequence[Plan]) -> int:
    """The sweep points the plans share (1 without a sweep)."""
    swept = {p.points for p in plans if p.points > 1}
    if len(swept) > 1:
        raise ValueError(f"plans sweep different numbers of rates {sorted(swept)}: give every swept "
                         "plan the same number of points")
    return swept.pop() if swept else 1


def _chunks(ranges: Sequence[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Split ranges of missing trials into chunks of at most ``size``, never across a gap."""
    return [(a, min(a + size, stop)) for start, stop in ranges for a in range(start, stop, size)]


def _intern(names: list[str], name: str) -> int:
    if name not in names:
        names.append(name)
    return names.index(name)


def _single_bit(mask: np.ndarray) -> np.ndarray:
    """The position of the one set bit of each mask, -1 if none or several are set."""
    m = mask.astype(np.uint64)
    single = (m != 0) & ((m & (m - np.uint64(1))) == 0)
    position = np.frexp(m.astype(np.float64))[1] - 1  # exact: powers of two fit a float64
    return np.where(single, position, -1).astype(np.int64)


def _merge(parts: list[dict[str, np.ndarray]], empty: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not parts:
        return empty
    order = np.argsort(np.concatenate([p["trial"] for p in parts]), kind="stable")
    return {name: np.concatenate([p[name] for p in parts])[order] for name in parts[0]}


def _spans(inputs: Any, batch_size: int | None) -> list[tuple[int, int]]:
    """The row ranges of the microbatches of ``inputs`` (one range without ``batch_size``)."""
    if batch_size is None:
        return [(0, 0)]  # one batch, whatever its size
    leaves = [leaf for leaf in jax.tree.leaves(inputs) if hasattr(leaf, "shape")]
    rows = {int(np.shape(leaf)[0]) if np.ndim(leaf) else None for leaf in leaves}
    if len(rows) != 1 or None in rows:
        raise ValueError(f"batch_size needs inputs whose every array has the same leading (batch) "
                         f"axis, got leading sizes {sorted(map(str, rows))}")
    n = rows.pop()
    size = min(batch_size, max(n, 1))
    return [(a, min(a + size, n)) for a in range(0, n, size)] or [(0, n)]


def _own(devices: Sequence[jax.Device] | None) -> list[jax.Device]:
    """This process's devices among ``devices`` (default: all of them)."""
    own = [d for d in (devices if devices is not None else jax.local_devices())
           if d.process_index == jax.process_index()]
    if not own:
        raise ValueError(f"devices must include one of this process's devices, got {devices!r}")
    return own


def _positive(name: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    return int(value)
