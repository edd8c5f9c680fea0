"""Sizes for the pytest-benchmark suites: BENCH_SIZES="1000,10000" (default 10k and 100k)."""

from __future__ import annotations

import os

import pytest


def bench_sizes() -> list[int]:
    return [int(s) for s in os.environ.get("BENCH_SIZES", "10000,100000").split(",")]


def pytest_generate_tests(metafunc):
    if "size" in metafunc.fixturenames:
        metafunc.parametrize("size", bench_sizes(), ids=lambda n: f"n={n}", scope="module")


@pytest.fixture(scope="session")
def dim() -> int:
    return 64
