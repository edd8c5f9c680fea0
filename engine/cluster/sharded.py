"""ShardedMemory: the verbs of :class:`engine.Memory` over shards run by Ray actors.

    mem = ShardedMemory(64, shards=4, path="/shared/mem")    # create
    mem = ShardedMemory.open("/shared/mem")                   # reopen (Ray restarts, new drivers)

Layout under ``path`` (a filesystem every node can read and write, e.g. NFS):

    sharded.json     what the memory is: dim, shard count, the options of every shard
    shard-000/ ...   one durable Memory directory per shard

The driver checks every input before any shard changes, routes writes, removals
and reads by id (shard ``id % n``), scatters queries to every shard and merges
their top-k exactly (:mod:`engine.cluster.merge`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from .. import checks, compaction
from .. import ids as slot_ids
from ..errors import (
    CorruptFileError,
    EmptyMemoryError,
    EngineError,
    InvalidValueError,
    MemoryExistsError,
    MemoryNotFoundError,
    MissingExtraError,
    ShardUnavailableError,
    UnknownLabelError,
)
from ..labels import Vocabulary
from ..options import SHARD_OPTIONS, MemoryOptions
from ..results import CompactionReport, MemoryStats, QueryResult, Slots
from ..store import fsio, holds_memory
from .merge import merge
from .shard import SHARD_FILE, Shard

log = logging.getLogger(__name__)

ROOT_FILE = "sharded.json"
FORMAT = "engine-sharded"
FORMAT_VERSION = 1


def _write_durably(directory: Path, name: str, doc: dict) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        fsio.write_atomic(dir_fd, directory / name, json.dumps(doc, sort_keys=True).encode())
    finally:
        os.close(dir_fd)


def _check_shards(root: Path, doc: dict) -> None:
    """Refuse a sharded memory whose directories are not the shards ``doc`` describes: one
    missing, extra, swapped, from another sharded memory, or never written."""
    n = doc["shards"]
    found = sorted(p.name for p in root.glob("shard-*"))
    expected = [f"shard-{i:03d}" for i in range(n)]
    if found != expected:
        extra, missing = sorted(set(found) - set(expected)), sorted(set(expected) - set(found))
        raise CorruptFileError(f"{root}: {ROOT_FILE} describes {n} shards, but "
                               + "; ".join(filter(None, [f"missing {missing}" if missing else "",
                                                         f"unexpected {extra}" if extra else ""])))
    legacy = "memory_id" not in doc  # written before shards knew themselves: their manifests are checked
    for i, name in enumerate(expected):
        shard_dir = root / name
        if not holds_memory(shard_dir):
            raise CorruptFileError(f"{shard_dir}: no memory in the shard's directory")
        if legacy:
            continue
        try:
            ident = json.loads((shard_dir / SHARD_FILE).read_text())
            if not isinstance(ident, dict):
                raise InvalidValueError("not an object")
        except FileNotFoundError:
            raise CorruptFileError(f"{shard_dir}: not a shard of this memory (no {SHARD_FILE})") from None
        except (ValueError, UnicodeDecodeError):
            raise CorruptFileError(f"{shard_dir / SHARD_FILE}: unreadable") from None
        want = {"memory_id": doc["memory_id"], "shard": i, "shards": n}
        if ident != want:
            what = "another sharded memory's shard" if ident.get("memory_id") != doc["memory_id"] else \
                f"shard {ident.get('shard')} of {ident.get('shards')}"
            raise CorruptFileError(f"{shard_dir}: holds {what}, expected shard {i} of {n} of this memory")


def _clean(exc, shard: int) -> Exception:
    """What a shard raised, as the error it was: an engine error as itself (its attributes
    kept), anything else as an EngineError naming the shard; no Ray traceback either way."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, EngineError):
        cause.__traceback__ = None
        return cause
    text = str(cause).strip().splitlines()[0] if cause is not None and str(cause).strip() else type(cause).__name__
    return EngineError(f"shard {shard} failed: {type(cause).__name__}: {text}")


def _as_sent(x, n: int, dim: int) -> np.ndarray:
    """Checked vectors as the shards receive them: float32, not yet normalised, so that each
    shard normalises them exactly as a single Memory would (normalising twice moves bits)."""
    return np.ascontiguousarray(np.asarray(x).astype(np.float32).reshape(n, dim))


def _ray():
    try:
        import ray
    except ImportError:  # pragma: no cover - the extra is installed by make setup
        raise MissingExtraError("engine.cluster needs Ray: pip install 'engine[cluster]'") from None
    return ray


def connect(address: str | None = None, *, quiet: bool = False) -> None:
    """Join the Ray cluster at ``address`` (or RAY_ADDRESS), or start a local one; a no-op if
    this process is connected already. ``quiet``: Ray's own start-up lines (the local
    instance started, its token authentication) are not printed; errors still are."""
    ray = _ray()
    if not ray.is_initialized():
        import logging

        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({"logging_level": logging.ERROR} if quiet else {}))


class ShardedMemory:
    """A memory split over ``shards`` Ray actors, each a durable :class:`engine.Memory`.

    Args:
        dim: vector dimension.
        shards: number of shards (fixed for the memory's life).
        path: the root directory, on a filesystem every node of the cluster can read.
        address: the Ray cluster to join (default: RAY_ADDRESS, or a local instance).
        budget: a slot budget for the whole memory; each shard keeps budget / shards.
        **options: the options of :class:`engine.Memory` (metric, index, temperature, ...).
            The temperature is a number every shard shares (default 0.1): "auto" is refused,
            as shards choosing their own would not merge into one attention.

    Raises:
        InvalidValueError: bad options (checked before anything is written).
        MemoryExistsError: ``path`` holds a memory already (use :meth:`open`).
    """

    def __init__(self, dim: int, *, shards: int, path: str | os.PathLike, address: str | None = None,
                 budget: int | None = None, **options):
        self.dim = checks.integer("dim", dim)
        n = checks.integer("shards", shards)
        unknown = set(options) - set(SHARD_OPTIONS)
        if unknown:
            raise InvalidValueError(f"unknown options {sorted(unknown)}; a shard takes {SHARD_OPTIONS}")
        if "temperature" in options:  # shards share the driver's: a number (a shard choosing its own would not merge)
            options["temperature"] = checks.temperature(options["temperature"])
        if budget is not None:
            budget = checks.integer("budget", budget)
            if budget < n:
                raise InvalidValueError(f"a budget of {budget} slots cannot be split over {n} shards")
        MemoryOptions(**options).checked_for(self.dim)  # every option checked before anything is written
        root = Path(path)
        if not (root / ROOT_FILE).exists():  # a create that failed before its commit point: never written to
            for shard_dir in root.glob("shard-*"):
                if shard_dir.is_dir() and (shard_dir / SHARD_FILE).exists():
                    shutil.rmtree(shard_dir)
        if (root / ROOT_FILE).exists() or any(root.glob("shard-*")):
            raise MemoryExistsError(f"{root} holds a sharded memory already: use ShardedMemory.open")
        root.mkdir(parents=True, exist_ok=True)
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "dim": self.dim, "shards": n,
               "budget": budget, "options": options, "memory_id": uuid.uuid4().hex}
        for i in range(n):  # each shard's identity first: a shard directory without one is never a shard
            shard_dir = root / f"shard-{i:03d}"
            shard_dir.mkdir()
            _write_durably(shard_dir, SHARD_FILE, {"memory_id": doc["memory_id"], "shard": i, "shards": n})
        self._start(root, doc, address, create=True)  # every shard's memory made
        try:
            _write_durably(root, ROOT_FILE, doc)  # the commit point: from here on it opens
        except BaseException:
            self._stop()
            raise

    @classmethod
    def open(cls, path: str | os.PathLike, *, address: str | None = None) -> ShardedMemory:
        """Reopen a sharded memory: every shard reopens its directory (snapshot + log).

        Raises:
            FileNotFoundError: no sharded memory at ``path``.
            CorruptFileError: its root file is unreadable or malformed.
        """
        root = Path(path)
        file = root / ROOT_FILE
        if not file.exists():
            raise MemoryNotFoundError(f"no sharded memory at {root} (expected {ROOT_FILE})")
        try:
            doc = json.loads(file.read_text())
            ok = (doc.get("format") == FORMAT and doc.get("format_version") == FORMAT_VERSION
                  and isinstance(doc.get("dim"), int) and isinstance(doc.get("shards"), int) and doc["shards"] > 0
                  and isinstance(doc.get("options"), dict) and set(doc["options"]) <= set(SHARD_OPTIONS)
                  and isinstance(doc.get("memory_id", ""), str))
        except (ValueError, UnicodeDecodeError):
            ok = False
        if not ok:
            raise CorruptFileError(f"{file}: not a readable sharded-memory description")
        _check_shards(root, doc)
        mem = cls.__new__(cls)
        mem.dim = doc["dim"]
        mem._start(root, doc, address)
        return mem

    def _start(self, root: Path, doc: dict, address: str | None, create: bool = False) -> None:
        ray = _ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        connect(address)
        self.path = root
        self.n = doc["shards"]
        self._budget = doc.get("budget")
        self._options = doc["options"]
        self.metric = self._options.get("metric", "cosine")
        self._temperature = float(self._options.get("temperature", 0.1))
        # one bundle a shard, spread over the nodes where it can (SPREAD is best effort)
        self._pg = placement_group([{"CPU": 0.01}] * self.n, strategy="SPREAD")
        ray.get(self._pg.ready())
        # a budget for the whole memory is kept shard by shard (each compacts its own slots)
        # every shard attends at the driver's temperature (a shard choosing its own would not match the merge)
        shard_options = {**self._options, "temperature": self._temperature,
                         **({"budget": self._budget // self.n} if self._budget else {})}
        actor = ray.remote(Shard)
        self._shards = [
            actor.options(max_restarts=-1, max_task_retries=0, num_cpus=0.01,
                          scheduling_strategy=PlacementGroupSchedulingStrategy(
                              self._pg, placement_group_bundle_index=i))
            .remote(str(root / f"shard-{i:03d}"), i, self.n, doc["dim"], shard_options, create)
            for i in range(self.n)
        ]
        try:
            info = self._all("describe")
            for i, d in enumerate(info):  # what each shard's own manifest says against the root's
                want = {"dim": doc["dim"], "metric": self.metric, "temperature": self._temperature}
                if {key: d[key] for key in want} != want:
                    raise CorruptFileError(f"{root / f'shard-{i:03d}'}: the shard holds a memory of "
                                           f"{ {key: d[key] for key in want} }, {ROOT_FILE} says {want}")
        except BaseException:
            self._stop()  # no actor or reservation outlives a failed open
            raise
        kinds = {d["label_kind"] for d in info} - {None}
        if len(kinds) > 1:
            raise CorruptFileError(f"{root}: shards hold labels of different kinds {sorted(kinds)}")
        self._vocab = Vocabulary(kinds.pop() if kinds else None)
        # each shard's mass: refreshed by every answer, raised by every write sent to it
        self._last_weight = [d["total_weight"] for d in info]

    # -- calling shards -----------------------------------------------------------------
    def _gather(self, refs: dict[int, object], *, allow_partial: bool = False) -> dict[int, object]:
        """The results of calls to shards by shard index; ShardUnavailableError naming those that
        failed (or, with ``allow_partial``, only those that answered)."""
        ray = _ray()
        out, down = {}, []
        for i, ref in refs.items():
            try:
                out[i] = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                if getattr(exc, "actor_init_failed", False):  # the shard cannot open its directory
                    lines = [ln.strip() for ln in str(getattr(exc, "error_msg", exc)).splitlines() if ln.strip()]
                    raise ShardUnavailableError(f"shard {i} of {self.path} could not start: {lines[-1]}",
                                                [i]) from None
                down.append(i)
            except ray.exceptions.RayTaskError as exc:  # the shard raised: re-raised as itself, without
                raise _clean(exc, i) from None  # Ray's traceback, pid, address or actor id
        if down and not allow_partial:
            raise ShardUnavailableError(f"shards {down} of {self.path} did not answer (down or restarting)", down)
        return out

    def _written(self, refs: dict[int, object]) -> np.ndarray:
        """The ids the shards that succeeded wrote, of an add sent as ``refs``."""
        ray = _ray()
        done = []
        for ref in refs.values():
            try:
                done.append(np.asarray(ray.get(ref), np.int64))
            except Exception as exc:  # noqa: BLE001 - a shard that refused or failed wrote nothing
                log.debug("a shard wrote nothing of an add: %s", exc)
        return np.concatenate(done) if done else np.empty(0, np.int64)

    def _all(self, method: str, *args, allow_partial: bool = False) -> list:
        refs = {i: getattr(s, method).remote(*args) for i, s in enumerate(self._shards)}
        got = self._gather(refs, allow_partial=allow_partial)
        return [got.get(i) for i in range(self.n)] if allow_partial else [got[i] for i in range(self.n)]

    def _owner(self, ids: np.ndarray) -> np.ndarray:
        return ids % self.n

    def _where(self, ids: np.ndarray) -> np.ndarray:
        """Whether each id is in the memory (asked of its owning shard)."""
        owner = self._owner(ids)
        refs = {s: self._shards[s].contains.remote(ids[owner == s]) for s in np.unique(owner).tolist()}
        got = self._gather(refs)
        found = np.zeros(len(ids), bool)
        for s, hit in got.items():
            found[owner == s] = hit
        return found

    # -- writing ------------------------------------------------------------------------
    def add(self, vectors, labels, *, ids=None, weights=None, upsert: bool = False) -> np.ndarray:
        """Write slots (see :meth:`engine.Memory.add`). Fresh slots are spread round-robin over
        the shards, which give them ids; given ids go to their owning shard.

        Every input is checked before any shard changes (a budget's room for every class
        included). A write spanning several shards is durable per shard: if a shard fails or
        refuses meanwhile, the error (its engine type, without Ray's traceback) names it, and
        its ``.written`` lists the ids the other shards wrote.

        Raises:
            DimensionError, InvalidValueError, DuplicateIdError: bad input; nothing written.
            ShardUnavailableError: a shard did not answer.
        """
        n = len(checks.vectors(vectors, self.dim, self.metric, allow_empty=True))
        v = _as_sent(vectors, n, self.dim)
        values, kind = self._vocab.check(labels, n)
        w = checks.weights(weights, n)
        if ids is not None:
            ids = slot_ids.given(ids, n, upsert=upsert, present=self._where)
        if n == 0:
            return np.empty(0, np.int64)
        labels_arr = np.array(values, dtype=object if kind == "str" else np.int64)
        target = self._owner(ids) if ids is not None else (np.arange(n) + int(np.random.randint(self.n))) % self.n
        if self._budget:  # a shard's budget must hold every class it would hold: checked before any writes
            per_shard = self._budget // self.n
            parts = np.unique(target).tolist()
            held = self._gather({i: self._shards[i].describe.remote() for i in parts})
            for i in parts:
                classes = set(np.asarray(held[i]["classes"]).tolist()) | set(labels_arr[target == i].tolist())
                if len(classes) > per_shard:
                    raise InvalidValueError(f"shard {i} would hold {len(classes)} classes, more than its budget of "
                                            f"{per_shard} slots can keep (every class keeps a slot); nothing written")
        refs = {}
        for s in np.unique(target).tolist():
            m = target == s
            # a missing shard is bounded by every mass sent to it (written or not: an upper bound)
            self._last_weight[s] += float(np.sum(w[m]))
            refs[s] = self._shards[s].add.remote(v[m], labels_arr[m].tolist(), None if ids is None else ids[m],
                                                 w[m], upsert)
        try:
            got = self._gather(refs)
        except ShardUnavailableError as exc:
            done = self._gather({s: r for s, r in refs.items() if s not in exc.shards}, allow_partial=True)
            written = np.concatenate([np.asarray(w) for w in done.values()]) if done else None
            raise ShardUnavailableError(f"{exc} (the other shards wrote their part: see .written)", exc.shards,
                                        written) from None
        except EngineError as exc:  # a shard refused its part: say what the others wrote
            written = self._written(refs)
            exc.written = written
            if len(written):
                exc.args = (f"{exc.args[0] if exc.args else exc} (the other shards wrote their part: "
                            f"{len(written)} ids, see .written)", *exc.args[1:])
            raise exc from None
        out = np.empty(n, np.int64)
        for s, written in got.items():
            out[target == s] = written
        self._vocab.kind = kind
        return out

    def remove(self, ids=None, *, labels=None) -> int:
        """Remove slots by id, all of which must be present (checked on every owning shard
        before any shard removes), or every slot of some labels (each held by some shard;
        each shard removes those it holds).

        Raises:
            UnknownIdError: some ids are not in the memory (listed); nothing removed.
            UnknownLabelError: some labels have no slot on any shard (listed); nothing removed.
        """
        if labels is not None:
            if ids is not None:
                raise InvalidValueError("remove takes ids or labels, not both")
            values, _ = self._vocab.find(labels)
            held = [set(np.asarray(d["classes"]).tolist()) for d in self._all("describe")]
            absent = [v for v in dict.fromkeys(values) if not any(v in h for h in held)]
            if absent:
                raise UnknownLabelError(f"labels with no slot: {absent[:10]}{' ...' if len(absent) > 10 else ''}",
                                        absent)
            refs = {s: self._shards[s].remove_labels.remote([v for v in dict.fromkeys(values) if v in held[s]])
                    for s in range(self.n) if any(v in held[s] for v in values)}
            return int(sum(self._gather(refs).values()))
        ids = np.unique(checks.ids(ids))
        if len(ids) == 0:
            return 0
        slot_ids.known(ids, self._where(ids))
        owner = self._owner(ids)
        got = self._gather({s: self._shards[s].remove.remote(ids[owner == s]) for s in np.unique(owner).tolist()})
        return int(sum(got.values()))

    def compact(self, *, budget: int | None = None, policy: str = "merge", seed: int = 0,
                **options) -> CompactionReport:
        """Compact every shard to ``budget / shards`` slots (each keeps its classes' mass, so
        the memory keeps every class's mass)."""
        if budget is not None:
            budget = checks.integer("budget", budget)
            if budget < self.n:
                raise InvalidValueError(f"a budget of {budget} slots cannot be split over {self.n} shards")
        MemoryOptions(**self._options).check_policy(policy)
        seed = checks.integer("seed", seed, low=0)
        try:
            compaction.check_options(options)
        except ValueError as exc:
            raise InvalidValueError(str(exc)) from None
        info = self._all("describe")
        if sum(d["slots"] for d in info) == 0:
            raise EmptyMemoryError("the memory is empty: nothing to compact")
        if budget is not None:  # refused before any shard compacts, not by one shard after others did
            short = [i for i, d in enumerate(info) if budget // self.n < len(d["classes"])]
            if short:
                need = max(len(info[i]["classes"]) for i in short) * self.n
                raise InvalidValueError(f"a budget of {budget} slots leaves {budget // self.n} a shard, fewer than "
                                        f"the classes of shards {short}: give at least {need}")
        each = {"policy": policy, "seed": seed, **options,
                **({"budget": budget // self.n} if budget is not None else {})}
        reports = [r for r in self._all("compact", each) if r is not None]
        return CompactionReport(slots=sum(r.slots for r in reports), dropped=sum(r.dropped for r in reports),
                                merged_away=sum(r.merged_away for r in reports), policy=reports[0].policy,
                                budget=budget, seconds=max(r.seconds for r in reports),
                                kept="; ".join(f"shard {i}: {r.kept}" for i, r in enumerate(reports) if r.kept) or None)

    def save(self) -> Path:
        """Checkpoint every shard."""
        self._all("save")
        return self.path

    def close(self) -> None:
        """Close every shard's files and end its actor (the memory stays on disk)."""
        try:
            self._all("close", allow_partial=True)
        finally:
            self._stop()

    def _stop(self) -> None:
        """End every shard's actor and release the placement group."""
        ray = _ray()
        from ray.util.placement_group import remove_placement_group

        for s in self._shards:
            ray.kill(s, no_restart=True)
        remove_placement_group(self._pg)

    # -- reading ------------------------------------------------------------------------
    def query(self, queries, *, k: int = 64, tail: float | None = None, probs: str | None = None,
              allow_partial: bool = False) -> QueryResult:
        """Exact attention over the global top-k (see :meth:`engine.Memory.query`), with
        top-k probabilities (the default of every memory) or, with ``probs="full"``,
        attention over every slot of every shard: each shard answers its own full answer
        as class masses and the merge adds them up (with Flat shards, dense attention).

        Args:
            allow_partial: answer from the shards that are up; the tail bound then also
                covers the missing shards' mass (cosine: their last known mass times
                exp(1/T); inner product: no bound, so ``tail_bound`` is 1), and
                ``result.missing_shards`` lists them.

        Raises:
            EmptyMemoryError: no shard holds a slot.
            ShardUnavailableError: a shard did not answer (without ``allow_partial``).
        """
        probs = "top-k" if probs is None else probs
        if probs not in ("top-k", "full"):
            raise InvalidValueError(f"probs must be one of ('top-k', 'full'), got {probs!r}")
        q = _as_sent(queries, len(checks.vectors(queries, self.dim, self.metric, "queries")), self.dim)
        k = checks.integer("k", k)
        if tail is not None:
            checks.fraction("tail", tail, low=0.0, high=1.0, closed_low=False)
        want = k
        while True:
            res, exhausted = self._query_once(q, want, k, allow_partial, probs)
            if tail is None or exhausted or float(res.tail_bound.max()) <= tail:
                return res
            want *= 2

    def _query_once(self, q: np.ndarray, k: int, k_requested: int, allow_partial: bool,
                    probs: str = "top-k") -> tuple[QueryResult, bool]:
        """(the merged answer at k, whether every shard that answered used all its slots)."""
        got = self._gather({i: s.retrieve.remote(q, k, probs) for i, s in enumerate(self._shards)},
                           allow_partial=allow_partial)
        missing = tuple(sorted(set(range(self.n)) - set(got)))
        parts = [r for r in got.values() if r is not None]
        for i, r in got.items():
            self._last_weight[i] = 0.0 if r is None else r.total_weight
        if not parts:
            if missing:
                raise ShardUnavailableError(f"no shard of {self.path} answered", list(missing))
            raise EmptyMemoryError("the memory is empty: add slots before querying")
        lost = sum(self._last_weight[i] for i in missing)
        if lost == 0:
            missing_log = -np.inf
        elif self.metric == "cosine":
            missing_log = np.log(lost) + 1.0 / self._temperature  # a cosine similarity is at most 1
        elif self.metric == "l2":
            missing_log = np.log(lost)  # -|q - x|^2 is at most 0
        else:
            missing_log = np.inf  # inner products are unbounded: no bound
        res = merge(parts, k, k_requested, self._temperature, missing_log_mass=missing_log,
                    exact=all(r.exact for r in parts) and not missing, missing_shards=missing)
        return res, all((r.omitted_weight <= 0).all() for r in parts)

    def get(self, ids) -> Slots:
        """Read slots back by id, in the order given.

        Raises:
            UnknownIdError: some ids are not in the memory (listed).
        """
        ids = checks.ids(ids)
        slot_ids.known(ids, self._where(ids) if len(ids) else np.zeros(0, bool))
        owner = self._owner(ids)
        got = self._gather({s: self._shards[s].get.remote(ids[owner == s]) for s in np.unique(owner).tolist()})
        labels = [None] * len(ids)
        weights = np.empty(len(ids))
        vectors = np.empty((len(ids), self.dim), np.float32)
        for s, part in got.items():
            where = np.flatnonzero(owner == s)
            weights[where], vectors[where] = part.weights, part.vectors
            for j, lab in zip(where.tolist(), part.labels):
                labels[j] = lab
        return Slots(ids=ids.copy(), labels=labels, weights=weights, vectors=vectors)

    def ids(self, labels=None) -> np.ndarray:
        """The ids of every slot in the memory, or of the slots of some labels, ascending
        (asked of every shard)."""
        return np.sort(np.concatenate([np.asarray(i, np.int64) for i in self._all("ids", labels)]))

    def classes(self) -> np.ndarray:
        """The labels with a live slot on some shard, in the order of a query's columns."""
        held = [np.asarray(d["classes"]) for d in self._all("describe")]
        return np.unique(np.concatenate(held)) if held else np.empty(0, np.int64)

    def stats(self) -> MemoryStats:
        """The shards' stats summed (classes counted once across shards)."""
        per = self._all("stats")
        info = self._all("describe")
        classes = np.unique(np.concatenate([np.asarray(d["classes"]) for d in info])) if info else []
        first = per[0]
        return MemoryStats(
            slots=sum(p.slots for p in per), classes=len(classes), dim=self.dim, metric=self.metric,
            index=first.index, exact=all(p.exact for p in per), tombstones=sum(p.tombstones for p in per),
            bytes_vectors=sum(p.bytes_vectors for p in per), bytes_index=sum(p.bytes_index for p in per),
            bytes_ids=sum(p.bytes_ids for p in per), nlist=first.nlist, lossy=any(p.lossy for p in per),
            nprobe=first.nprobe, ef_search=first.ef_search, recall=first.recall,
            trained_on=sum(p.trained_on for p in per))

    @property
    def temperature(self) -> float:
        """The softmax temperature every shard shares."""
        return self._temperature

    @property
    def actors(self) -> list:
        """The Ray actor handle of each shard (for operators: placement, killing, metrics)."""
        return list(self._shards)

    def shard_pids(self) -> list[int]:
        """The process id of each shard's actor (for operators and failure tests)."""
        return self._all("pid")

    def shard_nodes(self) -> list[str]:
        """The Ray node id each shard runs on."""
        return self._all("node")

    def __len__(self) -> int:
        return sum(self._all("size"))

    def __contains__(self, id_) -> bool:
        if isinstance(id_, bool) or not isinstance(id_, (int, np.integer)) or not 0 <= id_ <= checks.INT64_MAX:
            return False
        return bool(self._where(np.array([id_], np.int64))[0])

    def __enter__(self) -> ShardedMemory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ShardedMemory(dim={self.dim}, shards={self.n}, path={str(self.path)!r})"
