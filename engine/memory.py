"""Memory: the external memory of Matching Networks, a FAISS index plus a slot table.

A query attends exactly over its top-k slots and bounds the attention mass it left out
(:mod:`engine.attention`). ``Memory`` is a facade over rooms of their own: options
(:mod:`engine.options`), input checks (:mod:`engine.checks`, :mod:`engine.ids`), the slot
table and index a query reads (:mod:`engine.state`), the read path (:mod:`engine.query`),
compaction (:mod:`engine.compaction`), files, the log and recovery (:mod:`engine.store`).

Every write goes through :meth:`Memory._commit`: checked input -> the durable step (a log
record or a snapshot) -> applied in memory -> the temperature and search breadth kept up to
date. One writer at a time (a mutex); readers share an :class:`~engine.locks.RWLock` that a
writer takes exclusively only to swap in a state built aside or change the current one, so a
query sees each write wholly or not at all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import checks, compaction, query
from . import ids as slot_ids
from . import temperature as choice
from .calibration import Calibration
from .codec import Columns
from .errors import CorruptFileError, EmptyMemoryError, InvalidValueError, StorageError, UnknownLabelError
from .index import BareSearch, SearchSettings, VectorIndex
from .labels import Vocabulary
from .metric import Metric
from .options import PROBS, MemoryOptions
from .results import CompactionReport, MemoryStats, QueryResult, Retrieved, Slots
from .slots import SlotTable
from .state import Current, State
from .store import Store
from .tuning import Tuning

log = logging.getLogger(__name__)
# Opening a memory whose log has more segments than this (one per open) checkpoints it.
MAX_WAL_SEGMENTS = 8


class Memory:
    """An external memory of (id, label, weight, vector) slots with top-k attention.

    Args:
        dim: embedding dimension.
        path: a directory to make the memory durable: every write is logged and fsynced
            before it returns. None keeps it in process only.
        options: a :class:`~engine.options.MemoryOptions`; keyword options (``metric``,
            ``index``, ``temperature``, ``budget``, ``probs``, ...) are set on top of it.
            Each option's meaning is documented there.

    Raises:
        InvalidValueError: a bad dim or option.
        MemoryExistsError: ``path`` already holds a memory (use :meth:`open`).
    """

    def __init__(self, dim: int, *, path: str | os.PathLike | None = None, options: MemoryOptions | None = None,
                 **settings: Any):
        self.dim = checks.integer("dim", dim)
        try:
            o = (options or MemoryOptions()).replace(**settings).checked_for(self.dim)
        except TypeError as exc:  # an option that does not exist
            raise InvalidValueError(f"unknown option: {exc}") from None
        self._options = o
        self._metric = Metric(o.metric, checks.centre(o.centre, self.dim, o.metric))
        self._tuning = Tuning(o.temperature)
        inner_dim = self._metric.index_dim(self.dim)
        index = VectorIndex(inner_dim, o.index, SearchSettings(o.nprobe, o.ef_search), recall=o.recall,
                            temperature=self._tuning.value, share=o.shard.share, metric=o.metric)
        self._keep_vectors = index.spec_lossy and o.rescore  # kept when the index cannot give them back
        self._cur = Current(State(SlotTable(inner_dim, self._keep_vectors, bool(o.track_usage)), index))
        self._vocab = Vocabulary()
        self._next_id = 0
        self._write_mutex = threading.Lock()
        self._store = Store.create(path, self.dim, self._manifest()) if path is not None else None

    def _manifest(self, state: State | None = None, next_id: int | None = None) -> dict:
        """What the manifest keeps: the options and the state of the choices made on the slots."""
        cal = (state or self._cur.state).index.calibration
        return {**self._options.to_manifest(), **self._tuning.as_manifest(),
                "next_id": self._next_id if next_id is None else next_id,
                "calibration": cal.as_dict() if cal is not None else None}

    # -- opening ----------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, *, read_only: bool = False) -> Memory:
        """Open a durable memory: load its snapshot and replay its write-ahead log.

        ``read_only`` reads it without the writer's lock (also one a server holds open):
        queries answer over what was acknowledged when it was opened; writes are refused. A
        memory whose disk refuses the new log segment (a full disk) answers and refuses writes.

        Raises:
            MemoryNotFoundError: no memory at ``path``.
            FormatVersionError: an unknown format version.
            CorruptFileError: a file is missing, short, extra or altered (a torn final
                record of the open log segment, never acknowledged, is dropped).
            MemoryLockedError: the directory is open already (one writer per directory).
        """
        store, rec = Store.open(path, lock=not read_only)
        try:
            try:
                mem = cls(rec.dim, options=MemoryOptions.from_manifest(rec.settings))
            except InvalidValueError as exc:
                raise CorruptFileError(f"{store.manifest_path}: invalid settings ({exc})") from None
            mem._restore(rec, store.path)
        except BaseException:
            store.close()  # release the directory's lock; nothing was written
            raise
        mem._store = store
        if read_only:
            store.fail("it was opened read-only")
            return mem
        try:
            store.begin()  # from here on, writes go to a new log segment
        except StorageError as exc:
            store.fail(f"the log could not be reopened for writing ({exc})")
        if store.failed is None and store.segments > MAX_WAL_SEGMENTS:
            with contextlib.suppress(StorageError):  # else the log stays; the next open tries again
                mem.save()  # fold the log into a snapshot so recovery stays short
        return mem

    def _restore(self, rec, path: Path) -> None:
        """Take in the recovered slots, with the temperature and breadth chosen before."""
        s = rec.settings
        self._vocab.kind = rec.label_kind
        self._tuning.restore(self._cur, s.get("temperature_report"))
        self._cur.state.index.calibration = Calibration.from_dict(s.get("calibration"))  # reused if it still fits
        try:
            trained_on = checks.integer("trained_on", s.get("trained_on", 0), low=0)
            next_id = checks.integer("next_id", s.get("next_id", 0), low=0)
            self._cur.state = State.replayed(self._metric.replayed(rec.replay()), self._vocab, self._cur.state.index,
                                         self._keep_vectors, bool(self._options.track_usage), trained_on)
        except InvalidValueError as exc:
            raise CorruptFileError(f"{path}: invalid settings ({exc})") from None
        except ValueError as exc:
            raise CorruptFileError(f"{path}: the snapshot's codes cannot be loaded ({exc})") from None
        # ids of removed slots are never reused by counting up
        self._next_id = max(next_id, rec.max_id + 1, self._cur.state.table.max_id() + 1)
        self._tuning.upkeep(self._cur, self._metric, None, breadth=False)  # as a running memory would keep it

    # -- writing ----------------------------------------------------------------------
    def _commit(self, durable: Callable[[Store], None] | None, apply: Callable[[], None], what: str) -> None:
        """Every write, its input checked and the write mutex held: ``durable`` makes it durable
        (a log record or a snapshot; if it fails nothing changed), ``apply`` applies it in
        memory (if that fails, the files are ahead and later writes are refused), then the
        temperature and search breadth are kept up to date."""
        store = self._store
        if store is not None and durable is not None:
            durable(store)
        with store.applying(what) if store is not None else contextlib.nullcontext():
            apply()
        self._tuning.upkeep(self._cur, self._metric, store)

    def add(self, vectors, labels: Sequence, *, ids=None, weights=None, upsert: bool = False) -> np.ndarray:
        """Write slots: ``vectors`` (n, dim) or (dim,) finite floats (n may be 0), n ``labels``
        (all int fitting int64, or all str: the memory keeps one kind), ``ids`` (n unique in
        [0, 2**63); None: fresh ones), ``weights`` (masses in (0, 1e30], default 1); ``upsert``
        replaces slots whose id exists. With a ``path`` they are in the fsynced log before this
        returns; an add that passes the ``budget`` is compacted with the memory into one snapshot.

        Returns (n,) int64 ids. Raises DimensionError, InvalidValueError, DuplicateIdError (bad
        input) or StorageError (the disk failed); on error nothing changed, in process or on disk.
        """
        with self._write_mutex:
            v = checks.vectors(vectors, self.dim, self.metric, allow_empty=True)
            labels, kind = self._vocab.check(labels, len(v))
            w = checks.weights(weights, len(v))
            new = self._fresh(len(v))[0] if ids is None else slot_ids.given(
                ids, len(v), upsert=upsert, present=lambda x: self._cur.state.rows_of(x) >= 0)
            if len(v) == 0:
                return new
            now, old = time.time(), self._cur.state.rows_of(new)
            old = old[old >= 0]
            self._choose_centre(v)
            append = (new, self._vocab.intern(labels, kind), w, self._metric.slots(v), now)
            n_after = len(self) - len(old) + len(v)
            budget = None if self._options.budget is None else self._budget_slots(self._options.budget)
            if budget is not None and n_after > budget:
                target = max(1, int(budget * (1 - self._options.slack)))
                self._compact(*self._cur.state.live(old, append), target, self._options.policy, 0, {}, kind)
                return new

            def apply() -> None:
                self._cur.change(old, append, n_after)
                self._vocab.kind = kind
                self._next_id = max(self._next_id, int(new.max()) + 1)

            cols = Columns(new, labels, w, v, np.full(len(v), now))
            self._commit(lambda store: store.log_add(cols, kind, upsert=upsert), apply, "add")
            return new

    def _fresh(self, n: int, start: int | None = None, taken: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        used = self._cur.state.table.sorted_ids if taken is None else np.union1d(self._cur.state.table.sorted_ids, taken)
        return slot_ids.fresh(n, self._next_id if start is None else start, used, self._options.shard)

    def _choose_centre(self, v: np.ndarray) -> None:
        """l2: centre the memory on its first slots, in the manifest before they are logged (the
        log is replayed around it). Readers lift queries under the readers' lock."""
        chosen = self._metric.with_centre(v)
        if chosen is not self._metric:
            self._options = self._options.replace(centre=chosen.as_setting())
            if self._store is not None:
                self._store.update(centre=chosen.as_setting())
            self._metric = chosen

    def remove(self, ids=None, *, labels=None) -> int:
        """Remove slots by id (all present), or every slot of some ``labels`` (each must have
        one) without reading a vector. Returns the number removed; None at all removes nothing.

        Raises UnknownIdError / UnknownLabelError (listing what is absent), InvalidValueError
        (both given, or labels of another kind), StorageError; on error nothing is removed.
        """
        with self._write_mutex:
            if labels is None:
                found = np.unique(checks.ids(ids)) if ids is not None else np.zeros(0, np.int64)
            elif ids is not None:
                raise InvalidValueError("remove takes ids or labels, not both")
            else:
                values, codes = self._vocab.find(labels)
                counts = self._cur.state.table.class_counts
                absent = list(dict.fromkeys(v for v, c in zip(values, codes) if not 0 <= c < len(counts)
                                            or counts[c] == 0))
                if absent:
                    raise UnknownLabelError(f"labels with no slot: {absent[:10]}{' ...' if len(absent) > 10 else ''}",
                                            absent)
                found = self._cur.state.table.sorted_ids_of(np.unique(codes))
            if len(found) == 0:
                return 0
            rows = self._cur.state.rows_or_raise(found)
            self._commit(lambda store: store.log_remove(found), lambda: self._cur.change(rows), "remove")
            return len(rows)

    def compact(self, *, budget: int | str | None = None, policy: str = "merge", seed: int = 0,
                **options) -> CompactionReport:
        """Shrink the memory to ``budget`` (slots, or bytes as "64MB") by ``policy`` ("merge",
        "reservoir", "age" or "distill"; ``options`` are distill's), keeping every class and its
        total weight (:mod:`engine.compaction`). Kept slots keep their ids; merged ones get fresh
        ids. Built aside, written as a snapshot (the commit point), then swapped in: readers wait
        only for the swap. No budget: only removed slots are dropped.

        Raises EmptyMemoryError, InvalidValueError (an unknown policy or option, or a budget
        below the number of classes; every option is checked), StorageError; on error nothing
        changed.
        """
        self._options.check_policy(policy)
        seed = checks.integer("seed", seed, low=0)
        try:
            compaction.check_options(options)
        except ValueError as exc:
            raise InvalidValueError(str(exc)) from None
        with self._write_mutex:
            if len(self) == 0:
                raise EmptyMemoryError("the memory is empty: nothing to compact")
            slots = None if budget is None else self._budget_slots(budget)
            t0, before, dropped = time.perf_counter(), len(self), self._cur.state.table.n_dead
            after, kept = self._compact(*self._cur.state.live(), slots, policy, seed, options, self._vocab.kind,
                                        required=self._store is not None or dropped > 0)
            return CompactionReport(slots=after, dropped=dropped, merged_away=before - after,
                                    policy=policy if slots is not None else None, budget=slots,
                                    seconds=time.perf_counter() - t0, kept=kept)

    def _compact(self, live: SlotTable, vectors: np.ndarray, budget: int | None, policy: str, seed: int,
                 options: dict, kind: str | None, *, required: bool = True) -> tuple[int, str | None]:
        """Compact ``live`` aside and commit it as a snapshot; the slots kept and the policy's note."""
        next_id = max(self._next_id, int(live.ids.max()) + 1 if live.n_alive else 0)

        def fresh(n: int) -> np.ndarray:
            nonlocal next_id
            new, next_id = self._fresh(n, next_id, taken=live.ids)
            return new

        table, vectors, kept = compaction.shrink(
            live, vectors, budget=budget, policy=policy, metric=self._metric, temperature=self._tuning.value,
            seed=seed, options=options, fresh_ids=fresh, keep_vectors=self._keep_vectors, now=time.time())
        if not required and table.n_alive == live.n_alive:
            return table.n_alive, kept  # nothing to drop or merge, nothing to write
        state = self._cur.state.rebuilt_from(table, vectors)  # aside: readers go on meanwhile
        slots = self._metric.persisted(state.snapshot(self._vocab, vectors))
        extra = {**self._manifest(state, next_id), "trained_on": state.index.trained_on}

        def apply() -> None:
            self._cur.swap(state)
            self._vocab.kind, self._next_id = kind, next_id

        self._commit(lambda store: store.checkpoint(slots, kind, extra), apply, "compaction")
        return table.n_alive, kept

    def calibrate_temperature(self, *, k: int = 64, sample: int = choice.SAMPLE, seed: int = 0
                              ) -> choice.TemperatureReport:
        """Choose the temperature now, on ``sample`` of the memory's own slots each attending
        over its top-``k`` without itself (:mod:`engine.temperature`), and use it: an "auto"
        memory keeps choosing as it grows, one given a number keeps this one (persisted).

        Raises EmptyMemoryError (fewer than 20 slots, or one class), InvalidValueError.
        """
        k, sample, seed = checks.integer("k", k), checks.integer("sample", sample), checks.integer("seed", seed, low=0)
        if k > choice.MAX_K or sample > choice.MAX_SAMPLE:
            raise InvalidValueError(f"k must be at most {choice.MAX_K} and sample at most {choice.MAX_SAMPLE}, "
                                    f"got k={k}, sample={sample}")
        with self._write_mutex:
            report = choice.calibrate(self._cur.state, self._tuning.value, metric=self._metric, k=k, sample=sample,
                                      seed=seed)
            if report is None:
                raise EmptyMemoryError(f"choosing a temperature needs {choice.MIN_SLOTS} slots of two classes or more")
            auto = self._tuning.auto
            self._commit(lambda store: store.update(**({"temperature_report": report.as_dict()} if auto
                                                          else {"temperature": report.temperature})),
                         lambda: self._set(report.temperature, report=report, auto=auto), "temperature")
            return report

    def _set(self, temperature: float | None = None, *, report=None, auto: bool = False,
             search: SearchSettings | None = None) -> None:
        """Apply changed settings (readers see the old or the new)."""
        if temperature is not None:
            self._tuning.use(self._cur, temperature, report)
            self._tuning.auto = auto
            self._options = self._options.replace(temperature="auto" if auto else temperature)
        if search is not None:
            with self._cur.lock.write():
                self._cur.state.index.settings = search
            self._options = self._options.replace(nprobe=search.nprobe, ef_search=search.ef_search)

    # -- reading ----------------------------------------------------------------------
    def query(self, queries, *, k: int = 64, tail: float | None = None, probs: str | None = None) -> QueryResult:
        """Classify ``queries`` ((n, dim) or (dim,)) by exact softmax attention over their top-``k``
        slots (``probs="top-k"``), or over every slot with the unscored rest estimated
        (``"full"``; default: the memory's ``probs``). k is clamped to the memory's size
        (``k_clamped``). ``tail``: the search widens per query until ``tail_bound <= tail`` or
        every slot is scored (k doubles; full answers on IVF-Flat probe twice the lists).

        Raises EmptyMemoryError, DimensionError, InvalidValueError.
        """
        if tail is not None:
            checks.fraction("tail", tail, low=0.0, high=1.0, closed_low=False)
        full = (probs or self._options.probs) == "full"
        with self._reading(queries, k, probs) as (state, q, k_):
            return query.answer(state, self._vocab, q, k=min(k_, state.table.n_alive), k_requested=k_, tail=tail,
                                temperature=self._tuning.value, full_metric=self.metric if full else None)

    def retrieve(self, queries, *, k: int = 64, probs: str = "top-k") -> Retrieved:
        """Each query's top-k slots (scores, masses, labels) and the mass left out, without
        attention: what :class:`~engine.cluster.ShardedMemory` merges. With ``probs="full"``,
        also every class's mass in the full answer (``Retrieved.full``, absolute log units)."""
        with self._reading(queries, k, probs) as (state, q, k_):
            return query.retrieve(state, self._vocab, q, min(k_, state.table.n_alive), temperature=self._tuning.value,
                                  full_metric=self.metric if probs == "full" else None)

    @contextlib.contextmanager
    def _reading(self, queries, k: int, probs: str | None):
        q, k = checks.vectors(queries, self.dim, self.metric, "queries"), checks.integer("k", k)
        if probs is not None and probs not in PROBS:
            raise InvalidValueError(f"probs must be one of {PROBS}, got {probs!r}")
        with self._cur.lock.read():
            if self._cur.state.table.n_alive == 0:
                raise EmptyMemoryError("the memory is empty: add slots before querying")
            yield self._cur.state, self._metric.queries(q), k

    def get(self, ids) -> Slots:
        """Read slots back by id, in the order given (UnknownIdError lists absent ones)."""
        wanted = checks.ids(ids)
        with self._cur.lock.read():
            slots = self._cur.state.columns(self._vocab, self._cur.state.rows_or_raise(wanted))
            return Slots(ids=wanted.copy(), labels=slots.labels, weights=slots.weights.copy(),
                         vectors=self._metric.stored(slots.vectors))

    def ids(self, labels=None) -> np.ndarray:
        """Every slot's id, ascending; with ``labels``, of the slots of those labels."""
        with self._cur.lock.read():
            if labels is None:
                return self._cur.state.table.sorted_ids.copy()
            _, codes = self._vocab.find(labels)
            return self._cur.state.table.sorted_ids_of(np.unique(codes[codes >= 0]))

    def classes(self) -> np.ndarray:
        """The labels with at least one live slot (the columns ``query`` answers over)."""
        with self._cur.lock.read():
            return self._cur.state.classes(self._vocab)[0].copy()

    def __len__(self) -> int:
        return self._cur.state.table.n_alive

    def __contains__(self, id_) -> bool:
        if isinstance(id_, bool) or not isinstance(id_, (int, np.integer)):
            return False
        with self._cur.lock.read():
            return bool(self._cur.state.rows_of(np.array([id_], np.int64))[0] >= 0)

    def stats(self) -> MemoryStats:
        """Slots, classes, the active index and the bytes held (:meth:`State.stats`)."""
        with self._cur.lock.read():
            return self._cur.state.stats(self.dim, self.metric)

    def bare_search(self, k: int) -> BareSearch:
        """The FAISS index alone at the breadth a query of ``k`` uses (the benchmarks' baseline)."""
        with self._cur.lock.read():
            return self._cur.state.index.bare_search(checks.integer("k", k))

    def _budget_slots(self, budget: int | str) -> int:
        """A budget in slots (bytes over the bytes a slot takes: measured, or estimated when empty)."""
        if len(self):
            stats = self.stats()
            return compaction.parse_budget(budget, stats.bytes_total / stats.slots)
        per_slot = (2 if self._keep_vectors else 1) * 4 * self._metric.index_dim(self.dim) + 72.0
        return compaction.parse_budget(budget, per_slot)

    # -- settings ---------------------------------------------------------------------
    options = property(lambda self: self._options, doc="The memory's :class:`~engine.options.MemoryOptions`.")
    metric = property(lambda self: self._options.metric, doc='"cosine", "ip" or "l2".')
    label_kind = property(lambda self: self._vocab.kind, doc='"int" or "str" once a label was written, else None.')
    next_id = property(lambda self: self._next_id, doc="Where automatic ids start: above every id ever held.")
    temperature_report = property(lambda self: self._tuning.report,
                                  doc="What the last choice of the temperature measured (None if none was made).")
    calibration = property(lambda self: self._cur.state.index.calibration,
                           doc="What calibrating the search breadth chose and measured (:mod:`engine.calibration`).")
    calibration_checks = property(lambda self: tuple(self._cur.state.index.drift_checks),
                                  doc="The checks of the calibrated breadth on slots written since (newest last).")
    path = property(lambda self: self._store.path if self._store is not None else None,
                    doc="The directory of a durable memory, or None.")

    @property
    def total_weight(self) -> float:
        """The mass of every live slot (an upper bound, its rounding error included)."""
        return self._cur.state.table.total_weight + self._cur.state.table.weight_error

    @property
    def temperature(self) -> float:
        """The softmax temperature T; setting it keeps it as given (persisted)."""
        return self._tuning.value

    @temperature.setter
    def temperature(self, value: float) -> None:
        value = checks.temperature(value)
        with self._write_mutex:
            self._commit(lambda store: store.update(temperature=value), lambda: self._set(value), "temperature")

    @property
    def search_settings(self) -> SearchSettings:
        """IVF ``nprobe`` and HNSW ``ef_search`` (None: calibrated); setting them persists them."""
        return SearchSettings(self._options.nprobe, self._options.ef_search)

    @search_settings.setter
    def search_settings(self, value: SearchSettings) -> None:
        if not isinstance(value, SearchSettings):
            raise InvalidValueError(f"search_settings must be a SearchSettings, got {value!r}")
        new = SearchSettings(nprobe=checks.integer("nprobe", value.nprobe, optional=True),
                             ef_search=checks.integer("ef_search", value.ef_search, optional=True))
        with self._write_mutex:
            self._commit(lambda store: store.update(nprobe=new.nprobe, ef_search=new.ef_search),
                         lambda: self._set(search=new), "search settings")

    # -- persistence ------------------------------------------------------------------
    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write a snapshot: with no ``path`` (or its own), a durable memory checkpoints (a new
        snapshot, a fresh log, old files dropped); with another, a copy is written there as a new
        memory. Returns the directory. Raises InvalidValueError (no path for an in-process
        memory), MemoryExistsError, StorageError (the memory and its files are as before)."""
        with self._write_mutex:
            target = Path(path) if path is not None else self.path
            if target is None:
                raise InvalidValueError("this memory is not durable: give save() a path")
            slots = self._metric.persisted(self._cur.state.snapshot(self._vocab))
            trained = {"trained_on": self._cur.state.index.trained_on}
            if self._store is not None and target.resolve() == self._store.path.resolve():
                self._store.checkpoint(slots, self._vocab.kind, {**self._manifest(), **trained})
                return target
            out = Store.create(target, self.dim, self._manifest())
            try:
                out.checkpoint(slots, self._vocab.kind, trained)
            finally:
                out.close()
            return target

    def close(self) -> None:
        """Close the log and release the directory (every acknowledged write is on disk already);
        later writes are refused, queries still answer."""
        with self._write_mutex:
            if self._store is not None:
                self._store.close(self._manifest())

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path else ""
        return (f"Memory(dim={self.dim}, metric={self.metric!r}, index={self._cur.state.index.spec!r}, "
                f"slots={len(self)}, temperature={self._tuning.value}{where})")

