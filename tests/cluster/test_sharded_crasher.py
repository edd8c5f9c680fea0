"""The sharded crasher (tests/cluster/sharded_crasher.py), bounded so `make test` stays short; `make
bench` runs the soak."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("ray")

from .sharded_crasher import run  # noqa: E402


@pytest.mark.slow
def test_killed_shards_and_drivers_lose_no_acknowledged_write(tmp_path):
    counts = run(tmp_path, rounds=3, seed=5, ops_per_child=12, kill_rate=0.3, deadline=time.monotonic() + 60)
    print(counts)
    # the run must have met every kind of trouble it is meant to survive
    assert counts["rounds"] >= 2 and counts["driver_kills"] >= 1 and counts["states"] >= 15
    assert counts["shard_kills"] >= 3 and counts.get("fail", 0) >= 1 and counts["queries_checked"] >= 10
