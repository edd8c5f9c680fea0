"""Datasets: Fashion-MNIST, synthetic clustered embeddings, a PCA baseline, and where to find the data."""

from .fashion_mnist import load_fashion_mnist
from .images import as_input, pixels
from .paths import data_root
from .pca import pca_embed
from .synthetic import clustered

__all__ = ["as_input", "clustered", "data_root", "load_fashion_mnist", "pca_embed", "pixels"]
