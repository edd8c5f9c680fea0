"""Episodic training, checkpoints and resume, and the evaluations."""

from __future__ import annotations

import json

import numpy as np
import torch

from engine.data import data_root
from engine.data.episodes import EpisodeSampler
from engine.data.omniglot import load_oneshot_runs
from engine.nn import MatchingNetwork
from engine.train import TrainConfig, episode_loss, eval_oneshot, evaluate_episodes, load_checkpoint, train

RUNS = data_root() / "omniglot" / "one-shot-sample"


def test_a_few_episodes_lower_the_loss():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = (rng.random((12, 6, 28, 28)) < 0.2).astype(np.uint8) * 255  # 12 random "characters"
    fixed = [EpisodeSampler(images, 5, 1, 3, seed=s).sample() for s in range(4)]
    model = MatchingNetwork()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.eval()
    with torch.no_grad():
        before = np.mean([episode_loss(model, ep)[0].item() for ep in fixed])
    sampler = EpisodeSampler(images, 5, 1, 3, seed=99)
    model.train()
    for _ in range(25):
        loss, _ = episode_loss(model, sampler.sample())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = np.mean([episode_loss(model, ep)[0].item() for ep in fixed])
    assert after < 0.8 * before, (before, after)


def test_train_checkpoint_resume_and_evaluate(tmp_path):
    cfg = TrainConfig(n_way=5, n_query=2, episodes=6, val_every=3, val_episodes=4, val_way=5, seed=1)
    summary = train(cfg, tmp_path, progress=False)
    assert summary["episodes"] == 6
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [row["episode"] for row in log] == [3, 6] and 0 <= log[-1]["val_acc"] <= 1
    model = load_checkpoint(tmp_path, which="model")
    assert isinstance(model, MatchingNetwork)
    for name in ("model.pt", "best.pt", "optimizer.pt", "state.pt"):
        torch.load(tmp_path / name, weights_only=True)  # plain tensors and numbers, no pickled objects
    cfg.episodes = 9
    assert train(cfg, tmp_path, resume=True, progress=False)["episodes"] == 9
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [row["episode"] for row in log] == [3, 6, 9]


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    base = dict(n_way=5, n_query=2, val_every=2, val_episodes=2, val_way=5, seed=2, lr_min=1e-3)  # constant lr
    train(TrainConfig(episodes=4, **base), tmp_path / "straight", progress=False)
    train(TrainConfig(episodes=2, **base), tmp_path / "split", progress=False)
    train(TrainConfig(episodes=4, **base), tmp_path / "split", resume=True, progress=False)
    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "model.pt", weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_eval_oneshot_through_memory():
    torch.manual_seed(0)
    runs = load_oneshot_runs(RUNS)
    out = eval_oneshot(MatchingNetwork(), runs)
    assert out["runs"] == 1 and set(out["per_run"]) == {"run01"}
    assert 0.0 <= out["error_rate"] <= 1.0


def test_evaluate_episodes_reports_a_confidence_interval():
    rng = np.random.default_rng(0)
    images = (rng.random((10, 4, 28, 28)) < 0.2).astype(np.uint8) * 255
    out = evaluate_episodes(MatchingNetwork(), images, n_way=5, k_shot=1, n_query=2, episodes=6)
    assert 0 <= out["accuracy"] <= 1 and out["ci95"] >= 0 and out["episodes"] == 6


def test_augmentation_moves_strokes_and_keeps_labels():
    from engine.data.episodes import Episode
    from engine.train import augment

    x = np.zeros((50, 28, 28), np.float32)
    x[:, 12:16, 12:16] = 1.0
    y = np.arange(50)
    ep = augment(Episode(x, y, x, y), 2, np.random.default_rng(0))
    assert (ep.support_y == y).all() and (ep.query_y == y).all()
    np.testing.assert_allclose(ep.support_x.sum(axis=(1, 2)), 16.0, rtol=1e-4)  # shifted, nothing lost
    centres = [np.argwhere(img > 0.5).mean(0) - 13.5 for img in ep.support_x]
    assert all(np.abs(c).max() <= 2.01 for c in centres) and np.std(centres) > 0.5
    turned = augment(Episode(x, y, x, y), 0, np.random.default_rng(1), rotate=30, scale=0.1)
    assert not np.allclose(turned.support_x, x) and np.isclose(turned.support_x.sum() / x.sum(), 1.0, rtol=0.15)
    same = Episode(x, y, x, y)
    assert augment(same, 0, np.random.default_rng(0)) is same
