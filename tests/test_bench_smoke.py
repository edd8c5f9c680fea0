"""Small versions of the benchmarks, so they keep running; timings are not asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def test_query_latency_script(tmp_path):
    import query_latency

    rows = query_latency.main(["--sizes", "2000", "--queries", "50", "--singles", "5", "--repeats", "1",
                               "--out", str(tmp_path)])
    assert [r["index"] for r in rows] == ["Flat", "IVF32,Flat", "HNSW32"]
    assert all(r["batch_qps"] > 0 and r["bytes_per_slot"] > 0 for r in rows)
    assert next(r for r in rows if r["index"] == "Flat")["recall_at_k"] == 1.0
    saved = json.loads((tmp_path / "query_latency.json").read_text())
    assert len(saved["results"]) == 3
    assert (tmp_path / "query_latency.png").stat().st_size > 10_000


def test_pytest_benchmark_suite_runs():
    env = {**os.environ, "BENCH_SIZES": "1000"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                          str(ROOT / "bench")], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_serve_load_script(tmp_path):
    import serve_load

    report = serve_load.main(["--slots", "3000", "--clients", "2", "--seconds", "2", "--baseline-seconds", "1",
                              "--batch", "20", "--index", "Flat", "--out", str(tmp_path)])
    assert report["served"]["errors"] == 0
    assert report["served"]["requests"] > 0 and report["served"]["slots_written"] > 0
    assert report["embedded"]["queries_per_s"] > 0
    assert (tmp_path / "serve_load.png").stat().st_size > 10_000


def test_compaction_benchmark(tmp_path):
    import compaction

    results = compaction.main(["--rows", "fashion-pca", "--limit", "2000", "--policies", "merge", "reservoir",
                               "--fractions", "1.0", "0.1", "0.001", "--out", str(tmp_path)])
    assert [r["policy"] for r in results] == ["full", "merge", "reservoir", "merge", "reservoir"]
    assert results[-1]["budget"] == 10 and results[-1]["slots"] == 10  # raised to one slot per class
    assert all(0 < r["accuracy"] <= 1 for r in results)
    assert (tmp_path / "compaction.png").stat().st_size > 10_000


def test_stream_benchmark(tmp_path):
    import stream

    report = stream.main(["--writes", "20000", "--budget", "3000", "--batch", "1000", "--dim", "16",
                          "--classes", "10", "--out", str(tmp_path)])
    assert report["max_slots"] <= 3000
    assert (tmp_path / "stream.png").stat().st_size > 10_000
