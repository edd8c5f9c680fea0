"""Memory: the associative memory of Matching Networks, backed by FAISS.

Vinyals et al. (2016), "Matching Networks for One Shot Learning": a support set
is written into an external memory of (embedding, label) slots, and a query is
classified by softmax attention over it. Here the memory is a FAISS index plus a
slot table; a query attends exactly over its top-k slots and reports a bound on
the attention mass it left out (see :mod:`engine.attention`).

``Memory`` is a facade; each concern has its own room:
- input checks: :mod:`engine.checks`; labels and their kind: :mod:`engine.labels`;
- the slot table and index a query reads: :mod:`engine.state`; the read path: :mod:`engine.query`;
- compaction policies and budgets: :mod:`engine.compaction`;
- files, the log and recovery: :mod:`engine.store`.

Data flows one way. Writes: checks -> write-ahead log (durable) -> state.
Reads: index top-k -> attention -> :class:`~engine.results.QueryResult`.
One writer at a time (a mutex); readers share an :class:`~engine.locks.RWLock`
that a writer takes exclusively only to swap in a new state or change the
current one, so a query sees each write wholly or not at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from . import checks, compaction, query
from . import temperature as tuning
from .codec import Columns
from .errors import CorruptFileError, EmptyMemoryError, InvalidValueError, StorageError, UnknownLabelError
from .calibration import Calibration
from .index import BareSearch, SearchSettings, VectorIndex, validate_spec
from .labels import Vocabulary
from .locks import RWLock
from .metric import METRICS, Metric
from .results import CompactionReport, MemoryStats, QueryResult, Retrieved, Slots
from .slots import SlotTable
from .state import State
from .store import MANIFEST, Recovered, Store

# Opening a memory whose log has more segments than this (one per open) checkpoints it.
MAX_WAL_SEGMENTS = 8
# The settings a durable memory keeps in its manifest (besides dim and next_id).
SETTINGS = ("metric", "index", "temperature", "nprobe", "ef_search", "budget", "slack", "policy", "rescore",
            "recall", "track_usage", "id_stride", "id_offset", "share", "probs", "centre")
PROBS = ("top-k", "full")


class Memory:
    """An external memory of (id, label, weight, vector) slots with top-k attention.

    Args:
        dim: embedding dimension.
        metric: "cosine" (vectors and queries L2-normalised), "ip" (inner product) or "l2"
            (attention over negative squared Euclidean distance, see :mod:`engine.metric`).
        index: "auto", or a FAISS factory string ("Flat", "HNSW32", "IVF1024,Flat", "IVF256,PQ16", ...).
        temperature: softmax temperature T of the attention kernel, in [1e-6, 1e6], or
            "auto" (the default): chosen on the memory's own slots by leave-one-out
            log-likelihood (:mod:`engine.temperature`) once it holds 20 slots of two classes,
            and again whenever it has grown or shrunk 2x (0.1 until then);
            ``temperature_report`` says what was measured. A number is kept as given.
        path: a directory to make the memory durable: every write is logged and fsynced
            before it returns. None keeps it in process only.
        nprobe: IVF lists visited per query, fixed (default: calibrated on the memory's own
            vectors whenever the index is built, see ``recall``).
        ef_search: HNSW search breadth, fixed (default: calibrated likewise).
        budget: keep the memory within this many slots (an int) or bytes (a string such as
            "64MB"): once an add passes it, the memory compacts down to budget x (1 - slack).
        slack: how far below the budget automatic compaction goes.
        policy: the compaction policy used under a budget ("merge", "reservoir", "age", "distill").
        rescore: with a lossy index (PQ, SQ, ...), keep the float32 vectors and rescore the
            retrieved slots with them, so attention uses exact similarities. False keeps only the
            compressed codes (the smallest memory): similarities, and vectors read back by
            ``get``, snapshots and compaction, are then the index's approximations.
        recall: what an approximate index (IVF, HNSW) calibrates its search breadth for, on the
            memory's own vectors, whenever it is built (see :mod:`engine.calibration`). None
            (the default): the answer, i.e. the cheapest nprobe / ef_search at which the top-k
            attention's class answer agrees with exact search's on 99.5% of a leave-one-out
            sample, its class probabilities within 0.1 total variation on average, measured
            at the memory's temperature (a shard of a sharded memory, whose answer is the
            merge's, and a memory of one class calibrate for recall 0.98 instead). A number
            r in (0, 1]: the cheapest breadth whose
            recall@64 of the exact top-64 reaches r. An explicit ``nprobe`` / ``ef_search`` wins.
        track_usage: keep, per slot, when it was last written or retrieved (8 bytes a slot,
            and a stamp per retrieved slot on every query), which the "age" compaction policy
            needs. Default: only when ``policy="age"``; without it, the "age" policy is refused.
        probs: what ``probs`` of a query approximate. "top-k" (the default): attention
            renormalised over the top-k slots, at the cost of the search. "full": attention
            over the whole memory, as Matching Networks attend: every slot the search scored
            counts exactly (all of them on a Flat index, the probed lists of an IVF-Flat
            index, the top-k otherwise) and the rest is estimated per cell and shared among
            classes (:mod:`engine.tail`; ``tail_estimate`` in the result). It costs about 6x
            top-k on IVF at 200k slots (bench/tail.py), which is why it is not the default.
        id_stride, id_offset: automatic ids are drawn from ``id % id_stride == id_offset``
            (a shard of :class:`engine.cluster.ShardedMemory` owns one such class of ids).
        share: the fraction of a sharded memory's slots this memory holds (1/n for a shard of
            n): IVF / HNSW calibrate and search for its share of each query's top-k, which
            is what the merge needs of it (see :func:`engine.index.share_k`).
        centre: l2 only, the point slots are held around (see :mod:`engine.metric`); None (the
            default) chooses it from the first slots written. Kept in the manifest.

    Raises:
        InvalidValueError: a bad dim, metric, temperature, index string, budget or policy.
        MemoryExistsError: ``path`` already holds a memory (use :meth:`open`).
    """

    def __init__(
        self,
        dim: int,
        *,
        metric: str = "cosine",
        index: str = "auto",
        temperature: float | str = "auto",
        path: str | os.PathLike | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        budget: int | str | None = None,
        slack: float = 0.1,
        policy: str = "merge",
        rescore: bool = True,
        recall: float | None = None,
        track_usage: bool | None = None,
        id_stride: int = 1,
        id_offset: int = 0,
        share: float = 1.0,
        probs: str = "top-k",
        centre=None,
    ):
        self.dim = checks.integer("dim", dim)
        if metric not in METRICS:
            raise InvalidValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if not isinstance(index, str):
            raise InvalidValueError(f"index must be a string, got {index!r}")
        if not isinstance(rescore, bool):
            raise InvalidValueError(f"rescore must be True or False, got {rescore!r}")
        if track_usage is None:
            track_usage = policy == "age"
        if not isinstance(track_usage, bool):
            raise InvalidValueError(f"track_usage must be True, False or None, got {track_usage!r}")
        self._track_usage = track_usage
        stride = checks.integer("id_stride", id_stride)
        self._id_space = (checks.integer("id_offset", id_offset, low=0), stride)
        if self._id_space[0] >= stride:
            raise InvalidValueError(f"id_offset must be below id_stride ({stride}), got {id_offset}")
        if probs not in PROBS:
            raise InvalidValueError(f"probs must be one of {PROBS}, got {probs!r}")
        self._probs = probs
        self._check_policy(policy)
        self.metric = metric
        self._metric = Metric(metric, checks.centre(centre, self.dim, metric))
        inner_dim = self._metric.index_dim(self.dim)
        self._auto_temperature = isinstance(temperature, str) and temperature == "auto"
        if isinstance(temperature, str) and not self._auto_temperature:
            raise InvalidValueError(f'temperature must be a number or "auto", got {temperature!r}')
        self._temperature = tuning.FALLBACK if self._auto_temperature else checks.temperature(temperature)
        self._temperature_report: tuning.TemperatureReport | None = None
        self._search = SearchSettings(nprobe=checks.integer("nprobe", nprobe, optional=True),
                                      ef_search=checks.integer("ef_search", ef_search, optional=True))
        if recall is not None and (isinstance(recall, (bool, np.bool_))
                                   or not isinstance(recall, (int, float, np.floating)) or not 0 < recall <= 1):
            raise InvalidValueError(f"recall must be None or a number in (0, 1], got {recall!r}")
        self._recall = None if recall is None else float(recall)
        if isinstance(share, (bool, np.bool_)) or not isinstance(share, (int, float, np.floating)) \
                or not 0 < share <= 1:
            raise InvalidValueError(f"share must be a number in (0, 1], got {share!r}")
        self._share = float(share)
        vector_index = VectorIndex(inner_dim, validate_spec(self.dim, index, metric), self._search,
                                   recall=self._recall, temperature=self._temperature, share=self._share,
                                   metric=metric)
        self._rescore = rescore
        # The slot table keeps vectors only when the index cannot give them back exactly.
        self._keep_vectors = vector_index.spec_lossy and rescore
        self._state = State(SlotTable(inner_dim, self._keep_vectors, track_usage), vector_index)
        self._vocab = Vocabulary()
        self._next_id = 0
        self._slack = checks.fraction("slack", slack, low=0.0, high=1.0)
        self._policy = policy
        self._budget = int(budget) if isinstance(budget, np.integer) else budget
        if budget is not None:
            self._budget_slots(budget)  # validate now
        self._lock = RWLock()
        self._write_mutex = threading.Lock()
        self._store = Store.create(path, self.dim, self._settings()) if path is not None else None

    def _check_policy(self, policy: str) -> None:
        if policy not in compaction.POLICIES:
            raise InvalidValueError(f"unknown policy {policy!r}; choose one of {compaction.POLICIES}")
        if policy == "age" and not self._track_usage:
            raise InvalidValueError("the age policy needs usage times: make the memory with track_usage=True "
                                   "(or policy=\"age\")")

    def _settings(self) -> dict:
        return {"metric": self.metric, "index": self._state.index.spec,
                "temperature": "auto" if self._auto_temperature else self._temperature,
                "temperature_report": self._report_dict(),
                "nprobe": self._search.nprobe, "ef_search": self._search.ef_search, "budget": self._budget,
                "slack": self._slack, "policy": self._policy, "rescore": self._rescore, "recall": self._recall,
                "track_usage": self._track_usage, "id_stride": self._id_space[1], "id_offset": self._id_space[0],
                "share": self._share, "probs": self._probs, "centre": self._metric.as_setting(),
                "next_id": self._next_id, "calibration": self._calibration()}

    def _report_dict(self) -> dict | None:
        report = self._temperature_report
        return report.as_dict() if report is not None else None

    def _calibration(self, state: State | None = None) -> dict | None:
        """The calibration of ``state``'s index (default: the current one), as the manifest keeps it."""
        cal = (state or self._state).index.calibration
        return cal.as_dict() if cal is not None else None

    # -- opening ----------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, *, read_only: bool = False) -> "Memory":
        """Open a durable memory: load its snapshot and replay its write-ahead log.

        Args:
            path: the memory's directory.
            read_only: read it without taking the writer's lock (also a memory another process,
                a server say, holds open): queries and reads answer over what was acknowledged
                when it was opened; every write is refused.

        Returns:
            The memory, durable at ``path``. If the disk refuses the new log segment an
            open starts (a full disk), the memory answers queries and refuses writes.

        Raises:
            FileNotFoundError: no memory at ``path``.
            FormatVersionError: an unknown format version.
            CorruptFileError: a file is missing, short, extra or altered (a torn final
                record of the open log segment, never acknowledged, is dropped).
            MemoryLockedError: the directory is open already (one writer per directory).
        """
        store, rec = Store.open(path, lock=not read_only)
        try:
            mem = cls._recover(rec, store.path)
        except BaseException:
            store.close()  # release the directory's lock; nothing was written
            raise
        if read_only:
            store.fail("it was opened read-only")
            mem._store = store
            return mem
        try:
            store.begin()  # from here on, writes go to a new log segment
        except StorageError as exc:
            store.fail(f"the log could not be reopened for writing ({exc})")
        mem._store = store
        if store.failed is None and store.segments > MAX_WAL_SEGMENTS:
            try:
                mem.save()  # fold the log into a snapshot so recovery stays short
            except StorageError:
                pass  # the log stays as it was; the next open tries again
        return mem

    @classmethod
    def _recover(cls, rec: Recovered, path: Path) -> "Memory":
        """An in-process memory holding the recovered slots."""
        s = rec.settings
        unknown = set(s) - set(SETTINGS) - {"next_id", "calibration", "trained_on", "temperature_report"}
        try:
            if unknown:
                raise InvalidValueError(f"unknown settings {sorted(unknown)}")
            # a memory saved before ``probs`` existed answered with top-k probabilities and still does
            mem = cls(rec.dim, **{"probs": "top-k", **{k: s[k] for k in SETTINGS if k in s}})
            next_id = checks.integer("next_id", s.get("next_id", 0), low=0)
            trained_on = checks.integer("trained_on", s.get("trained_on", 0), low=0)
        except InvalidValueError as exc:
            raise CorruptFileError(f"{path / MANIFEST}: invalid settings ({exc})") from None
        mem._vocab.kind = rec.label_kind
        if mem._auto_temperature:  # the choice saved (before the index is built: its breadth is measured at it)
            saved = tuning.TemperatureReport.from_dict(s.get("temperature_report"))
            if saved is not None:
                try:
                    mem._use_temperature(checks.temperature(saved.temperature))
                    mem._temperature_report = saved
                except InvalidValueError:
                    pass
        mem._state.index.calibration = Calibration.from_dict(s.get("calibration"))  # reused if it still fits
        try:
            mem._state = State.replayed(mem._lifted(rec.replay()), mem._vocab, mem._state.index, mem._keep_vectors,
                                        mem._track_usage, trained_on)
        except ValueError as exc:
            raise CorruptFileError(f"{path}: the snapshot's codes cannot be loaded ({exc})") from None
        # ids of removed slots are never reused by counting up
        mem._next_id = max(next_id, rec.max_id + 1, mem._state.table.max_id() + 1)
        if mem._auto_temperature:  # the choice saved, kept as a running memory would keep it; else made again
            mem._retune()
        return mem

    def _lifted(self, writes):
        """Replayed writes with their vectors as the index holds them (see :mod:`engine.metric`)."""
        for drop, cols in writes:
            if cols is not None and cols.vectors is not None and self._metric.lifted:
                cols = dataclasses.replace(cols, vectors=self._metric.slots(cols.vectors))
            yield drop, cols

    def _persisted(self, cols: Columns) -> Columns:
        """Snapshot columns with the vectors as the caller wrote them."""
        if cols.vectors is None or not self._metric.lifted:
            return cols
        return dataclasses.replace(cols, vectors=self._metric.stored(cols.vectors))

    # -- writing ----------------------------------------------------------------------
    def add(
        self,
        vectors,
        labels: Sequence,
        *,
        ids=None,
        weights=None,
        upsert: bool = False,
    ) -> np.ndarray:
        """Write slots into the memory.

        With a ``path``, the slots are in the fsynced write-ahead log before this
        returns. Under a ``budget``, an add that passes it is compacted together
        with the memory and written as one snapshot: either all of it happens or none.

        Args:
            vectors: (n, dim) or (dim,) finite floats (n may be 0: nothing is written).
            labels: n labels, all int (fitting int64) or all str; the memory keeps one kind.
            ids: n unique ids in [0, 2**63); None assigns fresh ones.
            weights: n slot masses in (0, 1e30] (default 1).
            upsert: replace slots whose id exists instead of refusing them.

        Returns:
            (n,) int64 ids of the written slots.

        Raises:
            DimensionError, InvalidValueError, DuplicateIdError: bad input.
            StorageError: the disk failed; see :class:`~engine.errors.StorageError`.
            On error the memory is unchanged, in process and on disk.
        """
        with self._write_mutex:
            v = checks.vectors(vectors, self.dim, self.metric, allow_empty=True)
            n = len(v)
            labels, kind = self._vocab.check(labels, n)
            w = checks.weights(weights, n)
            ids = self._state.new_ids(ids, n, upsert=upsert, next_id=self._next_id, space=self._id_space)
            if n == 0:
                return ids
            now = time.time()
            old = self._state.rows_of(ids)
            old = old[old >= 0]
            self._choose_centre(v)
            append = (ids, self._vocab.intern(labels, kind), w, self._metric.slots(v), now)
            n_after = self._state.table.n_alive - len(old) + n
            budget = None if self._budget is None else self._budget_slots(self._budget)
            if budget is not None and n_after > budget:
                target = max(1, int(budget * (1 - self._slack)))
                self._commit_compacted(*self._state.live(old, append), target, self._policy, 0, {}, kind)
                self._retune()
                return ids
            if self._store is not None:
                self._store.log_add(Columns(ids, labels, w, v, np.full(n, now)), kind, upsert=upsert)
            with self._applying("add"):
                self._change(old, append, n_after)
                self._vocab.kind = kind
                self._next_id = max(self._next_id, int(ids.max()) + 1)
            self._recalibrate()
            self._retune()
            return ids

    def _choose_centre(self, v: np.ndarray) -> None:
        """l2: centre the memory on its first slots, kept in the manifest before they are logged
        (the log is replayed around it). Readers lift queries under the readers' lock, so none
        lifts around one centre and reads slots held around another."""
        chosen = self._metric.with_centre(v)
        if chosen is self._metric:
            return
        if self._store is not None:
            self._store.update(centre=chosen.as_setting())
        self._metric = chosen

    def remove(self, ids=None, *, labels=None) -> int:
        """Remove slots by id, or every slot of some labels.

        Args:
            ids: an id or a sequence of ids, all present in the memory. None at all is a no-op.
            labels: instead of ids, labels whose slots are all removed (each must have a slot),
                without reading any vector back.

        Returns:
            The number of slots removed.

        Raises:
            UnknownIdError: some ids are not in the memory (listed in ``.ids``); nothing is removed.
            UnknownLabelError: some labels have no slot (listed in ``.labels``); nothing is removed.
            InvalidValueError: both ids and labels, or labels of another kind than the memory's.
            StorageError: the disk failed; nothing is removed.
        """
        if labels is not None:
            if ids is not None:
                raise InvalidValueError("remove takes ids or labels, not both")
            with self._write_mutex:
                values, codes = self._vocab.find(labels)
                counts = self._state.table.class_counts
                absent = list(dict.fromkeys(v for v, c in zip(values, codes)
                                            if c < 0 or c >= len(counts) or counts[c] == 0))
                if absent:
                    raise UnknownLabelError(f"labels with no slot: {absent[:10]}{' ...' if len(absent) > 10 else ''}",
                                            absent)
                return self._remove(self._state.table.sorted_ids_of(np.unique(codes)))
        with self._write_mutex:
            return self._remove(np.unique(checks.ids(ids)))

    def _remove(self, ids: np.ndarray) -> int:
        """Remove ``ids`` (checked, unique; the caller holds the write mutex)."""
        if len(ids) == 0:
            return 0
        rows = self._state.rows_or_raise(ids)
        if self._store is not None:
            self._store.log_remove(ids)
        with self._applying("remove"):
            self._change(rows)
        self._retune()
        return len(rows)

    def compact(self, *, budget: int | str | None = None, policy: str = "merge", seed: int = 0,
                **options) -> CompactionReport:
        """Shrink the memory to a budget while preserving each class's attention mass.

        Every class present keeps at least one slot and its total weight (see
        :mod:`engine.compaction`). Slots a policy keeps unchanged keep their ids;
        merged or distilled slots get fresh ids. The new table and index are built
        aside; a durable memory writes them as a snapshot (the commit point), and
        only then are they swapped in. Readers wait only for the swap, and an error
        at any step leaves the memory as it was. With no budget, compaction only
        drops removed slots.

        Args:
            budget: the most slots to keep (int), or bytes as a string ("64MB").
            policy: "merge", "reservoir", "age" or "distill".
            seed: seed of k-means, sampling and distillation.
            **options: distill options (steps, lr, queries, learn_weights, k, holdout, eval_every).

        Returns:
            A :class:`~engine.results.CompactionReport`.

        Raises:
            EmptyMemoryError: the memory holds no slots.
            InvalidValueError: an unknown policy or option, an option out of range, or a budget
                below the number of classes. Every option is checked, budget or not.
            StorageError: the snapshot could not be written.
            On error the memory is unchanged.
        """
        self._check_policy(policy)
        seed = checks.integer("seed", seed, low=0)
        try:
            compaction.check_options(options)
        except ValueError as exc:
            raise InvalidValueError(str(exc)) from None
        with self._write_mutex:
            if self._state.table.n_alive == 0:
                raise EmptyMemoryError("the memory is empty: nothing to compact")
            slots = None if budget is None else self._budget_slots(budget)
            t0 = time.perf_counter()
            before, dropped = self._state.table.n_alive, self._state.table.n_dead
            after, kept = self._commit_compacted(*self._state.live(), slots, policy, seed, options,
                                                 self._vocab.kind, required=self._store is not None or dropped > 0)
            self._retune()
            return CompactionReport(slots=after, dropped=dropped, merged_away=before - after,
                                    policy=policy if slots is not None else None, budget=slots,
                                    seconds=time.perf_counter() - t0, kept=kept)

    def _commit_compacted(self, live: SlotTable, vectors: np.ndarray, budget: int | None, policy: str, seed: int,
                          options: dict, kind: str | None, *, required: bool = True) -> tuple[int, str | None]:
        """Compact ``live`` aside, write it as a snapshot (the commit point), swap it in.

        Returns the slots kept and what the policy says it kept. Nothing changes unless the
        snapshot is durable.
        """
        next_id = max(self._next_id, int(live.ids.max()) + 1 if live.n_alive else 0)

        def fresh(n: int) -> np.ndarray:
            nonlocal next_id
            ids, next_id = self._state.fresh_ids(n, next_id, taken=live.ids, space=self._id_space)
            return ids

        table, vectors, kept = compaction.shrink(live, vectors, budget=budget, policy=policy,
                                           metric=self._metric, temperature=self._temperature,
                                           seed=seed, options=options, fresh_ids=fresh,
                                           keep_vectors=self._keep_vectors, now=time.time())
        if not required and table.n_alive == live.n_alive:
            return table.n_alive, kept  # nothing to drop or merge, nothing to write
        state = self._state.rebuilt_from(table, vectors)  # aside: readers go on meanwhile
        if self._store is not None:
            self._store.checkpoint(self._persisted(state.snapshot(self._vocab, vectors)), kind,
                                   {"next_id": next_id, "calibration": self._calibration(state),
                                    "trained_on": state.index.trained_on, "temperature_report": self._report_dict()})
        with self._applying("compaction"):
            self._swap(state)
            self._vocab.kind = kind
            self._next_id = next_id
        return table.n_alive, kept

    def _change(self, kill_rows: np.ndarray, append: tuple | None = None, n_after: int = 0) -> None:
        """Apply a logged write: rebuild aside and swap when due, else change the state in place."""
        state = self._state
        if state.too_dead(len(kill_rows)) or (append is not None and state.index.needs_rebuild(n_after)):
            self._swap(state.rebuilt(kill_rows, append))
        else:  # the IVF lists of new rows are found first: readers wait only for the append itself
            lists = state.index.assign(append[3]) if append is not None else None
            with self._lock.write():
                state.apply(kill_rows, append, lists)

    def _recalibrate(self) -> None:
        """Measure the breadth again of an index that grew in place (HNSW) 4x, whose answer was
        measured at a temperature the memory has since softened past, or whose new slots (once
        half as many as it was measured on are written) no longer get the answer or recall it
        was measured for (an IVF whose lists were fit to other data is trained again), outside
        the readers' lock. The write before it is done: if measuring fails, the breadth stays."""
        index = self._state.index
        try:
            if index.stale_calibration():
                index.calibration = self._state.calibrated()  # one reference: readers see old or new
            elif index.drift_due():  # many rows written since: do the new slots still get the answer?
                check = self._state.check_drift()
                if check is not None and check.drifted and index.trained_on and not index.codes_only:
                    # no, and the lists were fit to other data: train them on the memory as it
                    # is now (aside, readers go on) and measure its breadth
                    self._swap(self._state.rebuilt())
                elif check is not None and check.drifted:  # no (a graph, or codes): measure again
                    index.calibration = self._state.calibrated()
        except Exception:  # noqa: BLE001 - a search setting, never worth failing a durable write
            pass

    def _retune(self) -> None:
        """Choose the temperature again (``temperature="auto"``) once the memory can measure it
        and whenever it has grown or shrunk 2x since; the write before it is done, so a
        failure here keeps the previous temperature."""
        if not self._auto_temperature:
            return
        n, last = self._state.table.n_alive, self._temperature_report
        if last is not None and last.slots / 2 < n < 2 * last.slots:
            return
        try:
            report = tuning.calibrate(self._state, self._temperature, metric=self._metric)
        except Exception:  # noqa: BLE001 - a setting measured on the side, never worth failing a durable write
            return
        if report is not None:
            with self._lock.write():
                self._use_temperature(report.temperature)
                self._temperature_report = report
            if self._store is not None:  # so that a reopen answers at the same temperature
                try:
                    self._store.update(temperature_report=report.as_dict())
                except (StorageError, ValueError):
                    pass  # the data is durable; the next checkpoint writes the choice
            self._recalibrate()  # the answer's breadth, if the temperature moved enough to change it

    def _use_temperature(self, value: float) -> None:
        """Attend at ``value`` from here on (the caller holds the write lock, or the memory is
        not shared yet); the index calibrates its breadth for the answer at it."""
        self._temperature = value
        self._state.index.temperature = value

    def calibrate_temperature(self, *, k: int = 64, sample: int = tuning.SAMPLE, seed: int = 0
                              ) -> tuning.TemperatureReport:
        """Choose the temperature now, on a sample of the memory's own slots (see
        :mod:`engine.temperature`), and use it from here on: a memory made with
        ``temperature="auto"`` keeps choosing as it grows, one given a number keeps this one
        (persisted like ``temperature = T``).

        Args:
            k: slots each sampled query attends over.
            sample: slots answered as queries, each left out of its own answer.
            seed: of the sample.

        Returns:
            A :class:`~engine.temperature.TemperatureReport`.

        Raises:
            EmptyMemoryError: fewer than 20 slots, or a single class: nothing to measure.
        """
        k, sample, seed = checks.integer("k", k), checks.integer("sample", sample), checks.integer("seed", seed, low=0)
        if k > tuning.MAX_K or sample > tuning.MAX_SAMPLE:
            raise InvalidValueError(f"k must be at most {tuning.MAX_K} and sample at most {tuning.MAX_SAMPLE}, "
                                    f"got k={k}, sample={sample}")
        with self._write_mutex:
            report = tuning.calibrate(self._state, self._temperature, metric=self._metric, k=k, sample=sample,
                                      seed=seed)
            if report is None:
                raise EmptyMemoryError(f"choosing a temperature needs {tuning.MIN_SLOTS} slots of two classes or more")
            if self._store is not None:  # the choice is persisted before it is used
                if self._auto_temperature:
                    self._store.update(temperature_report=report.as_dict())
                else:
                    self._store.update(temperature=report.temperature)
            with self._lock.write():
                self._use_temperature(report.temperature)
                self._temperature_report = report
            self._recalibrate()
            return report

    @property
    def temperature_report(self) -> "tuning.TemperatureReport | None":
        """What the last choice of the temperature measured (None if none was made)."""
        return self._temperature_report

    def _swap(self, state: State) -> None:
        """Install a state built aside: readers see the old one or the new, never half."""
        with self._lock.write():
            self._state = state

    def _applying(self, what: str):
        """Context for applying a write that is already on disk (see :meth:`Store.applying`)."""
        return self._store.applying(what) if self._store is not None else contextlib.nullcontext()

    def _budget_slots(self, budget: int | str) -> int:
        """A budget in slots (bytes over the bytes a slot takes: measured, or estimated when empty)."""
        if self._state.table.n_alive:
            stats = self.stats()
            per_slot = stats.bytes_total / stats.slots
        else:
            per_slot = (2 if self._keep_vectors else 1) * 4 * self._metric.index_dim(self.dim) + 72.0
        return compaction.parse_budget(budget, per_slot)

    # -- reading ----------------------------------------------------------------------
    def query(self, queries, *, k: int = 64, tail: float | None = None, probs: str | None = None) -> QueryResult:
        """Classify queries by exact softmax attention over their top-k slots (the default,
        ``probs="top-k"``), or over every slot with the unscored rest estimated (``probs="full"``).

        Args:
            queries: (n, dim) or (dim,) finite floats.
            k: slots per query; clamped to the memory's size (``result.k_clamped`` says so).
            tail: if set, the search widens per query until ``tail_bound <= tail`` or every
                slot is scored: k doubles; with ``probs="full"`` on IVF-Flat, the lists
                probed double (``tail_bound`` then covers the slots not scored).
            probs: "full" or "top-k" for this call (default: the memory's ``probs``).

        Returns:
            A :class:`~engine.results.QueryResult`.

        Raises:
            EmptyMemoryError: the memory holds no slots.
            DimensionError, InvalidValueError: bad queries, k or tail.
        """
        q = checks.vectors(queries, self.dim, self.metric, "queries")
        k = checks.integer("k", k)
        if tail is not None:
            checks.fraction("tail", tail, low=0.0, high=1.0, closed_low=False)
        if probs is not None and probs not in PROBS:
            raise InvalidValueError(f"probs must be one of {PROBS}, got {probs!r}")
        full = (probs or self._probs) == "full"
        with self._lock.read():
            state = self._state
            if state.table.n_alive == 0:
                raise EmptyMemoryError("the memory is empty: add slots before querying")
            q = self._metric.queries(q)
            return query.answer(state, self._vocab, q, k=min(k, state.table.n_alive), k_requested=k, tail=tail,
                                temperature=self._temperature, full_metric=self.metric if full else None)

    def retrieve(self, queries, *, k: int = 64, probs: str = "top-k") -> Retrieved:
        """Each query's top-k slots with their scores, masses and labels, and the mass left
        out, without attention: what :class:`engine.cluster.ShardedMemory` merges across
        shards. ``query`` is attention over the same slots. With ``probs="full"``, also
        every class's mass in the full answer (``Retrieved.full``), in absolute log units.

        Raises:
            EmptyMemoryError: the memory holds no slots.
            DimensionError, InvalidValueError: bad queries, k or probs.
        """
        q = checks.vectors(queries, self.dim, self.metric, "queries")
        k = checks.integer("k", k)
        if probs not in PROBS:
            raise InvalidValueError(f"probs must be one of {PROBS}, got {probs!r}")
        with self._lock.read():
            state = self._state
            if state.table.n_alive == 0:
                raise EmptyMemoryError("the memory is empty: add slots before querying")
            q = self._metric.queries(q)
            return query.retrieve(state, self._vocab, q, min(k, state.table.n_alive), temperature=self._temperature,
                                  full_metric=self.metric if probs == "full" else None)

    @property
    def total_weight(self) -> float:
        """The mass of every live slot (an upper bound, its rounding error included)."""
        t = self._state.table
        return t.total_weight + t.weight_error

    @property
    def next_id(self) -> int:
        """The id automatic ids start from: above every id the memory ever held."""
        return self._next_id

    def get(self, ids) -> Slots:
        """Read slots back by id, in the order given.

        Raises:
            UnknownIdError: some ids are not in the memory (listed in ``.ids``).
        """
        ids = checks.ids(ids)
        with self._lock.read():
            rows = self._state.rows_or_raise(ids)
            slots = self._state.columns(self._vocab, rows)
            return Slots(ids=ids.copy(), labels=slots.labels, weights=slots.weights.copy(),
                         vectors=self._metric.stored(slots.vectors))

    def classes(self) -> np.ndarray:
        """The labels with at least one live slot (the columns ``query`` answers over)."""
        with self._lock.read():
            return self._state.classes(self._vocab)[0].copy()

    @property
    def label_kind(self) -> str | None:
        """"int" or "str" once a label was written, else None."""
        return self._vocab.kind

    def ids(self, labels=None) -> np.ndarray:
        """The ids of every slot in the memory, ascending; with ``labels``, of the slots whose
        label is one of them (a label with no slot adds none), without reading vectors.

        Raises:
            InvalidValueError: labels of the wrong shape, type or kind.
        """
        with self._lock.read():
            if labels is None:
                return self._state.table.sorted_ids.copy()
            _, codes = self._vocab.find(labels)
            return self._state.table.sorted_ids_of(np.unique(codes[codes >= 0]))

    def __len__(self) -> int:
        return self._state.table.n_alive

    def __contains__(self, id_) -> bool:
        if isinstance(id_, bool) or not isinstance(id_, (int, np.integer)):
            return False
        with self._lock.read():
            return bool(self._state.rows_of(np.array([id_], np.int64))[0] >= 0)

    def stats(self) -> MemoryStats:
        """Slots, classes, the active index, and the bytes held for vectors, the index, ids and
        (once ``probs="full"`` has built them) the tail summaries."""
        with self._lock.read():
            t, index = self._state.table, self._state.index
            return MemoryStats(
                slots=t.n_alive, classes=int((t.class_counts > 0).sum()), dim=self.dim, metric=self.metric,
                index=index.active_spec, exact=index.exact, tombstones=t.n_dead,
                bytes_vectors=t.nbytes_vectors, bytes_index=index.nbytes, bytes_ids=t.nbytes_ids,
                nlist=index.nlist, lossy=index.lossy, trained_on=index.trained_on,
                nprobe=index.breadth(64)[0], ef_search=index.breadth(64)[1],
                recall=index.calibration.recall if index.calibration is not None else None,
                bytes_tail=self._state.cells_nbytes,
            )

    def bare_search(self, k: int) -> BareSearch:
        """The memory's FAISS index alone, with the search parameters a query of ``k`` uses:
        no masking, rescoring or attention. The baseline benchmarks measure the engine against."""
        with self._lock.read():
            return self._state.index.bare_search(checks.integer("k", k))

    @property
    def calibration(self) -> Calibration | None:
        """What calibrating the search breadth chose and measured (None for an exact index or a
        breadth set by the caller); see :mod:`engine.calibration`."""
        return self._state.index.calibration

    @property
    def calibration_checks(self) -> tuple:
        """The latest checks of the calibrated breadth on the slots written since it was
        measured (:class:`~engine.calibration.DriftCheck`, newest last): one each time half as
        many rows as it was measured on have been written; one that fell short had the breadth
        measured again."""
        return tuple(self._state.index.drift_checks)

    # -- settings and persistence -------------------------------------------------------
    @property
    def temperature(self) -> float:
        """The softmax temperature T (persisted with a durable memory)."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        value = checks.temperature(value)
        with self._write_mutex:
            if self._store is not None:
                self._store.update(temperature=value)
            with self._lock.write():
                self._use_temperature(value)
                self._auto_temperature = False
            self._recalibrate()

    @property
    def search_settings(self) -> SearchSettings:
        """IVF ``nprobe`` and HNSW ``ef_search`` (None: chosen from the index's size and k)."""
        return self._search

    @search_settings.setter
    def search_settings(self, value: SearchSettings) -> None:
        if not isinstance(value, SearchSettings):
            raise InvalidValueError(f"search_settings must be a SearchSettings, got {value!r}")
        value = SearchSettings(nprobe=checks.integer("nprobe", value.nprobe, optional=True),
                               ef_search=checks.integer("ef_search", value.ef_search, optional=True))
        with self._write_mutex:
            if self._store is not None:
                self._store.update(nprobe=value.nprobe, ef_search=value.ef_search)
            with self._lock.write():
                self._search = self._state.index.settings = value

    @property
    def path(self) -> Path | None:
        """The directory of a durable memory, or None."""
        return self._store.path if self._store is not None else None

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write a snapshot.

        With no ``path`` (or the memory's own), a durable memory checkpoints: a new
        snapshot, a fresh write-ahead log, old files dropped. With another ``path``,
        a copy of the memory is written there as a new memory directory.

        Returns:
            The directory written.

        Raises:
            InvalidValueError: no path given for a memory that has none.
            MemoryExistsError: ``path`` holds memory files already.
            StorageError: the disk failed; the memory and its files are as before.
        """
        with self._write_mutex:
            target = Path(path) if path is not None else self.path
            if target is None:
                raise InvalidValueError("this memory is not durable: give save() a path")
            slots = self._persisted(self._state.snapshot(self._vocab))
            if self._store is not None and target.resolve() == self._store.path.resolve():
                self._store.checkpoint(slots, self._vocab.kind, {"next_id": self._next_id,
                                                                 "calibration": self._calibration(),
                                                                 "trained_on": self._state.index.trained_on,
                                                                 "temperature_report": self._report_dict()})
            else:
                out = Store.create(target, self.dim, self._settings())
                try:
                    out.checkpoint(slots, self._vocab.kind, {"trained_on": self._state.index.trained_on})
                finally:
                    out.close()
            return target

    def close(self) -> None:
        """Close the write-ahead log and release the directory. Every acknowledged write is
        already on disk; later writes are refused, queries still answer."""
        with self._write_mutex:
            if self._store is not None:
                self._store.close({"calibration": self._calibration(), "temperature_report": self._report_dict()})

    def __enter__(self) -> "Memory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path else ""
        return (f"Memory(dim={self.dim}, metric={self.metric!r}, index={self._state.index.spec!r}, "
                f"slots={len(self)}, temperature={self._temperature}{where})")
