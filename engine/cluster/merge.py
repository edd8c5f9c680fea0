"""The exact merge of several memories' top-k answers (no Ray here: plain numpy).

Each shard answers with its own top-k (:class:`~engine.results.Retrieved`). The global
top-k by score is among the union of the shards' top-k, so attention over it is the
attention a single memory holding every slot would compute. The mass left out is
bounded by, per shard, its own omitted-mass bound (``W_omitted exp(s_k / T)``), plus
the exact mass of slots a shard returned that the global top-k dropped, plus, for a
shard that did not answer, a bound on its whole mass. All of it in log space.

Full answers (``probs="full"``) merge by mass: each shard gives every class's mass in its
own full answer (scored exactly plus estimated) in absolute log units, so the class
masses add up across shards and the top-k slots take their share of the sum; nothing a
shard scored is dropped, and with Flat shards the result is dense attention over every slot.
"""

from __future__ import annotations

import numpy as np

from ..attention import attend, top_class
from ..results import QueryResult, Retrieved


def merge(parts: list[Retrieved], k: int, k_requested: int, temperature: float, *,
          missing_log_mass: np.ndarray | float = -np.inf, exact: bool | None = None,
          missing_shards: tuple[int, ...] = ()) -> QueryResult:
    """Attention over the global top-k of the shards' answers.

    Args:
        parts: the answers of the shards that answered (at least one).
        k: slots to keep per query (already clamped to the slots there are).
        k_requested: the k the caller asked for.
        temperature: the memories' shared temperature.
        missing_log_mass: log of a bound on the mass of shards that did not answer (-inf: none).
        exact: whether the bound is a certificate (default: every part is exact).
        missing_shards: the shards that did not answer (recorded in the result).
    """
    ids = np.concatenate([p.ids for p in parts], axis=1)
    scores = np.concatenate([p.scores for p in parts], axis=1)
    weights = np.concatenate([p.weights for p in parts], axis=1)
    labels = np.concatenate([p.labels for p in parts], axis=1)
    valid = ids >= 0
    order = np.argsort(np.where(valid, -scores.astype(np.float64), np.inf), axis=1, kind="stable")
    take, drop = order[:, :k], order[:, k:]
    pick = lambda a, o: np.take_along_axis(a, o, axis=1)  # noqa: E731
    top_ids, top_scores, top_w, top_labels = pick(ids, take), pick(scores, take), pick(weights, take), \
        pick(labels, take)
    if all(p.full is not None for p in parts):  # full answers: class masses, no top-k bound needed
        return _merge_full(parts, take, top_ids, top_scores, top_labels, top_ids >= 0, k_requested,
                           missing_log_mass, missing_shards)
    # what is left out: each shard's own bound, the slots the global top-k dropped, missing shards
    bound = np.full(len(ids), float(missing_log_mass))  # (-inf + inf would be NaN)
    for p in parts:
        bound = np.logaddexp(bound, p.omitted_log_mass(temperature))
    if drop.shape[1]:
        d_valid = pick(valid, drop)
        with np.errstate(divide="ignore"):
            d_mass = np.where(d_valid, np.log(pick(weights, drop)) + pick(scores, drop).astype(np.float64)
                              / temperature, -np.inf)
        bound = np.logaddexp(bound, np.logaddexp.reduce(d_mass, axis=1))
    top_valid = top_ids >= 0
    present = top_labels[top_valid]
    if all(p.classes is not None for p in parts):  # every class of every shard: one memory's columns
        classes = np.unique(np.concatenate([p.classes for p in parts]))
    else:
        classes = np.unique(present) if len(present) else top_labels[:0, 0]
    class_idx = np.where(top_valid, np.searchsorted(classes, np.where(top_valid, top_labels, present[0])), -1)
    padded = not bool(top_valid.all())
    unit = bool((top_w[top_valid] == 1.0).all())
    att = attend(np.where(top_valid, top_scores, -np.inf).astype(np.float32), None if unit else top_w, class_idx,
                 n_classes=len(classes), temperature=temperature, omitted_log_mass=bound, padded=padded)
    used = int(top_valid.sum(axis=1).max())
    return QueryResult.build(
        classes=classes,
        labels=classes[top_class(att.attention, att.class_idx, len(classes))],
        ids=np.where(top_valid, top_ids, -1)[:, :max(used, 1)],
        scores=np.where(top_valid, top_scores, np.nan).astype(np.float32)[:, :max(used, 1)],
        attention=att.attention[:, :max(used, 1)],
        tail_bound=att.tail_bound,
        exact_bound=all(p.exact for p in parts) if exact is None else exact,
        k=used,
        k_requested=k_requested,
        slot_classes=att.class_idx[:, :max(used, 1)],
        missing_shards=tuple(missing_shards),
    )


def _merge_full(parts, take, top_ids, top_scores, top_labels, top_valid, k_requested, missing_log_mass,
                missing_shards) -> QueryResult:
    """The full answer over every shard: class masses added up, the top-k's share of the sum.
    Its bound is a certificate where every shard's is and every shard answered."""
    n = len(top_ids)
    log_z = np.logaddexp.reduce(np.stack([p.full.log_z for p in parts]), axis=0)
    classes = np.unique(np.concatenate([p.classes for p in parts]))
    probs = np.zeros((n, len(classes)))
    shares = []
    for p in parts:
        with np.errstate(invalid="ignore"):
            share = np.where(np.isneginf(p.full.log_z), 0.0, np.exp(p.full.log_z - log_z))
        probs[:, np.searchsorted(classes, p.classes)] += p.full.probs * share[:, None]
        shares.append(p.full.attention * share[:, None])  # each slot's share of the whole
    attention = np.where(top_valid, np.take_along_axis(np.concatenate(shares, axis=1), take, axis=1), 0.0)
    log_scored = np.logaddexp.reduce(np.stack([p.full.log_scored for p in parts]), axis=0)
    log_bound = np.logaddexp.reduce(np.stack([p.full.log_bound for p in parts]
                                             + [np.full(n, float(missing_log_mass))]), axis=0)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        tail_bound = 1.0 / (1.0 + np.exp(log_scored - log_bound))
    tail_bound = np.where(np.isnan(tail_bound), np.where(np.isneginf(log_bound), 0.0, 1.0), tail_bound)
    used = max(int(top_valid.sum(axis=1).max()), 1)
    present = top_labels[top_valid]
    slot_classes = np.where(top_valid, np.searchsorted(classes, np.where(top_valid, top_labels, present[0])
                                                       if len(present) else classes[0]), -1)
    return QueryResult.build(probs=probs, classes=classes, labels=classes[np.argmax(probs, axis=1)],
        ids=np.where(top_valid, top_ids, -1)[:, :used],
        scores=np.where(top_valid, top_scores, np.nan).astype(np.float32)[:, :used],
        attention=attention[:, :used], tail_bound=tail_bound,
        exact_bound=all(p.full.certified for p in parts) and not missing_shards, k=used, k_requested=k_requested,
        slot_classes=slot_classes[:, :used], missing_shards=tuple(missing_shards),
        tail_estimate=np.maximum(1.0 - attention.sum(axis=1), 0.0))
