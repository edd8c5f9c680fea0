"""A writer for the crash tests: runs a deterministic sequence of operations on a
durable memory and prints ``ACK j`` after operation j returns.

    python -m tests.store.crash_writer DIR --start J --seed S

The parent kills it with SIGKILL at random points and checks what reopens.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

DIM = 32
BATCH = 300


def make_ops(seed: int, n: int) -> list[tuple]:
    """The operation sequence: adds of BATCH slots with explicit ids, removes, checkpoints."""
    rng = np.random.default_rng(seed)
    ops = []
    for j in range(n):
        if j % 5 == 3:
            victim = j - 2 - 5 * int(rng.integers(0, max(1, j // 5)))
            victim -= (victim % 5 == 3)  # adds only
            ids = victim * 1000 + rng.choice(BATCH, 40, replace=False)
            ops.append(("remove", np.unique(ids)))
        elif j % 10 == 9:
            ops.append(("save",))
        else:
            x = rng.standard_normal((BATCH, DIM)).astype(np.float32)
            ops.append(("add", j * 1000 + np.arange(BATCH), x, [f"c{v}" for v in rng.integers(0, 12, BATCH)]))
    return ops


def apply(mem, op) -> None:
    if op[0] == "add":
        mem.add(op[2], op[3], ids=op[1])
    elif op[0] == "remove":
        present = [i for i in op[1].tolist() if i in mem]
        if present:
            mem.remove(present)
    else:
        mem.save()


def main() -> None:
    from engine import Memory

    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ops", type=int, default=400)
    args = ap.parse_args()
    mem = Memory.open(args.path) if args.start else Memory(DIM, index="Flat", temperature=0.1, path=args.path)
    print("READY", flush=True)
    for j, op in enumerate(make_ops(args.seed, args.ops)):
        if j >= args.start:
            apply(mem, op)
            sys.stdout.write(f"ACK {j}\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
