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


@pytest.mark.parametrize("name", ["learned-like", "isotropic", "uniform"])
def test_synthetic_data_does_not_depend_on_the_chunk(monkeypatch, name):
    """Large draws are made a chunk of rows at a time (bounded scratch memory): the numbers
    must be those of one draw of the whole array, whatever the chunk."""
    from engine.data import synthetic

    whole = synthetic.DISTRIBUTIONS[name](500, 12, 4, 50)
    monkeypatch.setattr(synthetic, "CHUNK", 7)
    chunked = synthetic.DISTRIBUTIONS[name](500, 12, 4, 50)
    for a, b in zip(whole, chunked):  # the same normals; a product per chunk may round its last bit apart
        if a.dtype == np.float32:
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
        else:
            np.testing.assert_array_equal(a, b)
    x, y, qx, qy = chunked
    assert x.dtype == qx.dtype == np.float32 and x.shape == (500, 12) and qx.shape == (50, 12)
    assert y.dtype == np.int64 and y.shape == (500,)


@pytest.mark.parametrize("decay", [0.0, 1.0])
def test_learned_like_noise_is_drawn_from_one_stream(monkeypatch, decay):
    """An independent reference: the generator written out from its docstring, drawn in one
    go, against the library drawing 64 rows at a time (isotropic noise, and anisotropic
    along a random rotation as in LEARNED_LIKE)."""
    from engine.data import synthetic
    from engine.data.synthetic import LEARNED_LIKE, clustered

    monkeypatch.setattr(synthetic, "CHUNK", 64)
    n, dim, seed, noise = 300, 10, 5, LEARNED_LIKE["noise"]
    x, y = clustered(n, dim, n_classes=20, seed=seed, **{**LEARNED_LIKE, "noise_decay": decay})
    rng = np.random.default_rng(seed)
    groups = rng.standard_normal((2, dim))
    groups /= np.linalg.norm(groups, axis=1, keepdims=True)
    centres = groups[np.arange(20) % 2] + LEARNED_LIKE["class_spread"] / np.sqrt(dim) * rng.standard_normal((20, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    subs = centres[:, None] + LEARNED_LIKE["mode_spread"] / np.sqrt(dim) * rng.standard_normal((20, 4, dim))
    subs /= np.linalg.norm(subs, axis=2, keepdims=True)
    if decay:  # per-axis std falling as i ** -decay / 2 along a random rotation, total variance kept
        std = np.arange(1, dim + 1) ** (-decay / 2)
        rotation = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    labels, mode = rng.integers(0, 20, n), rng.integers(0, 4, n)
    eps = rng.standard_normal((n, dim))
    if decay:
        eps = (eps * (std * np.sqrt(dim) / np.linalg.norm(std))) @ rotation.T
    want = subs[labels, mode] + noise / np.sqrt(dim) * eps
    np.testing.assert_array_equal(y, labels)
    np.testing.assert_allclose(x, want.astype(np.float32), rtol=0, atol=1e-6)
