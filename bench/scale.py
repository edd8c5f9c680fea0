"""The engine across support-set size, against dense attention and bare FAISS.

    python bench/scale.py --out runs/bench          # 1k..1M slots at d=64, plus 100k at d=256
    python bench/scale.py --sizes 1000 10000 --no-extra --out runs/smoke
    python bench/scale.py --sizes 1000000 --dim 256 1024 --methods auto IVF-PQ --no-extra --no-sweep
                                                    # what a wider embedding costs, in one run

Data: by default ``engine.data.clustered`` with :data:`engine.data.synthetic.LEARNED_LIKE`
settings (seeded; n/100 classes of 4 modes each, anisotropic noise calibrated
on learned embeddings), and 1,000 queries drawn from the same distribution;
``--data`` picks another of :data:`engine.data.synthetic.DISTRIBUTIONS`
(clustered, isotropic with 2,000 classes, uniform) to check the defaults on data
they were not tuned on.

Every (size, method) runs in a fresh process, so peak RSS is its own. Methods:
- ``dense``: full attention in torch over every slot, float32 (the plain
  Matching Networks kernel, batched to fit in memory). It is the baseline for
  speed and the reference for agreement; exact top-k (FAISS Flat) is the
  reference for recall;
- ``Flat``, ``auto``, ``IVF-PQ`` (codes only: ``rescore=False``) and ``HNSW32``
  (up to ``--hnsw-max`` slots: its build is slow) as engine memories. For each:
  ingest rate (index training included), batched (1,000 queries) and single-query
  latency at k=64, the same FAISS index searched bare with the same parameters
  (our overhead), bytes per slot in RAM and on disk (a saved copy), peak RSS, argmax agreement and total-variation
  distance to dense attention, the tail bounds, and recall@k against exact search;
  then the same batch with ``probs="full"`` (top-k plus the estimated tail): its time
  against top-k's, its agreement and total variation, and the median tail estimate;
- for IVF memories, a sweep of nprobe: latency, agreement and recall per value,
  from which the ``auto`` rule is read.
Writes ``scale.json`` and ``scale.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from engine.data.synthetic import DISTRIBUTIONS
from engine.index import AUTO_FLAT_MAX
from engine.testing import total_variation

K = 64
REPEATS = 3
TEMPERATURE = 0.03  # where dense attention classifies this data best (0.986 at 100k; 0.936 at T=0.1)
SINGLES = 200
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128)


DATA = "learned-like"  # which of engine.data.synthetic.DISTRIBUTIONS (--data)


def data(n: int, dim: int, queries: int, seed: int):
    from engine.data.synthetic import DISTRIBUTIONS

    return DISTRIBUTIONS[DATA](n, dim, seed, queries)


def unit(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def percentile_ms(times: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(times) * 1e3, p))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# -- the dense baseline and the references ------------------------------------------------
def dense_probs(torch, q, x, labels, n_classes: int, chunk: int):
    """Full softmax attention over all slots (float32): class probabilities, (nq, C).

    This is the speed baseline (what the plain Matching Networks kernel costs, batched in
    torch) and, since it is computed anyway, the agreement reference of this benchmark. It is
    not the test reference (:func:`engine.testing.dense_attention`, float64 numpy): that one
    is chosen for exactness, not speed, and at 1M slots x 1,000 queries it would take many
    times longer; float32 rounding moves these probabilities by ~1e-6, far below the
    differences measured here."""
    out = []
    for i in range(0, len(q), chunk):
        a = torch.softmax((q[i:i + chunk] @ x.T) / TEMPERATURE, dim=1)
        out.append(torch.zeros(len(a), n_classes).index_add_(1, labels, a))
    return torch.cat(out)


def run_dense(n: int, dim: int, queries: int, seed: int, ref_path: str, n_singles: int) -> dict:
    import faiss
    import torch

    x, y, q, _ = data(n, dim, queries, seed)
    x, q = unit(x), unit(q)
    n_classes = int(y.max()) + 1
    tx, tq, ty = torch.from_numpy(x), torch.from_numpy(q), torch.from_numpy(y)
    chunk = max(1, int(2.5e8 // n))  # at most ~1 GB of scores at a time
    with torch.no_grad():
        t0 = time.perf_counter()
        probs = dense_probs(torch, tq, tx, ty, n_classes, chunk).numpy()
        batch_s = time.perf_counter() - t0
        singles = []
        for i in range(min(n_singles, 20 if n >= 500_000 else n_singles)):
            t0 = time.perf_counter()
            dense_probs(torch, tq[i:i + 1], tx, ty, n_classes, chunk)
            singles.append(time.perf_counter() - t0)
    exact = faiss.IndexFlatIP(dim)
    exact.add(x)
    _, truth = exact.search(q, K)
    np.savez(ref_path, probs=probs, truth=truth)
    return {"method": "dense", "batch_s": batch_s, "batch_qps": len(q) / batch_s,
            "single_p50_ms": percentile_ms(singles, 50), "single_p99_ms": percentile_ms(singles, 99),
            "bytes_per_slot": 4 * dim + 8, "peak_rss_mb": peak_rss_mb(), "argmax_agreement": 1.0,
            "tv_mean": 0.0, "recall_median": 1.0, "recall_mean": 1.0}


# -- engine memories ----------------------------------------------------------------------
def spec_for(method: str, n: int, dim: int) -> tuple[str, dict]:
    from engine.index import auto_nlist

    if method == "IVF":  # auto's IVF rule at any size (auto itself stays Flat while small)
        return f"IVF{auto_nlist(n)},Flat", {}
    if method == "IVF-PQ":  # codes only, d/4 bytes a vector, no usage times: the smallest memory
        return f"IVF{auto_nlist(n)},PQ{dim // 4}", {"rescore": False, "track_usage": False}
    return method, {}


def agreement(res, ref_probs: np.ndarray, truth: np.ndarray) -> dict:
    probs = np.zeros_like(ref_probs)
    probs[:, res.classes] = res.probs
    recall = np.array([len(np.intersect1d(f[f >= 0], t)) / K for f, t in zip(res.ids, truth)])
    tv = total_variation(probs, ref_probs)
    return {"argmax_agreement": float(np.mean(probs.argmax(1) == ref_probs.argmax(1))),
            "tv_mean": float(tv.mean()), "tv_max": float(tv.max()),
            "recall_median": float(np.median(recall)), "recall_mean": float(recall.mean()),
            "tail_bound_median": float(np.median(res.tail_bound)), "tail_bound_max": float(res.tail_bound.max())}


def timed(fn, repeats: int) -> float:
    """Fastest wall time of ``repeats`` calls (the least disturbed on a noisy machine)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run_memory(method: str, n: int, dim: int, queries: int, seed: int, ref_path: str, n_singles: int,
               sweep: bool) -> dict:
    from engine import Memory

    x, y, q, _ = data(n, dim, queries, seed)
    spec, options = spec_for(method, n, dim)
    ref = np.load(ref_path)
    mem = Memory(dim, index=spec, temperature=TEMPERATURE, **options)
    batch = 100_000
    t0 = time.perf_counter()
    for i in range(0, n, batch):  # written as a stream of batches: rebuilds and retraining included
        mem.add(x[i:i + batch], y[i:i + batch])
    ingest_s = time.perf_counter() - t0
    del x
    repeats = REPEATS
    qn = unit(q)
    res = mem.query(q, k=K, probs="top-k")  # the search-and-attend path bare FAISS is held to
    batch_s = timed(lambda: mem.query(q, k=K, probs="top-k"), repeats)
    baseline = mem.bare_search(K)  # the very FAISS index and search parameters the memory uses
    bare = baseline.search
    faiss_s = timed(lambda: bare(qn), repeats)
    # Separate passes, in both orders: a search right after another on the same query finds
    # its lists in cache, which would flatter whichever of the two runs second.
    singles, bare_singles = [], []
    for first in ("engine", "bare"):
        for who in (first, "bare" if first == "engine" else "engine"):
            for i in range(n_singles // 2):
                t0 = time.perf_counter()
                if who == "engine":
                    mem.query(q[i % len(q)], k=K, probs="top-k")
                else:
                    bare(qn[i % len(q)][None])
                (singles if who == "engine" else bare_singles).append(time.perf_counter() - t0)
    full = mem.query(q, k=K, probs="full")  # top-k plus the estimated tail (builds the summaries)
    full_s = timed(lambda: mem.query(q, k=K, probs="full"), repeats)
    full_agree = agreement(full, ref["probs"], ref["truth"])
    stats = mem.stats()
    with tempfile.TemporaryDirectory() as tmp:
        saved = mem.save(Path(tmp) / "m")
        disk = sum(f.stat().st_size for f in saved.iterdir())
    row = {"method": method, "index": stats.index, "exact": stats.exact, "ingest_s": ingest_s,
           "ingest_slots_per_s": n / ingest_s, "batch_s": batch_s, "batch_qps": len(q) / batch_s,
           "faiss_batch_s": faiss_s, "overhead_batch": batch_s / faiss_s,
           "single_p50_ms": percentile_ms(singles, 50), "single_p99_ms": percentile_ms(singles, 99),
           "faiss_single_p50_ms": percentile_ms(bare_singles, 50),
           "overhead_single": percentile_ms(singles, 50) / percentile_ms(bare_singles, 50),
           "bytes_per_slot": stats.bytes_total / stats.slots,
           "bytes_per_slot_vs_raw": stats.bytes_total / stats.slots / (4 * dim),
           "disk_bytes_per_slot": disk / stats.slots,
           "peak_rss_mb": peak_rss_mb(), **agreement(res, ref["probs"], ref["truth"]),
           "full_batch_s": full_s, "full_vs_topk_time": full_s / batch_s, "full_tv_mean": full_agree["tv_mean"],
           "full_tv_max": full_agree["tv_max"], "full_argmax_agreement": full_agree["argmax_agreement"],
           "full_tail_bound_median": full_agree["tail_bound_median"],
           "tail_estimate_median": float(np.median(full.tail_estimate)), "bytes_tail": stats.bytes_tail}
    if stats.nlist is not None:
        row["nprobe"] = baseline.nprobe
        if sweep and not stats.lossy:
            row["sweep"] = nprobe_sweep(mem, q, ref, repeats)
    return row


def nprobe_sweep(mem, q, ref, repeats: int) -> list[dict]:
    from engine import SearchSettings

    out = []
    default = mem.search_settings
    try:
        for nprobe in NPROBES:
            if nprobe > mem.stats().nlist:
                break
            mem.search_settings = SearchSettings(nprobe=nprobe)
            res = mem.query(q, k=K, probs="top-k")
            t = timed(lambda: mem.query(q, k=K, probs="top-k"), repeats)
            out.append({"nprobe": nprobe, "batch_qps": len(q) / t, **agreement(res, ref["probs"], ref["truth"])})
    finally:
        mem.search_settings = default
    return out


def child(kind: str, args: tuple, conn, distribution: str) -> None:
    global DATA
    DATA = distribution
    try:
        conn.send(("ok", run_dense(*args) if kind == "dense" else run_memory(*args)))
    except Exception as exc:  # report it to the parent rather than leave it waiting
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def in_process(kind: str, *args) -> dict:
    """Run one measurement in a fresh process (so its peak RSS is its own)."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=child, args=(kind, args, send, DATA))
    proc.start()
    status, payload = recv.recv()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"{kind} {args[:3]}: {payload}")
    return payload


# -- the plan, the report and the plots -----------------------------------------------
def plan(sizes: list[int], dims: list[int], extra: bool, methods: list[str],
         hnsw_max: int) -> list[tuple[int, int, str]]:
    cases = [(n, d) for d in dims for n in sizes]
    if extra and (100_000, 256) not in cases:
        cases.append((100_000, 256))
    out = []
    for n, d in cases:
        out.append((n, d, "dense"))
        for m in methods:
            if m.startswith("HNSW") and n > hnsw_max:
                continue
            if m == "IVF-PQ" and n < 100_000:
                continue  # PQ needs 256 x 39 training points and only pays off at scale
            if m == "IVF" and (n < 10_000 or n > AUTO_FLAT_MAX):
                continue  # too small to train, or the same index as auto
            out.append((n, d, m))
    return out


def plot(rows: list[dict], path: Path) -> None:
    """Six panels against support-set size; against the dimension instead when the run
    has one size and several dimensions (``--sizes 1000000 --dim 256 1024``). With
    several sizes and several dimensions, one line per (method, dimension)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted({r["dim"] for r in rows})
    sizes = sorted({r["size"] for r in rows})
    across = "dim" if len(sizes) == 1 and len(dims) > 1 else "size"
    # against the size, a line per dimension measured at two sizes or more (not the lone extra case)
    series_dims = [None] if across == "dim" else \
        [d for d in dims if len({r["size"] for r in rows if r["dim"] == d}) > 1] or dims[:1]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    panels = [("batch_ms_per_query", "batched: ms per query (1,000 at a time, k=64)", True),
              ("single_p50_ms", "single query: p50 latency (ms)", True),
              ("ingest_slots_per_s", "ingest: slots / s (training included)", True),
              ("bytes_per_slot", "bytes per slot", True),
              ("peak_rss_mb", "peak RSS of the run (MiB)", True),
              ("argmax_agreement", "argmax agreement with dense attention", False)]
    for r in rows:
        r["batch_ms_per_query"] = 1e3 / r["batch_qps"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colour = {m: f"C{i}" for i, m in enumerate(methods)}  # one colour per method in every panel
    styles = ["-", "-.", ":", (0, (5, 1))]

    def series(method: str, dim: int | None, key: str) -> list[dict]:
        return sorted((r for r in rows if r["method"] == method and dim in (None, r["dim"]) and key in r),
                      key=lambda r: r[across])

    for ax, (key, title, log_y) in zip(axes.ravel(), panels):
        for m in methods:
            for j, d in enumerate(series_dims):
                pts = series(m, d, key)
                if pts:
                    label = m if len(series_dims) == 1 else f"{m}, d={d}"
                    ax.plot([r[across] for r in pts], [r[key] for r in pts], marker="osv^D"[j % 5], label=label,
                            color=colour[m], ls="--" if m == "dense" else styles[j % len(styles)])
        if key == "batch_ms_per_query":
            for j, d in enumerate(series_dims):
                pts = series("auto", d, "faiss_batch_s")
                if pts:
                    ax.plot([r[across] for r in pts], [1e3 * r["faiss_batch_s"] / 1000 for r in pts], "k:",
                            marker="osv^D"[j % 5], markersize=3,
                            label="bare FAISS (auto's index)" + ("" if len(series_dims) == 1 else f", d={d}"))
        if key == "bytes_per_slot":
            if across == "dim":
                ax.plot(dims, [4 * e for e in dims], color="grey", ls=":", label="raw float32 vector")
            else:
                for d in series_dims:
                    ax.axhline(4 * d, color="grey", ls=":", label=f"raw float32 vector, d={d} ({4 * d} B)")
        ax.set_xscale("log", base=2 if across == "dim" else 10)
        if across == "dim":
            ax.set_xticks(dims, [str(d) for d in dims])
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel(f"embedding dimension ({sizes[0]:,} slots)" if across == "dim"
                      else "slots in memory" + (f" (d={series_dims[0]})" if len(series_dims) == 1 else ""))
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    what = "embedding dimension" if across == "dim" else "support-set size"
    fig.suptitle(f"engine across {what}: {DATA} data ({platform.machine()}, {mp.cpu_count()} cores, "
                 f"T={TEMPERATURE}, k={K})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def both(row: dict, full_key: str) -> str:
    """" / <full mode's figure>" where the row has one (engine memories; not dense)."""
    return f" / {row[full_key]:.4f}" if full_key in row else ""


def table(rows: list[dict]) -> str:
    head = ("| slots | d | method | index | ingest slots/s | batch q/s | vs dense | vs bare FAISS (batch / single) "
            "| single p50 ms | bytes/slot RAM (x raw) | disk (x raw) | nprobe | peak RSS MiB "
            "| argmax agree top-k / full "
            "| mean TV top-k / full | full / top-k time | median recall@64 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    dense = {(r["size"], r["dim"]): r for r in rows if r["method"] == "dense"}
    for r in rows:
        base = dense.get((r["size"], r["dim"]))
        speedup = f"{r['batch_qps'] / base['batch_qps']:,.0f}x" if base and r["method"] != "dense" else "1x"
        over = (f"{r['overhead_batch']:.2f} / {r['overhead_single']:.2f}" if "overhead_batch" in r else "-")
        ingest = f"{r['ingest_slots_per_s']:,.0f}" if "ingest_slots_per_s" in r else "-"
        raw = r["bytes_per_slot"] / (4 * r["dim"])
        disk = f"{r['disk_bytes_per_slot']:.0f} ({r['disk_bytes_per_slot'] / (4 * r['dim']):.2f}x)" \
            if "disk_bytes_per_slot" in r else "-"
        ratio = f"{r['full_vs_topk_time']:.2f}x" if "full_vs_topk_time" in r else "-"
        lines.append(f"| {r['size']:,} | {r['dim']} | {r['method']} | {r.get('index', 'torch')} | {ingest} "
                     f"| {r['batch_qps']:,.0f} | {speedup} | {over} | {r['single_p50_ms']:.2f} "
                     f"| {r['bytes_per_slot']:.0f} ({raw:.2f}x) | {disk} | {r.get('nprobe') or '-'} "
                     f"| {r['peak_rss_mb']:,.0f} "
                     f"| {r['argmax_agreement']:.4f}{both(r, 'full_argmax_agreement')} "
                     f"| {r['tv_mean']:.4f}{both(r, 'full_tv_mean')} "
                     f"| {ratio} "
                     f"| {r['recall_median']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    from tqdm import tqdm

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, nargs="+", default=[64],
                    help="embedding dimension; several run every size at each, in one run")
    ap.add_argument("--extra", action=argparse.BooleanOptionalAction, default=True,
                    help="also run 100k slots at d=256")
    ap.add_argument("--methods", nargs="+", default=["Flat", "auto", "IVF", "IVF-PQ", "HNSW32"])
    ap.add_argument("--hnsw-max", type=int, default=100_000, help="largest size HNSW is built for")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True, help="nprobe sweep for IVF")
    ap.add_argument("--singles", type=int, default=SINGLES, help="single queries timed per run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", choices=sorted(DISTRIBUTIONS), default="learned-like",
                    help="the distribution (engine.data.synthetic.DISTRIBUTIONS); not learned-like: "
                         "results go to scale-<data>.*")
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = ap.parse_args(argv)
    args.sizes, args.dim = list(dict.fromkeys(args.sizes)), list(dict.fromkeys(args.dim))  # each case once
    global DATA
    DATA = args.data
    stem = "scale" if args.data == "learned-like" else f"scale-{args.data}"
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, d, method in tqdm(plan(args.sizes, args.dim, args.extra, args.methods, args.hnsw_max),
                                 desc="scale benchmark", unit="run"):
            ref = str(Path(tmp) / f"ref-{n}-{d}.npz")
            if method == "dense":
                row = in_process("dense", n, d, args.queries, args.seed, ref, args.singles)
            else:
                row = in_process("memory", method, n, d, args.queries, args.seed, ref, args.singles, args.sweep)
            rows.append({"size": n, "dim": d, **row})
            (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta(args), "results": rows}, indent=2))
    plot(rows, args.out / f"{stem}.png")
    text = table(rows)
    (args.out / f"{stem}.md").write_text(text + "\n")
    print(text)
    return rows


def meta(args) -> dict:
    import faiss
    import torch

    return {"machine": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": mp.cpu_count(), "python": platform.python_version(), "faiss": faiss.__version__,
            "torch": torch.__version__, "numpy": np.__version__, "k": K, "temperature": TEMPERATURE,
            "queries": args.queries, "seed": args.seed, "data": f"engine.data.synthetic.DISTRIBUTIONS[{args.data!r}]"}


if __name__ == "__main__":
    main()
