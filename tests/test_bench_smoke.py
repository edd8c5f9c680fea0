"""Small versions of the benchmarks, so they keep running; timings are not asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def test_scale_script(tmp_path):
    import scale

    rows = scale.main(["--sizes", "1000", "12000", "--no-extra", "--methods", "Flat", "auto", "IVF",
                       "--queries", "40", "--singles", "3", "--out", str(tmp_path)])
    by = {(r["size"], r["method"]): r for r in rows}
    assert set(by) == {(1000, "dense"), (1000, "Flat"), (1000, "auto"), (12000, "dense"), (12000, "Flat"),
                       (12000, "auto")}  # IVF is auto's index at 12k, so it is not run twice
    assert by[(12000, "auto")]["index"].startswith("IVF") and by[(12000, "auto")]["sweep"]
    flat = by[(12000, "Flat")]
    # exact top-64 against exact dense attention: same retrieved set, agreement near 1
    assert flat["recall_median"] == 1.0 and flat["argmax_agreement"] >= 0.9
    # both modes against dense attention: the estimated tail brings probs closer to it
    assert all(0 <= r["full_tv_mean"] <= r["tv_mean"] for r in rows if r["method"] != "dense")
    assert all(r["batch_qps"] > 0 and r["bytes_per_slot"] > 0 and r["peak_rss_mb"] > 0 for r in rows)
    saved = json.loads((tmp_path / "scale.json").read_text())
    assert len(saved["results"]) == len(rows) and saved["meta"]["k"] == 64
    assert (tmp_path / "scale.png").stat().st_size > 20_000


def test_scale_script_across_dimensions(tmp_path):
    """One size at several dimensions, in one run (what a wider embedding costs); a case given twice runs once."""
    import scale

    rows = scale.main(["--sizes", "3000", "3000", "--dim", "16", "48", "16", "--no-extra", "--no-sweep",
                       "--methods", "auto", "--queries", "30", "--singles", "2", "--out", str(tmp_path)])
    assert [(r["dim"], r["method"]) for r in rows] == [(16, "dense"), (16, "auto"), (48, "dense"), (48, "auto")]
    raw = {r["dim"]: r["bytes_per_slot"] for r in rows if r["method"] == "auto"}
    assert raw[48] > raw[16] >= 4 * 16  # a wider slot holds at least its float32 vector
    assert (tmp_path / "scale.png").stat().st_size > 20_000


def test_pytest_benchmark_suite_runs():
    env = {**os.environ, "BENCH_SIZES": "1000"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                          str(ROOT / "bench")], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_serve_load_script(tmp_path):
    import serve_load

    report = serve_load.main(["--slots", "3000", "--clients", "2", "--seconds", "1", "--write-rate", "500",
                              "--index", "Flat", "--out", str(tmp_path)])
    rows = report["results"]
    assert {(r["mode"], r["clients"], r["write_rate"]) for r in rows} == {
        (m, 2, w) for m in ("embedded", "served") for w in (0.0, 500.0)}
    served = [r for r in rows if r["mode"] != "embedded"]
    assert all(r["errors"] == 0 and r["requests"] > 0 and r["over_embedded"] > 0 for r in served)
    assert all(r["slots_written"] > 0 for r in rows if r["write_rate"] > 0)
    assert all(r["breakdown_ms"]["server_query_mean"] is not None for r in served)
    assert all(r["breakdown_ms"]["client_cpu_per_request"] > 0 and r["breakdown_ms"]["server_cpu_per_request"] > 0
               for r in served)
    assert (tmp_path / "serve_load.png").stat().st_size > 10_000


def test_compaction_benchmark(tmp_path):
    import compaction

    results = compaction.main(["--rows", "fashion-pca", "--limit", "2000", "--policies", "merge", "reservoir", "age",
                               "--fractions", "1.0", "0.1", "0.001", "--out", str(tmp_path)])
    assert [r["policy"] for r in results] == ["full", "merge", "reservoir", "age", "merge", "reservoir", "age"]
    assert results[-1]["budget"] == 10 and results[-1]["slots"] == 10  # raised to one slot per class
    assert all(0 < r["accuracy"] <= 1 for r in results)
    assert (tmp_path / "compaction.png").stat().st_size > 10_000


def test_stream_benchmark(tmp_path):
    import stream

    report = stream.main(["--writes", "20000", "--budget", "3000", "--batch", "1000", "--dim", "16",
                          "--classes", "10", "--out", str(tmp_path)])
    assert report["max_slots"] <= 3000
    assert (tmp_path / "stream.png").stat().st_size > 10_000


def test_calibration_benchmark(tmp_path):
    import calibration

    rows = calibration.main(["--slots", "20000", "--dim", "16", "--queries", "100", "--data", "isotropic-hard",
                             "uniform", "--out", str(tmp_path)])
    assert [r["data"] for r in rows] == ["isotropic-hard", "uniform"]
    assert all(r["recall"]["recall_measured"] >= 0.98 and r["answer"]["target"] == "answer" for r in rows)
    assert all(r["answer"]["nprobe"] <= r["recall"]["nprobe"] for r in rows)
    assert json.loads((tmp_path / "calibration.json").read_text())["results"] == rows
    assert (tmp_path / "calibration.png").stat().st_size > 10_000


def test_drift_benchmark(tmp_path):
    import drift

    doc = drift.main(["--first", "12000", "--then", "18000", "--batch", "3000", "--dim", "16", "--queries", "100",
                      "--out", str(tmp_path)])
    arms = doc["arms"]
    assert arms["answer"]["checks"] >= 1 and arms["stale"]["checks"] == 0
    assert arms["stale"]["nprobe"] == doc["first_calibration"]["nprobe"]
    assert all(0 <= arms[a][p]["recall_fresh"] <= 1 for a in arms for p in ("first", "then"))
    assert json.loads((tmp_path / "drift.json").read_text())["arms"]["recall"]["checks"] >= 1


def test_shards_script(tmp_path):
    pytest.importorskip("ray")
    import shards

    report = shards.main(["--slots", "8000", "--shards", "1", "2", "--queries", "100", "--singles", "20",
                          "--out", str(tmp_path)])
    rows = report["results"]["rows"]
    assert [r["shards"] for r in rows] == [1, 2]
    for r in rows:  # small enough for auto to stay exact Flat: the same answers as the exact memory
        assert r["index"] == "Flat" and r["argmax_agreement"] == 1.0 and r["recall_mean"] == 1.0
        assert len(r["per_shard_batch_s"]) == r["shards"] and r["merge_s"] > 0
    assert (tmp_path / "shards.png").stat().st_size > 10_000


def test_tail_benchmark(tmp_path):
    import tail

    rows = tail.main(["--slots", "20000", "--queries", "60", "--cases", "learned-like", "fashion-pca",
                      "--out", str(tmp_path)])
    assert [r["case"] for r in rows] == ["learned-like", "fashion-pca"]
    for r in rows:  # the estimated tail brings probabilities closer to dense attention
        assert r["full_tv_mean"] <= r["topk_tv_mean"] + 1e-9
        assert r["bound_covers_tv"] == 1.0  # the certificate covers what was estimated
    assert (tmp_path / "tail.png").exists() and json.loads((tmp_path / "tail.json").read_text())["results"]


def test_recipes_script(tmp_path):
    import recipes

    # one step, no supervised stage (a whole epoch over Omniglot; pretraining is tested in test_train)
    rows = recipes.main(["--steps", "episodes", "--episodes", "2", "--eval-episodes", "3", "--out", str(tmp_path)])
    by = {r["step"]: r for r in rows}
    assert by["episodes"]["pretrain_epochs"] == 0 and by["episodes"]["episodes"] == 2
    assert all(0 <= r[f"val_within_20way{s}"] <= 1 and 0 <= r[f"run01_error{s}"] <= 1
               for r in rows for s in ("", "_views"))
    assert "| episodes only |" in (tmp_path / "recipes.md").read_text()


def test_temperature_benchmark(tmp_path):
    import temperature

    rows = temperature.main(["--cases", "learned-like", "--slots", "5000", "--queries", "200", "--out", str(tmp_path)])
    r = rows[0]
    assert r["case"] == "learned-like" and 1e-3 <= r["chosen_temperature"] <= 1
    assert 0 <= r["auto_top-k_accuracy"] <= 1 and r["knn1_accuracy"] >= 0
    assert (tmp_path / "temperature.md").exists() and json.loads((tmp_path / "temperature.json").read_text())["results"]


def test_learner_benchmark(tmp_path):
    import learner

    doc = learner.main(["--backgrounds", "small2", "--seeds", "0", "--episodes", "2", "--pretrain-epochs", "0",
                        "--eval-episodes", "3", "--out", str(tmp_path)])
    (row,) = doc["results"]
    assert row["background"] == "small2" and 0 <= row["val_within_20way"] <= 1 and 0 <= row["run01_error"] <= 1
    assert 0 <= row["val_runs_error"] <= 1 and 0 <= row["val_runs_assigned_error"] <= 1
    assert 0 <= row["run01_assigned_error"] <= 1
    assert json.loads((tmp_path / "learner" / "recipe-pre0" / "small2" / "seed0" / "config.json").read_text()
                      )["background"] == "small2"
    saved = json.loads((tmp_path / "learner" / "recipe-pre0" / "small2" / "seed0" / "config.json").read_text())
    assert saved["image_size"] == 40 and saved["pool"] == "flat" and saved["model"]["pool"] == "flat"
    assert saved["width"] == saved["model"]["width"] == [64, 64, 128, 256]
    assert (tmp_path / "learner.png").stat().st_size > 0
    # --pretrain-epochs names the rows and folders it trained
    label = "the recipe (40x40, filters 64, 64, 128, 256, the last map kept whole); 0 supervised epochs"
    assert f"| {label} | small2 | 1 |" in (tmp_path / "learner.md").read_text()
    # --reuse scores the model trained there again (the same figures, nothing trained); --views another count
    first = (tmp_path / "learner.json").read_text()
    again = learner.main(["--backgrounds", "small2", "--seeds", "0", "--episodes", "2", "--pretrain-epochs", "0",
                          "--eval-episodes", "3", "--out", str(tmp_path), "--reuse"])
    (same,) = again["results"]
    assert same["train_s"] is None and row["train_s"] > 0
    assert {k: v for k, v in same.items() if k != "train_s"} == {k: v for k, v in row.items() if k != "train_s"}
    fewer = learner.main(["--backgrounds", "small2", "--seeds", "0", "--episodes", "2", "--pretrain-epochs", "0",
                          "--eval-episodes", "3", "--out", str(tmp_path), "--reuse", "--views", "1"])
    assert fewer["results"][0]["views"] == 1 and fewer["results"][0]["train_s"] is None and row["views"] == 8
    assert fewer["views"] == [1] and doc["views"] == [8]
    assert json.loads((tmp_path / "learner-reuse-views1.json").read_text()) == fewer
    assert json.loads((tmp_path / "learner-reuse.json").read_text()) == again
    assert (tmp_path / "learner.json").read_text() == first  # the training run's table (and times) kept
    with pytest.raises(SystemExit):  # views rescore trained models
        learner.main(["--views", "2", "--out", str(tmp_path)])
    # a finished run of another config there (other episodes; other validation episodes) is
    # refused, not scored as this one nor trained over
    best = (tmp_path / "learner" / "recipe-pre0" / "small2" / "seed0" / "best.pt").read_bytes()
    for other in (["--episodes", "3", "--eval-episodes", "3"], ["--episodes", "2", "--eval-episodes", "2"]):
        with pytest.raises(SystemExit, match="val_episodes: 3 there, 2 here|episodes: 2 there, 3 here"):
            learner.main(["--backgrounds", "small2", "--seeds", "0", "--pretrain-epochs", "0", "--out", str(tmp_path),
                          "--reuse", *other])
    assert (tmp_path / "learner" / "recipe-pre0" / "small2" / "seed0" / "best.pt").read_bytes() == best
    # a damaged config or state is refused, not trained over
    from engine.errors import CorruptFileError

    folder = tmp_path / "learner" / "recipe-pre0" / "small2" / "seed0"
    reuse = ["--backgrounds", "small2", "--seeds", "0", "--episodes", "2", "--pretrain-epochs", "0",
             "--eval-episodes", "3", "--out", str(tmp_path), "--reuse"]
    for name, exc in (("config.json", CorruptFileError), ("state.json", SystemExit)):
        kept = (folder / name).read_bytes()
        (folder / name).write_bytes(kept[: len(kept) // 2])
        with pytest.raises(exc):
            learner.main(reuse)
        assert (folder / "best.pt").read_bytes() == best
        (folder / name).write_bytes(kept)
    # refused before any model trains: small1's seed 0, listed first, is not trained
    with pytest.raises(SystemExit, match="episodes: 2 there, 3 here"):
        learner.main(["--seeds", "0", "--pretrain-epochs", "0", "--out", str(tmp_path), "--reuse", "--episodes", "3",
                      "--eval-episodes", "3"])
    assert not (tmp_path / "learner" / "recipe-pre0" / "small1").exists()


def test_learner_benchmark_distils_from_the_levers_trained_before(tmp_path):
    import learner

    base = ["--backgrounds", "small2", "--seeds", "1", "--episodes", "1", "--pretrain-epochs", "0",
            "--eval-episodes", "2", "--out", str(tmp_path)]
    doc = learner.main(["--levers", "recipe", "distill", "--teacher-seeds", "1", *base])
    assert [r["lever"] for r in doc["results"]] == ["recipe-pre0", "distill-t1-pre0"]
    saved = json.loads((tmp_path / "learner" / "distill-t1-pre0" / "small2" / "seed1" / "config.json").read_text())
    assert saved["distill"] == 0.5 and saved["teachers"] == [str(tmp_path / "learner" / "recipe-pre0" / "small2" /
                                                                  "seed1")]
    again = learner.main(["--levers", "distill", "--teacher-seeds", "1", "--reuse", *base])  # nothing trained
    assert again["results"][0]["train_s"] is None
    # teachers not trained to their end here: refused before anything trains
    for other in (["--teacher-seeds", "7"], ["--teacher-seeds", "1", "--episodes", "2"]):
        with pytest.raises(SystemExit):
            learner.main(["--levers", "distill", *base, *other])
    assert not (tmp_path / "learner" / "distill-t7-pre0").exists()


def test_flight_transport_benchmark(tmp_path):
    import flight_transport

    report = flight_transport.main(["--requests", "50", "--out", str(tmp_path)])
    assert set(report["results"]) == {"action", "stream"}
    assert all(r["wall_ms"] > 0 for r in report["results"].values())
    assert json.loads((tmp_path / "flight_transport.json").read_text())["requests"] == 50


def test_torch_runtime_benchmark(tmp_path):
    import torch_runtime

    doc = torch_runtime.main(["--kinds", "embed", "--images", "64", "--side", "40", "--out", str(tmp_path)])
    rows = doc["results"]
    assert doc["side"] == 40
    assert [r["case"] for r in rows] == [c[0] for c in torch_runtime.CASES if c[1] == "embed"]
    assert rows[0]["vs_default_alone"] == 1.0 and all(r["seconds"] > 0 and r["minor_faults"] >= 0 for r in rows)
    assert (tmp_path / "torch_runtime.png").stat().st_size > 0 and (tmp_path / "torch_runtime.md").exists()


def test_the_learner_benchmarks_28x28_matches_the_library():
    import learner

    from engine.train import OMNIGLOT_28

    # size28late is the library's 28x28 recipe (the demo's model); size28 is it with 64 filters a block
    assert learner.LEVERS["size28late"][1] == {**OMNIGLOT_28, "width": [64, 64, 128, 256]}
    assert learner.AT_28 == {**OMNIGLOT_28, "width": 64} and learner.LEVERS["size28"][1] == learner.AT_28


def test_the_learner_benchmarks_command_line_options_are_set_over_every_levers():
    import learner

    for lever in ("recipe", "wide", "long"):
        cfg = learner.lever_config(lever, "small1", 0, None, 10, 10, {"width": 64, "pretrain_epochs": 3})
        assert (cfg.width, cfg.pretrain_epochs) == (64, 3), lever
    cfg = learner.lever_config("recipe", "small1", 0, None, 10, 10, {"width": [8, 8, 16, 32], "pretrain_epochs": None})
    assert cfg.width == [8, 8, 16, 32] and cfg.pretrain_epochs == 20  # not given: the recipe's
    assert learner.lever_config("narrow", "small1", 0, None, 10, 10, None).width == 64
    for bad in (["--width", "8", "8"], ["--width", "8", "8", "8", "8", "8"], ["--width", "0"],
                ["--width", "8", "8", "8", "-1"], ["--pretrain-epochs", "-1"]):
        with pytest.raises(SystemExit):
            learner.main([*bad, "--out", "/nonexistent/never-made"])
    assert not Path("/nonexistent").exists()
    # a model trained with an option given for every lever is named, and kept, apart from the lever's own
    assert learner.named("recipe", {"width": 64, "pretrain_epochs": None}) == \
        ("recipe-width64", learner.LEVERS["recipe"][0] + "; filters 64 a block")
    assert learner.named("long", {"width": [8, 8, 16, 32], "pretrain_epochs": 10})[0] == "long-pre10-width8-8-16-32"
    assert learner.named("narrow", None) == ("narrow", learner.LEVERS["narrow"][0])


def test_every_learner_lever_samples_its_training_episodes():
    """Each lever's overrides make a training run that can start: its episodes can be drawn
    from the real background set (no training here)."""
    import learner

    from engine.data.episodes import EpisodeSampler
    from engine.train import load_sets

    for lever in learner.LEVERS:
        for background in ("small1", "small2"):  # (the distilling levers name their teachers' folders; not read here)
            cfg = learner.lever_config(lever, background, 0, None, 10, 10, {"teachers": "/elsewhere/learner"})
            train_x, train_groups, _, _ = load_sets(cfg)
            sampler = EpisodeSampler(train_x, cfg.n_way, cfg.k_shot, cfg.n_query, groups=train_groups,
                                     within_group=cfg.within_alphabet, seed=0)
            for _ in range(6):
                episode = sampler.sample()
                assert len(np.unique(episode.support_y)) == cfg.n_way, lever
