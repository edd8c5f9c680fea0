"""Slots as Arrow columns: the schema shared by snapshots and log records."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass
class Columns:
    """Slots as columns: what a snapshot holds and an add record carries."""

    ids: np.ndarray
    labels: list
    weights: np.ndarray
    vectors: np.ndarray
    created: np.ndarray
    last_used: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> "Columns":
        z = np.empty(0, np.float64)
        return cls(np.empty(0, np.int64), [], z, np.empty((0, dim), np.float32), z, z)

    @classmethod
    def from_arrow(cls, data: pa.Table | pa.RecordBatch, dim: int) -> "Columns":
        return cls(data.column("id").to_numpy(), data.column("label").to_pylist(), data.column("weight").to_numpy(),
                   vectors_of(data.column("vector"), dim), data.column("created").to_numpy(),
                   data.column("last_used").to_numpy())

    def arrays(self, dim: int, kind: str) -> list[pa.Array]:
        """Arrow arrays in the order of :func:`slot_schema`."""
        flat = pa.array(np.ascontiguousarray(self.vectors, dtype=np.float32).reshape(-1))
        return [
            pa.array(np.asarray(self.ids, dtype=np.int64)),
            pa.array(self.labels, type=label_type(kind)),
            pa.array(np.asarray(self.weights, dtype=np.float64)),
            pa.FixedSizeListArray.from_arrays(flat, dim),
            pa.array(np.asarray(self.created, dtype=np.float64)),
            pa.array(np.asarray(self.last_used, dtype=np.float64)),
        ]

    def check(self) -> str | None:
        """What is wrong with values read back from a file, or None: the invariants every write keeps."""
        n = len(self.ids)
        if not (len(self.labels) == len(self.weights) == len(self.vectors) == n):
            return "columns of different lengths"
        if n and (self.ids.min() < 0 or len(np.unique(self.ids)) != n):
            return "negative or repeated ids"
        if not (np.isfinite(self.weights).all() and (self.weights > 0).all()):
            return "weights that are not finite and positive"
        if not np.isfinite(self.vectors).all():
            return "vectors with NaN or inf"
        return None


def label_type(kind: str) -> pa.DataType:
    return pa.int64() if kind == "int" else pa.string()


def slot_schema(dim: int, kind: str) -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            pa.field("label", label_type(kind), nullable=False),
            pa.field("weight", pa.float64(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
            pa.field("created", pa.float64(), nullable=False),
            pa.field("last_used", pa.float64(), nullable=False),
        ]
    )


def vectors_of(column: pa.Array | pa.ChunkedArray, dim: int) -> np.ndarray:
    """A fixed_size_list<float32>[dim] column as an (n, dim) float32 array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], type=column.type)
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
