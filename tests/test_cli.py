"""The ``engine`` command, driven in-process through typer's runner."""

from __future__ import annotations

import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from engine.cli import app

runner = CliRunner()


def run(*args, ok=True):
    result = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def mem_dir(tmp_path):
    run("memory", "create", tmp_path / "m", "--dim", 4, "--index", "Flat", "--temperature", 0.05)
    return tmp_path / "m"


def test_create_add_query_info_remove(tmp_path, mem_dir):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "y.txt").write_text("\n".join(str(i % 3) for i in range(30)))
    out = json.loads(run("memory", "add", mem_dir, tmp_path / "x.npy", "--labels", tmp_path / "y.txt", "--json").output)
    assert out == {"added": 30, "first_id": 0, "last_id": 29, "slots": 30}

    np.save(tmp_path / "q.npy", x[:2])
    res = json.loads(run("memory", "query", mem_dir, tmp_path / "q.npy", "-k", 5, "--json").output)
    assert res["classes"] == [0, 1, 2] and res["k"] == 5 and res["exact_bound"] is True
    assert [q["ids"][0] for q in res["queries"]] == [0, 1]
    assert [q["label"] for q in res["queries"]] == [0, 1]
    assert "tail bound" in run("memory", "query", mem_dir, tmp_path / "q.npy").output
    full = json.loads(run("memory", "query", mem_dir, tmp_path / "q.npy", "--probs", "full", "--json").output)
    assert all(0 <= q["tail_estimate"] < 1 and abs(sum(q["probs"]) - 1) < 1e-5 for q in full["queries"])
    assert "tail (estimate)" in run("memory", "query", mem_dir, tmp_path / "q.npy", "--probs", "full").output
    assert "probs must be one of" in run("memory", "query", mem_dir, tmp_path / "q.npy", "--probs", "all",
                                         ok=False).output

    info = json.loads(run("memory", "info", mem_dir, "--json").output)
    assert info["slots"] == 30 and info["classes"] == 3 and info["temperature"] == 0.05
    assert "bytes_total" in run("memory", "info", mem_dir).output

    assert json.loads(run("memory", "remove", mem_dir, 0, 1, 2, "--json").output) == {"removed": 3, "slots": 27}


def test_add_from_parquet_csv_and_arrow(tmp_path, mem_dir):
    x = np.arange(24, dtype=np.float32).reshape(6, 4) + 1
    table = pa.table({"vector": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 4),
                      "label": ["a", "b", "a", "b", "c", "c"], "id": np.arange(100, 106)})
    pq.write_table(table, tmp_path / "t.parquet")
    run("memory", "add", mem_dir, tmp_path / "t.parquet")
    import pyarrow.feather as feather

    feather.write_feather(table.set_column(2, "id", pa.array(np.arange(200, 206))), tmp_path / "t.arrow")
    run("memory", "add", mem_dir, tmp_path / "t.arrow")
    (tmp_path / "t.csv").write_text("label,f0,f1,f2,f3\n" + "\n".join(f"d,{i},1,2,3" for i in range(1, 4)))
    out = json.loads(run("memory", "add", mem_dir, tmp_path / "t.csv", "--json").output)
    assert out["slots"] == 15 and out["first_id"] == 206


def test_errors_are_one_line_and_exit_2(tmp_path, mem_dir):
    np.save(tmp_path / "bad.npy", np.ones((2, 5), np.float32))
    (tmp_path / "y.txt").write_text("0\n1\n")
    r = run("memory", "add", mem_dir, tmp_path / "bad.npy", "--labels", tmp_path / "y.txt", ok=False)
    assert r.exit_code == 2 and "shape (n, 4)" in r.output
    r = run("memory", "query", mem_dir, tmp_path / "bad.npy", ok=False)
    assert r.exit_code == 2
    np.save(tmp_path / "q.npy", np.ones((1, 4), np.float32))
    r = run("memory", "query", mem_dir, tmp_path / "q.npy", ok=False)
    assert r.exit_code == 2 and "empty" in r.output
    r = run("memory", "remove", mem_dir, 42, ok=False)
    assert r.exit_code == 2 and "unknown ids" in r.output
    r = run("memory", "info", tmp_path / "nothing", ok=False)
    assert r.exit_code == 2 and "manifest.json" in r.output
    (tmp_path / "x.txt").write_text("1 2 3")
    r = run("memory", "add", mem_dir, tmp_path / "x.txt", ok=False)
    assert r.exit_code == 2 and "unknown format" in r.output
    r = run("memory", "create", mem_dir, "--dim", 4, ok=False)
    assert r.exit_code == 2 and "already holds a memory" in r.output


def test_train_and_evaluate_commands(tmp_path):
    from engine.data import data_root

    runs = data_root() / "omniglot" / "one-shot-sample"
    out = tmp_path / "ckpt"
    summary = json.loads(run("train", "--out", out, "--episodes", 2, "--n-way", 5, "--n-query", 1,
                             "--val-every", 2, "--val-episodes", 2, "--width", 16, "--pretrain-epochs", 0, "--views", 2,
                             "--thickness", 0.5, "--erase", 0.25, "--weight-decay", 0.01)
                         .stdout.strip().splitlines()[-1])
    assert summary["episodes"] == 2
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["width"] == 16 and saved["model"]["views"] == 2 and saved["thickness"] == 0.5
    assert saved["erase"] == 0.25 and saved["weight_decay"] == 0.01
    res = json.loads(run("eval-oneshot", "--checkpoint", out, "--runs", runs, "--json").output)
    assert res["runs"] == 1 and 0 <= res["error_rate"] <= 1 and set(res["per_run"]) == {"run01"}
    assert "overall: error" in run("eval-oneshot", "--checkpoint", out, "--runs", runs).output
    one = json.loads(run("eval-oneshot", "--checkpoint", out, "--runs", runs, "--views", 1, "--json").output)
    assert one["runs"] == 1
    both = json.loads(run("eval-oneshot", "--checkpoint", out, "--runs", runs, "--assign", "--json").output)
    assert both["error_rate"] == res["error_rate"] and 0 <= both["assigned"]["error_rate"] <= 1
    assert "one-to-one assignment (transductive" in run("eval-oneshot", "--checkpoint", out, "--runs", runs,
                                                        "--assign").output
    r = run("eval-oneshot", "--checkpoint", out, "--runs", runs, "--views", 0, ok=False)
    assert r.exit_code == 2 and "views" in r.output
    r = run("train", "--out", tmp_path / "y", "--thickness", 2, ok=False)
    assert r.exit_code == 2 and "thickness" in r.output and not (tmp_path / "y").exists()
    for flag, bad in (("--erase", -0.1), ("--weight-decay", "nan")):
        r = run("train", "--out", tmp_path / "y", flag, bad, ok=False)
        assert r.exit_code == 2 and flag[2:].replace("-", "_") in r.output and not (tmp_path / "y").exists()
    rows = json.loads(run("eval-episodes", "--checkpoint", out, "--n-way", 5, "--k-shot", 1, "--episodes", 3,
                          "--json").output)
    assert [r["within_alphabet"] for r in rows] == [False, True]
    r = run("train", "--out", tmp_path / "x", "--dataset", "mnist", ok=False)
    assert r.exit_code == 2 and "unknown dataset" in r.output
    r = run("eval-oneshot", "--checkpoint", tmp_path / "none", "--runs", runs, ok=False)
    assert r.exit_code == 2 and "config.json" in r.output
    r = run("eval-oneshot", "--checkpoint", out, "--runs", tmp_path, ok=False)
    assert r.exit_code == 2 and "class_labels.txt" in r.output
    # a model distilled from the one above (40x40, like it), the teacher's folder kept absolute
    student = tmp_path / "student"
    run("train", "--out", student, "--episodes", 1, "--n-way", 5, "--n-query", 1, "--val-every", 1,
        "--val-episodes", 1, "--width", 8, "--pretrain-epochs", 0, "--views", 1, "--teacher", out, "--distill", 0.5)
    saved = json.loads((student / "config.json").read_text())
    assert saved["teachers"] == [str(out.absolute())] and saved["distill"] == 0.5
    r = run("train", "--out", student, "--resume", "--episodes", 2).output  # with its teacher, from its config
    assert json.loads(r[r.rindex('{"episodes"'):])["episodes"] == 2
    for bad, word in ((("--distill", 0.5), "teachers"), (("--teacher", out), "distill"),
                      (("--teacher", tmp_path / "none", "--distill", 0.5), "config.json")):
        r = run("train", "--out", tmp_path / "z", "--episodes", 1, *bad, ok=False)
        assert r.exit_code == 2 and word in r.output and not (tmp_path / "z").exists()


def test_train_at_another_image_size_and_evaluate_at_it(tmp_path):
    from engine.data import data_root

    runs = data_root() / "omniglot" / "one-shot-sample"
    out = tmp_path / "ckpt28"  # the recipe is 40x40
    run("train", "--out", out, "--episodes", 2, "--n-way", 5, "--n-query", 1, "--val-every", 2, "--val-episodes", 2,
        "--width", "8,8,8,12", "--pretrain-epochs", 1, "--views", 1, "--image-size", 28, "--mixup", 0.5, "--shift", 2,
        "--elastic", 1.5)
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["image_size"] == 28 and saved["mixup"] == 0.5
    assert saved["width"] == saved["model"]["width"] == [8, 8, 8, 12]  # one a block
    assert (saved["shift"], saved["elastic"]) == (2, 1.5)
    res = json.loads(run("eval-oneshot", "--checkpoint", out, "--runs", runs, "--json").output)  # read at 28x28
    assert res["runs"] == 1
    rows = json.loads(run("eval-episodes", "--checkpoint", out, "--n-way", 5, "--k-shot", 1, "--episodes", 2,
                          "--json").output)
    assert len(rows) == 2
    for bad in (200, 15):
        r = run("train", "--out", tmp_path / "bad", "--image-size", bad, ok=False)
        assert r.exit_code == 2 and "image size" in r.output and not (tmp_path / "bad").exists()
    r = run("train", "--out", tmp_path / "bad", "--shift", "nan", ok=False)
    assert r.exit_code == 2 and "shift" in r.output and not (tmp_path / "bad").exists()
    r = run("train", "--out", tmp_path / "bad", "--mixup", -1, ok=False)
    assert r.exit_code == 2 and "mixup" in r.output and not (tmp_path / "bad").exists()
    for bad in ("8,x", "8,8,8", "8,,8,8", "0"):
        r = run("train", "--out", tmp_path / "bad", "--width", bad, ok=False)
        assert r.exit_code == 2 and "width" in r.output and not (tmp_path / "bad").exists()
    r = run("train", "--out", out, "--resume", "--image-size", 40, ok=False)  # another model: refused
    assert r.exit_code == 2 and "image_size: 28 -> 40" in r.output
    r = run("train", "--out", out, "--resume", "--width", "8,8,8,16", ok=False)  # other filters: refused
    assert r.exit_code == 2 and "width: [8, 8, 8, 12] -> [8, 8, 8, 16]" in r.output
    assert json.loads((out / "config.json").read_text()) == saved  # nothing rewritten
    # resumed with the run's own options (not the 40x40 recipe's), the ones given in their place
    r = run("train", "--out", out, "--resume", "--episodes", 3, "--val-every", 1).output
    r = json.loads(r[r.rindex('{"episodes"'):])  # the summary, after the progress bars
    assert r["episodes"] == 3 and r["pretrain_epochs"] == 0  # from the checkpoint: no supervised stage again
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [row["episode"] for row in log if "episode" in row] == [2, 3]  # went on from episode 2
    resumed = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in resumed.items() if k not in ("episodes", "val_every")} == \
        {k: v for k, v in saved.items() if k not in ("episodes", "val_every")}
    assert (resumed["episodes"], resumed["val_every"], resumed["shift"], resumed["elastic"]) == (3, 1, 2, 1.5)
    r = run("train", "--out", out, "--resume", "--episodes", 4, "--val-episodes", 3, ok=False)
    assert r.exit_code == 2 and "val_episodes: 2 -> 3" in r.output  # its best state was chosen by 2 episodes
    r = run("train", "--out", out, "--resume", "--dataset", "fashion-mnist", ok=False)
    assert r.exit_code == 2 and "dataset: 'omniglot' -> 'fashion-mnist'" in r.output
    r = run("train", "--out", tmp_path / "none", "--resume", ok=False)
    assert r.exit_code == 2 and "config.json" in r.output and not (tmp_path / "none").exists()
    r = run("train", "--out", tmp_path / "bad", "--dataset", "fashion-mnist", "--image-size", 40, ok=False)
    assert r.exit_code == 2 and "28x28" in r.output and not (tmp_path / "bad").exists()


def test_the_library_cli_carries_no_demo_or_benchmarks_and_the_scripts_run_from_the_checkout():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = run("--help")
    assert "memory" in r.output and " demo " not in r.output and " bench " not in r.output
    for script, flag in (("examples/demo.py", "--quick"), ("bench/scale.py", "--sizes")):
        out = subprocess.run([sys.executable, str(root / script), "--help"], capture_output=True, text=True, cwd=root)
        assert out.returncode == 0 and flag in out.stdout, out.stderr


def test_create_chooses_the_temperature_unless_one_is_given(tmp_path):
    run("memory", "create", tmp_path / "a", "--dim", 4, "--index", "Flat")
    x = np.random.default_rng(1).standard_normal((60, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "y.txt").write_text("\n".join(str(i % 3) for i in range(60)))
    run("memory", "add", tmp_path / "a", tmp_path / "x.npy", "--labels", tmp_path / "y.txt")
    from engine import Memory

    with Memory.open(tmp_path / "a") as mem:
        assert mem.temperature_report is not None and mem.temperature == mem.temperature_report.temperature
    for bad in ("warm", "nan", "-1"):
        out = run("memory", "create", tmp_path / f"b{bad}", "--dim", 4, "--temperature", bad, ok=False)
        assert out.exit_code != 0 and "temperature" in out.output and not (tmp_path / f"b{bad}").exists()


def test_ingest_refuses_ill_typed_sources_and_leaves_no_memory_behind(tmp_path):
    """Checked from the files' schemas before Ray starts or a memory is made."""
    x = np.ones((4, 3), np.float32)
    cases = {
        "no label": pa.table({"vector": pa.array(list(x))}),
        "float labels": pa.table({"vector": pa.array(list(x)), "label": [0.5, 1.0, 2.0, 3.0]}),
        "bool labels": pa.table({"vector": pa.array(list(x)), "label": [True, False, True, True]}),
        "string vectors": pa.table({"vector": [["a"]] * 4, "label": [0, 1, 2, 3]}),
        "float ids": pa.table({"vector": pa.array(list(x)), "label": [0, 1, 2, 3], "id": [0.5, 1, 2, 3]}),
        "string weights": pa.table({"vector": pa.array(list(x)), "label": [0, 1, 2, 3], "weight": ["1"] * 4}),
        "neither": pa.table({"label": [0, 1, 2, 3]}),
    }
    for name, table in cases.items():
        src = tmp_path / f"{name}.parquet"
        pq.write_table(table, src)
        out = run("ingest", tmp_path / name, src, "--shards", 2, "--dim", 3, ok=False)
        assert out.exit_code == 2 and len(out.output.strip().splitlines()) <= 3, (name, out.output)
        assert not (tmp_path / name).exists(), name  # the corrected rerun can create it
    # arguments that cannot work are refused before Ray starts
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"vector": pa.array(list(x)), "label": [0, 1, 2, 3]}), good)
    for args, words in (((tmp_path / "none", good), "no sharded memory"),
                        ((tmp_path / "new", good, "--shards", 2), "--dim")):
        out = run("ingest", *args, ok=False)
        assert out.exit_code == 2 and words in out.output, out.output
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


def test_ingest_sources_may_be_directories_and_must_agree_on_columns(tmp_path):
    from engine import InvalidValueError
    from engine.cluster.ingest import check_sources

    (tmp_path / "d").mkdir()
    good = pa.table({"vector": pa.array(list(np.ones((2, 3), np.float32))), "label": [0, 1]})
    pq.write_table(good, tmp_path / "d" / "part-0.parquet")
    assert check_sources(tmp_path / "d") == (["vector", "label"], False)
    assert check_sources([tmp_path / "d", tmp_path / "d" / "part-0.parquet"])[0] == ["vector", "label"]
    pq.write_table(pa.table({"label": [0, 1], "vector": good["vector"]}), tmp_path / "other.parquet")
    with pytest.raises(InvalidValueError, match="columns"):
        check_sources([tmp_path / "d", tmp_path / "other.parquet"])


def test_the_library_verbs_from_the_command_line(tmp_path):
    """create with every option, add, query against known labels, export, remove by label,
    compact and set; info and export on a memory another process holds open."""
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((4, 8))
    y = np.arange(200) % 4
    x = (centres[y] + 0.3 * rng.standard_normal((200, 8))).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    m = tmp_path / "m"
    run("memory", "create", m, "--dim", 8, "--index", "Flat", "--temperature", 0.1, "--probs", "full",
        "--budget", 1000, "--policy", "reservoir", "--track-usage")
    run("memory", "add", m, tmp_path / "x.npy", "--labels", tmp_path / "y.npy")
    out = json.loads(run("memory", "query", m, tmp_path / "x.npy", "--labels", tmp_path / "y.npy", "-k", 8,
                         "--json").output)
    assert out["accuracy"] >= 0.95 and "tail_estimate" in out["queries"][0]  # the memory answers full
    assert "accuracy" in run("memory", "query", m, tmp_path / "x.npy", "--labels", tmp_path / "y.npy").output
    run("memory", "export", m, tmp_path / "two.parquet", "--label", 2)
    two = pq.read_table(tmp_path / "two.parquet")
    assert set(two.column("label").to_pylist()) == {2} and two.num_rows == 50
    assert "exists" in run("memory", "export", m, tmp_path / "two.parquet", ok=False).output
    np.save(tmp_path / "fids.npy", np.array([1.9, 2.5]))  # float ids are refused, never cut to other slots' ids
    for verb in ("get", "remove"):
        refused = run("memory", verb, m, "--ids-file", tmp_path / "fids.npy", ok=False)
        assert refused.exit_code == 2 and "integers" in refused.output
    unknown = run("memory", "export", m, tmp_path / "none.parquet", "--label", 9, "--label", 2, ok=False)
    assert unknown.exit_code == 2 and "no slot: [9]" in unknown.output and not (tmp_path / "none.parquet").exists()
    assert not list(tmp_path.glob(".*part"))  # nothing written aside is left
    import os

    real_link = os.link

    def no_links(*args, **kwargs):  # a filesystem without hard links (FAT, some SMB)
        raise PermissionError(1, "Operation not permitted")

    os.link = no_links
    try:
        run("memory", "export", m, tmp_path / "nolink.parquet", "--label", 1)
    finally:
        os.link = real_link
    assert pq.read_table(tmp_path / "nolink.parquet").num_rows == 50 and not list(tmp_path.glob(".*part"))
    got = json.loads(run("memory", "get", m, 0, 1, "--json").output)
    assert [g["id"] for g in got] == [0, 1] and [g["label"] for g in got] == [0, 1]
    np.testing.assert_allclose([g["vector"] for g in got], x[:2] / np.linalg.norm(x[:2], axis=1, keepdims=True),
                               atol=1e-6)
    assert "label 1" in run("memory", "get", m, 1).output
    missing = run("memory", "get", m, 10_000, ok=False)
    assert missing.exit_code == 2 and "10000" in missing.output and len(missing.output.strip().splitlines()) == 1
    assert "saved 200 slots" in run("memory", "save", m).output
    run("memory", "save", m, "--to", tmp_path / "copy")
    assert json.loads(run("memory", "info", tmp_path / "copy", "--json").output)["slots"] == 200
    assert "exists" in run("memory", "save", m, "--to", tmp_path / "copy", ok=False).output
    assert json.loads(run("memory", "remove", m, "--label", 2, "--json").output) == {"removed": 50, "slots": 150}
    assert "no slot" in run("memory", "remove", m, "--label", 2, ok=False).output
    report = json.loads(run("memory", "compact", m, "--budget", 40, "--json").output)
    assert report["slots"] <= 40 and report["policy"] == "merge"
    run("memory", "set", m, "--temperature", 0.3)
    info = json.loads(run("memory", "info", m, "--json").output)
    assert info["temperature"] == 0.3 and info["slots"] <= 40 and info["classes"] == 3
    assert "nothing to set" in run("memory", "set", m, ok=False).output
    assert "no such directory" in run("memory", "create", tmp_path / "nowhere" / "m", "--dim", 4, ok=False).output
    bad_t = run("memory", "create", tmp_path / "t", "--dim", 4, "--temperature", "abc", ok=False)
    assert bad_t.exit_code == 2 and len(bad_t.output.strip().splitlines()) == 1 and "--temperature" in bad_t.output
    age = run("memory", "create", tmp_path / "age", "--dim", 4, "--policy", "age", "--no-track-usage", ok=False)
    assert age.exit_code == 2 and "--track-usage" in age.output and "track_usage=" not in age.output
    from engine import Memory

    held = Memory.open(m)  # another writer holds it: reads still work, read-only
    try:
        assert json.loads(run("memory", "info", m, "--json").output)["slots"] == info["slots"]
        run("memory", "export", m, tmp_path / "all.arrow")
        assert "already open" in run("memory", "remove", m, "--label", 1, ok=False).output
    finally:
        held.close()


def test_bad_files_and_repeated_runs_get_one_clear_line(tmp_path, mem_dir):
    (tmp_path / "empty.npy").write_bytes(b"")
    np.save(tmp_path / "none.npy", np.zeros((0, 4), np.float32))
    (tmp_path / "header.csv").write_text("label,a,b,c,d\n")
    pq.write_table(pa.table({"embedding": [[1.0, 2.0, 3.0, 4.0]] * 3, "label": [1, 2, 3]}), tmp_path / "emb.parquet")
    (tmp_path / "y.txt").write_text("1\n")
    for file, words in (("empty.npy", "not a readable .npy"), ("none.npy", "shape (0, 4)"),
                        ("header.csv", "no rows"), ("emb.parquet", "--vector-column embedding")):
        result = run("memory", "add", mem_dir, tmp_path / file, "--labels", tmp_path / "y.txt", ok=False)
        assert result.exit_code == 2 and words in result.output and len(result.output.strip().splitlines()) == 1
    assert len(run("memory", "info", mem_dir, "--json").output) and \
        json.loads(run("memory", "info", mem_dir, "--json").output)["slots"] == 0  # nothing written
    pq.write_table(pa.table({"embedding": [[1.0, 2.0, 3.0, 4.0]] * 3, "label": [1, 2, 3], "id": [7, 8, 9]}),
                   tmp_path / "ids.parquet")
    run("memory", "add", mem_dir, tmp_path / "ids.parquet", "--vector-column", "embedding")
    again = run("memory", "add", mem_dir, tmp_path / "ids.parquet", "--vector-column", "embedding", ok=False)
    assert again.exit_code == 2 and "--upsert replaces them" in again.output and "upsert=True" not in again.output
    exists = run("memory", "create", mem_dir, "--dim", 4, ok=False)
    assert exists.exit_code == 2 and "Memory.open(" not in exists.output and "memory commands" in exists.output
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    refused = run("train", "--out", tmp_path / "run", "--episodes", 0, ok=False)
    assert refused.exit_code == 2 and "--resume" in refused.output and "--force" in refused.output
    assert (tmp_path / "run" / "config.json").read_text() == "{}"
    for bad in (["--width", "8,x"], ["--width", "0"], ["--mixup", "-1"]):  # refused before --force removes the run
        refused = run("train", "--out", tmp_path / "run", "--force", *bad, ok=False)
        assert refused.exit_code == 2 and bad[0][2:] in refused.output
        assert (tmp_path / "run" / "config.json").read_text() == "{}"


def test_set_checks_everything_before_changing_anything_and_labels_files_are_read_as_the_memorys(tmp_path):
    m = tmp_path / "m"
    run("memory", "create", m, "--dim", 4, "--index", "Flat", "--temperature", 0.1)
    refused = run("memory", "set", m, "--temperature", 0.5, "--nprobe", -3, ok=False)
    assert refused.exit_code == 2 and json.loads(run("memory", "info", m, "--json").output)["temperature"] == 0.1
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 4)).astype(np.float32)
    pq.write_table(pa.table({"vector": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 4),
                             "label": [str(i % 3) for i in range(30)]}), tmp_path / "s.parquet")
    run("memory", "add", m, tmp_path / "s.parquet")  # string labels that look like numbers
    np.save(tmp_path / "q.npy", x)
    (tmp_path / "truth.txt").write_text("\n".join(str(i % 3) for i in range(30)))
    out = json.loads(run("memory", "query", m, tmp_path / "q.npy", "--labels", tmp_path / "truth.txt", "-k", 1,
                         "--json").output)
    assert out["accuracy"] == 1.0
    (tmp_path / "empty.npy").write_bytes(b"")
    for args in (("memory", "query", m, tmp_path / "q.npy", "--labels", tmp_path / "empty.npy"),
                 ("memory", "remove", m, "--ids-file", tmp_path / "empty.npy")):
        bad = run(*args, ok=False)
        assert bad.exit_code == 2 and "not a readable .npy" in bad.output


def test_unreadable_text_inputs_are_one_line_errors(tmp_path):
    """A labels file or token file that is not text is the caller's error: one line, exit 2."""
    mem = tmp_path / "m"
    run("memory", "create", mem, "--dim", 4)
    np.save(tmp_path / "v.npy", np.ones((3, 4), np.float32))
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa\n")
    out = run("memory", "add", mem, tmp_path / "v.npy", "--labels", tmp_path / "bad.txt", ok=False)
    assert out.exit_code == 2 and "UTF-8" in out.output, out.output
    assert isinstance(out.exception, SystemExit)  # a one-line message, not an exception's traceback


def test_eval_commands_score_repeated_checkpoints_as_one_ensemble(tmp_path):
    import torch

    from engine.data import as_input, data_root
    from engine.data.omniglot import load_oneshot_runs
    from engine.nn import ensemble
    from engine.train import TrainConfig, episode_features, evaluate_episodes, load_checkpoint, load_sets, train

    runs = data_root() / "omniglot" / "one-shot-sample"
    base = dict(episodes=1, n_way=5, n_query=1, val_way=5, val_episodes=2, val_every=1, width=8, image_size=28)
    for seed in (0, 1):
        train(TrainConfig(**base, seed=seed), tmp_path / f"s{seed}", progress=False)
    members = [tmp_path / "s0", tmp_path / "s1"]
    args = [a for m in members for a in ("--checkpoint", m)]
    out = json.loads(run("eval-oneshot", *args, "--runs", runs, "--json").output)
    # the reference: each member's cosine logits in float64, averaged, then the argmax
    run01 = load_oneshot_runs(runs, size=28)[0]
    logits = 0
    for m in members:
        model = load_checkpoint(m)
        with torch.no_grad():
            g = torch.nn.functional.normalize(model.embed_support(as_input(run01.train)).double(), dim=1)
            h = torch.nn.functional.normalize(model.embed_queries(as_input(run01.test)).double(), dim=1)
        member = (h @ g.T / model.temperature.detach().double()).numpy()
        logits = logits + member / len(members)
    expected = float((logits.argmax(1) != run01.answer).mean())
    assert out["error_rate"] == pytest.approx(expected)
    # run01's 20 items rarely tell an ensemble from a member; 200 episodes do (the ensemble's
    # scores are checked against its members' mean logits in tests/nn)
    rows = json.loads(run("eval-episodes", *args, "--n-way", 5, "--k-shot", 1, "--episodes", 200, "--json").output)
    assert len(rows) == 2
    cfg = TrainConfig(**base)
    _, _, val_x, val_groups = load_sets(cfg)
    models = [ensemble([load_checkpoint(m) for m in members]), *map(load_checkpoint, members)]
    features = [episode_features(model, val_x) for model in models]
    for row, within in zip(rows, (0.0, 1.0)):
        scores = [evaluate_episodes(model, val_x, val_groups, n_way=5, k_shot=1, episodes=200, within_group=within,
                                    seed=7, features=f)["accuracy"] for model, f in zip(models, features)]
        assert row["accuracy"] == pytest.approx(scores[0]) and scores[0] not in scores[1:]
    train(TrainConfig(**base, background="small2"), tmp_path / "other", progress=False)
    r = run("eval-episodes", *args, "--checkpoint", tmp_path / "other", "--episodes", 3, ok=False)
    assert r.exit_code == 2 and "different Omniglot sets (small1, small2)" in r.output
    import shutil

    shutil.copytree(tmp_path / "s1", tmp_path / "fashion")
    cfg_fm = json.loads((tmp_path / "fashion" / "config.json").read_text())
    (tmp_path / "fashion" / "config.json").write_text(json.dumps({**cfg_fm, "dataset": "fashion-mnist"}))
    r = run("eval-episodes", *args, "--checkpoint", tmp_path / "fashion", "--episodes", 3, ok=False)
    assert r.exit_code == 2 and "different datasets (fashion-mnist, omniglot)" in r.output
    train(TrainConfig(**{**base, "image_size": 32}), tmp_path / "s32", progress=False)
    for command, rest in (("eval-oneshot", ["--runs", runs]), ("eval-episodes", ["--episodes", 3])):
        r = run(command, *args, "--checkpoint", tmp_path / "s32", *rest, ok=False)
        assert r.exit_code == 2 and "one image size" in r.output and "s32: 32x32" in r.output
    r = run("eval-oneshot", *args, "--checkpoint", tmp_path / "s0", "--runs", runs, ok=False)
    assert r.exit_code == 2 and "given twice" in r.output  # it would weigh twice
    # a run saved before models kept their side read 28x28 images: not mixed with another side
    old = json.loads((tmp_path / "s1" / "config.json").read_text())
    del old["image_size"], old["model"]["image_size"]
    (tmp_path / "s1" / "config.json").write_text(json.dumps(old))
    assert load_checkpoint(tmp_path / "s1").image_size is None
    r = run("eval-oneshot", "--checkpoint", tmp_path / "s1", "--checkpoint", tmp_path / "s32", "--runs", runs,
            ok=False)
    assert r.exit_code == 2 and "s1: 28x28" in r.output
    assert json.loads(run("eval-oneshot", *args, "--runs", runs, "--json").output) == out  # old at 28 with 28
