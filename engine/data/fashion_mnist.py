"""Fashion-MNIST from its original idx ``.gz`` files.

Xiao, Rasul and Vollgraf (2017), "Fashion-MNIST: a Novel Image Dataset for
Benchmarking Machine Learning Algorithms". 60k train / 10k test, 28x28, 10 classes.
"""

from __future__ import annotations

import gzip
import os

import numpy as np

from ..errors import InvalidValueError
from .paths import data_root, require_files

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def load_fashion_mnist(root: str | os.PathLike | None = None, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Read one split.

    Args:
        root: the data directory (holding ``fashion-mnist/``) or the ``fashion-mnist`` folder itself.
        split: "train" or "test".

    Returns:
        images (n, 28, 28) uint8 and labels (n,) int64.

    Raises:
        FileNotFoundError: the idx files are missing (the message names them).
        ValueError: an unknown split, or a file that is not a valid idx file.
    """
    if split not in FILES:
        raise InvalidValueError(f"split must be 'train' or 'test', got {split!r}")
    base = data_root(root)
    folder = base if (base / FILES[split][0]).exists() else base / "fashion-mnist"
    require_files(folder, list(FILES[split]), f"Fashion-MNIST ({split})")
    images = _read_idx(folder / FILES[split][0], ndim=3)
    labels = _read_idx(folder / FILES[split][1], ndim=1).astype(np.int64)
    if len(images) != len(labels):
        raise InvalidValueError(f"{folder}: {len(images)} images but {len(labels)} labels")
    return images, labels


def _read_idx(path, ndim: int) -> np.ndarray:
    """Parse an idx file: magic (0, 0, dtype 0x08 = uint8, ndim), big-endian sizes, then the data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] != ndim:
        raise InvalidValueError(f"{path}: not a uint8 idx file with {ndim} dimensions")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise InvalidValueError(f"{path}: expected {int(np.prod(shape))} values, found {body.size}")
    return body.reshape(shape)
