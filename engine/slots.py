"""The slot table: columnar storage of (id, label, weight, vector) rows.

Row r is FAISS position r. Rows are appended, tombstoned on removal and
renumbered only by :meth:`SlotTable.compacted`, which the memory calls when it
rebuilds its index.

A slot pays only for what its memory uses:

- id (8 bytes), label index (4), tombstone flag (1): always;
- the id -> row map (16): only once ids stop ascending with rows (a caller wrote
  its own ids out of order); until then the id column is its own sorted map;
- weight (8): only once a weight other than 1 was written;
- ``used`` (8), the time the slot was last written or retrieved: only when the
  memory tracks usage (the "age" compaction policy reads it);
- a float32 vector: only when asked (``keep_vectors``). When the index stores
  vectors exactly (Flat, IVF-Flat, HNSW-Flat) the index is their one copy, and
  the memory reads them back from it.
"""

from __future__ import annotations

import numpy as np


class Growable:
    """A numpy array with amortised O(1) appends (capacity grows by half)."""

    def __init__(self, dtype, width: int | None = None):
        self._shape = () if width is None else (width,)
        self._buf = np.empty((16,) + self._shape, dtype=dtype)
        self.n = 0

    def extend(self, values: np.ndarray) -> None:
        m = len(values)
        if self.n + m > len(self._buf):
            cap = max(int(1.5 * len(self._buf)), self.n + m)
            buf = np.empty((cap,) + self._shape, dtype=self._buf.dtype)
            buf[: self.n] = self._buf[: self.n]
            self._buf = buf
        self._buf[self.n : self.n + m] = values
        self.n += m

    @property
    def view(self) -> np.ndarray:
        return self._buf[: self.n]

    @property
    def nbytes(self) -> int:
        return int(self._buf.nbytes)


def _column(name: str) -> property:
    """A read-only property: the live view of the growable column ``name``."""
    return property(lambda self: getattr(self, name).view)


class SlotTable:
    """Rows of slots, with tombstones and an id -> row map.

    Args:
        dim: vector dimension.
        keep_vectors: keep a float32 vector column (else vectors passed to append are not stored).
        track_usage: keep the ``used`` time column.
    """

    def __init__(self, dim: int, keep_vectors: bool = True, track_usage: bool = True):
        self.dim = dim
        self.keep_vectors = keep_vectors
        self.track_usage = track_usage
        self._ids = Growable(np.int64)
        self._label_idx = Growable(np.int32)
        self._weights: Growable | None = None  # None while every weight is 1
        self._vectors = Growable(np.float32, dim) if keep_vectors else None
        self._alive = Growable(np.bool_)
        self._used = Growable(np.float64) if track_usage else None  # unix time last written or retrieved
        # ids of live rows, ascending, and their rows: None while the id column ascends
        self._sorted_ids: np.ndarray | None = None
        self._sorted_rows: np.ndarray | None = None
        # ids as arithmetic in rows, id = first + step * row, while they are (automatic ids
        # are): reads then compute ids instead of gathering them. step None: not yet known.
        self._id_run: tuple[int, int | None] | None = (0, None)
        self.n_alive = 0
        self.total_weight = 0.0  # mass of the live slots, kept up to date by append and kill
        self.weight_error = 0.0  # a bound on the rounding error of total_weight
        self.class_counts = np.zeros(0, np.int64)  # live slots per label index

    # columns (views; valid until the next append)
    ids = _column("_ids")
    label_idx = _column("_label_idx")
    alive = _column("_alive")

    @property
    def unit_weights(self) -> bool:
        """Every row was written with weight 1 (attention can skip the masses)."""
        return self._weights is None

    @property
    def weights(self) -> np.ndarray:
        """The weight column (read-only ones while every weight is 1)."""
        if self._weights is None:
            return np.broadcast_to(np.float64(1.0), (self.n_rows,))
        return self._weights.view

    @property
    def used(self) -> np.ndarray | None:
        """When each row was last written or retrieved (unix time); None if usage is not tracked."""
        return self._used.view if self._used is not None else None

    @property
    def n_rows(self) -> int:
        return self._ids.n

    @property
    def vectors(self) -> np.ndarray:
        """The vector column; only for a table that keeps vectors."""
        if self._vectors is None:
            raise AttributeError("this slot table keeps no vectors: read them from the index")
        return self._vectors.view

    @property
    def sorted_ids(self) -> np.ndarray:
        """The ids of the live rows, ascending."""
        if self._sorted_ids is None:
            return self.ids[self.alive] if self.n_dead else self.ids
        return self._sorted_ids

    def sorted_ids_of(self, label_idx: np.ndarray) -> np.ndarray:
        """The ids of the live rows whose label index is in ``label_idx``, ascending."""
        rows = np.flatnonzero(np.isin(self.label_idx, label_idx) & self.alive)
        return np.sort(self.ids[rows])

    def max_id(self) -> int:
        """The largest live id, -1 if none."""
        ids = self.sorted_ids
        return int(ids[-1]) if len(ids) else -1

    @property
    def n_dead(self) -> int:
        return self.n_rows - self.n_alive

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id, -1 where the id is not live."""
        out = np.full(len(ids), -1, np.int64)
        keys, rows = (self.ids, None) if self._sorted_ids is None else (self._sorted_ids, self._sorted_rows)
        if len(keys) == 0:
            return out
        pos = np.minimum(np.searchsorted(keys, ids), len(keys) - 1)
        found = keys[pos] == ids
        if rows is None:
            found &= self.alive[pos]
            out[found] = pos[found]
        else:
            out[found] = rows[pos[found]]
        return out

    def append(self, ids: np.ndarray, label_idx: np.ndarray, weights: np.ndarray | None, vectors: np.ndarray | None,
               used: np.ndarray | float = 0.0) -> None:
        """Append live rows. The ids must not be live already; ``weights`` None means all 1."""
        m = len(ids)
        start = self.n_rows
        ascending = bool(m == 0 or ((start == 0 or ids[0] > self.ids[-1]) and (np.diff(ids) > 0).all()))
        if self._sorted_ids is None and not ascending:  # ids out of order from here on: keep a map
            live = self.alive.copy()
            self._sorted_ids, self._sorted_rows = self.ids[live], np.flatnonzero(live)
        unit = weights is None or bool(np.all(weights == 1.0))
        if self._weights is None and not unit:
            self._weights = Growable(np.float64)
            self._weights.extend(np.ones(start))
        self._extend_id_run(ids, start)
        self._ids.extend(ids)
        self._label_idx.extend(label_idx)
        if self._weights is not None:
            self._weights.extend(np.ones(m) if weights is None else weights)
        if self._vectors is not None:
            self._vectors.extend(vectors)
        self._alive.extend(np.ones(m, bool))
        if self._used is not None:
            self._used.extend(np.broadcast_to(np.asarray(used, np.float64), (m,)))
        if self._sorted_ids is not None:
            self._map(ids, np.arange(start, start + m, dtype=np.int64))
        self.n_alive += m
        self._add_weight(float(m) if unit else float(np.sum(weights)), m)
        self._count(label_idx, +1)

    def ids_of(self, rows: np.ndarray) -> np.ndarray:
        """Ids of rows (no padding): computed while the ids run arithmetically, else gathered
        (a cache miss per row of a large table, which a read of many rows feels)."""
        run = self._id_run
        if run is not None and run[1] is not None:
            return rows * run[1] + run[0]
        return self.ids[rows]

    def _extend_id_run(self, ids: np.ndarray, start: int) -> None:
        run, m = self._id_run, len(ids)
        if run is None or m == 0:
            return
        first, step = (int(ids[0]), None) if start == 0 else run
        if step is None and start + m > 1:
            step = int(ids[1] - ids[0]) if start == 0 else int(ids[0]) - first
        if step is not None and (step <= 0 or not np.array_equal(
                ids - first, step * np.arange(start, start + m, dtype=np.int64))):
            self._id_run = None
            return
        self._id_run = (first, step)

    def _map(self, ids: np.ndarray, rows: np.ndarray) -> None:
        order = np.argsort(ids, kind="stable")
        new_ids, new_rows = ids[order], rows[order]
        if len(self._sorted_ids) == 0 or new_ids[0] > self._sorted_ids[-1]:
            self._sorted_ids = np.concatenate([self._sorted_ids, new_ids])
            self._sorted_rows = np.concatenate([self._sorted_rows, new_rows])
        else:
            all_ids = np.concatenate([self._sorted_ids, new_ids])
            merge = np.argsort(all_ids, kind="stable")
            self._sorted_ids = all_ids[merge]
            self._sorted_rows = np.concatenate([self._sorted_rows, new_rows])[merge]

    def kill(self, rows: np.ndarray) -> None:
        """Tombstone live rows."""
        if len(rows) == 0:
            return
        self.alive[rows] = False
        if self._sorted_ids is not None:
            drop = np.searchsorted(self._sorted_ids, self.ids[rows])
            self._sorted_ids = np.delete(self._sorted_ids, drop)
            self._sorted_rows = np.delete(self._sorted_rows, drop)
        self.n_alive -= len(rows)
        self._add_weight(-(float(len(rows)) if self.unit_weights else float(self.weights[rows].sum())), len(rows))
        self._count(self.label_idx[rows], -1)

    def touch(self, rows: np.ndarray, now: float) -> None:
        """Stamp rows as retrieved at ``now`` (if usage is tracked)."""
        if self._used is not None:
            self._used.view[rows] = now

    def _add_weight(self, delta: float, m: int) -> None:
        """Update the running total mass and a bound on its rounding error; when the bound grows
        past a millionth of the total (mixed magnitudes, many removals), sum afresh."""
        eps = np.finfo(np.float64).eps
        before = self.total_weight
        self.total_weight = before + delta
        self.weight_error += (m + 2) * eps * (abs(before) + abs(delta))
        if self.weight_error > 1e-6 * abs(self.total_weight) or self.total_weight <= 0:
            live = self.weights[self.alive]
            self.total_weight = float(np.sum(live))
            self.weight_error = (len(live) + 2) * eps * self.total_weight

    def _count(self, label_idx: np.ndarray, sign: int) -> None:
        top = int(label_idx.max()) + 1 if len(label_idx) else 0
        if top > len(self.class_counts):
            self.class_counts = np.concatenate([self.class_counts, np.zeros(top - len(self.class_counts), np.int64)])
        self.class_counts = self.class_counts + sign * np.bincount(label_idx, minlength=len(self.class_counts))

    def live_rows(self, drop_rows: np.ndarray | None = None) -> np.ndarray:
        """The live rows, less ``drop_rows``, ascending: the rows :meth:`compacted` keeps."""
        keep = self.alive.copy()
        if drop_rows is not None and len(drop_rows):
            keep[drop_rows] = False
        return np.flatnonzero(keep)

    def compacted(self, drop_rows: np.ndarray | None = None, keep_vectors: bool | None = None) -> SlotTable:
        """A new table holding the live rows (less ``drop_rows``), renumbered from 0.

        Args:
            drop_rows: live rows to leave out as well.
            keep_vectors: whether the new table keeps vectors (default: as this one);
                it can only if this one does.
        """
        keep = self.live_rows(drop_rows)
        new = SlotTable(self.dim, self.keep_vectors if keep_vectors is None else keep_vectors, self.track_usage)
        if len(keep):
            new.append(self.ids[keep], self.label_idx[keep], None if self.unit_weights else self.weights[keep],
                       self.vectors[keep] if new.keep_vectors else None,
                       self.used[keep] if self.track_usage else 0.0)
        new.class_counts = np.pad(new.class_counts, (0, max(0, len(self.class_counts) - len(new.class_counts))))
        return new

    @property
    def nbytes_vectors(self) -> int:
        return self._vectors.nbytes if self._vectors is not None else 0

    @property
    def nbytes_ids(self) -> int:
        """Bytes of ids, the id map, labels, weights, tombstones and usage times."""
        parts = [p for p in (self._ids, self._label_idx, self._weights, self._alive, self._used) if p is not None]
        held = sum(p.nbytes for p in parts)
        if self._sorted_ids is not None:
            held += int(self._sorted_ids.nbytes + self._sorted_rows.nbytes)
        return held
