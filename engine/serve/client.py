"""engine.Client: the verbs of :class:`engine.Memory`, served over Arrow Flight.

    mem = Memory.open("my-memory")                                   # embedded
    mem = Client("grpc://127.0.0.1:8815", memory="my-memory")        # served

Both answer ``add``, ``query``, ``remove``, ``get``, ``compact``, ``stats``,
``save``, ``len()`` and ``in`` the same way (:class:`engine.protocol.MemoryLike`)
and raise the same exception types.
"""

from __future__ import annotations

import json
import threading
import time
import weakref

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl

from .. import checks, errors
from ..checks import INT64_MAX, untensor
from ..errors import UnknownIdError
from ..labels import dtype as labels_dtype
from ..labels import kind_of, one_or_many
from ..results import CompactionReport, MemoryStats, QueryResult, Slots
from ..store import codec
from . import wire

SMALL_QUERY_ROWS = 256  # queries of at most this many rows travel as one message each way
SESSION_IDLE_S = 1.0  # a thread's session stream unused this long is closed (a server can then stop)


class Client:
    """A connection to one memory of an engine server.

    Args:
        location: "grpc://host:port" (or "grpc+tls://..." with ``tls_root_certs``).
        memory: the memory's name on the server (its directory name by default).
        token: bearer token, if the server wants one.
        tls_root_certs: PEM bytes of the CA to trust for TLS.
        chunk_rows: rows per batch sent (large inputs stream in chunks).
        timeout: seconds per call (None: no limit).
    """

    def __init__(self, location: str, memory: str, *, token: str | None = None, tls_root_certs: bytes | None = None,
                 chunk_rows: int = 8192, timeout: float | None = None):
        kwargs = {"tls_root_certs": tls_root_certs} if tls_root_certs else {}
        self._flight = fl.connect(location, **kwargs)
        self.memory = memory
        self.chunk_rows = chunk_rows
        headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        self._options = fl.FlightCallOptions(headers=headers, timeout=timeout)
        self._classes: tuple[int, np.ndarray] | None = None  # (token, labels) of the last class list received
        # small queries go over a long-lived stream per thread (a call's set-up costs as much as
        # the query); a per-call timeout needs a call each, so then they go as actions
        self._use_sessions = timeout is None
        self._local = threading.local()
        self._sessions: list[_Session] = []
        self._sessions_lock = threading.Lock()
        self._reaper: threading.Thread | None = None
        self._closed = threading.Event()

    # -- writes ----------------------------------------------------------------------------
    def add(self, vectors, labels, *, ids=None, weights=None, upsert: bool = False) -> np.ndarray:
        """Write slots (see :meth:`engine.Memory.add`). Returns their ids."""
        v = _array(vectors, np.float32, "vectors")
        if v.ndim == 1:
            v = v[None, :]
        if v.ndim != 2:
            raise errors.DimensionError(f"vectors must be 2-d, got shape {v.shape}")
        labels = list(_array(labels, None, "labels").tolist()) if not isinstance(labels, list) else labels
        if len(labels) != len(v):
            raise errors.InvalidValueError(f"{len(v)} vectors but {len(labels)} labels")
        columns = {"vector": codec.vector_array(v), "label": codec.label_array(labels)}
        if ids is not None:
            columns["id"] = pa.array(checks.ids(ids))  # integers only, never cut down
        if weights is not None:
            columns["weight"] = pa.array(_array(weights, np.float64, "weights").reshape(-1))
        try:
            table = pa.table(columns)
        except pa.ArrowInvalid as exc:
            raise errors.InvalidValueError(f"ids/weights must have one value per vector ({exc})") from None
        descriptor = fl.FlightDescriptor.for_command(wire.command(memory=self.memory, op="add", upsert=upsert))
        with _errors():
            writer, reader = self._flight.do_put(descriptor, table.schema, self._options)
            for batch in table.to_batches(max_chunksize=self.chunk_rows):
                writer.write_batch(batch)
            writer.done_writing()
            answer = reader.read()
            writer.close()
        return np.frombuffer(answer.to_pybytes(), dtype="<i8").astype(np.int64)

    def remove(self, ids=None, *, labels=None) -> int:
        """Remove slots by id, or every slot of some labels (see :meth:`engine.Memory.remove`)."""
        if labels is not None:
            if ids is not None:
                raise errors.InvalidValueError("remove takes ids or labels, not both")
            return self._action("remove", labels=_label_list(labels))["removed"]
        ids = checks.ids(ids).tolist()
        return self._action("remove", ids=ids)["removed"]

    def ids(self, labels=None) -> np.ndarray:
        """The ids of every slot, or of the slots of some labels (see :meth:`engine.Memory.ids`)."""
        fields = {} if labels is None else {"labels": _label_list(labels)}
        return np.asarray(self._action("ids", **fields)["ids"], np.int64)

    def classes(self) -> np.ndarray:
        """The labels with at least one live slot (see :meth:`engine.Memory.classes`)."""
        values = self._action("classes")["classes"]
        return np.array(values, dtype=object if values and isinstance(values[0], str) else np.int64)

    def compact(self, **options) -> CompactionReport:
        """Compact the served memory (see :meth:`engine.Memory.compact`)."""
        doc = self._action("compact", **options)  # fields a newer server adds are left out
        return CompactionReport(**{f: doc[f] for f in CompactionReport.__dataclass_fields__ if f in doc})

    def save(self) -> None:
        """Checkpoint the served memory (snapshot + fresh WAL)."""
        self._action("snapshot")

    # -- reads -----------------------------------------------------------------------------
    def query(self, queries, *, k: int = 64, tail: float | None = None, probs: str | None = None) -> QueryResult:
        """Classify queries on the server (see :meth:`engine.Memory.query`; ``probs`` "full" or
        "top-k" for this call, default the served memory's); large batches stream in chunks."""
        if probs is not None and probs not in ("full", "top-k"):
            raise errors.InvalidValueError(f"probs must be one of ('full', 'top-k'), got {probs!r}")
        q = _array(queries, np.float32, "queries")
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2:
            raise errors.DimensionError(f"queries must be 2-d, got shape {q.shape}")
        if len(q) == 0:
            raise errors.InvalidValueError("queries is empty")
        k = int(k) if isinstance(k, np.integer) else k  # numpy scalars as JSON numbers
        tail = float(tail) if isinstance(tail, np.floating) else tail
        if len(q) <= SMALL_QUERY_ROWS:  # one message each way: a stream's set-up would cost more than the query
            return self._small_query(q, k, tail, probs)
        descriptor = fl.FlightDescriptor.for_command(wire.command(memory=self.memory, op="query", k=k, tail=tail,
                                                                    **({} if probs is None else {"probs": probs})))
        parts = []
        with _errors():
            writer, reader = self._flight.do_exchange(descriptor, self._options)
            with writer:
                writer.begin(pa.schema([("vector", pa.list_(pa.float32(), q.shape[1]))]))
                for lo in range(0, len(q), self.chunk_rows):
                    chunk = q[lo : lo + self.chunk_rows]
                    writer.write_batch(pa.record_batch([codec.vector_array(chunk)], names=["vector"]))
                writer.done_writing()
                for chunk in reader:
                    parts.append((chunk.data, json.loads(chunk.app_metadata.to_pybytes())))
        return _merge(parts, k)

    def _small_query(self, q: np.ndarray, k: int, tail: float | None, probs: str | None) -> QueryResult:
        """A query in one action each way (see :mod:`engine.serve.wire`); the memory's class
        list travels only when it changed since this client last saw it."""
        known = self._classes
        header = {"memory": self.memory, "k": k, "tail": tail, "classes_token": known[0] if known else None,
                  **({} if probs is None else {"probs": probs})}
        message = wire.small_query(header, q)
        body = self._session_round_trip(message) if self._use_sessions else None
        if body is None:  # no sessions (a timeout, or a server that does not speak them): an action
            with _errors():
                body = list(self._flight.do_action(fl.Action("query", message), self._options))[0].body
        reader = pa.ipc.open_stream(body)
        batch = reader.read_next_batch()
        meta = json.loads(reader.schema.metadata[wire.QUERY_META])
        if "classes" in meta:
            known = self._classes = (meta["classes_token"], np.array(meta["classes"],
                                                                      dtype=labels_dtype(kind_of(meta["classes"]))))
        elif known is None or known[0] != meta["classes_token"]:
            raise errors.EngineError("the server named a class list this client does not hold")
        classes = known[1]
        cols = batch.schema.names
        fields = dict(classes=classes, labels=classes[batch.column("label_column").to_numpy()],
                      ids=wire.rows_of(batch.column("ids")), scores=wire.rows_of(batch.column("scores")),
                      attention=wire.rows_of(batch.column("attention")),
                      tail_bound=batch.column("tail_bound").to_numpy(), exact_bound=meta["exact_bound"], k=meta["k"],
                      k_requested=meta["k_requested"],
                      tail_estimate=batch.column(wire.TAIL_ESTIMATE).to_numpy() if wire.TAIL_ESTIMATE in cols else None)
        if "slot_classes" in cols:
            fields["slot_classes"] = wire.rows_of(batch.column("slot_classes")).astype(np.int64)
        if "probs" in cols:  # with an estimated rest: as sent
            return QueryResult.build(probs=wire.rows_of(batch.column("probs")), **fields)
        return QueryResult.build(**fields)  # probabilities from attention, built when read, as a memory builds them

    def get(self, ids) -> Slots:
        """Read slots back by id (see :meth:`engine.Memory.get`)."""
        ticket = fl.Ticket(wire.command(memory=self.memory, ids=checks.ids(ids).tolist()))
        with _errors():
            table = self._flight.do_get(ticket, self._options).read_all()
        return Slots(ids=table.column("id").to_numpy(), labels=table.column("label").to_pylist(),
                     weights=table.column("weight").to_numpy(), vectors=wire.vectors_from(table))

    def stats(self) -> MemoryStats:
        """Size and bytes of the served memory."""
        doc = self._action("stats")
        return MemoryStats(**{f: doc[f] for f in MemoryStats.__dataclass_fields__})

    def health(self) -> dict:
        """{"status": "ok", "memories": [...]} from the server."""
        return self._action("health")

    def metrics(self, *, reset: bool = False) -> dict:
        """The server's own counts: requests and errors by kind, latency p50 / p99 (queries
        also by stage: parse, wait for a batch, query, encode), and per memory the requests
        waiting, requests refused as busy and calls by requests batched. ``reset``
        starts the server counting anew (after this answer)."""
        return self._action("metrics", reset=reset)

    def __len__(self) -> int:
        return self.stats().slots

    def __contains__(self, id_) -> bool:
        if isinstance(id_, bool) or not isinstance(id_, (int, np.integer)) or not 0 <= id_ <= INT64_MAX:
            return False
        try:
            self.get([int(id_)])
        except UnknownIdError:
            return False
        return True

    # -- sessions --------------------------------------------------------------------------
    def _session_round_trip(self, message: bytes) -> pa.Buffer | None:
        """One small query over this thread's session (opened when it has none, or when the
        one it had was closed by the server, a restart or the idle reaper: a query is safe to
        send again). None if the server does not speak sessions (the caller sends an action)."""
        for attempt in (0, 1):
            session = getattr(self._local, "session", None)
            if session is None or session.closed:
                session = self._local.session = self._open_session()
            with session.lock:
                if session.closed:  # reaped between the two lines above: open another
                    continue
                try:
                    session.writer.write_metadata(pa.py_buffer(message))
                    chunk = session.reader.read_chunk()
                    session.used = time.monotonic()
                except fl.FlightServerError:  # the server refused the stream itself: an older server
                    session.close()
                    self._use_sessions = False
                    return None
                except (fl.FlightError, pa.ArrowException, StopIteration):  # the stream ended: once more
                    session.close()
                    if attempt:
                        with _errors():  # as the engine error it is (no server, a wrong token, ...)
                            raise
                    continue
                except BaseException:  # interrupted between sending and reading: its answer is unread
                    session.close()
                    raise
            return _session_answer(chunk.app_metadata)
        raise errors.ServerUnavailableError("the query stream kept closing")  # pragma: no cover

    def _open_session(self) -> _Session:
        descriptor = fl.FlightDescriptor.for_command(wire.command(op="session"))
        with _errors():
            writer, reader = self._flight.do_exchange(descriptor, self._options)
        session = _Session(writer, reader)
        with self._sessions_lock:
            if self._closed.is_set():
                session.close()
                raise errors.ServerUnavailableError("this client is closed")
            self._sessions = [s for s in self._sessions if not s.closed] + [session]
            if self._reaper is None:  # holds the client weakly: a client dropped unclosed is still collected
                self._reaper = threading.Thread(target=_reap, args=(weakref.ref(self), self._closed),
                                                name="engine-client-reaper", daemon=True)
                self._reaper.start()
        return session

    def _idle_sessions(self) -> list | None:
        """The open sessions unused for SESSION_IDLE_S; None when none is open (the reaper then
        ends: the next session starts another)."""
        now = time.monotonic()
        with self._sessions_lock:
            self._sessions = [s for s in self._sessions if not s.closed]
            if not self._sessions:
                self._reaper = None
                return None
            return [s for s in self._sessions if now - s.used > SESSION_IDLE_S]

    def close(self) -> None:
        self._closed.set()
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            with session.lock:
                session.close()
        self._flight.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _action(self, kind: str, **fields) -> dict:
        body = wire.command(memory=self.memory, **fields)
        with _errors():
            results = list(self._flight.do_action(fl.Action(kind, body), self._options))
        return json.loads(results[0].body.to_pybytes())


def _reap(client_ref, closed: threading.Event) -> None:
    """Close a client's sessions unused for SESSION_IDLE_S (an idle client must not hold a
    server open); ends with the client (closed, or collected)."""
    while not closed.wait(SESSION_IDLE_S / 4):
        client = client_ref()
        if client is None:
            return
        idle = client._idle_sessions()  # noqa: SLF001 - the reaper is the client's own
        del client
        if idle is None:
            return
        for session in idle:
            if session.lock.acquire(blocking=False):
                try:
                    if time.monotonic() - session.used > SESSION_IDLE_S:  # still idle, now that it is held
                        session.close()
                finally:
                    session.lock.release()


class _Session:
    """One thread's query stream: its writer and reader, a lock, when it was last used."""

    def __init__(self, writer, reader):
        self.writer, self.reader = writer, reader
        self.lock = threading.Lock()
        self.used = time.monotonic()
        self.closed = False

    def close(self) -> None:
        """End the stream at once (the caller holds the lock, or no other thread can use it):
        cancelled, so a server that stopped answering cannot hold the caller."""
        if self.closed:
            return
        self.closed = True
        try:
            self.reader.cancel()
            self.writer.close()
        except (fl.FlightError, pa.ArrowException, OSError):
            pass  # cancelled, or the server or the connection is gone already


def _session_answer(answer) -> pa.Buffer:
    """A session message's result, or the engine error it carries."""
    if answer is None or len(answer) == 0:
        raise errors.EngineError("the server sent an empty answer on the query stream")
    kind, rest = answer[:1].to_pybytes(), answer[1:]
    if kind == wire.SESSION_ANSWER:
        return rest
    if kind != wire.SESSION_ERROR:
        raise errors.EngineError(f"the server sent an answer of unknown kind {kind!r} on the query stream")
    info = rest.to_pybytes()
    try:
        message = json.loads(info).get("message", "query refused")
    except (ValueError, AttributeError):
        raise errors.EngineError("the server sent an unreadable error on the query stream") from None
    with _errors():
        raise fl.FlightServerError(message, extra_info=info)


class _Unauthenticated(errors.AuthenticationError, fl.FlightUnauthenticatedError):
    """The engine's error, still the Flight error callers of the transport may catch."""


class _Unavailable(errors.ServerUnavailableError, fl.FlightUnavailableError):
    """The engine's error, still the Flight error callers of the transport may catch."""


class _TimedOut(errors.ServerUnavailableError, fl.FlightTimedOutError):
    """The engine's error, still the Flight error callers of the transport may catch."""


class _errors:
    """Turn the server's FlightServerError back into the engine exception it was."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if isinstance(exc, fl.FlightUnauthenticatedError):
            raise _Unauthenticated("the server refused this client's token (missing or wrong); "
                                   "nothing changed") from None
        if isinstance(exc, fl.FlightTimedOutError):
            raise _TimedOut("the server did not answer within the client's timeout (a write may still have "
                            "been applied)") from None
        if isinstance(exc, fl.FlightUnavailableError):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            first = first.split(". gRPC client debug")[0]  # the transport's own debug text says no more
            raise _Unavailable(f"no answer from the server: {first[:200]}") from None
        if exc is None or not isinstance(exc, fl.FlightServerError) or not exc.extra_info:
            return False
        try:
            info = json.loads(exc.extra_info)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
        cls = getattr(errors, info.get("type", ""), None)
        message = info.get("message", str(exc))
        if cls is errors.UnknownIdError:
            raise cls(message, info.get("ids", [])) from None
        if cls is errors.UnknownLabelError:
            raise cls(message, info.get("labels", [])) from None
        if cls is errors.ShardUnavailableError:
            raise cls(message, info.get("shards", []), info.get("written")) from None
        if isinstance(cls, type) and issubclass(cls, errors.EngineError):
            err = cls(message)
            if "written" in info:  # a sharded write that failed after some shards wrote
                err.written = np.asarray(info["written"], np.int64)
            raise err from None
        builtin = {"ValueError": ValueError, "KeyError": KeyError, "TypeError": TypeError}.get(info.get("type"))
        raise (builtin or errors.EngineError)(message) from None


def _array(x, dtype, what: str) -> np.ndarray:
    """``x`` (a sequence, an array or a torch tensor, detached) as an array of ``dtype`` (None:
    as it comes); InvalidValueError, not numpy's, where it is not one."""
    try:
        return np.asarray(untensor(x), dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise errors.InvalidValueError(f"{what} must be {'numbers' if dtype is not None else 'values'}: "
                                       f"{exc}") from None


def _label_list(labels) -> list:
    """Labels as a JSON list of ints or strs (one label alone, or a tensor, too)."""
    labels = one_or_many(labels)
    values = labels.tolist() if isinstance(labels, np.ndarray) else list(labels)
    return [int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else v for v in values]


def _merge(parts: list, k_requested: int) -> QueryResult:
    """Concatenate result chunks; chunks answered at different times may list different classes."""
    if not parts:
        raise errors.EngineError("the server sent no results")
    classes = list(dict.fromkeys(c for _, meta in parts for c in meta["classes"]))
    pos = {c: i for i, c in enumerate(classes)}
    width = max(meta["k"] for _, meta in parts)
    ids, scores, attention, probs, labels, bounds, estimates = [], [], [], [], [], [], []
    for batch, meta in parts:
        n = batch.num_rows
        pad = width - wire.rows_of(batch.column("ids")).shape[1]
        ids.append(np.pad(wire.rows_of(batch.column("ids")), ((0, 0), (0, pad)), constant_values=-1))
        scores.append(np.pad(wire.rows_of(batch.column("scores")), ((0, 0), (0, pad)), constant_values=np.nan))
        attention.append(np.pad(wire.rows_of(batch.column("attention")), ((0, 0), (0, pad))))
        p = np.zeros((n, len(classes)))
        p[:, [pos[c] for c in meta["classes"]]] = wire.rows_of(batch.column("probs"))
        probs.append(p)
        labels += batch.column("label").to_pylist()
        bounds.append(batch.column("tail_bound").to_numpy())
        if wire.TAIL_ESTIMATE in batch.schema.names:
            estimates.append(batch.column(wire.TAIL_ESTIMATE).to_numpy())
    label_dtype = labels_dtype(kind_of(classes))
    return QueryResult.build(
        probs=np.concatenate(probs), classes=np.array(classes, dtype=label_dtype),
        labels=np.array(labels, dtype=label_dtype),
        ids=np.concatenate(ids), scores=np.concatenate(scores).astype(np.float32), attention=np.concatenate(attention),
        tail_bound=np.concatenate(bounds), exact_bound=all(m["exact_bound"] for _, m in parts), k=width,
        k_requested=k_requested, tail_estimate=np.concatenate(estimates) if len(estimates) == len(parts) else None,
    )
