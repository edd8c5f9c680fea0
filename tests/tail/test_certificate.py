"""A property test of the certificate: random memories and random sequences of writes,
removes of heavy slots, upserts, compaction and ``tail=`` growth, every answer that says
``exact_bound=True`` checked against dense float64 attention over every live slot, for
each metric (cosine, inner product, negative squared distance).

What a certificate promises, checkable from outside:
- top-k answers: ``tail_bound`` is at least the true attention share outside the
  returned top-k;
- full answers: every slot scored counts exactly and ``tail_bound`` bounds the share
  not scored, so the probabilities differ from dense attention by at most the larger of
  the true unscored share and the estimated one: TV <= max(tail_bound, tail_estimate);
  on a Flat index nothing is unscored (bound 0, probabilities dense to float32 rounding),
  and HNSW scores exactly what it returns, so the bound covers everything else.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine import Memory
from engine.testing import total_variation

from .test_tail import omitted, reference

DIM = 6
INDEXES = [{"index": "Flat"}, {"index": "IVF4,Flat", "nprobe": 1}, {"index": "HNSW8"}, {"index": "IVF8,Flat"}]
TRIALS = 40


def _weights(rng, n):
    kind = rng.integers(0, 3)
    if kind == 0:
        return None
    if kind == 1:
        return rng.lognormal(0.0, 1.0, n)
    w = np.ones(n)
    w[rng.random(n) < 0.05] = 10.0 ** rng.uniform(3, 30)  # a few heavy slots
    return w


def _check(mem, q, res, k, tail, counts):
    if not res.exact_bound:
        return
    p = reference(mem, q, res.classes)
    counts["answers"] += len(q)
    if res.tail_estimate is None:  # top-k
        truth = omitted(mem, q, res)
        assert (truth <= res.tail_bound + 1e-9).all(), (truth, res.tail_bound)
        return
    tv = total_variation(res.probs, p)
    assert (tv <= np.maximum(res.tail_bound, res.tail_estimate) + 1e-6).all(), (tv, res.tail_bound)
    spec = mem.stats().index
    if spec == "Flat":
        assert (res.tail_bound == 0).all()
        # float32-stored vectors at T down to 0.02 (l2: squared distances of vectors up to ~5 long)
        np.testing.assert_allclose(res.probs, p, atol=1e-6 if mem.metric == "cosine" else 2e-5)
    elif spec.startswith("HNSW"):  # it scores the retrieved slots: the rest is unscored
        truth = omitted(mem, q, res)
        assert (truth <= res.tail_bound + 1e-9).all(), (truth, res.tail_bound)


@pytest.mark.parametrize("seed", range(3))
def test_every_certified_answer_holds_after_random_writes(seed):
    counts = trials(seed, TRIALS)
    assert counts["answers"] >= 200, counts


def trials(seed: int, memories: int) -> dict:
    """``memories`` random memories and operation sequences; every certified answer checked.
    Returns counts (memories, certified answers checked)."""
    rng = np.random.default_rng(seed)
    counts = {"memories": 0, "answers": 0}
    for trial in range(memories):
        counts["memories"] += 1
        opts = INDEXES[rng.integers(len(INDEXES))]
        classes = int(rng.integers(2, 6))
        centres = rng.standard_normal((classes, DIM))
        temperature = float(10 ** rng.uniform(-1.7, 0))
        metric = str(rng.choice(["cosine", "ip", "l2"]))
        if metric != "cosine":  # similarities of a few units: temperatures to match
            temperature *= 10
        if metric == "l2" and rng.random() < 0.5:  # far from the origin: distances must not change
            centres = centres + 10 ** rng.uniform(1, 4)
        mem = Memory(DIM, metric=metric, temperature=temperature, probs=str(rng.choice(["top-k", "full"])), **opts)

        def draw(n):
            y = rng.integers(0, classes, n)
            return (centres[y] + rng.uniform(0.2, 1.5) * rng.standard_normal((n, DIM))).astype(np.float32), y

        x, y = draw(int(rng.integers(40, 400)))
        ids = list(mem.add(x, y, weights=_weights(rng, len(x))))
        for _ in range(int(rng.integers(2, 6))):
            q = draw(int(rng.integers(1, 12)))[0]
            k = int(rng.integers(1, 40))
            probs = str(rng.choice(["top-k", "full"]))
            tail = float(rng.choice([0.5, 0.1, 0.01])) if rng.random() < 0.3 else None
            _check(mem, q, mem.query(q, k=k, probs=probs, tail=tail), k, tail, counts)
            op = rng.integers(0, 4)
            if op == 0 and len(ids) > 10:  # remove some, the heaviest first half the time
                slots = mem.get(ids)
                order = np.argsort(-slots.weights) if rng.random() < 0.5 else rng.permutation(len(ids))
                gone = [ids[i] for i in order[: int(rng.integers(1, max(2, len(ids) // 3)))]]
                mem.remove(gone)
                ids = [i for i in ids if i not in set(gone)]
            elif op == 1:
                nx, ny = draw(int(rng.integers(1, 100)))
                ids += list(mem.add(nx, ny, weights=_weights(rng, len(nx))))
            elif op == 2 and ids:  # upsert: same ids, new vectors and masses
                some = [ids[i] for i in rng.choice(len(ids), min(len(ids), 20), replace=False)]
                nx, ny = draw(len(some))
                mem.add(nx, ny, ids=some, weights=_weights(rng, len(some)), upsert=True)
            elif op == 3 and len(ids) > classes:
                mem.compact(budget=int(rng.integers(classes, len(ids) + 1)))
                ids = list(mem.ids())
    return counts


if __name__ == "__main__":  # the soak of make bench: python -m tests.tail.test_certificate MEMORIES [SEED]
    import json
    import sys

    from tqdm import tqdm

    total = {"memories": 0, "answers": 0}
    n, first = int(sys.argv[1]) if len(sys.argv) > 1 else 3000, int(sys.argv[2]) if len(sys.argv) > 2 else 100
    for seed in tqdm(range(first, first + -(-n // TRIALS)), desc="certificate", unit="seed", file=sys.stderr):
        for key, value in trials(seed, TRIALS).items():
            total[key] += value
    print(json.dumps(total))
