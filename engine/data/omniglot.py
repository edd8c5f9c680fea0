"""Omniglot: the official "minimal" background splits and the one-shot runs.

Lake, Salakhutdinov and Tenenbaum (2015), "Human-level concept learning through
probabilistic program induction", Science 350(6266). Images are read straight
from the official zips (``images_background_small1.zip``, ``..._small2.zip``)
and from the official one-shot layout (``runNN/class_labels.txt``,
``training/``, ``test/``, or ``all_runs.zip``). Every image is inverted (strokes
bright on black, as the networks expect) and resized to 28x28, as in Vinyals et
al. (2016), or to another square (``size``).
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InvalidValueError, MissingFileError
from .paths import data_root, require_files

SPLITS = {"small1": "images_background_small1.zip", "small2": "images_background_small2.zip"}
# The default validation alphabets: those of small2 that small1 does not have.
VALIDATION_ALPHABETS = ("Japanese_(katakana)", "Sanskrit", "Tagalog")
SIZE = 28
ORIGINAL_SIZE = 105  # the official PNGs' side
SMALLEST_SIZE = 16  # the backbone's four 2x2 poolings leave a 1x1 map


def check_size(size) -> int:
    """An image side the loaders resize to: an integer from 16 (the backbone's four 2x2
    poolings) to 105 (the PNGs' own side)."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not SMALLEST_SIZE <= size <= ORIGINAL_SIZE:
        raise InvalidValueError(f"image size must be an integer from {SMALLEST_SIZE} to {ORIGINAL_SIZE}, got {size!r}")
    return int(size)


def to_array(png: bytes | Path, size: int = SIZE) -> np.ndarray:
    """One Omniglot PNG as an inverted (strokes = 255) size x size uint8 array (box filter)."""
    with Image.open(io.BytesIO(png) if isinstance(png, bytes) else png) as im:
        gray = im.convert("L").resize((size, size), Image.Resampling.BOX)
    return 255 - np.asarray(gray, dtype=np.uint8)


@dataclass
class CharacterSet:
    """Characters with their drawings.

    Attributes:
        images: (n_chars, n_drawers, size, size) uint8, strokes bright.
        alphabets: alphabet of each character (rotated copies get "Alphabet@90" etc.).
        names: "Alphabet/characterNN" (with "@90" for rotations).
    """

    images: np.ndarray
    alphabets: list[str]
    names: list[str]

    def __len__(self) -> int:
        return len(self.names)

    def with_rotations(self) -> CharacterSet:
        """Add each character rotated by 90, 180 and 270 degrees as new classes (as in the paper)."""
        imgs, alph, names = [self.images], list(self.alphabets), list(self.names)
        for quarter in (1, 2, 3):
            imgs.append(np.rot90(self.images, quarter, axes=(2, 3)).copy())
            alph += [f"{a}@{90 * quarter}" for a in self.alphabets]
            names += [f"{n}@{90 * quarter}" for n in self.names]
        return CharacterSet(np.concatenate(imgs), alph, names)

    def subset(self, alphabets) -> CharacterSet:
        """Only the characters of the given alphabets."""
        keep = [i for i, a in enumerate(self.alphabets) if a in set(alphabets)]
        if not keep:
            held = sorted(set(self.alphabets))
            raise InvalidValueError(f"none of the alphabets {list(alphabets)} is in this set ({held})")
        return CharacterSet(self.images[keep], [self.alphabets[i] for i in keep], [self.names[i] for i in keep])


def omniglot_dir(root=None) -> Path:
    base = data_root(root)
    return base if (base / SPLITS["small1"]).exists() else base / "omniglot"


def load_background(split: str = "small1", root=None, *, alphabets=None, size: int = SIZE) -> CharacterSet:
    """Read a minimal background split from its official zip.

    Args:
        split: "small1" or "small2".
        root: the data directory (holding ``omniglot/``) or the omniglot folder.
        alphabets: keep only these alphabets.
        size: each image is resized to size x size (16 to 105).

    Raises:
        FileNotFoundError: the zip is missing (the message names it).
        ValueError: an unknown split, or a zip without the expected layout.
    """
    if split not in SPLITS:
        raise InvalidValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    size = check_size(size)
    folder = omniglot_dir(root)
    require_files(folder, [SPLITS[split]], f"Omniglot background split {split}")
    chars: dict[tuple[str, str], list[tuple[str, bytes]]] = {}
    with zipfile.ZipFile(folder / SPLITS[split]) as z:
        for name in z.namelist():
            parts = name.split("/")
            if len(parts) == 4 and parts[3].endswith(".png"):
                if alphabets is None or parts[1] in alphabets:
                    chars.setdefault((parts[1], parts[2]), []).append((parts[3], z.read(name)))
    if not chars:
        raise InvalidValueError(f"{folder / SPLITS[split]}: no <alphabet>/<character>/<drawing>.png entries")
    keys = sorted(chars)
    drawers = min(len(chars[k]) for k in keys)
    images = np.stack([np.stack([to_array(b, size) for _, b in sorted(chars[k])[:drawers]]) for k in keys])
    return CharacterSet(images, [a for a, _ in keys], [f"{a}/{c}" for a, c in keys])


def alphabets(split: str, root=None) -> tuple[str, ...]:
    """The alphabets of a minimal background split, sorted (read from its zip's names)."""
    if split not in SPLITS:
        raise InvalidValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    folder = omniglot_dir(root)
    require_files(folder, [SPLITS[split]], f"Omniglot background split {split}")
    with zipfile.ZipFile(folder / SPLITS[split]) as z:
        return tuple(sorted({n.split("/")[1] for n in z.namelist() if n.count("/") >= 2 and n.split("/")[1]}))


def validation_split(background: str, root=None) -> tuple[str, tuple[str, ...]]:
    """(the other minimal split, its alphabets that ``background`` lacks): where a model
    trained on ``background`` is validated, on alphabets it never saw."""
    if background not in SPLITS:
        raise InvalidValueError(f"background must be one of {sorted(SPLITS)}, got {background!r}")
    other = next(s for s in SPLITS if s != background)
    return other, tuple(a for a in alphabets(other, root) if a not in set(alphabets(background, root)))


@dataclass
class OneShotRun:
    """One run of the 20-way within-alphabet one-shot task.

    Attributes:
        name: "run01" ...
        train: (20, size, size) uint8, one drawing per class (the memory).
        test: (20, size, size) uint8, the items to classify.
        answer: (20,) index into ``train`` of each test item's class.
    """

    name: str
    train: np.ndarray
    test: np.ndarray
    answer: np.ndarray


def load_oneshot_runs(path: str | os.PathLike, *, size: int = SIZE) -> list[OneShotRun]:
    """Read the official one-shot runs.

    Args:
        path: a folder of ``runNN`` folders, a single ``runNN`` folder, or ``all_runs.zip``.
        size: each image is resized to size x size (16 to 105; a model's ``image_size``).

    Raises:
        FileNotFoundError: nothing in the official layout at ``path``.
    """
    path, size = Path(path), check_size(size)
    if path.is_file() and path.suffix == ".zip":
        with zipfile.ZipFile(path) as z:
            files = {n: z.read(n) for n in z.namelist() if not n.endswith("/")}
        return _runs_from_files(files, str(path), size)
    if (path / "class_labels.txt").is_file():
        run_dirs = [path]
    else:
        run_dirs = sorted(p for p in path.glob("run*") if (p / "class_labels.txt").is_file()) if path.is_dir() else []
    if not run_dirs:
        raise MissingFileError(f"no one-shot runs at {path}: expected runNN/class_labels.txt with training/ and "
                                f"test/ folders, or all_runs.zip")
    files = {}
    for d in run_dirs:
        for f in d.rglob("*"):
            if f.is_file():
                files[f"{d.name}/{f.relative_to(d).as_posix()}"] = f.read_bytes()
    return _runs_from_files(files, str(path), size)


def _runs_from_files(files: dict[str, bytes], where: str, size: int) -> list[OneShotRun]:
    # keys may carry a leading folder (zip layouts): index by the part from "runNN/" on
    by_tail = {}
    for name, data in files.items():
        m = re.search(r"(run\d+/.*)$", name)
        if m:
            by_tail[m.group(1)] = data
    runs = []
    for labels_name in sorted(n for n in by_tail if n.endswith("/class_labels.txt")):
        run = labels_name.split("/")[0]
        pairs = [line.split() for line in by_tail[labels_name].decode().splitlines() if line.strip()]
        train_names = sorted(n for n in by_tail if n.startswith(f"{run}/training/") and n.endswith(".png"))
        missing = [p for pair in pairs for p in pair if p not in by_tail]
        if missing or not train_names:
            raise MissingFileError(f"{where}: run {run} lacks files named by class_labels.txt: {missing[:5]}")
        test = np.stack([to_array(by_tail[t], size) for t, _ in pairs])
        train = np.stack([to_array(by_tail[n], size) for n in train_names])
        answer = np.array([train_names.index(c) for _, c in pairs])
        runs.append(OneShotRun(run, train, test, answer))
    if not runs:
        raise MissingFileError(f"no one-shot runs in {where}")
    return runs
