"""The one Arrow codec of vectors and labels: how snapshots, log records, the Flight wire
and the CLI's file readers turn numpy vectors and int/str labels into Arrow columns and back.

A log record carries every column (:func:`slot_schema`). A snapshot carries only what
its memory uses (:func:`snapshot_schema`): labels dictionary-encoded, no weight column
while every weight is 1, no usage column when usage is not tracked, and, for a memory
that keeps only compressed codes (IVF-PQ and the like without rescoring), the index's
own codes and the trained index they belong to instead of float32 vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..errors import InvalidValueError
from ..labels import kind_of


@dataclass
class Columns:
    """Slots as columns: what a snapshot holds and an add record carries."""

    ids: np.ndarray
    labels: list
    weights: np.ndarray
    vectors: np.ndarray | None  # None when ``codes`` stand in for them
    used: np.ndarray  # unix time each slot was last written or retrieved (0: not tracked)
    codes: np.ndarray | None = None  # (n, code size) uint8: the index's codes of the slots
    codebook: bytes | None = None  # the trained FAISS index (no rows) that ``codes`` belong to

    @classmethod
    def empty(cls, dim: int) -> Columns:
        z = np.empty(0, np.float64)
        return cls(np.empty(0, np.int64), [], z, np.empty((0, dim), np.float32), z)

    @classmethod
    def from_arrow(cls, data: pa.Table | pa.RecordBatch, dim: int) -> Columns:
        """Columns of a log record or a snapshot (absent weights are 1, absent times 0)."""
        names = data.schema.names
        n = data.num_rows
        codes = codebook = vectors = None
        if "code" in names:
            column = data.column("code")
            if isinstance(column, pa.ChunkedArray):
                column = column.combine_chunks() if column.num_chunks else pa.array([], type=column.type)
            width = column.type.byte_width
            codes = np.frombuffer(column.buffers()[1], np.uint8, n * width, column.offset * width).reshape(n, width)
            codebook = (data.schema.metadata or {}).get(CODEBOOK_KEY)
        else:
            vectors = vectors_of(data.column("vector"), dim)
        return cls(data.column("id").to_numpy(), data.column("label").to_pylist(),
                   data.column("weight").to_numpy() if "weight" in names else np.ones(n),
                   vectors, data.column("used").to_numpy() if "used" in names else np.zeros(n), codes, codebook)

    def snapshot_table(self, dim: int, kind: str, *, weights: bool, used: bool, metadata: dict) -> pa.Table:
        """These slots as a snapshot table: the columns :func:`snapshot_schema` names."""
        code_size = None if self.codes is None else self.codes.shape[1]
        arrays = [pa.array(np.asarray(self.ids, dtype=np.int64)),
                  pa.array(self.labels, type=label_type(kind)).dictionary_encode()]
        if weights:
            arrays.append(pa.array(np.asarray(self.weights, dtype=np.float64)))
        if used:
            arrays.append(pa.array(np.asarray(self.used, dtype=np.float64)))
        if code_size is None:
            arrays.append(vector_array(self.vectors.reshape(-1, dim)))
        else:
            codes = np.ascontiguousarray(self.codes, dtype=np.uint8)
            arrays.append(pa.FixedSizeBinaryArray.from_buffers(pa.binary(code_size), len(codes),
                                                               [None, pa.py_buffer(codes)]))
            metadata = {**metadata, CODEBOOK_KEY: self.codebook}
        schema = snapshot_schema(dim, kind, weights=weights, used=used, code_size=code_size)
        return pa.Table.from_arrays(arrays, schema=schema.with_metadata(metadata))

    def arrays(self, dim: int, kind: str) -> list[pa.Array]:
        """Arrow arrays in the order of :func:`slot_schema`."""
        flat = pa.array(np.ascontiguousarray(self.vectors, dtype=np.float32).reshape(-1))
        return [
            pa.array(np.asarray(self.ids, dtype=np.int64)),
            pa.array(self.labels, type=label_type(kind)),
            pa.array(np.asarray(self.weights, dtype=np.float64)),
            pa.FixedSizeListArray.from_arrays(flat, dim),
            pa.array(np.asarray(self.used, dtype=np.float64)),
        ]

    def check(self) -> str | None:
        """What is wrong with values read back from a file, or None: the invariants every write keeps."""
        n = len(self.ids)
        if not (len(self.labels) == len(self.weights) == len(self.used) == n):
            return "columns of different lengths"
        if n and (self.ids.min() < 0 or len(np.unique(self.ids)) != n):
            return "negative or repeated ids"
        if not (np.isfinite(self.weights).all() and (self.weights > 0).all()):
            return "weights that are not finite and positive"
        if self.vectors is not None and (len(self.vectors) != n or not np.isfinite(self.vectors).all()):
            return "vectors with NaN or inf"
        if self.codes is not None and (len(self.codes) != n or not self.codebook):
            return "codes without their codebook"
        return None


CODEBOOK_KEY = b"faiss_codebook"  # snapshot metadata: the serialized trained index of a code column


def label_type(kind: str | None) -> pa.DataType:
    """int64 for int labels (and while the kind is not known yet), utf8 for str labels."""
    return pa.string() if kind == "str" else pa.int64()


def label_array(labels, kind: str | None = None) -> pa.Array:
    """Labels (a list, or a numpy array) as an Arrow column; the kind is read off them if not given."""
    values = labels.tolist() if isinstance(labels, np.ndarray) else list(labels)
    return pa.array(values, type=label_type(kind or kind_of(values)))


def is_label_type(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def vector_array(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """(n, dim) vectors as a fixed_size_list<float32>[dim] column."""
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])


def slot_schema(dim: int, kind: str) -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            pa.field("label", label_type(kind), nullable=False),
            pa.field("weight", pa.float64(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
            pa.field("used", pa.float64(), nullable=False),
        ]
    )


def snapshot_schema(dim: int, kind: str, *, weights: bool, used: bool, code_size: int | None) -> pa.Schema:
    """id, label (dictionary-encoded), weight if ``weights``, used if ``used``, then either
    vector or, with ``code_size``, code (the index's own code of each slot)."""
    fields = [pa.field("id", pa.int64(), nullable=False),
              pa.field("label", pa.dictionary(pa.int32(), label_type(kind)), nullable=False)]
    if weights:
        fields.append(pa.field("weight", pa.float64(), nullable=False))
    if used:
        fields.append(pa.field("used", pa.float64(), nullable=False))
    if code_size is None:
        fields.append(pa.field("vector", pa.list_(pa.float32(), dim), nullable=False))
    else:
        fields.append(pa.field("code", pa.binary(code_size), nullable=False))
    return pa.schema(fields)


def vectors_of(column: pa.Array | pa.ChunkedArray, dim: int | None = None) -> np.ndarray:
    """A column of equal-length lists of numbers (fixed_size_list, list or large_list) as an
    (n, dim) float32 array.

    Raises:
        ValueError: not a list column, non-numeric values, nulls, or rows of different lengths
            (or not ``dim`` long, when given).
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], type=column.type)
    t = column.type
    if not (pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t)):
        raise InvalidValueError(f"vectors must be a list of floats, got {t}")
    if not (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)):
        raise InvalidValueError(f"vector values must be numbers, got {t.value_type}")
    if column.null_count or column.values.null_count:
        raise InvalidValueError("vectors have null rows or values")
    n = len(column)
    if pa.types.is_fixed_size_list(t):
        width = t.list_size
    else:
        lengths = np.diff(column.offsets.to_numpy())
        if n and (lengths != lengths[0]).any():
            raise InvalidValueError("vector rows have different lengths")
        width = int(lengths[0]) if n else (dim or 0)
    if dim is not None and n and width != dim:
        raise InvalidValueError(f"vectors are {width}-d, expected {dim}")
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, width)
