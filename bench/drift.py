"""Calibration under drift: a memory written first from one distribution, then from a harder
one elsewhere, growing less than the 4x at which its index would be rebuilt anyway.

    python bench/drift.py --out runs/bench                 # 200k + 300k slots, d=64; a few minutes
    python bench/drift.py --first 12000 --then 18000 --batch 3000   # a small run

Three memories take the same writes (batches of 50k, ``--batch``): learned-like slots, then
isotropic-hard slots (noise 1.2, 2,000 other classes):
- ``answer``: the default ``Memory(dim)``, its breadth calibrated on the answer and
  checked on the new slots once half as many rows as it was measured on have been
  written (engine/index/calibration.py, ``DRIFT_WRITTEN``);
- ``recall``: the same with ``recall=0.98``;
- ``stale``: the breadth the default chose on the first distribution, fixed (``nprobe=``),
  over the same index kind: what a memory that never looks again answers.
Each is asked 1,000 fresh queries from each distribution, compared with exact search at
the memory's temperature; reported: the breadth, what the memory says its recall is, the recall@64 and the
agreement of the class answer with exact search (``faiss.knn``) that fresh queries get,
a batch's time, ingest time and what the drift checks cost. Writes drift.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from calibration import K, _exact  # noqa: I001 - a sibling script

from engine import Memory
from engine.data.synthetic import DISTRIBUTIONS


def _fresh(mem, q, truth, exact_answer) -> dict:
    """A batch of fresh queries: its time, its answers' agreement with exact search, recall@64."""
    mem.query(q[:10], k=K)
    t0 = time.perf_counter()
    res = mem.query(q, k=K)
    return {"batch_s": time.perf_counter() - t0,
            "agree_exact": float(np.mean(np.asarray(res.labels) == exact_answer)),
            "recall_fresh": float(np.mean([len(np.intersect1d(a, b)) / K for a, b in zip(res.ids, truth)]))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--first", type=int, default=200_000, help="slots of the first distribution")
    ap.add_argument("--then", type=int, default=300_000, help="slots of the second, written after")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=50_000, help="slots an add writes")
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    d, m = args.dim, args.queries
    xa, ya, qa, _ = DISTRIBUTIONS["learned-like"](args.first, d, 1, m)
    xb, yb, qb, _ = DISTRIBUTIONS["isotropic-hard"](args.then, d, 2, m)
    yb = yb + int(ya.max()) + 1
    x, y = np.concatenate([xa, xb]), np.concatenate([ya, yb])
    b = args.batch
    batches = [(x[lo:lo + b], y[lo:lo + b]) for lo in range(0, len(x), b)]
    first_batches = -(-len(xa) // b)

    arms: dict[str, dict] = {}
    mems: dict[str, Memory] = {}
    first: dict = {}
    for name in ("answer", "recall", "stale"):
        if name == "answer":
            mem = Memory(d)
        elif name == "recall":
            mem = Memory(d, recall=0.98, temperature=first["temperature"])
        else:  # the breadth chosen on the first distribution, never looked at again
            mem = Memory(d, index=first["spec"], nprobe=first["nprobe"], temperature=first["temperature"])
        ingest = 0.0
        for i, (bx, by) in enumerate(batches):
            t0 = time.perf_counter()
            mem.add(bx, by)
            ingest += time.perf_counter() - t0
            if name == "answer" and i == first_batches - 1:
                stats = mem.stats()
                first = {"spec": mem.calibration.spec, "nprobe": stats.nprobe, "recall_reported": stats.recall,
                         "temperature": mem.temperature}
        stats, checks = mem.stats(), mem.calibration_checks
        mems[name] = mem
        arms[name] = {"ingest_s": ingest, "index": stats.index, "nprobe": stats.nprobe,
                      "recall_reported": stats.recall, "checks": len(checks),
                      "drifted": sum(c.drifted for c in checks), "checks_s": float(sum(c.seconds for c in checks)),
                      "check_log": [{"slots": c.slots, "written": c.written, "recall": c.recall,
                                     "agreement": c.agreement, "drifted": c.drifted, "seconds": c.seconds}
                                    for c in checks]}
        print(f"{name:7s} written in {ingest:.1f} s ({len(checks)} checks, {arms[name]['checks_s']:.2f} s, "
              f"{arms[name]['drifted']} drifted): {stats.index}, nprobe {stats.nprobe}", flush=True)
    t = first["temperature"]
    for part, q in (("first", qa), ("then", qb)):  # fresh queries from each distribution
        for name, mem in mems.items():  # against exact search at the temperature the memory attends at
            truth, exact_answer = _exact(x, y, q, mem.temperature)
            arms[name][part] = _fresh(mem, q, truth, exact_answer)
            arms[name]["temperature"] = mem.temperature
    for name, arm in arms.items():
        print(f"{name:7s} nprobe {arm['nprobe']}: says recall {arm['recall_reported']}, fresh queries get "
              f"recall {arm['first']['recall_fresh']:.3f} / {arm['then']['recall_fresh']:.3f} and agree "
              f"{arm['first']['agree_exact']:.3f} / {arm['then']['agree_exact']:.3f} (first / then)", flush=True)
    doc = {"meta": {"machine": platform.platform(), "first": args.first, "then": args.then, "dim": d,
                    "queries": m, "k": K, "temperature": t, "batch": b},
           "first_calibration": first, "arms": arms}
    (args.out / "drift.json").write_text(json.dumps(doc, indent=2))
    return doc


if __name__ == "__main__":
    main()
