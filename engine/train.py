"""Episodic meta-training and evaluation of Matching Networks.

Training follows Vinyals et al. (2016): each step samples an N-way K-shot
episode, the support set goes through ``process_support_set``, and the loss is
the NLL of the queries' log-probabilities. Checkpoints are plain state dicts
(loadable with ``torch.load(..., weights_only=True)``) plus a JSON config.

Default Omniglot recipe: train on the minimal split ``small1`` (``background``; or
``small2``) with rotations by 90/180/270 degrees as extra classes, validate on the
alphabets of the other minimal split that it lacks (for ``small1``: Japanese
(katakana), Sanskrit, Tagalog) with within-alphabet 20-way 1-shot episodes.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .data.augment import check_views, jitter
from .data.episodes import Episode, EpisodeSampler
from .data.images import as_input, pixels
from .nn import MatchingNetwork

FASHION_HELD_OUT = 100  # training images a class kept out of Fashion-MNIST training, for its validation
CHECKPOINT_FILES = ("config.json", "model.pt", "best.pt", "optimizer.pt", "state.pt", "state.json")


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved as config.json)."""

    dataset: str = "omniglot"  # or "fashion-mnist"
    data: str | None = None
    background: str = "small1"  # omniglot: the minimal split trained on (validated on the other's new alphabets)
    n_way: int = 20
    k_shot: int = 1
    n_query: int = 5
    within_alphabet: float = 0.5  # share of training episodes drawn within one alphabet
    shift: float = 2.0  # augmentation: random translation (pixels), rotation (degrees), zoom (relative)
    rotate: float = 10.0
    scale: float = 0.1
    elastic: float = 0.0  # augmentation: smooth random displacement of the strokes, at most this many pixels
    flip: bool = False  # augmentation: mirror half the images left to right (garments, not characters)
    thickness: float = 0.0  # augmentation: strokes thicker or thinner, by up to this share of a pixel's dilation
    episodes: int = 6000
    pretrain_epochs: int = 0  # supervised stage first: every training class at once (see pretrain)
    pretrain_batch: int = 128
    width: int = 64  # filters per conv block: the embedding's dimension
    views: int = 1  # test-time views averaged per image (MatchingNetwork(views=)); training sees one
    time_budget_s: float | None = None
    lr: float = 1e-3
    lr_min: float = 1e-5  # cosine decay to this
    fce: bool = False
    fce_steps: int = 5
    temperature: float = 0.1
    topk: int | None = None  # train with top-k attention (forward_topk) instead of the dense softmax
    topk_tail: bool = False  # with topk: add the estimated rest of each class (engine.tail)
    val_every: int = 500
    val_episodes: int = 200
    val_way: int = 20
    seed: int = 0
    threads: int | None = None
    deterministic: bool = True  # torch's deterministic kernels (fewer run-to-run differences from one seed)
    model: dict = field(default_factory=dict)


def episode_loss(model: MatchingNetwork, ep: Episode, topk: int | None = None,
                 topk_tail: bool = False) -> tuple[torch.Tensor, float]:
    """NLL on log-probabilities of one episode's queries, and their accuracy."""
    model.process_support_set(as_input(ep.support_x), torch.from_numpy(ep.support_y))
    q = as_input(ep.query_x)
    logp = model.forward_topk(q, topk, estimate_tail=topk_tail) if topk else model(q)
    target = torch.as_tensor(np.searchsorted(model.classes.numpy(), ep.query_y))
    loss = torch.nn.functional.nll_loss(logp, target)
    return loss, float((logp.argmax(1) == target).float().mean())


def augment(ep: Episode, shift: float, rng: np.random.Generator, *, rotate: float = 0.0,
            scale: float = 0.0, elastic: float = 0.0, flip: bool = False, thickness: float = 0.0) -> Episode:
    """Random jitter of every image of an episode (labels unchanged; see :func:`jitter`)."""
    if shift <= 0 and rotate <= 0 and scale <= 0 and elastic <= 0 and not flip and thickness <= 0:
        return ep
    how = {"rotate": rotate, "scale": scale, "elastic": elastic, "flip": flip, "thickness": thickness}
    return Episode(jitter(ep.support_x, shift, rng, **how), ep.support_y, jitter(ep.query_x, shift, rng, **how),
                   ep.query_y)


def _check_stage(cfg: TrainConfig) -> None:
    """Refuse the options this module reads first whose error would otherwise surface deep in torch."""
    if cfg.background not in ("small1", "small2"):
        raise ValueError(f"background must be small1 or small2, got {cfg.background!r}")
    if cfg.pretrain_epochs < 0 or cfg.pretrain_batch < 2:
        raise ValueError(f"pretrain_epochs must be >= 0 and pretrain_batch >= 2 (batch norm), got "
                         f"{cfg.pretrain_epochs} and {cfg.pretrain_batch}")
    if cfg.width < 1 or not cfg.elastic >= 0:
        raise ValueError(f"width must be >= 1 and elastic >= 0, got {cfg.width} and {cfg.elastic}")
    if not 0 <= cfg.thickness <= 1:
        raise ValueError(f"thickness must be in [0, 1], got {cfg.thickness}")
    check_views(cfg.views)


def pretrain(model: MatchingNetwork, images: np.ndarray, cfg: TrainConfig, rng: np.random.Generator, *,
             progress: bool = True) -> list[dict]:
    """The supervised stage before episodes: g learns to tell every training class from
    every other at once, through a cosine classifier (a learned unit direction per class,
    logits = cos / T at the model's temperature), the loss the episodes later refine.

    The head is dropped afterwards; only g (and h, when shared) keep what it learned.
    Augmented as the episodes are; Adam with a cosine decay over the stage.

    Args:
        images: (classes, per class, H, W) training images.

    Returns:
        One row per epoch: loss and training accuracy.
    """
    _check_stage(cfg)
    n_classes, per = images.shape[:2]
    x = images.reshape(n_classes * per, *images.shape[2:])
    y = torch.as_tensor(np.repeat(np.arange(n_classes), per))
    head = torch.nn.Parameter(torch.randn(n_classes, model.dim) * 0.01)
    params = list(model.g_backbone.parameters()) + [head, model.log_temperature]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    per_epoch = max(len(x) // cfg.pretrain_batch, 1)  # whole batches (batch norm needs more than one image)
    steps = cfg.pretrain_epochs * per_epoch
    model.train()
    rows, step = [], 0
    with tqdm(total=steps, desc="pre-training", unit="batch", disable=not progress) as bar:
        for epoch in range(cfg.pretrain_epochs):
            bar.set_description(f"pre-training epoch {epoch + 1}/{cfg.pretrain_epochs}")
            losses, hits, seen = [], 0, 0
            order = rng.permutation(len(x))
            for b in range(per_epoch):
                for group in opt.param_groups:
                    group["lr"] = cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * step / steps))
                pick = order[b * cfg.pretrain_batch:(b + 1) * cfg.pretrain_batch]
                xb = jitter(pixels(x[pick]), cfg.shift, rng, rotate=cfg.rotate, scale=cfg.scale, elastic=cfg.elastic,
                            flip=cfg.flip, thickness=cfg.thickness)
                z = torch.nn.functional.normalize(model.g_backbone(as_input(xb)), dim=1)
                logits = z @ torch.nn.functional.normalize(head, dim=1).T / model.temperature
                loss = torch.nn.functional.cross_entropy(logits, y[pick])
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
                hits += int((logits.argmax(1) == y[pick]).sum())
                seen += len(pick)
                step += 1
                bar.update(1)
                if b % 10 == 9:  # this epoch's running figures
                    bar.set_postfix(loss=f"{np.mean(losses):.3f}", acc=f"{hits / seen:.3f}", refresh=False)
            rows.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "train_acc": hits / seen})
            bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}", acc=f"{rows[-1]['train_acc']:.3f}")
    return rows


def recipe(dataset: str, **overrides) -> TrainConfig:
    """The training recipe of a dataset (the one place each is written), with ``overrides``.

    omniglot: 20 supervised epochs over the background classes, then 20-way 1-shot
    episodes, half within one alphabet; strokes jittered (affine, then elastic by up to
    1.5 px); each image seen through 8 test-time views. Each step was kept because it
    raised within-alphabet validation accuracy (docs/matching-networks.md).
    fashion-mnist: 20 supervised epochs (shifts only: mirror images, with 6 epochs, scored
    0.915 against 0.918) and no episodes (300 lowered the memory from 0.918 to 0.912), 4
    test-time views; episodes, if asked for, are 10-way 5-shot with 10 queries a class,
    validated 10-way on training images held out of training.
    """
    base = {"omniglot": {"pretrain_epochs": 20, "elastic": 1.5, "views": 8},
            "fashion-mnist": {"pretrain_epochs": 20, "episodes": 0, "rotate": 0.0, "scale": 0.0, "views": 4,
                              "n_way": 10, "k_shot": 5, "n_query": 10, "val_way": 10, "val_episodes": 50}}
    if dataset not in base:
        raise ValueError(f"unknown dataset {dataset!r}: use 'omniglot' or 'fashion-mnist'")
    return TrainConfig(dataset=dataset, **{**base[dataset], **overrides})


def load_sets(cfg: TrainConfig):
    """(train images, train groups, validation images, validation groups) for the config's dataset."""
    return _load_sets(cfg.dataset, cfg.data, getattr(cfg, "background", "small1"))


@functools.lru_cache(maxsize=2)
def _load_sets(dataset: str, data: str | None, background: str = "small1"):
    if dataset == "omniglot":  # validated on the alphabets of the other minimal split that this one lacks
        from .data.omniglot import load_background, validation_split

        other, unseen = validation_split(background, data)
        train = load_background(background, data).with_rotations()
        val = load_background(other, data, alphabets=unseen)
        return train.images, train.alphabets, val.images, val.alphabets
    if dataset == "fashion-mnist":  # validated on training images held out of training, never on the test set
        from .data.fashion_mnist import load_fashion_mnist

        x, y = load_fashion_mnist(data, "train")
        n = np.bincount(y).min()
        by_class = np.stack([x[y == c][:n] for c in range(10)])
        return by_class[:, :-FASHION_HELD_OUT], None, by_class[:, -FASHION_HELD_OUT:], None
    raise ValueError(f"unknown dataset {dataset!r}: use 'omniglot' or 'fashion-mnist'")


def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Meta-train a Matching Network episodically (see :func:`_train`).

    With ``cfg.deterministic`` torch uses its deterministic kernels for the run (at no
    measured cost); the caller's setting is restored. Without them, 2 of 6 processes trained
    another model from the same seed (150 FCE episodes). With them, an idle machine gave the
    same model 10 times in 10, but a loaded one now and then differs in the last bits (1 in
    5); ``threads=1`` was identical under load too, at about half the speed.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    try:
        return _train(cfg, out, resume=resume, progress=progress)
    finally:
        torch.use_deterministic_algorithms(previous)


def _train(cfg: TrainConfig, out: str | Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Meta-train a Matching Network episodically.

    Args:
        cfg: the recipe.
        out: checkpoint folder (config.json, model.pt, best.pt, optimizer.pt, state.pt, log.jsonl).
        resume: continue from the checkpoint in ``out``.
        progress: show a progress bar.

    Returns:
        A summary: episodes run, final and best validation accuracy, seconds.
    """
    _check_stage(cfg)  # before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    train_x, train_groups, val_x, val_groups = load_sets(cfg)
    within = cfg.within_alphabet if train_groups is not None else 0.0
    sampler = EpisodeSampler(train_x, cfg.n_way, cfg.k_shot, cfg.n_query, groups=train_groups,
                             within_group=within, seed=cfg.seed)
    model = MatchingNetwork(fce=cfg.fce, fce_steps=cfg.fce_steps, temperature=cfg.temperature, width=cfg.width,
                             views=cfg.views)
    cfg.model = model.config()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    state = {"episode": 0, "best_val": -1.0, "elapsed_s": 0.0}
    if resume:
        model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
        opt.load_state_dict(torch.load(out / "optimizer.pt", weights_only=True))
        state = json.loads((out / "state.json").read_text())
        sampler.rng.bit_generator.state = state.pop("sampler_rng")
        torch.set_rng_state(torch.load(out / "state.pt", weights_only=True)["torch_rng"])
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    pretrain_s = 0.0
    if cfg.pretrain_epochs and not resume:
        t0 = time.perf_counter()
        with open(out / "log.jsonl", "a") as log:
            for row in pretrain(model, train_x, cfg, sampler.rng, progress=progress):
                log.write(json.dumps({"pretrain": True, **row}) + "\n")
        pretrain_s = time.perf_counter() - t0

    start = time.perf_counter() - state["elapsed_s"]
    model.train()
    bar = tqdm(total=cfg.episodes, initial=state["episode"], desc="meta-training", unit="ep", disable=not progress)
    losses, accs = [], []
    with open(out / "log.jsonl", "a") as log:
        while state["episode"] < cfg.episodes:
            if cfg.time_budget_s and time.perf_counter() - start > cfg.time_budget_s:
                break
            for group in opt.param_groups:  # cosine decay over the planned episodes
                group["lr"] = cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (
                    1 + math.cos(math.pi * state["episode"] / cfg.episodes))
            episode = augment(sampler.sample(), cfg.shift, sampler.rng, rotate=cfg.rotate, scale=cfg.scale,
                              elastic=cfg.elastic, flip=cfg.flip, thickness=cfg.thickness)
            loss, acc = episode_loss(model, episode, cfg.topk, cfg.topk_tail)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            accs.append(acc)
            state["episode"] += 1
            bar.update(1)
            if state["episode"] % 10 == 0:  # running figures since the last validation
                bar.set_postfix(loss=f"{np.mean(losses):.3f}", acc=f"{np.mean(accs):.3f}",
                                **({"best_val": f"{state['best_val']:.3f}"} if state["best_val"] >= 0 else {}),
                                refresh=False)
            if state["episode"] % cfg.val_every == 0 or state["episode"] == cfg.episodes:
                bar.set_description("meta-training (validating)")
                bar.refresh()
                val = evaluate_episodes(model, val_x, val_groups, n_way=min(cfg.val_way, len(val_x)), k_shot=1,
                                        episodes=cfg.val_episodes, within_group=1.0 if val_groups else 0.0,
                                        seed=12345)
                model.train()
                bar.set_description("meta-training")
                row = {"episode": state["episode"], "train_loss": float(np.mean(losses)),
                       "train_acc": float(np.mean(accs)), "val_acc": val["accuracy"], "val_ci95": val["ci95"],
                       "temperature": model.temperature.item(), "elapsed_s": time.perf_counter() - start}
                log.write(json.dumps(row) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{row['train_acc']:.3f}",
                                val=f"{val['accuracy']:.3f}")
                losses, accs = [], []
                if val["accuracy"] > state["best_val"]:
                    state["best_val"] = val["accuracy"]
                    torch.save(model.state_dict(), out / "best.pt")
                state["elapsed_s"] = time.perf_counter() - start
                _save(out, model, opt, state, sampler)
    bar.close()
    state["elapsed_s"] = time.perf_counter() - start
    _save(out, model, opt, state, sampler)
    if not (out / "best.pt").exists():
        torch.save(model.state_dict(), out / "best.pt")
    return {"episodes": state["episode"], "best_val_acc": state["best_val"], "seconds": state["elapsed_s"],
            "pretrain_epochs": cfg.pretrain_epochs if not resume else 0, "pretrain_s": pretrain_s}


def _save(out: Path, model, opt, state: dict, sampler: EpisodeSampler) -> None:
    torch.save(model.state_dict(), out / "model.pt")
    torch.save(opt.state_dict(), out / "optimizer.pt")
    torch.save({"torch_rng": torch.get_rng_state()}, out / "state.pt")
    (out / "state.json").write_text(json.dumps({**state, "sampler_rng": sampler.rng.bit_generator.state}))


def load_checkpoint(path: str | Path, *, which: str = "best", views: int | None = None) -> MatchingNetwork:
    """Load a trained model from a checkpoint folder (``which``: "best" or "model", the last),
    with its test-time views (``views``: another count instead).

    Raises:
        FileNotFoundError: the folder lacks config.json or the weights.
        ValueError: views is not an integer >= 1.
    """
    path = Path(path)
    for name in ("config.json", f"{which}.pt"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a checkpoint: {name} is missing")
    cfg = json.loads((path / "config.json").read_text())
    model = MatchingNetwork.from_config(cfg["model"])
    if views is not None:
        model.views = views
    model.load_state_dict(torch.load(path / f"{which}.pt", weights_only=True))
    model.eval()
    return model


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
