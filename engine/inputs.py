"""Reading vectors, labels and ids from files for the CLI: Parquet, Arrow/Feather, CSV, .npy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from .errors import InvalidValueError, MissingFileError
from .store.codec import vectors_of

TABLE_SUFFIXES = {".parquet", ".pq", ".arrow", ".feather", ".ipc", ".csv"}
RESERVED = ("label", "id", "weight")


@dataclass
class Batch:
    """Rows read from a file: vectors, and labels / ids / weights when the file has them."""

    vectors: np.ndarray
    labels: list | None = None
    ids: np.ndarray | None = None
    weights: np.ndarray | None = None


def read_batch(path: str | Path, *, labels_path: str | Path | None = None, vector_column: str = "vector",
               label_column: str = "label", id_column: str = "id", weight_column: str = "weight") -> Batch:
    """Read vectors (and labels, ids, weights) from a file.

    Tables (Parquet, Arrow IPC/Feather, CSV) hold either a list column ``vector_column``
    or one numeric column per dimension; ``label``, ``id`` and ``weight`` columns are
    taken when present. A ``.npy`` file holds an (n, dim) array; its labels come from
    ``labels_path`` (``.npy``, or text with one label per line).

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: an unknown format, or columns that cannot be read as vectors.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = _load_npy(path)
        if array.ndim != 2 or len(array) == 0:
            raise InvalidValueError(f"{path}: holds an array of shape {array.shape}; vectors are (n, dim) with n >= 1")
        batch = Batch(array)
    elif suffix in TABLE_SUFFIXES:
        batch = _from_table(_read_table(path, suffix), path, vector_column, label_column, id_column, weight_column)
    else:
        raise InvalidValueError(f"{path}: unknown format {suffix!r}; use .parquet, .arrow, .feather, .csv or .npy")
    if labels_path is not None:
        batch.labels = read_labels(labels_path)
    return batch


def read_labels(path: str | Path) -> list:
    """Labels from a ``.npy`` array or a text file with one label per line (ints if they all parse)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file")
    if path.suffix.lower() == ".npy":
        array = _load_npy(path)
        if array.ndim != 1:
            raise InvalidValueError(f"{path}: holds an array of shape {array.shape}; one value a row is 1-d")
        return array.tolist()
    try:
        lines = [s.strip() for s in path.read_text().splitlines() if s.strip()]
    except UnicodeDecodeError as exc:
        raise InvalidValueError(f"{path}: not UTF-8 text, one label a line ({exc.reason})") from None
    try:
        return [int(s) for s in lines]
    except ValueError:
        return lines


def _load_npy(path: Path) -> np.ndarray:
    """One array from a .npy file; ValueError for anything else (empty, truncated, an .npz)."""
    try:
        array = np.load(path, allow_pickle=False)
    except (EOFError, ValueError, OSError) as exc:
        raise InvalidValueError(f"{path}: not a readable .npy array ({str(exc) or type(exc).__name__})") from None
    if not isinstance(array, np.ndarray):
        raise InvalidValueError(f"{path}: an archive of arrays (.npz), not one .npy array")
    return array


def _read_table(path: Path, suffix: str) -> pa.Table:
    try:
        if suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if suffix == ".csv":
            import pyarrow.csv as pcsv

            return pcsv.read_csv(path)
        import pyarrow.feather as feather

        return feather.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InvalidValueError(f"{path}: cannot read as {suffix} ({exc})") from exc


def _from_table(table: pa.Table, path: Path, vector_column, label_column, id_column, weight_column) -> Batch:
    names = table.column_names
    if table.num_rows == 0:
        raise InvalidValueError(f"{path}: no rows (columns {names})")
    if vector_column not in names:
        lists = [f.name for f in table.schema if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)
                 or pa.types.is_fixed_size_list(f.type)]
        if lists:
            raise InvalidValueError(f"{path}: no {vector_column!r} column; column {lists[0]!r} holds lists: "
                             f"--vector-column {lists[0]} reads the vectors from it")
    if vector_column in names:
        try:
            vectors = vectors_of(table.column(vector_column))
        except ValueError as exc:
            raise InvalidValueError(f"{path}: column {vector_column!r}: {exc}") from None
    else:
        features = [n for n in names if n not in (label_column, id_column, weight_column)]
        if not features:
            raise InvalidValueError(f"{path}: no {vector_column!r} column and no feature columns")
        bad = [n for n in features if not pa.types.is_floating(table.schema.field(n).type)
               and not pa.types.is_integer(table.schema.field(n).type)]
        if bad:
            raise InvalidValueError(f"{path}: feature columns must be numeric, not {bad}")
        vectors = np.column_stack([table.column(n).to_numpy() for n in features]).astype(np.float32)
    get = lambda n: table.column(n).to_numpy(zero_copy_only=False) if n in names else None  # noqa: E731
    labels = table.column(label_column).to_pylist() if label_column in names else None
    return Batch(vectors, labels, get(id_column), get(weight_column))
