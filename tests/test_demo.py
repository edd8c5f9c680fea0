"""A small run of ``make demo``'s job on real Fashion-MNIST data."""

from __future__ import annotations

import json

from engine.demo import run_demo


def test_demo_smoke(tmp_path):
    report = run_demo(limit=3000, out=tmp_path, progress=False)
    # raw-pixel k-NN reaches ~0.85 on the full set; 3k slots of 64-d PCA already beat chance by far
    assert report["accuracy"] > 0.75
    assert report["slots"] == 3000 and report["queries"] == 3000
    assert 0 <= report["tail_bound_median"] <= 1
    # measured against dense float64 attention over all 3k slots, independently of the engine
    assert report["full_attention_argmax_agreement"] >= 0.95
    assert report["full_attention_tv_median"] <= report["tail_bound_median"] + 1e-6
    assert json.loads((tmp_path / "demo.json").read_text())["accuracy"] == report["accuracy"]
