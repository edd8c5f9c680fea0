"""Nothing acknowledged is lost: SIGKILL a writer at random points, reopen, compare.

One writer process is killed and restarted over the same directory again and
again, so recovery also meets WAL segments that end in torn records and kills
that land inside a checkpoint. After each kill the memory must hold exactly the
operations acknowledged so far, plus at most the one in flight, whole; and it
must answer queries like a memory that never crashed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine import Memory

from .crash_writer import DIM, apply, make_ops

ROOT = Path(__file__).resolve().parents[2]
SEED = 11
N_OPS = 400
KILLS = 24


def reference(ops, n):
    mem = Memory(DIM, index="Flat", temperature=0.1)
    for op in ops[:n]:
        if op[0] != "save":
            apply(mem, op)
    return mem


def same_answers(a: Memory, b: Memory, probes) -> bool:
    ra, rb = a.query(probes, k=25), b.query(probes, k=25)
    return (
        np.array_equal(ra.ids, rb.ids)
        and list(ra.labels) == list(rb.labels)
        and np.allclose(ra.probs, rb.probs, atol=1e-9)
    )


def applied_prefix(mem: Memory, ops, acked: int) -> int:
    """Which prefix of ops the reopened memory holds: acked+1 or acked+2 (the one in flight)."""
    for n in (acked + 1, acked + 2):
        ref = reference(ops, n)
        ids_ref = set(i for op in ops[:n] if op[0] == "add" for i in op[1].tolist())
        ids_ref -= set(i for op in ops[:n] if op[0] == "remove" for i in op[1].tolist())
        if len(mem) == len(ref) and all(i in mem for i in ids_ref):
            return n
    raise AssertionError(f"reopened memory ({len(mem)} slots) matches neither {acked + 1} nor {acked + 2} ops")


@pytest.mark.slow
def test_sigkill_at_random_points_loses_no_acknowledged_write(tmp_path):
    rng = np.random.default_rng(SEED)
    ops = make_ops(SEED, N_OPS)
    probes = rng.standard_normal((10, DIM))
    path = tmp_path / "mem"
    start, kills = 0, 0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    while kills < KILLS and start < N_OPS:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.store.crash_writer", str(path), "--start", str(start),
             "--seed", str(SEED), "--ops", str(N_OPS)],
            stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT,
        )
        assert proc.stdout.readline().strip() == "READY"
        acked = start - 1
        target = start + int(rng.integers(0, 6))
        while acked < target:
            line = proc.stdout.readline()
            assert line.startswith("ACK"), line
            acked = int(line.split()[1])
        time.sleep(float(rng.uniform(0, 0.004)))  # land somewhere inside the next operation
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        for line in proc.stdout:  # acks printed before the kill count too
            acked = int(line.split()[1])
        kills += 1

        mem = Memory.open(path)
        n = applied_prefix(mem, ops, acked)
        assert same_answers(mem, reference(ops, n), probes)
        mem.close()
        start = n
    assert kills == KILLS
