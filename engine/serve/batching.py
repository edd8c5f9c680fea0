"""Dynamic batching: concurrent small query requests to one memory become one FAISS call.

Many clients sending one query each is the common case for a served memory, and
each :meth:`~engine.Memory.query` call pays its fixed costs (locks, parameter
set-up, a FAISS call with one row). Requests are batched the way a group commit
batches log writes: a request that finds no query running becomes the leader and
answers at once every request pending then (so an idle server adds no wait);
requests that arrive while a query runs wait for it, and the first of them to
wake leads the next batch with all that accumulated meanwhile. The batch thus
grows with the load, with no window to tune. ``max_wait`` adds an optional wait
for more rows, taken only while the load is batching already (the last batch held
more than one request). Each group of one ``(k, probs)`` is one call; requests
asking for ``tail`` growth, larger ones, and requests whose vectors do not have the
memory's dimension are answered on their own (a bad request never fails its
neighbours); so is a batch whose query raises, request by request, so each caller
gets its own error.

The queue is bounded: past ``max_queue`` requests admitted and not yet answered,
a request is refused at once with :class:`~engine.errors.ServerBusyError` rather
than waiting without bound.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import numpy as np

from ..errors import ServerBusyError
from ..results import QueryResult


class _Request:
    __slots__ = ("queries", "k", "probs", "result", "error", "done", "started", "answered")

    def __init__(self, queries: np.ndarray, k: int, probs: str | None):
        self.queries, self.k, self.probs = queries, k, probs
        self.result: QueryResult | None = None
        self.error: BaseException | None = None
        self.done = False
        self.started = self.answered = 0.0  # when its batch started, when its answer was ready


class QueryBatcher:
    """Coalesce concurrent small queries to ``memory``.

    Args:
        memory: the memory queried (anything with ``query`` and ``dim``).
        max_wait: the longest a leader waits for more rows while the load is batching (seconds);
            0 never waits.
        max_rows: requests of at most this many rows are batched, and a batch takes at most
            this many rows (a larger one is answered on its own).
        max_queue: the most requests admitted and not yet answered (batched or answered alone,
            whatever their rows); past it requests are refused with ServerBusyError. 0: no
            bound. Batching off (``enabled=False``) still bounds the queue.
        enabled: coalesce requests (False: each request is its own call).
    """

    def __init__(self, memory, *, max_wait: float = 0.0, max_rows: int = 256, max_queue: int = 256,
                 enabled: bool = True):
        self.memory, self.max_wait, self.max_rows = memory, max_wait, max_rows
        self.max_queue, self.enabled = max_queue, enabled
        self._cond = threading.Condition()
        self._pending: list[_Request] = []
        self._running = False
        self._queued = 0  # requests admitted and not yet answered
        self._last_batch = 1
        self.requests = 0  # requests answered through the batcher
        self.calls = 0  # Memory.query calls they took
        self.busy = 0  # requests refused as busy
        self.sizes: Counter = Counter()  # requests per call -> calls

    def counts(self, reset: bool = False) -> dict:
        """Requests batched, the calls they took, busy refusals, requests waiting now, and calls
        by requests batched; ``reset`` starts counting anew."""
        with self._cond:
            out = {"requests": self.requests, "calls": self.calls, "busy": self.busy, "queued": self._queued,
                   "batch_sizes": {str(size): n for size, n in sorted(self.sizes.items())}}
            if reset:
                self.requests = self.calls = self.busy = 0
                self.sizes = Counter()
        return out

    def query(self, queries: np.ndarray, *, k: int, tail: float | None = None, probs: str | None = None,
              timing: dict | None = None) -> QueryResult:
        """Answer like ``memory.query(queries, k=k, tail=tail, probs=probs)``; ``timing``, if
        given, gets the seconds the request waited for its batch ("wait") and the batch's
        query took ("query").

        Raises:
            ServerBusyError: ``max_queue`` requests are waiting already.
        """
        t_in = time.perf_counter()
        queries = np.asarray(queries)
        with self._cond:
            if self.max_queue and self._queued >= self.max_queue:
                self.busy += 1
                raise ServerBusyError(f"the server is busy ({self._queued:,} queries waiting, at most "
                                      f"{self.max_queue:,}); try again shortly")
            self._queued += 1
        try:
            if (not self.enabled or tail is not None or queries.ndim != 2 or len(queries) > self.max_rows
                    or queries.shape[1] != self.memory.dim):
                try:
                    return self._ask(queries, k=k, tail=tail, probs=probs)
                finally:
                    if timing is not None:
                        timing.update(wait=0.0, query=time.perf_counter() - t_in)
            req = _Request(queries, k, probs)
            try:
                return self._batched(req)
            finally:
                if timing is not None and req.started:
                    timing.update(wait=req.started - t_in, query=req.answered - req.started)
        finally:
            with self._cond:
                self._queued -= 1

    def _batched(self, req: _Request) -> QueryResult:
        with self._cond:
            self._pending.append(req)
            self.requests += 1
            if self._running:  # a leader waiting for more rows (max_wait) may have enough now
                self._cond.notify_all()
            while self._running and not req.done:
                self._cond.wait()
            if req.done:  # a leader answered it
                return self._outcome(req)
            self._running = True  # this request leads: it answers everything pending now
            if self.max_wait > 0 and self._last_batch > 1:  # under load: let a few more rows join
                deadline = time.monotonic() + self.max_wait
                while sum(len(r.queries) for r in self._pending) < self.max_rows:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            batch, rest, rows = [req], [], len(req.queries)
            for r in self._pending:  # oldest first, up to max_rows; the leader's own request always
                if r is not req and rows + len(r.queries) <= self.max_rows:
                    batch.append(r)
                    rows += len(r.queries)
                elif r is not req:
                    rest.append(r)
            self._pending = rest
            self._last_batch = len(batch)
            self.sizes[len(batch)] += 1
        started = time.perf_counter()
        for r in batch:
            r.started = started
        try:
            for key in dict.fromkeys((r.k, r.probs) for r in batch):  # one call per (k, probs)
                self._answer([r for r in batch if (r.k, r.probs) == key], *key)
        finally:
            with self._cond:
                for r in batch:
                    if r.result is None and r.error is None:  # the leader was interrupted (a BaseException)
                        r.error = RuntimeError("the batch this query joined was interrupted")
                    r.done = True
                self._running = False
                self._cond.notify_all()
        return self._outcome(req)

    def _ask(self, queries, *, k: int, tail: float | None = None, probs: str | None = None) -> QueryResult:
        """``memory.query``, passing ``probs`` only when a caller chose it (a memory of another
        kind may not take it)."""
        if probs is None:
            return self.memory.query(queries, k=k, tail=tail)
        return self.memory.query(queries, k=k, tail=tail, probs=probs)

    def _count_call(self) -> None:
        with self._cond:
            self.calls += 1

    def _answer(self, group: list[_Request], k: int, probs: str | None) -> None:
        """One query for the whole group; if it fails, each request on its own."""
        self._count_call()
        try:
            res = self._ask(group[0].queries if len(group) == 1 else np.concatenate([r.queries for r in group]),
                            k=k, probs=probs)
        except Exception:
            res = None
        lo = 0
        for r in group:
            try:
                if res is not None:
                    r.result = res if len(group) == 1 else res.rows(lo, lo + len(r.queries))
                else:
                    self._count_call()
                    r.result = self._ask(r.queries, k=k, probs=probs)
            except Exception as exc:  # handed to the caller, not raised in the leader
                r.error = exc
            r.answered = time.perf_counter()
            lo += len(r.queries)

    @staticmethod
    def _outcome(req: _Request) -> QueryResult:
        if req.error is not None:
            raise req.error
        return req.result
