"""Images read at another size than 28x28: loaders, the model that keeps its size, and the CLI."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data import as_input, data_root
from engine.data.omniglot import load_background, load_oneshot_runs
from engine.errors import InvalidValueError
from engine.nn import MatchingNetwork, ensemble
from engine.train import TrainConfig, eval_oneshot, load_checkpoint, train
from engine.train.config import check_stage, recipe

RUN01 = data_root() / "omniglot" / "one-shot-sample" / "run01"


def test_loaders_read_any_side_from_8_to_the_pngs_own():
    runs = load_oneshot_runs(RUN01, size=40)[0]
    assert runs.train.shape == (20, 40, 40) and runs.test.shape == (20, 40, 40)
    # at the PNGs' own side nothing is resampled: the image is the file, inverted
    full = load_oneshot_runs(RUN01, size=105)[0]
    first = sorted((RUN01 / "training").glob("*.png"))[0]
    with Image.open(io.BytesIO(first.read_bytes())) as im:
        np.testing.assert_array_equal(full.train[0], 255 - np.asarray(im.convert("L"), dtype=np.uint8))
    # a box filter keeps the ink: each size's mean brightness is the original's
    for size in (28, 40):
        small = load_oneshot_runs(RUN01, size=size)[0]
        np.testing.assert_allclose(small.train.mean(axis=(1, 2)), full.train.mean(axis=(1, 2)), rtol=0.03, atol=1.0)
    chars = load_background("small2", alphabets=("Tagalog",), size=40)
    assert chars.images.shape[2:] == (40, 40)
    for bad in (15, 106, 40.0, True, "40"):
        with pytest.raises(InvalidValueError, match="image size"):
            load_oneshot_runs(RUN01, size=bad)
        with pytest.raises(InvalidValueError, match="image size"):
            load_background("small2", size=bad)


def test_a_model_keeps_its_image_size_and_refuses_other_sizes():
    model = MatchingNetwork(width=8, image_size=40, views=2).eval()
    assert model.embed_support(torch.zeros(3, 40, 40)).shape == (3, 8)
    with pytest.raises(InvalidValueError, match="40x40"):
        model.embed_support(torch.zeros(3, 28, 28))
    with pytest.raises(InvalidValueError, match="40x40"):
        model.backbone_features(torch.zeros(3, 1, 40, 28))
    assert MatchingNetwork.from_config(model.config()).image_size == 40
    old = {k: v for k, v in model.config().items() if k != "image_size"}  # a checkpoint from before the option
    assert MatchingNetwork.from_config(old).image_size is None
    assert MatchingNetwork(width=8).embed_support(torch.zeros(2, 33, 33)).shape == (2, 8)  # None: any size
    for bad in (0, 15, 2.5, True):
        with pytest.raises(InvalidValueError, match="image_size"):
            MatchingNetwork(image_size=bad)
    assert MatchingNetwork(width=8, image_size=16).eval().embed_support(torch.zeros(2, 16, 16)).shape == (2, 8)
    both = ensemble([MatchingNetwork(width=8, image_size=40), MatchingNetwork(width=8, image_size=40)])
    assert both.image_size == 40
    # a checkpoint that does not say (None) joins one that says 28
    assert ensemble([MatchingNetwork(width=8, image_size=28), MatchingNetwork(width=8)]).image_size == 28
    with pytest.raises(InvalidValueError, match="one image size"):
        ensemble([MatchingNetwork(width=8, image_size=40), MatchingNetwork(width=8, image_size=28)])


def test_a_run_trained_at_40_checkpoints_its_size_and_is_scored_at_it(tmp_path):
    cfg = TrainConfig(episodes=2, n_way=5, n_query=1, val_way=5, val_episodes=2, val_every=2, width=8, image_size=40)
    train(cfg, tmp_path / "ck", progress=False)
    saved = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert saved["image_size"] == 40 and saved["model"]["image_size"] == 40
    model = load_checkpoint(tmp_path / "ck")
    assert model.image_size == 40
    out = eval_oneshot(model, load_oneshot_runs(RUN01, size=40))
    assert out["runs"] == 1 and 0 <= out["error_rate"] <= 1
    with pytest.raises(InvalidValueError, match="40x40"):
        eval_oneshot(model, load_oneshot_runs(RUN01))
    # the scores are the model's on 40x40 images: dense cosine attention over its own embeddings
    run = load_oneshot_runs(RUN01, size=40)[0]
    with torch.no_grad():
        g = model.embed_support(as_input(run.train)).double()
        h = model.embed_queries(as_input(run.test)).double()
    cos = torch.nn.functional.normalize(h, dim=1) @ torch.nn.functional.normalize(g, dim=1).T
    assert out["error_rate"] == pytest.approx(float((cos.argmax(1).numpy() != run.answer).mean()))


def test_a_resumed_run_keeps_its_image_size_and_model(tmp_path):
    base = dict(episodes=2, n_way=5, n_query=1, val_way=5, val_episodes=2, val_every=2, width=8)
    train(TrainConfig(**base, image_size=40), tmp_path / "ck", progress=False)
    before = (tmp_path / "ck" / "config.json").read_text()
    for change in ({"image_size": 28}, {"width": 16}, {"background": "small2"}, {"views": 8},
                   {"weight_decay": 0.01}, {"pool": "flat"}):
        with pytest.raises(InvalidValueError, match=next(iter(change))):
            train(TrainConfig(**{**base, "image_size": 40, **change, "episodes": 4}), tmp_path / "ck", resume=True,
                  progress=False)
        assert (tmp_path / "ck" / "config.json").read_text() == before  # nothing rewritten
    # what does not change the model may (more episodes; FCE's read steps without FCE)
    assert train(TrainConfig(**{**base, "episodes": 4}, image_size=40, fce_steps=3), tmp_path / "ck", resume=True,
                 progress=False)["episodes"] == 4
    assert load_checkpoint(tmp_path / "ck").image_size == 40
    # at 28x28 the last map is one position: a run saved with the averaged map resumes with the flat one
    train(TrainConfig(**base, image_size=28), tmp_path / "at28", progress=False)
    assert train(TrainConfig(**{**base, "episodes": 4}, image_size=28, pool="flat"), tmp_path / "at28", resume=True,
                 progress=False)["episodes"] == 4



def test_a_resumed_run_keeps_its_weight_decay_and_old_runs_resume_as_adam(tmp_path):
    base = dict(episodes=2, n_way=5, n_query=1, val_way=5, val_episodes=2, val_every=2, width=8)
    train(TrainConfig(**base, weight_decay=0.05), tmp_path / "wd", progress=False)
    with pytest.raises(InvalidValueError, match="weight_decay"):  # back to plain Adam: another optimizer state
        train(TrainConfig(**{**base, "episodes": 4}), tmp_path / "wd", resume=True, progress=False)
    train(TrainConfig(**base), tmp_path / "old", progress=False)
    saved = json.loads((tmp_path / "old" / "config.json").read_text())
    del saved["weight_decay"]  # a run saved before the option existed: Adam, no decay
    (tmp_path / "old" / "config.json").write_text(json.dumps(saved))
    assert train(TrainConfig(**{**base, "episodes": 4}), tmp_path / "old", resume=True,
                 progress=False)["episodes"] == 4


def test_the_config_refuses_sizes_it_cannot_read():
    for bad in (15, 200, 28.5):
        with pytest.raises(InvalidValueError, match="image size"):
            check_stage(TrainConfig(image_size=bad))
    cfg = TrainConfig(image_size=np.int64(40))
    check_stage(cfg)
    assert type(cfg.image_size) is int  # written as JSON
    with pytest.raises(InvalidValueError, match="Fashion-MNIST images are 28x28"):
        check_stage(recipe("fashion-mnist", image_size=40))
    check_stage(recipe("omniglot", image_size=40))
