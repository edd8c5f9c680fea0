"""What a training run depends on (:class:`TrainConfig`, saved as config.json), each
dataset's recipe (the one place it is written), and the image sets a run trains and
validates on.

Default Omniglot recipe: train on the minimal split ``small1`` (``background``; or
``small2``) with rotations by 90/180/270 degrees as extra classes, validate on the
alphabets of the other minimal split that it lacks (for ``small1``: Japanese
(katakana), Sanskrit, Tagalog) with within-alphabet 20-way 1-shot episodes.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

import numpy as np

from ..data.augment import check_views
from ..data.omniglot import check_size
from ..errors import InvalidValueError
from ..nn.backbone import check_pool, check_width

MOST_TEACHERS = 16  # the most models one run distils from
MOST = 10**9  # the largest count a config may give (episodes, ways, validation settings)
FASHION_HELD_OUT = 100  # training images a class kept out of Fashion-MNIST training, for its validation


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
    erase: float = 0.0  # augmentation: a square, this share of the larger side, blanked in each image (cutout)
    episodes: int = 6000
    pretrain_epochs: int = 0  # supervised stage first: every training class at once (see pretrain)
    pretrain_batch: int = 128
    mixup: float = 0.0  # supervised stage: images blended in pairs, shares from Beta(mixup, mixup); 0: off
    width: int | list[int] = 64  # filters per conv block, or a list of 4, one a block (the last: the embedding's)
    pool: str = "mean"  # the last block's map: averaged ("mean") or kept whole ("flat", width * side**2 numbers)
    image_size: int = 28  # images are resized to this square (the omniglot recipe: 40; Fashion-MNIST is 28x28)
    views: int = 1  # test-time views averaged per image (MatchingNetwork(views=)); training sees one
    time_budget_s: float | None = None
    lr: float = 1e-3
    lr_min: float = 1e-5  # cosine decay to this
    weight_decay: float = 0.0  # AdamW's decay of the weight matrices and filters (both stages); 0: Adam
    distill: float = 0.0  # share of the loss that is the KL to the teachers' answer (both stages); 0: off
    teachers: list[str] = field(default_factory=list)  # checkpoint folders of trained models, one ensemble
    teacher_digests: list[str] = field(default_factory=list)  # SHA-256 of each teacher's best.pt (the run fills it)
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


def check_stage(cfg: TrainConfig) -> None:
    """Refuse the options this module reads first whose error would otherwise surface deep in torch."""
    if cfg.background not in ("small1", "small2"):
        raise InvalidValueError(f"background must be small1 or small2, got {cfg.background!r}")
    # amounts: NaN or inf would train NaN weights
    for name in ("shift", "rotate", "scale", "elastic", "mixup", "weight_decay"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
            raise InvalidValueError(f"{name} must be a finite number >= 0 (0: off), got {value!r}")
        setattr(cfg, name, float(value))  # a plain float: the config is written as JSON
    # counts: 0, a negative, a fraction or a boolean would fail deep in the loop or train nothing
    # (pretrain_batch: batch norm needs 2 images; val_every matters only with episodes)
    for name, least in (("n_way", 2), ("k_shot", 1), ("n_query", 1), ("val_every", 1 if cfg.episodes else 0),
                        ("val_episodes", 1), ("val_way", 2), ("episodes", 0), ("pretrain_epochs", 0),
                        ("pretrain_batch", 2), ("fce_steps", 1)):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not least <= value <= MOST:
            raise InvalidValueError(f"{name} must be an integer from {least} to {MOST:,}, got {value!r}")
        setattr(cfg, name, int(value))  # a plain int (not numpy's): the config is written as JSON
    for name in ("topk", "threads"):  # None: all of them (topk: the dense softmax; threads: torch's)
        value = getattr(cfg, name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= MOST:
                raise InvalidValueError(f"{name} must be an integer from 1 to {MOST:,} or None, got {value!r}")
            setattr(cfg, name, int(value))
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, numbers.Integral) or not 0 <= cfg.seed < 2**32:
        raise InvalidValueError(f"seed must be an integer from 0 to 2**32 - 1, got {cfg.seed!r}")
    cfg.seed = int(cfg.seed)
    for name in ("lr", "lr_min", "temperature"):  # rates and the softmax's temperature: finite and > 0
        value = getattr(cfg, name)
        if isinstance(value, bool) or not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
            raise InvalidValueError(f"{name} must be a finite number > 0, got {value!r}")
        setattr(cfg, name, float(value))
    if cfg.lr_min > cfg.lr:
        raise InvalidValueError(f"lr_min ({cfg.lr_min}) is the end of the cosine decay from lr ({cfg.lr}): it "
                                f"must not be above it")
    value = cfg.within_alphabet
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) and 0 <= value <= 1):
        raise InvalidValueError(f"within_alphabet must be a share in [0, 1], got {value!r}")
    cfg.within_alphabet = float(value)
    if cfg.mixup > 0 and cfg.pretrain_epochs == 0:
        raise InvalidValueError("mixup blends the supervised stage's batches: it needs pretrain_epochs >= 1")
    for name in ("thickness", "erase"):  # shares of a pixel's dilation, of the image's side
        value = getattr(cfg, name)
        if isinstance(value, bool) or not (isinstance(value, numbers.Real) and 0 <= value <= 1):
            raise InvalidValueError(f"{name} must be a number in [0, 1] (0: off), got {value!r}")
        setattr(cfg, name, float(value))
    value = cfg.distill
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) and 0 <= value <= 1):
        raise InvalidValueError(f"distill must be a share in [0, 1] (0: off), got {value!r}")
    cfg.distill = float(value)
    teachers = cfg.teachers
    if isinstance(teachers, (str, bytes)) or not isinstance(teachers, (list, tuple)) \
            or not all(isinstance(t, (str, PathLike)) and str(t) for t in teachers) or len(teachers) > MOST_TEACHERS:
        raise InvalidValueError(f"teachers must be a list of at most {MOST_TEACHERS} checkpoint folders, got "
                                f"{teachers!r}")
    if bool(teachers) != (cfg.distill > 0):
        raise InvalidValueError(f"distill ({cfg.distill}) is the share of the loss the teachers give: give both "
                                f"teachers and distill > 0, or neither (got {len(teachers)} teachers)")
    # absolute (symlinks kept) plain strs: the config is written as JSON, and a resume from another
    # directory reads the same folders
    cfg.teachers = [str(Path(t).absolute()) for t in teachers]
    if len({Path(t).resolve() for t in cfg.teachers}) < len(cfg.teachers):
        raise InvalidValueError("a teacher is given twice: an ensemble takes each model once")
    digests = cfg.teacher_digests
    if not isinstance(digests, (list, tuple)) or (digests and len(digests) != len(cfg.teachers)) or not all(
            isinstance(d, str) and len(d) == 64 and set(d) <= set("0123456789abcdef") for d in digests):
        raise InvalidValueError(f"teacher_digests must be empty or one SHA-256 (hex) a teacher, got {digests!r}")
    cfg.teacher_digests = list(digests)
    if cfg.distill > 0 and cfg.topk is not None and not cfg.topk_tail:  # classes outside the top-k: -inf, so KL inf
        raise InvalidValueError("distill with topk needs topk_tail: without it a class no retrieved slot holds has "
                                "no probability, and the KL to the teachers' answer is infinite")
    check_views(cfg.views)
    cfg.width = check_width(cfg.width)  # plain ints (a list for one a block): the config is written as JSON
    cfg.pool = check_pool(cfg.pool)  # a plain str (not numpy's): the config is written as JSON
    if cfg.dataset == "fashion-mnist" and cfg.image_size != 28:
        raise InvalidValueError(f"Fashion-MNIST images are 28x28, got image_size={cfg.image_size!r}")
    cfg.image_size = check_size(cfg.image_size)  # a plain int: the config is written as JSON


# the Omniglot recipe at 28x28, as overrides of recipe("omniglot"): the jitter scaled with the image
# (the last map is 1x1 there, so the flat pool is the mean and the embedding is the last block's 256 filters)
OMNIGLOT_28 = {"image_size": 28, "shift": 2.0, "elastic": 1.5}


def recipe(dataset: str, **overrides) -> TrainConfig:
    """The training recipe of a dataset (the one place each is written), with ``overrides``.

    omniglot: images read at 40x40; the backbone's filters doubled in its last two blocks
    (``width=[64, 64, 128, 256]``) and its last 2x2 map kept whole (``pool="flat"``: 1,024
    numbers); 20 supervised epochs over the background classes, then 20-way 1-shot
    episodes (6,000, ``TrainConfig``'s default), half within one alphabet; strokes jittered
    (affine with shifts of up to 3 px, then elastic by up to 2 px); each image seen through
    8 test-time views.
    Each step was kept because it raised within-alphabet validation accuracy over both
    minimal sets and several seeds (docs/matching-networks.md). ``OMNIGLOT_28`` as
    overrides gives the recipe at 28x28 (shifts 2 px, elastic 1.5 px; the last map is one
    position, so the flat pool is the mean and a slot holds 256 numbers): about 2x faster
    to train, about 3 points lower; ``make demo`` trains it to hold its 15 minutes.
    fashion-mnist: 20 supervised epochs (shifts only: mirror images, with 6 epochs, scored
    0.915 against 0.918) and no episodes (300 lowered the memory from 0.918 to 0.912), 4
    test-time views; episodes, if asked for, are 10-way 5-shot with 10 queries a class,
    validated 10-way on training images held out of training.
    """
    base = {"omniglot": {"pretrain_epochs": 20, "image_size": 40, "width": [64, 64, 128, 256], "pool": "flat",
                         "shift": 3.0, "elastic": 2.0, "views": 8},
            "fashion-mnist": {"pretrain_epochs": 20, "episodes": 0, "rotate": 0.0, "scale": 0.0, "views": 4,
                              "n_way": 10, "k_shot": 5, "n_query": 10, "val_way": 10, "val_episodes": 50}}
    if dataset not in base:
        raise InvalidValueError(f"unknown dataset {dataset!r}: use 'omniglot' or 'fashion-mnist'")
    return TrainConfig(dataset=dataset, **{**base[dataset], **overrides})


def load_sets(cfg: TrainConfig):
    """(train images, train groups, validation images, validation groups) for the config's dataset."""
    return _load_sets(cfg.dataset, cfg.data, getattr(cfg, "background", "small1"), getattr(cfg, "image_size", 28))


@functools.lru_cache(maxsize=2)
def _load_sets(dataset: str, data: str | None, background: str = "small1", size: int = 28):
    if dataset == "omniglot":  # validated on the alphabets of the other minimal split that this one lacks
        from ..data.omniglot import load_background, validation_split

        other, unseen = validation_split(background, data)
        train = load_background(background, data, size=size).with_rotations()
        val = load_background(other, data, alphabets=unseen, size=size)
        return train.images, train.alphabets, val.images, val.alphabets
    if dataset == "fashion-mnist":  # validated on training images held out of training, never on the test set
        from ..data.fashion_mnist import load_fashion_mnist

        x, y = load_fashion_mnist(data, "train")
        n = np.bincount(y).min()
        by_class = np.stack([x[y == c][:n] for c in range(10)])
        return by_class[:, :-FASHION_HELD_OUT], None, by_class[:, -FASHION_HELD_OUT:], None
    raise InvalidValueError(f"unknown dataset {dataset!r}: use 'omniglot' or 'fashion-mnist'")
