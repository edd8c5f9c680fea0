"""A Flight server over one or more named durable memories.

Reads (queries, get, stats, health) run concurrently; writes are serialised by
each :class:`~engine.Memory`'s own writer lock, as in the embedded engine. When a
token is configured, writes need ``authorization: Bearer <token>``; reads need it
too unless ``open_reads`` is set. Bad input gets a FlightServerError whose
``extra_info`` carries the engine's exception type, and changes nothing.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import threading

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl

from .. import codec
from ..labels import kind_of
from ..errors import EngineError, UnknownMemoryError
from ..protocol import MemoryLike
from . import wire
from .batching import QueryBatcher

WRITE_ACTIONS = {"remove", "compact", "snapshot"}
READ_ACTIONS = {"stats", "health", "list"}
log = logging.getLogger("engine.serve")
# Anything that looks like a filesystem path is cut out of error messages sent to clients.
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:/[^\s:'\",()]+)+/?")

_PUT = {"memory": wire.MEMORY, "op": (lambda v: v == "add", "'add'", False),
        "upsert": (lambda v: isinstance(v, bool), "true or false", False)}
_EXCHANGE = {"memory": wire.MEMORY, "op": (lambda v: v == "query", "'query'", False),
             "k": (lambda v: wire.is_int(v) and v >= 1, "an integer >= 1", False),
             "tail": (lambda v: v is None or (wire.is_number(v) and 0 < v < 1), "a number in (0, 1) or null", False),
             "probs": (lambda v: v is None or v in ("full", "top-k"), "'full', 'top-k' or null", False)}
_GET = {"memory": wire.MEMORY, "ids": (wire.is_int_list, "a list of integers", True)}
_ACTIONS = {
    "remove": {"memory": wire.MEMORY, "ids": (wire.is_int_list, "a list of integers", True)},
    "stats": {"memory": wire.MEMORY},
    "snapshot": {"memory": wire.MEMORY},
    "compact": {"memory": wire.MEMORY,
                "budget": (lambda v: v is None or wire.is_int(v) or isinstance(v, str),
                           "an integer, a size such as '64MB', or null", False),
                "policy": (lambda v: isinstance(v, str), "a policy name", False),
                "seed": (lambda v: wire.is_int(v), "an integer", False),
                **{name: (lambda v: isinstance(v, (int, float, bool)), "a number or boolean", False)
                   for name in ("steps", "lr", "queries", "learn_weights", "k", "holdout", "eval_every")}},
    "health": {"memory": (lambda v: isinstance(v, str), "a memory name", False)},
    "list": {"memory": (lambda v: isinstance(v, str), "a memory name", False)},
}


def _scrubbed(message: str) -> str:
    """An error message fit for a client: no server paths, one line, bounded."""
    return _PATH.sub("<path>", message).replace("\n", " ")[:2000]


class _AuthFactory(fl.ServerMiddlewareFactory):
    def __init__(self, token: str | None):
        self.token = token

    def start_call(self, info, headers):
        values = headers.get("authorization", [])
        ok = self.token is None or f"Bearer {self.token}" in values
        return _AuthState(ok)


class _AuthState(fl.ServerMiddleware):
    def __init__(self, ok: bool):
        self.ok = ok


class MemoryServer(fl.FlightServerBase):
    """Serve named memories.

    Args:
        memories: name -> a durable :class:`~engine.Memory` or a
            :class:`~engine.cluster.ShardedMemory` (anything :class:`~engine.protocol.MemoryLike`
            with ``dim`` and ``temperature``); the server closes them on shutdown.
        location: where to listen, e.g. "grpc://127.0.0.1:8815" (port 0 picks a free one).
        token: bearer token required for writes (and reads, unless ``open_reads``).
        open_reads: let reads through without a token.
        max_rows: the most rows one add request, or one query batch, may carry.
        chunk_rows: queries answered per result batch (large batches stream back in chunks).
        tls_certificates: [(cert_pem, key_pem)] to serve over TLS (grpc+tls://).
        batch_wait_ms: concurrent small query requests to one memory wait at most this long to
            be answered together by one FAISS call (see :mod:`engine.serve.batching`); 0 turns
            dynamic batching off.
    """

    def __init__(self, memories: dict[str, MemoryLike], location: str = "grpc://127.0.0.1:8815", *,
                 token: str | None = None, open_reads: bool = False, max_rows: int = 1_000_000,
                 chunk_rows: int = 4096, tls_certificates=None, batch_wait_ms: float = 1.0):
        super().__init__(location, middleware={"auth": _AuthFactory(token)},
                         tls_certificates=tls_certificates or [])
        self.memories = dict(memories)
        self.token, self.open_reads = token, open_reads
        self.max_rows, self.chunk_rows = max_rows, chunk_rows
        self._batchers = {name: QueryBatcher(mem, max_wait=batch_wait_ms / 1000) for name, mem in self.memories.items()}

    def batching_stats(self) -> dict:
        """Per memory: small query requests answered by the batcher, and the query calls they took."""
        return {name: {"requests": b.requests, "calls": b.calls} for name, b in self._batchers.items()}

    # -- helpers -------------------------------------------------------------------------
    def _authorize(self, context, *, write: bool) -> None:
        state = context.get_middleware("auth")
        if state is not None and not state.ok and (write or not self.open_reads):
            raise fl.FlightUnauthenticatedError("missing or wrong bearer token")

    def _memory(self, cmd: dict) -> MemoryLike:
        return self.memories[self._memory_name(cmd)]

    def _memory_name(self, cmd: dict) -> str:
        name = cmd.get("memory")
        if not isinstance(name, str) or name not in self.memories:
            raise UnknownMemoryError(f"no memory named {name!r}; this server has {sorted(self.memories)}")
        return name

    def _guarded(self, fn):
        """Run a handler body; engine and input errors become FlightServerError with extra_info."""
        try:
            return fn()
        except fl.FlightError:
            raise
        except (EngineError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
            extra = {"ids": exc.ids[:1000]} if hasattr(exc, "ids") else {}
            message = _scrubbed(str(exc))
            raise fl.FlightServerError(message, extra_info=wire.error_info(exc, message=message, **extra)) from None
        except Exception as exc:  # a bug: log it here, tell the client no more than that it happened
            log.exception("internal error while serving a request")
            raise fl.FlightServerError(f"internal server error ({type(exc).__name__})",
                                       extra_info=wire.error_info(exc, message="internal server error")) from None

    # -- add -----------------------------------------------------------------------------
    def do_put(self, context, descriptor, reader, writer):
        self._authorize(context, write=True)

        def body():
            cmd = wire.fields(wire.parse_command(descriptor.command or b"", "descriptor"), "descriptor", _PUT)
            memory = self._memory(cmd)
            batches, rows = [], 0
            for chunk in reader:  # collect first: an add is all or nothing
                rows += chunk.data.num_rows
                if rows > self.max_rows:
                    raise ValueError(f"request carries more than max_rows={self.max_rows} rows")
                batches.append(chunk.data)
            if not batches:
                raise ValueError("no rows sent")
            table = pa.Table.from_batches(batches)
            names = table.schema.names
            if "label" not in names:
                raise ValueError(f"no 'label' column (got columns {names})")
            vectors = wire.vectors_from(table)
            ids = wire.column_of(table, "id", pa.types.is_integer, "integers")
            weights = wire.column_of(table, "weight", lambda t: pa.types.is_floating(t) or pa.types.is_integer(t),
                                     "numbers")
            labels = wire.column_of(table, "label", codec.is_label_type, "int64 or utf8", as_list=True)
            new = memory.add(vectors, labels, ids=ids, weights=weights, upsert=cmd.get("upsert", False))
            writer.write(pa.py_buffer(np.ascontiguousarray(new, dtype="<i8").tobytes()))

        self._guarded(body)

    # -- query ---------------------------------------------------------------------------
    def do_exchange(self, context, descriptor, reader, writer):
        self._authorize(context, write=False)

        def body():
            cmd = wire.fields(wire.parse_command(descriptor.command or b"", "descriptor"), "descriptor", _EXCHANGE)
            batcher = self._batchers[self._memory_name(cmd)]
            k, tail, probs = cmd.get("k", 64), cmd.get("tail"), cmd.get("probs")
            started = False
            for chunk in reader:
                if chunk.data is None:
                    continue
                if chunk.data.num_rows > self.max_rows:
                    raise ValueError(f"query batch of {chunk.data.num_rows} rows exceeds max_rows={self.max_rows}")
                queries = wire.vectors_from(chunk.data)
                for lo in range(0, len(queries), self.chunk_rows):
                    res = batcher.query(queries[lo : lo + self.chunk_rows], k=k, tail=tail, probs=probs)
                    batch = _result_batch(res)
                    if not started:
                        writer.begin(batch.schema)
                        started = True
                    meta = {"classes": res.classes.tolist(), "exact_bound": res.exact_bound, "k": res.k,
                            "k_requested": res.k_requested}
                    writer.write_with_metadata(batch, pa.py_buffer(json.dumps(meta).encode()))

        self._guarded(body)

    # -- get -----------------------------------------------------------------------------
    def do_get(self, context, ticket):
        self._authorize(context, write=False)

        def body():
            cmd = wire.fields(wire.parse_command(ticket.ticket, "ticket"), "ticket", _GET)
            memory = self._memory(cmd)
            ids = cmd["ids"]
            slots = memory.get(np.asarray(ids, dtype=np.int64) if ids else np.zeros(0, np.int64))
            table = pa.table({"id": pa.array(slots.ids), "label": codec.label_array(slots.labels),
                              "weight": pa.array(slots.weights),
                              "vector": codec.vector_array(slots.vectors.reshape(len(slots.ids), memory.dim))})
            return fl.RecordBatchStream(table)

        return self._guarded(body)

    # -- actions -------------------------------------------------------------------------
    def list_actions(self, context):
        return [("remove", "Remove slots: {memory, ids}"), ("stats", "Memory statistics: {memory}"),
                ("compact", "Compact to a budget with a policy, or drop removed slots: {memory, budget?, policy?}"), ("snapshot", "Checkpoint: {memory}"),
                ("health", "Liveness and memory names"), ("list", "Memory names")]

    def do_action(self, context, action):
        kind = action.type
        if kind not in WRITE_ACTIONS | READ_ACTIONS:
            raise fl.FlightServerError(f"unknown action {kind!r}",
                                       extra_info=wire.error_info(ValueError(f"unknown action {kind!r}")))
        self._authorize(context, write=kind in WRITE_ACTIONS)

        def body():
            cmd = wire.parse_command(action.body.to_pybytes() if action.body else b"{}", "action body")
            wire.fields(cmd, f"{kind} action", _ACTIONS[kind])
            if kind == "health":
                return {"status": "ok", "memories": sorted(self.memories)}
            if kind == "list":
                return {"memories": sorted(self.memories)}
            memory = self._memory(cmd)
            if kind == "remove":
                return {"removed": memory.remove(np.asarray(cmd["ids"], dtype=np.int64))}
            if kind == "stats":
                return {**memory.stats().as_dict(), "temperature": memory.temperature}
            if kind == "compact":
                options = {k: v for k, v in cmd.items() if k != "memory"}
                return memory.compact(**options).as_dict()
            memory.save()
            return {"snapshot": cmd["memory"]}

        result = self._guarded(body)
        yield fl.Result(pa.py_buffer(json.dumps(result).encode()))

    # -- lifecycle -----------------------------------------------------------------------
    def serve_until_signalled(self) -> None:
        """Serve until SIGTERM or SIGINT; in-flight calls finish, then every memory is closed."""
        stop = lambda *_: threading.Thread(target=self.shutdown, daemon=True).start()  # noqa: E731
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        try:
            self.serve()
        finally:
            for memory in self.memories.values():
                memory.close()


def _result_batch(res) -> pa.RecordBatch:
    columns = [
        wire.list_column(res.ids, pa.int64()),
        wire.list_column(res.scores, pa.float32()),
        wire.list_column(res.attention, pa.float64()),
        wire.list_column(res.probs, pa.float64()),
        codec.label_array(res.labels, kind_of(res.classes)),
        pa.array(res.tail_bound),
    ]
    names = list(wire.RESULT_FIELDS)
    if res.tail_estimate is not None:  # a memory with probs="full"
        columns.append(pa.array(np.asarray(res.tail_estimate, np.float64)))
        names.append(wire.TAIL_ESTIMATE)
    return pa.record_batch(columns, names=names)
