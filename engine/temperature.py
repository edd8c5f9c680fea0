"""A memory's temperature chosen on its own slots: leave-one-out log-likelihood.

A temperature learned on 50-slot episodes is too soft for a 60k-slot memory, and a
hand-set one fits one memory only. ``Memory(temperature="auto")`` answers each of a
sample of its own slots as a query, with that slot left out (a test query is not in
memory either). Of a log-spaced grid it keeps, among the temperatures whose top class is
right (nearly) as often as under any, the one under which the slot's own class is most
probable on average: the smallest negative log-likelihood of top-k attention. (The
likelihood alone can prefer a temperature sharper than the best classifier's.) The
answer is reported with its expected calibration error, next to the temperature it
replaces.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

GRID = np.geomspace(1e-3, 1.0, 37)  # the temperatures tried
SAMPLE = 1000  # slots answered as queries
FALLBACK = 0.1  # what an "auto" memory uses before it can measure (fewer than MIN_SLOTS, one class)
MIN_SLOTS = 20
FLOOR = 1e-6  # the least probability a query's own class is given (its class may be outside the top-k)
ACCURACY_SLACK = 0.002  # temperatures within this of the best leave-one-out accuracy are considered
BINS = 15  # of the expected calibration error


@dataclass(frozen=True)
class TemperatureReport:
    """What choosing a temperature measured (:meth:`engine.Memory.calibrate_temperature`).

    Attributes:
        temperature: the temperature chosen.
        previous: the one it replaces.
        nll, nll_previous: mean negative log-likelihood of each sampled slot's own class,
            its slot left out, under each.
        ece, ece_previous: expected calibration error (15 bins of the top class's
            probability) under each.
        accuracy: how often the top class is the slot's own, under the chosen one.
        queries: slots answered; k: slots each attended over; slots: the memory's size then.
    """

    temperature: float
    previous: float
    nll: float
    nll_previous: float
    ece: float
    ece_previous: float
    accuracy: float
    queries: int
    k: int
    slots: int

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "TemperatureReport | None":
        if not isinstance(d, dict):
            return None
        try:
            return cls(**{f: d[f] for f in cls.__dataclass_fields__})
        except (KeyError, TypeError):
            return None


def calibrate(state, previous: float, *, k: int = 64, sample: int = SAMPLE, seed: int = 0,
              grid: np.ndarray = GRID) -> TemperatureReport | None:
    """The grid temperature of least leave-one-out NLL on ``state``'s own slots (None if the
    memory has fewer than MIN_SLOTS slots or a single class)."""
    from .query import search

    table = state.table
    live = table.live_rows()
    if len(live) < MIN_SLOTS or np.count_nonzero(table.class_counts) < 2:
        return None
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(live, min(sample, len(live)), replace=False))
    k = int(min(k, len(live) - 1))
    q = np.ascontiguousarray(state.vectors(rows), dtype=np.float32)
    scores, found = search(state, q, k + 1)
    # leave each query's own slot out (the last one if the search did not return it)
    own = found == rows[:, None]
    drop = np.where(own.any(axis=1), own.argmax(axis=1), k)
    keep = np.ones_like(own)
    keep[np.arange(len(rows)), drop] = False
    scores = scores[keep].reshape(len(rows), k).astype(np.float64)
    found = found[keep].reshape(len(rows), k)
    valid = found >= 0
    safe = np.where(valid, found, 0)
    log_w = np.where(valid, np.log(table.weights[safe]), -np.inf)
    labels = np.where(valid, table.label_idx[safe], -1)
    same = labels == table.label_idx[rows][:, None]
    nll = np.array([_nll(scores, log_w, same, t) for t in grid])
    slot_class = _row_classes(labels)
    acc = np.array([_accuracy(scores, log_w, labels, slot_class, table.label_idx[rows], t) for t in grid])
    # the most likely temperature among those that classify (nearly) as well as any
    fit = acc >= acc.max() - ACCURACY_SLACK
    best = float(grid[int(np.argmin(np.where(fit, nll, np.inf)))])
    ece, acc = _ece(scores, log_w, labels, table.label_idx[rows], best)
    ece_prev, _ = _ece(scores, log_w, labels, table.label_idx[rows], previous)
    return TemperatureReport(temperature=best, previous=float(previous), nll=float(nll.min()),
                             nll_previous=_nll(scores, log_w, same, previous), ece=ece, ece_previous=ece_prev,
                             accuracy=acc, queries=len(rows), k=k, slots=int(table.n_alive))


def _row_classes(labels: np.ndarray) -> np.ndarray:
    """(m, k) each slot's class numbered within its row (0 .. classes in the row - 1)."""
    order = np.argsort(labels, axis=1, kind="stable")
    sorted_ = np.take_along_axis(labels, order, 1)
    starts = np.concatenate([np.ones((len(labels), 1), bool), sorted_[:, 1:] != sorted_[:, :-1]], axis=1)
    rank = np.cumsum(starts, axis=1) - 1
    out = np.empty_like(rank)
    np.put_along_axis(out, order, rank, 1)
    return out


def _accuracy(scores, log_w, labels, slot_class, truth, t: float) -> float:
    """How often the class of most attention is the query's own."""
    a = _attention(scores, log_w, t)
    m, k = a.shape
    mass = np.zeros((m, k))
    np.add.at(mass, (np.repeat(np.arange(m), k), slot_class.ravel()), a.ravel())
    top = mass.argmax(axis=1)
    first = (slot_class == top[:, None]).argmax(axis=1)  # a slot of the top class gives its label
    return float((labels[np.arange(m), first] == truth).mean())


def _attention(scores, log_w, t: float) -> np.ndarray:
    logits = scores / t + log_w
    logits -= logits.max(axis=1, keepdims=True)
    a = np.exp(logits)
    return a / a.sum(axis=1, keepdims=True)


def _nll(scores, log_w, same, t: float) -> float:
    own = (_attention(scores, log_w, t) * same).sum(axis=1)
    return float(-np.log(np.maximum(own, FLOOR)).mean())


def _ece(scores, log_w, labels, truth, t: float) -> tuple[float, float]:
    """(expected calibration error, accuracy) of the top class of top-k attention."""
    a = _attention(scores, log_w, t)
    per_slot = ((labels[:, :, None] == labels[:, None, :]) * a[:, None, :]).sum(axis=2)  # its class's share
    per_slot = np.where(labels >= 0, per_slot, -1.0)
    top = per_slot.argmax(axis=1)
    confidence = per_slot[np.arange(len(top)), top]
    correct = labels[np.arange(len(top)), top] == truth
    bins = np.minimum((confidence * BINS).astype(int), BINS - 1)
    ece = 0.0
    for b in range(BINS):
        inside = bins == b
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(ece), float(correct.mean())
