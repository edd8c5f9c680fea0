"""One protocol, three memories.

``engine.testing.MemoryContract`` runs the same writes, queries (both probability modes)
and bad input through each memory's public API against dense float64 attention: an
in-process ``Memory``, a durable one, a ``Client`` of a local server and a
``ShardedMemory`` on a local Ray (a few tests skipped there are covered by the cross-check
below). Then two cross-checks: a
served IVF memory answers as an embedded one, and Flat shards answer as one memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import engine
from engine import Client, Memory
from engine.data import clustered
from engine.protocol import MemoryLike
from engine.serve import MemoryServer
from engine.testing import MemoryContract, omitted_mass

from .serve.test_serve import same_result

DIM = 16
T = 0.1  # every contract memory's temperature: a number (ShardedMemory refuses "auto")
TOKEN = "contract-token"


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (starting it takes seconds); only sharded tests ask for it."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


class TestMemory(MemoryContract):
    """An in-process Memory: no path, so nothing to reopen."""

    temperature = T
    durable = False

    def create(self, path: Path) -> MemoryLike:
        return Memory(self.dim, index="Flat", metric=self.metric, temperature=self.temperature)


class TestDurableMemory(MemoryContract):
    temperature = T

    def create(self, path: Path) -> MemoryLike:
        return Memory(self.dim, index="Flat", metric=self.metric, temperature=self.temperature, path=path)

    def reopen(self, memory: MemoryLike, path: Path) -> MemoryLike:
        memory.close()
        return Memory.open(path)


class TestClient(MemoryContract):
    """A durable Memory served on a free local port, written and read through Client."""

    temperature = T

    def create(self, path: Path) -> MemoryLike:
        return self._serve(Memory(self.dim, index="Flat", metric=self.metric, temperature=self.temperature,
                                  path=path))

    def reopen(self, memory: MemoryLike, path: Path) -> MemoryLike:
        memory.close()  # the client; then the server and its memory, as a restart would
        self._stop()
        return self._serve(Memory.open(path))

    def _serve(self, served: Memory) -> Client:
        server = MemoryServer({"m": served}, "grpc://127.0.0.1:0", token=TOKEN)
        self._running = (server, served)
        self.on_teardown(self._stop)
        return Client(f"grpc://127.0.0.1:{server.port}", "m", token=TOKEN)

    def _stop(self) -> None:
        running, self._running = getattr(self, "_running", None), None
        if running is not None:
            running[0].shutdown()
            running[1].close()


@pytest.fixture
def pair(tmp_path):
    served = Memory(DIM, index="IVF16,Flat", nprobe=4, path=tmp_path / "m")
    server = MemoryServer({"m": served}, "grpc://127.0.0.1:0", open_reads=True, token="t")
    client = Client(f"grpc://127.0.0.1:{server.port}", "m", token="t")
    local = Memory(DIM, index="IVF16,Flat", nprobe=4)
    yield local, client
    server.shutdown()
    served.close()


def same(a, b):
    same_result(a, b)
    assert (a.tail_estimate is None) == (b.tail_estimate is None)
    if a.tail_estimate is not None:
        np.testing.assert_allclose(a.tail_estimate, b.tail_estimate, atol=1e-12)


def test_memory_and_client_answer_alike_through_writes_in_both_modes(pair, rng):
    local, client = pair
    assert isinstance(local, MemoryLike) and isinstance(client, MemoryLike)
    x, y = clustered(3000, DIM, n_classes=20, seed=9)
    q = x[rng.integers(0, len(x), 40)] + 0.2 * rng.standard_normal((40, DIM)).astype(np.float32)
    for mem in (local, client):
        ids = mem.add(x[:2000], y[:2000], weights=np.linspace(0.5, 2.0, 2000))
    steps = [lambda m: None, lambda m: m.remove(ids[::5]), lambda m: m.add(x[2000:], y[2000:])]
    for step in steps:
        step(local), step(client)
        for probs in (None, "top-k", "full"):
            for k in (1, 8, 64):
                kw = {} if probs is None else {"probs": probs}
                same(local.query(q, k=k, **kw), client.query(q, k=k, **kw))
        same(local.query(q[0], k=8, probs="full"), client.query(q[0], k=8, probs="full"))  # a lone query
        same(local.query(q, k=8, tail=0.5, probs="full"), client.query(q, k=8, tail=0.5, probs="full"))
    assert len(local) == len(client)
    for mem in (local, client):
        with pytest.raises(engine.InvalidValueError, match="probs"):
            mem.query(q, k=8, probs="every")
    _label_verbs_agree(local, client, y, q)


def _label_verbs_agree(reference, other, y, q):
    """ids(labels=) and remove(labels=) on ``other`` as on ``reference``, against the labels written."""
    for mem in (reference, other):
        assert mem.ids(labels=[3, 5]).tolist() == reference.ids(labels=[5, 3]).tolist()
        held = mem.get(mem.ids(labels=[3, 5]))
        assert set(held.labels) == {3, 5}
        assert len(held.labels) == sum(int(v) in (3, 5) for v in mem.get(mem.ids()).labels)
        assert len(mem.ids(labels=[999])) == 0  # no slot of that label: none
        with pytest.raises(engine.InvalidValueError, match="labels"):
            mem.ids(labels=["three"])  # another kind than the memory's
    n = len(reference.ids(labels=[3]))
    assert reference.remove(labels=[3]) == other.remove(labels=3) == n > 0
    for mem in (reference, other):
        with pytest.raises(engine.UnknownLabelError) as exc:
            mem.remove(labels=[3, 4])  # 3 has no slot left: nothing removed
        assert exc.value.labels == [3] and len(mem.ids(labels=[4])) > 0
        with pytest.raises(engine.InvalidValueError):
            mem.remove([1], labels=[4])
    assert reference.ids().tolist() == other.ids().tolist()
    a, b = reference.query(q, k=8, probs="top-k"), other.query(q, k=8, probs="top-k")
    assert a.classes.tolist() == b.classes.tolist() and 3 not in a.classes.tolist()
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-9)


def test_a_sharded_memory_answers_as_one_memory_through_writes_in_both_modes(local_ray, tmp_path, rng):
    """Flat shards score every slot, so the sharded answer is one memory's in both modes,
    whatever was added and removed (ids may swap places only where float32 scores tie)."""
    from engine.cluster import ShardedMemory

    sharded = ShardedMemory(DIM, shards=2, path=tmp_path / "s", index="Flat", temperature=0.1)
    local = Memory(DIM, index="Flat", temperature=0.1)
    assert isinstance(sharded, MemoryLike)
    x, y = clustered(3000, DIM, n_classes=20, seed=9)
    q = x[rng.integers(0, len(x), 30)] + 0.2 * rng.standard_normal((30, DIM)).astype(np.float32)
    w = np.linspace(0.5, 2.0, 3000)
    ids = np.arange(3000, dtype=np.int64) * 7
    steps = [lambda m: m.add(x[:2000], y[:2000], ids=ids[:2000], weights=w[:2000]),
             lambda m: m.remove(ids[:2000:5]),
             lambda m: m.add(x[2000:], y[2000:], ids=ids[2000:], weights=w[2000:])]
    for step in steps:
        step(local), step(sharded)
        assert len(local) == len(sharded)
        for probs in ("top-k", "full"):
            for k in (1, 8, 64):
                a, b = local.query(q, k=k, probs=probs), sharded.query(q, k=k, probs=probs)
                np.testing.assert_array_equal(a.labels, b.labels)
                np.testing.assert_array_equal(np.sort(a.ids, axis=1), np.sort(b.ids, axis=1))
                np.testing.assert_allclose(a.probs, b.probs, atol=1e-9)
                np.testing.assert_allclose(np.sort(a.attention, axis=1), np.sort(b.attention, axis=1), atol=1e-9)
                if probs == "full":  # every slot scored: nothing left to bound
                    assert (a.tail_bound == 0).all() and (b.tail_bound == 0).all()
                else:  # each bounds the mass it left out (a merge's own way): both certificates
                    live = local.get(local.ids())
                    for res in (a, b):
                        true = omitted_mass(live.vectors, q, res.ids, temperature=0.1, weights=live.weights,
                                            ids=live.ids)
                        assert (res.tail_bound >= true - 1e-9).all()
    _label_verbs_agree(local, sharded, y, q[:3])
    sharded.close()


COVERED = "kept small: the sharded cross-check (given ids, weights, removes) covers it against one Memory"


@pytest.mark.usefixtures("local_ray")
class TestShardedMemory(MemoryContract):
    """Two Flat shards on the module's local Ray (each test starts and ends its actors)."""

    temperature = T

    def create(self, path: Path) -> MemoryLike:
        from engine.cluster import ShardedMemory

        return ShardedMemory(self.dim, shards=2, path=path, index="Flat", metric=self.metric,
                             temperature=self.temperature)

    def reopen(self, memory: MemoryLike, path: Path) -> MemoryLike:
        from engine.cluster import ShardedMemory

        memory.close()
        return ShardedMemory.open(path)

    # The contract is kept small here (each test starts two Ray actors, a second or two):
    # these three are what test_a_sharded_memory_answers_as_one_memory_through_writes_in_both_modes
    # checks, at 3,000 slots, against a Memory that passes them.
    @pytest.mark.skip(reason=COVERED)
    def test_given_ids_are_kept_and_name_their_slots(self, tmp_path: Path) -> None:
        super().test_given_ids_are_kept_and_name_their_slots(tmp_path)

    @pytest.mark.skip(reason=COVERED)
    def test_weights_are_slot_masses(self, tmp_path: Path) -> None:
        super().test_weights_are_slot_masses(tmp_path)

    @pytest.mark.skip(reason=COVERED)
    def test_remove_by_ids(self, tmp_path: Path) -> None:
        super().test_remove_by_ids(tmp_path)
