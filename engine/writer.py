"""The write path of one memory: what a write changes, and the one sequence every write takes.

:class:`Writer` holds a memory's mutable parts (its options, the state readers see, the label
vocabulary, the metric and its centre, the temperature, the next automatic id, the store) and
changes them only through :meth:`Writer.commit`: checked input -> the durable step (a log
record, a snapshot or a manifest update) -> applied in memory -> the temperature and search
breadth kept up to date (:mod:`engine.tuning`). One writer at a time (a mutex); readers share
the state's lock (:class:`~engine.state.Current`), which a writer takes only to swap in a state
built aside or change the current one, so a query sees each write wholly or not at all.
:class:`~engine.memory.Memory` is the facade over it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import checks, compaction
from . import ids as slot_ids
from .errors import CorruptFileError, InvalidValueError, StorageError
from .index import SearchSettings, VectorIndex
from .index.calibration import Calibration
from .labels import Vocabulary
from .metric import Metric
from .options import MemoryOptions
from .results import CompactionReport
from .slots import SlotTable
from .state import Current, State
from .store import Store
from .store.codec import Columns
from .tuning import Tuning
from .tuning.temperature import TemperatureReport

log = logging.getLogger(__name__)


class Writer:
    """A memory's mutable parts and its writes (each method takes the write mutex)."""

    def __init__(self, dim: int, options: MemoryOptions, path: str | os.PathLike | None):
        o = self.options = options.checked_for(dim)
        self.dim = dim
        self.metric = Metric(o.metric, checks.centre(o.centre, dim, o.metric))
        self.tuning = Tuning(o.temperature)
        inner = self.metric.index_dim(dim)
        index = VectorIndex(inner, o.index, SearchSettings(o.nprobe, o.ef_search), recall=o.recall,
                            temperature=self.tuning.value, share=o.shard.share or 1.0 / o.shard.count, metric=o.metric)
        self.keep_vectors = index.spec_lossy and o.rescore  # kept when the index cannot give them back
        self.cur = Current(State(SlotTable(inner, self.keep_vectors, o.tracks_usage), index))
        self.vocab, self.next_id, self.mutex = Vocabulary(), 0, threading.Lock()
        self.store = Store.create(path, dim, self.manifest()) if path is not None else None

    def manifest(self, state: State | None = None, next_id: int | None = None) -> dict:
        """The options and the choices measured on the slots, as the manifest keeps them."""
        cal = (state or self.cur.state).index.calibration
        return {**self.options.to_manifest(), **self.tuning.as_manifest(),
                "next_id": self.next_id if next_id is None else next_id,
                "calibration": cal.as_dict() if cal is not None else None}

    @classmethod
    def opened(cls, path: str | os.PathLike, read_only: bool) -> Writer:
        """The parts of the durable memory at ``path``, recovered (see :meth:`Memory.open`)."""
        store, rec = Store.open(path, lock=not read_only)
        try:
            try:
                w = cls(rec.dim, MemoryOptions.from_manifest(rec.settings), None)
            except InvalidValueError as exc:
                raise CorruptFileError(f"{store.manifest_path}: invalid settings ({exc})") from None
            w.vocab.kind, cur = rec.label_kind, w.cur
            w.tuning.restore(cur, rec.settings.get("temperature_report"))  # the index's breadth is measured at it
            cur.state.index.calibration = Calibration.from_dict(rec.settings.get("calibration"))  # kept if it fits
            cur.state, w.next_id = State.recovered(rec, w.vocab, cur.state.index, w.metric, w.keep_vectors,
                                                   w.options.tracks_usage)
            w.tuning.upkeep(cur, w.metric, None, breadth=False)  # as a running memory would keep it
        except BaseException:
            store.close()  # release the directory's lock; nothing was written
            raise
        w.store = store
        if store.start(read_only=read_only):  # a long log is folded into a snapshot (else next time)
            try:
                w.save(None)
            except StorageError as exc:
                log.warning("%s: the log was not folded into a snapshot (%s); the next open tries again", path, exc)
        return w

    def commit(self, durable: Callable[[Store], None] | None, apply: Callable[[], None], what: str, *,
               breadth: bool = True, tune: bool = True) -> None:
        """Every write (input checked, the mutex held): ``durable`` makes it durable (if it
        fails, nothing changed), ``apply`` applies it (if that fails, the files are ahead and
        later writes are refused), then (``tune``) the temperature and (``breadth``: a write
        that adds slots or changes the temperature) the search breadth are kept up to date."""
        store = self.store
        if store is not None and durable is not None:
            durable(store)
        with store.applying(what) if store is not None else contextlib.nullcontext():
            apply()
        if tune:
            self.tuning.upkeep(self.cur, self.metric, store, breadth=breadth)

    def add(self, vectors, labels, ids, weights, upsert: bool) -> np.ndarray:
        with self.mutex:
            v = checks.vectors(vectors, self.dim, self.metric.name, allow_empty=True)
            labels, kind = self.vocab.check(labels, len(v))
            w, state = checks.weights(weights, len(v)), self.cur.state
            new = self.fresh_ids().take(len(v)) if ids is None else slot_ids.given(
                ids, len(v), upsert=upsert, present=lambda x: state.rows_of(x) >= 0)
            if len(v) == 0:
                return new
            now, old = time.time(), state.rows_of(new)
            old = old[old >= 0]
            self.choose_centre(v)
            append = (new, self.vocab.intern(labels, kind), w, self.metric.slots(v), now)
            n_after, budget = state.table.n_alive - len(old) + len(v), self.options.budget
            if budget is not None and n_after > state.budget_slots(budget):
                target = max(1, int(state.budget_slots(budget) * (1 - self.options.slack)))
                self.compacted(*state.live(old, append), target, self.options.policy, 0, {}, kind)
                return new

            def apply() -> None:
                self.cur.change(old, append, n_after)
                self.vocab.kind, self.next_id = kind, max(self.next_id, int(new.max()) + 1)

            cols = Columns(new, labels, w, v, np.full(len(v), now))
            self.commit(lambda store: store.log_add(cols, kind, upsert=upsert), apply, "add")
            return new

    def fresh_ids(self, start: int | None = None, taken: np.ndarray | None = None) -> slot_ids.Counter:
        table = self.cur.state.table
        used = (lambda: table.sorted_ids) if taken is None else (lambda: np.union1d(table.sorted_ids, taken))
        return slot_ids.Counter(self.next_id if start is None else start, used, self.options.shard)

    def choose_centre(self, v: np.ndarray) -> None:
        """l2: centre the memory on its first slots, in the manifest before they are logged (the
        log is replayed around it); readers lift queries around it under the readers' lock."""
        chosen = self.metric.with_centre(v)
        if chosen is not self.metric:
            if self.store is not None:
                self.store.update(centre=chosen.as_setting())
            self.metric, self.options = chosen, self.options.replace(centre=chosen.as_setting())

    def remove(self, ids, labels) -> int:
        if ids is not None and labels is not None:
            raise InvalidValueError("remove takes ids or labels, not both")
        with self.mutex:
            state = self.cur.state
            gone = state.ids_of_labels(self.vocab, labels) if labels is not None else \
                np.unique(checks.ids(ids)) if ids is not None else np.zeros(0, np.int64)
            rows = state.rows_or_raise(gone)
            if len(rows):
                self.commit(lambda store: store.log_remove(gone), lambda: self.cur.change(rows), "remove",
                            breadth=False)
            return len(rows)

    def compact(self, budget, policy: str, seed, options: dict) -> CompactionReport:
        seed = compaction.check_request(self.options, policy, seed, options)
        with self.mutex:
            state, t0 = self.cur.state, time.perf_counter()
            checks.not_empty(state.table.n_alive, "nothing to compact")
            slots = None if budget is None else state.budget_slots(budget)
            before, dropped = state.table.n_alive, state.table.n_dead
            after, kept = self.compacted(*state.live(), slots, policy, seed, options, self.vocab.kind,
                                         required=self.store is not None or dropped > 0)
            return CompactionReport(slots=after, dropped=dropped, merged_away=before - after,
                                    policy=policy if slots is not None else None, budget=slots,
                                    seconds=time.perf_counter() - t0, kept=kept)

    def compacted(self, live: SlotTable, vectors: np.ndarray, budget: int | None, policy: str, seed: int,
                  options: dict, kind: str | None, *, required: bool = True) -> tuple[int, str | None]:
        """Compact ``live`` aside and commit it as a snapshot; the slots kept and the policy's note."""
        fresh = self.fresh_ids(max(self.next_id, int(live.ids.max()) + 1 if live.n_alive else 0), live.ids)
        state, n, kept, vectors = compaction.aside(
            self.cur.state, live, vectors, fresh, budget=budget, policy=policy, metric=self.metric,
            temperature=self.tuning.value, seed=seed, options=options, keep_vectors=self.keep_vectors,
            required=required)
        if state is None:  # nothing to drop or merge, nothing to write
            self.tuning.upkeep(self.cur, self.metric, self.store, breadth=False)
            return n, kept
        slots = self.metric.persisted(state.snapshot(self.vocab, vectors))
        extra = {**self.manifest(state, fresh.next), "trained_on": state.index.trained_on}

        def apply() -> None:
            self.cur.swap(state)
            self.vocab.kind, self.next_id = kind, fresh.next

        self.commit(lambda store: store.checkpoint(slots, kind, extra), apply, "compaction", breadth=False)
        return n, kept

    def calibrate_temperature(self, k: int, sample: int, seed: int) -> TemperatureReport:
        with self.mutex:
            report = self.tuning.calibrate(self.cur, self.metric, k=k, sample=sample, seed=seed)
            self.set_temperature(report.temperature, report)
            return report

    def set_temperature(self, value: float, report: TemperatureReport | None = None) -> None:
        """Attend at ``value``: a choice ``report``ed keeps an "auto" memory choosing; a number
        set by hand ends the automatic choice."""
        auto = report is not None and self.tuning.auto
        setting = {"temperature_report": report.as_dict()} if auto and report else {"temperature": value}

        def apply() -> None:
            self.tuning.use(self.cur, value, report)
            self.tuning.auto, self.options = auto, self.options.replace(temperature="auto" if auto else value)

        self.commit(lambda store: store.update(**setting), apply, "temperature")

    def set_search(self, new: SearchSettings) -> None:
        def apply() -> None:
            with self.cur.lock.write():
                self.cur.state.index.settings = new
            self.options = self.options.replace(nprobe=new.nprobe, ef_search=new.ef_search)

        with self.mutex:
            self.commit(lambda store: store.update(nprobe=new.nprobe, ef_search=new.ef_search), apply, "search",
                        tune=False)

    def save(self, path: str | os.PathLike | None) -> Path:
        target = Path(path) if path is not None else (self.store.path if self.store is not None else None)
        if target is None:
            raise InvalidValueError("this memory is not durable: give save() a path")
        slots = self.metric.persisted(self.cur.state.snapshot(self.vocab))
        settings = {**self.manifest(), "trained_on": self.cur.state.index.trained_on}
        if self.store is not None and target.resolve() == self.store.path.resolve():
            self.store.checkpoint(slots, self.vocab.kind, settings)
        else:
            Store.write_copy(target, self.dim, settings, slots, self.vocab.kind)
        return target

    def close(self) -> None:
        with self.mutex:
            if self.store is not None:
                self.store.close(self.manifest())
