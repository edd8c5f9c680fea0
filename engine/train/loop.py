"""Episodic meta-training of Matching Networks (Vinyals et al., 2016): each step samples an
N-way K-shot episode, the support set goes through ``process_support_set``, and the loss is
the NLL of the queries' log-probabilities; an optional supervised stage comes first."""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..data.augment import jitter
from ..data.episodes import Episode, EpisodeSampler
from ..data.images import as_input, pixels
from ..errors import InvalidValueError, MissingFileError
from ..nn import MatchingNetwork
from ..nn.backbone import last_map_side
from ..nn.matching import INFERENCE_BATCH
from .checkpoint import CHECKPOINT_FILES, load_checkpoint, read_config, save
from .config import TrainConfig, check_stage, load_sets
from .evaluate import evaluate_episodes


def episode_loss(model: MatchingNetwork, ep: Episode, topk: int | None = None,
                 topk_tail: bool = False, *, teacher: MatchingNetwork | None = None,
                 distill: float = 0.0) -> tuple[torch.Tensor, float]:
    """NLL on log-probabilities of one episode's queries, and their accuracy. With a
    ``teacher``, ``distill`` of the loss is the KL from the teacher's answer on the same
    episode to the model's (:func:`distillation`)."""
    support, y = as_input(ep.support_x), torch.from_numpy(ep.support_y)
    model.process_support_set(support, y)
    q = as_input(ep.query_x)
    logp = model.forward_topk(q, topk, estimate_tail=topk_tail) if topk else model(q)
    target = torch.as_tensor(np.searchsorted(model.classes.numpy(), ep.query_y))
    loss = torch.nn.functional.nll_loss(logp, target)
    if teacher is not None and distill > 0:
        with torch.no_grad():
            teacher.process_support_set(support, y)  # the same sorted classes: the same columns
            answer = teacher(q)
        loss = (1.0 - distill) * loss + distill * distillation(logp, answer)
    return loss, float((logp.argmax(1) == target).float().mean())


def distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student), the mean over rows, of two (n, C) sets of logits or
    log-probabilities over the same classes (knowledge distillation, Hinton et al., 2015,
    at the models' own temperatures)."""
    return torch.nn.functional.kl_div(torch.log_softmax(student, dim=1), torch.log_softmax(teacher, dim=1),
                                      reduction="batchmean", log_target=True)


def check_teachers(cfg: TrainConfig, out: Path | None = None) -> None:
    """Refuse teachers a run cannot distil from, reading their configs only (before a run, or
    ``engine train --force``, removes anything). A teacher must have trained on the run's
    images: the same dataset, background set and image size (one trained on the other
    minimal set has seen this run's validation alphabets); it must be a model the ensemble
    takes (one shared backbone, no FCE), and lie neither in the run's folder ``out`` nor be it.

    Raises:
        MissingFileError, CorruptFileError: a teacher's config.json is missing or damaged.
        InvalidValueError: a teacher that trained otherwise, another kind of model, or ``out``.
    """
    if cfg.distill <= 0:
        return
    default = TrainConfig()
    for path in cfg.teachers:
        where = Path(path).resolve()
        if out is not None and (where == out.resolve() or out.resolve() in where.parents):
            raise InvalidValueError(f"teacher {path} is this run's folder {out} or lies in it: a run cannot distil "
                                    f"from itself, and starting it afresh would remove its teacher")
        saved = read_config(path)
        keys = ("dataset", "image_size") + (("background",) if cfg.dataset == "omniglot" else ())
        for key in keys:
            theirs = saved.get(key, getattr(default, key))
            if theirs != getattr(cfg, key):
                raise InvalidValueError(f"teacher {path} trained with {key}={theirs!r}, this run has "
                                        f"{getattr(cfg, key)!r}: a teacher must have trained on the run's images")
        if saved["model"].get("fce") or saved["model"].get("shared") is False:
            raise InvalidValueError(f"teacher {path} has Full Context Embeddings or separate g and h backbones: "
                                    f"teachers are one ensemble, which takes neither")


def load_teachers(cfg: TrainConfig, out: Path | None = None, *, digests: list[str] | None = None
                  ) -> MatchingNetwork | None:
    """The models ``cfg.teachers`` names as one frozen ensemble (:func:`engine.nn.ensemble`),
    each through one view; None without distillation. Checked first by :func:`check_teachers`.

    Each teacher's ``best.pt`` is identified by its SHA-256: with ``digests`` (a resumed run's
    saved ones; else ``cfg.teacher_digests`` where given) a teacher whose weights changed is
    refused, and ``cfg.teacher_digests`` is set to what was read, to be saved with the run.

    Raises:
        MissingFileError, CorruptFileError: a teacher's checkpoint is missing or damaged.
        InvalidValueError: see :func:`check_teachers`; or a teacher's weights are not the ones
            the run began with.
    """
    check_teachers(cfg, out)
    if cfg.distill <= 0:
        return None
    from ..nn import ensemble

    members, got = [], []
    for path in cfg.teachers:
        members.append(load_checkpoint(path, views=1))
        got.append(hashlib.sha256((Path(path) / "best.pt").read_bytes()).hexdigest())
    want = digests or cfg.teacher_digests
    for path, theirs, ours in zip(cfg.teachers, want, got):
        if theirs != ours:
            raise InvalidValueError(f"teacher {path}: its best.pt is not the one this run distilled from (SHA-256 "
                                    f"{ours[:12]}..., the run's {theirs[:12]}...); resume with that model, or start "
                                    f"afresh")
    cfg.teacher_digests = got
    return ensemble(members)


def class_directions(teacher: MatchingNetwork, images: np.ndarray) -> torch.Tensor:
    """(classes, d): the unit mean of the teacher's unit embeddings of each class's images
    (``images``: (classes, per class, H, W)), the teacher's classifier in the supervised stage."""
    n_classes, per = images.shape[:2]
    flat = images.reshape(n_classes * per, *images.shape[2:])
    with torch.no_grad():
        z = torch.nn.functional.normalize(teacher.embed_support(as_input(pixels(flat)), batch_size=INFERENCE_BATCH),
                                          dim=1)
    return torch.nn.functional.normalize(z.reshape(n_classes, per, -1).mean(1), dim=1)


def augment(ep: Episode, shift: float, rng: np.random.Generator, *, rotate: float = 0.0,
            scale: float = 0.0, elastic: float = 0.0, flip: bool = False, thickness: float = 0.0,
            erase: float = 0.0) -> Episode:
    """Random jitter of every image of an episode (labels unchanged; see :func:`jitter`)."""
    if shift <= 0 and rotate <= 0 and scale <= 0 and elastic <= 0 and not flip and thickness <= 0 and erase <= 0:
        return ep
    how = {"rotate": rotate, "scale": scale, "elastic": elastic, "flip": flip, "thickness": thickness,
           "erase": erase}
    return Episode(jitter(ep.support_x, shift, rng, **how), ep.support_y, jitter(ep.query_x, shift, rng, **how),
                   ep.query_y)


def optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam at ``cfg.lr``; with ``cfg.weight_decay``, AdamW (decay apart from the gradient's
    moments, Loshchilov and Hutter, 2019) on the weight matrices and filters only: biases,
    batch norm's scales and the temperature are not pulled to 0. ``cfg`` is checked
    (:func:`check_stage`) by the stages that call it."""
    if cfg.weight_decay == 0:
        return torch.optim.Adam(params, lr=cfg.lr)
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def pretrain(model: MatchingNetwork, images: np.ndarray, cfg: TrainConfig, rng: np.random.Generator, *,
             progress: bool = True, teacher: MatchingNetwork | None = None) -> list[dict]:
    """The supervised stage before episodes: g learns to tell every training class from
    every other at once, through a cosine classifier (a learned unit direction per class,
    logits = cos / T at the model's temperature), the loss the episodes later refine.

    The head is dropped afterwards; only g (and h, when shared) keep what it learned.
    Augmented as the episodes are; Adam (AdamW with ``cfg.weight_decay``, see
    :func:`optimizer`) with a cosine decay over the stage. With
    ``cfg.mixup`` (mixup, Zhang et al., 2018) each batch is blended with itself in another
    order, ``lam * x + (1 - lam) * x[perm]`` with ``lam ~ Beta(mixup, mixup)``, and the loss is
    the same blend of the two labels' cross-entropies; accuracy counts the first label.
    With a ``teacher`` (``cfg.distill`` > 0), ``cfg.distill`` of the loss is the KL from
    the teacher's answer on the same batch, its cosine to each class's mean direction
    (:func:`class_directions`) at its temperature, to the model's.

    Args:
        images: (classes, per class, H, W) training images.

    Returns:
        One row per epoch: loss and training accuracy.
    """
    check_stage(cfg)
    n_classes, per = images.shape[:2]
    x = images.reshape(n_classes * per, *images.shape[2:])
    y = torch.as_tensor(np.repeat(np.arange(n_classes), per))
    head = torch.nn.Parameter(torch.randn(n_classes, model.dim) * 0.01)
    params = list(model.g_backbone.parameters()) + [head, model.log_temperature]
    opt = optimizer(params, cfg)
    per_epoch = max(len(x) // cfg.pretrain_batch, 1)  # whole batches (batch norm needs more than one image)
    steps = cfg.pretrain_epochs * per_epoch
    directions = class_directions(teacher, images) if teacher is not None and cfg.distill > 0 else None
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
                            flip=cfg.flip, thickness=cfg.thickness, erase=cfg.erase)
                lam, other = 1.0, None
                if cfg.mixup > 0:  # drawn only when on: the recipe's random stream is unchanged
                    lam, other = float(rng.beta(cfg.mixup, cfg.mixup)), rng.permutation(len(pick))
                    xb = lam * xb + (1.0 - lam) * xb[other]
                inputs = as_input(xb)
                z = torch.nn.functional.normalize(model.g_backbone(inputs), dim=1)
                logits = z @ torch.nn.functional.normalize(head, dim=1).T / model.temperature
                loss = torch.nn.functional.cross_entropy(logits, y[pick])
                if other is not None:
                    loss = lam * loss + (1.0 - lam) * torch.nn.functional.cross_entropy(logits, y[pick][other])
                if directions is not None:
                    with torch.no_grad():
                        answer = (torch.nn.functional.normalize(teacher.embed_support(inputs), dim=1)
                                  @ directions.T / teacher.temperature)
                    loss = (1.0 - cfg.distill) * loss + cfg.distill * distillation(logits, answer)
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


# what the saved model is, reads and is validated through (its best state was chosen by that
# measure), how its supervised stage trained it (a resumed run does not redo it), the weight
# decay its saved optimizer state holds and what it distils from: a resumed run must keep them (the
# episodes, the schedule and how often it validates may change); fce_steps matters only with fce,
# background only on omniglot
RESUME_KEEPS = ("dataset", "background", "image_size", "width", "pool", "fce", "fce_steps", "views", "val_way",
                "val_episodes", "pretrain_epochs", "pretrain_batch", "mixup", "weight_decay", "distill",
                "teachers")


def check_resumable(cfg: TrainConfig, out: Path) -> None:
    """Refuse to resume the run in ``out`` with a config that would make another model of
    it, feed it other images, validate it otherwise (its best state was chosen by the
    saved config's validation), claim another supervised stage than the one it had or step
    it with another optimizer. The saved ``config.json`` is the reference; a run saved
    before an option existed had its default."""
    saved = read_config(out)
    missing = [name for name in CHECKPOINT_FILES if not (out / name).is_file()]
    if missing:  # config.json is written first: a run can stop (in its supervised stage) before any checkpoint
        raise MissingFileError(f"{out} holds no checkpoint to resume ({', '.join(missing)} missing): the run stopped "
                               f"before its first one; start it afresh (--force)")
    default = TrainConfig()

    def was(key):
        return saved.get(key, getattr(default, key))

    # (the pool matters only where the backbone's last map is more than one position: not at 28x28)
    keys = [k for k in RESUME_KEEPS if not (k == "fce_steps" and not cfg.fce and not was("fce"))
            and not (k == "background" and cfg.dataset != "omniglot")
            and not (k == "pool" and last_map_side(cfg.image_size) <= 1)]
    changed = [f"{key}: {was(key)!r} -> {getattr(cfg, key)!r}" for key in keys if was(key) != getattr(cfg, key)]
    if changed:
        raise InvalidValueError(f"{out} holds a run trained otherwise; resume it with the options "
                                f"it was trained with ({'; '.join(changed)})")


def _train(cfg: TrainConfig, out: str | Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Meta-train a Matching Network episodically.

    Args:
        cfg: the recipe.
        out: checkpoint folder (config.json, model.pt, best.pt, optimizer.pt, state.pt, state.json,
            log.jsonl).
            Afresh (not ``resume``), those files of an earlier run in it are removed first,
            once the config and the data have loaded.
        resume: continue from the checkpoint in ``out``.
        progress: show a progress bar.

    Returns:
        A summary: episodes run, final and best validation accuracy, seconds.
    """
    check_stage(cfg)  # before anything is written
    out = Path(out)
    if resume:
        check_resumable(cfg, out)
    # before anything is written: a bad teacher changes nothing; a resumed run's teachers are the ones it began with
    teacher = load_teachers(cfg, out, digests=read_config(out).get("teacher_digests") if resume else None)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    train_x, train_groups, val_x, val_groups = load_sets(cfg)
    within = cfg.within_alphabet if train_groups is not None else 0.0
    sampler = EpisodeSampler(train_x, cfg.n_way, cfg.k_shot, cfg.n_query, groups=train_groups,
                             within_group=within, seed=cfg.seed)
    model = MatchingNetwork(fce=cfg.fce, fce_steps=cfg.fce_steps, temperature=cfg.temperature, width=cfg.width,
                             views=cfg.views, image_size=cfg.image_size, pool=cfg.pool)
    cfg.model = model.config()
    opt = optimizer(list(model.parameters()), cfg)
    state = {"episode": 0, "best_val": -1.0, "elapsed_s": 0.0}
    if resume:
        model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
        opt.load_state_dict(torch.load(out / "optimizer.pt", weights_only=True))
        state = json.loads((out / "state.json").read_text())
        sampler.rng.bit_generator.state = state.pop("sampler_rng")
        torch.set_rng_state(torch.load(out / "state.pt", weights_only=True)["torch_rng"])
    else:  # afresh: no checkpoint, best state or log of an earlier run in out is left to pass for this one's
        for name in (*CHECKPOINT_FILES, "log.jsonl"):
            (out / name).unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    pretrain_s = 0.0
    if cfg.pretrain_epochs and not resume:
        t0 = time.perf_counter()
        with open(out / "log.jsonl", "a") as log:
            for row in pretrain(model, train_x, cfg, sampler.rng, progress=progress, teacher=teacher):
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
                              elastic=cfg.elastic, flip=cfg.flip, thickness=cfg.thickness, erase=cfg.erase)
            loss, acc = episode_loss(model, episode, cfg.topk, cfg.topk_tail, teacher=teacher, distill=cfg.distill)
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
                save(out, model, opt, state, sampler)
    bar.close()
    state["elapsed_s"] = time.perf_counter() - start
    save(out, model, opt, state, sampler)
    if not (out / "best.pt").exists():
        torch.save(model.state_dict(), out / "best.pt")
    return {"episodes": state["episode"], "best_val_acc": state["best_val"], "seconds": state["elapsed_s"],
            "pretrain_epochs": cfg.pretrain_epochs if not resume else 0, "pretrain_s": pretrain_s}


