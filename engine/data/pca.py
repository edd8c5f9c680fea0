"""A learning-free embedding: PCA of raw pixels (the baseline a learned embedding must beat)."""

from __future__ import annotations

import faiss
import numpy as np


def pca_embed(train: np.ndarray, test: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre-and-project both sets with a PCA fitted on ``train`` (pixels scaled to [0, 1])."""
    xtr = train.reshape(len(train), -1).astype(np.float32) / 255.0
    xte = test.reshape(len(test), -1).astype(np.float32) / 255.0
    pca = faiss.PCAMatrix(xtr.shape[1], dim)
    pca.train(xtr)
    return pca.apply(xtr), pca.apply(xte)
