"""A learning-free embedding: PCA of raw pixels (the baseline a learned embedding must beat)."""

from __future__ import annotations

import faiss
import numpy as np

from .images import pixels


def pca_embed(train: np.ndarray, test: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre-and-project both sets with a PCA fitted on ``train`` (pixels scaled to [0, 1])."""
    xtr = pixels(train).reshape(len(train), -1)
    xte = pixels(test).reshape(len(test), -1)
    pca = faiss.PCAMatrix(xtr.shape[1], dim)
    pca.train(xtr)
    return pca.apply(xtr), pca.apply(xte)
