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

from .. import checks
from ..errors import InvalidValueError

GRID = np.geomspace(1e-3, 1.0, 37)  # the temperatures tried
SAMPLE = 1000  # slots answered as queries
FALLBACK = 0.1  # what an "auto" memory uses before it can measure (fewer than MIN_SLOTS, one class)
MIN_SLOTS = 20
MAX_K, MAX_SAMPLE = 4096, 100_000  # of calibrate_temperature: its arrays are (sample, k)
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
    def from_dict(cls, d: dict | None) -> TemperatureReport | None:
        if not isinstance(d, dict):
            return None
        try:
            return cls(**{f: d[f] for f in cls.__dataclass_fields__})
        except (KeyError, TypeError):
            return None


def valid(t) -> bool:
    """Whether ``t`` is a temperature a memory takes."""
    try:
        checks.temperature(t)
    except InvalidValueError:
        return False
    return True


def due(last: TemperatureReport | None, slots: int) -> bool:
    """Whether an "auto" memory of ``slots`` chooses its temperature again: never chosen yet,
    or grown or shrunk 2x since ``last``."""
    return last is None or not last.slots / 2 < slots < 2 * last.slots


def calibrate(state, previous: float, *, metric=None, k: int = 64, sample: int = SAMPLE, seed: int = 0,
              grid: np.ndarray = GRID) -> TemperatureReport | None:
    """The temperature chosen on ``state``'s own slots (see the module), or None where there
    is nothing to measure: fewer than MIN_SLOTS slots, a single class, or too few slots with
    a neighbour. ``metric`` is the memory's :class:`~engine.metric.Metric` (None: cosine). For
    inner product the grid is scaled by the median top score, for l2 by ten times the median
    squared distance to the nearest other slot."""
    from ..query import search

    table = state.table
    live = table.live_rows()
    if len(live) < MIN_SLOTS or np.count_nonzero(table.class_counts) < 2:
        return None
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(live, min(sample, len(live)), replace=False))
    k = int(min(k, len(live) - 1))
    mine = np.ascontiguousarray(state.vectors(rows), dtype=np.float32)
    name = "cosine" if metric is None else metric.name
    q = mine if metric is None else np.ascontiguousarray(metric.slot_queries(mine), dtype=np.float32)
    wide = int(min(2 * k + 1, len(live)))
    scores, found = search(state, q, wide)
    # leave each query's own slot out, and its exact copies (a slot written twice would
    # answer itself at score 1 and push the choice to the sharpest temperature)
    if name == "l2":  # a copy is the same vector (scores are -|q - x|^2: no scale to be near 0 by)
        got = state.vectors(np.maximum(found, 0).ravel()).reshape(*found.shape, -1)
        twin = (found == rows[:, None]) | (got == mine[:, None, :]).all(axis=2)
    else:
        own = np.einsum("nd,nd->n", q.astype(np.float64), mine.astype(np.float64))  # what its own slot scores
        twin = (found == rows[:, None]) | \
            (np.abs(scores - own[:, None]) <= 1e-6 * np.maximum(1.0, np.abs(own))[:, None])
    keep = (found >= 0) & ~twin
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # the first k kept, in score order
    scores = np.take_along_axis(scores, order, 1).astype(np.float64)
    found = np.where(np.take_along_axis(keep, order, 1), np.take_along_axis(found, order, 1), -1)
    answered = (found >= 0).any(axis=1)  # a slot alone in what the search saw answers nothing
    if answered.sum() < MIN_SLOTS // 2:
        return None
    rows, scores, found = rows[answered], scores[answered], found[answered]
    valid = found >= 0
    safe = np.where(valid, found, 0)
    scores = np.where(valid, scores, -np.inf)
    log_w = np.where(valid, np.log(table.weights[safe]), -np.inf)
    labels = np.where(valid, table.label_idx[safe], -1)
    truth = table.label_idx[rows]
    same = labels == truth[:, None]
    # temperatures relative to the scores' own scale (1 for cosine; inner products may be large)
    if name == "ip":
        scale = float(np.median(np.abs(scores[:, 0])))
    elif name == "l2":  # -|q - x|^2: the squared distance to the nearest other slot
        scale = 10 * float(np.median(-scores[:, 0]))  # T up to 10x it
    else:
        scale = 1.0
    grid = np.asarray(grid) * max(scale, 1e-12)
    nll = np.array([_nll(scores, log_w, same, t) for t in grid])
    slot_class = _row_classes(labels)
    acc = np.array([_accuracy(scores, log_w, labels, slot_class, truth, t)[1] for t in grid])
    if not (np.isfinite(nll).all() and np.isfinite(acc).all()):
        return None
    # the most likely temperature among those that classify (nearly) as well as any
    fit = acc >= acc.max() - ACCURACY_SLACK
    at = int(np.argmin(np.where(fit, nll, np.inf)))
    best = float(grid[at])
    accuracy = acc[at]
    ece = _accuracy(scores, log_w, labels, slot_class, truth, best)[0]
    ece_prev = _accuracy(scores, log_w, labels, slot_class, truth, previous)[0]
    return TemperatureReport(temperature=best, previous=float(previous), nll=float(nll[at]),
                             nll_previous=_nll(scores, log_w, same, previous), ece=float(ece),
                             ece_previous=float(ece_prev), accuracy=float(accuracy), queries=len(rows), k=k,
                             slots=int(table.n_alive))


def _row_classes(labels: np.ndarray) -> np.ndarray:
    """(m, k) each slot's class numbered within its row (0 .. classes in the row - 1)."""
    order = np.argsort(labels, axis=1, kind="stable")
    sorted_ = np.take_along_axis(labels, order, 1)
    starts = np.concatenate([np.ones((len(labels), 1), bool), sorted_[:, 1:] != sorted_[:, :-1]], axis=1)
    rank = np.cumsum(starts, axis=1) - 1
    out = np.empty_like(rank)
    np.put_along_axis(out, order, rank, 1)
    return out


def _accuracy(scores, log_w, labels, slot_class, truth, t: float) -> tuple[float, float]:
    """(expected calibration error, accuracy) of the class of most attention."""
    a = _attention(scores, log_w, t)
    m, k = a.shape
    mass = np.zeros((m, k))
    np.add.at(mass, (np.repeat(np.arange(m), k), slot_class.ravel()), a.ravel())
    top = mass.argmax(axis=1)
    confidence = mass[np.arange(m), top]
    first = (slot_class == top[:, None]).argmax(axis=1)  # a slot of the top class gives its label
    correct = labels[np.arange(m), first] == truth
    bins = np.minimum((confidence * BINS).astype(int), BINS - 1)
    ece = 0.0
    for b in range(BINS):
        inside = bins == b
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(ece), float(correct.mean())


def _attention(scores, log_w, t: float) -> np.ndarray:
    logits = scores / t + log_w  # -inf where no slot (every row has one)
    logits -= logits.max(axis=1, keepdims=True)
    a = np.exp(logits)
    return a / a.sum(axis=1, keepdims=True)


def _nll(scores, log_w, same, t: float) -> float:
    own = (_attention(scores, log_w, t) * same).sum(axis=1)
    return float(-np.log(np.maximum(own, FLOOR)).mean())
