"""The crasher of a sharded memory: random adds, upserts, removes, compactions, checkpoints and
queries over 3 shards on Ray, with shards SIGKILLed in the middle of operations and the
driver itself SIGKILLed; every acknowledged slot must stay with its exact values, no removed
id may come back, and an operation that failed may have taken effect on each shard wholly or
not at all.

The child (``python -m tests.cluster.sharded_crasher child DIR --seed S``) is the driver: it starts a
local Ray, opens (or creates) the sharded memory and reports on stdout as JSON lines:
``ready`` (with what the memory holds), then per operation ``op`` (its data, before calling
the engine), ``ack`` / ``fail`` / ``refused`` (what came back), and ``state`` (what the memory
holds once every shard answers again, and whether a query over it matched brute force). The
parent (:func:`run`) keeps the model, checks each state shard by shard against what the
operation allowed, and kills the driver at random moments; the next driver's ``ready``
settles the operation the kill left in doubt.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

DIM, CLASSES, SHARDS, T = 8, 5, 3, 0.5
ROOT = Path(__file__).resolve().parents[2]


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()


def _unb64(s: str, dtype, shape=(-1,)) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype).reshape(shape)


# -- the child: a driver ------------------------------------------------------------------------
def _dump(mem) -> dict:
    ids = mem.ids()
    s = mem.get(ids)
    return {"ids": ids.tolist(), "labels": [int(v) for v in s.labels], "weights": _b64(s.weights),
            "vectors": _b64(s.vectors)}


def _settle(mem, seconds: float = 90.0) -> dict:
    """What the memory holds once every shard answers (Ray restarts a killed one)."""
    from engine import ShardUnavailableError

    end = time.monotonic() + seconds
    while True:
        try:
            return _dump(mem)
        except ShardUnavailableError:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


def _query_matches(mem, dump: dict, q: np.ndarray, k: int) -> bool:
    """Whether a query's top-k ids and probabilities are brute force's over ``dump``."""
    ids = np.array(dump["ids"], np.int64)
    if len(ids) == 0:
        return True
    x = _unb64(dump["vectors"], np.float32, (-1, DIM)).astype(np.float64)
    w, y = _unb64(dump["weights"], np.float64), np.array(dump["labels"])
    res = mem.query(q, k=k)
    s = q.astype(np.float64) @ x.T
    kk = min(k, len(ids))
    for r in range(len(q)):
        top = np.argsort(-s[r], kind="stable")[:kk]
        if set(res.ids[r].tolist()) != set(ids[top].tolist()) and \
                not np.isclose(np.sort(s[r][top])[0], np.sort(s[r])[::-1][kk - 1]):  # ties at the k-th
            return False
        logits = s[r][top] / T + np.log(w[top])
        a = np.exp(logits - logits.max())
        a /= a.sum()
        want = {int(c): float(a[y[top] == c].sum()) for c in np.unique(y[top])}
        got = {int(c): float(p) for c, p in zip(res.classes, res.probs[r]) if p > 0}
        if want.keys() != got.keys() or any(abs(want[c] - got[c]) > 1e-5 for c in want):
            return False
    return True


def _open(path: str, seconds: float = 90.0):
    """Open the memory (or create it); a killed driver's shards may still hold their
    directories' locks for a moment."""
    from engine import MemoryLockedError, ShardUnavailableError
    from engine.cluster import ShardedMemory

    end = time.monotonic() + seconds
    while True:
        try:
            if (Path(path) / "sharded.json").exists():
                return ShardedMemory.open(path)
            return ShardedMemory(DIM, shards=SHARDS, path=path, index="Flat", metric="ip", temperature=T)
        except (MemoryLockedError, ShardUnavailableError):
            if time.monotonic() > end:
                raise
            time.sleep(0.5)


def child(path: str, seed: int, n_ops: int, kill_rate: float) -> None:
    import ray

    import engine

    report = os.fdopen(os.dup(1), "w")  # the reports alone on stdout: whatever Ray prints goes to stderr
    os.dup2(2, 1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             _node_ip_address="127.0.0.1")
    rng = np.random.default_rng(seed)
    say = lambda **m: (report.write(json.dumps(m) + "\n"), report.flush())  # noqa: E731
    mem = _open(path)
    state = _settle(mem)
    say(ready=True, contents=state)
    for j in range(n_ops):
        ids = np.array(state["ids"], np.int64)
        r = rng.random()
        if r < 0.45 or len(ids) < 12:
            n = int(rng.integers(1, 24))
            x = rng.standard_normal((n, DIM)).astype(np.float32)
            labels = rng.integers(0, CLASSES, n).tolist()
            weights = None if rng.random() < 0.5 else rng.uniform(0.5, 3.0, n)
            given, upsert = None, False
            if rng.random() < 0.5:
                fresh = np.unique(rng.integers(0, 2**40, n))
                upsert = bool(rng.random() < 0.5 and len(ids))
                if upsert:
                    m = min(len(fresh) // 2, len(ids))
                    fresh[:m] = rng.choice(ids, m, replace=False)
                    fresh = np.unique(fresh)
                given = fresh
                x, labels = x[:len(given)], labels[:len(given)]
                weights = None if weights is None else weights[:len(given)]
            say(j=j, op="add", ids=None if given is None else given.tolist(), labels=labels,
                weights=None if weights is None else weights.tolist(), vectors=_b64(x), upsert=upsert)
            call = lambda: mem.add(x, labels, ids=given, weights=weights, upsert=upsert).tolist()  # noqa: E731
        elif r < 0.7:
            victims = rng.choice(ids, int(rng.integers(1, min(15, len(ids)) + 1)), replace=False)
            if rng.random() < 0.1:
                victims = np.append(victims, 2**50)  # unknown: refused, nothing removed on any shard
            say(j=j, op="remove", ids=victims.tolist())
            call = lambda: mem.remove(victims)  # noqa: E731
        elif r < 0.8:
            budget = int(rng.integers(SHARDS * CLASSES, max(SHARDS * CLASSES + 1, len(ids))))
            say(j=j, op="compact", budget=budget)
            call = lambda: mem.compact(budget=budget, policy="merge")  # noqa: E731
        elif r < 0.85:
            say(j=j, op="save")
            call = lambda: str(mem.save())  # noqa: E731
        else:
            say(j=j, op="query")
            call = lambda: None  # noqa: E731 - asked below, once the memory is settled
        killer = None
        if rng.random() < kill_rate:  # SIGKILL a shard somewhere inside the operation
            victim = int(rng.integers(0, SHARDS))
            pid = mem.shard_pids()[victim]
            killer = threading.Timer(float(rng.choice([0.0, rng.uniform(0, 0.01)])), os.kill, (pid, signal.SIGKILL))
            killer.start()
        try:
            out = call()
            say(ack=j, out=out if isinstance(out, list) else None)
        except engine.ShardUnavailableError as exc:
            say(fail=j, written=[] if exc.written is None else np.asarray(exc.written).tolist(), why=str(exc))
        except (engine.InvalidValueError, engine.UnknownIdError, engine.DuplicateIdError) as exc:
            say(refused=j, why=str(exc))
        except engine.EngineError as exc:  # a shard died inside its part: in doubt, like a down shard
            say(fail=j, written=list(np.asarray(getattr(exc, "written", None) or [], np.int64).tolist()),
                why=str(exc))
        if killer is not None:
            killer.join()
        state = _settle(mem)
        q = rng.standard_normal((3, DIM)).astype(np.float32)
        say(state=j, contents=state, query_ok=_query_matches(mem, state, q, 8), shard_killed=killer is not None)
    mem.close()


# -- the parent -------------------------------------------------------------------------------
def _slots(d: dict) -> dict:
    w = _unb64(d["weights"], np.float64)
    v = _unb64(d["vectors"], np.float32, (-1, DIM))
    return {int(i): (int(lab), float(wt), vec.tobytes()) for i, lab, wt, vec in zip(d["ids"], d["labels"], w, v)}


def _shard(state: dict, s: int) -> dict:
    return {i: v for i, v in state.items() if i % SHARDS == s}


def _rows(op: dict) -> list[tuple]:
    v = _unb64(op["vectors"], np.float32, (-1, DIM))
    w = np.ones(len(v)) if op["weights"] is None else np.array(op["weights"])
    return [(int(lab), float(wt), vec.tobytes()) for lab, wt, vec in zip(op["labels"], w, v)]


def _mass(slots: dict) -> dict:
    m: dict = {}
    for lab, w, _ in slots.values():
        m[lab] = m.get(lab, 0.0) + w
    return m


def _allowed(shard: int, prev: dict, got: dict, op: dict | None, outcome: str, out) -> bool:
    """Whether shard ``shard``'s ``got`` is what ``op`` may have left of its ``prev``: applied exactly
    (acknowledged), untouched (refused), or either (failed, or its driver killed): a shard
    applies its part of an operation wholly or not at all."""
    if op is None or op["op"] in ("save", "query") or outcome == "refused":
        return got == prev
    applied = outcome == "ack"
    if op["op"] == "remove":
        after = {i: v for i, v in prev.items() if i not in set(op["ids"])}
        return got == after if applied else got in (prev, after)
    if op["op"] == "compact":
        share = op["budget"] // SHARDS
        if len(prev) <= share:  # within its share already: nothing to merge
            return got == prev
        a, b = _mass(got), _mass(prev)
        compacted = len(got) <= share and a.keys() == b.keys() and all(np.isclose(a[c], b[c], rtol=1e-9) for c in a) \
            and all(prev[i] == v for i, v in got.items() if i in prev)  # a slot kept keeps its values
        return compacted or (not applied and got == prev)
    rows = _rows(op)  # an add or upsert
    ids = op["ids"] if op["ids"] is not None else out
    if ids is not None:
        after = {**prev, **{int(i): row for i, row in zip(ids, rows) if int(i) % SHARDS == shard}}
        return got == after if applied else got in (prev, after)
    # fresh ids the shard chose, unknown to a driver that died or failed: the shard kept its
    # slots and gained its part of the batch (the rows dealt to it from one of the driver's
    # round-robin offsets), or nothing
    if any(prev[i] != got.get(i) for i in prev):
        return False
    new = Counter(got[i] for i in set(got) - set(prev))
    parts = [Counter(row for i, row in enumerate(rows) if (i + o) % SHARDS == shard) for o in range(SHARDS)]
    return not new or any(new == part for part in parts)


def check(state: dict, got: dict, op: dict | None, outcome: str, out, seen: set) -> str | None:
    """None if ``got`` is allowed shard by shard, else what is wrong. An id that appears is one
    the operation named, or one never seen before (``seen``: every id the memory ever held):
    ids are never reused, and no removed slot comes back."""
    named = set(op["ids"]) if op is not None and op["op"] == "add" and op["ids"] is not None else set()
    reused = sorted(i for i in set(got) - set(state) if i in seen and i not in named)
    if reused:
        return f"after {op and op['op']} ({outcome}): ids that were held before came back: {reused[:5]}"
    for s in range(SHARDS):
        if not _allowed(s, _shard(state, s), _shard(got, s), op, outcome, out):
            lost = sorted(set(_shard(state, s)) - set(got))[:5]
            return (f"shard {s} after {op and op['op']} ({outcome}): {len(_shard(got, s))} slots, "
                    f"had {len(_shard(state, s))}; e.g. missing {lost}")
    return None


def run(workdir: Path, *, rounds: int, seed: int, ops_per_child: int = 30, kill_rate: float = 0.15,
        deadline: float | None = None) -> dict:
    """Drive ``rounds`` drivers, each SIGKILLed at a random moment (or finishing); every state
    checked against the model. Returns counts."""
    rng = random.Random(seed)
    path = workdir / "sharded"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    state: dict = {}
    seen: set = set()
    counts = Counter()
    proc = None
    pending, outcome, out = None, "doubt", None  # a killed driver's last operation, settled by the next

    def take(msg: dict, rnd: int) -> None:
        nonlocal state, pending, outcome, out
        if "ready" in msg or "state" in msg:
            got = _slots(msg["contents"])
            problem = check(state, got, pending, outcome, out, seen)
            assert problem is None, f"round {rnd}: {problem}"
            counts["in_doubt_applied"] += outcome in ("fail", "doubt") and pending is not None and got != state
            state, pending, outcome, out = got, None, "doubt", None
            seen.update(got)
            counts["states"] += 1
            if "state" in msg:
                assert msg["query_ok"], f"round {rnd}: a query disagreed with brute force"
                counts["queries_checked"] += 1
                counts["shard_kills"] += msg["shard_killed"]
        elif "op" in msg:
            pending, outcome = msg, "doubt"
            counts["ops"] += 1
        else:
            outcome = next(key for key in ("ack", "fail", "refused") if key in msg)
            out = msg.get("out")
            counts[outcome] += 1

    try:
        for rnd in range(rounds):
            if deadline is not None and time.monotonic() > deadline:
                break
            kill_after = rng.randrange(4, 4 * ops_per_child)  # lines, about 4 an operation
            proc = subprocess.Popen([sys.executable, "-m", "tests.cluster.sharded_crasher", "child", str(path),
                                     "--seed", str(seed * 100_003 + rnd), "--ops", str(ops_per_child), "--kill-rate",
                                     str(kill_rate)], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
            lines, killed = 0, False
            for line in proc.stdout:
                if not line.endswith("\n"):
                    break
                take(json.loads(line), rnd)
                lines += 1
                if lines >= kill_after and pending is not None:
                    time.sleep(rng.uniform(0, 0.02))  # somewhere inside the operation
                    proc.kill()
                    killed = True
                    counts["driver_kills"] += 1
                    break
            if killed:  # what the driver reported before the kill counts too
                for line in proc.stdout:
                    if line.endswith("\n"):
                        take(json.loads(line), rnd)
            proc.wait()
            assert killed or proc.returncode == 0, f"round {rnd}: the driver died of an error (see stderr)"
            if not killed:
                pending = None  # its last operation was settled by its last state
            counts["rounds"] += 1
        counts["slots"] = len(state)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    return dict(counts)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("child")
    c.add_argument("path")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--ops", type=int, default=30)
    c.add_argument("--kill-rate", type=float, default=0.15)
    s = sub.add_parser("soak", help="a long run: drivers and shards killed, counts as JSON")
    s.add_argument("workdir", type=Path)
    s.add_argument("--rounds", type=int, default=1000)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--minutes", type=float, default=10.0)
    args = ap.parse_args()
    if args.cmd == "child":
        child(args.path, args.seed, args.ops, args.kill_rate)
    else:
        args.workdir.mkdir(parents=True, exist_ok=True)
        print(json.dumps(run(args.workdir, rounds=args.rounds, seed=args.seed,
                             deadline=time.monotonic() + 60 * args.minutes)))


if __name__ == "__main__":
    main()
