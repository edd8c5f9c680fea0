"""Shared fixtures."""

from __future__ import annotations

import numpy as np
import pytest

pytest.register_assert_rewrite("engine.testing")  # the contract's asserts report their values

from engine.data import clustered  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def small_clustered():
    """2,000 slots and 50 queries, d=16, 20 classes."""
    return clustered(2000, 16, n_classes=20, seed=7, queries=50)
