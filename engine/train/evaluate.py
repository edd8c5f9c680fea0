"""Evaluation: N-way K-shot episodes on held-out images, and the official one-shot task
answered through :class:`engine.Memory`."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..data.episodes import EpisodeSampler
from ..data.images import as_input
from ..errors import InvalidValueError
from ..extras import require
from ..nn import MatchingNetwork


@torch.no_grad()
def evaluate_episodes(model: MatchingNetwork, images: np.ndarray, groups=None, *, n_way: int = 20, k_shot: int = 1,
                      n_query: int = 5, episodes: int = 500, within_group: float = 0.0, seed: int = 0,
                      assign: bool = False, features: np.ndarray | None = None) -> dict:
    """Mean query accuracy over random N-way K-shot episodes, with a 95% confidence interval.

    Every image is embedded once (:func:`episode_features`, views included); the episodes
    then draw the same classes and drawings from those features as they would from the
    images, and only FCE's LSTMs run per episode. ``features``: what
    :func:`episode_features` gave for this model and these images, so that several
    settings are scored over one embedding (made with the same model and views: only their
    shape is checked).

    With ``assign`` (and ``n_query=1``: one query of each class, the official runs' layout),
    each episode is also scored transductively, its queries matched to its classes one to
    one (:func:`assign_classes`): ``"assigned_accuracy"`` and its ``"assigned_ci95"``.
    """
    if assign and n_query != 1:
        raise InvalidValueError(f"assign needs one query of each class (n_query=1), got n_query={n_query}")
    if features is None:
        features = episode_features(model, images)
    elif features.shape != (*images.shape[:2], 2, model.dim):
        raise InvalidValueError(f"features of shape {features.shape} for {images.shape[:2]} (classes, drawings) "
                                f"of a model of dimension {model.dim}: expected {(*images.shape[:2], 2, model.dim)}")
    model.eval()
    sampler = EpisodeSampler(features, n_way, k_shot, n_query, groups=groups, within_group=within_group, seed=seed)
    accs, assigned = [], []
    for _ in range(episodes):
        ep = sampler.sample()
        model.process_support_set(torch.from_numpy(ep.support_x[:, 0]), torch.from_numpy(ep.support_y), features=True)
        logp = model(torch.from_numpy(ep.query_x[:, 1]), features=True)
        assert model.classes is not None  # set by process_support_set
        target = torch.as_tensor(np.searchsorted(model.classes.numpy(), ep.query_y))
        accs.append(float((logp.argmax(1) == target).float().mean()))
        if assign:
            assigned.append(float((assign_classes(logp.double().numpy()) == target.numpy()).mean()))
    out = {"accuracy": float(np.mean(accs)), "ci95": 1.96 * float(np.std(accs)) / math.sqrt(len(accs)),
           "episodes": episodes, "n_way": n_way, "k_shot": k_shot, "within_alphabet": within_group == 1.0}
    if assign:
        out.update(assigned_accuracy=float(np.mean(assigned)),
                   assigned_ci95=1.96 * float(np.std(assigned)) / math.sqrt(len(assigned)))
    return out


@torch.no_grad()
def episode_features(model: MatchingNetwork, images: np.ndarray) -> np.ndarray:
    """(classes, drawings, 2, d): each image's g and h backbone features (views included),
    what :func:`evaluate_episodes` draws its episodes from."""
    model.eval()
    n_classes, per = images.shape[:2]
    g, h = model.backbone_features(as_input(images.reshape(n_classes * per, *images.shape[2:])))
    return torch.stack([g, h], dim=1).reshape(n_classes, per, 2, -1).numpy()


@torch.no_grad()
def eval_oneshot(model: MatchingNetwork, runs, *, assign: bool = False) -> dict:
    """The official 20-way within-alphabet one-shot task, answered through ``engine.Memory``.

    For each run, the 20 training images are embedded with g and written into a
    memory; each test item is embedded with h and classified by ``Memory.query``.

    Args:
        assign: also score each run transductively: a run's 20 test items are 20 drawings
            of its 20 classes, one each, so the items may be matched to the classes as a
            whole, one to one, by the assignment that maximises the sum of the items' log
            attention on their class (:func:`assign_classes`). Reported apart, under
            ``"assigned"``; the per-query figures are unchanged.

    Returns:
        {"error_rate": mean over runs, "runs": count, "per_run": {name: error rate}}, and
        with ``assign`` also {"assigned": {"error_rate": ..., "per_run": {...}}}.

    Raises:
        InvalidValueError: ``assign`` on a run whose test items are not as many as its
            classes (no one-to-one matching exists).
    """
    runs = list(runs)  # read twice with assign: a generator would be used up
    if assign:  # refused before any run is scored
        require("scipy.optimize", "the one-to-one assignment (assign)")
        for run in runs:
            if len(run.test) != len(run.train):
                raise InvalidValueError(f"{run.name}: {len(run.test)} test items for {len(run.train)} classes; "
                                        f"a one-to-one assignment needs as many of each")
    model.eval()
    per_run, assigned = {}, {}
    for run in runs:
        memory = model.to_memory(as_input(run.train), list(range(len(run.train))))
        res = model.query_memory(memory, as_input(run.test), k=len(run.train))
        per_run[run.name] = float((np.asarray(res.labels) != run.answer).mean())
        if assign:
            found = res.ids >= 0
            weights = np.ones(res.ids.shape)
            weights[found] = memory.get(res.ids[found]).weights
            log_attention = class_log_attention(res.scores, res.slot_classes, len(res.classes),
                                                float(memory.temperature), weights=weights)
            labels = np.asarray(res.classes)[assign_classes(log_attention)]
            assigned[run.name] = float((labels != run.answer).mean())
    out = {"error_rate": float(np.mean(list(per_run.values()))), "runs": len(per_run), "per_run": per_run}
    if assign:
        out["assigned"] = {"error_rate": float(np.mean(list(assigned.values()))), "per_run": assigned}
    return out


def class_log_attention(scores: np.ndarray, slot_classes: np.ndarray, n_classes: int, temperature: float,
                        weights: np.ndarray | None = None) -> np.ndarray:
    """(n, C) log of the attention each query puts on each class over its retrieved slots,
    softmax_i(score_i / T + log w_i) summed by class: in float64, a log-sum-exp per class, so
    no class underflows to minus infinity; minus infinity for a class none of its retrieved
    slots holds.

    Args:
        scores, slot_classes: (n, k) a :class:`~engine.QueryResult`'s (padding: class -1).
        weights: (n, k) each retrieved slot's weight (default 1), as the memory attends.
    """
    if slot_classes is None:
        raise InvalidValueError("class_log_attention needs the result's slot classes")
    logits = np.asarray(scores, np.float64) / temperature
    if logits.ndim != 2 or np.shape(slot_classes) != logits.shape or (
            weights is not None and np.shape(weights) != logits.shape):
        raise InvalidValueError(f"scores, slot classes and weights must share one (n, k) shape, got {logits.shape}, "
                                f"{np.shape(slot_classes)} and {None if weights is None else np.shape(weights)}")
    if weights is not None:
        with np.errstate(divide="ignore"):
            logits = logits + np.log(np.asarray(weights, np.float64))
    logits = np.where((slot_classes >= 0) & ~np.isnan(logits), logits, -np.inf)
    out = np.full((len(scores), n_classes), -np.inf)
    for c in range(n_classes):
        mine = np.where(slot_classes == c, logits, -np.inf)
        top = mine.max(axis=1, initial=-np.inf)
        ok = np.isfinite(top)
        out[ok, c] = top[ok] + np.log(np.exp(mine[ok] - top[ok, None]).sum(axis=1))
    top = out.max(axis=1, keepdims=True)
    some = np.isfinite(top)  # a query with no slot keeps its row of minus infinity
    top = np.where(some, top, 0.0)
    total = np.log(np.exp(out - top).sum(axis=1, keepdims=True), where=some, out=np.zeros_like(top))
    return out - (top + total)


def assign_classes(log_attention: np.ndarray) -> np.ndarray:
    """The one-to-one matching of n items to n classes that maximises the sum of each item's
    log attention on its class: the assignment problem the Hungarian method solves, here by
    ``scipy.optimize.linear_sum_assignment``. A matching with fewer minus-infinity entries
    always wins; among those with as many, the larger finite sum.

    Returns:
        (n,) each item's class column.

    Raises:
        InvalidValueError: not square, or NaN in ``log_attention``.
    """
    linear_sum_assignment = require("scipy.optimize", "the one-to-one assignment").linear_sum_assignment
    log_attention = np.asarray(log_attention, np.float64)
    if log_attention.ndim != 2 or log_attention.shape[0] != log_attention.shape[1]:
        raise InvalidValueError(f"a one-to-one assignment needs as many items as classes, got {log_attention.shape}")
    if np.isnan(log_attention).any() or np.isposinf(log_attention).any():
        raise InvalidValueError("a one-to-one assignment needs log attention without NaN or +inf")
    n = len(log_attention)
    # minus infinity (a class none of an item's slots holds) becomes a floor below every
    # finite matching: any matching's finite part lies within n * (max - min) of another's
    finite = log_attention[np.isfinite(log_attention)]
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
    floor = low - n * (high - low) - 1.0
    rows, cols = linear_sum_assignment(np.where(np.isfinite(log_attention), log_attention, floor), maximize=True)
    out = np.empty(n, dtype=np.int64)
    out[rows] = cols
    return out
