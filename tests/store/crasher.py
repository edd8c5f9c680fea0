"""A crasher in the style of Qdrant's: random operations on a durable memory, random SIGKILLs,
random injected I/O errors and a really full disk; after every reopen, every acknowledged slot
must be there with its exact values, and no removed id may be back.

The child (``python -m tests.store.crasher child DIR --seed S``) runs random operations and reports
each one on stdout as a JSON line: ``begin`` (with the operation's data) before calling the
engine, then ``ack`` (with what it returned), ``fail`` (a StorageError, with ``uncertain``),
``refused`` (bad input: nothing may change) or ``dead`` (the memory refuses writes: the child
exits so the parent reopens). The parent (:func:`run`) keeps the model of what was
acknowledged, kills the child at random moments, fills and frees the disk under it, reopens
the memory and compares.
"""

from __future__ import annotations

import argparse
import base64
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DIM = 16
CLASSES = 8
ROOT = Path(__file__).resolve().parents[2]


# -- the child ------------------------------------------------------------------------------
def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()


def child(path: str, seed: int, fault_rate: float, n_ops: int, fsize: int | None = None) -> None:
    import engine
    from engine import Memory

    from .faults import Faults

    if fsize:  # no tmpfs: a file-size limit makes writes fail with EFBIG instead of ENOSPC
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    rng = np.random.default_rng(seed)
    say = lambda **m: (sys.stdout.write(json.dumps(m) + "\n"), sys.stdout.flush())  # noqa: E731
    try:
        mem = Memory.open(path) if (Path(path) / "manifest.json").exists() else \
            Memory(DIM, metric="ip", index="Flat", temperature=0.5, path=path, track_usage=True)
    except engine.StorageError as exc:  # a full disk at create
        say(dead=-1, why=str(exc))
        return
    faults = Faults(rate=fault_rate, seed=seed)
    say(ready=True)
    for j in range(n_ops):
        ids = mem.ids()
        r = rng.random()
        if r < 0.5 or len(ids) < 20:
            n = int(rng.integers(1, 40))
            x = rng.standard_normal((n, DIM)).astype(np.float32)
            labels = rng.integers(0, CLASSES, n).tolist()
            weights = None if rng.random() < 0.6 else rng.uniform(0.5, 3.0, n)
            given, upsert = None, False
            if rng.random() < 0.5:
                fresh = rng.integers(0, 2**40, n)
                upsert = bool(rng.random() < 0.4 and len(ids))
                if upsert:
                    m = min(n // 2, len(ids))
                    fresh[:m] = rng.choice(ids, m, replace=False)
                given = np.unique(fresh)
                x, labels = x[: len(given)], labels[: len(given)]
                weights = None if weights is None else weights[: len(given)]
            say(j=j, op="add", ids=None if given is None else given.tolist(), labels=labels,
                weights=None if weights is None else weights.tolist(), vectors=_b64(x), upsert=upsert)
            call = lambda: mem.add(x, labels, ids=given, weights=weights, upsert=upsert).tolist()  # noqa: E731
        elif r < 0.8:
            victims = rng.choice(ids, int(rng.integers(1, min(30, len(ids)) + 1)), replace=False)
            if rng.random() < 0.1:
                victims = np.append(victims, 2**50)  # unknown: refused, nothing removed
            say(j=j, op="remove", ids=victims.tolist())
            call = lambda: mem.remove(victims)  # noqa: E731
        elif r < 0.9:
            say(j=j, op="save")
            call = lambda: str(mem.save())  # noqa: E731
        else:
            budget = int(rng.integers(CLASSES, max(CLASSES + 1, len(ids))))
            policy = ["merge", "reservoir", "age"][int(rng.integers(0, 3))]
            say(j=j, op="compact", budget=budget)
            call = lambda: mem.compact(budget=budget, policy=policy)  # noqa: E731
        injected_before = faults.injected
        try:
            out = call()
        except engine.MemoryFailedError as exc:
            say(dead=j, why=str(exc))
            return
        except engine.StorageError as exc:
            say(fail=j, uncertain=exc.uncertain, errno=errno.errorcode.get(exc.errno, str(exc.errno)),
                real=faults.injected == injected_before, why=str(exc))
            continue
        except (engine.InvalidValueError, engine.UnknownIdError, engine.DuplicateIdError) as exc:
            say(refused=j, why=str(exc))
            continue
        faults.disarm()  # reading back what was acknowledged is no write
        compacted = isinstance(out, engine.CompactionReport)
        dump = contents_b64(mem) if compacted else None
        faults.rate = fault_rate
        say(ack=j, out=None if compacted else out, contents=dump)
    mem.close()


def contents_b64(mem) -> dict:
    ids = mem.ids()
    s = mem.get(ids)
    return {"ids": ids.tolist(), "labels": list(s.labels), "weights": _b64(s.weights), "vectors": _b64(s.vectors)}


# -- the parent -----------------------------------------------------------------------------
def _slots(ids, labels, weights, vectors) -> dict:
    return {int(i): (int(lab), float(w), v.tobytes()) for i, lab, w, v in zip(ids, labels, weights, vectors)}


def _decode_contents(d: dict) -> dict:
    w = np.frombuffer(base64.b64decode(d["weights"]), np.float64)
    v = np.frombuffer(base64.b64decode(d["vectors"]), np.float32).reshape(-1, DIM)
    return _slots(d["ids"], d["labels"], w, v)


def contents(mem) -> dict:
    ids = mem.ids()
    s = mem.get(ids)
    return _slots(s.ids, s.labels, s.weights, s.vectors)


def _apply(state: dict, op: dict, out) -> list[dict]:
    """The states an in-doubt ``op`` may have left: applied or not (``out`` if it returned)."""
    if op["op"] == "save":
        return [state]
    if op["op"] == "remove":
        if any(i not in state for i in op["ids"]):
            return [state]
        return [state, {k: v for k, v in state.items() if k not in set(op["ids"])}]
    if op["op"] == "add":
        v = np.frombuffer(base64.b64decode(op["vectors"]), np.float32).reshape(-1, DIM)
        w = np.ones(len(v)) if op["weights"] is None else np.array(op["weights"])
        ids = op["ids"] if op["ids"] is not None else out
        if ids is None:
            return [state, "auto-ids"]
        return [state, {**state, **_slots(ids, op["labels"], w, v)}]
    return [state, "compacted"]


def _mass(state: dict) -> dict:
    m: dict = {}
    for lab, w, _ in state.values():
        m[lab] = m.get(lab, 0.0) + w
    return m


def _matches(got: dict, state: dict, candidate, op: dict | None) -> bool:
    if isinstance(candidate, dict):
        return got == candidate
    if candidate == "auto-ids":  # the new slots are the batch, in id order, beside the old state
        new = sorted(set(got) - set(state))
        v = np.frombuffer(base64.b64decode(op["vectors"]), np.float32).reshape(-1, DIM)
        w = np.ones(len(v)) if op["weights"] is None else np.array(op["weights"])
        return {k: got[k] for k in state} == state and got == {**state, **_slots(new, op["labels"], w, v)}
    # an in-doubt compaction: within its budget, every class's mass preserved
    a, b = _mass(got), _mass(state)
    return len(got) <= max(op["budget"], len(state)) and a.keys() == b.keys() and \
        all(np.isclose(a[c], b[c], rtol=1e-9) for c in a)


class Disk:
    """A small tmpfs for real ENOSPC (as root), filled and freed with a ballast file."""

    def __init__(self, where: Path, size: str = "8m"):
        self.where, self.mounted = where, False
        where.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0 and not os.environ.get("ENGINE_CRASHER_NO_TMPFS"):
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                               capture_output=True)
            self.mounted = r.returncode == 0
        self.ballast = where / "ballast"

    def fill(self, leave: int) -> None:
        """Fill the disk but ``leave`` bytes."""
        if not self.mounted:
            return
        st = os.statvfs(self.where)
        size = max(0, st.f_bavail * st.f_frsize - leave)
        try:
            with open(self.ballast, "ab") as f:
                f.write(b"\0" * size)
        except OSError as exc:  # full already: that is the point
            if exc.errno != errno.ENOSPC:
                raise

    def free(self) -> None:
        self.ballast.unlink(missing_ok=True)

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.where)], capture_output=True)




def leave(rng: random.Random) -> int:
    """Bytes a filled disk keeps free: mostly a few KB, so the writes of a round (log records
    of a few KB, snapshots of tens to hundreds of KB) run into it; sometimes more, so that
    a nearly full disk also lets writes through."""
    return rng.randrange(0, 20_000) if rng.random() < 0.7 else rng.randrange(0, 300_000)


def run(workdir: Path, *, rounds: int, seed: int, fault_rate: float = 0.02, ops_per_child: int = 60,
        deadline: float | None = None) -> dict:
    """Kill, fault and refill a writer ``rounds`` times; check every reopen. Returns counts."""
    from engine import Memory

    rng = random.Random(seed)
    disk = Disk(workdir / "disk")
    path = disk.where / "mem"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    state: dict = {}
    counts = dict(rounds=0, ops=0, acked=0, kills=0, failed=0, uncertain=0, dead=0, refused=0, in_doubt=0,
                  full_disk_rounds=0, real_disk_errors=0, errnos={}, tmpfs=disk.mounted)
    proc = None
    try:
        for rnd in range(rounds):
            if deadline is not None and time.monotonic() > deadline:
                break
            kill_after = rng.randrange(1, 2 * ops_per_child)
            fill_at = rng.randrange(0, kill_after) if disk.mounted and rng.random() < 0.3 else None
            free_at = rng.randrange(fill_at, kill_after + 1) if fill_at is not None else None
            fsize = rng.randrange(2_000, 60_000) if not disk.mounted and rng.random() < 0.3 else 0
            counts["full_disk_rounds"] += fill_at is not None or bool(fsize)
            if fill_at == 0:
                disk.fill(leave(rng))
            proc = subprocess.Popen([sys.executable, "-m", "tests.store.crasher", "child", str(path), "--seed",
                                     str(seed * 100_003 + rnd), "--fault-rate", str(fault_rate), "--ops",
                                     str(ops_per_child), "--fsize", str(fsize)],
                                    stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
            pending, uncertain_op, lines, killed = None, None, 0, False

            def take(msg):
                nonlocal pending, uncertain_op, state
                if "op" in msg:
                    pending = msg
                    counts["ops"] += 1
                    return
                if "ack" in msg:
                    state = _decode_contents(msg["contents"]) if msg["contents"] else \
                        _apply(state, pending, msg["out"])[-1]
                    counts["acked"] += 1
                elif "fail" in msg:
                    counts["failed"] += 1
                    counts["real_disk_errors"] += msg["real"]
                    counts["errnos"][msg["errno"]] = counts["errnos"].get(msg["errno"], 0) + 1
                    if msg["uncertain"]:
                        counts["uncertain"] += 1
                        uncertain_op = pending  # in doubt until the reopen
                elif "refused" in msg:
                    counts["refused"] += 1
                elif "dead" in msg:
                    counts["dead"] += 1
                pending = None

            for line in proc.stdout:
                if not line.endswith("\n"):  # cut by the kill: that report never arrived
                    break
                take(json.loads(line))
                lines += 1
                if lines == fill_at:
                    disk.fill(leave(rng))
                if lines == free_at:
                    disk.free()
                if lines >= kill_after:
                    time.sleep(rng.uniform(0, 0.003))  # land somewhere inside the next operation
                    proc.kill()
                    killed = True
                    break
            if killed:
                for line in proc.stdout:  # what was printed before the kill counts too
                    if line.endswith("\n"):
                        take(json.loads(line))
                counts["kills"] += 1
            proc.wait()
            disk.free()
            assert killed or proc.returncode == 0, f"round {rnd}: the writer died of an error (see stderr)"
            doubt = [op for op in (uncertain_op, pending) if op]
            if not (path / "manifest.json").exists():
                assert not state, "acknowledged slots but no memory"
                continue
            with Memory.open(path) as mem:
                got = contents(mem)
            # an uncertain write stops all later ones, so at most one of the doubtful ops took effect
            candidates = [(state, None)] + [(c, op) for op in doubt for c in _apply(state, op, None)[1:]]
            ok = any(_matches(got, state, c, op) for c, op in candidates)
            assert ok, (f"round {rnd}: reopened memory ({len(got)} slots) is not the acknowledged state "
                        f"({len(state)} slots) {'nor it plus the ' + str([d['op'] for d in doubt]) if doubt else ''}")
            counts["in_doubt"] += bool(doubt) and got != state
            state = got
            counts["rounds"] += 1
    finally:
        if proc is not None and proc.poll() is None:  # never pull the disk from under a live writer
            proc.kill()
            proc.wait()
        disk.free()
        disk.close()
    return counts


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("child")
    c.add_argument("path")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--fault-rate", type=float, default=0.0)
    c.add_argument("--ops", type=int, default=60)
    c.add_argument("--fsize", type=int, default=0)
    s = sub.add_parser("soak", help="a long run: rounds of kills and faults, counts as JSON")
    s.add_argument("workdir", type=Path)
    s.add_argument("--rounds", type=int, default=2000)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--minutes", type=float, default=20.0)
    args = ap.parse_args()
    if args.cmd == "child":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        child(args.path, args.seed, args.fault_rate, args.ops, args.fsize or None)
    else:
        args.workdir.mkdir(parents=True, exist_ok=True)
        counts = run(args.workdir, rounds=args.rounds, seed=args.seed,
                     deadline=time.monotonic() + 60 * args.minutes)
        print(json.dumps(counts))


if __name__ == "__main__":
    main()
