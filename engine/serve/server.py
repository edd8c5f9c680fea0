"""A Flight server over one or more named durable memories.

Reads (queries, get, stats, health) run concurrently; writes are serialised by
each :class:`~engine.Memory`'s own writer lock, as in the embedded engine. When a
token is configured, writes need ``authorization: Bearer <token>``; reads need it
too unless ``open_reads`` is set. Bad input gets a FlightServerError whose
``extra_info`` carries the engine's exception type, and changes nothing.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import secrets
import signal
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl

from ..errors import EngineError, InvalidValueError, UnknownMemoryError
from ..labels import kind_of
from ..protocol import MemoryLike
from ..store import codec
from . import wire
from .batching import QueryBatcher
from .client import SMALL_QUERY_ROWS
from .metrics import Metrics

WRITE_ACTIONS = {"remove", "compact", "snapshot"}
READ_ACTIONS = {"stats", "health", "list", "metrics", "query", "ids", "classes"}
log = logging.getLogger("engine.serve")
# Anything that looks like a filesystem path is cut out of error messages sent to clients.
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:/[^\s:'\",()]+)+/?")

_PUT = {"memory": wire.MEMORY, "op": (lambda v: v == "add", "'add'", False),
        "upsert": (lambda v: isinstance(v, bool), "true or false", False)}
_SESSION = {"op": (lambda v: v == "session", "'session'", True)}
_EXCHANGE = {"memory": wire.MEMORY, "op": (lambda v: v == "query", "'query'", False),
             "k": (lambda v: wire.is_int(v) and v >= 1, "an integer >= 1", False),
             "tail": (lambda v: v is None or (wire.is_number(v) and 0 < v < 1), "a number in (0, 1) or null", False),
             "probs": (lambda v: v is None or v in ("full", "top-k"), "'full', 'top-k' or null", False)}
_QUERY = {**{name: check for name, check in _EXCHANGE.items() if name != "op"},
          "classes_token": (lambda v: v is None or wire.is_int(v), "an integer or null", False),
          "rows": (lambda v: wire.is_int(v) and v >= 1, "an integer >= 1", True),
          "dim": (lambda v: wire.is_int(v) and v >= 1, "an integer >= 1", True)}
_GET = {"memory": wire.MEMORY, "ids": (wire.is_int_list, "a list of integers", True)}
_LABELS = (lambda v: isinstance(v, list) and (all(wire.is_int(i) for i in v) or all(isinstance(i, str) for i in v)),
           "a list of integers or of strings", False)
_ACTIONS = {
    "remove": {"memory": wire.MEMORY, "ids": (wire.is_int_list, "a list of integers", False), "labels": _LABELS},
    "ids": {"memory": wire.MEMORY, "labels": _LABELS},
    "classes": {"memory": wire.MEMORY},
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
    "metrics": {"memory": (lambda v: isinstance(v, str), "a memory name", False),
                "reset": (lambda v: isinstance(v, bool), "true or false", False)},
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
        batching: answer concurrent small query requests to one memory together, in one FAISS
            call each batch (see :mod:`engine.serve.batching`): a request that finds none running
            is answered at once, those that arrive meanwhile form the next batch.
        batch_wait_ms: under load (batches of several requests already), a batch waits at most
            this long for more rows; 0 (the default) never waits.
        max_queue: the most query requests waiting at once per memory; past it a request gets
            ``ServerBusyError`` at once (0: no bound).
    """

    def __init__(self, memories: dict[str, MemoryLike], location: str = "grpc://127.0.0.1:8815", *,
                 token: str | None = None, open_reads: bool = False, max_rows: int = 1_000_000,
                 chunk_rows: int = 4096, tls_certificates=None, batching: bool = True, batch_wait_ms: float = 0.0,
                 max_queue: int = 256):
        super().__init__(location, middleware={"auth": _AuthFactory(token)},
                         tls_certificates=tls_certificates or [])
        self.memories = dict(memories)
        self.token, self.open_reads = token, open_reads
        self.max_rows, self.chunk_rows = max_rows, chunk_rows
        self._batchers = {name: QueryBatcher(mem, max_wait=batch_wait_ms / 1000, max_queue=max_queue,
                                             enabled=batching)
                          for name, mem in self.memories.items()}
        self.metrics = Metrics()
        self._classes_lock = threading.Lock()
        self._closing = threading.Lock()
        self._closed = False
        self._stopping = threading.Event()
        self._class_lists: dict[str, tuple] = {}
        # class-list tokens start at a random point: a client never takes another server's list for its own
        self._tokens = itertools.count(secrets.randbits(52))

    def batching_stats(self, reset: bool = False) -> dict:
        """Per memory: query requests answered by the batcher, the query calls they took,
        requests refused as busy, requests waiting now, and calls by requests batched."""
        return {name: b.counts(reset) for name, b in self._batchers.items()}

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

    def _guarded(self, fn, kind: str, stages: dict | None = None):
        """Run a handler body, counted in :attr:`metrics` as ``kind``; engine and input errors
        become FlightServerError with extra_info."""
        t0, ok = time.perf_counter(), False
        try:
            out = self._answered(fn)
            ok = True
            return out
        finally:
            self.metrics.record(kind, time.perf_counter() - t0, ok, stages if ok else None)

    def _answered(self, fn):
        """Run ``fn``; engine and input errors become FlightServerError with extra_info."""
        try:
            return fn()
        except fl.FlightError:
            raise
        except (EngineError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
            extra = {"ids": exc.ids[:1000]} if hasattr(exc, "ids") else {}
            if isinstance(getattr(exc, "labels", None), list):
                extra["labels"] = exc.labels[:1000]
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
                    raise InvalidValueError(f"request carries more than max_rows={self.max_rows} rows")
                batches.append(chunk.data)
            if not batches:
                raise InvalidValueError("no rows sent")
            table = pa.Table.from_batches(batches)
            names = table.schema.names
            if "label" not in names:
                raise InvalidValueError(f"no 'label' column (got columns {names})")
            vectors = wire.vectors_from(table)
            ids = wire.column_of(table, "id", pa.types.is_integer, "integers")
            weights = wire.column_of(table, "weight", lambda t: pa.types.is_floating(t) or pa.types.is_integer(t),
                                     "numbers")
            labels = wire.column_of(table, "label", codec.is_label_type, "int64 or utf8", as_list=True)
            new = memory.add(vectors, labels, ids=ids, weights=weights, upsert=cmd.get("upsert", False))
            writer.write(pa.py_buffer(np.ascontiguousarray(new, dtype="<i8").tobytes()))

        self._guarded(body, "add")

    # -- query ---------------------------------------------------------------------------
    def do_exchange(self, context, descriptor, reader, writer):
        self._authorize(context, write=False)
        try:
            op = wire.parse_command(descriptor.command or b"", "descriptor").get("op")
        except ValueError:
            op = None  # refused below, by the same parse
        if op == "session":
            return self._session(descriptor, reader, writer)

        def body():
            cmd = wire.fields(wire.parse_command(descriptor.command or b"", "descriptor"), "descriptor", _EXCHANGE)
            batcher = self._batchers[self._memory_name(cmd)]
            k, tail, probs = cmd.get("k", 64), cmd.get("tail"), cmd.get("probs")
            started = False
            for chunk in reader:
                if chunk.data is None:
                    continue
                if chunk.data.num_rows > self.max_rows:
                    raise InvalidValueError(f"query batch of {chunk.data.num_rows} rows exceeds "
                                            f"max_rows={self.max_rows}")
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

        self._guarded(body, "query")

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

        return self._guarded(body, "get")

    # -- actions -------------------------------------------------------------------------
    def list_actions(self, context):
        return [("remove", "Remove slots: {memory, ids} or {memory, labels}"),
                ("ids", "Ids of every slot, or of some labels' slots: {memory, labels?}"),
                ("classes", "The labels with a live slot: {memory}"),
                ("stats", "Memory statistics: {memory}"),
                ("compact", "Compact to a budget with a policy, or drop removed slots: {memory, budget?, policy?}"),
                ("snapshot", "Checkpoint: {memory}"),
                ("health", "Liveness and memory names"), ("list", "Memory names"),
                ("metrics", "Requests, latencies (p50/p99, by stage for queries), queue depth and batch sizes"),
                ("query", "A small query in one message: length, JSON header, float32 rows (see docs/serving.md)")]

    def do_action(self, context, action):
        kind = action.type
        if kind not in WRITE_ACTIONS | READ_ACTIONS:
            raise fl.FlightServerError(f"unknown action {kind!r}",
                                       extra_info=wire.error_info(ValueError(f"unknown action {kind!r}")))
        resets = False
        if kind == "metrics" and action.body:
            try:
                resets = wire.parse_command(action.body.to_pybytes(), "action body").get("reset") is True
            except ValueError:
                pass  # refused below, by the same parse
        self._authorize(context, write=kind in WRITE_ACTIONS or resets)  # a reset changes what others read
        if kind == "query":
            return self._small_query(action)

        def body():
            cmd = wire.parse_command(action.body.to_pybytes() if action.body else b"{}", "action body")
            wire.fields(cmd, f"{kind} action", _ACTIONS[kind])
            if kind == "health":
                return {"status": "ok", "memories": sorted(self.memories)}
            if kind == "list":
                return {"memories": sorted(self.memories)}
            if kind == "metrics":
                reset = cmd.get("reset", False)
                return {**self.metrics.as_dict(reset), "batching": self.batching_stats(reset)}
            memory = self._memory(cmd)
            if kind == "remove":
                if ("ids" in cmd) == ("labels" in cmd):
                    raise InvalidValueError("malformed remove action: give 'ids' or 'labels'")
                if "labels" in cmd:
                    return {"removed": memory.remove(labels=cmd["labels"])}
                return {"removed": memory.remove(np.asarray(cmd["ids"], dtype=np.int64))}
            if kind == "ids":
                return {"ids": memory.ids(**({"labels": cmd["labels"]} if "labels" in cmd else {})).tolist()}
            if kind == "classes":
                return {"classes": memory.classes().tolist()}
            if kind == "stats":
                return {**memory.stats().as_dict(), "temperature": memory.temperature}
            if kind == "compact":
                options = {k: v for k, v in cmd.items() if k != "memory"}
                return memory.compact(**options).as_dict()
            memory.save()
            return {"snapshot": cmd["memory"]}

        result = self._guarded(body, kind)
        return [fl.Result(pa.py_buffer(json.dumps(result).encode()))]

    def _session(self, descriptor, reader, writer) -> None:
        """A client's long-lived stream of small queries: each message in is a small query
        (app metadata only, the action's body), each message out its answer (``R`` and the
        result) or its error (``E`` and the error's JSON), so one refused query leaves the
        stream open. It costs one round trip a query, without a call's set-up; it ends when
        the client closes it (an idle client does, so a server can stop)."""
        self._answered(lambda: wire.fields(wire.parse_command(descriptor.command, "descriptor"), "descriptor",
                                           _SESSION))
        for chunk in reader:
            if self._stopping.is_set():  # ends the stream unanswered: the client opens another and is refused
                return
            if chunk.app_metadata is None:
                continue
            stages: dict = {}
            raw = chunk.app_metadata.to_pybytes()
            try:
                out = self._guarded(lambda: self._small_answer(raw, stages), "query", stages)
            except fl.FlightServerError as exc:
                writer.write_metadata(pa.py_buffer(wire.SESSION_ERROR + (exc.extra_info or b"{}")))
                continue
            writer.write_metadata(pa.py_buffer(wire.SESSION_ANSWER + out.to_pybytes()))
            if self._stopping.is_set():  # a stopping server ends each session after the answer in flight
                return

    def _small_query(self, action) -> list:
        """A query in one message each way (see :mod:`engine.serve.wire`): the path of small
        requests, which a bidirectional stream's set-up would dominate."""
        stages: dict = {}
        raw = action.body.to_pybytes() if action.body else b""
        return [fl.Result(self._guarded(lambda: self._small_answer(raw, stages), "query", stages))]

    def _small_answer(self, raw: bytes, stages: dict) -> pa.Buffer:
        """The answer of one small query message (its result as an Arrow IPC stream)."""
        t0 = time.perf_counter()
        header, queries = wire.parse_small_query(raw)
        wire.fields(header, "query action header", _QUERY)
        most = min(self.max_rows, max(self.chunk_rows, SMALL_QUERY_ROWS))
        if len(queries) > most:
            raise InvalidValueError(f"a query action carries at most {most} rows, got {len(queries)}: send more "
                             f"as a stream (DoExchange)")
        batcher = self._batchers[self._memory_name(header)]
        stages["parse"] = time.perf_counter() - t0
        res = batcher.query(queries, k=header.get("k", 64), tail=header.get("tail"), probs=header.get("probs"),
                            timing=stages)
        t1 = time.perf_counter()
        token, names, column_of = self._class_list(header["memory"], res.classes)
        meta = {"classes_token": token, "exact_bound": res.exact_bound, "k": res.k,
                "k_requested": res.k_requested}
        if header.get("classes_token") != token:  # the client does not hold this class list yet
            meta["classes"] = names
        batch = _small_result_batch(res, column_of)
        batch = batch.replace_schema_metadata({wire.QUERY_META: json.dumps(meta)})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as out:
            out.write_batch(batch)
        body = sink.getvalue()
        stages["encode"] = time.perf_counter() - t1
        return body

    def _class_list(self, name: str, classes: np.ndarray) -> tuple[int, list, dict]:
        """(a token naming ``classes``, their labels as a list, each label's column). A memory
        hands out the same array until its classes change, so its list is encoded once and
        sent to a client only when the client's token is another."""
        with self._classes_lock:
            cached = self._class_lists.get(name)
            if cached is None or cached[0] is not classes:  # held: the array's id is not reused meanwhile
                names = classes.tolist()
                cached = (classes, next(self._tokens), names, {c: i for i, c in enumerate(names)})
                self._class_lists[name] = cached
        return cached[1], cached[2], cached[3]

    # -- lifecycle -----------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop: no new calls; calls in flight finish, and each query session ends after the
        answer it is writing (an idle one when its client closes it, within a second)."""
        self._stopping.set()
        super().shutdown()

    def serve_until_signalled(self, grace_s: float = 10.0) -> None:
        """Serve until SIGTERM or SIGINT, then stop (see :meth:`shutdown`) and close every
        memory. If calls are still open after ``grace_s`` (a stopped client holding a stream),
        the memories are closed and the process exits anyway: every write acknowledged is on
        disk already. The server listens from its construction; this thread only waits, so
        the signal handlers run here (Flight's own serve() would stop with no deadline)."""
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        try:
            while not stop.wait(0.5):
                pass
            stopping = threading.Thread(target=self.shutdown, daemon=True)
            stopping.start()
            stopping.join(grace_s)
            if stopping.is_alive():
                self._leave(grace_s)
        finally:
            self._close_memories()

    def _close_memories(self) -> None:
        with self._closing:
            if not self._closed:
                self._closed = True
                for memory in self.memories.values():
                    memory.close()

    def _leave(self, grace_s: float) -> None:
        log.warning("calls still open %.0f s after the stop signal: closing the memories and leaving", grace_s)
        self._close_memories()
        os._exit(0)


def _small_result_batch(res, column_of: dict) -> pa.RecordBatch:
    """A small query's answer: each retrieved slot's class column instead of the (n, C)
    probabilities (the client builds them from attention, as a memory does), the label as
    its column (``column_of`` maps a label to it); probabilities only when they include an
    estimated rest (probs="full")."""
    columns = [wire.list_column(res.ids, pa.int64()), wire.list_column(res.scores, pa.float32()),
               wire.list_column(res.attention, pa.float64()), pa.array(res.tail_bound)]
    names = ["ids", "scores", "attention", "tail_bound"]
    if res.slot_classes is not None:
        columns.append(wire.list_column(np.asarray(res.slot_classes, np.int32), pa.int32()))
        names.append("slot_classes")
    if res.tail_estimate is not None or res.slot_classes is None:
        columns.append(wire.list_column(res.probs, pa.float64()))
        names.append("probs")
    if res.tail_estimate is not None:
        columns.append(pa.array(np.asarray(res.tail_estimate, np.float64)))
        names.append(wire.TAIL_ESTIMATE)
    columns.append(pa.array(np.array([column_of[c] for c in res.labels.tolist()], np.int32)))
    names.append("label_column")
    return pa.record_batch(columns, names=names)


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
