"""A sharded memory on a simulated multi-node Ray cluster (ray.cluster_utils.Cluster):
shards spread over nodes, and a node removed during a stream of writes loses nothing
acknowledged; a query meanwhile fails naming the shard or answers with a valid bound.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from engine.cluster import ShardedMemory, ShardUnavailableError  # noqa: E402
from engine.data import clustered  # noqa: E402
from engine.testing import omitted_mass  # noqa: E402

DIM, T = 16, 0.1


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    yield c, workers
    ray.shutdown()
    c.shutdown()


def test_removing_a_node_loses_no_acknowledged_write(cluster, tmp_path):
    c, workers = cluster
    x, y, q, _ = clustered(3000, DIM, n_classes=10, seed=2, queries=20)
    mem = ShardedMemory(DIM, shards=3, path=tmp_path / "m", index="Flat", temperature=T)
    try:
        nodes = mem.shard_nodes()
        assert len(set(nodes)) == 3  # SPREAD: one shard a node
        acked = []
        for i in range(0, 1500, 100):
            # explicit ids (the slot's row) so that the dense reference can find every slot
            acked.extend(mem.add(x[i:i + 100], y[i:i + 100], ids=np.arange(i, i + 100)).tolist())
        victim = next(s for s, node in enumerate(nodes) if node in {w.node_id for w in workers})
        c.remove_node(next(w for w in workers if w.node_id == nodes[victim]))
        down, partial = False, None
        for i in range(1500, 3000, 100):
            try:
                acked.extend(mem.add(x[i:i + 100], y[i:i + 100], ids=np.arange(i, i + 100)).tolist())
            except ShardUnavailableError as exc:
                assert exc.shards == [victim]
                acked.extend(exc.written.tolist())
                if not down:  # right after the failure, while the shard is still down
                    partial = mem.query(q, k=16, allow_partial=True)
                down = True
        assert down and partial is not None
        if partial.missing_shards:  # answered by the live shards: the bound covers the missing one
            assert partial.missing_shards == (victim,) and not partial.exact_bound
            everything = np.array(sorted(set(acked)))  # ids are rows of x
            positions = np.where(partial.ids >= 0, np.searchsorted(everything, partial.ids), -1)
            assert (partial.tail_bound >= omitted_mass(x[everything], q, positions, temperature=T) - 1e-9).all()
        end = time.monotonic() + 120
        while True:  # Ray restarts the shard on a live node; it reopens its directory
            try:
                mem.query(q[:2], k=4)
                break
            except ShardUnavailableError:
                assert time.monotonic() < end, "the shard was not restarted"
                time.sleep(0.5)
        assert mem.shard_nodes()[victim] != nodes[victim]
        got = mem.get(np.array(sorted(set(acked))))
        assert set(got.ids.tolist()) == set(acked)
    finally:
        mem.close()
