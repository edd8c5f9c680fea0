"""The read path: a batch of checked queries against a :class:`~engine.state.State`.

index top-k -> (rescore for lossy codes) -> attention with the omitted-mass bound
(:mod:`engine.attention`) -> optional growth of k per query -> a
:class:`~engine.results.QueryResult`. Nothing here changes the state but the
``used`` stamps the age policy reads (a benign race between readers).
"""

from __future__ import annotations

import math
import time

import numpy as np

from .attention import Attention, attend, top_class
from .labels import Vocabulary
from .metric import lifted_query_sq
from .results import ClassMass, QueryResult, Retrieved, SparseProbs
from .state import State
from .tail import full

EPS = np.finfo(np.float64).eps


def answer(state: State, vocab: Vocabulary, q: np.ndarray, *, k: int, k_requested: int, tail: float | None,
           temperature: float, full_metric: str | None = None) -> QueryResult:
    """Attention of each query over its top-k slots (``k`` already clamped to the memory's size);
    with ``full_metric`` (the memory's metric), plus the estimated mass of every other slot
    (:mod:`engine.tail`), so that ``probs`` approximate attention over the whole memory."""
    if full_metric is not None:
        res = full.answer(state, vocab, q, k, temperature, full_metric)
        if tail is not None:
            res = _grow_full(state, vocab, q, res, tail, k, temperature, full_metric)
        return _full_result(state, vocab, res, k_requested)
    scores, rows = search(state, q, k)
    if len(q) == 1 and tail is None and rows[0, -1] >= 0:
        return _answer_one(state, vocab, scores, rows, k_requested, temperature)
    att = attention(state, vocab, scores, rows, temperature)
    if tail is not None:
        scores, rows, att = _grow_k(state, vocab, q, scores, rows, att, tail, k, temperature)
    complete = bool(rows[:, -1].min() >= 0)  # padding (-1) only ever trails: none, nothing to mask
    state.table.touch(rows if complete else rows[rows >= 0], time.time())
    return _result(state, vocab, scores, rows, att, k_requested, complete)


def _grow_full(state: State, vocab: Vocabulary, q, res: full.FullAnswer, tail: float, k: int, temperature: float,
               metric: str) -> full.FullAnswer:
    """Answer again, wider, the queries whose bound on the unscored share is above ``tail``:
    twice the lists probed (IVF-Flat) or twice the k (other approximate indexes), until met
    or every slot is scored."""
    index, n_alive = state.index, state.table.n_alive
    todo = np.flatnonzero(res.tail_bound > tail)
    nprobe = index.breadth(k)[0] if index.list_scan else None
    nlist = index.nlist or 1
    width = k
    parts = [(np.arange(len(q)), res)]
    while len(todo) and width < n_alive and (nprobe is None or nprobe < nlist):
        if nprobe is not None:
            nprobe = min(2 * nprobe, nlist)
        else:
            width = min(2 * width, n_alive)
        again = full.answer(state, vocab, q[todo], width, temperature, metric, nprobe)
        parts.append((todo, again))
        todo = todo[again.tail_bound > tail]
    if len(parts) == 1:
        return res
    widest = max(p.rows.shape[1] for _, p in parts)
    wide = (("scores", -np.inf), ("rows", -1), ("attention", 0.0))
    out = {name: _padded(getattr(res, name), widest, fill) for name, fill in wide}
    probs = _dense_probs(res.probs).copy()
    per_query = ("tail_bound", "log_z", "log_scored", "log_bound")
    out.update({name: getattr(res, name).copy() for name in per_query})
    for at, p in parts[1:]:
        for name, fill in wide:
            out[name][at] = _padded(getattr(p, name), widest, fill)
        for name in per_query:
            out[name][at] = getattr(p, name)
        probs[at] = _dense_probs(p.probs)
    return full.FullAnswer(probs=probs, certified=all(p.certified for _, p in parts), **out)


def _dense_probs(probs) -> np.ndarray:
    return probs.dense() if isinstance(probs, SparseProbs) else probs


def _padded(x: np.ndarray, width: int, fill) -> np.ndarray:
    if x.shape[1] == width:
        return x.copy()
    return np.concatenate([x, np.full((len(x), width - x.shape[1]), fill, dtype=x.dtype)], axis=1)


def _full_result(state: State, vocab: Vocabulary, res: full.FullAnswer, k_requested: int) -> QueryResult:
    """The :class:`QueryResult` of a full answer: its top-k slots, their share of the whole
    attention, and the probabilities over every slot."""
    t = state.table
    classes, columns = state.classes(vocab)
    rows = res.rows
    valid = rows >= 0
    complete = bool(valid.all())
    safe = np.where(valid, rows, 0)
    t.touch(rows if complete else rows[valid], time.time())
    if complete:
        ids, k, scores = t.ids_of(rows), rows.shape[1], res.scores
    else:
        ids = np.where(valid, t.ids[safe], -1)
        scores = np.where(valid, res.scores, np.nan).astype(np.float32)
        k = int(valid.sum(axis=1).max()) if len(rows) else 0
    slot_classes = np.where(valid, columns[t.label_idx[safe]], -1)
    return QueryResult.build(probs=res.probs, classes=classes, labels=classes[res.labels()], ids=ids, scores=scores,
        attention=res.attention, tail_bound=res.tail_bound, exact_bound=res.certified, k=k,
        k_requested=k_requested, slot_classes=slot_classes,
        tail_estimate=np.maximum(1.0 - res.attention.sum(axis=1), 0.0))


def _answer_one(state: State, vocab: Vocabulary, scores: np.ndarray, rows: np.ndarray, k_requested: int,
                temperature: float) -> QueryResult:
    """:func:`answer` for one query that found its k slots: the formula of
    :func:`~engine.attention.attend` on one row in fewer numpy calls, since a lone query's
    cost is mostly per-call overhead. FAISS returns a query's results best first (and
    :func:`search` re-sorts rescored ones), so the first and last scores are the highest and
    the lowest retrieved."""
    t = state.table
    r, s = rows[0], scores[0]
    classes, columns = state.classes(vocab)
    inv_t = 1.0 / temperature
    logits = np.subtract(s, s[0], dtype=np.float64)
    logits *= inv_t  # (s - s_1) / T <= 0: exp cannot overflow
    low = float(logits[-1])  # the lowest retrieved similarity bounds every omitted one
    if t.unit_weights:
        omitted, m = float(max(t.n_alive - len(r), 0)), 0.0
    else:
        w = t.weights[r]
        logits += np.log(w)
        m = float(logits.max())
        logits -= m
        used = float(w.sum())
        omitted = 0.0 if len(r) >= t.n_alive else \
            max(t.total_weight - used, 0.0) + t.weight_error + used * (len(r) + 2) * EPS
    attention = np.exp(logits, out=logits)
    z = float(attention.sum())
    attention /= z
    b = omitted * math.exp(low - m) if omitted > 0 else 0.0
    bound = b / (z + b) if math.isfinite(b) else 1.0
    label_idx = t.label_idx[r]
    slot_classes = label_idx if len(classes) == len(vocab) else columns[label_idx]  # every class live: its own column
    t.touch(r, time.time())
    best = np.bincount(slot_classes, weights=attention).argmax()
    return QueryResult.build(classes=classes, labels=classes[best:best + 1], ids=t.ids_of(rows), scores=scores,
                       attention=attention[None], tail_bound=np.array([bound]), exact_bound=state.index.exact,
                       k=len(r), k_requested=k_requested, slot_classes=slot_classes[None])


def search(state: State, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) of each query's top-k live rows, best first; rows -1 where fewer were found."""
    table, index = state.table, state.index
    if k >= table.n_alive and not index.exact:
        return search_all(state, q)
    scores, rows = index.search(q, k, table.alive if table.n_dead else None)
    if index.lossy and table.keep_vectors:  # compressed codes: rescore exactly
        valid = rows >= 0
        exact = np.einsum("nd,nkd->nk", q, table.vectors[np.where(valid, rows, 0)])
        if index.lifted:  # l2: the lifted product less |q - c|^2 is -|q - x|^2
            exact -= lifted_query_sq(q)[:, None]
        scores = np.where(valid, exact, -np.inf).astype(np.float32)
        order = np.argsort(-scores, axis=1, kind="stable")
        scores, rows = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
    return scores, rows


def search_all(state: State, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every live slot, scored exactly and sorted: what an approximate index cannot promise
    when k covers the whole memory (it may skip lists, or stop short among removed rows)."""
    rows = state.table.live_rows()
    scores = q @ state.vectors(rows).T
    if state.index.lifted:  # l2: -|q - x|^2
        scores -= lifted_query_sq(q)[:, None]
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, order, 1).astype(np.float32), rows[order]


def attention(state: State, vocab: Vocabulary, scores: np.ndarray, rows: np.ndarray,
              temperature: float) -> Attention:
    """Attention over the retrieved rows, with a bound on the mass of the rows not retrieved."""
    t = state.table
    classes, columns = state.classes(vocab)
    if rows[:, -1].min() >= 0:  # the common case: every query found k slots, nothing to mask
        padded = False
        weights = None if t.unit_weights else t.weights[rows]
        class_idx = columns[t.label_idx[rows]]
        n_used = rows.shape[1]
        used = None if weights is None else weights.sum(axis=1)
    else:
        padded = True
        valid, safe, weights, used = _masses(t, rows)
        class_idx = np.where(valid, columns[t.label_idx[safe]], -1)
        n_used = valid.sum(axis=1)
    omitted = omitted_weight(t, used, n_used, rows.shape[1], padded)
    return attend(scores, weights, class_idx, n_classes=len(classes), temperature=temperature,
                  omitted_weight=omitted, padded=padded)


def _masses(t, rows: np.ndarray):
    """(valid, rows with padding at 0, masses with 1 on padding, mass retrieved per query)."""
    valid = rows >= 0
    safe = np.where(valid, rows, 0)
    weights = np.where(valid, t.weights[safe], 1.0)
    return valid, safe, weights, np.where(valid, weights, 0.0).sum(axis=1)


def omitted_weight(t, used, n_used, k: int, padded: bool):
    """Mass of the live slots not retrieved: exact (a count) with unit weights, else an upper
    bound despite rounding (the running total's own error bound, plus that of summing the k
    retrieved weights ``used``)."""
    if t.unit_weights:  # 0 once every slot is used
        return np.maximum(t.n_alive - np.asarray(n_used, np.float64), 0.0) if padded else \
            float(max(t.n_alive - n_used, 0))
    err = t.weight_error + used * (k + 2) * EPS
    return np.where(n_used >= t.n_alive, 0.0, np.maximum(t.total_weight - used, 0.0) + err)


def retrieve(state: State, vocab: Vocabulary, q: np.ndarray, k: int, *, temperature: float | None = None,
             full_metric: str | None = None) -> Retrieved:
    """Each query's top-k slots (``k`` already clamped), with their masses and labels, and
    the mass of the slots left out: no attention (see :class:`~engine.results.Retrieved`).
    With ``full_metric`` (the memory's metric), also every class's mass in the full answer
    at ``temperature`` (``Retrieved.full``), in absolute log units, for a merge to add up."""
    mass = None
    classes, _ = state.classes(vocab)
    if full_metric is not None:
        res = full.answer(state, vocab, q, k, temperature, full_metric)
        scores, rows = res.scores, res.rows
        mass = ClassMass(probs=_dense_probs(res.probs), attention=res.attention, log_z=res.log_z,
                         log_scored=res.log_scored, log_bound=res.log_bound, certified=res.certified)
    else:
        scores, rows = search(state, q, k)
    t = state.table
    valid, safe, weights, used = _masses(t, rows)
    omitted = omitted_weight(t, used, valid.sum(axis=1), rows.shape[1], True)
    t.touch(rows[valid], time.time())
    labels = vocab.array(t.label_idx[safe].ravel()).reshape(rows.shape)
    return Retrieved(ids=np.where(valid, t.ids[safe], -1), scores=np.where(valid, scores, -np.inf).astype(np.float32),
                     weights=weights, labels=labels, omitted_weight=np.asarray(omitted, np.float64),
                     total_weight=t.total_weight + t.weight_error, exact=state.index.exact, full=mass,
                     classes=classes)


def _grow_k(state, vocab, q, scores, rows, att, tail, k, temperature):
    """Re-run the queries whose tail bound is above ``tail`` with twice the k, until met."""
    todo = np.flatnonzero(att.tail_bound > tail)
    if len(todo) == 0:
        return scores, rows, att
    n_alive = state.table.n_alive
    per_query = [(scores[i], rows[i], att.attention[i], att.class_idx[i], att.tail_bound[i])
                 for i in range(len(q))]
    while len(todo) and k < n_alive:
        k = min(2 * k, n_alive)
        s2, r2 = search(state, q[todo], k)
        a2 = attention(state, vocab, s2, r2, temperature)
        still = a2.tail_bound > tail
        for j, i in enumerate(todo):
            per_query[i] = (s2[j], r2[j], a2.attention[j], a2.class_idx[j], a2.tail_bound[j])
        todo = todo[still]
    width = max(len(p[0]) for p in per_query)
    pad = lambda x, fill: np.concatenate([x, np.full(width - len(x), fill, dtype=x.dtype)])  # noqa: E731
    scores = np.stack([pad(p[0], -np.inf) for p in per_query])
    rows = np.stack([pad(p[1], -1) for p in per_query])
    attention_ = np.stack([pad(p[2], 0.0) for p in per_query])
    class_idx = np.stack([pad(p[3], -1) for p in per_query])
    bound = np.array([p[4] for p in per_query])
    return scores, rows, Attention(attention=attention_, tail_bound=bound, class_idx=class_idx,
                                   n_classes=att.n_classes)


def _result(state: State, vocab: Vocabulary, scores, rows, att: Attention, k_requested: int,
            complete: bool) -> QueryResult:
    classes = state.classes(vocab)[0]
    if complete:
        ids, k = state.table.ids_of(rows), rows.shape[1]
    else:
        valid = rows >= 0
        ids = np.where(valid, state.table.ids[np.where(valid, rows, 0)], -1)
        scores = np.where(valid, scores, np.nan).astype(np.float32)
        k = int(valid.sum(axis=1).max())
    return QueryResult.build(
        classes=classes,
        labels=classes[top_class(att.attention, att.class_idx, len(classes))],
        ids=ids,
        scores=scores,
        attention=att.attention,
        tail_bound=att.tail_bound,
        exact_bound=state.index.exact,
        k=k,
        k_requested=k_requested,
        slot_classes=att.class_idx,
    )
