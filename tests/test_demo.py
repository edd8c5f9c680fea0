"""A small run of ``make demo``'s job on real Fashion-MNIST data."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from examples.demo import pca_memory_report, run_demo


def test_pca_memory_smoke(tmp_path):
    report = pca_memory_report(limit=3000, out=tmp_path, progress=False)
    # raw-pixel k-NN reaches ~0.85 on the full set; 3k slots of 64-d PCA already beat chance by far
    assert report["accuracy"] > 0.75
    assert report["slots"] == 3000 and report["queries"] == 3000
    assert 0 <= report["tail_bound_median"] <= 1
    # measured against dense float64 attention over all 3k slots, independently of the engine
    assert report["full_attention_argmax_agreement"] >= 0.95
    assert report["full_attention_tv_median"] <= report["tail_bound_median"] + 1e-6
    assert report["estimated_tail_argmax_agreement"] >= 0.95
    assert json.loads((tmp_path / "pca.json").read_text())["accuracy"] == report["accuracy"]


def test_whole_demo_quick(tmp_path):
    report = run_demo(out=tmp_path, quick=True, progress=False)
    assert report["oneshot"]["runs"] == 1 and 0 <= report["oneshot"]["error_rate"] <= 1
    assert [r["n_way"] for r in report["omniglot_validation"]] == [20, 5, 20]
    learned = report["fashion_learned"]
    assert 0 <= learned["accuracy"] <= 1 and learned["slots"] == 2000
    # the memory's temperature: chosen by the memory itself, leave-one-out on its slots
    chosen = learned["temperature_report"]
    assert chosen["temperature"] == learned["temperature"] and chosen["slots"] == 2000
    assert chosen["nll"] <= chosen["nll_previous"] + 1e-12
    for name in ("training.png", "oneshot.png", "fashion.png"):  # real pictures, not blank canvases
        with Image.open(tmp_path / name) as img:
            pixels = np.asarray(img.convert("L"))
        assert min(pixels.shape) >= 200 and len(np.unique(pixels)) > 16, name
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["oneshot"] == report["oneshot"] and saved["fashion_learned"] == report["fashion_learned"]
    text = (tmp_path / "report.md").read_text()
    assert "one-shot" in text and f"{100 * report['oneshot']['error_rate']:.1f}%" in text
