"""Checkpoints: plain state dicts (loadable with ``torch.load(..., weights_only=True)``)
plus the run's JSON config, written as training goes so that a run can resume."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data.episodes import EpisodeSampler
from ..errors import CorruptFileError, MissingFileError
from ..nn import MatchingNetwork

CHECKPOINT_FILES = ("config.json", "model.pt", "best.pt", "optimizer.pt", "state.pt", "state.json")


def save(out: Path, model, opt, state: dict, sampler: EpisodeSampler) -> None:
    torch.save(model.state_dict(), out / "model.pt")
    torch.save(opt.state_dict(), out / "optimizer.pt")
    torch.save({"torch_rng": torch.get_rng_state()}, out / "state.pt")
    (out / "state.json").write_text(json.dumps({**state, "sampler_rng": sampler.rng.bit_generator.state}))


def read_config(path: str | Path) -> dict:
    """A checkpoint's config.json.

    Raises:
        MissingFileError: there is none. CorruptFileError: it is not a run's JSON config.
    """
    file = Path(path) / "config.json"
    if not file.is_file():
        raise MissingFileError(f"{path} is not a checkpoint: config.json is missing")
    try:
        cfg = json.loads(file.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptFileError(f"{file}: not a JSON config ({exc})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise CorruptFileError(f"{file}: not a training run's config (no model)")
    return cfg


def load_checkpoint(path: str | Path, *, which: str = "best", views: int | None = None) -> MatchingNetwork:
    """Load a trained model from a checkpoint folder (``which``: "best" or "model", the last),
    with its test-time views (``views``: another count instead).

    Raises:
        MissingFileError: the folder lacks config.json or the weights (a FileNotFoundError).
        CorruptFileError: config.json is not a run's config, or does not make a model.
        InvalidValueError: views is not an integer >= 1.
    """
    path = Path(path)
    for name in ("config.json", f"{which}.pt"):
        if not (path / name).is_file():
            raise MissingFileError(f"{path} is not a checkpoint: {name} is missing")
    cfg = read_config(path)
    try:
        model = MatchingNetwork.from_config(cfg["model"])
    except (TypeError, ValueError) as exc:
        raise CorruptFileError(f"{path / 'config.json'}: its model section does not make a model ({exc})") from None
    if views is not None:
        model.views = views
    model.load_state_dict(torch.load(path / f"{which}.pt", weights_only=True))
    model.eval()
    return model
