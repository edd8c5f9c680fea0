"""Dynamic batching: concurrent small query requests to one memory become one FAISS call.

Many clients sending one query each is the common case for a served memory, and
each :meth:`~engine.Memory.query` call pays its fixed costs (locks, parameter
set-up, a FAISS call with one row). As inference servers do, the first small
request to arrive leads a batch: it waits at most ``max_wait`` seconds (or until
``max_rows`` rows are pending), takes every pending request with the same ``k``,
runs one query over their rows, and hands each request its rows of the answer.
No thread is added: waiting requests sleep on a condition until their answer is
set. Requests asking for ``tail`` growth, larger ones, and requests whose
vectors do not have the memory's dimension are answered on their own (a bad
request never fails its neighbours); so is a batch whose query raises, request
by request, so each caller gets its own error.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from ..memory import Memory
from ..results import QueryResult


class _Request:
    __slots__ = ("queries", "k", "probs", "result", "error", "done")

    def __init__(self, queries: np.ndarray, k: int, probs: str | None):
        self.queries, self.k, self.probs = queries, k, probs
        self.result: QueryResult | None = None
        self.error: BaseException | None = None
        self.done = False


class QueryBatcher:
    """Coalesce concurrent small queries to ``memory``.

    Args:
        memory: the memory queried.
        max_wait: the longest a request waits for others to join its batch (seconds).
        max_rows: requests of at most this many rows are batched, and a batch closes
            early once this many rows are pending.
    """

    def __init__(self, memory: Memory, *, max_wait: float = 0.001, max_rows: int = 256):
        self.memory, self.max_wait, self.max_rows = memory, max_wait, max_rows
        self._cond = threading.Condition()
        self._pending: list[_Request] = []
        self._leading = False
        self.requests = 0  # requests answered through the batcher
        self.calls = 0  # Memory.query calls they took

    def query(self, queries: np.ndarray, *, k: int, tail: float | None = None, probs: str | None = None) -> QueryResult:
        """Answer like ``memory.query(queries, k=k, tail=tail, probs=probs)``."""
        queries = np.asarray(queries)
        if (self.max_wait <= 0 or tail is not None or queries.ndim != 2 or len(queries) > self.max_rows
                or queries.shape[1] != self.memory.dim):
            return self._ask(queries, k=k, tail=tail, probs=probs)
        req = _Request(queries, k, probs)
        with self._cond:
            self._pending.append(req)
            self.requests += 1
            if self._leading:  # a leader is collecting: it will answer this one too
                self._cond.notify_all()
                while not req.done:
                    self._cond.wait()
                return self._outcome(req)
            self._leading = True
            deadline = time.monotonic() + self.max_wait
            while sum(len(r.queries) for r in self._pending) < self.max_rows:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, self._pending = self._pending, []
            self._leading = False
        for key in dict.fromkeys((r.k, r.probs) for r in batch):  # one call per (k, probs)
            self._answer([r for r in batch if (r.k, r.probs) == key], *key)
        with self._cond:
            self._cond.notify_all()
        return self._outcome(req)

    def _ask(self, queries, *, k: int, tail: float | None = None, probs: str | None = None) -> QueryResult:
        """``memory.query``, passing ``probs`` only when a caller chose it (a memory of another
        kind may not take it)."""
        if probs is None:
            return self.memory.query(queries, k=k, tail=tail)
        return self.memory.query(queries, k=k, tail=tail, probs=probs)

    def _answer(self, group: list[_Request], k: int, probs: str | None) -> None:
        """One query for the whole group; if it fails, each request on its own."""
        self.calls += 1
        try:
            res = self._ask(np.concatenate([r.queries for r in group]), k=k, probs=probs)
        except Exception:
            res = None
        lo = 0
        for r in group:
            try:
                if res is not None:
                    r.result = res.rows(lo, lo + len(r.queries))
                else:
                    self.calls += 1
                    r.result = self._ask(r.queries, k=k, probs=probs)
            except Exception as exc:  # handed to the caller, not raised in the leader
                r.error = exc
            lo += len(r.queries)
            with self._cond:
                r.done = True

    @staticmethod
    def _outcome(req: _Request) -> QueryResult:
        if req.error is not None:
            raise req.error
        return req.result
