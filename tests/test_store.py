"""Tests for jaxfi._src.store: exact round trips, resume, corruption, safety."""

import os
import shutil
import threading
import time

import numpy as np
import pytest

from jaxfi._src import store as store_mod
from jaxfi._src.store import CorruptChunkError, Store

CONFIG = {"seed": 0, "lr": 0.1, "model": {"name": "cnn", "width": 32}, "bits": [0, 31]}


def _columns(start, stop):
    """Columns whose values depend on the trial index, in awkward dtypes."""
    t = np.arange(start, stop)
    nan_payload = np.full(len(t), 0x7FA00001, np.uint32).view(np.float32)  # sNaN
    return {
        "sdc": t % 3 == 0,
        "site": (t % 7).astype(np.int8),
        "bits": (t * 2654435761 % 2**32).astype(np.uint32),
        "big": (np.uint64(2**64 - 1) - t.astype(np.uint64)),
        "before": np.where(t % 2 == 0, nan_payload, t.astype(np.float32) / 3),
        "half": t.astype(np.float16),
        "be": t.astype(">f8"),
        "record": np.stack([t, t + 1, t + 2], axis=1)
                    .astype(np.uint32).reshape(-1, 3, 1),
    }


def _assert_bitwise(got, want):
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype.str == want[name].dtype.str, name
        assert got[name].shape == want[name].shape, name
        assert got[name].tobytes() == want[name].tobytes(), name


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "campaign", CONFIG)


def _chunk(store, start, stop):
    return store.path / "chunks" / f"{start:012d}-{stop:012d}.npz"


# ----------------------------------------------------------- round trips


def test_round_trip_is_bitwise(store):
    for start, stop in [(20, 30), (0, 10), (10, 20)]:  # out of order on purpose
        store.write_chunk(start, stop, _columns(start, stop))
    got = store.load_arrays()
    want = {"trial": np.arange(30), **_columns(0, 30)}
    _assert_bitwise(got, want)


def test_load_table(store):
    store.write_chunk(5, 8, _columns(5, 8))
    store.write_chunk(0, 5, _columns(0, 5))
    table = store.load()
    assert list(table.columns)[0] == "trial"
    assert list(table["trial"]) == list(range(8))
    want = _columns(0, 8)
    assert table["bits"].dtype == np.uint32 and table["sdc"].dtype == bool
    assert table["big"].tolist() == want["big"].tolist()
    assert table["record"].dtype == object
    for i, cell in enumerate(table["record"]):
        assert cell.dtype == np.uint32 and np.array_equal(cell, want["record"][i])


def test_manifest_and_empty_store(store):
    manifest = (store.path / "manifest.json").read_text()
    assert '"format": "jaxfi-store-2"' in manifest and store.config_hash in manifest
    assert store.completed().size == 0 and store.missing(5) == [(0, 5)]
    assert list(store.load_arrays()) == ["trial"] and len(store.load()) == 0


# ---------------------------------------------------------------- resume


def test_resume_ranges(store):
    store.write_chunk(0, 10, _columns(0, 10))
    store.write_chunk(25, 30, _columns(25, 30))
    again = Store(store.path, dict(reversed(list(CONFIG.items()))))  # key order is irrelevant
    assert again.completed().tolist() == list(range(10)) + list(range(25, 30))
    assert again.missing(40) == [(10, 25), (30, 40)]
    assert again.missing(27) == [(10, 25)]
    assert again.missing(0) == []
    again.write_chunk(10, 25, _columns(10, 25))
    assert again.missing(30) == []


def test_changed_config_names_keys(store):
    changed = {**CONFIG, "lr": 0.2, "model": {"name": "cnn", "width": 64}}
    with pytest.raises(ValueError) as err:
        Store(store.path, changed)
    message = str(err.value)
    assert str(store.path) in message
    assert "lr: 0.1 -> 0.2" in message and "model.width: 32 -> 64" in message
    assert "seed" not in message
    with pytest.raises(ValueError, match="extra: <absent> -> 1"):
        Store(store.path, {**CONFIG, "extra": 1})
    with pytest.raises(ValueError, match="seed: 0 -> 0.0"):  # 0.0 hashes differently
        Store(store.path, {**CONFIG, "seed": 0.0})


def test_config_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="config"):
        Store(tmp_path / "a", {"x": np.float32(1)})
    with pytest.raises(ValueError, match="config"):
        Store(tmp_path / "b", {"x": float("nan")})


def test_other_processes_wait_for_manifest(tmp_path, monkeypatch):
    path = tmp_path / "shared"
    with pytest.raises(TimeoutError, match="process 0"):
        Store(path, CONFIG, process_index=1, manifest_timeout=0.05)
    late = threading.Timer(0.15, lambda: Store(path, CONFIG))
    late.start()
    worker = Store(path, CONFIG, process_index=1, manifest_timeout=10)
    late.join()
    tags = []
    original = store_mod._atomic_write
    monkeypatch.setattr(store_mod, "_atomic_write",
                        lambda dest, write, tag: tags.append(tag) or original(dest, write, tag))
    worker.write_chunk(0, 2, _columns(0, 2))
    assert tags == [f"p1-{os.getpid()}"]  # temporary names differ per process
    with pytest.raises(ValueError, match="seed"):
        Store(path, {**CONFIG, "seed": 1}, process_index=3)


# ------------------------------------------------------------ corruption


def test_truncated_chunk(store):
    store.write_chunk(0, 10, _columns(0, 10))
    path = _chunk(store, 0, 10)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CorruptChunkError, match=path.name) as err:
        store.load()
    assert err.value.path == path and isinstance(err.value, ValueError)
    assert [e.path for e in store.verify()] == [path]


def test_flipped_data_byte(store):
    store.write_chunk(0, 10, _columns(0, 10))
    path = _chunk(store, 0, 10)
    raw = bytearray(path.read_bytes())
    where = raw.find(_columns(0, 10)["big"].tobytes())
    raw[where + 3] ^= 0x10
    path.write_bytes(bytes(raw))
    for verify in (True, False):  # zip's CRC catches it even without SHA-256
        with pytest.raises(CorruptChunkError, match=path.name):
            store.load(verify=verify)


def test_every_flip_and_truncation_is_caught_or_harmless(store):
    """No single damaged byte or cut makes load return different data."""
    store.write_chunk(0, 3, {"sdc": np.array([1, 0, 1], bool),
                             "bit": np.array([7, 8, 9], np.uint32)})
    path = _chunk(store, 0, 3)
    good = path.read_bytes()
    want = store.load_arrays()
    damaged = [good[:cut] for cut in range(len(good))]
    damaged += [good[:i] + bytes([good[i] ^ 0x01]) + good[i + 1:] for i in range(len(good))]
    caught = 0
    for data in damaged:
        # Rewrite in place: on ext4 truncating to zero then writing forces a
        # flush, about 3 ms a file.
        with open(path, "r+b") as f:
            f.write(data)
            f.truncate(len(data))
        try:
            _assert_bitwise(store.load_arrays(), want)
        except CorruptChunkError:
            caught += 1
    assert caught > len(good)  # all truncations and most flips are errors


def test_renamed_chunk_fails_checksum(store):
    store.write_chunk(0, 10, _columns(0, 10))
    shutil.copy(_chunk(store, 0, 10), _chunk(store, 10, 20))
    with pytest.raises(CorruptChunkError, match="checksum"):
        store.load()


def test_schema_mismatch_names_both_files(store):
    store.write_chunk(0, 2, {"a": np.zeros(2, np.float32)})
    store.write_chunk(2, 4, {"a": np.zeros(2, np.float64)})
    with pytest.raises(ValueError, match="000000000002-000000000004.*000000000000-"):
        store.load()


# -------------------------------------------------------- overlaps, tmp


def test_overlapping_chunk_refused(store):
    store.write_chunk(0, 10, _columns(0, 10))
    for start, stop in [(5, 15), (0, 10), (9, 10), (0, 1)]:
        with pytest.raises(ValueError, match="000000000000-000000000010.npz"):
            store.write_chunk(start, stop, _columns(start, stop))
    store.write_chunk(10, 12, _columns(10, 12))  # adjacent is fine


def test_overlap_on_disk_is_reported(store):
    store.write_chunk(0, 10, _columns(0, 10))
    shutil.copy(_chunk(store, 0, 10), store.path / "chunks" / "000000000005-000000000015.npz")
    for call in (store.load, store.completed, lambda: store.missing(20)):
        with pytest.raises(ValueError, match="overlap.*000000000000-.*000000000005-"):
            call()


@pytest.mark.parametrize("start, stop, columns, exc, match", [
    (0, 3, {"a": np.zeros(2)}, ValueError, "'a' has shape"),
    (0, 2, {"a": np.array([None, 1])}, TypeError, "object dtype"),
    (0, 2, {"trial": np.zeros(2)}, ValueError, "reserved"),
    (0, 2, {"a/b": np.zeros(2)}, ValueError, "not allowed"),
    (0, 2, {}, ValueError, "non-empty"),
    (3, 3, {"a": np.zeros(0)}, ValueError, "start < stop"),
    (-1, 2, {"a": np.zeros(3)}, ValueError, "start"),
    (True, 2, {"a": np.zeros(1)}, TypeError, "start"),
    (0, 2.0, {"a": np.zeros(2)}, TypeError, "stop"),
])
def test_write_validation(store, start, stop, columns, exc, match):
    with pytest.raises(exc, match=match):
        store.write_chunk(start, stop, columns)
    assert os.listdir(store.path / "chunks") == []


def test_failed_write_leaves_nothing(store, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(np.lib.format, "write_array", boom)
    with pytest.raises(OSError, match="disk full"):
        store.write_chunk(0, 2, {"a": np.zeros(2)})
    assert os.listdir(store.path / "chunks") == []


def test_tmp_files_ignored_and_cleaned(store):
    store.write_chunk(0, 4, _columns(0, 4))
    chunks = store.path / "chunks"
    stale = chunks / ".tmp-000000000004-000000000008.npz-p1-999-deadbeef"
    stale.write_bytes(_chunk(store, 0, 4).read_bytes()[:100])  # killed mid-write
    fresh = chunks / ".tmp-000000000008-000000000012.npz-p2-998-cafef00d"
    fresh.write_bytes(b"in flight")
    assert store.completed().tolist() == [0, 1, 2, 3]
    assert len(store.load()) == 4 and store.verify() == []
    old = time.time() - 7200
    os.utime(stale, (old, old))
    assert store.clean_tmp() == [stale]
    assert fresh.exists() and _chunk(store, 0, 4).exists()


# ------------------------------------------------------------ quarantine


def test_quarantine_moves_never_deletes(store):
    store.write_chunk(0, 5, _columns(0, 5))
    store.write_chunk(5, 10, _columns(5, 10))
    path = _chunk(store, 5, 10)
    path.write_bytes(path.read_bytes()[:-20])
    first_bytes = path.read_bytes()
    with pytest.raises(CorruptChunkError) as err:
        store.load()
    moved = store.quarantine(err.value.path)
    assert moved == store.path / "quarantine" / path.name
    assert moved.read_bytes() == first_bytes and not path.exists()
    assert store.missing(10) == [(5, 10)]
    # Recompute, damage again: the second copy is kept beside the first.
    store.write_chunk(5, 10, _columns(5, 10))
    second = store.quarantine(path.name)
    assert second.name == path.name + ".1" and moved.read_bytes() == first_bytes
    store.write_chunk(5, 10, _columns(5, 10))
    _assert_bitwise(store.load_arrays(), {"trial": np.arange(10), **_columns(0, 10)})
    with pytest.raises(ValueError, match="not a chunk"):
        store.quarantine(store.path / "manifest.json")
