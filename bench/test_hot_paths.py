"""pytest-benchmark suites for the hot paths: query, write, attention kernel, compaction step,
the conv embedding (inference and a training step, channels-last against the default layout).

    make bench                                   # 10k and 100k slots, JSON in runs/bench/
    BENCH_SIZES=1000 pytest bench --benchmark-disable   # the smoke run in make test
"""

from __future__ import annotations

import numpy as np
import pytest

from engine import Memory
from engine.attention import attend
from engine.data import clustered

INDEXES = ["Flat", "IVF256,Flat", "HNSW32"]
K = 64


@pytest.fixture(scope="module", params=INDEXES)
def filled(request, size, dim):
    x, y, q, _ = clustered(size, dim, n_classes=max(10, size // 100), seed=0, queries=1000)
    mem = Memory(dim, index=request.param)
    mem.add(x, y)
    return mem, q


@pytest.mark.benchmark(group="query-batch-1000")
def test_query_batch(benchmark, filled):
    mem, q = filled
    res = benchmark(mem.query, q, k=K)
    assert res.k == min(K, len(mem))


@pytest.mark.benchmark(group="query-single")
def test_query_single(benchmark, filled):
    mem, q = filled
    res = benchmark(mem.query, q[0], k=K)
    assert len(res) == 1


@pytest.mark.benchmark(group="write-1000")
def test_add_then_remove(benchmark, filled, dim):
    mem, _ = filled
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1000, dim)).astype(np.float32)

    def cycle():
        ids = mem.add(x, np.zeros(1000, np.int64))
        mem.remove(ids)

    before = len(mem)
    benchmark.pedantic(cycle, rounds=5, iterations=1)
    assert len(mem) == before


@pytest.mark.benchmark(group="attention-kernel")
@pytest.mark.parametrize("n", [1, 1000])
def test_attention_kernel(benchmark, n):
    rng = np.random.default_rng(2)
    scores = np.sort(rng.uniform(-1, 1, (n, K)).astype(np.float32), axis=1)[:, ::-1]
    out = benchmark(attend, scores, np.ones((n, K)), rng.integers(0, 100, (n, K)), n_classes=100,
                    temperature=0.1, omitted_weight=np.full(n, 1e5))
    assert out.probs.shape == (n, 100)


@pytest.mark.benchmark(group="compaction-to-10%")
@pytest.mark.parametrize("policy", ["merge", "reservoir"])
def test_compaction_step(benchmark, size, dim, policy):
    x, y = clustered(size, dim, n_classes=max(10, size // 1000), seed=3)

    def setup():
        mem = Memory(dim, index="Flat")
        mem.add(x, y)
        return (mem,), {}

    def compact(mem):
        return mem.compact(budget=size // 10, policy=policy)

    out = benchmark.pedantic(compact, setup=setup, rounds=3, iterations=1)
    assert out.slots <= size // 10


LAYOUTS = ["channels_last", "contiguous_format"]  # the backbone's own layout, and the default as the baseline


def _backbone(layout: str):
    import torch

    from engine.nn.backbone import ConvEmbedding

    torch.manual_seed(0)
    return ConvEmbedding().to(memory_format=getattr(torch, layout)), torch


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", [1, 64, 1024])
def test_embedding(benchmark, n, layout):
    net, torch = _backbone(layout)
    benchmark.group = f"embedding-inference-{n}"
    x = (torch.rand(n, 1, 28, 28) < 0.2).float()
    net.eval()
    with torch.no_grad():
        z = benchmark(net, x)
    assert z.shape == (n, 64) and torch.isfinite(z).all()


@pytest.mark.benchmark(group="embedding-training-step-128")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_embedding_training_step(benchmark, layout):
    net, torch = _backbone(layout)
    opt = torch.optim.Adam(net.parameters())
    x = (torch.rand(128, 1, 28, 28) < 0.2).float()

    def step():
        loss = net(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    assert np.isfinite(benchmark(step))
