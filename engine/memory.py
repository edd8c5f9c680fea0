"""Memory: the associative memory of Matching Networks, backed by FAISS.

Vinyals et al. (2016), "Matching Networks for One Shot Learning": a support set
is written into an external memory of (embedding, label) slots, and a query is
classified by softmax attention over it. Here the memory is a FAISS index plus a
slot table; a query attends exactly over its top-k slots and reports a bound on
the attention mass it left out (see :mod:`engine.attention`).

Data flows one way:
- writes: validation -> write-ahead log (durable) -> slot table -> index;
- reads: index top-k -> attention -> :class:`~engine.results.QueryResult`.

One writer at a time (a mutex); readers share an :class:`~engine.locks.RWLock`
that a writer takes exclusively only to apply a validated, logged change, so a
query sees the state before or after each write, never half of one.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from . import compaction, wal
from .attention import attend, top_class
from .columns import Columns
from .errors import (
    CorruptFileError,
    DimensionError,
    DuplicateIdError,
    EmptyMemoryError,
    InvalidValueError,
    StorageError,
    UnknownIdError,
)
from .index import SearchSettings, VectorIndex, validate_spec
from .locks import RWLock
from .results import MemoryStats, QueryResult, Slots
from .slots import SlotTable
from .store import MANIFEST, Recovered, Store

METRICS = ("cosine", "ip")
# Rebuild (drop tombstones, renumber rows) once this fraction of rows is dead.
MAX_DEAD_FRACTION = 0.25
# Opening a memory whose log has more segments than this (one per open) checkpoints it.
MAX_WAL_SEGMENTS = 8
INT64_MAX = np.iinfo(np.int64).max
# Bounds that keep attention finite in float64 and tail_bound an upper bound: inner
# products stay below 1e30 (|q.z| <= |q||z|), logits below 1e36, total mass below 1e45.
MAX_NORM = 1e15
MAX_WEIGHT = 1e30
TEMPERATURE_RANGE = (1e-6, 1e6)


class Memory:
    """An external memory of (id, label, weight, vector) slots with top-k attention.

    Args:
        dim: embedding dimension.
        metric: "cosine" (vectors and queries L2-normalised) or "ip" (inner product).
        index: "auto", or a FAISS factory string ("Flat", "HNSW32", "IVF1024,Flat", "IVF256,PQ16", ...).
        temperature: softmax temperature T > 0 of the attention kernel.
        path: a directory to make the memory durable: every add/remove is logged
            and fsynced before it returns. None keeps it in process only.
        nprobe: IVF lists visited per query (default: from the number of lists).
        ef_search: HNSW search breadth (default max(256, 8k)).
        budget: keep the memory within this many slots (an int) or bytes (a string such as
            "64MB"): once an add passes it, the memory compacts down to budget x (1 - slack).
        slack: how far below the budget automatic compaction goes.
        policy: the compaction policy used under a budget ("merge", "reservoir", "age", "distill").
        rescore: with a lossy index (PQ, SQ, ...), keep the float32 vectors and rescore the
            retrieved slots with them, so attention uses exact similarities. False keeps only the
            compressed codes (the smallest memory): similarities, and vectors read back by
            ``get``, snapshots and compaction, are then the index's approximations.

    Raises:
        ValueError: a bad dim, metric, temperature, index string, budget or policy.
        MemoryExistsError: ``path`` already holds a memory (use :meth:`open`).
    """

    def __init__(
        self,
        dim: int,
        *,
        metric: str = "cosine",
        index: str = "auto",
        temperature: float = 0.1,
        path: str | os.PathLike | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        budget: int | str | None = None,
        slack: float = 0.1,
        policy: str = "merge",
        rescore: bool = True,
    ):
        if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim < 1:
            raise InvalidValueError(f"dim must be a positive integer, got {dim!r}")
        if metric not in METRICS:
            raise InvalidValueError(f"metric must be one of {METRICS}, got {metric!r}")
        self.dim = int(dim)
        self.metric = metric
        self._temperature = _check_temperature(temperature)
        for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                      or value < 1):
                raise InvalidValueError(f"{name} must be a positive integer or None, got {value!r}")
        self._settings = SearchSettings(nprobe=None if nprobe is None else int(nprobe),
                                        ef_search=None if ef_search is None else int(ef_search))
        self._index = VectorIndex(self.dim, validate_spec(self.dim, index), self._settings)
        self._rescore = bool(rescore)
        # The slot table keeps vectors only when the index cannot give them back exactly.
        self._keep_vectors = self._index.spec_lossy and self._rescore
        self._table = SlotTable(self.dim, self._keep_vectors)
        self._labels: list = []  # label index -> label value (the memory's vocabulary)
        self._class_cache: tuple | None = None  # (live classes, column of each label index)
        self._label_pos: dict = {}
        self._label_kind: str | None = None
        self._next_id = 0
        if policy not in compaction.POLICIES:
            raise InvalidValueError(f"unknown policy {policy!r}; choose one of {compaction.POLICIES}")
        if isinstance(slack, bool) or not isinstance(slack, (int, float, np.integer, np.floating)) or not 0 <= slack < 1:
            raise InvalidValueError(f"slack must be in [0, 1), got {slack!r}")
        if isinstance(budget, np.integer):
            budget = int(budget)
        self._budget_spec, self._slack, self._policy = budget, float(slack), policy
        if budget is not None:
            self._budget_slots(budget)  # validate now
        self._lock = RWLock()
        self._write_mutex = threading.Lock()
        self._store = Store.create(path, self._config()) if path is not None else None

    def _config(self) -> dict:
        return {"dim": self.dim, "metric": self.metric, "temperature": self._temperature,
                "index": self._index.spec, "nprobe": self._settings.nprobe,
                "ef_search": self._settings.ef_search, "next_id": self._next_id, "budget": self._budget_spec,
                "slack": self._slack, "policy": self._policy, "rescore": self._rescore}

    # -- opening ----------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> "Memory":
        """Open a durable memory: load its snapshot and replay its write-ahead log.

        Args:
            path: the memory's directory.

        Returns:
            The memory, durable at ``path``.

        Raises:
            FileNotFoundError: no memory at ``path``.
            FormatVersionError: an unknown format version.
            CorruptFileError: a file fails its checks (a torn final WAL record is ignored).
            MemoryLockedError: the directory is open already (one writer per directory).
        """
        store, rec = Store.open(path)
        try:
            mem = cls._recover(rec, store.path)
        except BaseException:
            store.close()  # release the directory's lock; nothing was written
            raise
        try:
            store.begin()  # from here on, writes go to a new log segment
        except StorageError as exc:  # e.g. a full disk: the memory still answers queries
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
        """An in-process memory holding a snapshot plus replayed WAL records."""
        cfg = rec.config
        try:
            mem = cls(cfg["dim"], metric=cfg["metric"], index=cfg["index"], temperature=cfg["temperature"],
                      nprobe=cfg.get("nprobe"), ef_search=cfg.get("ef_search"), budget=cfg.get("budget"),
                      slack=cfg.get("slack", 0.1), policy=cfg.get("policy", "merge"),
                      rescore=cfg.get("rescore", True))
        except InvalidValueError as exc:
            raise CorruptFileError(f"{path / MANIFEST}: invalid settings ({exc})") from None
        mem._label_kind = rec.label_kind
        mem._next_id = int(cfg.get("next_id", 0))
        mem._table = SlotTable(mem.dim, keep_vectors=True)  # replay needs the vectors; dropped below
        mem._append_columns(rec.snapshot)
        for r in rec.records:  # replay into the table only; the index is built once at the end
            rows = mem._table.rows_of(r.ids)
            mem._table.kill(rows[rows >= 0])
            if r.kind != wal.REMOVE:
                mem._append_columns(r.slots)
        full = mem._table.compacted()
        mem._index = mem._index.build(full.vectors)
        mem._table = full if mem._keep_vectors else full.compacted(keep_vectors=False)
        return mem

    def _append_columns(self, slots: Columns) -> None:
        if len(slots.ids):
            self._table.append(slots.ids, self._intern(slots.labels, self._label_kind), slots.weights, slots.vectors,
                               slots.created, slots.last_used)
            self._next_id = max(self._next_id, int(slots.ids.max()) + 1)

    def _columns(self) -> Columns:
        """The live slots as persistence columns."""
        t = self._table
        rows = t.live_rows()
        return Columns(t.ids[rows], [self._labels[i] for i in t.label_idx[rows]], t.weights[rows],
                       self._vectors_of(rows), t.created[rows], t.last_used[rows])

    def _vectors_of(self, rows: np.ndarray) -> np.ndarray:
        """Vectors of table rows: from the table if it keeps them, else read back from the index."""
        if self._table.keep_vectors:
            return self._table.vectors[rows]
        return self._index.reconstruct(rows)

    def _rebuilt(self, drop_rows: np.ndarray | None = None, append: tuple | None = None) -> tuple:
        """A new (table, index) pair of the live rows less ``drop_rows``, plus ``append`` rows.

        Built aside from the current pair, which readers go on using meanwhile.
        """
        rows = self._table.live_rows(drop_rows)
        vectors = self._vectors_of(rows)
        table = self._table.compacted(drop_rows=drop_rows)
        if append is not None:
            table.append(*append)
            vectors = np.concatenate([vectors, append[3]])
        return table, self._index.build(vectors)

    def _swap(self, table: SlotTable, index: VectorIndex | None = None) -> None:
        """Install a table (and index) built aside: readers see the old pair or the new, never half."""
        with self._lock.write():
            self._class_cache = None  # the live classes may change
            self._table = table
            if index is not None:
                self._index = index

    def _applying(self, what: str):
        """Context for applying a write that is already logged: if applying fails, the log and
        the memory disagree, so the store refuses further writes until the memory is reopened."""
        return _Applying(self._store, what)

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
            v = self._check_vectors(vectors, "vectors", allow_empty=True)
            n = len(v)
            labels, kind = self._check_labels(labels, n)
            w = self._check_weights(weights, n)
            ids = self._check_new_ids(ids, n, upsert)
            if n == 0:
                return ids
            now = time.time()
            old_rows = self._table.rows_of(ids)
            old_rows = old_rows[old_rows >= 0]
            if self._budget_spec is not None:
                budget = self._budget_slots(self._budget_spec)
                if self._table.n_alive - len(old_rows) + n > budget:
                    target = max(1, int(budget * (1 - self._slack)))
                    live = self._live(old_rows, (ids, self._intern(labels, kind), w, v, now))
                    self._install(*self._compacted(*live, target, self._policy, 0, {}), kind)
                    return ids
            if self._store is not None:
                self._store.log_add(Columns(ids, labels, w, v, np.full(n, now), np.zeros(n)), kind, upsert=upsert)
            with self._applying("add"):
                self._apply_add(ids, labels, kind, w, v, now, old_rows)
            return ids

    def _apply_add(self, ids: np.ndarray, labels: list, kind: str, w: np.ndarray, v: np.ndarray, now: float,
                   old_rows: np.ndarray) -> None:
        n_alive_after = self._table.n_alive - len(old_rows) + len(ids)
        label_idx = self._intern(labels, kind)
        if self._index.needs_rebuild(n_alive_after) or self._too_dead(len(old_rows)):
            self._swap(*self._rebuilt(old_rows, (ids, label_idx, w, v, now)))
        else:
            with self._lock.write():
                self._class_cache = None  # the live classes may change
                self._table.kill(old_rows)
                self._table.append(ids, label_idx, w, v, now)
                self._index.add(v)
        self._label_kind = kind
        self._next_id = max(self._next_id, int(ids.max()) + 1)

    def remove(self, ids) -> int:
        """Remove slots by id.

        Args:
            ids: an id or a sequence of ids, all present in the memory. None at all is a no-op.

        Returns:
            The number of slots removed.

        Raises:
            UnknownIdError: some ids are not in the memory (listed in ``.ids``); nothing is removed.
            StorageError: the disk failed; nothing is removed.
        """
        with self._write_mutex:
            ids = np.unique(_as_ids(ids))
            if len(ids) == 0:
                return 0
            rows = self._rows_or_raise(ids)
            if self._store is not None:
                self._store.log_remove(ids)
            with self._applying("remove"):
                if self._too_dead(len(rows)):
                    self._swap(*self._rebuilt(rows))
                else:
                    with self._lock.write():
                        self._class_cache = None  # the live classes may change
                        self._table.kill(rows)
            return len(rows)

    def compact(self, *, budget: int | str | None = None, policy: str = "merge", seed: int = 0, **options) -> dict:
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
            {"slots", "dropped", "merged_away", "policy", "budget", "seconds"}.

        Raises:
            EmptyMemoryError: the memory holds no slots.
            InvalidValueError: an unknown policy or option, an option out of range, or a budget
                below the number of classes.
            StorageError: the snapshot could not be written.
            On error the memory is unchanged.
        """
        if policy not in compaction.POLICIES:
            raise InvalidValueError(f"unknown policy {policy!r}; choose one of {compaction.POLICIES}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise InvalidValueError(f"seed must be a non-negative integer, got {seed!r}")
        try:
            compaction.check_options(options)
        except ValueError as exc:
            raise InvalidValueError(str(exc)) from None
        with self._write_mutex:
            if self._table.n_alive == 0:
                raise EmptyMemoryError("the memory is empty: nothing to compact")
            slots = None if budget is None else self._budget_slots(budget)
            t0 = time.perf_counter()
            before, dropped = self._table.n_alive, self._table.n_dead
            table, vectors, next_id = self._compacted(*self._live(), slots, policy, seed, options)
            if self._store is not None or table.n_alive != before or dropped:
                self._install(table, vectors, next_id, self._label_kind)
            return {"slots": table.n_alive, "dropped": dropped, "merged_away": before - table.n_alive,
                    "policy": policy if slots is not None else None, "budget": slots,
                    "seconds": time.perf_counter() - t0}

    def _live(self, drop_rows: np.ndarray | None = None, append: tuple | None = None) -> tuple:
        """(table, vectors) of the live rows less ``drop_rows`` plus ``append``, built aside."""
        rows = self._table.live_rows(drop_rows)
        vectors = self._vectors_of(rows)
        table = self._table.compacted(drop_rows=drop_rows, keep_vectors=False)
        if append is not None:
            table.append(*append)
            vectors = np.concatenate([vectors, append[3]])
        return table, vectors

    def _compacted(self, live: SlotTable, vectors: np.ndarray, budget: int | None, policy: str, seed: int,
                   options: dict) -> tuple[SlotTable, np.ndarray, int]:
        """(table, vectors, next id) of ``live`` compacted to ``budget`` slots; nothing is changed."""
        if budget is None or budget >= live.n_alive:
            table = SlotTable(self.dim, self._keep_vectors)
            table.append(live.ids, live.label_idx, live.weights, vectors, live.created, live.last_used)
            table.class_counts = np.pad(table.class_counts, (0, max(0, len(live.class_counts) - len(table.class_counts))))
            return table, vectors, max(self._next_id, int(live.ids.max()) + 1 if live.n_alive else 0)
        classes = int((live.class_counts > 0).sum())
        if budget < classes:
            raise InvalidValueError(f"a budget of {budget} slots cannot keep {classes} classes (one slot each)")
        try:
            out = compaction.compact(vectors, live.weights, live.label_idx, live.created, live.last_used,
                                     budget=budget, policy=policy, cosine=self.metric == "cosine",
                                     temperature=self._temperature, seed=seed, **options)
        except ValueError as exc:
            raise InvalidValueError(str(exc)) from None
        kept = out.source >= 0
        src = np.maximum(out.source, 0)
        ids = np.where(kept, live.ids[src], -1)
        fresh, next_id = self._fresh_ids(int((~kept).sum()), base=max(self._next_id, int(live.ids.max()) + 1),
                                         taken=live.ids)
        ids[~kept] = fresh
        now = time.time()
        table = SlotTable(self.dim, self._keep_vectors)
        table.append(ids, out.label_idx, out.weights, out.vectors, np.where(kept, live.created[src], now),
                     np.where(kept, live.last_used[src], 0.0))
        table.class_counts = np.pad(table.class_counts, (0, max(0, len(live.class_counts) - len(table.class_counts))))
        return table, out.vectors, next_id

    def _install(self, table: SlotTable, vectors: np.ndarray, next_id: int, kind: str | None) -> None:
        """Make a table built aside the memory: index it, snapshot it (the commit point), swap it in."""
        index = self._index.build(vectors)  # aside: readers go on meanwhile
        if self._store is not None:
            columns = Columns(table.ids.copy(), [self._labels[i] for i in table.label_idx], table.weights.copy(),
                              vectors, table.created.copy(), table.last_used.copy())
            self._store.checkpoint(columns, kind, {"next_id": next_id})
        with self._applying("compaction"):
            self._swap(table, index)
            self._label_kind = kind
            self._next_id = next_id

    def _fresh_ids(self, n: int, *, base: int | None = None, taken: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        """n ids no slot has, and the next id after them.

        Counts up from the next id; once that would pass the int64 limit (a caller
        wrote ids near it), takes the lowest ids no live slot holds instead.
        """
        start = self._next_id if base is None else base
        if start + n - 1 <= INT64_MAX:
            return np.arange(start, start + n, dtype=np.int64), start + n
        used = self._table.ids[self._table.alive] if taken is None else taken
        if taken is not None:
            used = np.union1d(used, self._table.ids[self._table.alive])
        candidates = np.setdiff1d(np.arange(len(used) + n, dtype=np.int64), used)[:n]
        if len(candidates) < n:  # pragma: no cover - 2**63 live slots
            raise InvalidValueError("no free ids left")
        return candidates, start

    def _budget_slots(self, budget: int | str) -> int:
        """A budget in slots: an int as is, bytes ("64MB", "2GB", "500000B") over the bytes a slot takes."""
        if isinstance(budget, (int, np.integer)) and not isinstance(budget, bool):
            if budget < 1:
                raise InvalidValueError(f"budget must be at least 1 slot, got {budget}")
            return int(budget)
        if isinstance(budget, str):
            m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]?B)\s*", budget.upper())
            if m:
                nbytes = float(m.group(1)) * {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}[m.group(2)]
                return max(1, int(nbytes // self._bytes_per_slot()))
        raise InvalidValueError(f"budget must be a number of slots or bytes such as '64MB', got {budget!r}")

    def _bytes_per_slot(self) -> float:
        """Bytes one slot takes: measured when the memory has slots, else vectors twice plus metadata."""
        if self._table.n_alive:
            stats = self.stats()
            return stats.bytes_total / stats.slots
        return (2 if self._keep_vectors else 1) * 4 * self.dim + 72.0

    def _too_dead(self, more_dead: int) -> bool:
        dead = self._table.n_dead + more_dead
        return dead > 1024 and dead > MAX_DEAD_FRACTION * self._table.n_rows

    # -- reading ----------------------------------------------------------------------
    def query(self, queries, *, k: int = 64, tail: float | None = None) -> QueryResult:
        """Classify queries by exact softmax attention over their top-k slots.

        Args:
            queries: (n, dim) or (dim,) finite floats.
            k: slots per query; clamped to the memory's size (``result.k_clamped`` says so).
            tail: if set, k grows (doubling) per query until ``tail_bound <= tail``
                or every slot is used.

        Returns:
            A :class:`~engine.results.QueryResult`.

        Raises:
            EmptyMemoryError: the memory holds no slots.
            DimensionError, InvalidValueError: bad queries, k or tail.
        """
        q = self._check_vectors(queries, "queries")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InvalidValueError(f"k must be a positive integer, got {k!r}")
        if tail is not None and not (0 < tail < 1):
            raise InvalidValueError(f"tail must be in (0, 1), got {tail!r}")
        with self._lock.read():
            n_alive = self._table.n_alive
            if n_alive == 0:
                raise EmptyMemoryError("the memory is empty: add slots before querying")
            k_eff = min(int(k), n_alive)
            scores, rows = self._search(q, k_eff)
            att = self._attend(scores, rows)
            if tail is not None:
                scores, rows, att = self._grow_k(q, scores, rows, att, tail, k_eff, n_alive)
            # for the age policy; a benign race with other readers
            self._table.last_used[rows if rows.min() >= 0 else rows[rows >= 0]] = time.time()
            return self._result(scores, rows, att, int(k))

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k >= self._table.n_alive and not self._index.exact:
            return self._search_all(q)
        alive = self._table.alive if self._table.n_dead else None
        scores, rows = self._index.search(q, k, alive)
        if self._index.lossy and self._table.keep_vectors:  # compressed codes: rescore exactly
            valid = rows >= 0
            exact = np.einsum("nd,nkd->nk", q, self._table.vectors[np.where(valid, rows, 0)])
            scores = np.where(valid, exact, -np.inf).astype(np.float32)
            order = np.argsort(-scores, axis=1, kind="stable")
            scores, rows = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
        return scores, rows

    def _search_all(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every live slot, scored exactly and sorted: what an approximate index cannot promise
        when k covers the whole memory (it may skip lists, or stop short among removed rows)."""
        rows = self._table.live_rows()
        vectors = self._table.vectors[rows] if self._table.keep_vectors else self._index.reconstruct(rows)
        scores = q @ vectors.T
        order = np.argsort(-scores, axis=1, kind="stable")
        return np.take_along_axis(scores, order, 1).astype(np.float32), rows[order]

    def _attend(self, scores: np.ndarray, rows: np.ndarray):
        t = self._table
        classes, columns = self._live_classes()
        if rows.min() >= 0:  # the common case: every query found k slots; no masking needed
            weights = None if t.unit_weights else t.weights[rows]
            class_idx = columns[t.label_idx[rows]]
            n_used = rows.shape[1]
            used = n_used if weights is None else weights.sum(axis=1)
        else:
            valid = rows >= 0
            safe = np.where(valid, rows, 0)
            weights = np.where(valid, t.weights[safe], 1.0)
            class_idx = np.where(valid, columns[t.label_idx[safe]], -1)
            used = np.where(valid, weights, 0.0).sum(axis=1)
            n_used = valid.sum(axis=1)
        if weights is None and t.unit_weights:
            omitted = np.maximum(t.n_alive - n_used, 0).astype(np.float64)  # exact
        else:
            # an upper bound despite rounding: the running total's own error bound, plus the
            # error of summing the k retrieved weights
            err = t.weight_error + used * (rows.shape[1] + 2) * np.finfo(np.float64).eps
            omitted = np.maximum(t.total_weight - used, 0.0) + err
        omitted = np.where(n_used >= t.n_alive, 0.0, omitted)
        return attend(scores, weights, class_idx, n_classes=len(classes),
                      temperature=self._temperature, omitted_weight=omitted)

    def _live_classes(self) -> tuple[np.ndarray, np.ndarray]:
        """(the live classes in vocabulary order, i.e. the columns of ``probs``;
        the column of each label index, -1 for a class with no live slot). Cached until a write."""
        cached = self._class_cache
        if cached is None:
            present = np.flatnonzero(self._table.class_counts > 0)
            columns = np.full(len(self._labels), -1, np.int64)
            columns[present] = np.arange(len(present))
            cached = self._class_cache = (self._label_array(present), columns)
        return cached

    def _grow_k(self, q, scores, rows, att, tail, k, n_alive):
        """Re-run the queries whose tail bound is above ``tail`` with twice the k, until met."""
        todo = np.flatnonzero(att.tail_bound > tail)
        if len(todo) == 0:
            return scores, rows, att
        per_query = [(scores[i], rows[i], att.attention[i], att.class_idx[i], att.tail_bound[i])
                     for i in range(len(q))]
        while len(todo) and k < n_alive:
            k = min(2 * k, n_alive)
            s2, r2 = self._search(q[todo], k)
            a2 = self._attend(s2, r2)
            for j, i in enumerate(todo):
                per_query[i] = (s2[j], r2[j], a2.attention[j], a2.class_idx[j], a2.tail_bound[j])
            todo = todo[a2.tail_bound > tail]
        width = max(len(p[0]) for p in per_query)
        pad = lambda x, fill: np.concatenate([x, np.full(width - len(x), fill, dtype=x.dtype)])  # noqa: E731
        scores = np.stack([pad(p[0], -np.inf) for p in per_query])
        rows = np.stack([pad(p[1], -1) for p in per_query])
        attention = np.stack([pad(p[2], 0.0) for p in per_query])
        class_idx = np.stack([pad(p[3], -1) for p in per_query])
        bound = np.array([p[4] for p in per_query])
        return scores, rows, type(att)(attention=attention, tail_bound=bound, class_idx=class_idx,
                                       n_classes=att.n_classes)

    def _result(self, scores, rows, att, k_requested: int) -> QueryResult:
        classes = self._live_classes()[0]
        if rows.min() >= 0:
            ids, k = self._table.ids[rows], rows.shape[1]
        else:
            valid = rows >= 0
            ids = np.where(valid, self._table.ids[np.where(valid, rows, 0)], -1)
            scores = np.where(valid, scores, np.nan).astype(np.float32)
            k = int(valid.sum(axis=1).max())
        return QueryResult(
            classes=classes,
            labels=classes[top_class(att.attention, att.class_idx, len(classes))],
            ids=ids,
            scores=scores,
            attention=att.attention,
            tail_bound=att.tail_bound,
            exact_bound=self._index.exact,
            k=k,
            k_requested=k_requested,
            slot_classes=att.class_idx,
        )

    def get(self, ids) -> Slots:
        """Read slots back by id, in the order given.

        Raises:
            UnknownIdError: some ids are not in the memory (listed in ``.ids``).
        """
        ids = _as_ids(ids)
        with self._lock.read():
            rows = self._rows_or_raise(ids)
            t = self._table
            return Slots(ids=ids.copy(), labels=[self._labels[i] for i in t.label_idx[rows]],
                         weights=t.weights[rows].copy(), vectors=self._vectors_of(rows))

    def ids(self) -> np.ndarray:
        """The ids of every slot in the memory, ascending."""
        with self._lock.read():
            return self._table.sorted_ids.copy()

    def __len__(self) -> int:
        return self._table.n_alive

    def __contains__(self, id_) -> bool:
        if isinstance(id_, bool) or not isinstance(id_, (int, np.integer)):
            return False
        with self._lock.read():
            return bool(self._table.rows_of(np.array([id_], np.int64))[0] >= 0)

    def stats(self) -> MemoryStats:
        """Slots, classes, and the bytes held for vectors, the index and ids."""
        with self._lock.read():
            t = self._table
            return MemoryStats(
                slots=t.n_alive, classes=int((t.class_counts > 0).sum()), dim=self.dim, metric=self.metric,
                index=self._index.active_spec, exact=self._index.exact, tombstones=t.n_dead,
                bytes_vectors=t.nbytes_vectors, bytes_index=self._index.nbytes, bytes_ids=t.nbytes_ids,
            )

    # -- settings and persistence -------------------------------------------------------
    @property
    def temperature(self) -> float:
        """The softmax temperature T (persisted with a durable memory)."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        value = _check_temperature(value)
        with self._write_mutex:
            if self._store is not None:
                self._store.update(temperature=value)
            with self._lock.write():
                self._temperature = value

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
            ValueError: no path given for a memory that has none.
            MemoryExistsError: ``path`` holds memory files already.
            StorageError: the disk failed; the memory and its files are as before.
        """
        with self._write_mutex:
            target = Path(path) if path is not None else self.path
            if target is None:
                raise InvalidValueError("this memory is not durable: give save() a path")
            slots = self._columns()
            if self._store is not None and target.resolve() == self._store.path.resolve():
                self._store.checkpoint(slots, self._label_kind, {"next_id": self._next_id})
            else:
                out = Store.create(target, self._config())
                try:
                    out.checkpoint(slots, self._label_kind, {"next_id": self._next_id})
                finally:
                    out.close()
            return target

    def close(self) -> None:
        """Close the write-ahead log and release the directory. Every acknowledged write is
        already on disk; later writes are refused, queries still answer."""
        with self._write_mutex:
            if self._store is not None:
                self._store.close()

    def __enter__(self) -> "Memory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path else ""
        return (f"Memory(dim={self.dim}, metric={self.metric!r}, index={self._index.spec!r}, "
                f"slots={len(self)}, temperature={self._temperature}{where})")

    # -- checks at the boundary ---------------------------------------------------------
    def _check_vectors(self, x, what: str, *, allow_empty: bool = False) -> np.ndarray:
        raw = x if isinstance(x, np.ndarray) else None
        try:
            if raw is None:
                raw = np.asarray(x)
            if raw.dtype.kind not in "biufO":
                raise TypeError(f"dtype {raw.dtype}")
            a = raw.astype(np.float32, copy=False)
        except (TypeError, ValueError) as exc:
            raise InvalidValueError(f"{what} must be real numbers: {exc}") from None
        if a.ndim == 1 and not (allow_empty and a.shape == (0,)):
            a = a[None, :]
        if a.ndim == 1:  # an empty sequence: zero rows
            a = a.reshape(0, self.dim)
        if a.ndim != 2 or a.shape[1] != self.dim:
            raise DimensionError(f"{what} must have shape (n, {self.dim}), got {np.shape(x)}")
        if len(a) == 0:
            if allow_empty:
                return np.empty((0, self.dim), np.float32)
            raise InvalidValueError(f"{what} is empty")
        # squared norms in float64: finite exactly when every value is (no float32 overflow)
        sq = np.einsum("ij,ij->i", a, a, dtype=np.float64)
        if not np.isfinite(sq).all():
            bad = ~np.isfinite(a).all(axis=1)
            raise InvalidValueError(f"{what} contain NaN or inf (rows {np.flatnonzero(bad)[:10].tolist()})")
        if self.metric == "cosine":
            if not sq.all():
                raise InvalidValueError(f"{what} contain zero vectors, which have no cosine similarity "
                                        f"(rows {np.flatnonzero(sq == 0)[:10].tolist()})")
            return np.ascontiguousarray(a / np.sqrt(sq)[:, None], dtype=np.float32)
        if (sq > MAX_NORM**2).any():
            raise InvalidValueError(f"{what} have norms above {MAX_NORM:g} (rows "
                                    f"{np.flatnonzero(sq > MAX_NORM**2)[:10].tolist()}): their inner products "
                                    f"would overflow float32")
        return np.ascontiguousarray(a, dtype=np.float32)

    def _check_labels(self, labels, n: int) -> tuple[list, str | None]:
        """The labels as a list of Python ints or strs, and their kind."""
        if isinstance(labels, (str, bytes)) or not hasattr(labels, "__len__"):
            raise InvalidValueError("labels must be a sequence with one label per vector")
        if isinstance(labels, np.ndarray) and labels.ndim != 1:
            raise InvalidValueError(f"labels must be 1-d, got shape {labels.shape}")
        if len(labels) != n:
            raise InvalidValueError(f"{n} vectors but {len(labels)} labels")
        if n == 0:
            return [], self._label_kind
        kinds = {"i": "int", "u": "int", "U": "str"}
        if isinstance(labels, np.ndarray) and labels.dtype.kind in kinds:
            if labels.dtype.kind == "u" and labels.max() > INT64_MAX:
                raise InvalidValueError("int labels must fit int64")
            values, kind = labels.tolist(), kinds[labels.dtype.kind]
            if kind == "int":
                values = [int(v) for v in values]
        else:
            values = list(labels)
            if all(isinstance(v, str) for v in values):
                values, kind = [str(v) for v in values], "str"
            elif all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in values):
                values, kind = [int(v) for v in values], "int"
                if any(not -INT64_MAX - 1 <= v <= INT64_MAX for v in values):
                    raise InvalidValueError("int labels must fit int64")
            else:
                types = sorted({type(v).__name__ for v in values})
                raise InvalidValueError(f"labels must be all int or all str in one call, got {types}")
        if kind == "str":
            try:
                for v in values:
                    v.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidValueError("str labels must be valid unicode (no lone surrogates)") from None
        if self._label_kind is not None and kind != self._label_kind:
            raise InvalidValueError(f"this memory's labels are {self._label_kind}, got {kind} labels")
        return values, kind

    @staticmethod
    def _check_weights(weights, n: int) -> np.ndarray:
        if weights is None:
            return np.ones(n, np.float64)
        raw = np.asarray(weights)
        if raw.dtype.kind not in "iuf" or raw.ndim > 1:
            raise InvalidValueError(f"weights must be a 1-d sequence of real numbers, got {raw.dtype} "
                                    f"of shape {raw.shape}")
        w = raw.astype(np.float64).reshape(-1)
        if len(w) != n:
            raise InvalidValueError(f"{n} vectors but {len(w)} weights")
        if not np.isfinite(w).all() or (w <= 0).any() or (w > MAX_WEIGHT).any():
            raise InvalidValueError(f"weights must be finite, > 0 and <= {MAX_WEIGHT:g}")
        return w

    def _check_new_ids(self, ids, n: int, upsert: bool) -> np.ndarray:
        if ids is None:
            return self._fresh_ids(n)[0]
        ids = _as_ids(ids)
        if len(ids) != n:
            raise InvalidValueError(f"{n} vectors but {len(ids)} ids")
        if len(np.unique(ids)) != n:
            raise DuplicateIdError("ids repeat within the batch")
        if not upsert:
            existing = ids[self._table.rows_of(ids) >= 0]
            if len(existing):
                raise DuplicateIdError(f"ids already in the memory (pass upsert=True to replace): "
                                       f"{existing[:10].tolist()}{' ...' if len(existing) > 10 else ''}")
        return ids

    def _rows_or_raise(self, ids: np.ndarray) -> np.ndarray:
        rows = self._table.rows_of(ids)
        if (rows < 0).any():
            unknown = ids[rows < 0].tolist()
            more = " ..." if len(unknown) > 10 else ""
            raise UnknownIdError(f"unknown ids: {unknown[:10]}{more}", unknown)
        return rows

    def _intern(self, labels: list, kind: str | None) -> np.ndarray:
        """Label index of each label, extending the vocabulary with new ones."""
        uniq, inverse = np.unique(np.asarray(labels, dtype=object if kind == "str" else np.int64),
                                  return_inverse=True)
        codes = np.empty(len(uniq), np.int32)
        for j, lab in enumerate(uniq.tolist()):
            pos = self._label_pos.get(lab)
            if pos is None:
                pos = self._label_pos[lab] = len(self._labels)
                self._labels.append(lab)
            codes[j] = pos
        return codes[inverse.reshape(-1)]

    def _label_array(self, idx: np.ndarray) -> np.ndarray:
        values = [self._labels[i] for i in idx]
        return np.array(values, dtype=np.int64 if self._label_kind == "int" else object)


def _as_ids(ids) -> np.ndarray:
    if isinstance(ids, (bool, np.bool_)):
        raise InvalidValueError("ids must be integers, got a bool")
    try:
        a = np.asarray(ids)
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


def _check_temperature(t) -> float:
    if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, float, np.integer, np.floating)):
        raise InvalidValueError(f"temperature must be a number, got {t!r}")
    t = float(t)
    lo, hi = TEMPERATURE_RANGE
    if not math.isfinite(t) or not lo <= t <= hi:
        raise InvalidValueError(f"temperature must be in [{lo:g}, {hi:g}], got {t}")
    return t


class _Applying:
    """See :meth:`Memory._applying`."""

    def __init__(self, store: Store | None, what: str):
        self.store, self.what = store, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and self.store is not None:
            self.store.fail(f"the {self.what} is logged but could not be applied in memory ({exc!r})")
