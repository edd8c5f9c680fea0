"""The memory's state: the slot table, the FAISS index over it, and what is derived from them.

A :class:`State` is what a query reads. The memory holds one; a write that
rebuilds builds a new one aside (:meth:`State.rebuilt`, :meth:`State.rebuilt_from`)
while readers go on with the old one, and swaps it in whole. Small writes change
the current state in place, under the memory's exclusive lock, through
:meth:`State.apply`; either way the class columns are recomputed after the change.
"""

from __future__ import annotations

import threading

import numpy as np

from . import checks
from .errors import CorruptFileError, InvalidValueError, UnknownLabelError
from .ids import known
from .index import VectorIndex
from .labels import Vocabulary
from .locks import RWLock
from .options import parse_budget
from .results import MemoryStats
from .slots import SlotTable
from .store.codec import Columns
from .tail import Cells

# Rebuild (drop tombstones, renumber rows) once this fraction of rows is dead.
MAX_DEAD_FRACTION = 0.25


class State:
    """A slot table and its index (row r of the table is FAISS position r)."""

    def __init__(self, table: SlotTable, index: VectorIndex):
        self.table = table
        self.index = index
        self._classes: tuple | None = None
        self._last_classes: tuple | None = None  # kept across writes: reused while the classes are the same
        self._cells: Cells | None = None  # built when a full answer first needs them
        self._cells_lock = threading.Lock()
        self._row_columns: tuple | None = None

    # -- reads ------------------------------------------------------------------------
    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """Vectors of table rows: from the table if it keeps them, else read back from the index."""
        if self.table.keep_vectors:
            return self.table.vectors[rows]
        return self.index.reconstruct(rows)

    def classes(self, vocab: Vocabulary) -> tuple[np.ndarray, np.ndarray]:
        """(the live classes in vocabulary order, i.e. the columns of ``probs``; the column of
        each label index, -1 for a class with no live slot). Cached until the state changes."""
        cached = self._classes
        if cached is None or len(cached[1]) != len(vocab):
            present = np.flatnonzero(self.table.class_counts > 0)
            last = self._last_classes
            if last is not None and len(last[1]) == len(vocab) and np.array_equal(last[2], present):
                cached = last  # a write that changed no class: the same arrays (a server's class list stays valid)
            else:
                columns = np.full(len(vocab), -1, np.int64)
                columns[present] = np.arange(len(present))
                cached = (vocab.array(present), columns, present)
            self._classes = self._last_classes = cached
        return cached[:2]

    def cells(self, metric: str) -> Cells:
        """The cells the full answer estimates by (:mod:`engine.tail`): built on first use (one
        pass over the vectors, the IVF lists read for the cells), then kept up to date by
        :meth:`apply`. A rebuilt state builds its own."""
        built = self._cells
        if built is None or built.stale(self.table.n_alive):
            with self._cells_lock:
                built = self._cells
                if built is None or built.stale(self.table.n_alive):
                    t, index = self.table, self.index
                    row_cells = index.row_cells()
                    built = self._cells = Cells.of(
                        index.dim, metric, t.n_rows, t.live_rows(), t.label_idx, t.weights, self.vectors,
                        index_cells=None if row_cells is None else (row_cells, index.centroids(), index.cells))
        return built

    @property
    def cells_nbytes(self) -> int:
        """Bytes of the cells (0 until built)."""
        built = self._cells
        return built.nbytes if built is not None else 0

    def row_columns(self, columns: np.ndarray) -> np.ndarray:
        """The probs column of every row's class (``columns`` from :meth:`classes`), cached
        until the state changes."""
        cached = self._row_columns
        if cached is None or cached[0] is not columns or len(cached[1]) != self.table.n_rows:
            cached = self._row_columns = (columns, np.ascontiguousarray(columns[self.table.label_idx], np.int64))
        return cached[1]

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id, -1 where the id is not live."""
        return self.table.rows_of(ids)

    def ids(self, vocab: Vocabulary, labels=None) -> np.ndarray:
        """Every live slot's id, ascending; with ``labels``, of the slots of those labels (one
        with no slot adds none)."""
        if labels is None:
            return self.table.sorted_ids.copy()
        codes = vocab.find(labels)[1]
        return self.table.sorted_ids_of(np.unique(codes[codes >= 0]))

    def slots(self, vocab: Vocabulary, ids: np.ndarray) -> tuple[list, np.ndarray, np.ndarray]:
        """The labels, weights and vectors (as the index holds them) of ``ids``; UnknownIdError
        listing the ids that are not live."""
        rows = self.rows_or_raise(ids)
        return vocab.values(self.table.label_idx[rows]), self.table.weights[rows].copy(), self.vectors(rows)

    def holds(self, id_) -> bool:
        """Whether ``id_`` (anything) is a live slot's id."""
        if isinstance(id_, bool) or not isinstance(id_, (int, np.integer)):
            return False
        return bool(self.rows_of(np.array([id_], np.int64))[0] >= 0)

    def ids_of_labels(self, vocab: Vocabulary, labels) -> np.ndarray:
        """The ids of every slot of ``labels``; UnknownLabelError listing labels with no slot."""
        values, codes = vocab.find(labels)
        counts = self.table.class_counts
        absent = list(dict.fromkeys(v for v, c in zip(values, codes) if not 0 <= c < len(counts) or counts[c] == 0))
        if absent:
            raise UnknownLabelError(f"labels with no slot: {absent[:10]}{' ...' if len(absent) > 10 else ''}", absent)
        return self.table.sorted_ids_of(np.unique(codes))

    def rows_or_raise(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id; UnknownIdError listing the ids that are not live."""
        rows = self.table.rows_of(ids)
        known(ids, rows >= 0)
        return rows

    def columns(self, vocab: Vocabulary, rows: np.ndarray | None = None) -> Columns:
        """Rows (default: every live row) as persistence columns."""
        t = self.table
        rows = t.live_rows() if rows is None else rows
        return Columns(t.ids[rows], vocab.values(t.label_idx[rows]), t.weights[rows], self.vectors(rows),
                       t.used[rows] if t.track_usage else np.zeros(len(rows)))

    def snapshot(self, vocab: Vocabulary, vectors: np.ndarray | None = None) -> Columns:
        """Every live row as a snapshot keeps it: the index's own codes when it holds only
        compressed codes, else the vectors (``vectors``, if the caller
        has them, are those of the live rows in order)."""
        t = self.table
        rows = t.live_rows()
        used = t.used[rows] if t.track_usage else np.zeros(len(rows))
        labels = vocab.values(t.label_idx[rows])
        if self.index.codes_only and not t.keep_vectors:
            codebook, codes = self.index.codes()
            return Columns(t.ids[rows], labels, t.weights[rows], None, used, codes[rows], codebook)
        return Columns(t.ids[rows], labels, t.weights[rows], self.vectors(rows) if vectors is None else vectors, used)

    @classmethod
    def recovered(cls, rec, vocab: Vocabulary, index: VectorIndex, metric, keep_vectors: bool,
                  track_usage: bool) -> tuple[State, int]:
        """The state a store recovered (``rec``: snapshot and log), and the id automatic ids
        start from (above every id ever held: removed ids are never reused).

        Raises:
            CorruptFileError: invalid settings, or snapshot codes that cannot be loaded.
        """
        s = rec.settings
        try:
            trained_on = checks.integer("trained_on", s.get("trained_on", 0), low=0)
            next_id = checks.integer("next_id", s.get("next_id", 0), low=0)
        except InvalidValueError as exc:
            raise CorruptFileError(f"{rec.manifest_path}: invalid settings ({exc})") from None
        try:
            state = cls.replayed(metric.replayed(rec.replay()), vocab, index, keep_vectors, track_usage, trained_on)
        except ValueError as exc:
            raise CorruptFileError(f"{rec.path}: the snapshot's codes cannot be loaded ({exc})") from None
        return state, max(next_id, rec.max_id + 1, state.table.max_id() + 1)

    @classmethod
    def replayed(cls, writes, vocab: Vocabulary, index: VectorIndex, keep_vectors: bool, track_usage: bool,
                 trained_on: int = 0) -> State:
        """A state holding the result of ``writes`` ((ids to drop, Columns to add or None), in
        order; the first is the snapshot).

        A snapshot of codes is loaded into its own trained index, the later writes applied on
        top; otherwise the index is built over the final vectors.

        Raises:
            ValueError: a snapshot's codes do not fit its codebook or this memory's index.
        """
        writes = iter(writes)
        _, snap = next(writes)
        if snap.codes is not None:
            if keep_vectors:
                raise InvalidValueError("codes in the snapshot of a memory that keeps float32 vectors")
            table = SlotTable(index.dim, False, track_usage)
            table.append(snap.ids, vocab.intern(snap.labels, vocab.kind), snap.weights, None, snap.used)
            state = cls(table, index.loaded(snap.codebook, snap.codes, trained_on or len(snap.ids)))
            for drop, slots in writes:
                rows = table.rows_of(drop)
                append = None if slots is None or not len(slots.ids) else \
                    (slots.ids, vocab.intern(slots.labels, vocab.kind), slots.weights, slots.vectors, slots.used)
                state.apply(rows[rows >= 0], append)
            due = state.too_dead(0) or state.index.needs_rebuild(table.n_alive)
            return state.rebuilt() if due else state
        table = SlotTable(index.dim, True, track_usage)  # replay needs the vectors; dropped below
        for drop, slots in [(np.empty(0, np.int64), snap), *writes]:
            rows = table.rows_of(drop)
            table.kill(rows[rows >= 0])
            if slots is not None and len(slots.ids):
                table.append(slots.ids, vocab.intern(slots.labels, vocab.kind), slots.weights, slots.vectors,
                             slots.used)
        full = table.compacted()
        return cls(full if keep_vectors else full.compacted(keep_vectors=False),
                   index.build(full.vectors, full.label_idx, full.weights))

    # -- changes ------------------------------------------------------------------------
    def apply(self, kill_rows: np.ndarray, append: tuple | None = None, lists: np.ndarray | None = None) -> None:
        """Change this state in place (the caller holds the exclusive lock): tombstone rows,
        append rows ``(ids, label_idx, weights or None, vectors, used)`` to the table and the index
        (into IVF ``lists`` computed beforehand by ``index.assign``, when given)."""
        self._classes = None
        self._row_columns = None
        cells = self._cells
        t = self.table
        if cells is not None and len(kill_rows):
            lost = cells.remove(kill_rows, t.label_idx[kill_rows], t.weights[kill_rows], self.vectors(kill_rows))
        else:
            lost = np.empty(0, np.int64)
        self.table.kill(kill_rows)
        if len(lost):  # running sums that lost their precision: built afresh when next read
            self._cells = cells = None
        if append is not None:
            self.table.append(*append)
            self.index.add(append[3], lists)
            if cells is not None:
                ids, label_idx, weights, vectors = append[:4]
                cells.append(label_idx, np.ones(len(ids)) if weights is None else weights, vectors, lists)

    def too_dead(self, more_dead: int) -> bool:
        """Whether ``more_dead`` more tombstones call for a rebuild."""
        dead = self.table.n_dead + more_dead
        return dead > 1024 and dead > MAX_DEAD_FRACTION * self.table.n_rows

    def live(self, drop_rows: np.ndarray | None = None, append: tuple | None = None) -> tuple[SlotTable, np.ndarray]:
        """(a table without vectors, the vectors) of the live rows less ``drop_rows``, plus ``append``."""
        vectors = self.vectors(self.table.live_rows(drop_rows))
        table = self.table.compacted(drop_rows=drop_rows, keep_vectors=False)
        if append is not None:
            table.append(*append)
            vectors = np.concatenate([vectors, append[3]])
        return table, vectors

    def rebuilt(self, drop_rows: np.ndarray | None = None, append: tuple | None = None) -> State:
        """A new state of the live rows less ``drop_rows``, plus ``append``; this one is untouched."""
        vectors = self.vectors(self.table.live_rows(drop_rows))
        table = self.table.compacted(drop_rows=drop_rows)
        if append is not None:
            table.append(*append)
            vectors = np.concatenate([vectors, append[3]])
        return State(table, self.index.build(vectors, table.label_idx, table.weights,
                                             written=0 if append is None else len(append[3])))

    def rebuilt_from(self, table: SlotTable, vectors: np.ndarray) -> State:
        """A new state over ``table`` (all rows live) and its ``vectors``, indexed like this one."""
        return State(table, self.index.build(vectors, table.label_idx, table.weights))

    def check_drift(self):
        """Check the search breadth on the rows written since it was measured (see
        :meth:`VectorIndex.check_drift`)."""
        t = self.table
        return self.index.check_drift(t.alive, t.label_idx, t.weights)

    def calibrated(self):
        """The search breadth measured on this state's index, labels and weights now."""
        t = self.table
        return self.index.calibrated(t.label_idx, t.weights)

    def upkeep_breadth(self) -> State | None:
        """Measure the search breadth again of an index that grew in place (HNSW) 4x, whose
        answer was measured at a temperature the memory has since softened past, or whose new
        slots (once half as many as it was measured on are written) no longer get the answer or
        recall it was measured for. Returns a state to swap in when the IVF lists, fit to other
        data, are trained again (built aside); else None (a new calibration is installed as one
        reference: readers see the old or the new)."""
        index = self.index
        if index.stale_calibration():
            index.calibration = self.calibrated()
        elif index.drift_due():
            check = self.check_drift()
            if check is not None and check.drifted and index.trained_on and not index.codes_only:
                return self.rebuilt()
            if check is not None and check.drifted:
                index.calibration = self.calibrated()
        return None

    def budget_slots(self, budget: int | str) -> int:
        """A budget in slots: bytes over the bytes a slot takes (measured; estimated when empty)."""
        t = self.table
        if t.n_alive:
            stats = self.stats(self.index.dim, "")
            return parse_budget(budget, stats.bytes_total / stats.slots)
        return parse_budget(budget, (2 if t.keep_vectors else 1) * 4 * self.index.dim + 72.0)

    def stats(self, dim: int, metric: str) -> MemoryStats:
        """Slots, classes, the active index, and the bytes held for vectors, the index, ids and
        (once built) the tail cells."""
        t, index = self.table, self.index
        nprobe, ef_search = index.breadth(64)
        return MemoryStats(
            slots=t.n_alive, classes=int((t.class_counts > 0).sum()), dim=dim, metric=metric,
            index=index.active_spec, exact=index.exact, tombstones=t.n_dead,
            bytes_vectors=t.nbytes_vectors, bytes_index=index.nbytes, bytes_ids=t.nbytes_ids,
            nlist=index.nlist, lossy=index.lossy, trained_on=index.trained_on, nprobe=nprobe, ef_search=ef_search,
            recall=index.calibration.recall if index.calibration is not None else None, bytes_tail=self.cells_nbytes)


class Current:
    """The state readers see, and the lock that makes each write whole to them: readers share
    it; a writer takes it exclusively only to swap in a state built aside or to change the
    current one in place."""

    def __init__(self, state: State):
        self.state = state
        self.lock = RWLock()

    def swap(self, state: State) -> None:
        with self.lock.write():
            self.state = state

    def change(self, kill_rows: np.ndarray, append: tuple | None = None, n_after: int = 0) -> None:
        """Apply a logged write: rebuilt aside and swapped in when due (too many removed rows,
        or an index that outgrew its kind), else changed in place (the IVF lists of new rows
        are found first: readers wait only for the append itself)."""
        state = self.state
        if state.too_dead(len(kill_rows)) or (append is not None and state.index.needs_rebuild(n_after)):
            self.swap(state.rebuilt(kill_rows, append))
        else:
            lists = state.index.assign(append[3]) if append is not None else None
            with self.lock.write():
                state.apply(kill_rows, append, lists)

    def upkeep_breadth(self) -> None:
        """Measure the search breadth again when due (:meth:`State.upkeep_breadth`)."""
        rebuilt = self.state.upkeep_breadth()
        if rebuilt is not None:
            self.swap(rebuilt)
