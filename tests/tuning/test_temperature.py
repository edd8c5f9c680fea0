"""temperature="auto": chosen on the memory's own slots, checked on queries it never saw."""

from __future__ import annotations

import numpy as np
import pytest

import engine
from engine import Memory
from engine.data.synthetic import DISTRIBUTIONS
from engine.testing import dense_attention

DIM = 32


def held_out(x, y, qx, qy, temperature, k=64):
    """(mean NLL of each held-out query's class, accuracy) under top-k attention at
    ``temperature``: brute-force float64 search and softmax, independent of the engine."""
    classes = np.unique(np.r_[y, qy])  # a held-out class with no slot gets probability 0
    mass = dense_attention(x, y, qx, temperature=temperature, classes=classes, k=k)
    own = mass[np.arange(len(qx)), np.searchsorted(classes, qy)]
    return float(-np.log(np.maximum(own, 1e-6)).mean()), float((classes[mass.argmax(axis=1)] == qy).mean())


@pytest.mark.parametrize("name", ["learned-like", "clustered"])
def test_the_chosen_temperature_lowers_held_out_nll_and_classifies_as_well(name):
    x, y, qx, qy = DISTRIBUTIONS[name](8000, DIM, 3, 500)
    mem = Memory(DIM, index="Flat")
    mem.add(x, y)
    report = mem.temperature_report
    assert report is not None and report.temperature == mem.temperature and report.slots == len(x)
    assert report.nll <= report.nll_previous and report.previous == 0.1
    nll, acc = held_out(x, y, qx, qy, mem.temperature)
    nll_default, _ = held_out(x, y, qx, qy, 0.1)
    assert nll <= nll_default + 1e-12, (mem.temperature, nll, nll_default)  # no worse than the fixed default
    for other in (0.1, 0.01, 1.0):  # classifies as well as a decade either side, to one query in 100
        assert acc >= held_out(x, y, qx, qy, other)[1] - 0.01, (mem.temperature, other)
    assert 0 <= report.ece <= 1 and 0 <= report.accuracy <= 1


def test_a_given_temperature_is_kept_and_auto_follows_growth(tmp_path):
    x, y = DISTRIBUTIONS["learned-like"](4000, DIM, 1, 1)[:2]
    fixed = Memory(DIM, temperature=0.07)
    fixed.add(x, y)
    assert fixed.temperature == 0.07 and fixed.temperature_report is None
    auto = Memory(DIM, path=tmp_path / "m")
    assert auto.temperature == 0.1  # nothing to measure yet
    auto.add(x[:10], y[:10])
    assert auto.temperature_report is None  # too few slots
    auto.add(x[10:1000], y[10:1000])
    first = auto.temperature_report
    assert first is not None and first.slots == 1000
    auto.add(x[1000:1500], y[1000:1500])
    assert auto.temperature_report is first  # grown less than 2x: kept
    auto.add(x[1500:], y[1500:])
    assert auto.temperature_report.slots == 4000
    chosen = auto.temperature
    auto.close()
    again = Memory.open(tmp_path / "m")
    assert again.temperature == chosen and again.temperature_report == auto.temperature_report
    again.temperature = 0.2  # a number given: kept from here on, and persisted
    again.add(x[:3000] * 1.01, y[:3000])
    assert again.temperature == 0.2
    again.close()
    assert Memory.open(tmp_path / "m").temperature == 0.2


def test_calibrating_on_demand_and_bad_input():
    x, y = DISTRIBUTIONS["isotropic"](3000, DIM, 2, 1)[:2]
    with pytest.raises(engine.InvalidValueError, match="temperature"):
        Memory(DIM, temperature="hot")
    mem = Memory(DIM, temperature=0.5)
    with pytest.raises(engine.EmptyMemoryError):
        mem.calibrate_temperature()
    mem.add(x[:5], np.zeros(5, int))
    with pytest.raises(engine.EmptyMemoryError):  # too few slots, one class
        mem.calibrate_temperature()
    assert mem.temperature == 0.5
    mem.add(x, y)
    report = mem.calibrate_temperature(sample=300)
    assert report.previous == 0.5 and mem.temperature == report.temperature and report.queries == 300
    assert report.nll <= report.nll_previous
    with pytest.raises(engine.InvalidValueError):
        mem.calibrate_temperature(sample=0)


def test_a_reopened_memory_answers_at_the_temperature_it_had(tmp_path):
    """The choice is written when made, so a reopen (clean or not) answers at the same T,
    whatever was added or removed since within the 2x window."""
    x, y = DISTRIBUTIONS["clustered"](3000, DIM, 4, 1)[:2]
    mem = Memory(DIM, path=tmp_path / "m")
    ids = mem.add(x[:2000], y[:2000])
    chosen = mem.temperature
    mem.remove(ids[::9])
    mem.add(x[2000:2300], y[2000:2300])
    assert mem.temperature == chosen
    q = x[2300:2400]
    before = mem.query(q, k=16)
    mem.close()
    after = Memory.open(tmp_path / "m").query(q, k=16)
    assert after.labels.tolist() == before.labels.tolist()
    np.testing.assert_allclose(after.probs, before.probs, atol=1e-12)


def test_isolated_slots_copies_and_inner_products_do_not_mislead_the_choice(tmp_path):
    rng = np.random.default_rng(7)
    # two tight clusters and two isolated points, searched one list at a time: some slots
    # see nothing but themselves; the choice must stay finite and the durable add succeed
    x = np.concatenate([rng.normal(0, 0.01, (100, 4)) + [1, 0, 0, 0], rng.normal(0, 0.01, (100, 4)) + [0, 1, 0, 0],
                        [[0, 0, 1, 0], [0, 0, 0, 1]]]).astype(np.float32)
    y = np.r_[np.zeros(100), np.ones(100), 0, 1].astype(int)
    mem = Memory(4, index="IVF4,Flat", nprobe=1, path=tmp_path / "m")
    mem.add(x, y)
    assert np.isfinite(mem.temperature) and mem.temperature > 1e-3
    mem.close()
    assert Memory.open(tmp_path / "m").temperature == mem.temperature
    # every slot written twice: a copy is not a neighbour that answers for it
    x2, y2 = DISTRIBUTIONS["clustered"](1500, DIM, 8, 1)[:2]
    once, twice = Memory(DIM, index="Flat"), Memory(DIM, index="Flat")
    once.add(x2, y2)
    twice.add(np.concatenate([x2, x2]), np.concatenate([y2, y2]))
    assert twice.temperature >= once.temperature / 3, (once.temperature, twice.temperature)
    # inner products of vectors 30x longer: the temperature scales with them
    ip1, ip30 = Memory(DIM, index="Flat", metric="ip"), Memory(DIM, index="Flat", metric="ip")
    unit = x2 / np.linalg.norm(x2, axis=1, keepdims=True)
    ip1.add(unit, y2)
    ip30.add(unit * 30, y2)
    assert 300 <= ip30.temperature / ip1.temperature <= 3000  # scores 900x larger, the grid's steps apart


def test_an_on_demand_choice_is_written_at_once_and_bad_spellings_are_refused(tmp_path):
    import json

    x, y = DISTRIBUTIONS["clustered"](2000, DIM, 6, 1)[:2]
    mem = Memory(DIM, path=tmp_path / "m")
    mem.add(x, y)
    report = mem.calibrate_temperature(k=8, seed=3)
    saved = json.loads((tmp_path / "m" / "manifest.json").read_text())["settings"]["temperature_report"]
    assert saved["temperature"] == report.temperature == mem.temperature and saved["k"] == 8
    for bad in ("AUTO", "auto ", "0.1"):
        with pytest.raises(engine.InvalidValueError, match='"auto"'):
            Memory(DIM, temperature=bad)
    with pytest.raises(engine.InvalidValueError, match="at most"):
        mem.calibrate_temperature(k=10_000)


@pytest.mark.parametrize("primitive", ["rename", "fsync", "fsync_dir"])
def test_a_failing_disk_while_the_choice_is_written_loses_no_acknowledged_slot(tmp_path, monkeypatch, primitive):
    """The choice is written after the add it follows is durable: a disk failing then keeps
    the add (it returns), keeps the choice in process, and at worst stops later writes (an
    uncertain fsync, the store's rule); a reopen has every acknowledged slot and chooses the same T."""
    import errno

    from ..store.faults import Faults

    x, y = DISTRIBUTIONS["clustered"](400, DIM, 5, 1)[:2]
    mem = Memory(DIM, path=tmp_path / "m")
    mem.add(x[:10], y[:10])  # too few to choose: nothing but the log written
    faults = Faults(monkeypatch.setattr)
    skip = 1 if primitive == "fsync" else 0  # the add's own log fsync goes first
    faults.arm(primitive, errno.EIO, skip=skip)
    ids = mem.add(x[10:], y[10:])  # durable, then the choice is made and written
    assert len(ids) == 390 and mem.temperature_report is not None and faults.injected == 1
    chosen = mem.temperature
    try:
        mem.add(x[:5], y[:5])
        acknowledged = 405
    except engine.StorageError:
        acknowledged = 400  # the store refuses writes after an uncertain failure, as for any write
    faults.disarm()
    mem.close()
    again = Memory.open(tmp_path / "m")
    assert len(again) == acknowledged
    assert again.temperature == pytest.approx(chosen)  # chosen again on the same slots, or kept
