"""Checks at the boundary: every value a caller hands a memory, refused with a clear
:class:`~engine.errors.InvalidValueError` (or :class:`~engine.errors.DimensionError`)
before anything is written. Inside the engine, checked values are trusted.

The numeric limits keep attention finite in float64 and ``tail_bound`` an upper
bound: inner products stay below 1e30 (|q.z| <= |q||z|), logits below 1e36, and
the total mass of any memory below 1e45.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import DimensionError, EmptyMemoryError, InvalidValueError

INT64_MAX = int(np.iinfo(np.int64).max)
MAX_NORM = 1e15  # inner-product metric: the largest vector norm
MAX_L2_NORM = 1e7  # l2 metric: lifted slots (x, |x|^2) then stay within MAX_NORM (see engine.metric)
MAX_WEIGHT = 1e30
TEMPERATURE_RANGE = (1e-6, 1e6)


def untensor(x):
    """A torch tensor (on any device, with or without grad) as a numpy array; anything else
    as it is. torch is never imported here: a tensor is known by its methods."""
    if not isinstance(x, np.ndarray) and hasattr(x, "detach") and hasattr(x, "cpu") and hasattr(x, "numpy"):
        x = x.detach().cpu()
        try:
            return x.numpy()
        except TypeError:  # a dtype numpy lacks (bfloat16): as float32
            return x.float().numpy()
    return x


def vectors(x, dim: int, metric: str, what: str = "vectors", *, allow_empty: bool = False) -> np.ndarray:
    """(n, dim) finite real vectors as C-contiguous float32; L2-normalised for cosine.

    A (dim,) vector is one row; with ``allow_empty`` an empty sequence is zero rows. A torch
    tensor is read as its values (detached).
    """
    if type(x) is np.ndarray and x.shape == (dim,) and x.dtype.kind == "f":  # one query: the hot path
        return _one_vector(x, metric, what)
    x = untensor(x)
    raw = x if isinstance(x, np.ndarray) else None
    try:
        if raw is None:
            raw = np.asarray(x)
        a = raw.astype(np.float32, copy=False) if raw.dtype.kind in "biufO" else None
    except (TypeError, ValueError) as exc:
        raise InvalidValueError(f"{what} must be real numbers: {exc}") from None
    if a is None:
        raise InvalidValueError(f"{what} must be real numbers: dtype {raw.dtype}")
    if a.ndim == 1:
        a = a.reshape(0, dim) if allow_empty and a.shape == (0,) else a[None, :]
    if a.ndim != 2 or a.shape[1] != dim:
        raise DimensionError(f"{what} must have shape (n, {dim}), got {np.shape(x)}")
    if len(a) == 0:
        if allow_empty:
            return np.empty((0, dim), np.float32)
        raise InvalidValueError(f"{what} is empty")
    # squared norms in float64: finite exactly when every value is (no float32 overflow)
    sq = np.einsum("ij,ij->i", a, a, dtype=np.float64)
    if not np.isfinite(sq).all():
        bad = ~np.isfinite(a).all(axis=1)
        raise InvalidValueError(f"{what} contain NaN or inf (rows {np.flatnonzero(bad)[:10].tolist()})")
    if metric == "cosine":
        if not sq.all():
            raise InvalidValueError(f"{what} contain zero vectors, which have no cosine similarity "
                                    f"(rows {np.flatnonzero(sq == 0)[:10].tolist()})")
        return np.ascontiguousarray(a / np.sqrt(sq)[:, None], dtype=np.float32)
    limit = MAX_L2_NORM if metric == "l2" else MAX_NORM
    if (sq > limit**2).any():
        raise InvalidValueError(f"{what} have norms above {limit:g} (rows "
                                f"{np.flatnonzero(sq > limit**2)[:10].tolist()}): their "
                                f"{'squared distances' if metric == 'l2' else 'inner products'} would overflow float32")
    return np.ascontiguousarray(a, dtype=np.float32)


def _one_vector(x: np.ndarray, metric: str, what: str) -> np.ndarray:
    """:func:`vectors` for one float (dim,) vector, with the same checks in fewer steps."""
    if x.dtype == np.float32:
        a = x
        a64 = x.astype(np.float64)
    else:  # rounded to float32 first, as the batch path does
        a = x.astype(np.float32)
        a64 = a.astype(np.float64)
    sq = float(a64 @ a64)
    if not math.isfinite(sq):
        raise InvalidValueError(f"{what} contain NaN or inf (rows [0])")
    if metric == "cosine":
        if sq == 0:
            raise InvalidValueError(f"{what} contain zero vectors, which have no cosine similarity (rows [0])")
        return (a64 / math.sqrt(sq)).astype(np.float32)[None, :]
    limit = MAX_L2_NORM if metric == "l2" else MAX_NORM
    if sq > limit**2:
        raise InvalidValueError(f"{what} have norms above {limit:g} (rows [0]): their "
                                f"{'squared distances' if metric == 'l2' else 'inner products'} would overflow float32")
    return a[None, :]


def weights(w, n: int) -> np.ndarray:
    """n slot masses in (0, MAX_WEIGHT], float64 (all 1 when ``w`` is None)."""
    if w is None:
        return np.ones(n, np.float64)
    raw = np.asarray(untensor(w))
    if raw.dtype.kind not in "iuf" or raw.ndim > 1:
        raise InvalidValueError(f"weights must be a 1-d sequence of real numbers, got {raw.dtype} "
                                f"of shape {raw.shape}")
    out = raw.astype(np.float64).reshape(-1)
    if len(out) != n:
        raise InvalidValueError(f"{n} vectors but {len(out)} weights")
    if not np.isfinite(out).all() or (out <= 0).any() or (out > MAX_WEIGHT).any():
        raise InvalidValueError(f"weights must be finite, > 0 and <= {MAX_WEIGHT:g}")
    return out


def ids(x) -> np.ndarray:
    """A 1-d int64 array of ids in [0, 2**63) (one id may be given bare)."""
    if isinstance(x, (bool, np.bool_)):
        raise InvalidValueError("ids must be integers, got a bool")
    try:
        a = np.asarray(untensor(x))
    except (TypeError, ValueError) as exc:
        raise InvalidValueError(f"ids must be integers: {exc}") from None
    if a.ndim == 0:
        a = a[None]
    if a.dtype.kind == "O" and a.ndim == 1 and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                                  for v in a.tolist()):
        raise InvalidValueError("ids must fit int64 (be in [0, 2**63))")
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise InvalidValueError(f"ids must be a 1-d sequence of integers, got {a.dtype} of shape {a.shape}")
    if a.dtype.kind == "u" and a.size and a.max() > INT64_MAX:
        raise InvalidValueError("ids must fit int64 (be in [0, 2**63))")
    a = a.astype(np.int64)
    if (a < 0).any():
        raise InvalidValueError("ids must be non-negative")
    return a


def temperature(t) -> float:
    """A softmax temperature within TEMPERATURE_RANGE, as a float."""
    if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, float, np.integer, np.floating)):
        raise InvalidValueError(f"temperature must be a number, got {t!r}")
    t = float(t)
    lo, hi = TEMPERATURE_RANGE
    if not math.isfinite(t) or not lo <= t <= hi:
        raise InvalidValueError(f"temperature must be in [{lo:g}, {hi:g}], got {t}")
    return t


def integer(name: str, value: Any, *, low: int = 1) -> int:
    """An int >= ``low`` (bools refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < low:
        raise InvalidValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def optional_integer(name: str, value: Any, *, low: int = 1) -> int | None:
    """None, or an int >= ``low`` (bools refused)."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < low:
        raise InvalidValueError(f"{name} must be an integer >= {low} or None, got {value!r}")
    return int(value)


def fraction(name: str, value, *, low: float, high: float, closed_low: bool = True) -> float:
    """A real number in [low, high) (or (low, high) when not ``closed_low``)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidValueError(f"{name} must be a number, got {value!r}")
    ok = (low <= value if closed_low else low < value) and value < high
    if not ok:
        raise InvalidValueError(f"{name} must be in {'[' if closed_low else '('}{low}, {high}), got {value!r}")
    return float(value)


def centre(value, dim: int, metric: str) -> np.ndarray | None:
    """An l2 memory's centre: None, or ``dim`` finite numbers within the l2 norm limit."""
    if value is None:
        return None
    if metric != "l2":
        raise InvalidValueError(f"a centre is for metric='l2' only, not {metric!r}")
    try:
        c = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        raise InvalidValueError(f"centre must be {dim} numbers") from None
    if c.shape != (dim,) or not np.isfinite(c).all() or float(np.linalg.norm(c)) > MAX_L2_NORM:
        raise InvalidValueError(f"centre must be {dim} finite numbers of norm at most {MAX_L2_NORM:g}")
    return c.astype(np.float32)


def not_empty(slots: int, what: str) -> None:
    """Refuse an operation on a memory with no slots (EmptyMemoryError saying ``what`` to do)."""
    if slots == 0:
        raise EmptyMemoryError(f"the memory is empty: {what}")
