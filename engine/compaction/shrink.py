"""Compaction of a live memory: a request checked against the memory's options, the slots
compacted to the budget (:func:`shrink`), and the new state built aside (:func:`aside`)
while readers go on with the old one."""

from __future__ import annotations

import time

import numpy as np

from .. import checks
from ..errors import InvalidValueError
from ..ids import Counter
from ..metric import Metric
from ..options import MemoryOptions
from ..slots import SlotTable
from .distill import check_options
from .policies import compact


def check_request(memory: MemoryOptions, policy: str, seed: int, options: dict) -> int:
    """A compaction request checked against a memory's options; returns the seed.

    Raises:
        InvalidValueError: an unknown policy or option, or one out of range.
    """
    memory.check_policy(policy)
    seed = checks.integer("seed", seed, low=0)
    try:
        check_options(options)
    except ValueError as exc:
        raise InvalidValueError(str(exc)) from None
    return seed


def aside(state, live: SlotTable, vectors: np.ndarray, ids: Counter, *, budget: int | None, policy: str,
          metric: Metric, temperature: float, seed: int = 0, options: dict | None = None, keep_vectors: bool,
          required: bool = True):
    """``live`` compacted to ``budget`` and indexed like ``state`` (which readers go on using
    meanwhile): (the new state, or None when nothing was dropped or merged and nothing is
    ``required``; the slots kept; the policy's note; the new state's vectors). Merged slots
    take ids from ``ids``."""
    table, vectors, kept = shrink(live, vectors, budget=budget, policy=policy, metric=metric,
                                  temperature=temperature, seed=seed, options=options or {}, fresh_ids=ids.take,
                                  keep_vectors=keep_vectors, now=time.time())
    if not required and table.n_alive == live.n_alive:
        return None, table.n_alive, kept, vectors
    return state.rebuilt_from(table, vectors), table.n_alive, kept, vectors


def shrink(live: SlotTable, vectors: np.ndarray, *, budget: int | None, policy: str, metric: Metric,
           temperature: float, seed: int, options: dict, fresh_ids, keep_vectors: bool,
           now: float) -> tuple[SlotTable, np.ndarray, str | None]:
    """A new table of the slots ``live`` compacted to ``budget`` (None: all of them, renumbered),
    its vectors, and which state the policy kept and why (distill; else None).

    Kept slots keep their ids and usage times; merged ones take ids from ``fresh_ids(n)``
    and are written ``now``. ``live`` is not changed. ``vectors`` are as the index holds them
    (lifted for l2, see :mod:`engine.metric`): slots are merged as the caller wrote them.

    Raises:
        InvalidValueError: a budget below the number of classes, or a bad option.
    """
    table = SlotTable(live.dim, keep_vectors, live.track_usage)
    weights = live.weights
    note = None
    if budget is None or budget >= live.n_alive:
        table.append(live.ids, live.label_idx, None if live.unit_weights else weights, vectors,
                     live.used if live.track_usage else 0.0)
    else:
        classes = int((live.class_counts > 0).sum())
        if budget < classes:
            raise InvalidValueError(f"a budget of {budget} slots cannot keep {classes} classes (one slot each)")
        try:
            out = compact(metric.stored(vectors), np.array(weights), live.label_idx, live.used, budget=budget,
                          policy=policy, metric=metric.name, temperature=temperature, seed=seed, **options)
        except ValueError as exc:
            raise InvalidValueError(str(exc)) from None
        kept = out.source >= 0
        src = np.maximum(out.source, 0)
        ids = np.where(kept, live.ids[src], -1)
        ids[~kept] = fresh_ids(int((~kept).sum()))
        vectors = metric.slots(out.vectors)
        table.append(ids, out.label_idx, out.weights, vectors,
                     np.where(kept, live.used[src], now) if live.track_usage else 0.0)
        note = out.kept
    table.class_counts = np.pad(table.class_counts, (0, max(0, len(live.class_counts) - len(table.class_counts))))
    return table, vectors, note
