"""Images as the engine reads them: the one place uint8 pixels become numbers."""

from __future__ import annotations

import numpy as np


def pixels(images: np.ndarray) -> np.ndarray:
    """uint8 images scaled to float32 in [0, 1]; float images are taken as already scaled."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(images, dtype=np.float32)


def as_input(images: np.ndarray):
    """(n, H, W) images (uint8, or floats in [0, 1]) as the (n, 1, H, W) float32 tensor a model takes."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(pixels(images))).unsqueeze(1)
