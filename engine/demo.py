"""``make demo``: a Fashion-MNIST memory answered by top-k attention.

Pixels are projected to 64 dimensions by PCA (``faiss.PCAMatrix``) until learned
Matching Networks embeddings replace them. The 60k training images become slots,
the 10k test images are classified by exact softmax attention over their top-k.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from .data import load_fashion_mnist
from .memory import Memory


def pca_embed(train: np.ndarray, test: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre-and-project both sets with a PCA fitted on ``train`` (pixels scaled to [0, 1])."""
    xtr = train.reshape(len(train), -1).astype(np.float32) / 255.0
    xte = test.reshape(len(test), -1).astype(np.float32) / 255.0
    pca = faiss.PCAMatrix(xtr.shape[1], dim)
    pca.train(xtr)
    return pca.apply(xtr), pca.apply(xte)


def run_demo(data=None, *, k: int = 64, dim: int = 64, temperature: float = 0.01, index: str = "Flat",
             limit: int | None = None, batch: int = 500, out: str | Path | None = "runs/demo",
             progress: bool = True, check: int = 1000) -> dict:
    """Build the memory, answer the test set, and report.

    Args:
        data: the data directory (default: ``$ENGINE_DATA`` or ``../shared/data``).
        k: slots per query.
        dim: PCA dimensions.
        temperature: attention temperature.
        index: FAISS index spec.
        limit: use only the first ``limit`` train and test images (smoke runs).
        batch: queries per batch.
        out: folder for ``demo.json`` (None: do not write).
        progress: show progress bars.
        check: how many test queries to compare with dense attention over every slot.

    Returns:
        The report: accuracy, median tail bound, queries per second, bytes used, ...
    """
    xtr, ytr = load_fashion_mnist(data, "train")
    xte, yte = load_fashion_mnist(data, "test")
    if limit:
        xtr, ytr, xte, yte = xtr[:limit], ytr[:limit], xte[:limit], yte[:limit]
    t0 = time.perf_counter()
    ztr, zte = pca_embed(xtr, xte, dim)
    embed_s = time.perf_counter() - t0

    mem = Memory(dim, index=index, temperature=temperature)
    t0 = time.perf_counter()
    for lo in tqdm(range(0, len(ztr), 10_000), desc="writing slots", unit="chunk", disable=not progress):
        mem.add(ztr[lo : lo + 10_000], ytr[lo : lo + 10_000])
    add_s = time.perf_counter() - t0

    predicted, bounds = [], []
    t0 = time.perf_counter()
    with tqdm(total=len(zte), desc="querying", unit="q", disable=not progress) as bar:
        for lo in range(0, len(zte), batch):
            res = mem.query(zte[lo : lo + batch], k=k)
            predicted.append(res.labels)
            bounds.append(res.tail_bound)
            bar.update(len(res))
    query_s = time.perf_counter() - t0
    predicted, bounds = np.concatenate(predicted), np.concatenate(bounds)
    agreement, tv = _against_full_attention(mem, ztr, ytr, zte[:check], k, temperature)
    stats = mem.stats()
    report = {
        "dataset": "fashion-mnist",
        "embedding": f"pca{dim}",
        "slots": stats.slots,
        "queries": int(len(zte)),
        "k": k,
        "temperature": temperature,
        "index": stats.index,
        "accuracy": float((predicted == yte).mean()),
        "tail_bound_median": float(np.median(bounds)),
        "tail_bound_p99": float(np.quantile(bounds, 0.99)),
        "full_attention_checked": int(min(check, len(zte))),
        "full_attention_argmax_agreement": agreement,
        "full_attention_tv_median": float(np.median(tv)),
        "full_attention_tv_max": float(np.max(tv)),
        "exact_bound": bool(stats.exact),
        "queries_per_s": float(len(zte) / query_s),
        "add_slots_per_s": float(stats.slots / add_s),
        "embed_s": embed_s,
        "bytes_total": stats.bytes_total,
        "bytes_per_slot": stats.bytes_total / stats.slots,
    }
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "demo.json").write_text(json.dumps(report, indent=2))
    return report


def _against_full_attention(mem: Memory, z: np.ndarray, y: np.ndarray, q: np.ndarray, k: int, temperature: float,
                            chunk: int = 250) -> tuple[float, np.ndarray]:
    """Top-k answers against dense softmax attention over all slots (float64): argmax agreement and TV."""
    zn = (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float64)
    classes = np.unique(y)
    agree, tv = [], []
    for lo in range(0, len(q), chunk):
        qc = q[lo : lo + chunk].astype(np.float64)
        logits = (qc / np.linalg.norm(qc, axis=1, keepdims=True)) @ zn.T / temperature
        a = np.exp(logits - logits.max(axis=1, keepdims=True))
        a /= a.sum(axis=1, keepdims=True)
        full = np.stack([a[:, y == c].sum(axis=1) for c in classes], axis=1)
        res = mem.query(q[lo : lo + chunk], k=k)
        top = np.zeros_like(full)
        top[:, np.searchsorted(classes, res.classes)] = res.probs
        agree.append(full.argmax(axis=1) == top.argmax(axis=1))
        tv.append(0.5 * np.abs(full - top).sum(axis=1))
    return float(np.concatenate(agree).mean()), np.concatenate(tv)
