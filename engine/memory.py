"""Memory: the external memory of Matching Networks, a FAISS index plus a slot table.

A query attends exactly over its top-k slots and bounds the attention mass it left out
(:mod:`engine.attention`). ``Memory`` is the facade; each job has its own module: options
(:mod:`engine.options`), input checks (:mod:`engine.checks`, :mod:`engine.ids`), writes and
their one commit sequence (:mod:`engine.writer`), the state readers see (:mod:`engine.state`),
the read path (:mod:`engine.query`), compaction (:mod:`engine.compaction`), the temperature
and search breadth (:mod:`engine.tuning`), files, the log and recovery (:mod:`engine.store`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from . import checks, query
from .errors import InvalidValueError
from .index import BareSearch, SearchSettings
from .index.calibration import Calibration
from .options import PROBS, MemoryOptions
from .results import CompactionReport, MemoryStats, QueryResult, Retrieved, Slots
from .state import State
from .tuning import temperature as choice
from .writer import Writer

T = TypeVar("T")


class Memory:
    """An external memory of (id, label, weight, vector) slots with top-k attention.

    Args:
        dim: embedding dimension.
        path: a directory to make the memory durable (every write is logged and fsynced
            before it returns); None keeps it in process.
        options: a :class:`~engine.options.MemoryOptions` (where each option is documented);
            keyword options (``metric``, ``index``, ``temperature``, ``budget``, ``probs``, ...)
            are set on top of it.

    Raises:
        InvalidValueError: a bad dim or option. MemoryExistsError: ``path`` holds a memory.
    """

    def __init__(self, dim: int, *, path: str | os.PathLike | None = None, options: MemoryOptions | None = None,
                 **settings: Any):
        self.dim = checks.integer("dim", dim)
        if options is not None and not isinstance(options, MemoryOptions):
            raise InvalidValueError(f"options must be a MemoryOptions (or keywords), got {type(options).__name__}")
        try:
            chosen = (options or MemoryOptions()).replace(**settings)
        except TypeError as exc:  # an option that does not exist
            raise InvalidValueError(f"unknown option: {exc}") from None
        self._w = Writer(self.dim, chosen, path)

    @classmethod
    def open(cls, path: str | os.PathLike, *, read_only: bool = False) -> Memory:
        """Open a durable memory: load its snapshot, replay its log. ``read_only``: without the
        writer's lock (also one a server holds), answering over what was acknowledged then,
        refusing writes. A disk that refuses the new log segment leaves it answering, read-only.

        Raises MemoryNotFoundError, FormatVersionError, CorruptFileError (a file missing, short,
        extra or altered; a torn last record, never acknowledged, is dropped), MemoryLockedError.
        """
        mem = cls.__new__(cls)
        mem._w = Writer.opened(path, read_only)
        mem.dim = mem._w.dim
        return mem

    # -- writing ----------------------------------------------------------------------
    def add(self, vectors, labels: Sequence, *, ids=None, weights=None, upsert: bool = False) -> np.ndarray:
        """Write slots: ``vectors`` (n, dim) or (dim,) finite floats (n may be 0), n ``labels``
        (all int fitting int64, or all str), ``ids`` (n unique in [0, 2**63); None: fresh ones),
        ``weights`` (in (0, 1e30], default 1); ``upsert`` replaces slots whose id exists. With a
        ``path`` they are in the fsynced log before this returns; an add past the ``budget`` is
        compacted with the memory into one snapshot. Returns the (n,) int64 ids.

        Raises DimensionError, InvalidValueError, DuplicateIdError, StorageError; nothing changed.
        """
        return self._w.add(vectors, labels, ids, weights, upsert)

    def remove(self, ids=None, *, labels=None) -> int:
        """Remove slots by id (all present), or every slot of some ``labels`` (each must have
        one) without reading a vector. Returns the number removed; None removes nothing.

        Raises UnknownIdError / UnknownLabelError (listing what is absent), InvalidValueError
        (both given, or labels of another kind), StorageError; on error nothing is removed.
        """
        return self._w.remove(ids, labels)

    def compact(self, *, budget: int | str | None = None, policy: str = "merge", seed: int = 0,
                **options) -> CompactionReport:
        """Shrink the memory to ``budget`` (slots, or bytes as "64MB") by ``policy`` ("merge",
        "reservoir", "age" or "distill"; ``options`` are distill's), keeping every class and its
        weight (:mod:`engine.compaction`); merged slots get fresh ids. Built aside, written as a
        snapshot (the commit point), swapped in: readers wait only for the swap. No budget:
        removed slots are dropped.

        Raises EmptyMemoryError, InvalidValueError (every option is checked; a budget below the
        number of classes), StorageError; on error nothing changed.
        """
        return self._w.compact(budget, policy, seed, options)

    def calibrate_temperature(self, *, k: int = 64, sample: int = choice.SAMPLE, seed: int = 0
                              ) -> choice.TemperatureReport:
        """Choose the temperature now, on ``sample`` of the memory's slots each attending over its
        top-``k`` without itself (:mod:`engine.tuning.temperature`), and use it: an "auto" memory keeps
        choosing as it grows, one given a number keeps this one (persisted).

        Raises EmptyMemoryError (fewer than 20 slots, or one class), InvalidValueError.
        """
        return self._w.calibrate_temperature(k, sample, seed)

    # -- reading ----------------------------------------------------------------------
    def query(self, queries, *, k: int = 64, tail: float | None = None, probs: str | None = None) -> QueryResult:
        """Classify ``queries`` ((n, dim) or (dim,)) by exact softmax attention over their top-``k``
        slots (``probs="top-k"``), or over every slot with the unscored rest estimated
        (``"full"``; default: the memory's ``probs``); k is clamped to the memory's size.
        ``tail``: the search widens per query until ``tail_bound <= tail`` or every slot is scored.

        Raises EmptyMemoryError, DimensionError, InvalidValueError.
        """
        if tail is not None:
            checks.fraction("tail", tail, low=0.0, high=1.0, closed_low=False)
        q, k = self._checked(queries, k, probs)
        w = self._w
        full_metric = self.metric if (probs or w.options.probs) == "full" else None
        with w.cur.lock.read():  # an l2 centre is set before the first slots are applied under this lock
            state = w.cur.state
            checks.not_empty(state.table.n_alive, "add slots before querying")
            return query.answer(state, w.vocab, w.metric.queries(q), k=min(k, state.table.n_alive), k_requested=k,
                                tail=tail, temperature=w.tuning.value, full_metric=full_metric)

    def retrieve(self, queries, *, k: int = 64, probs: str = "top-k") -> Retrieved:
        """Each query's top-k slots and the mass left out, without attention (what
        :class:`~engine.cluster.ShardedMemory` merges); with ``probs="full"`` also every class's
        mass in the full answer (``Retrieved.full``)."""
        q, k = self._checked(queries, k, probs)
        w = self._w
        with w.cur.lock.read():
            state = w.cur.state
            checks.not_empty(state.table.n_alive, "add slots before querying")
            return query.retrieve(state, w.vocab, w.metric.queries(q), min(k, state.table.n_alive),
                                  temperature=w.tuning.value, full_metric=self.metric if probs == "full" else None)

    def _checked(self, queries, k: int, probs: str | None) -> tuple[np.ndarray, int]:
        q, k = checks.vectors(queries, self.dim, self.metric, "queries"), checks.integer("k", k)
        if probs is not None and probs not in PROBS:
            raise InvalidValueError(f"probs must be one of {PROBS}, got {probs!r}")
        return q, k

    def _read(self, read: Callable[[State], T]) -> T:
        with self._w.cur.lock.read():
            return read(self._w.cur.state)

    def get(self, ids) -> Slots:
        """Read slots back by id, in the order given (UnknownIdError lists absent ones)."""
        wanted, vocab = checks.ids(ids), self._w.vocab
        labels, weights, vectors = self._read(lambda state: state.slots(vocab, wanted))
        return Slots(ids=wanted.copy(), labels=labels, weights=weights, vectors=self._w.metric.stored(vectors))

    def ids(self, labels=None) -> np.ndarray:
        """Every slot's id, ascending; with ``labels``, of the slots of those labels."""
        return self._read(lambda state: state.ids(self._w.vocab, labels))

    def classes(self) -> np.ndarray:
        """The labels with at least one live slot (the columns ``query`` answers over)."""
        return self._read(lambda state: state.classes(self._w.vocab)[0].copy())

    def __len__(self) -> int:
        return self._w.cur.state.table.n_alive

    def __contains__(self, id_) -> bool:
        return self._read(lambda state: state.holds(id_))

    def stats(self) -> MemoryStats:
        """Slots, classes, the active index and the bytes held (:meth:`State.stats`)."""
        return self._read(lambda state: state.stats(self.dim, self.metric))

    def bare_search(self, k: int) -> BareSearch:
        """The FAISS index alone at the breadth a query of ``k`` uses (the benchmarks' baseline)."""
        k = checks.integer("k", k)
        return self._read(lambda state: state.index.bare_search(k))

    # -- settings ---------------------------------------------------------------------
    @property
    def options(self) -> MemoryOptions:
        """The :class:`~engine.options.MemoryOptions` in force."""
        return self._w.options

    @property
    def metric(self) -> str:
        """"cosine", "ip" or "l2"."""
        return self._w.options.metric

    @property
    def label_kind(self) -> str | None:
        """"int" or "str" once a label was written, else None."""
        return self._w.vocab.kind

    @property
    def next_id(self) -> int:
        """Where automatic ids start: above every id the memory ever held."""
        return self._w.next_id

    @property
    def total_weight(self) -> float:
        """The mass of every live slot (an upper bound, its rounding error included)."""
        table = self._w.cur.state.table
        return table.total_weight + table.weight_error

    @property
    def temperature_report(self) -> choice.TemperatureReport | None:
        """What the last choice of the temperature measured (None if none was made)."""
        return self._w.tuning.report

    @property
    def calibration(self) -> Calibration | None:
        """What calibrating the search breadth chose and measured (:mod:`engine.index.calibration`)."""
        return self._w.cur.state.index.calibration

    @property
    def calibration_checks(self) -> tuple:
        """Checks of the calibrated breadth on the slots written since (newest last)."""
        return tuple(self._w.cur.state.index.drift_checks)

    @property
    def path(self) -> Path | None:
        """The directory of a durable memory, or None."""
        return self._w.store.path if self._w.store is not None else None

    @property
    def temperature(self) -> float:
        """The softmax temperature T; setting it keeps it as given (persisted)."""
        return self._w.tuning.value

    @temperature.setter
    def temperature(self, value: float) -> None:
        value = checks.temperature(value)
        with self._w.mutex:
            self._w.set_temperature(value)

    @property
    def search_settings(self) -> SearchSettings:
        """IVF ``nprobe`` and HNSW ``ef_search`` (None: calibrated); setting them persists them."""
        return SearchSettings(self._w.options.nprobe, self._w.options.ef_search)

    @search_settings.setter
    def search_settings(self, value: SearchSettings) -> None:
        if not isinstance(value, SearchSettings):
            raise InvalidValueError(f"search_settings must be a SearchSettings, got {value!r}")
        self._w.set_search(SearchSettings(nprobe=checks.optional_integer("nprobe", value.nprobe),
                                          ef_search=checks.optional_integer("ef_search", value.ef_search)))

    # -- persistence ------------------------------------------------------------------
    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write a snapshot: with no ``path`` (or its own) a durable memory checkpoints (new
        snapshot, fresh log, old files dropped); with another, a copy is made there as a new
        memory. Returns the directory.

        Raises InvalidValueError (an in-process memory and no path), MemoryExistsError,
        StorageError (the memory and its files are as before).
        """
        with self._w.mutex:
            return self._w.save(path)

    def close(self) -> None:
        """Close the log and release the directory (acknowledged writes are on disk already);
        later writes are refused, queries still answer."""
        self._w.close()

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path else ""
        return (f"Memory(dim={self.dim}, metric={self.metric!r}, index={self._w.cur.state.index.spec!r}, "
                f"slots={len(self)}, temperature={self.temperature}{where})")
