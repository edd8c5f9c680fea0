"""Evaluation: N-way K-shot episodes on held-out images, and the official one-shot task
answered through :class:`engine.Memory`."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..data.episodes import EpisodeSampler
from ..data.images import as_input
from ..nn import MatchingNetwork


@torch.no_grad()
def evaluate_episodes(model: MatchingNetwork, images: np.ndarray, groups=None, *, n_way: int = 20, k_shot: int = 1,
                      n_query: int = 5, episodes: int = 500, within_group: float = 0.0, seed: int = 0) -> dict:
    """Mean query accuracy over random N-way K-shot episodes, with a 95% confidence interval.

    Every image is embedded once (:meth:`MatchingNetwork.backbone_features`, views included);
    the episodes then draw the same classes and drawings from those features as they would
    from the images, and only FCE's LSTMs run per episode.
    """
    model.eval()
    n_classes, per = images.shape[:2]
    g, h = model.backbone_features(as_input(images.reshape(n_classes * per, *images.shape[2:])))
    features = torch.stack([g, h], dim=1).reshape(n_classes, per, 2, -1).numpy()
    sampler = EpisodeSampler(features, n_way, k_shot, n_query, groups=groups, within_group=within_group, seed=seed)
    accs = []
    for _ in range(episodes):
        ep = sampler.sample()
        model.process_support_set(torch.from_numpy(ep.support_x[:, 0]), torch.from_numpy(ep.support_y), features=True)
        logp = model(torch.from_numpy(ep.query_x[:, 1]), features=True)
        target = torch.as_tensor(np.searchsorted(model.classes.numpy(), ep.query_y))
        accs.append(float((logp.argmax(1) == target).float().mean()))
    mean, std = float(np.mean(accs)), float(np.std(accs))
    return {"accuracy": mean, "ci95": 1.96 * std / math.sqrt(len(accs)), "episodes": episodes,
            "n_way": n_way, "k_shot": k_shot, "within_alphabet": within_group == 1.0}


@torch.no_grad()
def eval_oneshot(model: MatchingNetwork, runs) -> dict:
    """The official 20-way within-alphabet one-shot task, answered through ``engine.Memory``.

    For each run, the 20 training images are embedded with g and written into a
    memory; each test item is embedded with h and classified by ``Memory.query``.

    Returns:
        {"error_rate": mean over runs, "runs": count, "per_run": {name: error rate}}
    """
    model.eval()
    per_run = {}
    for run in runs:
        memory = model.to_memory(as_input(run.train), list(range(len(run.train))))
        res = model.query_memory(memory, as_input(run.test), k=len(run.train))
        per_run[run.name] = float((np.asarray(res.labels) != run.answer).mean())
    return {"error_rate": float(np.mean(list(per_run.values()))), "runs": len(per_run), "per_run": per_run}
