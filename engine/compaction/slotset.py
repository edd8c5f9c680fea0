"""The slots a compaction policy keeps or makes, and its progress bar."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SlotSet:
    """Columns of the slots a policy keeps or makes. ``source`` is the row a kept slot came
    from, or -1 for a new (merged) slot, which gets a fresh id."""

    vectors: np.ndarray
    weights: np.ndarray
    label_idx: np.ndarray
    source: np.ndarray
    kept: str | None = None  # which state a policy kept and why (distill), for the report


def progress(total: int, desc: str, unit: str):
    """A progress bar on a terminal for work that outlasts two seconds; nothing otherwise."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, delay=2.0, disable=None, leave=False)
