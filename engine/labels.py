"""The label vocabulary: the one owner of whether a memory's labels are ints or strs.

A memory keeps labels as small integer codes (a label index per slot) and maps
them back through its vocabulary. Labels may be Python/numpy ints (fitting int64)
or strs, never both in one memory; the first accepted add fixes the kind.
"""

from __future__ import annotations

import numpy as np

from .checks import untensor
from .errors import InvalidValueError

INT64_MAX = int(np.iinfo(np.int64).max)
KINDS = ("int", "str")


def kind_of(labels) -> str | None:
    """"int" or "str" for a non-empty sequence of one kind of label (already checked), else None."""
    if len(labels) == 0:
        return None
    first = labels[0]
    return "str" if isinstance(first, str) else "int"


def dtype(kind: str | None):
    """The numpy dtype of an array of labels of this kind."""
    return object if kind == "str" else np.int64


def one_or_many(labels):
    """Labels to select by: a sequence, or one label alone (a scalar, a 0-d array or tensor)
    as a sequence of one; tensors as their values."""
    labels = untensor(labels)
    if isinstance(labels, np.ndarray) and labels.ndim == 0:
        return labels.reshape(1)
    if isinstance(labels, (str, int, np.integer)) and not isinstance(labels, (bool, np.bool_)):
        return [labels]
    return labels


class Vocabulary:
    """Label values <-> label indices, with the kind they share."""

    def __init__(self, kind: str | None = None):
        self.kind = kind
        self._values: list = []
        self._index: dict = {}

    def __len__(self) -> int:
        return len(self._values)

    def check(self, labels, n: int) -> tuple[list, str | None]:
        """Validate one call's labels: n of them, 1-d, all int (fitting int64) or all str.

        Returns:
            (the labels as a list of Python ints or strs, their kind).

        Raises:
            InvalidValueError: wrong count, shape or type, mixed kinds, or a kind other than the memory's.
        """
        labels = untensor(labels)  # a torch tensor: its values
        if isinstance(labels, (str, bytes)) or not hasattr(labels, "__len__"):
            raise InvalidValueError("labels must be a sequence with one label per vector")
        if isinstance(labels, np.ndarray) and labels.ndim != 1:
            raise InvalidValueError(f"labels must be 1-d, got shape {labels.shape}")
        if len(labels) != n:
            raise InvalidValueError(f"{n} vectors but {len(labels)} labels")
        if n == 0:
            return [], self.kind
        if isinstance(labels, np.ndarray) and labels.dtype.kind in "iuU":
            if labels.dtype.kind == "u" and labels.max() > INT64_MAX:
                raise InvalidValueError("int labels must fit int64")
            values = labels.tolist()
            kind = "str" if labels.dtype.kind == "U" else "int"
        else:
            values = list(labels)
            if all(isinstance(v, str) for v in values):
                values, kind = [str(v) for v in values], "str"
            elif all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in values):
                values, kind = [int(v) for v in values], "int"
                if any(not -INT64_MAX - 1 <= v <= INT64_MAX for v in values):
                    raise InvalidValueError("int labels must fit int64")
            else:
                types = sorted({type(v).__name__ for v in values})
                raise InvalidValueError(f"labels must be all int or all str in one call, got {types}")
        if kind == "str":
            try:
                for v in values:
                    v.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidValueError("str labels must be valid unicode (no lone surrogates)") from None
        if self.kind is not None and kind != self.kind:
            raise InvalidValueError(f"this memory's labels are {self.kind}, got {kind} labels")
        return values, kind

    def intern(self, values: list, kind: str | None) -> np.ndarray:
        """The label index of each (checked) label, adding new labels to the vocabulary.

        A label that gets an index but whose write then fails stays in the vocabulary
        unused: no slot has it, so no query shows it.
        """
        uniq, inverse = np.unique(np.asarray(values, dtype=dtype(kind)), return_inverse=True)
        codes = np.empty(len(uniq), np.int32)
        for j, value in enumerate(uniq.tolist()):
            pos = self._index.get(value)
            if pos is None:
                pos = self._index[value] = len(self._values)
                self._values.append(value)
            codes[j] = pos
        return codes[inverse.reshape(-1)]

    def find(self, labels) -> tuple[list, np.ndarray]:
        """(the checked labels, the index of each, -1 for a label never written); one label
        alone is a sequence of one.

        Raises:
            InvalidValueError: labels of the wrong shape, type or kind (see :meth:`check`).
        """
        labels = one_or_many(labels)
        values, _ = self.check(labels, len(labels) if hasattr(labels, "__len__") else -1)
        return values, np.array([self._index.get(v, -1) for v in values], np.int64)

    def values(self, idx) -> list:
        """The label of each label index."""
        return [self._values[i] for i in idx]

    def array(self, idx) -> np.ndarray:
        """The labels of ``idx`` as a numpy array (int64, or object for strs)."""
        return np.array(self.values(idx), dtype=dtype(self.kind))
