"""Readers in many threads while one thread adds and removes: no crash, no half-applied write.

Each write adds or removes a whole group of GROUP slots that share one label;
every query uses every slot (k above the size), so a reader that saw half of a
write would find a label with fewer than GROUP slots.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter

import numpy as np
import pytest

from engine import Memory

GROUP = 10


def readers_during(writes, check, *, switch_interval: float | None = None) -> int:
    """Run ``check(rng)`` over and over in 4 reader threads while ``writes()`` runs in this
    one; re-raise the first failure of a reader. Returns how many checks ran."""
    stop = threading.Event()
    errors: list[BaseException] = []
    seen = Counter()

    def reader(seed):
        r = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                check(r)
                seen["queries"] += 1
        except BaseException as exc:  # noqa: BLE001 - report any failure to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
    switch = sys.getswitchinterval()
    if switch_interval is not None:
        sys.setswitchinterval(switch_interval)
    for t in threads:
        t.start()
    try:
        writes()
    finally:
        stop.set()
        sys.setswitchinterval(switch)
        for t in threads:
            t.join()
    assert not errors, errors[0]
    return seen["queries"]


@pytest.mark.parametrize("index", ["Flat", "HNSW16"])
def test_queries_never_see_half_a_write(index):
    rng = np.random.default_rng(0)
    mem = Memory(16, index=index)
    live: list[np.ndarray] = []
    for g in range(20):
        live.append(mem.add(rng.standard_normal((GROUP, 16)), [f"g{g}"] * GROUP))
    mem_label = {}
    for g, ids in enumerate(live):
        mem_label.update({int(i): f"g{g}" for i in ids})

    def check(r):
        res = mem.query(r.standard_normal((4, 16)), k=100_000)
        for row in res.ids:
            used = row[row >= 0]
            labels = Counter(mem_label[i] for i in used)
            assert all(c == GROUP for c in labels.values()), labels
            assert len(used) == GROUP * len(labels)

    def writes():
        for g in range(20, 400):
            if g % 3 == 0 and len(live) > 5:
                mem.remove(live.pop(int(rng.integers(0, len(live)))))
            else:
                ids = rng.integers(0, 2**40, GROUP)  # explicit, scattered ids
                mem_label.update({int(i): f"g{g}" for i in ids})
                mem.add(rng.standard_normal((GROUP, 16)), [f"g{g}"] * GROUP, ids=ids)
                live.append(ids)

    assert readers_during(writes, check) > 20
    assert len(mem) == GROUP * len(live)


def test_readers_estimating_the_tail_while_a_thread_writes():
    """Every write makes the cells' read view stale; readers racing to rebuild it
    must each get a whole one (a serve load found readers seeing a half-built view)."""
    rng = np.random.default_rng(1)
    mem = Memory(16, index="HNSW8", temperature=0.1, probs="full")  # every query reads the cells
    mem.add(rng.standard_normal((6000, 16)), rng.integers(0, 300, 6000))  # a partition of its own

    def check(r):
        res = mem.query(r.standard_normal((3, 16)), k=8)
        assert np.isfinite(res.probs).all() and np.allclose(res.probs.sum(axis=1), 1)
        assert ((res.tail_estimate >= 0) & (res.tail_estimate <= 1)).all()

    def writes():
        for _ in range(300):
            mem.add(rng.standard_normal((5, 16)), rng.integers(0, 300, 5))

    # threads interleave every few bytecodes, so a half-built view would be seen
    assert readers_during(writes, check, switch_interval=1e-6) > 20
