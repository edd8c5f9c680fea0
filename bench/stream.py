"""A long stream of writes under a slot budget: process memory must stay flat.

    python bench/stream.py --writes 10000000 --budget 100000 --out runs/bench

Writes batches of clustered synthetic embeddings (engine.data.clustered, seeded)
into a memory with ``budget=`` (automatic compaction down to budget x (1 - slack)),
and records the slot count, the process's resident memory (VmRSS) and the
write rate after every batch. Writes stream.json and stream.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine import Memory
from engine.data import clustered


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--writes", type=int, default=10_000_000)
    ap.add_argument("--budget", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--policy", default="merge")
    ap.add_argument("--slack", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    pool_x, pool_y = clustered(max(args.batch * 10, 100_000), args.dim, n_classes=args.classes, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    mem = Memory(args.dim, index="Flat", budget=args.budget, slack=args.slack, policy=args.policy)
    trace = []
    t0 = time.perf_counter()
    written = 0
    with tqdm(total=args.writes, desc="streaming writes", unit="slot", unit_scale=True) as bar:
        while written < args.writes:
            n = min(args.batch, args.writes - written)
            pick = rng.integers(0, len(pool_x), n)
            noise = 0.05 * rng.standard_normal((n, args.dim)).astype(np.float32)
            mem.add(pool_x[pick] + noise, pool_y[pick])
            written += n
            bar.update(n)
            trace.append({"writes": written, "slots": len(mem), "rss": rss_bytes(),
                          "seconds": time.perf_counter() - t0})
    warm = [r["rss"] for r in trace if r["writes"] >= min(args.writes, 2 * args.budget)] or [trace[-1]["rss"]]
    report = {
        "meta": {"machine": platform.platform(),
                 **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}},
        "writes_per_s": written / trace[-1]["seconds"],
        "max_slots": max(r["slots"] for r in trace),
        "rss_after_warmup_min": min(warm), "rss_after_warmup_max": max(warm),
        # a trend shows as a higher peak in the second half of the stream than in the first
        "rss_peak_first_half": max(warm[: max(1, len(warm) // 2)]),
        "rss_peak_second_half": max(warm[len(warm) // 2 :]),
        "trace": trace,
    }
    (args.out / "stream.json").write_text(json.dumps(report, indent=2))
    plot(report, args.out / "stream.png")
    print(f"{written:,} writes at {report['writes_per_s']:,.0f}/s; slots never above {report['max_slots']:,}; "
          f"RSS after warm-up {min(warm) / 2**20:,.0f}-{max(warm) / 2**20:,.0f} MiB "
          f"(peak {report['rss_peak_first_half'] / 2**20:,.0f} MiB in the first half after warm-up, "
          f"{report['rss_peak_second_half'] / 2**20:,.0f} MiB in the second)")
    return report


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = report["trace"]
    writes = [r["writes"] for r in t]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 5), sharex=True, height_ratios=(3, 2))
    ax.plot(writes, [r["rss"] / 2**20 for r in t], lw=1)
    ax.set_ylabel("resident memory (MiB)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax2.plot(writes, [r["slots"] for r in t], color="tab:orange", lw=0.6)
    ax2.axhline(report["meta"]["budget"], color="k", ls="--", lw=0.8, label="budget")
    ax2.set_ylabel("slots in memory")
    ax2.set_ylim(bottom=0)
    ax2.set_xlabel("slots written")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8, loc="lower right")
    ax2.xaxis.set_major_formatter(lambda x, _: f"{x / 1e6:g}M" if x >= 1e6 else f"{x / 1e3:g}k" if x else "0")
    m = report["meta"]
    ax.set_title(f"{m['writes']:,} writes under a budget of {m['budget']:,} slots ({m['policy']}, "
                 f"{report['writes_per_s']:,.0f} writes/s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
