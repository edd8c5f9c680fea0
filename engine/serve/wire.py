"""The wire format shared by the server and the client (documented in docs/serving.md).

Every request names its memory in a JSON command (descriptor, ticket or action
body); bulk data moves as Arrow record batches.
- add:    do_put, descriptor {"memory", "op": "add", "upsert"}; batches with
          ``vector`` (fixed_size_list<float32>[dim]), ``label`` (int64 | utf8),
          optional ``id`` (int64) and ``weight`` (float64). The server answers one
          metadata message: the new ids as little-endian int64 bytes.
- query:  do_exchange, descriptor {"memory", "op": "query", "k", "tail"}; batches
          with ``vector``; one result batch per chunk of queries (see RESULT_FIELDS,
          plus ``tail_estimate`` from a memory with probs="full") with app metadata
          JSON {"classes", "exact_bound", "k", "k_requested"}.
- get:    do_get, ticket {"memory", "ids"}; a table id, label, weight, vector.
- query (small): DoAction "query", one message each way (a bidirectional stream
          costs a lone query about 2 ms of set-up): body = 4-byte little-endian
          length, a JSON header {"memory", "k", "tail", "probs", "classes_token",
          "rows", "dim"},
          then rows x dim little-endian float32; result = an Arrow IPC stream of
          one result batch, the JSON metadata above in its schema's metadata.
- actions (JSON body, JSON result): remove {"memory", "ids"}, stats, compact,
          snapshot {"memory"}, health {}, list {}, metrics {}.
Errors travel as FlightServerError whose extra_info is JSON {"type", "message", ...}.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from ..errors import InvalidValueError
from ..store.codec import vector_array, vectors_of  # noqa: F401  (vector_array is part of the wire's vocabulary)

RESULT_FIELDS = ("ids", "scores", "attention", "probs", "label", "tail_bound")
TAIL_ESTIMATE = "tail_estimate"  # a further column when the memory estimates the tail (probs="full")


def command(**fields) -> bytes:
    return json.dumps(fields).encode()


def parse_command(raw: bytes, what: str) -> dict:
    """A JSON object from a descriptor, ticket or action body; ValueError names ``what`` if it is not one."""
    try:
        doc = json.loads(bytes(raw).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidValueError(f"malformed {what}: not JSON ({exc})") from None
    except RecursionError:
        raise InvalidValueError(f"malformed {what}: nested too deeply") from None
    if not isinstance(doc, dict):
        raise InvalidValueError(f"malformed {what}: expected a JSON object")
    return doc


def fields(cmd: dict, what: str, allowed: dict) -> dict:
    """Check a command's fields by type, never coercing: ``allowed`` maps each name to
    (check, description, required). Returns the command; ValueError names the first bad field."""
    unknown = sorted(set(cmd) - set(allowed))
    if unknown:
        raise InvalidValueError(f"malformed {what}: unknown fields {unknown}; allowed {sorted(allowed)}")
    for name, (ok, description, required) in allowed.items():
        if name not in cmd:
            if required:
                raise InvalidValueError(f"malformed {what}: {name!r} is required ({description})")
        elif not ok(cmd[name]):
            raise InvalidValueError(f"malformed {what}: {name!r} must be {description}, got {cmd[name]!r}"[:300])
    return cmd


QUERY_META = b"engine.query"  # the schema metadata key of a small query's result
# a session's answers (DoExchange {"op": "session"}): the first byte says which
SESSION_ANSWER = b"R"  # then the small query's result, an Arrow IPC stream
SESSION_ERROR = b"E"  # then the error's JSON (as a FlightServerError's extra_info)


def small_query(header: dict, queries: np.ndarray) -> bytes:
    """The body of a small query action: header length, JSON header, float32 rows."""
    head = json.dumps({**header, "rows": int(queries.shape[0]), "dim": int(queries.shape[1])}).encode()
    return len(head).to_bytes(4, "little") + head + np.ascontiguousarray(queries, dtype="<f4").tobytes()


def parse_small_query(body: bytes) -> tuple[dict, np.ndarray]:
    """(header, (rows, dim) float32 queries) of a small query action; ValueError if malformed."""
    body = memoryview(body)
    if len(body) < 4:
        raise InvalidValueError("malformed query action: too short")
    size = int.from_bytes(body[:4], "little")
    if size > len(body) - 4:
        raise InvalidValueError("malformed query action: its header length runs past the body")
    header = parse_command(bytes(body[4:4 + size]), "query action header")
    rows, dim = header.get("rows"), header.get("dim")
    if not (is_int(rows) and rows >= 1 and is_int(dim) and dim >= 1):
        raise InvalidValueError("malformed query action header: 'rows' and 'dim' must be integers >= 1")
    raw = body[4 + size:]
    if len(raw) != rows * dim * 4:
        raise InvalidValueError(f"malformed query action: {len(raw)} bytes of vectors for {rows} x {dim} float32")
    return header, np.frombuffer(raw, dtype="<f4").reshape(rows, dim)


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_int_list(v) -> bool:
    return isinstance(v, list) and all(is_int(i) for i in v)


MEMORY = (lambda v: isinstance(v, str), "a memory name (string)", True)


def vectors_from(table_or_batch) -> np.ndarray:
    """The ``vector`` column as an (n, dim) float32 array; ValueError if it is missing or malformed."""
    if "vector" not in table_or_batch.schema.names:
        raise InvalidValueError(f"no 'vector' column (got columns {table_or_batch.schema.names})")
    return vectors_of(table_or_batch.column("vector"))


def column_of(table: pa.Table, name: str, type_ok, description: str, *, as_list: bool = False):
    """An optional column as numpy (or a Python list), refused unless its Arrow type passes ``type_ok``."""
    if name not in table.schema.names:
        return None
    col = table.column(name)
    if not type_ok(col.type):
        raise InvalidValueError(f"'{name}' must be {description}, got {col.type}")
    if col.null_count:
        raise InvalidValueError(f"'{name}' has null rows")
    return col.to_pylist() if as_list else col.to_numpy()


def list_column(rows: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    """An (n, m) array as a list<value_type> column of n rows of m values."""
    n, m = rows.shape
    offsets = pa.array(np.arange(0, (n + 1) * m, m, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(rows).reshape(-1), type=value_type))


def rows_of(column: pa.Array) -> np.ndarray:
    """A list column of equal-length rows back to an (n, m) array."""
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(column), -1) if len(column) else values.reshape(0, 0)


def error_info(exc: BaseException, **extra) -> bytes:
    """An error as the client rebuilds it: its type, message, and what a failed sharded
    write says it did (``written`` ids, unavailable ``shards``)."""
    doc = {"type": type(exc).__name__, "message": str(exc)}
    for name in ("written", "shards"):
        value = getattr(exc, name, None)
        if value is not None:
            doc[name] = [int(v) for v in value]
    return json.dumps({**doc, **extra}).encode()
