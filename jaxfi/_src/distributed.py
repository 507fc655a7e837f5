"""Campaigns over several processes on JAX's distributed runtime.

Every process runs the same script; ``initialize`` connects them before any
other JAX call::

    jaxfi.distributed.initialize()   # from the cluster (Slurm, TPU pod) or a no-op
    campaign = jaxfi.Campaign(apply_fn, params, images, labels, plan, seed=0)
    result = campaign.run(trials=100_000, store="/shared/runs/x")

``Campaign.run`` then lays each chunk of trials over the global device list,
process by process: a process computes the trials that fall on its own devices
(params and inputs replicated, its executor sharding them over its devices),
writes them to its own chunk file, and all processes gather every chunk's
columns, so each ends with the whole table. Trials are independent, so no
program spans processes: processes exchange only the per-trial columns and a
few hashes, and may even choose different executors (all give the same bits).

Before running, the processes compare their campaign configuration and the
trials they see stored; a difference is a ``ValueError`` on every process
rather than a hang.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxfi._src.extras import require
from jaxfi._src.store import canonical_json, differences

if TYPE_CHECKING:
    from absl import flags

Columns = dict[str, np.ndarray]

_FLAGS = (
    ("coordinator_address", "DEFINE_string",
     "host:port of process 0's coordinator. Unset: taken from the cluster JAX detects "
     "(Slurm, Open MPI, Cloud TPU pod) or JAX_COORDINATOR_ADDRESS; none of them: one process.", {}),
    ("num_processes", "DEFINE_integer",
     "Number of processes (unset: from the cluster).", {"lower_bound": 1}),
    ("process_id", "DEFINE_integer",
     "This process's index, 0 .. num_processes - 1 (unset: from the cluster).", {"lower_bound": 0}),
)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, **options: Any) -> None:
    """Start JAX's distributed runtime for a multi-process campaign; a no-op for one process.

    Unset arguments come from the cluster JAX detects (Slurm, Open MPI, Cloud
    TPU pods) or JAX_COORDINATOR_ADDRESS. With none of them, or with
    ``num_processes=1``, there is one process and nothing to start. ``options``
    go to ``jax.distributed.initialize`` (``initialization_timeout``,
    ``local_device_ids``, ...). Call it before any other JAX call; calling it
    again once started does nothing.
    """
    if jax.distributed.is_initialized():
        return
    if num_processes is None:
        num_processes = _cluster_processes()
    if num_processes is None and coordinator_address is None \
            and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
        num_processes = 1
    if num_processes == 1:
        if process_id not in (None, 0):
            raise ValueError(f"process_id must be 0 with one process, got {process_id!r}")
        return
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **options)


def _cluster_processes() -> int | None:
    """The process count of the cluster JAX would detect, None outside one."""
    # jax.distributed.initialize() detects clusters itself but cannot tell us
    # beforehand whether it would find one, nor its size; its registry can.
    from jax._src.clusters import ClusterEnv
    for env in ClusterEnv._cluster_types:
        if not env.opt_in_only_method and env.is_env_present():
            return int(env.get_process_count())
    return None


def define_flags(flag_values: flags.FlagValues | None = None) -> None:
    """Define --coordinator_address, --num_processes and --process_id (skipping defined ones).

    Args:
      flag_values: where to define them; absl's global ``FLAGS`` by default.

    Raises:
      ImportError: absl-py is not installed (the ``experiments`` extra).
    """
    absl_flags = require("absl.flags", "experiments")
    flag_values = absl_flags.FLAGS if flag_values is None else flag_values
    for name, define, help_text, bounds in _FLAGS:
        if name not in flag_values:
            getattr(absl_flags, define)(name, None, help_text, flag_values=flag_values, **bounds)


def initialize_from_flags(flag_values: flags.FlagValues | None = None, **options: Any) -> None:
    """``initialize`` with the values of the flags from ``define_flags``.

    Args:
      flag_values: the parsed flags; absl's global ``FLAGS`` by default.
      **options: passed to ``jax.distributed.initialize``.
    """
    if flag_values is None:
        flag_values = require("absl.flags", "experiments").FLAGS
    initialize(flag_values.coordinator_address, flag_values.num_processes,
               flag_values.process_id, **options)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one run splits its chunks over processes.

    ``devices`` holds every process's device count. A chunk is split over the
    global device list, process-major: process p gets a contiguous share in
    proportion to its devices, so a trial is computed exactly once.
    """

    index: int
    devices: tuple[int, ...]
    chunk_size: int

    @classmethod
    def current(cls, local_devices: int, chunk_size: int) -> Layout:
        """This process's layout (a collective when there are several processes)."""
        if jax.process_count() == 1:
            return cls(0, (local_devices,), chunk_size)
        counts = _allgather(np.asarray([local_devices], np.int64))[:, 0]
        return cls(jax.process_index(), tuple(int(c) for c in counts), chunk_size)

    @property
    def processes(self) -> int:
        return len(self.devices)

    def width(self, process: int | None = None) -> int:
        """The most trials of a chunk that ``process`` (this one by default) computes."""
        n = self.devices[self.index if process is None else process]
        return -(-self.chunk_size * n // sum(self.devices))  # shares never exceed it

    def share(self, start: int, stop: int, process: int | None = None) -> tuple[int, int]:
        """The trials of [start, stop) that ``process`` (this one by default) computes."""
        p = self.index if process is None else process
        total = sum(self.devices)

        def edge(q: int) -> int:
            return start + (stop - start) * sum(self.devices[:q]) // total

        return edge(p), edge(p + 1)

    def agree(self, what: str, facts: Mapping[str, Any], hint: str = "") -> None:
        """Raise ``ValueError`` on every process unless all of them hold the same ``facts``."""
        if self.processes == 1:
            return
        text = canonical_json(facts).encode()
        digest = np.frombuffer(hashlib.sha256(text).digest(), np.uint8)
        digests, lengths = _allgather((digest, np.asarray([len(text)], np.int64)))
        if (digests == digests[0]).all():
            return
        # Only on this error path: every process sends its whole text for a diff.
        padded = _allgather(np.frombuffer(text.ljust(int(lengths.max()), b" "), np.uint8))
        texts = [json.loads(bytes(row[:n])) for row, n in zip(padded, lengths[:, 0])]
        lines = [f"process {p}: " + "; ".join(differences(texts[0], texts[p]))
                 for p in range(1, self.processes) if (digests[p] != digests[0]).any()]
        raise ValueError(f"processes disagree on {what} (process 0 -> process p):\n"
                         + "\n".join(lines) + hint)

    def first(self, text: str) -> str:
        """Process 0's ``text``, on every process (all of them must call this)."""
        if self.processes == 1:
            return text
        data = np.frombuffer(text.encode(), np.uint8)
        lengths = _allgather(np.asarray([data.size], np.int64))
        padded = _allgather(np.pad(data, (0, int(lengths.max()) - data.size)))
        return bytes(np.asarray(padded[0])[:int(lengths[0][0])]).decode()

    def gather(self, compute: Callable[[], Columns], template: Columns,
               start: int, stop: int) -> Columns:
        """Run ``compute`` (this process's share of [start, stop)) and return every process's rows.

        ``template`` gives the columns' dtypes and per-trial shapes. When any
        process fails, every process raises instead of waiting for it.
        """
        if self.processes == 1:
            return compute()
        try:
            mine, error = compute(), None
        except Exception as err:  # re-raised below, once the others know
            mine, error = template, err
        rows = max(self.width(p) for p in range(self.processes))
        try:
            failed, data = _allgather((np.asarray([error is not None], np.int32),
                                       _pack(mine, template, rows)))
        except Exception as err:  # gloo reports a dead peer as a bare ValueError
            raise RuntimeError(
                f"process {self.index} lost the others while gathering trials [{start}, {stop}): "
                "one of them has probably died; start all of them again to resume from the "
                "store") from err
        if error is not None:
            raise error
        if failed.any():
            raise RuntimeError(f"process(es) {np.flatnonzero(failed[:, 0]).tolist()} failed on "
                               f"trials [{start}, {stop}); their logs say why")
        counts = [b - a for a, b in (self.share(start, stop, p) for p in range(self.processes))]
        block = np.concatenate([data[p, :n] for p, n in enumerate(counts)])
        return _unpack(block, template)


def _allgather(tree: Any) -> Any:
    """Every process's copy of ``tree``, stacked on a new leading axis (process order)."""
    return multihost_utils.process_allgather(tree)


def _row_bytes(template: Columns) -> dict[str, int]:
    return {name: a.dtype.itemsize * int(np.prod(a.shape[1:], dtype=np.int64))
            for name, a in template.items()}


def _pack(columns: Columns, template: Columns, rows: int) -> np.ndarray:
    """Columns as raw bytes, one row per trial, zero-padded to ``rows``.

    Bytes rather than arrays: the gather moves data through JAX, which would
    turn float64 and int64 columns into 32-bit ones without ``jax_enable_x64``.
    """
    sizes = _row_bytes(template)
    n = len(next(iter(columns.values())))
    out = np.zeros((rows, sum(sizes.values())), np.uint8)
    offset = 0
    for name, size in sizes.items():
        arr = np.ascontiguousarray(columns[name])
        out[:n, offset:offset + size] = arr.reshape(-1).view(np.uint8).reshape(n, size)
        offset += size
    return out


def _unpack(block: np.ndarray, template: Columns) -> Columns:
    """The inverse of ``_pack`` for the rows in ``block``."""
    n, out, offset = len(block), {}, 0
    for name, size in _row_bytes(template).items():
        raw = np.ascontiguousarray(block[:, offset:offset + size])
        out[name] = raw.view(template[name].dtype).reshape((n, *template[name].shape[1:]))
        offset += size
    return out
