"""Every damage is detected: a sweep over every byte and every truncation point of a memory.

A small durable memory (a snapshot, closed log segments with adds, upserts and
removes, settings in the manifest) is damaged one way at a time: each byte of
each file flipped, each file cut at each length. Every damaged copy must either
open to exactly the acknowledged state or raise CorruptFileError naming the
file; no other exception may escape. For a memory that crashed with its last
segment open, a cut inside that segment's last records is a torn write and may
drop them, and only them.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import engine
from engine import Memory


def contents(mem: Memory) -> dict:
    ids = mem.ids()
    s = mem.get(ids)
    return {int(i): (lab, float(w), v.tobytes()) for i, lab, w, v in zip(s.ids, s.labels, s.weights, s.vectors)}


def build(path) -> list[dict]:
    """A small memory; returns the acknowledged state after each write (the last is the final one)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((12, 4)).astype(np.float32)
    states = []
    mem = Memory(4, metric="ip", index="Flat", temperature=0.3, path=path)
    mem.add(x[:4], ["a", "b", "a", "c"])
    mem.remove([1])
    mem.save()
    mem.add(x[4:6], ["b", "d"], weights=[2.0, 0.5])
    mem.close()
    mem = Memory.open(path)
    states.append(contents(mem))
    mem.add(x[6:8], ["a", "a"], ids=[0, 9], upsert=True)
    states.append(contents(mem))
    mem.remove([3])
    states.append(contents(mem))
    mem.add(x[8:10], ["e", "b"])
    states.append(contents(mem))
    return mem, states


def sweep(src, tmp, expected: dict, torn_ok: list[dict] = ()) -> dict:
    """Flip each byte / cut each file of ``src``; count what each damaged copy opened to."""
    counts = {"flips": 0, "cuts": 0, "refused": 0, "exact": 0, "exact_after_flip": 0, "torn_tail": 0}
    files = sorted(p.name for p in src.iterdir())
    for name in files:
        raw = (src / name).read_bytes()
        damaged = [("flip", i, raw[:i] + bytes([raw[i] ^ (1 << (i % 8))]) + raw[i + 1:]) for i in range(len(raw))]
        damaged += [("cut", n, raw[:n]) for n in range(len(raw))]
        for kind, at, data in damaged:
            counts["flips" if kind == "flip" else "cuts"] += 1
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp)
            (tmp / name).write_bytes(data)
            try:
                with Memory.open(tmp) as mem:
                    got = contents(mem)
            except engine.CorruptFileError as exc:
                assert name in str(exc) or "manifest" in str(exc), (name, kind, at, str(exc))
                counts["refused"] += 1
                continue
            if got == expected:
                counts["exact"] += 1
                counts["exact_after_flip"] += kind == "flip"
            elif kind == "cut" and got in torn_ok:
                counts["torn_tail"] += 1
            else:
                raise AssertionError(f"{name} {kind} at {at}: opened to a state that was never acknowledged")
    return counts


@pytest.mark.slow
def test_every_flip_and_cut_of_a_closed_memory_is_refused_or_harmless(tmp_path):
    mem, states = build(tmp_path / "m")
    mem.close()
    counts = sweep(tmp_path / "m", tmp_path / "copy", states[-1])
    print("closed memory:", counts)
    assert counts["flips"] + counts["cuts"] == counts["refused"] + counts["exact"]
    assert counts["exact"] == 0  # a closed memory has no slack: every change is detected


@pytest.mark.slow
def test_every_flip_and_cut_of_a_crashed_memory(tmp_path):
    mem, states = build(tmp_path / "m")
    shutil.copytree(tmp_path / "m", tmp_path / "crashed")  # what kill -9 leaves: the last segment open
    mem.close()
    counts = sweep(tmp_path / "crashed", tmp_path / "copy", states[-1], torn_ok=states[:-1])
    print("crashed memory:", counts)
    assert counts["flips"] == sum(1 for p in (tmp_path / "crashed").iterdir() for _ in p.read_bytes())
    assert counts["torn_tail"] > 0  # cuts inside the open segment's records drop only those records
    assert counts["exact_after_flip"] == 0  # no flip passes unnoticed
    assert counts["flips"] + counts["cuts"] == counts["refused"] + counts["exact"] + counts["torn_tail"]
