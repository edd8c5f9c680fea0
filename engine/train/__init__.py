"""Episodic meta-training of a Matching Network (needs the ``nn`` extra: torch): the run's
config and recipes (:mod:`.config`), the loop (:mod:`.loop`), checkpoints
(:mod:`.checkpoint`) and evaluation (:mod:`.evaluate`)."""

from ..data.augment import jitter
from .checkpoint import CHECKPOINT_FILES, load_checkpoint, resume_config
from .config import OMNIGLOT_28, TrainConfig, load_sets, recipe
from .evaluate import episode_features, eval_oneshot, evaluate_episodes
from .loop import augment, episode_loss, pretrain, train

__all__ = ["CHECKPOINT_FILES", "OMNIGLOT_28", "TrainConfig", "augment", "episode_features", "episode_loss",
           "eval_oneshot", "evaluate_episodes", "jitter", "load_checkpoint", "load_sets", "pretrain", "recipe",
           "resume_config", "train"]
