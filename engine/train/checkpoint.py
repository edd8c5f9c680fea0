"""Checkpoints: plain state dicts (loadable with ``torch.load(..., weights_only=True)``)
plus the run's JSON config, written as training goes so that a run can resume."""

from __future__ import annotations

import json
import pickle
import types
import typing
from pathlib import Path

import torch

from ..data.episodes import EpisodeSampler
from ..errors import CorruptFileError, FormatVersionError, InvalidValueError, MissingFileError
from ..nn import MatchingNetwork
from .config import TrainConfig, check_stage

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


# what a run's config says for one invocation only: a resumed run is not held to its time budget,
# and its model section is written afresh from the config
NOT_RESUMED = ("time_budget_s", "model")


def _alternatives(hint) -> tuple:
    """The kinds a TrainConfig annotation allows: each of a union's, or the one (``list[str]``
    is one kind, a list)."""
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _of_kind(value, hint) -> bool:
    """Whether a JSON value fits a TrainConfig annotation (an int is a float; a bool is not an int;
    a list is a list[int] or list[str], its items checked with the rest of the config)."""
    kinds = [typing.get_origin(kind) or kind for kind in _alternatives(hint)]
    if isinstance(value, bool):
        return bool in kinds
    return any(isinstance(value, (int, float) if kind is float else kind) for kind in kinds)


def _kind(hint) -> str:
    return " or ".join("None" if kind is type(None) else getattr(typing.get_origin(kind), "__name__", None)
                       or kind.__name__ for kind in _alternatives(hint))


def resume_config(path: str | Path, **overrides) -> TrainConfig:
    """The config that continues the run in ``path``: its saved config.json, with
    ``overrides`` in place of what they name (more episodes, another data folder; None: not
    given).

    A key the run was saved without takes :class:`TrainConfig`'s default, the value it had
    before the option existed. The time budget is not carried over: ``time_budget_s``, if
    given, counts the run's seconds so far too. Overrides that would change what the run
    has become are refused later, by ``train(..., resume=True)``.

    Raises:
        MissingFileError: ``path`` holds no config.json.
        CorruptFileError: it is not a run's config, or a value is not one its option takes.
        FormatVersionError: it holds options this version does not know (another version saved it).
        InvalidValueError: an override names no option or is not of its option's kind.
    """
    saved = read_config(path)
    file = Path(path) / "config.json"
    hints = typing.get_type_hints(TrainConfig)
    unknown = sorted(set(saved) - set(hints))
    if unknown:
        raise FormatVersionError(f"{file}: options this version of engine does not know ({', '.join(unknown)}); "
                                 f"resume the run with the version that saved it")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if set(overrides) - set(hints):
        raise InvalidValueError(f"no such training option: {', '.join(sorted(set(overrides) - set(hints)))}")
    for name, value in overrides.items():
        if not _of_kind(value, hints[name]):
            raise InvalidValueError(f"{name} must be of the kind {_kind(hints[name])}, got {value!r}")
    kept = {}
    for name, value in saved.items():
        if name in NOT_RESUMED:
            continue
        if not _of_kind(value, hints[name]):
            raise CorruptFileError(f"{file}: {name} is {value!r}, not of the kind {_kind(hints[name])}")
        kept[name] = value
    try:
        check_stage(TrainConfig(**kept))  # what the file says, before the overrides
    except InvalidValueError as exc:
        raise CorruptFileError(f"{file}: {exc}") from None
    return TrainConfig(**{**kept, **overrides})


def load_checkpoint(path: str | Path, *, which: str = "best", views: int | None = None) -> MatchingNetwork:
    """Load a trained model from a checkpoint folder (``which``: "best" or "model", the last),
    with its test-time views (``views``: another count instead).

    Raises:
        MissingFileError: the folder lacks config.json or the weights (a FileNotFoundError).
        CorruptFileError: config.json is not a run's config, or does not make a model, or the
            weights are damaged or not that model's.
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
    try:
        model.load_state_dict(torch.load(path / f"{which}.pt", weights_only=True))
    except (RuntimeError, ValueError, TypeError, EOFError, OSError, pickle.UnpicklingError) as exc:
        why = (str(exc).splitlines() or [type(exc).__name__])[0]  # an empty file's EOFError says nothing
        raise CorruptFileError(f"{path / f'{which}.pt'}: not the weights of the model config.json describes "
                               f"({why})") from None
    model.eval()
    return model
