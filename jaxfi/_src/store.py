"""A resumable on-disk store of campaign results, safe for many writers.

Layout of a store directory::

    manifest.json                         format, config, config_hash
    executor.json                         the executor that computes the trials
    chunks/{start:012d}-{stop:012d}.npz   trials [start, stop), one per file
    quarantine/                           chunks moved aside by `quarantine`
    .tmp-*                                in-flight writes; readers ignore them

* The config is a JSON-serialisable mapping (string keys; tuples are stored
  as lists; NaN and infinity are refused). Its identity, ``config_hash``, is
  the SHA-256 of its canonical JSON. Reopening a store with a config whose
  canonical JSON differs is an error that names each differing key with
  the part of both values where they differ.
* The manifest is created atomically and exclusively (a hard link of a
  complete temporary file): of two creators with different configs one
  wins and the other gets that error; nothing mixes. A directory with
  chunks but no manifest is refused: nothing ties those chunks to a config.
* Every file is written to a unique temporary name, fsynced and renamed into
  place, so a reader sees a whole file or none. Only process 0 writes the
  manifest; every process writes its own disjoint chunks, so no other file
  is shared between processes.
* A chunk is an uncompressed npz (no pickles) with one member per column, a
  member "__campaign__" (the config_hash of the store that wrote it) and a
  member "__sha256__": a SHA-256 over the campaign, the chunk's range and,
  per column in name order, its name, dtype, shape and raw bytes. A
  truncated, corrupted or renamed chunk fails that check, or fails to
  parse, and raises `CorruptChunkError` naming the file; an intact chunk of
  another campaign (copied in) raises `ForeignChunkError`.
* Columns keep their dtype exactly. A column may be N-D (a fixed-shape array
  per trial, such as a fault record): `load_arrays` stacks it by trial,
  `load` puts it in an object column holding one array per trial.
* The store never deletes data: `quarantine` moves a chunk aside so that its
  range shows as missing and can be recomputed.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import re
import time
import uuid
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd

from jaxfi._src import identity

FORMAT = "jaxfi-store-2"  # 2: chunks carry their campaign
_CHUNK_NAME = re.compile(r"^(\d{12})-(\d{12})\.npz$")
_COLUMN_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
_TMP_PREFIX = ".tmp-"
_DIGEST = "__sha256__"
_CAMPAIGN = "__campaign__"
_EXCERPT = 60  # characters of each side shown for a differing config value
_CONTEXT = 20  # of them before the first difference (more to reach a whole word)
_BREAKS = frozenset(" ,;([{\"'=")
_MAX_STOP = 10**12 - 1  # file names hold 12 digits
_MISSING = object()


class CorruptChunkError(ValueError):
    """A chunk file that cannot be read or fails its checksum."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"corrupt chunk {path}: {problem}")
        self.path = Path(path)
        self.problem = problem


class ForeignChunkError(CorruptChunkError):
    """An intact chunk written by another campaign (copied in from another store)."""


# ------------------------------------------------------------------- config


def canonical_json(config: Mapping[str, Any]) -> str:
    """The canonical JSON text of a config: sorted keys, no spaces."""
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping, got {type(config).__name__}")
    try:
        return json.dumps(config, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise type(e)(f"config must be JSON-serialisable without NaN/inf: {e}") from None


def _text(value: Any) -> str:
    return "<absent>" if value is _MISSING else json.dumps(value, sort_keys=True)


def _excerpts(old: str, new: str) -> tuple[str, str]:
    """Both texts, or windows of them that start just before their first difference."""
    if len(old) <= _EXCERPT and len(new) <= _EXCERPT:
        return old, new
    same = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
    start = max(0, same - _CONTEXT)
    while start > 0 and old[start - 1] not in _BREAKS:  # start at a whole word
        start -= 1

    def window(text: str) -> str:
        piece = text[start:start + _EXCERPT]
        return ("..." if start else "") + piece + ("..." if start + _EXCERPT < len(text) else "")

    return window(old), window(new)


def differences(old: Any, new: Any, key: str = "") -> list[str]:
    """Lines ``key: old -> new`` for every leaf at which two JSON values differ as JSON text.

    Dicts are compared key by key, in sorted order, as dotted keys under
    ``key``; a key on one side only shows as ``<absent>`` on the other.
    """
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for k in sorted(set(old) | set(new))
                for line in differences(old.get(k, _MISSING), new.get(k, _MISSING),
                                        f"{key}.{k}" if key else k)]
    # Compare as JSON text: 1 == 1.0 == True in Python, but not in the hash.
    same = old is not _MISSING and new is not _MISSING and \
        json.dumps(old, sort_keys=True) == json.dumps(new, sort_keys=True)
    if same:
        return []
    before, after = _excerpts(_text(old), _text(new))
    return [f"{key or '<config>'}: {before} -> {after}"]


# --------------------------------------------------------------------- files


def _fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable across a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(dest: Path, write: Callable[[BinaryIO], None], tag: str) -> None:
    """Write via a unique temporary file in the same directory, then rename."""
    tmp = dest.parent / f"{_TMP_PREFIX}{dest.name}-{tag}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)  # our own partial file, never saved data
        raise
    _fsync_dir(dest.parent)


def _digest(campaign: str, start: int, stop: int, columns: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256(f"jaxfi-chunk {campaign} {start} {stop}\n".encode())
    for name in sorted(columns):
        arr = np.ascontiguousarray(columns[name])
        descr = np.lib.format.dtype_to_descr(arr.dtype)  # field names too
        h.update(f"{name} {descr} {arr.shape}\n".encode())
        h.update(arr.reshape(-1).view(np.uint8))
    return h.hexdigest()


def _write_npz(f: BinaryIO, arrays: Mapping[str, np.ndarray]) -> None:
    # Written member by member rather than with np.savez, whose own keyword
    # arguments ("file", "allow_pickle") would clash with column names.
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, arr, allow_pickle=False)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as e:  # zipfile and numpy raise a zoo of types on bad bytes
        raise CorruptChunkError(path, f"unreadable npz ({type(e).__name__}: {e})") from e


def _text_member(path: Path, columns: dict[str, np.ndarray], name: str, what: str) -> str:
    value = columns.pop(name, None)
    if value is None or value.shape != () or value.dtype.kind != "U":
        raise CorruptChunkError(path, f"no {name} {what} member")
    return str(value)


def _read_chunk(path: Path, start: int, stop: int, verify: bool,
                campaign: str) -> dict[str, np.ndarray]:
    """A chunk's columns, checked for shape, campaign and (if `verify`) checksum."""
    columns = _read_npz(path)
    stored = _text_member(path, columns, _DIGEST, "checksum")
    owner = _text_member(path, columns, _CAMPAIGN, "campaign identity")
    for name, arr in columns.items():
        if arr.ndim == 0 or len(arr) != stop - start:
            raise CorruptChunkError(
                path, f"column {name!r} has shape {arr.shape}, expected "
                      f"{stop - start} rows for trials [{start}, {stop})")
    if verify and _digest(owner, start, stop, columns) != stored:
        raise CorruptChunkError(path, "checksum mismatch: contents changed after writing")
    if owner != campaign:
        raise ForeignChunkError(
            path, f"written by another campaign (config_hash {owner[:12]}...), not this "
                  f"store's ({campaign[:12]}...): it was copied in from another store. Move it "
                  "aside with Store.quarantine, or start a new store")
    return columns


def _schema(columns: Mapping[str, np.ndarray]) -> dict[str, tuple[np.dtype, tuple]]:
    return {name: (arr.dtype, arr.shape[1:]) for name, arr in sorted(columns.items())}


def _check_column(name: Any, value: Any, rows: int) -> np.ndarray:
    if not isinstance(name, str) or not _COLUMN_NAME.match(name) or name == "trial":
        raise ValueError(
            f"column name {name!r} is not allowed: use a letter then letters, "
            "digits, '_', '.' or '-'; 'trial' is reserved")
    arr = np.asarray(value)
    if arr.dtype.hasobject:
        raise TypeError(f"column {name!r} has object dtype; only plain dtypes are stored")
    if arr.ndim == 0 or len(arr) != rows:
        raise ValueError(
            f"column {name!r} has shape {arr.shape}, expected {rows} rows (stop - start)")
    return arr


def _check_index(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None


# --------------------------------------------------------------------- store


class Store:
    """A directory of campaign results, one npz file per range of trials.

    `config` (JSON-serialisable) identifies the campaign: process 0 writes it
    to manifest.json on first use (unless `create` is False), and every later
    open must match it. Processes other than 0 wait up to `manifest_timeout`
    seconds for process 0 to create the manifest.
    """

    def __init__(self, path: str | os.PathLike, config: Mapping[str, Any], *,
                 process_index: int = 0, manifest_timeout: float = 60.0,
                 create: bool = True):
        self.path = Path(path)
        self.process_index = _check_index("process_index", process_index)
        if self.process_index < 0:
            raise ValueError(f"process_index must be >= 0, got {process_index!r}")
        self.config: dict[str, Any] = json.loads(canonical_json(config))
        self.config_hash = Store.identity(config)
        self._manifest = self.path / "manifest.json"
        self._chunk_dir = self.path / "chunks"
        if not create and not self._manifest.exists():
            raise FileNotFoundError(f"no store at {self.path}: it has no manifest.json")
        if self.process_index == 0 and not self._manifest.exists():
            self._create()
        else:
            self._check_manifest(self._read_manifest(manifest_timeout))
        self._chunk_dir.mkdir(exist_ok=True)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, config_hash={self.config_hash[:12]!r})"

    @staticmethod
    def identity(config: Mapping[str, Any]) -> str:
        """The campaign identity of a config: the SHA-256 of its canonical JSON.

        Args:
          config: a JSON-serialisable mapping.

        Returns:
          64 hex digits; every chunk of a store carries its store's.
        """
        return hashlib.sha256(canonical_json(config).encode()).hexdigest()

    # manifest

    def _create(self) -> None:
        """Create the manifest unless another creator wins; then check theirs."""
        self.path.mkdir(parents=True, exist_ok=True)
        orphans = list(self._chunk_dir.glob("*.npz")) if self._chunk_dir.is_dir() else []
        if orphans and not self._manifest.exists():
            raise ValueError(
                f"store {self.path} holds {len(orphans)} chunk file(s) but no manifest.json, "
                "so nothing ties them to a config and they are not used. Start a new store "
                f"(another path), or quarantine them by moving {self._chunk_dir} aside "
                f"(e.g. to {self.path / 'quarantine' / 'orphans'}) and run again")
        body = json.dumps({"format": FORMAT, "config": self.config,
                           "config_hash": self.config_hash},
                          sort_keys=True, indent=1, ensure_ascii=False)
        tmp = self.path / f"{_TMP_PREFIX}manifest-{self._tag}-{uuid.uuid4().hex[:8]}"
        _atomic_write(tmp, lambda f: f.write(body.encode()), self._tag)
        try:
            # A hard link never replaces an existing file: exactly one creator wins.
            os.link(tmp, self._manifest)
        except FileExistsError:
            self._check_manifest(self._read_manifest(0.0))
        finally:
            tmp.unlink()
        _fsync_dir(self.path)

    def _read_manifest(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not self._manifest.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"store {self.path}: no manifest.json after {timeout} s; process "
                    f"{self.process_index} waits for process 0 to create the store")
            time.sleep(0.1)
        try:
            return json.loads(self._manifest.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"store {self.path}: unreadable manifest.json: {e}") from None

    def _check_manifest(self, manifest: dict[str, Any]) -> None:
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else manifest
            raise ValueError(f"store {self.path}: manifest format is {found!r}, expected "
                             f"{FORMAT!r}; a store of another format cannot be resumed: "
                             "use a new path (or the jaxfi version that wrote it)")
        old = manifest.get("config")
        if not isinstance(old, dict) or canonical_json(old) != canonical_json(self.config):
            diffs = differences(old, self.config)
            raise ValueError(
                f"store {self.path} was created with a different config; differing "
                f"keys (stored -> given): {'; '.join(diffs)}. Use a new path, or the "
                f"stored config to resume.{identity.colour_hint(old)}")

    @property
    def _tag(self) -> str:
        return f"p{self.process_index}-{os.getpid()}"

    # decisions

    def recorded(self, name: str) -> Any:
        """A decision recorded under ``name`` (e.g. the executor), or None."""
        path = self.path / f"{name}.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"store {self.path}: unreadable {path.name}: {e}") from None

    def record(self, name: str, value: Any) -> Any:
        """Record a decision once: the first value written under ``name`` wins
        and is returned (a later, different value is not written)."""
        body = json.dumps(value, sort_keys=True, indent=1, ensure_ascii=False)
        dest = self.path / f"{name}.json"
        tmp = self.path / f"{_TMP_PREFIX}{name}-{self._tag}-{uuid.uuid4().hex[:8]}"
        _atomic_write(tmp, lambda f: f.write(body.encode()), self._tag)
        try:
            os.link(tmp, dest)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        _fsync_dir(self.path)
        return self.recorded(name)

    # chunks

    def _chunks(self) -> list[tuple[int, int, Path]]:
        """Stored (start, stop, path), sorted; overlapping ranges are an error."""
        found = []
        with os.scandir(self._chunk_dir) as entries:
            for entry in entries:
                match = _CHUNK_NAME.match(entry.name)
                if match:  # anything else (tmp files) is not a chunk
                    found.append((int(match[1]), int(match[2]), Path(entry.path)))
        found.sort()
        for start, stop, path in found:
            if start >= stop:
                raise ValueError(f"chunk {path} has an empty range [{start}, {stop})")
        for (_, stop_a, a), (start_b, _, b) in zip(found, found[1:]):
            if start_b < stop_a:
                raise ValueError(f"chunks overlap: {a} and {b}")
        return found

    def write_chunk(self, start: int, stop: int,
                    columns: Mapping[str, np.ndarray]) -> Path:
        """Store trials [start, stop); each column has stop - start rows.

        Columns are converted with np.asarray and keep their dtype. Refuses a
        range that overlaps a chunk already on disk; concurrent writers must
        be given disjoint ranges (`load` reports any overlap). Returns the
        chunk's path.
        """
        start, stop = _check_index("start", start), _check_index("stop", stop)
        if not 0 <= start < stop <= _MAX_STOP:
            raise ValueError(f"need 0 <= start < stop <= {_MAX_STOP}, "
                             f"got start={start}, stop={stop}")
        if not isinstance(columns, Mapping) or not columns:
            raise ValueError("columns must be a non-empty mapping of name -> array")
        arrays = {name: _check_column(name, value, stop - start)
                  for name, value in columns.items()}
        clashes = [str(p) for a, b, p in self._chunks() if a < stop and start < b]
        if clashes:
            raise ValueError(f"trials [{start}, {stop}) overlap stored chunks {clashes}")
        digest = _digest(self.config_hash, start, stop, arrays)
        arrays[_CAMPAIGN], arrays[_DIGEST] = np.array(self.config_hash), np.array(digest)
        dest = self._chunk_dir / f"{start:012d}-{stop:012d}.npz"
        _atomic_write(dest, lambda f: _write_npz(f, arrays), self._tag)
        return dest

    def completed(self) -> np.ndarray:
        """Sorted trial indices already stored (from file names only)."""
        ranges = [np.arange(a, b, dtype=np.int64) for a, b, _ in self._chunks()]
        return np.concatenate(ranges) if ranges else np.zeros(0, np.int64)

    def missing(self, n_trials: int, start: int = 0) -> list[tuple[int, int]]:
        """Ranges [a, b) of trials in [`start`, `n_trials`) not yet stored."""
        n_trials = _check_index("n_trials", n_trials)
        start = _check_index("start", start)
        if n_trials < 0 or start < 0:
            raise ValueError(f"n_trials and start must be >= 0, got {n_trials} and {start}")
        gaps, pos = [], start
        for a, b, _ in self._chunks():
            if a >= n_trials:
                break
            if b <= pos:
                continue
            if a > pos:
                gaps.append((pos, a))
            pos = b
        if pos < n_trials:
            gaps.append((pos, n_trials))
        return gaps

    # reading

    def load_arrays(self, verify: bool = True) -> dict[str, np.ndarray]:
        """All stored columns stacked by trial, plus "trial" (int64, sorted).

        `verify` checks every chunk's SHA-256 (parse and shape errors are
        always detected). Chunks must share column names, dtypes and
        per-trial shapes.
        """
        parts, schema, first = [], None, None
        for start, stop, path in self._chunks():
            columns = _read_chunk(path, start, stop, verify, self.config_hash)
            if schema is None:
                schema, first = _schema(columns), path
            elif _schema(columns) != schema:
                raise ValueError(f"chunk {path} has columns {_schema(columns)}, "
                                 f"but {first} has {schema}")
            parts.append({"trial": np.arange(start, stop, dtype=np.int64), **columns})
        if not parts:
            return {"trial": np.zeros(0, np.int64)}
        # An explicit dtype, as concatenate would turn big-endian data native.
        return {name: np.concatenate([p[name] for p in parts], dtype=arr.dtype)
                for name, arr in parts[0].items()}

    def load(self, verify: bool = True) -> pd.DataFrame:
        """All trials as a table sorted by trial, "trial" first.

        1-D columns keep their dtype; an N-D column becomes an object column
        whose cells are the per-trial arrays (use `load_arrays` to get it
        stacked).
        """
        arrays = self.load_arrays(verify)
        data = {"trial": arrays.pop("trial")}
        for name, arr in arrays.items():
            data[name] = arr if arr.ndim == 1 else pd.Series(list(arr), dtype=object)
        return pd.DataFrame(data)

    def verify(self) -> list[CorruptChunkError]:
        """Check every chunk; returns the problems found instead of raising."""
        problems = []
        for start, stop, path in self._chunks():
            try:
                _read_chunk(path, start, stop, True, self.config_hash)
            except CorruptChunkError as e:
                problems.append(e)
        return problems

    # maintenance

    def quarantine(self, file: str | os.PathLike) -> Path:
        """Move a chunk of this store into quarantine/ so it can be recomputed.

        `file` is a chunk's path or file name. The file is moved, never
        deleted or overwritten (a repeated name gets a numeric suffix).
        Returns its new path.
        """
        src = Path(file)
        if src.parent == Path("."):
            src = self._chunk_dir / src
        if not _CHUNK_NAME.match(src.name) or \
                src.resolve().parent != self._chunk_dir.resolve():
            raise ValueError(f"{file!s} is not a chunk file in {self._chunk_dir}")
        if not src.exists():
            raise FileNotFoundError(f"no chunk {src}")
        qdir = self.path / "quarantine"
        qdir.mkdir(exist_ok=True)
        dest, n = qdir / src.name, 0
        while dest.exists():
            n += 1
            dest = qdir / f"{src.name}.{n}"
        os.rename(src, dest)
        _fsync_dir(qdir)
        _fsync_dir(self._chunk_dir)
        return dest

    def clean_tmp(self, older_than_s: float = 3600.0) -> list[Path]:
        """Delete temporary files left by killed writers; returns them.

        Only files older than `older_than_s` go, so that a write still in
        flight in another process is left alone.
        """
        if not older_than_s >= 0:
            raise ValueError(f"older_than_s must be >= 0, got {older_than_s!r}")
        cutoff = time.time() - older_than_s
        removed = []
        for folder in (self.path, self._chunk_dir):
            for tmp in folder.glob(f"{_TMP_PREFIX}*"):
                if tmp.is_file() and tmp.stat().st_mtime < cutoff:
                    tmp.unlink(missing_ok=True)
                    removed.append(tmp)
        return removed
