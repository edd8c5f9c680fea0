"""Compaction policies: shrink a memory to a slot budget while preserving attention mass.

A slot's weight ``w_i`` is its mass in the attention kernel (``a_i ∝ w_i exp(s_i/T)``).
Every policy keeps every class that was present and keeps each class's total
weight, so the attention mass a class can receive is preserved:

- ``merge``: per-class spherical k-means (``faiss.Kmeans``, weighted). Each centroid
  becomes a slot whose vector is the weighted mean of its members (re-normalised
  for cosine) and whose weight is the sum of theirs. With one slot per class this
  is a Prototypical-Network-like memory; with no compaction, Matching Networks'.
- ``reservoir``: weighted sampling without replacement within each class; the kept
  weights are rescaled to the class's mass.
- ``age``: evict the slots least recently retrieved (or, never retrieved, the
  oldest), as in "Learning to Remember Rare Events" (Kaiser et al., 2017); every
  class keeps its freshest slot; kept weights are rescaled to the class's mass.
- ``distill``: start from ``merge``, then optimise the slot vectors (and, with
  ``learn_weights``, the split of each class's mass among its slots) with torch so
  that the compact memory's class probabilities match the full memory's (KL) on
  queries sampled from the slots themselves. Both memories answer by attention
  over the top-k slots, as a query gets it, and leave the query's own slot out;
  the state kept is the best on held-out queries, the merge included.

Class budgets are allocated in proportion to class mass, with at least one slot
per class (largest-remainder rounding).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import faiss
import numpy as np

from .. import checks
from ..errors import InvalidValueError
from ..ids import Counter
from ..metric import Metric
from ..options import POLICIES, MemoryOptions, parse_budget  # noqa: F401 - the policies; budgets read in slots
from ..slots import SlotTable


@dataclass
class SlotSet:
    """Columns of the slots a policy keeps or makes. ``source`` is the row a kept slot came
    from, or -1 for a new (merged) slot, which gets a fresh id."""

    vectors: np.ndarray
    weights: np.ndarray
    label_idx: np.ndarray
    source: np.ndarray
    kept: str | None = None  # which state a policy kept and why (distill), for the report


def _bar(total: int, desc: str, unit: str):
    """A progress bar on a terminal for work that outlasts two seconds; nothing otherwise."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, delay=2.0, disable=None, leave=False)


def allocate(class_mass: np.ndarray, class_count: np.ndarray, budget: int) -> np.ndarray:
    """Slots per class: at least 1, at most the class's count, the rest of ``budget`` shared by mass.

    Raises:
        ValueError: the budget is below the number of classes.
    """
    n = len(class_mass)
    if budget < n:
        raise InvalidValueError(f"a budget of {budget} slots cannot keep {n} classes (at least one slot each)")
    alloc = np.ones(n, np.int64)
    remaining = int(min(budget, class_count.sum()) - n)
    while remaining > 0:  # water-filling: classes that are full give their share to the others
        room = class_count - alloc
        share = np.where(room > 0, class_mass, 0.0)
        share = share / share.sum() * remaining
        add = np.minimum(np.floor(share).astype(np.int64), room)
        if add.sum() == 0:  # what is left is smaller than any share: largest fractions first
            order = [i for i in np.argsort(-share, kind="stable") if room[i] > 0][:remaining]
            add[order] = 1
        alloc += add
        remaining -= int(add.sum())
    return alloc


def by_class(label_idx: np.ndarray):
    order = np.argsort(label_idx, kind="stable")
    classes, starts = np.unique(label_idx[order], return_index=True)
    return classes, np.split(order, starts[1:])


def compact(vectors, weights, label_idx, used, *, budget: int, policy: str = "merge",
            metric: str = "cosine", temperature: float = 0.1, seed: int = 0, **options) -> SlotSet:
    """Shrink the live slots to at most ``budget`` with ``policy``.

    Args:
        vectors, weights, label_idx: columns of the live slots.
        used: when each was last written or retrieved ("age" keeps the most recent); None
            if the memory does not track usage.
        budget: the most slots to keep (at least the number of classes).
        policy: one of POLICIES.
        metric: "cosine" (vectors are unit-norm and merged vectors re-normalised), "ip" or "l2"
            (the similarity distill matches attention with; vectors as callers wrote them).
        temperature: the memory's temperature (distill matches its attention).
        seed: seed for k-means, sampling and distillation.
        **options: distill's ``steps``, ``lr``, ``queries``, ``learn_weights``, ``k``, ``holdout``,
            ``eval_every``.

    Raises:
        ValueError: an unknown policy or option, an option out of range, or a budget below
            the number of classes.
    """
    if policy not in POLICIES:
        raise InvalidValueError(f"unknown policy {policy!r}; choose one of {POLICIES}")
    check_options(options)
    classes, members = by_class(label_idx)
    mass = np.array([weights[m].sum() for m in members])
    alloc = allocate(mass, np.array([len(m) for m in members]), budget)
    rng = np.random.default_rng(seed)
    if policy == "merge" or policy == "distill":
        out, owner, means = merge(vectors, weights, classes, members, alloc, metric == "cosine", seed)
        if policy == "distill":
            out = _distill(out, owner, means, vectors, weights, label_idx, metric, temperature, seed, **options)
        return out
    if policy == "reservoir":
        keep = [rng.choice(m, size=b, replace=False, p=weights[m] / weights[m].sum()) if b < len(m) else m
                for m, b in zip(members, alloc)]
    else:  # age
        if used is None:
            raise InvalidValueError("the age policy needs usage times: this memory was made with track_usage=False")
        recency = used
        freshest = np.array([m[np.argmax(recency[m])] for m in members])
        rest = np.setdiff1d(np.arange(len(weights)), freshest)
        extra = rest[np.argsort(-recency[rest], kind="stable")[: max(0, budget - len(freshest))]]
        kept = np.concatenate([freshest, extra])
        keep = [np.intersect1d(m, kept) for m in members]
    return _rescaled(vectors, weights, label_idx, keep)


# distill's options: name -> (test of a valid value, what a valid value is)
_DISTILL_OPTIONS = {
    "steps": (lambda v: isinstance(v, (int, np.integer)) and v >= 0, "an integer >= 0"),
    "lr": (lambda v: isinstance(v, (int, float)) and np.isfinite(v) and v > 0, "a finite number > 0"),
    "queries": (lambda v: isinstance(v, (int, np.integer)) and v >= 1, "an integer >= 1"),
    "learn_weights": (lambda v: isinstance(v, bool), "True or False"),
    "k": (lambda v: isinstance(v, (int, np.integer)) and v >= 1, "an integer >= 1"),
    "holdout": (lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "a fraction in [0, 1)"),
    "eval_every": (lambda v: isinstance(v, (int, np.integer)) and v >= 1, "an integer >= 1"),
}


def check_request(memory: MemoryOptions, policy: str, seed: int, options: dict) -> int:
    """A compaction request checked against a memory's options; returns the seed.

    Raises:
        InvalidValueError: an unknown policy or option, or one out of range.
    """
    memory.check_policy(policy)
    seed = checks.integer("seed", seed, low=0)
    try:
        check_options(options)
    except ValueError as exc:
        raise InvalidValueError(str(exc)) from None
    return seed


def aside(state, live: SlotTable, vectors: np.ndarray, ids: Counter, *, budget: int | None, policy: str,
          metric: Metric, temperature: float, seed: int = 0, options: dict | None = None, keep_vectors: bool,
          required: bool = True):
    """``live`` compacted to ``budget`` and indexed like ``state`` (which readers go on using
    meanwhile): (the new state, or None when nothing was dropped or merged and nothing is
    ``required``; the slots kept; the policy's note; the new state's vectors). Merged slots
    take ids from ``ids``."""
    table, vectors, kept = shrink(live, vectors, budget=budget, policy=policy, metric=metric,
                                  temperature=temperature, seed=seed, options=options or {}, fresh_ids=ids.take,
                                  keep_vectors=keep_vectors, now=time.time())
    if not required and table.n_alive == live.n_alive:
        return None, table.n_alive, kept, vectors
    return state.rebuilt_from(table, vectors), table.n_alive, kept, vectors


def check_options(options: dict) -> None:
    """Raises ValueError naming the first unknown option or out-of-range value."""
    for name, value in options.items():
        if name not in _DISTILL_OPTIONS:
            raise InvalidValueError(f"unknown compaction option {name!r}; distill takes {tuple(_DISTILL_OPTIONS)}")
        valid, what = _DISTILL_OPTIONS[name]
        if not valid(value) or (isinstance(value, bool) and name != "learn_weights"):  # True is not a number
            raise InvalidValueError(f"distill option {name}={value!r}: must be {what}")


def _rescaled(vectors, weights, label_idx, keep: list[np.ndarray]) -> SlotSet:
    """Kept rows, their weights scaled so each class keeps its mass."""
    rows, w = [], []
    for m_keep, cls_rows in zip(keep, by_class(label_idx)[1]):
        scale = weights[cls_rows].sum() / weights[m_keep].sum()
        rows.append(m_keep)
        w.append(weights[m_keep] * scale)
    rows = np.concatenate(rows)
    return SlotSet(vectors[rows], np.concatenate(w), label_idx[rows], rows)


def merge(vectors, weights, classes, members, alloc, cosine: bool, seed: int):
    """Merged slots, plus for distill: ``owner[i]``, the merged slot input row i went into, and the
    un-normalised weighted mean of every merged slot."""
    out_v, out_w, out_c, out_src, out_mean = [], [], [], [], []
    owner = np.empty(len(vectors), np.int64)
    n_out = 0
    with _bar(len(classes), "merge", "class") as bar:
        for c, m, b in zip(classes, members, alloc):
            n_out = _merge_class(vectors, weights, c, m, b, cosine, seed, owner, n_out,
                                 (out_v, out_w, out_c, out_src, out_mean))
            bar.update()
    merged = SlotSet(np.concatenate(out_v), np.concatenate(out_w), np.concatenate(out_c).astype(np.int32),
                     np.concatenate(out_src))
    return merged, owner, np.concatenate(out_mean)


def _merge_class(vectors, weights, c, m, b, cosine: bool, seed: int, owner, n_out: int, out) -> int:
    """Merge class ``c``'s rows ``m`` into at most ``b`` slots, appended to ``out``; returns
    the slots made so far."""
    out_v, out_w, out_c, out_src, out_mean = out
    if b >= len(m):  # nothing to merge: keep the slots as they are
        owner[m] = n_out + np.arange(len(m))
        out_v.append(vectors[m]); out_w.append(weights[m]); out_c.append(np.full(len(m), c)); out_src.append(m)  # noqa: E702
        out_mean.append(vectors[m].astype(np.float64))
        return n_out + len(m)
    x, w = vectors[m], weights[m]
    if b == 1:
        assign = np.zeros(len(m), np.int64)
    elif 2 * b >= len(m):  # a light squeeze: merge nearest pairs rather than k-means with k close to n
        assign = _pair_assign(x, b, cosine)
    else:
        km = faiss.Kmeans(x.shape[1], int(b), niter=20, seed=seed, spherical=cosine, verbose=False)
        km.cp.min_points_per_centroid = 1  # small classes: no warning, the result is still a partition
        km.train(x, weights=w.astype(np.float32))
        _, assign = km.index.search(x, 1)
        assign = assign[:, 0]
    sums = np.zeros((b, x.shape[1]))
    np.add.at(sums, assign, x * w[:, None])
    mass = np.bincount(assign, weights=w, minlength=b)
    used = mass > 0  # an empty cluster had no members and so no mass
    renumber = np.cumsum(used) - 1
    owner[m] = n_out + renumber[assign]
    means = sums[used] / mass[used, None]
    centroids = means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12) if cosine else means
    out_v.append(centroids.astype(np.float32)); out_w.append(mass[used]); out_c.append(np.full(used.sum(), c))  # noqa: E702
    out_src.append(np.full(used.sum(), -1))
    out_mean.append(means)
    return n_out + int(used.sum())


def _pair_assign(x: np.ndarray, b: int, cosine: bool) -> np.ndarray:
    """Cluster ids putting ``len(x)`` points into ``b`` groups by merging nearest pairs, round by round.

    Each round finds every point's nearest neighbour (FAISS, exact), takes disjoint
    pairs most similar first, and merges as many as are still needed; merged groups
    are represented by their mean in the next round.
    """
    group = np.arange(len(x))
    reps, members = x.astype(np.float32), [[i] for i in range(len(x))]
    while len(members) > b:
        index = faiss.IndexFlatIP(x.shape[1]) if cosine else faiss.IndexFlatL2(x.shape[1])
        index.add(reps)
        dist, nn = index.search(reps, 2)
        near = np.where(nn[:, 0] == np.arange(len(reps)), nn[:, 1], nn[:, 0])
        score = dist[np.arange(len(reps)), np.where(nn[:, 0] == np.arange(len(reps)), 1, 0)]
        order = np.argsort(-score if cosine else score, kind="stable")
        taken = np.zeros(len(reps), bool)
        need = len(members) - b
        merged = []
        for i in order:
            j = near[i]
            if need == 0:
                break
            if taken[i] or taken[j] or i == j:
                continue
            taken[i] = taken[j] = True
            merged.append((i, j))
            need -= 1
        new_members = [members[i] + members[j] for i, j in merged] + [members[i] for i in np.flatnonzero(~taken)]
        members = new_members
        reps = np.stack([x[g].mean(axis=0) for g in members]).astype(np.float32)
        if cosine:
            reps /= np.maximum(np.linalg.norm(reps, axis=1, keepdims=True), 1e-12)
    for cluster, g in enumerate(members):
        group[g] = cluster
    return group


def _distill(start: SlotSet, owner: np.ndarray, means: np.ndarray, vectors, weights, label_idx, metric: str,
             temperature: float, seed: int, *, steps: int = 300, lr: float = 0.01, queries: int = 32768,
             learn_weights: bool = True, k: int = 64, holdout: float = 0.25, eval_every: int = 25) -> SlotSet:
    """Tune the merged slots ``start`` so their class probabilities match the full memory's (KL)
    on queries sampled from the slots.

    Both memories answer as a query does: softmax attention over the top ``k`` slots
    (the ``k`` the memory is queried with). Dense attention over every slot is a
    different, smoother classifier (on learned Fashion-MNIST embeddings it is 0.9
    points less accurate than top-64), and matching it pulls the compact memory
    towards prototypes.

    Both answers are leave-one-out, as a test query is not in the memory: a query
    sampled from slot i is answered by the full memory without slot i, and by the
    compact memory with slot i taken out of the merged slot it went into
    (``owner[i]``; that slot's mean and mass lose i's share; a slot that was i alone
    is dropped). Without this the compact memory is fitted, and judged, on queries
    that sit inside its own centroids. A ``holdout`` share of the queries is kept
    aside; every ``eval_every`` steps they are answered, and the best state seen,
    the merge it started from included, is returned: the one whose answers agree
    most often with the full memory's top class, then the lowest KL. (KL alone is
    not enough: on Omniglot it fell by a quarter on held-out queries while the
    agreement, and the test accuracy, fell by 3 points.)
    """
    from ..extras import require

    torch = require("torch", 'compaction with policy="distill"')
    F = torch.nn.functional

    gen = torch.Generator().manual_seed(seed)
    n_classes = int(label_idx.max()) + 1
    full_v = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    full_w = torch.from_numpy(np.asarray(weights, np.float64))
    full_c = torch.from_numpy(label_idx.astype(np.int64))
    pick = torch.randperm(len(vectors), generator=gen)[:queries]

    def answer(sims, log_w, slot_class):
        """p(c): softmax of log w_i + s_i / T over each row's top-k slots by similarity, summed per class;
        ``sims`` and ``log_w`` are (queries, slots)."""
        top_s, top_i = sims.topk(min(k, sims.shape[1]), dim=1)
        a = torch.softmax(top_s / temperature + log_w.gather(1, top_i), dim=1)
        return torch.zeros(len(sims), n_classes, dtype=a.dtype).scatter_add(1, slot_class[top_i], a)

    if metric == "l2":  # -|q - x|^2 less |q|^2, the same for every slot of a query
        def sim(a, b):
            return 2 * a @ b.T - (b * b).sum(1)

        def sim_rows(a, b):
            return 2 * (a * b).sum(1) - (b * b).sum(1)
    else:
        unit = (lambda x: F.normalize(x, dim=-1)) if metric == "cosine" else (lambda x: x)

        def sim(a, b):
            return a @ unit(b).T

        def sim_rows(a, b):
            return (a * unit(b)).sum(1)

    chunks = pick.split(512)
    bar = _bar(len(chunks) + steps, "distill", "step")  # the full memory's answers, then the steps
    with torch.no_grad():  # the full memory's leave-one-out answers, in chunks of queries
        full_logw = full_w.log().float()
        target = []
        for rows in chunks:
            sims = sim(full_v[rows], full_v)
            sims[torch.arange(len(rows)), rows] = float("-inf")
            target.append(answer(sims, full_logw.expand(len(rows), -1), full_c))
            bar.update()
        target = torch.cat(target)
    n_held = int(round(holdout * len(pick))) if len(pick) >= 8 else 0
    held, fit = (pick[:n_held], target[:n_held]), (pick[n_held:], target[n_held:])

    owner_t = torch.from_numpy(owner)
    means_t = torch.from_numpy(means)
    merged_mass = torch.from_numpy(start.weights)  # each merged slot's mass before any learning
    v = torch.nn.Parameter(means_t.float().clone())  # un-normalised means, so that a member can be taken out
    c = torch.from_numpy(start.label_idx.astype(np.int64))
    class_mass = torch.zeros(n_classes, dtype=torch.float64).index_add_(0, c, merged_mass)
    logits = torch.nn.Parameter(torch.log(merged_mass).float())
    opt = torch.optim.Adam([v, logits] if learn_weights else [v], lr=lr)

    def slot_weights():
        # softmax of the logits within each class, times the class's mass: mass preserved exactly
        z = logits - logits.max()
        e = z.exp().double()
        per_class = torch.zeros(n_classes, dtype=torch.float64).index_add(0, c, e)
        return e / per_class[c] * class_mass[c]

    def kl(rows, p):
        """KL(full || compact) for queries at ``rows``, each left out of the merged slot it is in."""
        qv, own, w_own = full_v[rows], owner_t[rows], full_w[rows]
        rest = merged_mass[own] - w_own  # the owner's mass without the query
        alone = rest <= 1e-9 * merged_mass[own]
        rest_safe = torch.where(alone, merged_mass[own], rest)  # finite everywhere, so gradients stay finite
        v_own = v[own] + (w_own / rest_safe)[:, None].float() * (means_t[own].float() - qv)
        s_own = torch.where(alone, float("-inf"), sim_rows(qv, v_own))
        sims = sim(qv, v).scatter(1, own[:, None], s_own[:, None])
        logw = torch.log(slot_weights()).float()
        lw_own = logw[own] + torch.log(rest_safe / merged_mass[own]).float()
        log_w = logw.expand(len(rows), -1).scatter(1, own[:, None], lw_own[:, None])
        p_compact = answer(sims, log_w, c)
        return (p * (torch.log(p.clamp_min(1e-30)) - torch.log(p_compact.clamp_min(1e-30)))).sum(1).mean(), p_compact

    def held_out_score() -> tuple[float, float]:
        """(argmax agreement with the full memory, -KL) on the held-out queries: higher is better."""
        if not n_held:
            return (0.0, 0.0)
        with torch.no_grad():
            loss, p_compact = kl(*held)
            return float((p_compact.argmax(1) == held[1].argmax(1)).float().mean()), -float(loss)

    merged_score = held_out_score()
    best = (merged_score, v.detach().clone(), logits.detach().clone(), 0)
    with bar:
        for step in range(1, steps + 1):
            idx = torch.randint(0, len(fit[0]), (min(1024, len(fit[0])),), generator=gen)
            loss, _ = kl(fit[0][idx], fit[1][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if n_held and (step % eval_every == 0 or step == steps):
                score = held_out_score()
                if score > best[0]:
                    best = (score, v.detach().clone(), logits.detach().clone(), step)
                bar.set_postfix(agree=f"{score[0]:.3f}", best=f"{best[0][0]:.3f}", refresh=False)
            bar.update()
    with torch.no_grad():
        if n_held:
            v.copy_(best[1])
            logits.copy_(best[2])
        out = F.normalize(v, dim=-1) if metric == "cosine" else v
        return SlotSet(out.numpy().astype(np.float32), slot_weights().numpy(), start.label_idx,
                       np.full(len(c), -1), _kept_note(n_held, steps, best[3], best[0], merged_score))


def _kept_note(n_held: int, steps: int, step: int, score: tuple, merged: tuple) -> str:
    """What distill kept and why, in words for the report."""
    if steps == 0:
        return "merged: distillation was given no steps"
    if not n_held:
        return f"distilled: the state after {steps} steps (no held-out queries to choose by)"
    said = (f"held-out agreement with the full memory's top class {score[0]:.3f}, KL {-score[1]:.4f} "
            f"(the merge: {merged[0]:.3f}, KL {-merged[1]:.4f})")
    if step == 0:
        return f"merged: no distilled state beat the merge it started from on held-out queries; {said}"
    return f"distilled: the state after step {step} of {steps}, the best on held-out queries; {said}"


def shrink(live: SlotTable, vectors: np.ndarray, *, budget: int | None, policy: str, metric: Metric,
           temperature: float, seed: int, options: dict, fresh_ids, keep_vectors: bool,
           now: float) -> tuple[SlotTable, np.ndarray, str | None]:
    """A new table of the slots ``live`` compacted to ``budget`` (None: all of them, renumbered),
    its vectors, and which state the policy kept and why (distill; else None).

    Kept slots keep their ids and usage times; merged ones take ids from ``fresh_ids(n)``
    and are written ``now``. ``live`` is not changed. ``vectors`` are as the index holds them
    (lifted for l2, see :mod:`engine.metric`): slots are merged as the caller wrote them.

    Raises:
        InvalidValueError: a budget below the number of classes, or a bad option.
    """
    table = SlotTable(live.dim, keep_vectors, live.track_usage)
    weights = live.weights
    note = None
    if budget is None or budget >= live.n_alive:
        table.append(live.ids, live.label_idx, None if live.unit_weights else weights, vectors,
                     live.used if live.track_usage else 0.0)
    else:
        classes = int((live.class_counts > 0).sum())
        if budget < classes:
            raise InvalidValueError(f"a budget of {budget} slots cannot keep {classes} classes (one slot each)")
        try:
            out = compact(metric.stored(vectors), np.array(weights), live.label_idx, live.used, budget=budget,
                          policy=policy, metric=metric.name, temperature=temperature, seed=seed, **options)
        except ValueError as exc:
            raise InvalidValueError(str(exc)) from None
        kept = out.source >= 0
        src = np.maximum(out.source, 0)
        ids = np.where(kept, live.ids[src], -1)
        ids[~kept] = fresh_ids(int((~kept).sum()))
        vectors = metric.slots(out.vectors)
        table.append(ids, out.label_idx, out.weights, vectors,
                     np.where(kept, live.used[src], now) if live.track_usage else 0.0)
        note = out.kept
    table.class_counts = np.pad(table.class_counts, (0, max(0, len(live.class_counts) - len(table.class_counts))))
    return table, vectors, note
