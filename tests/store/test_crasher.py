"""The crasher (tests/store/crasher.py), bounded so `make test` stays short; `make bench` runs the soak."""

from __future__ import annotations

import time

import pytest

from .crasher import run


@pytest.mark.slow
def test_random_kills_faults_and_full_disks_lose_no_acknowledged_write(tmp_path):
    counts = run(tmp_path, rounds=400, seed=7, fault_rate=0.02, deadline=time.monotonic() + 45)
    print(counts)
    # the run must have met every kind of trouble it is meant to survive
    assert counts["rounds"] >= 20 and counts["acked"] >= 300
    assert counts["kills"] >= 5 and counts["failed"] >= 10 and counts["uncertain"] >= 2
    assert counts["full_disk_rounds"] >= 3 and counts["real_disk_errors"] >= 3  # ENOSPC (tmpfs) or EFBIG
