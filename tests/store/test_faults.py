"""Fail-stop durability: a failing disk never costs an acknowledged write.

Each test injects I/O errors (tests/store/faults.py) at one point of one verb and
checks the two promises: the call that failed changed nothing (in process and,
after a reopen, on disk), or, when the disk cannot say (a failed fsync), the
memory refuses writes until reopened and the reopened memory holds everything
acknowledged plus the uncertain write whole or not at all.
"""

from __future__ import annotations

import errno

import numpy as np
import pytest

import engine
from engine import Memory

from .faults import Faults


def contents(mem: Memory) -> dict:
    """id -> (label, weight, vector bytes): everything a reopen must give back exactly."""
    ids = mem.ids()
    if len(ids) == 0:
        return {}
    s = mem.get(ids)
    return {int(i): (lab, float(w), v.tobytes()) for i, lab, w, v in zip(s.ids, s.labels, s.weights, s.vectors)}


def reopened(path) -> dict:
    with Memory.open(path) as again:
        return contents(again)


@pytest.fixture
def faults(monkeypatch):
    return Faults(monkeypatch.setattr)


@pytest.fixture
def data(rng):
    return rng.standard_normal((400, 8)).astype(np.float32), rng.integers(0, 6, 400)


def test_failed_append_is_cut_away_and_the_next_add_survives(tmp_path, data, faults):
    x, y = data
    mem = Memory(8, index="Flat", path=tmp_path / "m")
    mem.add(x[:50], y[:50])
    for code in (errno.ENOSPC, errno.EFBIG, errno.EIO):
        faults.arm("write_all", code)  # part of the record is written, then the disk refuses
        before = contents(mem)
        with pytest.raises(engine.StorageError) as info:
            mem.add(x[50:60], y[50:60])
        assert info.value.errno == code and not info.value.uncertain
        assert contents(mem) == before
    mem.add(x[60:70], y[60:70])  # acknowledged after the failures
    expected = contents(mem)
    assert len(expected) == 60
    mem.close()
    assert reopened(tmp_path / "m") == expected


def test_failed_save_leaves_the_old_files_in_force_and_later_adds_reachable(tmp_path, data, faults):
    x, y = data
    mem = Memory(8, index="Flat", path=tmp_path / "m")
    mem.add(x[:50], y[:50])
    for primitive in ("rename", "write_all", "fsync"):  # manifest rename, snapshot bytes, snapshot fsync
        faults.arm(primitive, errno.ENOSPC)
        with pytest.raises(engine.StorageError):
            mem.save()
        mem.add(x[50 + len(contents(mem)) - 50:][:5], y[:5])
    expected = contents(mem)
    mem.close()
    assert reopened(tmp_path / "m") == expected
    leftovers = [p.name for p in (tmp_path / "m").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_failed_fsync_refuses_writes_until_reopened(tmp_path, data, faults):
    x, y = data
    mem = Memory(8, index="Flat", path=tmp_path / "m")
    mem.add(x[:50], y[:50])
    acknowledged = contents(mem)
    faults.arm("fsync", errno.EIO)
    with pytest.raises(engine.StorageError) as info:
        mem.add(x[50:60], y[50:60])
    assert info.value.uncertain
    assert contents(mem) == acknowledged  # not applied in process
    for write in (lambda: mem.add(x[60:61], y[60:61]), lambda: mem.remove([0]), mem.save,
                  lambda: mem.compact(budget=20), lambda: setattr(mem, "temperature", 0.5)):
        with pytest.raises(engine.MemoryFailedError, match="reopen"):
            write()
    assert mem.query(x[:3]).ids.shape == (3, 50)  # reads go on
    mem.close()
    after = reopened(tmp_path / "m")
    # the uncertain record reached the page cache: it is there whole (a power cut could drop it whole)
    assert {k: after[k] for k in acknowledged} == acknowledged
    assert set(after) - set(acknowledged) in (set(), set(range(50, 60)))


def test_failed_compaction_changes_nothing(tmp_path, data, faults):
    x, y = data
    mem = Memory(8, index="Flat", path=tmp_path / "m")
    mem.add(x[:300], y[:300])
    mem.remove(np.arange(10))
    before = contents(mem)
    answers = mem.query(x[:5], k=10)
    for primitive in ("write_all", "fsync", "rename", "fsync_dir"):
        faults.arm(primitive, errno.ENOSPC)
        with pytest.raises(engine.StorageError) as info:
            mem.compact(budget=40)
        assert not info.value.uncertain or primitive == "fsync_dir"
        if info.value.uncertain:
            break
        assert contents(mem) == before and len(mem) == 290
        assert np.array_equal(mem.query(x[:5], k=10).ids, answers.ids)
    mem.close()
    after = reopened(tmp_path / "m")
    # the one uncertain failure (the manifest's rename could not be made durable) may have committed
    assert after == before or (len(after) == 40 and
                               np.isclose(sum(w for _, w, _ in after.values()), 290))


def test_add_refused_for_its_budget_is_not_logged(tmp_path, data):
    x, y = data
    mem = Memory(8, index="Flat", path=tmp_path / "m", budget=6)
    mem.add(x[:6], np.arange(6))
    before = contents(mem)
    with pytest.raises(engine.InvalidValueError, match="cannot keep"):
        mem.add(x[6:8], [6, 7])  # 8 classes cannot fit in 6 slots
    assert contents(mem) == before
    mem.close()
    assert reopened(tmp_path / "m") == before


def test_add_compacting_under_a_budget_is_one_commit(tmp_path, data, faults):
    x, y = data
    mem = Memory(8, index="Flat", path=tmp_path / "m", budget=100, slack=0.5)
    mem.add(x[:100], y[:100])
    before = contents(mem)
    faults.arm("rename", errno.ENOSPC)  # the snapshot that carries the add and its compaction
    with pytest.raises(engine.StorageError):
        mem.add(x[100:110], y[100:110])
    assert contents(mem) == before
    mem.add(x[100:110], y[100:110])
    assert len(mem) == 50
    expected = contents(mem)
    mem.close()
    assert reopened(tmp_path / "m") == expected


def test_failed_settings_change_changes_nothing(tmp_path, data, faults):
    x, y = data
    mem = Memory(8, index="Flat", path=tmp_path / "m", temperature=0.2)
    mem.add(x[:20], y[:20])
    faults.arm("rename", errno.EIO)
    with pytest.raises(engine.StorageError):
        mem.temperature = 0.7
    assert mem.temperature == 0.2
    mem.temperature = 0.3
    mem.close()
    with Memory.open(tmp_path / "m") as again:
        assert again.temperature == 0.3


def test_open_on_a_full_disk_still_answers_queries(tmp_path, data, faults):
    x, y = data
    mem = Memory(8, index="Flat", path=tmp_path / "m")
    mem.add(x[:20], y[:20])
    expected = contents(mem)
    mem.close()
    faults.arm("write_all", errno.ENOSPC)  # the new segment's header cannot be written
    again = Memory.open(tmp_path / "m")
    assert contents(again) == expected
    with pytest.raises(engine.MemoryFailedError, match="reopen"):
        again.add(x[20:21], y[20:21])
    again.close()
    assert reopened(tmp_path / "m") == expected


def test_writes_after_close_are_refused(tmp_path, data):
    x, y = data
    mem = Memory(8, path=tmp_path / "m")
    mem.add(x[:5], y[:5])
    mem.close()
    with pytest.raises(engine.MemoryFailedError, match="closed"):
        mem.add(x[5:6], y[5:6])
    assert len(mem) == 5 and reopened(tmp_path / "m") == contents(mem)


def test_zero_row_writes_write_nothing(tmp_path, data):
    x, y = data
    mem = Memory(8, path=tmp_path / "m")
    mem.add(x[:5], y[:5])
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "m").iterdir()}
    assert mem.remove([]) == 0 and mem.remove(np.array([], np.int64)) == 0
    assert len(mem.add(np.zeros((0, 8)), [])) == 0
    assert {p.name: p.stat().st_size for p in (tmp_path / "m").iterdir()} == sizes
    mem.close()
    assert len(reopened(tmp_path / "m")) == 5
