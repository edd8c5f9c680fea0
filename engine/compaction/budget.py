"""Budgets: a budget in slots (bytes read against what a slot takes) and its split among
classes, in proportion to class mass with at least one slot each (water-filling)."""

from __future__ import annotations

import numpy as np

from ..errors import InvalidValueError
from ..options import parse_budget

__all__ = ["allocate", "parse_budget"]


def allocate(class_mass: np.ndarray, class_count: np.ndarray, budget: int) -> np.ndarray:
    """Slots per class: at least 1, at most the class's count, the rest of ``budget`` shared by mass.

    Raises:
        ValueError: the budget is below the number of classes.
    """
    n = len(class_mass)
    if budget < n:
        raise InvalidValueError(f"a budget of {budget} slots cannot keep {n} classes (at least one slot each)")
    alloc = np.ones(n, np.int64)
    remaining = int(min(budget, class_count.sum()) - n)
    while remaining > 0:  # water-filling: classes that are full give their share to the others
        room = class_count - alloc
        share = np.where(room > 0, class_mass, 0.0)
        share = share / share.sum() * remaining
        add = np.minimum(np.floor(share).astype(np.int64), room)
        if add.sum() == 0:  # what is left is smaller than any share: largest fractions first
            order = [i for i in np.argsort(-share, kind="stable") if room[i] > 0][:remaining]
            add[order] = 1
        alloc += add
        remaining -= int(add.sum())
    return alloc
