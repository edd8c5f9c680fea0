"""FAISS backends, chosen by factory string, over the rows of the slot table.

Row ``r`` of the memory's slot table is FAISS position ``r``: the index is
append-only between rebuilds, so FAISS positions are an internal row number and
never leave the engine (the memory maps rows to its own ids). Removed rows are
masked at search time with an ``IDSelectorBitmap`` (HNSW cannot remove; masking
works the same for every backend) and dropped when the memory rebuilds.

Indexes that need training (IVF, PQ) answer from an exact Flat index until the
memory holds enough vectors to train them, and are retrained as it grows.

The index is also where vectors live: :meth:`VectorIndex.reconstruct` reads them
back (IVF indexes keep a direct map, 8 bytes a slot, for that). For Flat, IVF-Flat
and HNSW-Flat that is the exact vector, so the memory keeps no second copy; for
lossy indexes (PQ, SQ, ...) it is an approximation, and the memory keeps the
float32 vectors itself if it rescores.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np

from ..errors import CorruptFileError, InvalidValueError
from .calibration import (
    DRIFT_QUERIES,
    DRIFT_WRITTEN,
    QUERIES,
    RECALL_TARGET,
    Answer,
    Calibration,
    DriftCheck,
    calibrate,
    check_drift,
)
from .calibration import K as CALIBRATION_K

# FAISS warns below 39 training points per centroid; we train only past that.
TRAIN_POINTS_PER_CENTROID = 39
# A trained index is retrained once the memory has grown this many times over.
RETRAIN_GROWTH = 4.0
# An index that grows in place (HNSW) is calibrated once it holds this many vectors.
CALIBRATE_MIN = 1_000
# "auto": exact Flat up to this many slots, then IVF (rule from bench/scale.py, docs/architecture.md).
AUTO_FLAT_MAX = 10_000


@dataclass(frozen=True)
class SearchSettings:
    """Search-time knobs. ``None`` picks a default from the index's size."""

    nprobe: int | None = None
    ef_search: int | None = None


def validate_spec(dim: int, spec: str, metric: str = "ip") -> str:
    """Check that ``spec`` is "auto" or a FAISS factory string FAISS accepts for ``dim``
    (the slots' dimension) and ``metric``.

    Raises:
        InvalidValueError: the string is not a usable factory string.
    """
    if spec == "auto":
        return spec
    try:
        faiss.index_factory(dim, spec, _faiss_metric(metric))
    except Exception as exc:  # FAISS raises RuntimeError with a C++ message
        raise InvalidValueError(f"index {spec!r} is not a FAISS factory string usable at dim={dim}: {exc}") from exc
    return spec


def _faiss_metric(metric: str) -> int:
    """The FAISS metric an index of ``metric`` is built with (l2: FAISS's own, see
    :class:`VectorIndex`; cosine searches unit vectors by inner product)."""
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def auto_spec(n: int) -> str:
    """The factory string "auto" resolves to for a memory of ``n`` slots."""
    if n <= AUTO_FLAT_MAX:
        return "Flat"
    return f"IVF{auto_nlist(n)},Flat"


def auto_nlist(n: int) -> int:
    """IVF lists for ``n`` slots: the power of two nearest 2 sqrt(n), trainable on n points."""
    nlist = 1 << int(round(np.log2(2 * np.sqrt(n))))
    while nlist > 16 and nlist * TRAIN_POINTS_PER_CENTROID > n:
        nlist //= 2
    return nlist


def min_train_points(index: faiss.Index) -> int:
    """How many vectors ``index`` should see before it is trained (0 if it needs none)."""
    if index.is_trained:
        return 0
    need = 1
    ivf = _try_extract_ivf(index)
    if ivf is not None:
        need = max(need, ivf.nlist)
    pq = _find_pq(index)
    if pq is not None:
        need = max(need, pq.ksub)
    return need * TRAIN_POINTS_PER_CENTROID


class VectorIndex:
    """A FAISS index over slot rows, with Flat fallback until trained and bitmap masking.

    Args:
        dim: vector dimension.
        spec: "auto" or a FAISS factory string ("Flat", "HNSW32", "IVF1024,Flat", "IVF256,PQ16", ...).
        settings: search-time settings (nprobe, efSearch).
        recall: the recall target of calibration; None (the default) calibrates on the answer
            at ``temperature`` (see engine/index/calibration.py).
        temperature: the temperature queries attend at, for the answer target.
        share: the fraction of a sharded memory's slots this index holds (1/n for a shard of
            n): its search breadth aims at its share of a query's top-k (see :func:`share_k`).
        metric: "l2": vectors and queries come lifted around the memory's centre (``dim``
            counts the lifted column, see :mod:`engine.metric`); FAISS holds the centred
            vectors in an L2 index of ``dim - 1`` (its lists, graph and codes built on
            squared distances), and scores go out as ``-|q - x|^2``. Else inner product
            throughout.
    """

    def __init__(self, dim: int, spec: str, settings: SearchSettings | None = None, *,
                 recall: float | None = None, temperature: float = 0.1, calibration: Calibration | None = None,
                 share: float = 1.0, metric: str = "ip"):
        self.dim = dim
        self.lifted = metric == "l2"
        self._faiss_dim, self._faiss_metric = (dim - 1 if self.lifted else dim), _faiss_metric(metric)
        self.spec = validate_spec(self._faiss_dim, spec, metric)
        self._params_cache: dict = {}  # k -> search parameters without a selector
        self.settings = settings or SearchSettings()
        self.recall_target = recall
        self.temperature = temperature
        self.share = share
        # the breadth measured for the answer or recall_target (engine/index/calibration.py); a saved one
        # is reused by a build over as many vectors into the same index kind, else measured again
        self.calibration = calibration
        # whether the configured index (once trained) stores approximate vectors
        self.spec_lossy = spec != "auto" and _is_lossy(faiss.index_factory(self._faiss_dim, spec, self._faiss_metric))
        self._use(*self._fresh(0))
        self._trained_on = 0
        self._written = 0  # rows written since the breadth was measured or last checked for drift
        self.drift_checks: list[DriftCheck] = []  # the latest checks, newest last

    @property
    def settings(self) -> SearchSettings:
        """Search-time settings (nprobe, efSearch; None picks them)."""
        return self._settings

    @settings.setter
    def settings(self, value: SearchSettings) -> None:
        self._settings = value
        self._params_cache = {}  # a fresh dict: readers holding the old one finish with it

    @property
    def temperature(self) -> float:
        """The temperature queries attend at: the answer target's breadth depends on it."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = value
        self._params_cache = {}  # the breadth of a query may change with it

    @property
    def calibration(self) -> Calibration | None:
        """The breadth measured for the target (the answer or ``recall_target``; see
        engine/index/calibration.py), or None."""
        return self._calibration

    @calibration.setter
    def calibration(self, value: Calibration | None) -> None:
        self._calibration = value
        self._params_cache = {}
        self._written = 0  # measured now: drift counts from here

    def _use(self, index: faiss.Index, spec: str) -> None:
        """Make ``index`` the active one, and note once what the query path asks of it."""
        self._index, self.active_spec = index, spec
        self._params_cache = {}
        self._centroids_t = None
        self._ivf = _try_extract_ivf(index)
        # lossy: scores and stored vectors are approximations (compressed codes, projections)
        self.lossy = _is_lossy(index)
        # IVF: row -> (list, offset), so vectors can be read back. Kept (8 bytes a row) where the
        # index holds the memory's one exact copy of the vectors; a lossy index (a fraction of
        # the size) builds it only while vectors are read back (compaction, snapshots, get).
        self._direct_map = self._ivf is not None and not self.lossy
        if self._direct_map:
            self._ivf.make_direct_map(True)
        self._map_lock = threading.Lock()
        self._hnsw = _find_hnsw(index)
        # an IVF over the vectors as given (no transform before it) whose add is the base one
        # (assign, then add_core): adds may come with their lists. Exact types only: FastScan
        # packs codes in its own add, Dedup merges copies, PQR refines; add_core skips both.
        self._plain_ivf = type(faiss.downcast_index(index)) in (faiss.IndexIVFFlat, faiss.IndexIVFPQ,
                                                                 faiss.IndexIVFScalarQuantizer)
        # exact: exhaustive search with exact scores, so the tail bound is a certificate
        self.exact = isinstance(index, faiss.IndexFlat)

    # -- building -----------------------------------------------------------------
    def _fresh(self, n: int) -> tuple[faiss.Index, str]:
        spec = auto_spec(n) if self.spec == "auto" else self.spec
        index = faiss.index_factory(self._faiss_dim, spec, self._faiss_metric)
        if index.is_trained:
            return index, spec
        if n >= min_train_points(index):
            return index, spec
        return faiss.IndexFlat(self._faiss_dim, self._faiss_metric), "Flat"

    # -- l2: what FAISS holds (the vectors as written) and what the engine reads (lifted) --
    def _low(self, vectors: np.ndarray) -> np.ndarray:
        """Lifted slots as FAISS holds them (the written vectors)."""
        if not self.lifted:
            return vectors
        return np.ascontiguousarray(vectors[:, :-1], dtype=np.float32)

    def _low_queries(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(lifted queries q' = (2 (q - c), -1) as FAISS searches them: q - c; |q - c|^2 in
        float32, None unless lifted)."""
        if not self.lifted:
            return queries, None
        q = np.ascontiguousarray(queries[:, :-1] * np.float32(0.5), dtype=np.float32)
        return q, np.einsum("nd,nd->n", q, q, dtype=np.float64).astype(np.float32)

    def _lift(self, vectors: np.ndarray) -> np.ndarray:
        """Vectors FAISS holds, lifted (x, |x|^2)."""
        if not self.lifted:
            return vectors
        sq = np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64).astype(np.float32)
        return np.ascontiguousarray(np.hstack([vectors, sq[:, None]]), dtype=np.float32)

    @staticmethod
    def _scores(distances: np.ndarray, rows: np.ndarray, q_sq: np.ndarray | None) -> np.ndarray:
        """FAISS's results as scores: l2 (``q_sq`` given) -|q - x|^2, -inf where no row."""
        if q_sq is None:
            return distances
        out = -distances
        out[rows < 0] = -np.inf
        return out

    def needs_rebuild(self, n_after: int) -> bool:
        """Whether adding up to ``n_after`` rows should rebuild (train or retrain) the index."""
        target = auto_spec(n_after) if self.spec == "auto" else self.spec
        if target != self.active_spec:
            probe = faiss.index_factory(self._faiss_dim, target, self._faiss_metric)
            return probe.is_trained or n_after >= min_train_points(probe)
        return self._trained_on > 0 and n_after >= RETRAIN_GROWTH * self._trained_on

    def build(self, vectors: np.ndarray, labels: np.ndarray | None = None,
              weights: np.ndarray | None = None, written: int = 0) -> VectorIndex:
        """A new index of the same spec over ``vectors`` (row i = position i), trained if due;
        ``labels`` (codes) and ``weights`` of the same rows are what the answer target of
        calibration measures with."""
        new = self._sibling()
        new._use(*self._fresh(len(vectors)))
        new._trained_on = 0
        if not new._index.is_trained:
            new._index.train(self._low(vectors))
            new._trained_on = len(vectors)
        if len(vectors):
            new._index.add(self._low(vectors))
        new.calibration = new._calibrated(vectors, self.calibration, labels, weights)
        if new.calibration is self.calibration:  # reused: the rows written since it was measured still count
            new._written = self._written + written
        return new

    def _sibling(self) -> VectorIndex:
        """A new index object of this spec, settings and recall target, not yet holding an index."""
        new = VectorIndex.__new__(VectorIndex)
        new._params_cache = {}
        new.dim, new.spec, new.settings, new.spec_lossy = self.dim, self.spec, self.settings, self.spec_lossy
        new.recall_target, new.share, new.temperature = self.recall_target, self.share, self.temperature
        new.lifted, new._faiss_dim, new._faiss_metric = self.lifted, self._faiss_dim, self._faiss_metric
        new._written, new.drift_checks = 0, list(self.drift_checks)
        return new

    # -- codes: what a snapshot keeps of an index that holds only compressed codes ---------
    @property
    def codes_only(self) -> bool:
        """Whether the active index is an IVF over compressed codes (IVF-PQ, IVF-SQ, ...) whose
        lists hold each row's code as it is (FastScan packs codes in blocks: not these)."""
        return self._ivf is not None and self.lossy and "FastScan" not in _class_names(self._index)

    def codes(self) -> tuple[bytes, np.ndarray]:
        """(the trained index without its rows, serialized; each row's code, in row order), of a
        :attr:`codes_only` index whose rows are 0..ntotal-1. Codes are FAISS's standalone form
        (list number, then the list's code), as ``sa_encode`` makes and ``add_sa_codes`` reads."""
        ivf, n = self._ivf, self.ntotal
        coarse, width = ivf.coarse_code_size(), ivf.code_size
        out = np.empty((n, coarse + width), np.uint8)
        filled = 0
        for lst in range(ivf.nlist):
            m = ivf.invlists.list_size(lst)
            if m == 0:
                continue
            rows = faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), m)
            out[rows, :coarse] = np.frombuffer(int(lst).to_bytes(8, "little")[:coarse], np.uint8)
            out[rows, coarse:] = faiss.rev_swig_ptr(ivf.invlists.get_codes(lst), m * width).reshape(m, width)
            filled += m
        if filled != n:  # pragma: no cover - rows are 0..n-1, each in one list
            raise CorruptFileError(f"the index lists hold {filled} rows, expected {n}")
        blank = faiss.clone_index(self._index)
        blank.reset()
        return bytes(faiss.serialize_index(blank)), out

    def loaded(self, codebook: bytes, codes: np.ndarray, trained_on: int) -> VectorIndex:
        """An index like this one holding ``codes`` (from :meth:`codes`) as rows 0..n-1, in the
        trained index ``codebook``: no training, and the very codes that were saved.

        Raises:
            ValueError: the codebook is not a trained, empty index of this spec and dim, or a
                code does not fit it.
        """
        try:
            index = faiss.deserialize_index(np.frombuffer(codebook, np.uint8))
        except RuntimeError as exc:
            raise InvalidValueError(f"unreadable codebook ({str(exc).splitlines()[0]})") from None
        ivf = _try_extract_ivf(index)
        probe = faiss.index_factory(self._faiss_dim, self.spec, self._faiss_metric) if self.spec != "auto" else None
        if (ivf is None or not index.is_trained or index.ntotal != 0 or index.d != self._faiss_dim
                or probe is None or type(index) is not type(probe) or not _is_lossy(index)
                or index.metric_type != self._faiss_metric):
            raise InvalidValueError(f"the codebook is not a trained empty {self.spec} index of dim {self._faiss_dim}")
        if codes.ndim != 2 or codes.shape[1] != index.sa_code_size():
            raise InvalidValueError(f"codes of {codes.shape[1:]} bytes, the codebook makes {index.sa_code_size()}")
        coarse = ivf.coarse_code_size()
        lists = np.zeros(len(codes), np.int64)
        for b in range(coarse):
            lists |= codes[:, b].astype(np.int64) << (8 * b)
        if len(codes) and lists.max() >= ivf.nlist:
            raise InvalidValueError("a code names an inverted list the codebook does not have")
        if len(codes):
            index.add_sa_codes(np.ascontiguousarray(codes))
        new = self._sibling()
        new._use(index, self.spec)
        new._trained_on = trained_on
        saved = self.calibration
        new.calibration = saved if saved is not None and saved.spec == self.spec else None
        return new

    def _calibrated(self, vectors: np.ndarray, saved: Calibration | None, labels: np.ndarray | None = None,
                    weights: np.ndarray | None = None) -> Calibration | None:
        """The calibration of this freshly built index: none for exact indexes or breadths set
        by the caller, the saved one if it was measured on the same index over as many vectors
        for the same target. Without labels the answer cannot be measured: recall is."""
        ivf = self._ivf if self.settings.nprobe is None else None
        hnsw = self._hnsw if self.settings.ef_search is None else None
        if (ivf is None and hnsw is None) or len(vectors) < 2:
            return None
        k = share_k(CALIBRATION_K, self.share)
        recall = self.recall_target
        if recall is None and (self.share < 1 or labels is None or _single_class(labels[:len(vectors)])):
            # recall, where the answer cannot be measured here: a shard's answer is the merge's,
            # not its own; without labels; one class answers alike at any breadth
            recall = RECALL_TARGET
        if saved is not None and saved.spec == self.active_spec \
                and saved.trained_on == len(vectors) and saved.k == min(k, len(vectors) - 1) \
                and saved.fits(recall, self.temperature):
            return saved
        answer = None
        if recall is None:
            w = np.ones(len(vectors)) if weights is None else np.asarray(weights, np.float64)[:len(vectors)]
            answer = Answer(np.asarray(labels)[:len(vectors)], np.log(np.maximum(w, 1e-300)), self.temperature)
        return calibrate(self._index, self._low(vectors), self.active_spec, ivf=ivf, hnsw=hnsw if ivf is None else None,
                         target=recall, answer=answer, k=k, l2=self.lifted)

    def stale_calibration(self) -> bool:
        """Whether this index should be calibrated now: approximate, no breadth set by the caller,
        at least CALIBRATE_MIN vectors, and never measured, grown 4x since (HNSW grows in place),
        or measured for another target or a temperature that has since moved."""
        if (self._ivf is None or self.settings.nprobe is not None) and \
                (self._hnsw is None or self.settings.ef_search is not None):
            return False
        cal, n = self.calibration, self.ntotal
        if cal is not None and self.recall_target is None and cal.target == "recall":
            moved = False  # recall stood in for the answer (a shard, one class): until the next build
        else:
            moved = cal is not None and not cal.fits(self.recall_target, self.temperature)
        return n >= CALIBRATE_MIN and (cal is None or cal.spec != self.active_spec
                                       or n >= RETRAIN_GROWTH * cal.trained_on or moved)

    def drift_due(self) -> bool:
        """Whether the calibrated breadth should be checked on the rows written since it was
        measured or last checked: as many as half the vectors it was measured on (growth, or
        upserts and removes that replace the data at one size; a full measure comes anyway at
        4x growth, see :meth:`stale_calibration`). Never for a breadth the caller fixed."""
        cal = self.calibration
        fixed = (self._ivf is not None and self.settings.nprobe is not None) or \
            (self._hnsw is not None and self.settings.ef_search is not None)
        if cal is None or fixed or self.stale_calibration():
            return False
        return self._written >= DRIFT_WRITTEN * cal.trained_on

    def check_drift(self, live: np.ndarray, labels: np.ndarray | None = None,
                    weights: np.ndarray | None = None, seed: int = 0) -> DriftCheck | None:
        """Check the breadth queries use on a sample of the live rows written since it was
        measured or last checked (``live`` per position: rows are appended, and a rebuild keeps
        their order, so they are the last live ones), against exact search over every vector,
        for the calibration's target; see :func:`engine.index.calibration.check_drift`. None if
        every such row has been removed."""
        cal, written = self.calibration, self._written
        self._written = 0  # checked (also if checking fails: the next check waits as long)
        target = self.recall_target
        if target is None and cal.target == "recall":
            target = RECALL_TARGET  # recall stood in for the answer (a shard, one class)
        live_rows = np.flatnonzero(np.asarray(live[:self.ntotal], bool))
        recent = live_rows[max(0, len(live_rows) - written):]
        m = min(len(recent), DRIFT_QUERIES if target is None else QUERIES)
        if m == 0:  # every row written since is removed already: nothing new to check
            return None
        rows = np.random.default_rng(seed + self.ntotal).choice(recent, m, replace=False)
        vectors = self._stored(np.arange(self.ntotal))
        answer = None
        if target is None:
            w = np.ones(len(vectors)) if weights is None else np.asarray(weights, np.float64)[:len(vectors)]
            answer = Answer(np.asarray(labels)[:len(vectors)], np.log(np.maximum(w, 1e-300)), self.temperature)
        nprobe, ef = self.breadth(CALIBRATION_K)  # what a query of the default k uses
        ivf = self._ivf if nprobe is not None else None
        check = check_drift(self._index, vectors, cal, rows, nprobe if nprobe is not None else ef, written=written,
                            ivf=ivf, hnsw=self._hnsw if ivf is None else None, target=target, answer=answer,
                            l2=self.lifted)
        self.drift_checks = (self.drift_checks + [check])[-16:]
        return check

    def calibrated(self, labels: np.ndarray | None = None, weights: np.ndarray | None = None) -> Calibration | None:
        """A calibration measured on the vectors the index holds now (see :meth:`stale_calibration`),
        ``labels`` and ``weights`` given per position."""
        return self._calibrated(self.reconstruct(np.arange(self.ntotal)), None, labels, weights)  # lifted

    def breadth(self, k: int) -> tuple[int | None, int | None]:
        """(nprobe, efSearch) a query of ``k`` uses: the caller's, else calibrated, else the size rule."""
        cal = self.calibration
        need = share_k(k, self.share)  # a shard needs only its share of the top-k
        if self._ivf is not None:
            nlist = self._ivf.nlist
            nprobe = self.settings.nprobe or (cal.breadth(need, nlist, self.temperature) if cal else
                                              default_nprobe(nlist, self.ntotal, need))
            return int(nprobe), None
        if self._hnsw is not None:
            ef = self.settings.ef_search or max(k, cal.breadth(need, 1 << 16, self.temperature) if cal
                                                else default_ef_search(need))
            return None, int(ef)
        return None, None

    def assign(self, vectors: np.ndarray) -> np.ndarray | None:
        """The IVF list of each of ``vectors``: the part of an add that reads the index, so a
        writer computes it before it takes the readers' lock (see :meth:`add`). None where
        the index is not an IVF over the vectors as given."""
        if not self._plain_ivf:
            return None
        _, lists = self._ivf.quantizer.search(np.ascontiguousarray(self._low(vectors), np.float32), 1)
        return np.ascontiguousarray(lists[:, 0], np.int64)

    def add(self, vectors: np.ndarray, lists: np.ndarray | None = None) -> None:
        """Append ``vectors`` as the next rows (into ``lists``, from :meth:`assign`, when given)."""
        if lists is not None and self._plain_ivf:
            x = np.ascontiguousarray(self._low(vectors), np.float32)
            self._ivf.add_core(len(x), faiss.swig_ptr(x), None, faiss.swig_ptr(lists))
        else:
            self._index.add(self._low(vectors))
        self._written += len(vectors)

    def reconstruct(self, rows: np.ndarray) -> np.ndarray:
        """The stored vectors of ``rows`` (m, dim) float32 (lifted for l2): exact unless the
        index is lossy."""
        return self._lift(self._stored(rows))

    def _stored(self, rows: np.ndarray) -> np.ndarray:
        """The vectors of ``rows`` as FAISS holds them."""
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.empty((0, self._faiss_dim), np.float32)
        if self._ivf is None or self._direct_map:
            return self._index.reconstruct_batch(rows)
        with self._map_lock:  # an O(n) pass over the lists, then the map is dropped again
            self._ivf.make_direct_map(True)
            try:
                return self._index.reconstruct_batch(rows)
            finally:
                self._ivf.make_direct_map(False)

    # -- cells: the partition the tail summaries (engine/tail/) group slots by --------------
    @property
    def _cell_ivf(self):
        """The IVF layer when it takes the memory's vectors as they are (no transform before it)."""
        return self._ivf if isinstance(faiss.downcast_index(self._index), faiss.IndexIVF) else None

    @property
    def n_cells(self) -> int:
        """Cells of the partition: the IVF lists, or 1 (the whole memory) for other indexes."""
        ivf = self._cell_ivf
        return int(ivf.nlist) if ivf is not None else 1

    def cells(self, vectors: np.ndarray) -> np.ndarray | None:
        """The IVF list each of ``vectors`` goes to (None without lists)."""
        ivf = self._cell_ivf
        if ivf is None:
            return None
        if len(vectors) == 0:
            return np.empty(0, np.int32)
        return ivf.quantizer.assign(
            np.ascontiguousarray(self._low(vectors), dtype=np.float32), 1)[:, 0].astype(np.int32)

    @property
    def list_scan(self) -> bool:
        """Whether a query can scan whole lists with exact scores (IVF-Flat on the vectors)."""
        return self._cell_ivf is not None and not self.lossy

    def centroids(self) -> np.ndarray:
        """(nlist, dim) float32 centroids of the IVF lists (lifted for l2: q'.c' orders the
        lists as FAISS's squared distances do)."""
        ivf = self._cell_ivf
        return self._lift(ivf.quantizer.reconstruct_n(0, ivf.nlist))

    @property
    def centroids_t(self) -> np.ndarray:
        """(dim, nlist) float32: the centroids as the coarse product reads them (cached)."""
        got = getattr(self, "_centroids_t", None)
        if got is None or got.shape[1] != self._cell_ivf.nlist:
            c = self.centroids()
            self._inv_norm = (1.0 / np.maximum(np.linalg.norm(c, axis=1), 1e-30)).astype(np.float32)
            got = self._centroids_t = np.ascontiguousarray(c.T)
        return got

    @property
    def inv_centroid_norm(self) -> np.ndarray:
        """(nlist,) float32: 1 / |centroid| of each list (q . pivot = q . centroid / |centroid|)."""
        self.centroids_t  # noqa: B018 - computed with the centroids
        return self._inv_norm

    def scan_lists(self, queries: np.ndarray, lists: np.ndarray, list_scores: np.ndarray,
                   alive: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every row of the given lists of each query with its score: FAISS's range search
        over exactly those lists, with no threshold (``lims``, ``scores``, ``rows`` as
        :meth:`faiss.Index.range_search` returns them).

        Args:
            queries: (n, dim) float32.
            lists: (n, m) int64 lists to scan per query; list_scores: (n, m) float32 q . centroid.
            alive: optional bool mask over rows; dead rows are skipped.
        """
        ivf = faiss.downcast_index(self._cell_ivf)
        n, m = lists.shape
        queries, q_sq = self._low_queries(np.ascontiguousarray(queries, dtype=np.float32))
        lists = np.ascontiguousarray(lists, dtype=np.int64)
        list_scores = np.ascontiguousarray(list_scores if q_sq is None else q_sq[:, None] - list_scores,
                                           dtype=np.float32)
        params = faiss.SearchParametersIVF()
        params.nprobe = m
        bitmap = sel = None
        if alive is not None:
            bitmap = np.packbits(alive, bitorder="little")
            sel = faiss.IDSelectorBitmap(len(alive), faiss.swig_ptr(bitmap))
            params.sel = sel
        result = faiss.RangeSearchResult(n)
        radius = float(np.finfo(np.float32).max if self.lifted else -np.finfo(np.float32).max)  # no threshold
        ivf.range_search_preassigned_c(n, faiss.swig_ptr(queries), radius,
                                       faiss.swig_ptr(lists), faiss.swig_ptr(list_scores), result, False, params)
        del bitmap, sel  # referenced until FAISS is done with them
        lims = faiss.rev_swig_ptr(result.lims, n + 1).copy()
        total = int(lims[-1])
        scores = faiss.rev_swig_ptr(result.distances, total).copy()
        rows = faiss.rev_swig_ptr(result.labels, total).copy()
        if q_sq is not None:  # squared distances as scores
            scores = -scores
        return lims, scores, rows

    def seen(self, queries: np.ndarray, k: int, every: bool) -> str | np.ndarray:
        """Where a search of ``k`` saw every slot with its exact score, so that none it left
        out scores above the k-th it returned: "all" (an exhaustive search, or ``every``: all
        rows were scored), the lists each query probed (n, nprobe) for an IVF-Flat index,
        else "none"."""
        if self.exact or every:
            return "all"
        ivf = self._cell_ivf
        if ivf is None or self.lossy:
            return "none"
        nprobe = self.breadth(k)[0]
        return ivf.quantizer.search(self._low_queries(np.ascontiguousarray(queries, dtype=np.float32))[0], nprobe)[1]

    def row_cells(self) -> np.ndarray | None:
        """The IVF list of every row the index holds, read from the lists (None without lists)."""
        ivf = self._cell_ivf
        if ivf is None:
            return None
        out = np.zeros(self.ntotal, np.int32)
        lists = ivf.invlists
        for cell in range(ivf.nlist):
            size = lists.list_size(cell)
            if size:
                ptr = lists.get_ids(cell)
                out[faiss.rev_swig_ptr(ptr, size)] = cell
                lists.release_ids(cell, ptr)
        return out

    # -- reading ------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def nbytes(self) -> int:
        """Bytes the index holds: codes, inverted-list ids, centroids and graph links."""
        n = self.ntotal
        ivf = self._ivf
        if ivf is not None:
            centroids = ivf.nlist * self.dim * 4
            per_row = ivf.code_size + 8 + (8 if self._direct_map else 0)  # codes, list ids, direct map
            return int(n * per_row + centroids)
        hnsw_index = self._hnsw
        if hnsw_index is not None:
            hnsw = hnsw_index.hnsw
            links = hnsw.neighbors.size() * 4 + hnsw.offsets.size() * 8 + hnsw.levels.size() * 4
            return int(links + n * hnsw_index.storage.sa_code_size())
        return int(n * self._index.sa_code_size())

    def search(self, queries: np.ndarray, k: int, alive: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows by inner product (lifted, for l2).

        Args:
            queries: (n, dim) float32, C-contiguous.
            k: neighbours per query.
            alive: optional bool mask over rows; rows where it is False are never returned.

        Returns:
            (scores, rows), each (n, k); rows are -1 where fewer than k were found.
        """
        if self.lifted:
            low, q_sq = self._low_queries(np.ascontiguousarray(queries, dtype=np.float32))
            if alive is None:
                d, rows = self._index.search(low, k, params=self._cached_params(k))
            else:
                bitmap = np.packbits(alive, bitorder="little")
                sel = faiss.IDSelectorBitmap(len(alive), faiss.swig_ptr(bitmap))
                d, rows = self._index.search(low, k, params=self._params(sel, k))
            return self._scores(d, rows, q_sq), rows
        if alive is None:  # FAISS's own entry point without its wrapper's checks (done at our boundary)
            n = len(queries)
            if queries.dtype != np.float32 or not queries.flags.c_contiguous:
                queries = np.ascontiguousarray(queries, dtype=np.float32)
            scores, rows = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
            self._index.search_c(n, faiss.swig_ptr(queries), k, faiss.swig_ptr(scores), faiss.swig_ptr(rows),
                                 self._cached_params(k))
            return scores, rows
        bitmap = np.packbits(alive, bitorder="little")
        sel = faiss.IDSelectorBitmap(len(alive), faiss.swig_ptr(bitmap))
        # `bitmap` and `sel` stay referenced here while FAISS reads them.
        return self._index.search(queries, k, params=self._params(sel, k))

    @property
    def trained_on(self) -> int:
        """Vectors the active index was last trained on (0 if it needs no training)."""
        return self._trained_on

    @property
    def nlist(self) -> int | None:
        """IVF lists of the active index, None if it is not IVF."""
        return None if self._ivf is None else int(self._ivf.nlist)

    def bare_search(self, k: int) -> BareSearch:
        """The FAISS index alone, with the search parameters :meth:`search` uses for ``k``:
        the baseline that the engine's own cost is measured against (for l2, FAISS's L2
        index, searched with the queries as written and returning squared distances)."""
        params = self._params(None, k)
        index = self._index
        call = (lambda q: index.search(q, k)) if params is None else (lambda q: index.search(q, k, params=params))
        return BareSearch(call, *self.breadth(k))

    def _cached_params(self, k: int):
        """Search parameters without a selector, built once per k (until settings or calibration change)."""
        key = k
        cache = self._params_cache
        if key not in cache:
            if len(cache) > 64:
                cache.clear()
            cache[key] = self._params(None, k)
        return cache[key]

    def _params(self, sel, k: int):
        nprobe, ef_search = self.breadth(k)
        if self._ivf is not None:
            params = faiss.SearchParametersIVF()
            params.nprobe = nprobe
        elif self._hnsw is not None:
            params = faiss.SearchParametersHNSW()
            params.efSearch = ef_search
        elif sel is None:
            return None
        else:
            params = faiss.SearchParameters()
        if sel is not None:
            params.sel = sel
        return params


@dataclass(frozen=True)
class BareSearch:
    """``search(queries) -> (scores, positions)``: FAISS with the memory's search parameters,
    without masking, rescoring or attention. ``nprobe`` / ``ef_search``: what it uses, if IVF / HNSW."""

    search: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    nprobe: int | None
    ef_search: int | None


def _single_class(labels: np.ndarray) -> bool:
    return len(labels) == 0 or bool((labels == labels[0]).all())


def share_k(k: int, share: float) -> int:
    """How many of a query's top-k an index holding ``share`` of the slots must find: its
    expected share ``k share`` plus two standard deviations of that count (binomial), at
    most k. A whole memory (share 1) needs all k.

    The global top-k of a sharded memory is spread over the shards like a random sample
    (ids, and so slots, are dealt round-robin): calibrating a shard for recall of its
    own top-k would make it search as if it had to find the whole top-k alone.
    """
    if share >= 1.0:
        return k
    mean = k * share
    return int(min(k, np.ceil(mean + 2.0 * np.sqrt(mean * (1.0 - share)))))


def default_ef_search(k: int) -> int:
    """HNSW efSearch for recall@k near 0.98 on clustered data: 8k, at least 256."""
    return max(256, 8 * k)


def default_nprobe(nlist: int, ntotal: int, k: int) -> int:
    """IVF lists probed per query: enough to scan about 16k candidates, at least 4.

    From the nprobe sweep of bench/scale.py (docs/architecture.md): on clustered
    data, argmax agreement and recall@64 stop improving once about a thousand
    candidates are scanned (nprobe 16 of 256 lists at 10k slots, 4 of 512 at
    100k, 2-4 of 2,048 at 1M); this asks for 16k, so larger k probes more.
    """
    per_list = max(1.0, ntotal / max(1, nlist))
    return int(min(nlist, max(4, np.ceil(16 * k / per_list))))


def _is_lossy(index: faiss.Index) -> bool:
    names = _class_names(index)
    # PQ, SQ and the additive quantizers (RQ, LSQ, PRQ, ...: "...Quantizer") store codes; a
    # refinement by the float32 vectors themselves (RFlat) keeps them exact
    if names.startswith("IndexRefineFlat"):
        return False
    return any(tag in names for tag in ("PQ", "Quantizer", "LSH", "RaBitQ", "PreTransform"))


def _class_names(index: faiss.Index) -> str:
    names = []
    while index is not None:
        names.append(type(index).__name__)
        index = _inner(index)
    return ",".join(names)


def _inner(index: faiss.Index):
    for attr in ("index", "storage", "base_index"):
        inner = getattr(index, attr, None)
        if inner is not None and isinstance(inner, faiss.Index):
            return faiss.downcast_index(inner)
    return None


def _try_extract_ivf(index: faiss.Index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _find_hnsw(index: faiss.Index):
    while index is not None:
        if hasattr(index, "hnsw"):
            return index
        index = _inner(index)
    return None


def _find_pq(index: faiss.Index):
    while index is not None:
        pq = getattr(index, "pq", None)
        if pq is not None:
            return pq
        index = _inner(index)
    return None
