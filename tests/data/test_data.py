"""Dataset loaders: real files from ../shared/data, and clear errors when they are missing."""

from __future__ import annotations

import numpy as np
import pytest

from engine.data import clustered, data_root, load_fashion_mnist


def test_fashion_mnist_test_split():
    x, y = load_fashion_mnist(split="test")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert sorted(np.unique(y)) == list(range(10))
    assert np.bincount(y).tolist() == [1000] * 10


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz"):
        load_fashion_mnist(tmp_path, split="test")


def test_bad_split():
    with pytest.raises(ValueError):
        load_fashion_mnist(split="validation")


def test_corrupt_idx_file(tmp_path):
    import gzip

    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        with gzip.open(folder / name, "wb") as f:
            f.write(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big") * 3 + b"\x00" * 10)
    with pytest.raises(ValueError, match="expected"):
        load_fashion_mnist(tmp_path, split="test")


def test_env_var_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("ENGINE_DATA", str(tmp_path))
    assert data_root() == tmp_path
    assert data_root("/explicit") != tmp_path


def test_clustered_is_seeded():
    a = clustered(100, 8, seed=3)
    b = clustered(100, 8, seed=3)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[0].dtype == np.float32 and a[0].shape == (100, 8)
