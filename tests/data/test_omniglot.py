"""Omniglot from the official zips and one-shot layout; episodes."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from engine.data import data_root
from engine.data.episodes import EpisodeSampler
from engine.data.omniglot import VALIDATION_ALPHABETS, load_background, load_oneshot_runs

RUN01 = data_root() / "omniglot" / "one-shot-sample" / "run01"


@pytest.fixture(scope="module")
def small2():
    return load_background("small2", alphabets=VALIDATION_ALPHABETS)


def test_background_split_shapes(small2):
    assert small2.images.shape == (106, 20, 28, 28) and small2.images.dtype == np.uint8
    assert sorted(set(small2.alphabets)) == sorted(VALIDATION_ALPHABETS)
    # inverted: strokes bright on a dark background
    assert np.median(small2.images) == 0 and small2.images.max() == 255


def test_rotations_are_new_classes(small2):
    rot = small2.with_rotations()
    assert len(rot) == 4 * len(small2)
    np.testing.assert_array_equal(rot.images[len(small2)], np.rot90(small2.images[0], 1, axes=(1, 2)))
    assert rot.alphabets[len(small2)] == small2.alphabets[0] + "@90"


def test_oneshot_run_layout_and_zip(tmp_path):
    runs = load_oneshot_runs(RUN01.parent)
    assert [r.name for r in runs] == ["run01"]
    run = runs[0]
    assert run.train.shape == (20, 28, 28) and run.test.shape == (20, 28, 28)
    assert sorted(run.answer.tolist()) == list(range(20))
    first = (RUN01 / "class_labels.txt").read_text().split()[1]  # class of test item01
    assert run.answer[0] == int(Path(first).stem.replace("class", "")) - 1
    with zipfile.ZipFile(tmp_path / "all_runs.zip", "w") as z:
        for f in RUN01.rglob("*"):
            z.write(f, f"run01/{f.relative_to(RUN01)}")
    zipped = load_oneshot_runs(tmp_path / "all_runs.zip")[0]
    np.testing.assert_array_equal(zipped.test, run.test)
    np.testing.assert_array_equal(zipped.answer, run.answer)
    assert load_oneshot_runs(RUN01)[0].name == "run01"


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="images_background_small1.zip"):
        load_background("small1", tmp_path)
    with pytest.raises(FileNotFoundError, match="class_labels.txt"):
        load_oneshot_runs(tmp_path)
    broken = tmp_path / "runs" / "run01"
    shutil.copytree(RUN01, broken)
    (broken / "test" / "item03.png").unlink()
    with pytest.raises(FileNotFoundError, match="item03"):
        load_oneshot_runs(broken)


def test_within_alphabet_episodes(small2):
    sampler = EpisodeSampler(small2.images, 20, 1, 5, groups=small2.alphabets, within_group=1.0, seed=3)
    for _ in range(5):
        ep = sampler.sample()
        assert ep.support_x.shape == (20, 28, 28) and ep.query_x.shape == (100, 28, 28)
        assert ep.support_x.max() <= 1.0 and ep.support_y.tolist() == list(range(20))
        # all 20 classes of an episode come from one alphabet
        originals = [int(np.flatnonzero((small2.images == (ep.support_x[i] * 255).round()).all(axis=(2, 3)).any(1))[0])
                     for i in range(20)]
        assert len({small2.alphabets[c] for c in originals}) == 1
    with pytest.raises(ValueError, match="at least 60"):
        EpisodeSampler(small2.images, 60, 1, 1, groups=small2.alphabets, within_group=1.0)
    with pytest.raises(ValueError, match="examples per class"):
        EpisodeSampler(small2.images, 5, 15, 6)
