"""What a server counts, readable over the Flight action ``metrics``.

Per kind of request (query, add, get, and each action): how many, how many failed,
and the latency of the last ``window`` (p50 / p99 in ms). A query's time is also
split into the stages it went through on the server: parsing the request, waiting
for its batch (:mod:`engine.serve.batching`), answering (the memory's query, shared
by a batch), and encoding the answer; what a client measures beyond their sum is
the transport (gRPC, Arrow framing, the client's own work).
"""

from __future__ import annotations

import threading
from collections import Counter, deque

import numpy as np

STAGES = ("parse", "wait", "query", "encode")


class Metrics:
    """Counters and recent latencies, safe to update from every server thread."""

    def __init__(self, window: int = 10_000):
        self._lock = threading.Lock()
        self._window = window
        self.requests: Counter = Counter()
        self.errors: Counter = Counter()
        self._latency: dict[str, deque] = {}

    def record(self, kind: str, seconds: float, ok: bool = True, stages: dict | None = None) -> None:
        """Count one request of ``kind`` that took ``seconds`` (and, for queries, its stages)."""
        with self._lock:
            self.requests[kind] += 1
            if not ok:
                self.errors[kind] += 1
            self._series(kind).append(seconds)
            for stage, value in (stages or {}).items():
                self._series(f"{kind}.{stage}").append(value)

    def _series(self, name: str) -> deque:
        if name not in self._latency:
            self._latency[name] = deque(maxlen=self._window)
        return self._latency[name]

    def as_dict(self, reset: bool = False) -> dict:
        """{"requests": {kind: n}, "errors": {kind: n}, "latency_ms": {kind or kind.stage: {count, p50, p99,
        mean}}} over the last ``window`` requests of each kind; ``reset`` starts counting anew."""
        with self._lock:
            series = {name: np.array(values) * 1e3 for name, values in self._latency.items() if values}
            out = {"requests": dict(self.requests), "errors": dict(self.errors)}
            if reset:
                self.requests, self.errors, self._latency = Counter(), Counter(), {}
        out["latency_ms"] = {name: {"count": int(len(v)), "p50": float(np.percentile(v, 50)),
                                    "p99": float(np.percentile(v, 99)), "mean": float(v.mean())}
                             for name, v in sorted(series.items())}
        return out
