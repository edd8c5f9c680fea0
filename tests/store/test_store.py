"""Persistence: snapshots, write-ahead log, manifest, recovery and refusal of damaged files."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import engine
from engine import Memory, store


def answers(mem, probes):
    res = mem.query(probes, k=20)
    return res.ids.tolist(), res.labels.tolist(), np.round(res.probs, 10).tolist()


@pytest.fixture
def data(rng):
    return rng.standard_normal((300, 8)).astype(np.float32), rng.integers(0, 5, 300), rng.standard_normal((7, 8))


def build(path, data, index="Flat"):
    x, y, _ = data
    mem = Memory(8, index=index, temperature=0.2, path=path)
    mem.add(x[:200], y[:200])
    mem.remove(np.arange(0, 200, 7))
    mem.add(x[200:], y[200:], weights=np.full(100, 2.0))
    mem.add(x[:1] * 3, [4], ids=[1], upsert=True)
    return mem


def wal_files(path):
    return sorted(p for p in os.listdir(path) if p.startswith("wal-") and os.path.getsize(path / p) > 0)


def test_wal_replay_reopens_identical(tmp_path, data):
    mem = build(tmp_path / "m", data)
    expected = answers(mem, data[2])
    mem.close()
    again = Memory.open(tmp_path / "m")
    assert answers(again, data[2]) == expected
    assert again.temperature == 0.2 and len(again) == len(mem)
    assert list(again.add(data[0][:1], [0])) == [300]  # fresh ids continue after the replayed ones


def test_snapshot_then_wal(tmp_path, data):
    mem = build(tmp_path / "m", data)
    mem.save()
    assert any(p.startswith("snapshot-") for p in os.listdir(tmp_path / "m"))
    mem.remove([250, 251])
    mem.temperature = 0.05
    expected = answers(mem, data[2])
    mem.close()
    again = Memory.open(tmp_path / "m")
    assert answers(again, data[2]) == expected
    assert again.temperature == 0.05
    # the checkpoint dropped the files it replaced
    names = os.listdir(tmp_path / "m")
    assert sum(n.startswith("snapshot-") for n in names) == 1


def test_save_copy_of_in_process_memory(tmp_path, data):
    x, y, probes = data
    mem = Memory(8, index="HNSW16")
    mem.add(x, [f"c{v}" for v in y])
    with pytest.raises(ValueError, match="not durable"):
        mem.save()
    mem.save(tmp_path / "copy")
    again = Memory.open(tmp_path / "copy")
    assert answers(again, probes) == answers(mem, probes)
    with pytest.raises(engine.MemoryExistsError):
        Memory(8, path=tmp_path / "copy")


def crash_image(mem, dst):
    """The directory as a kill -9 would leave it now: every file as written, the log still open."""
    shutil.copytree(mem.path, dst)
    return dst


def test_torn_final_record_is_ignored_only_in_the_open_segment(tmp_path, data):
    x, y, probes = data
    mem = Memory(8, index="Flat", path=tmp_path / "m")
    mem.add(x[:100], y[:100])
    expected = answers(mem, probes)
    mem.add(x[100:150], y[100:150])
    image = crash_image(mem, tmp_path / "crashed")
    wal = image / wal_files(image)[-1]
    whole = wal.read_bytes()
    for cut in (len(whole) - 1, len(whole) - 300, len(whole) - 1500):
        wal.write_bytes(whole[:cut])  # the writer died inside its last record: never acknowledged
        with Memory.open(image) as again:
            assert len(again) == 100 and answers(again, probes) == expected
        # reopening sealed the segment at its last whole record; start over from the crash image
        shutil.rmtree(image)
        crash_image(mem, image)
    # a cleanly closed memory has no open segment: the same cut is damage
    mem.close()
    wal = tmp_path / "m" / wal_files(tmp_path / "m")[-1]
    whole = wal.read_bytes()
    wal.write_bytes(whole[:-300])
    with pytest.raises(engine.CorruptFileError, match="bytes"):
        Memory.open(tmp_path / "m")


def test_corrupt_wal_record_is_refused(tmp_path, data):
    x, y, _ = data
    mem = Memory(8, index="Flat", path=tmp_path / "m")
    ids = [mem.add(x[i * 10:(i + 1) * 10], y[i * 10:(i + 1) * 10]) for i in range(3)]
    first = mem.get(ids[0][:1]).vectors[0, :2].tobytes()  # the stored (normalised) vector
    mem.close()
    wal = tmp_path / "m" / wal_files(tmp_path / "m")[-1]
    raw = bytearray(wal.read_bytes())
    # flip bytes inside the first record's vector payload: its checksum fails
    at = raw.index(first)
    raw[at:at + 4] = b"\x00\x00\xc0\x7f"
    wal.write_bytes(bytes(raw))
    manifest_before = (tmp_path / "m" / "manifest.json").read_bytes()
    with pytest.raises(engine.CorruptFileError, match="checksum"):
        Memory.open(tmp_path / "m")
    assert (tmp_path / "m" / "manifest.json").read_bytes() == manifest_before  # opening changed nothing


def test_garbage_wal_header_is_refused(tmp_path, data):
    x, y, _ = data
    mem = Memory(8, path=tmp_path / "m")
    mem.add(x[:10], y[:10])
    mem.close()
    wal = tmp_path / "m" / wal_files(tmp_path / "m")[-1]
    wal.write_bytes(b"this is not an arrow stream at all" * 10)
    with pytest.raises(engine.CorruptFileError):
        Memory.open(tmp_path / "m")


def test_corrupt_or_truncated_snapshot_is_refused(tmp_path, data):
    mem = build(tmp_path / "m", data)
    mem.save()
    mem.close()
    snap = next((tmp_path / "m").glob("snapshot-*.arrow"))
    good = snap.read_bytes()
    snap.write_bytes(good[: len(good) // 2])
    with pytest.raises(engine.CorruptFileError, match="checksum"):
        Memory.open(tmp_path / "m")
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    snap.write_bytes(bytes(bad))
    with pytest.raises(engine.CorruptFileError):
        Memory.open(tmp_path / "m")
    snap.unlink()
    with pytest.raises(engine.CorruptFileError, match="missing"):
        Memory.open(tmp_path / "m")


def resign(manifest, **changes):
    """Rewrite a manifest with valid checksum: what a crafted (not damaged) manifest looks like."""
    doc = json.loads(manifest.read_text())
    doc.pop("checksum")
    for key, value in changes.items():  # a memory setting, or one of the store's own fields
        (doc["settings"] if key in doc["settings"] else doc)[key] = value
    manifest.write_bytes(store.manifest_bytes(doc))


def test_wrong_format_version_and_bad_manifest(tmp_path, data):
    mem = build(tmp_path / "m", data)
    mem.close()
    manifest = tmp_path / "m" / "manifest.json"
    good = manifest.read_bytes()
    doc = json.loads(good)
    manifest.write_text(json.dumps({**doc, "format_version": 99}))
    with pytest.raises(engine.FormatVersionError, match="99"):
        Memory.open(tmp_path / "m")
    manifest.write_text("{not json")
    with pytest.raises(engine.CorruptFileError, match="JSON"):
        Memory.open(tmp_path / "m")
    manifest.write_text(json.dumps({**doc, "temperature": 0.3}))  # edited, not re-signed
    with pytest.raises(engine.CorruptFileError, match="checksum"):
        Memory.open(tmp_path / "m")
    manifest.write_bytes(good)
    resign(manifest, metric="manhattan")
    with pytest.raises(engine.CorruptFileError, match="metric"):
        Memory.open(tmp_path / "m")
    manifest.write_bytes(good)
    resign(manifest, dim=9)
    with pytest.raises(engine.CorruptFileError, match="dim"):
        Memory.open(tmp_path / "m")
    manifest.write_bytes(good)
    resign(manifest, temperature="0.2")
    with pytest.raises(engine.CorruptFileError, match="temperature"):
        Memory.open(tmp_path / "m")
    with pytest.raises(FileNotFoundError):
        Memory.open(tmp_path / "nowhere")


def test_failed_write_is_not_logged(tmp_path, data):
    x, y, probes = data
    mem = Memory(8, index="Flat", path=tmp_path / "m")
    mem.add(x[:10], y[:10])
    with pytest.raises(ValueError):
        mem.add(x[:2] * np.nan, y[:2])
    with pytest.raises(KeyError):
        mem.remove([12345])
    expected = answers(mem, probes)
    mem.close()
    again = Memory.open(tmp_path / "m")
    assert answers(again, probes) == expected and len(again) == 10


def test_one_writer_per_directory(tmp_path, data):
    x, y, _ = data
    mem = Memory(8, path=tmp_path / "m")
    mem.add(x[:5], y[:5])
    with pytest.raises(engine.MemoryLockedError, match="already open"):
        Memory.open(tmp_path / "m")
    mem.close()
    with Memory.open(tmp_path / "m") as again:
        assert len(again) == 5
    # a failed open releases the lock
    manifest = tmp_path / "m" / "manifest.json"
    good = manifest.read_text()
    resign(manifest, metric="manhattan")
    with pytest.raises(engine.CorruptFileError):
        Memory.open(tmp_path / "m")
    manifest.write_text(good)
    with Memory.open(tmp_path / "m") as again:
        assert len(again) == 5


def test_many_reopens_keep_the_log_short(tmp_path, data):
    x, y, probes = data
    Memory(8, index="Flat", path=tmp_path / "m").close()
    for i in range(12):
        with Memory.open(tmp_path / "m") as mem:
            mem.add(x[i * 10:(i + 1) * 10], y[i * 10:(i + 1) * 10])
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert len(manifest["wal"]) <= 9
    assert len(os.listdir(tmp_path / "m")) <= 12
    with Memory.open(tmp_path / "m") as mem:
        assert len(mem) == 120
        assert sorted(mem.get(np.arange(120)).labels) == sorted(y[:120].tolist())


# -- damage of every kind is detected ----------------------------------------------------------
def closed_memory(path, data, *, reopen_adds: int = 2):
    """A memory with a snapshot, two closed segments with records and an open one."""
    x, y, _ = data
    mem = Memory(8, index="Flat", path=path)
    mem.add(x[:40], y[:40])
    mem.save()
    mem.add(x[40:60], y[40:60])
    mem.remove(np.arange(0, 40, 3))
    mem.close()
    for i in range(reopen_adds):
        with Memory.open(path) as again:
            again.add(x[60 + 10 * i:70 + 10 * i], y[60 + 10 * i:70 + 10 * i])
            again.remove([41 + i])
    return json.loads((path / "manifest.json").read_text())


@pytest.mark.parametrize("damage", ["missing", "empty", "cut inside an earlier record", "header flip",
                                    "metadata flip", "extra bytes", "swapped segments"])
def test_damaged_segment_is_refused(tmp_path, data, damage):
    doc = closed_memory(tmp_path / "m", data)
    segs = [tmp_path / "m" / e["file"] for e in doc["wal"] if e.get("records")]
    assert len(segs) >= 2
    seg = segs[0]
    raw = bytearray(seg.read_bytes())
    if damage == "missing":
        seg.unlink()
    elif damage == "empty":
        seg.write_bytes(b"")
    elif damage == "cut inside an earlier record":
        seg.write_bytes(raw[: len(raw) - 200])
    elif damage == "header flip":  # the frame header of the second record: its length field
        at = raw.index(b"EWAL", raw.index(b"EWAL", 1) + 1)
        raw[at + 20] ^= 0x01
        seg.write_bytes(bytes(raw))
    elif damage == "metadata flip":  # inside the Arrow message's flatbuffer metadata, not the values
        at = raw.index(b"EWAL", 1) + 28 + 12
        raw[at] ^= 0x10
        seg.write_bytes(bytes(raw))
    elif damage == "extra bytes":
        seg.write_bytes(bytes(raw) + b"EWAL")
    elif damage == "swapped segments":
        other = segs[1].read_bytes()
        segs[1].write_bytes(bytes(raw))
        seg.write_bytes(other)
    manifest_before = (tmp_path / "m" / "manifest.json").read_bytes()
    with pytest.raises(engine.CorruptFileError, match=seg.name if damage != "swapped segments" else "wal-"):
        Memory.open(tmp_path / "m")
    assert (tmp_path / "m" / "manifest.json").read_bytes() == manifest_before  # opening wrote nothing


@pytest.mark.parametrize("wal", [None, "wal-000001.arrows", [1], [{"file": "wal-000001.arrows", "records": "2"}],
                                 [{"file": "../outside.arrows"}], [{"file": "/etc/passwd"}],
                                 [{"file": "wal-000009.arrows"}, {"file": "wal-000010.arrows"}]])
def test_malformed_wal_list_is_refused(tmp_path, data, wal):
    closed_memory(tmp_path / "m", data, reopen_adds=0)
    resign(tmp_path / "m" / "manifest.json", wal=wal)
    with pytest.raises(engine.CorruptFileError, match="log|wal|invalid"):
        Memory.open(tmp_path / "m")


def test_crafted_manifest_cannot_name_files_outside(tmp_path, data):
    closed_memory(tmp_path / "m", data, reopen_adds=0)
    victim = tmp_path / "victim.arrow"
    victim.write_bytes(b"precious")
    doc = json.loads((tmp_path / "m" / "manifest.json").read_text())
    resign(tmp_path / "m" / "manifest.json", snapshot={**doc["snapshot"], "file": "../victim.arrow"})
    with pytest.raises(engine.CorruptFileError, match="snapshot"):
        Memory.open(tmp_path / "m")
    assert victim.read_bytes() == b"precious"


def test_second_writer_is_refused_even_without_a_lock_file(tmp_path, data):
    import subprocess
    import sys

    x, y, _ = data
    mem = Memory(8, path=tmp_path / "m")
    mem.add(x[:5], y[:5])
    for leftover in (tmp_path / "m").glob("LOCK*"):
        leftover.unlink()
    code = ("import sys, engine\n"
            "try:\n engine.Memory.open(sys.argv[1])\nexcept engine.MemoryLockedError:\n sys.exit(3)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True)
    assert r.returncode == 3, r.stderr
    mem.add(x[5:10], y[5:10])
    mem.close()
    with Memory.open(tmp_path / "m") as again:
        assert len(again) == 10


def test_create_refuses_a_directory_whose_manifest_was_lost(tmp_path, data):
    x, y, _ = data
    mem = Memory(8, path=tmp_path / "m")
    mem.add(x[:5], y[:5])
    mem.close()
    (tmp_path / "m" / "manifest.json").unlink()
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    with pytest.raises(engine.MemoryExistsError, match="wal-"):
        Memory(8, path=tmp_path / "m")
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before


def test_remove_of_nothing_keeps_the_memory_openable(tmp_path, data):
    x, y, _ = data
    mem = Memory(8, path=tmp_path / "m")
    mem.add(x[:5], y[:5])
    assert mem.remove([]) == 0
    mem.close()
    with Memory.open(tmp_path / "m") as again:
        assert len(again) == 5


def test_an_empty_memory_saves_and_reopens_many_times(tmp_path):
    mem = Memory(4, path=tmp_path / "m")
    mem.save()  # a snapshot of no slots, with no label kind yet
    mem.close()
    for _ in range(12):  # past the store's MAX_SEGMENTS: an open checkpoints the empty memory again
        Memory.open(tmp_path / "m").close()
    with Memory.open(tmp_path / "m") as again:
        assert len(again) == 0
        again.add(np.ones((1, 4)), ["a"])  # the first add still fixes the kind
    with Memory.open(tmp_path / "m") as again:
        assert again.get([0]).labels == ["a"]


def test_a_memory_saved_before_probs_existed_keeps_top_k_probabilities(tmp_path, data):
    """Its manifest names no ``probs``: it answers as it did when it was written."""
    mem = build(tmp_path / "m", data)
    want = mem.query(data[2], k=5, probs="top-k")
    mem.close()
    manifest = tmp_path / "m" / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc.pop("checksum")
    assert doc["settings"].pop("probs") == "top-k"
    manifest.write_bytes(store.manifest_bytes(doc))
    got = Memory.open(tmp_path / "m").query(data[2], k=5)
    assert got.tail_estimate is None
    np.testing.assert_array_equal(got.probs, want.probs)


@pytest.mark.parametrize("change", ["snapshot dropped", "segments reordered", "generation behind its files"])
def test_a_manifest_signed_again_with_fields_that_disagree_is_refused(tmp_path, data, change):
    doc = closed_memory(tmp_path / "m", data, reopen_adds=2)
    assert doc["snapshot"] is not None and doc["seq"] > 0 and len(doc["wal"]) >= 3
    if change == "snapshot dropped":  # the slots it held would silently be gone
        resign(tmp_path / "m" / "manifest.json", snapshot=None)
        match = "no snapshot"
    elif change == "segments reordered":
        resign(tmp_path / "m" / "manifest.json", wal=[doc["wal"][1], doc["wal"][0], *doc["wal"][2:]])
        match = "out of order"
    else:
        resign(tmp_path / "m" / "manifest.json", generation=1)
        match = "out of order"
    with pytest.raises(engine.CorruptFileError, match=match):
        Memory.open(tmp_path / "m")


def _swap_in(path, other):
    """What a restore or deploy script does: the directory at ``path`` moves away, ``other``
    takes its place."""
    path.rename(path.with_name(path.name + ".old"))
    other.rename(path)
    return path.with_name(path.name + ".old")


@pytest.mark.parametrize("verb", ["add", "remove", "save", "temperature", "close"])
def test_a_memory_whose_directory_was_replaced_never_writes_into_the_new_one(tmp_path, data, verb):
    x, y, _ = data
    mine = Memory(8, index="Flat", temperature=0.2, path=tmp_path / "m")
    mine.add(x[:30], y[:30])
    other = Memory(8, index="Flat", temperature=0.2, path=tmp_path / "other")
    other.add(x[100:125], y[100:125])
    other.close()
    moved = _swap_in(tmp_path / "m", tmp_path / "other")
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    if verb == "close":
        mine.close()  # sealing its log would rewrite the manifest at the old path
    else:
        write = {"add": lambda: mine.add(x[30:40], y[30:40]), "remove": lambda: mine.remove([0, 1]),
                 "save": mine.save, "temperature": lambda: setattr(mine, "temperature", 0.5)}[verb]
        with pytest.raises(engine.MemoryFailedError, match="moved or replaced"):
            write()
        with pytest.raises(engine.MemoryFailedError):  # and every later write
            mine.add(x[40:41], y[40:41])
        assert len(mine.query(x[:2], k=5).ids) == 2  # queries still answer
        mine.close()
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before  # not one byte changed
    with Memory.open(tmp_path / "m") as theirs:
        assert len(theirs) == 25 and set(theirs.ids().tolist()) == set(range(25))
    with Memory.open(moved) as again:  # the acknowledged writes are where the memory was opened
        assert len(again) == 30


def test_a_second_writer_in_a_replaced_directory_is_alone(tmp_path, data):
    x, y, _ = data
    first = Memory(8, index="Flat", path=tmp_path / "m")
    first.add(x[:10], y[:10])
    Memory(8, index="Flat", path=tmp_path / "other").close()
    _swap_in(tmp_path / "m", tmp_path / "other")
    second = Memory.open(tmp_path / "m")  # the other directory is not locked: a second writer opens it
    second.add(x[10:15], y[10:15])
    with pytest.raises(engine.MemoryFailedError, match="moved or replaced"):
        first.add(x[15:20], y[15:20])  # the first writer no longer writes at this path
    second.add(x[20:25], y[20:25])
    first.close()
    second.close()
    with Memory.open(tmp_path / "m") as again:
        assert len(again) == 10


@pytest.mark.parametrize("when", ["snapshot written", "snapshot fsync"])
def test_a_checkpoint_the_swap_lands_in_never_touches_the_other_memorys_files(tmp_path, data, monkeypatch, when):
    """The swap lands inside a checkpoint, after the check before it: every file operation
    goes through the directory the memory holds, so the other memory's files (named alike:
    both number their files from 1) stay as they were."""
    from engine.store import fsio, wal

    x, y, _ = data
    mine = Memory(8, index="Flat", path=tmp_path / "m")
    mine.add(x[:10], y[:10])
    other = Memory(8, index="Flat", path=tmp_path / "other")
    other.add(x[100:120], y[100:120])
    other.save()
    other.add(x[120:122], y[120:122])
    other.close()
    before = {p.name: p.read_bytes() for p in (tmp_path / "other").iterdir()}
    swapped = []

    def swap():
        if not swapped:
            swapped.append(_swap_in(tmp_path / "m", tmp_path / "other"))

    if when == "snapshot written":
        create = wal.SegmentWriter.create.__func__
        monkeypatch.setattr(wal.SegmentWriter, "create", classmethod(lambda cls, *a: (swap(), create(cls, *a))[1]))
    else:
        fsync = fsio.fsync
        monkeypatch.setattr(fsio, "fsync", lambda fd: (swap(), fsync(fd))[1])
    with pytest.raises(engine.StorageError):
        mine.save()
    monkeypatch.undo()
    mine.close()
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before
    with Memory.open(tmp_path / "m") as theirs:
        assert len(theirs) == 22
    with Memory.open(swapped[0]) as again:
        assert len(again) == 10


def test_a_directory_replaced_while_it_opens_is_not_written(tmp_path, data, monkeypatch):
    """Recovery reads a memory whose log ends in a torn record; the directory is replaced
    meanwhile: the open is refused, and the other memory's segment is not cut."""
    import subprocess
    import sys

    from engine.store import wal

    x, y, _ = data
    code = ("import os, signal, sys, numpy as np, engine\n"
            "m = engine.Memory(8, index='Flat', path=sys.argv[1])\n"
            "x = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)\n"
            "m.add(x[:10], list(range(10))); m.add(x[10:], list(range(10)))\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")  # the process dies with its log open
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True)
    assert done.returncode == -9, done.stderr
    seg = sorted((tmp_path / "m").glob("wal-*.arrows"))[-1]
    seg.write_bytes(seg.read_bytes()[:-7])  # a torn final record
    other = Memory(8, index="Flat", path=tmp_path / "other")
    for i in range(4):
        other.add(x[100 + 10 * i:110 + 10 * i], y[100 + 10 * i:110 + 10 * i])
    other.close()
    before = {p.name: p.read_bytes() for p in (tmp_path / "other").iterdir()}
    read = wal.read_segment
    swapped = []

    def read_then_swap(*args, **kwargs):
        out = read(*args, **kwargs)
        if not swapped:
            swapped.append(_swap_in(tmp_path / "m", tmp_path / "other"))
        return out

    monkeypatch.setattr(wal, "read_segment", read_then_swap)
    with pytest.raises(engine.StorageError, match="moved or replaced"):
        Memory.open(tmp_path / "m")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before
    with Memory.open(swapped[0]) as again:  # its own files, opened where they are now
        assert len(again) == 10


def test_a_memory_opened_by_a_relative_path_keeps_writing_after_a_chdir(tmp_path, data, monkeypatch):
    x, y, _ = data
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    mem = Memory(8, index="Flat", path="rel")
    mem.add(x[:5], y[:5])
    monkeypatch.chdir(tmp_path / "elsewhere")
    mem.add(x[5:8], y[5:8])
    mem.save()
    mem.close()
    with Memory.open(tmp_path / "rel") as again:
        assert len(again) == 8


def test_a_read_only_open_reads_a_held_memory_and_writes_nothing(tmp_path, data):
    x, y, q = data
    writer = Memory(8, index="Flat", temperature=0.2, path=tmp_path / "m")
    writer.add(x[:50], y[:50])
    writer.save()
    writer.add(x[50:80], y[50:80])
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    reader = Memory.open(tmp_path / "m", read_only=True)
    assert len(reader) == 80
    np.testing.assert_array_equal(reader.query(q, k=5).ids, writer.query(q, k=5).ids)
    with pytest.raises(engine.MemoryFailedError, match="read-only"):
        reader.add(x[80:81], y[80:81])
    with pytest.raises(engine.MemoryFailedError, match="read-only"):
        reader.remove([0])
    reader.close()
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before
    writer.add(x[80:90], y[80:90])  # the writer was never disturbed
    writer.close()
    with Memory.open(tmp_path / "m") as again:
        assert len(again) == 90


def test_a_shard_role_in_an_older_manifest_opens_as_it_was_written(tmp_path):
    """A manifest keeps a shard's ids (id_stride, id_offset) and its share apart, as older
    memories wrote them: a share that is not 1/stride, or no share at all (a memory written
    before shares existed searched for the whole top-k), opens as it was."""
    import json

    x = np.random.default_rng(2).standard_normal((50, 8)).astype(np.float32)
    for settings, share in (({"id_stride": 2, "id_offset": 1, "share": 0.5}, 0.5),
                            ({"id_stride": 1, "id_offset": 0, "share": 0.5}, 0.5),
                            ({"id_stride": 2, "id_offset": 1, "share": 1.0}, 1.0),
                            ({"id_stride": 3, "id_offset": 1}, 1.0)):
        path = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        with Memory(8, path=path) as mem:
            mem.add(x, np.arange(50) % 3)
        file = path / "manifest.json"
        doc = json.loads(file.read_text())
        doc["settings"].pop("share")
        doc["settings"].update(settings)
        file.write_bytes(store.manifest_bytes(doc))
        with Memory.open(path) as again:
            role = again.options.shard
            assert (role.count, role.index, role.share) == (settings["id_stride"], settings["id_offset"], share)
            assert (again.add(x[:3], [0, 1, 2]) % role.count == role.index).all()
