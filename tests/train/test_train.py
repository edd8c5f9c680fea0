"""Episodic training, checkpoints and resume, and the evaluations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.data import as_input, data_root
from engine.data.episodes import EpisodeSampler
from engine.data.omniglot import load_oneshot_runs
from engine.errors import InvalidValueError, MissingFileError
from engine.nn import MatchingNetwork
from engine.train import (
    TrainConfig,
    episode_loss,
    eval_oneshot,
    evaluate_episodes,
    load_checkpoint,
    pretrain,
    train,
)

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


@pytest.mark.parametrize("decay", [0.0, 0.05])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, decay):
    base = dict(n_way=5, n_query=2, val_every=2, val_episodes=2, val_way=5, seed=2, lr_min=1e-3,  # constant lr
                weight_decay=decay)
    train(TrainConfig(episodes=4, **base), tmp_path / "straight", progress=False)
    train(TrainConfig(episodes=2, **base), tmp_path / "split", progress=False)
    train(TrainConfig(episodes=4, **base), tmp_path / "split", resume=True, progress=False)
    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "model.pt", weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_weight_decay_shrinks_weight_matrices_and_filters_only():
    from engine.train.loop import optimizer

    conv = torch.nn.Conv2d(1, 4, 3)
    norm = torch.nn.BatchNorm2d(4)
    params = list(conv.parameters()) + list(norm.parameters())
    before = [p.detach().clone() for p in params]
    opt = optimizer(params, TrainConfig(lr=0.1, weight_decay=0.5))
    for p in params:
        p.grad = torch.zeros_like(p)  # no gradient: only the decay moves anything
    opt.step()
    torch.testing.assert_close(conv.weight.detach(), before[0] * (1 - 0.1 * 0.5))  # decoupled: w -= lr * wd * w
    for p, was in zip(params[1:], before[1:]):  # the bias, batch norm's scale and shift
        torch.testing.assert_close(p.detach(), was)
    assert type(optimizer(params, TrainConfig())) is torch.optim.Adam  # off: plain Adam, as before


def test_eval_oneshot_through_memory():
    from dataclasses import replace

    torch.manual_seed(0)
    runs = load_oneshot_runs(RUNS)
    model = MatchingNetwork()
    out = eval_oneshot(model, runs)
    assert out["runs"] == 1 and set(out["per_run"]) == {"run01"}
    # scored against the run's answer key, independently: the memory's answer for each test item
    run = runs[0]
    res = model.query_memory(model.to_memory(as_input(run.train), list(range(20))), as_input(run.test), k=20)
    assert out["error_rate"] == pytest.approx(float((np.asarray(res.labels) != run.answer).mean()))
    # a run whose test items are its own training drawings: without FCE, g = h = f, so every
    # item finds itself (cosine 1) and the error is exactly 0; a shuffled answer key scores ~19/20 wrong
    same = replace(run, name="self", test=run.train, answer=np.arange(20))
    assert eval_oneshot(model, [same])["error_rate"] == 0.0
    wrong = replace(same, name="shifted", answer=(np.arange(20) + 1) % 20)
    assert eval_oneshot(model, [wrong])["error_rate"] == 1.0


def test_evaluate_episodes_reports_a_confidence_interval():
    rng = np.random.default_rng(0)
    images = (rng.random((10, 4, 28, 28)) < 0.2).astype(np.uint8) * 255
    out = evaluate_episodes(MatchingNetwork(), images, n_way=5, k_shot=1, n_query=2, episodes=6)
    assert 0 <= out["accuracy"] <= 1 and out["ci95"] >= 0 and out["episodes"] == 6
    # every class a single repeated image: the query is its support image, so accuracy is exactly 1
    one = np.repeat(images[:, :1], 4, axis=1)
    exact = evaluate_episodes(MatchingNetwork(), one, n_way=5, k_shot=1, n_query=2, episodes=6)
    assert exact["accuracy"] == 1.0 and exact["ci95"] == 0.0


@pytest.mark.parametrize("fce", [False, True])
def test_evaluating_from_cached_features_scores_the_episodes_the_images_would(fce):
    """evaluate_episodes embeds each image once; the reference runs every episode from its images."""
    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    protos = rng.random((12, 1, 28, 28)) < 0.15
    images = ((protos ^ (rng.random((12, 6, 28, 28)) < 0.12)) * 255).astype(np.uint8)
    groups = ["a"] * 6 + ["b"] * 6
    model = MatchingNetwork(fce=fce, views=2)
    model.eval()
    sampler = EpisodeSampler(images, 5, 1, 3, groups=groups, within_group=0.5, seed=3)
    with torch.no_grad():
        reference = [episode_loss(model, sampler.sample())[1] for _ in range(25)]
    out = evaluate_episodes(model, images, groups, n_way=5, k_shot=1, n_query=3, episodes=25, within_group=0.5, seed=3)
    assert out["accuracy"] == pytest.approx(np.mean(reference), abs=1e-9)
    assert 0.2 < out["accuracy"] < 1.0  # neither chance nor trivially perfect, so the comparison means something


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


def test_flip_mirrors_about_half_the_images_and_nothing_else():
    from engine.train import jitter

    x = np.zeros((200, 28, 28), np.float32)
    x[:, 5:20, 3:7] = 1.0  # a bar on the left
    out = jitter(x, 0, np.random.default_rng(0), flip=True)
    mirrored = np.array([np.allclose(o, img[:, ::-1], atol=1e-5) for o, img in zip(out, x)])
    kept = np.array([np.allclose(o, img, atol=1e-5) for o, img in zip(out, x)])
    assert (mirrored ^ kept).all() and 70 < mirrored.sum() < 130


def test_elastic_jitter_bends_a_stroke_by_at_most_its_reach():
    from engine.train import jitter

    x = np.zeros((40, 28, 28), np.float32)
    x[:, 2:26, 13:15] = 1.0  # a vertical stroke two pixels wide
    out = jitter(x, 0, np.random.default_rng(0), elastic=2.0)
    rows = np.arange(6, 22)  # away from the ends
    centre = np.array([[(img[r] * np.arange(28)).sum() / max(img[r].sum(), 1e-9) for r in rows] for img in out])
    assert np.abs(centre - 13.5).max() <= 2.05  # no point moved further than 2 px
    bent = centre.max(axis=1) - centre.min(axis=1)
    assert np.median(bent) > 0.3  # not a rigid shift: the stroke curves
    ink = out.sum(axis=(1, 2)) / x[0].sum()  # a field stretches or squeezes a stroke here and there
    assert abs(np.median(ink) - 1) < 0.05 and ((ink > 0.7) & (ink < 1.3)).all(), ink


def test_thickness_makes_strokes_thicker_or_thinner_in_place():
    from engine.train import jitter

    x = np.zeros((200, 28, 28), np.float32)
    x[:, 4:24, 12:15] = 1.0  # a vertical stroke three pixels wide
    out = jitter(x, 0, np.random.default_rng(0), thickness=1.0)
    ink = out.sum(axis=(1, 2)) / x[0].sum()
    # a full dilation adds a pixel each side (22 x 5 = 110 of 60), a full erosion keeps the middle column
    # (18 x 1 = 18): every blend lies between, and both ways occur
    assert (ink >= 18 / 60 - 1e-5).all() and (ink <= 110 / 60 + 1e-5).all()
    assert (ink < 0.7).sum() > 40 and (ink > 1.3).sum() > 40
    assert np.abs(out[:, 5:23, 13] - 1).max() < 1e-5  # the stroke's middle (ends aside) is never lost
    assert np.abs(out[:, :, :11]).max() < 1e-6 and np.abs(out[:, :, 16:]).max() < 1e-6  # nothing moves away
    half = jitter(x, 0, np.random.default_rng(0), thickness=0.25)
    assert np.abs(half.sum(axis=(1, 2)) / x[0].sum() - 1).max() <= 0.25 * 50 / 60 + 1e-5


def test_erase_blanks_one_square_of_each_image_and_nothing_else():
    from engine.train import jitter

    x = np.random.default_rng(1).uniform(0.5, 1.0, (300, 28, 28)).astype(np.float32)  # no pixel is 0
    out = jitter(x, 0, np.random.default_rng(0), erase=0.35)  # a side of round(9.8) = 10 pixels
    sides = []
    for before, after in zip(x, out):
        blank = after == 0
        rows, cols = np.flatnonzero(blank.any(1)), np.flatnonzero(blank.any(0))
        assert len(rows) and len(cols)  # a square's centre always lies inside
        # one rectangle, a square's part that falls inside the image, and every other pixel as it was
        assert blank.sum() == len(rows) * len(cols) and np.ptp(rows) + 1 == len(rows) and np.ptp(cols) + 1 == len(cols)
        assert len(rows) <= 10 and len(cols) <= 10
        assert np.abs(after[~blank] - before[~blank]).max() < 1e-5
        sides.append((len(rows), len(cols)))
    assert (np.array(sides) == 10).all(1).sum() > 30  # whole squares where the centre is far from the edges
    assert len(set(np.array(sides)[:, 0])) > 3  # and cut by the edges elsewhere
    assert (jitter(x[:5], 0, np.random.default_rng(0), erase=1.0) == 0).mean() > 0.25
    # drawn last: the other jitter is the same with the square as without it, and off changes nothing
    how = {"rotate": 10.0, "scale": 0.1, "elastic": 1.5}
    plain = jitter(x[:50], 2, np.random.default_rng(3), **how)
    holed = jitter(x[:50], 2, np.random.default_rng(3), erase=0.35, **how)
    assert np.array_equal(jitter(x[:50], 2, np.random.default_rng(3), erase=0.0, **how), plain)
    kept = holed != 0
    assert np.array_equal(holed[kept], plain[kept]) and (~kept).sum(axis=(1, 2)).min() > 0
    for bad in (-0.1, 1.5, float("nan"), float("inf"), True, "0.3"):
        with pytest.raises(InvalidValueError, match="erase"):
            jitter(x[:2], 0, np.random.default_rng(0), erase=bad)


def test_erase_reaches_both_stages_of_training(tmp_path, monkeypatch):
    from engine.train import jitter, loop

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("erase"))
        return jitter(*args, **kwargs)

    monkeypatch.setattr(loop, "jitter", spy)  # the supervised stage calls jitter, the episodes augment
    train(TrainConfig(episodes=2, n_way=5, n_query=1, val_every=2, val_episodes=2, val_way=5, width=8,
                      pretrain_epochs=1, pretrain_batch=64, erase=0.4), tmp_path, progress=False)
    assert seen and set(seen) == {0.4}
    rng = np.random.default_rng(0)
    ep = EpisodeSampler(np.full((6, 3, 28, 28), 200, np.uint8), 5, 1, 2, seed=0).sample()
    out = loop.augment(ep, 0, rng, erase=0.4)
    assert (out.support_x == 0).any(axis=(1, 2)).all() and (out.query_x == 0).any(axis=(1, 2)).all()


def test_pretraining_teaches_g_to_separate_the_training_classes():
    """The supervised stage alone: held-out drawings of its classes, classified by a memory
    of other drawings (episodes of the same classes), get better; the head is not kept."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    protos = rng.random((8, 28, 28)) < 0.15
    noise = rng.random((8, 12, 28, 28)) < 0.08
    images = ((protos[:, None] ^ noise) * 255).astype(np.uint8)  # 8 classes of noisy copies
    fixed = [EpisodeSampler(images[:, 8:], 8, 1, 3, seed=s).sample() for s in range(6)]
    model = MatchingNetwork()
    model.eval()
    with torch.no_grad():
        before = np.mean([episode_loss(model, ep)[0].item() for ep in fixed])
    cfg = TrainConfig(pretrain_epochs=6, pretrain_batch=16, shift=0, rotate=0, scale=0, lr=3e-3)
    for bad, word in (({"pretrain_batch": 1}, "pretrain"), ({"pretrain_epochs": -1}, "pretrain"),
                      ({"width": 0}, "width"), ({"elastic": float("nan")}, "elastic"),
                      ({"thickness": 1.5}, "thickness"), ({"thickness": float("nan")}, "thickness"),
                      ({"thickness": True}, "thickness"), ({"erase": 1.01}, "erase"), ({"erase": -0.1}, "erase"),
                      ({"erase": float("nan")}, "erase"), ({"erase": "0.3"}, "erase"),
                      ({"weight_decay": -1e-3}, "weight_decay"), ({"weight_decay": float("inf")}, "weight_decay"),
                      ({"views": 0}, "views"), ({"views": 2.0}, "views"), ({"mixup": -1.0}, "mixup"),
                      ({"mixup": float("nan")}, "mixup"), ({"mixup": float("inf")}, "mixup"),
                      ({"mixup": "1"}, "mixup"), ({"mixup": 1.0, "pretrain_epochs": 0}, "mixup"),
                      ({"shift": float("nan")}, "shift"), ({"rotate": -1.0}, "rotate"),
                      ({"scale": float("inf")}, "scale"), ({"elastic": float("inf")}, "elastic"),
                      ({"elastic": True}, "elastic")):
        with pytest.raises(ValueError, match=word):
            pretrain(model, images[:, :8], TrainConfig(**{"pretrain_epochs": 1, **bad}), rng, progress=False)
    rows = pretrain(model, images[:, :8], cfg, rng, progress=False)
    assert len(rows) == 6 and rows[-1]["loss"] < rows[0]["loss"]
    assert set(model.state_dict()) == set(MatchingNetwork().state_dict())  # no head left behind
    model.eval()
    with torch.no_grad():
        after = np.mean([episode_loss(model, ep)[0].item() for ep in fixed])
    assert after < 0.7 * before, (before, after)


def test_mixup_blends_each_batch_with_itself_in_another_order():
    """Images of one grey level each: a blended batch keeps its sum and each value lies
    between the batch's extremes, yet is not the image it replaced."""
    torch.manual_seed(0)
    levels = np.random.default_rng(1).permutation(np.arange(8 * 4)).reshape(8, 4) * 7 + 10  # distinct levels
    images = np.broadcast_to(levels[:, :, None, None], (8, 4, 28, 28)).astype(np.uint8)
    model = MatchingNetwork(width=8)
    seen = []
    model.g_backbone.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    cfg = TrainConfig(pretrain_epochs=2, pretrain_batch=32, shift=0, rotate=0, scale=0, mixup=1.0)
    pretrain(model, images, cfg, np.random.default_rng(0), progress=False)
    assert len(seen) == 2
    values = np.sort(levels.ravel() / 255.0)
    for batch in seen:
        flat = batch.reshape(len(batch), -1).double().numpy()
        assert np.ptp(flat, axis=1).max() < 1e-6  # each input is still one grey level: a blend of two
        got = flat[:, 0]
        assert got.sum() == pytest.approx(values.sum(), rel=1e-5)
        assert values[0] - 1e-6 <= got.min() and got.max() <= values[-1] + 1e-6
        assert not np.allclose(np.sort(got), values, atol=1e-4)  # blended, not the images themselves
    seen.clear()
    pretrain(model, images, TrainConfig(pretrain_epochs=1, pretrain_batch=32, shift=0, rotate=0, scale=0),
             np.random.default_rng(0), progress=False)
    np.testing.assert_allclose(np.sort(seen[0].reshape(32, -1)[:, 0].double().numpy()), values, atol=1e-6)


def test_a_run_with_pretraining_and_a_wider_embedding_checkpoints(tmp_path):
    """Omniglot: one supervised epoch over the background classes, then two episodes."""
    cfg = TrainConfig(episodes=2, n_way=5, val_way=5, val_episodes=2, val_every=2, pretrain_epochs=1,
                      pretrain_batch=256, width=16)
    summary = train(cfg, tmp_path / "ck", progress=False)
    assert summary["episodes"] == 2
    log = [json.loads(line) for line in (tmp_path / "ck" / "log.jsonl").read_text().splitlines()]
    assert log[0]["pretrain"] and log[0]["epoch"] == 1 and 0 <= log[0]["train_acc"] <= 1
    assert "val_acc" in log[1]
    model = load_checkpoint(tmp_path / "ck")
    assert model.dim == 16 and model.embed_support(torch.zeros(2, 28, 28)).shape == (2, 16)


def test_assign_classes_finds_the_best_one_to_one_matching():
    """Against every permutation, on small matrices with ties and classes no slot holds."""
    import itertools

    from engine.train.evaluate import assign_classes

    rng = np.random.default_rng(5)
    for trial in range(60):
        n = int(rng.integers(1, 7))
        m = np.round(rng.normal(size=(n, n)), 1 if trial % 2 else 6)  # rounding makes ties
        if trial % 3 == 0:
            m *= 1e7  # a spread far beyond any fixed stand-in for minus infinity
        m[rng.random((n, n)) < 0.25] = -np.inf
        m[np.arange(n), rng.permutation(n)] = rng.normal(size=n)  # one finite matching always exists
        best = max(sum(m[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
        got = assign_classes(m)
        assert sorted(got) == list(range(n))  # one to one
        assert sum(m[i, got[i]] for i in range(n)) == pytest.approx(best, rel=1e-12, abs=1e-9)
    # a matching through a class no slot holds loses to any finite one, however far apart
    assert list(assign_classes(np.array([[-1e7, -np.inf], [0.0, -1e7]]))) == [0, 1]
    with pytest.raises(InvalidValueError, match="as many items as classes"):
        assign_classes(np.zeros((3, 4)))
    with pytest.raises(InvalidValueError, match="NaN"):
        assign_classes(np.array([[np.nan, 0.0], [0.0, np.nan]]))


def test_class_log_attention_is_dense_attention():
    from engine import Memory
    from engine.testing import dense_attention
    from engine.train.evaluate import class_log_attention

    rng = np.random.default_rng(6)
    x, labels, q = rng.normal(size=(40, 8)), rng.integers(0, 7, 40), rng.normal(size=(9, 8))
    memory = Memory(8, index="Flat", temperature=0.02)  # a low temperature: many classes' mass underflows float32
    memory.add(x, labels.tolist())
    res = memory.query(q, k=40, probs="top-k")
    got = class_log_attention(res.scores, res.slot_classes, len(res.classes), memory.temperature)
    ref = dense_attention(x, labels, q, temperature=0.02, classes=res.classes)
    seen = ref > 1e-300
    np.testing.assert_allclose(got[seen], np.log(ref[seen]), atol=1e-4)
    assert np.isfinite(got).all()  # every class keeps a finite log, however small
    few = memory.query(q, k=3, probs="top-k")  # classes none of a query's 3 slots holds: minus infinity
    part = class_log_attention(few.scores, few.slot_classes, len(few.classes), memory.temperature)
    held = np.zeros_like(part, dtype=bool)
    for i in range(len(q)):
        held[i, few.slot_classes[i]] = True
    assert np.isneginf(part[~held]).all() and np.isfinite(part[held]).all()
    np.testing.assert_allclose(np.exp(part).sum(1), 1.0)
    # slot weights enter the attention as the memory's own does: log w added to each logit
    w = rng.uniform(0.1, 50, 40)
    weighted = Memory(8, index="Flat", temperature=0.5)
    weighted.add(x, labels.tolist(), weights=w)
    res = weighted.query(q, k=40, probs="top-k")
    got = class_log_attention(res.scores, res.slot_classes, len(res.classes), 0.5,
                              weights=weighted.get(res.ids.ravel()).weights.reshape(res.ids.shape))
    ref = dense_attention(x, labels, q, temperature=0.5, weights=w, classes=res.classes)
    np.testing.assert_allclose(np.exp(got), ref, atol=1e-6)
    with pytest.raises(InvalidValueError, match="shape"):
        class_log_attention(res.scores, res.slot_classes, len(res.classes), 0.5, weights=np.ones((2, 2)))


def test_eval_oneshot_assign_matches_items_to_classes_one_to_one():
    from dataclasses import replace

    from engine.testing import dense_attention
    from engine.train.evaluate import assign_classes

    torch.manual_seed(0)
    run = load_oneshot_runs(RUNS)[0]
    model = MatchingNetwork()
    out = eval_oneshot(model, [run], assign=True)
    plain = eval_oneshot(model, [run])
    assert out["error_rate"] == plain["error_rate"] and set(out["assigned"]["per_run"]) == {"run01"}
    # the reference: dense float64 attention over the model's own embeddings, then the matching
    model.eval()
    with torch.no_grad():
        g = model.embed_support(as_input(run.train)).double().numpy()
        h = model.embed_queries(as_input(run.test)).double().numpy()
    ref = dense_attention(g, np.arange(20), h, temperature=float(model.temperature.detach()))
    expect = float((assign_classes(np.log(ref)) != run.answer).mean())
    assert out["assigned"]["error_rate"] == pytest.approx(expect)
    # a run whose items are its training drawings in another order: every item finds itself
    perm = np.random.default_rng(0).permutation(20)
    same = replace(run, name="self", test=run.train[perm], answer=perm)
    assert eval_oneshot(model, [same], assign=True)["assigned"]["error_rate"] == 0.0
    with pytest.raises(InvalidValueError, match="one-to-one"):
        eval_oneshot(model, [replace(run, test=run.test[:19], answer=run.answer[:19])], assign=True)


def test_evaluate_episodes_assign_scores_one_query_per_class():
    rng = np.random.default_rng(0)
    images = (rng.random((10, 4, 28, 28)) < 0.2).astype(np.uint8) * 255
    one = np.repeat(images[:, :1], 4, axis=1)  # each query is its support image: both scorers exact
    out = evaluate_episodes(MatchingNetwork(), one, n_way=5, k_shot=1, n_query=1, episodes=4, assign=True)
    assert out["accuracy"] == out["assigned_accuracy"] == 1.0
    noisy = evaluate_episodes(MatchingNetwork(), images, n_way=5, k_shot=1, n_query=1, episodes=20, assign=True)
    assert 0 <= noisy["assigned_accuracy"] <= 1 and noisy["assigned_ci95"] >= 0
    with pytest.raises(InvalidValueError, match="n_query=1"):
        evaluate_episodes(MatchingNetwork(), images, n_way=5, k_shot=1, n_query=2, episodes=2, assign=True)


def test_several_settings_scored_over_one_embedding_score_as_alone():
    from engine.train import episode_features

    torch.manual_seed(2)
    rng = np.random.default_rng(2)
    images = (rng.random((10, 4, 28, 28)) < 0.2).astype(np.uint8) * 255
    model = MatchingNetwork(views=2)
    features = episode_features(model, images)
    for way, within in ((5, 0.0), (3, 1.0)):
        alone = evaluate_episodes(model, images, ["a"] * 5 + ["b"] * 5, n_way=way, k_shot=1, n_query=2, episodes=8,
                                  within_group=within)
        shared = evaluate_episodes(model, images, ["a"] * 5 + ["b"] * 5, n_way=way, k_shot=1, n_query=2, episodes=8,
                                   within_group=within, features=features)
        assert shared == alone
    with pytest.raises(InvalidValueError, match="features"):
        evaluate_episodes(model, images[:, :3], n_way=5, k_shot=1, n_query=1, episodes=2, features=features)
    narrow = MatchingNetwork(width=16)  # another model's features: another dimension
    with pytest.raises(InvalidValueError, match="dimension"):
        evaluate_episodes(narrow, images, n_way=5, k_shot=1, n_query=1, episodes=2, features=features)


def test_resume_config_is_the_saved_run_with_the_overrides_in_place(tmp_path):
    from dataclasses import asdict

    from engine.errors import CorruptFileError, FormatVersionError, MissingFileError
    from engine.train import resume_config

    cfg = TrainConfig(n_way=5, n_query=1, episodes=2, val_every=2, val_episodes=2, val_way=5, seed=3, shift=1.0,
                      elastic=0.5, image_size=32, time_budget_s=1000.0)
    train(cfg, tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    again = asdict(resume_config(tmp_path / "run"))
    # every option as saved, but the time budget (one invocation's) and the model (written from the config)
    assert again == {**saved, "time_budget_s": None, "model": {}}
    assert (again["shift"], again["elastic"], again["image_size"], again["seed"]) == (1.0, 0.5, 32, 3)
    more = resume_config(tmp_path / "run", episodes=4, time_budget_s=50.0)
    assert (more.episodes, more.time_budget_s, more.shift) == (4, 50.0, 1.0)
    assert train(more, tmp_path / "run", resume=True, progress=False)["episodes"] == 4
    # a run saved before an option existed: the option's default, the value it had then
    old = json.loads((tmp_path / "run" / "config.json").read_text())
    del old["erase"], old["weight_decay"]
    (tmp_path / "run" / "config.json").write_text(json.dumps(old))
    assert (resume_config(tmp_path / "run").erase, resume_config(tmp_path / "run").weight_decay) == (0.0, 0.0)
    old["shift"] = 1  # an amount saved as an integer, as JSON may hold it: still a number of pixels
    (tmp_path / "run" / "config.json").write_text(json.dumps(old))
    assert resume_config(tmp_path / "run").shift == 1
    assert resume_config(tmp_path / "run", episodes=None).episodes == 4  # None: not given
    with pytest.raises(InvalidValueError, match="no such training option: shfit"):
        resume_config(tmp_path / "run", shfit=2.0)
    with pytest.raises(InvalidValueError, match="n_way must be of the kind int, got '5'"):
        resume_config(tmp_path / "run", n_way="5")
    for bad, error, words in (({"cutmix": 1.0}, FormatVersionError, "does not know \\(cutmix\\)"),
                              ({"shift": "2"}, CorruptFileError, "shift is '2'"),
                              ({"episodes": 2.5}, CorruptFileError, "episodes is 2.5"),
                              ({"episodes": None}, CorruptFileError, "episodes is None"),
                              ({"fce": 1}, CorruptFileError, "fce is 1"),
                              ({"n_way": True}, CorruptFileError, "n_way is True"),
                              ({"data": 3}, CorruptFileError, "data is 3"),
                              ({"val_every": 0}, CorruptFileError, "val_every must be an integer from 1"),
                              ({"temperature": 0.0}, CorruptFileError, "temperature must be a finite number > 0"),
                              ({"within_alphabet": 2.0}, CorruptFileError, "within_alphabet must be a share")):
        (tmp_path / "run" / "config.json").write_text(json.dumps({**old, **bad}))
        with pytest.raises(error, match=words):
            resume_config(tmp_path / "run")
    with pytest.raises(MissingFileError, match="config.json"):
        resume_config(tmp_path / "none")


@pytest.mark.parametrize("change", [{"n_way": 1}, {"k_shot": 0}, {"n_query": 0}, {"val_every": 0}, {"val_way": 1},
                                    {"val_episodes": 0}, {"episodes": -1}, {"episodes": 10**400}, {"episodes": 2.5},
                                    {"n_way": True}, {"seed": -1}, {"seed": 2**32}, {"threads": 0}, {"topk": 0},
                                    {"lr": float("nan")}, {"lr_min": 0.0}, {"lr_min": 0.1}, {"temperature": 0.0},
                                    {"temperature": float("inf")}, {"within_alphabet": 1.5},
                                    {"within_alphabet": float("nan")}, {"pretrain_epochs": 1.5},
                                    {"pretrain_batch": 1}, {"fce_steps": 0}, {"fce_steps": 2.5},
                                    {"pretrain_epochs": True}, {"pool": "max"}, {"pool": None}, {"width": 0},
                                    {"width": [64, 64]}, {"width": [64, 64, 64, -1]}, {"width": "64"}])
def test_the_config_refuses_counts_rates_and_shares_out_of_range_before_writing(tmp_path, change):
    from engine.train.config import check_stage

    name = next(iter(change))
    with pytest.raises(InvalidValueError, match=name):
        check_stage(TrainConfig(**change))
    with pytest.raises(InvalidValueError, match=name):
        train(TrainConfig(**{"n_way": 5, "n_query": 1, "val_way": 5, "episodes": 2, "val_every": 2,
                             "val_episodes": 2, **change}), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_the_config_accepts_the_recipes_their_bounds_and_numpys_numbers():
    from engine.train import OMNIGLOT_28, recipe
    from engine.train.config import check_stage

    for cfg in (recipe("omniglot"), recipe("omniglot", **OMNIGLOT_28), recipe("fashion-mnist"),
                recipe("fashion-mnist", val_every=0),  # no episodes: val_every is never read
                TrainConfig(n_way=2, val_way=2, episodes=0, seed=2**32 - 1, within_alphabet=0, topk=1, threads=1,
                            pretrain_batch=2, fce_steps=1, lr_min=1e-3, lr=1e-3),
                TrainConfig(within_alphabet=1, episodes=10**9, val_episodes=10**9)):
        check_stage(cfg)
    assert recipe("omniglot").width == recipe("omniglot", **OMNIGLOT_28).width == [64, 64, 128, 256]
    cfg = TrainConfig(n_way=np.int64(5), seed=np.uint32(7), lr=np.float32(0.002), within_alphabet=np.float64(0.25),
                      topk=np.int32(8), pretrain_epochs=np.int64(1), width=(8, np.int64(8), 16, 32))
    check_stage(cfg)
    from dataclasses import asdict

    saved = json.loads(json.dumps(asdict(cfg)))  # plain numbers: the config is written as JSON
    assert (saved["n_way"], saved["seed"], saved["topk"], saved["pretrain_epochs"]) == (5, 7, 8, 1)
    assert saved["lr"] == pytest.approx(0.002) and saved["within_alphabet"] == 0.25
    assert saved["width"] == [8, 8, 16, 32]


def test_a_run_stopped_before_its_first_checkpoint_is_not_resumed(tmp_path):
    from engine.errors import MissingFileError

    cfg = TrainConfig(n_way=5, n_query=1, episodes=2, val_every=2, val_episodes=2, val_way=5)
    train(cfg, tmp_path / "run", progress=False)
    for name in ("model.pt", "state.json"):  # as a run killed in its supervised stage leaves it: config.json only
        (tmp_path / "run" / name).unlink()
    before = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(MissingFileError, match="model.pt, state.json missing"):  # named, in CHECKPOINT_FILES order
        train(cfg, tmp_path / "run", resume=True, progress=False)
    assert (tmp_path / "run" / "config.json").read_text() == before


def test_a_fresh_run_leaves_nothing_of_an_earlier_one_in_its_folder(tmp_path):
    """Afresh over a finished run: no best state, checkpoint or log of the earlier run is left
    to pass for the new one's (with no episodes nothing validates, so best.pt is the model)."""
    base = dict(n_way=5, n_query=1, val_every=2, val_episodes=2, val_way=5)
    train(TrainConfig(episodes=2, seed=1, **base), tmp_path, progress=False)
    old_best = torch.load(tmp_path / "best.pt", weights_only=True)
    # refused before anything changes: a bad option, and data that is not there (found once the run loads it)
    for bad, error in ((TrainConfig(episodes=0, seed=2, background="small9", **base), InvalidValueError),
                       (TrainConfig(episodes=0, seed=2, data=str(tmp_path / "nowhere"), **base), MissingFileError)):
        with pytest.raises(error):
            train(bad, tmp_path, progress=False)
        kept = torch.load(tmp_path / "best.pt", weights_only=True)
        assert all(torch.equal(kept[k], old_best[k]) for k in old_best)
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 1
    train(TrainConfig(episodes=0, seed=2, **base), tmp_path, progress=False)
    new_best = torch.load(tmp_path / "best.pt", weights_only=True)
    new_last = torch.load(tmp_path / "model.pt", weights_only=True)
    assert any(not torch.equal(old_best[k], new_best[k]) for k in old_best)
    for key in new_best:
        torch.testing.assert_close(new_best[key], new_last[key])
    assert not (tmp_path / "log.jsonl").exists() or not (tmp_path / "log.jsonl").read_text()
    assert json.loads((tmp_path / "state.json").read_text())["episode"] == 0


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated", "another model", "a list"])
def test_damaged_weights_are_a_corrupt_file_named(tmp_path, damage):
    from engine.errors import CorruptFileError

    base = dict(n_way=5, n_query=1, val_every=2, val_episodes=2, val_way=5, episodes=2, width=8)
    train(TrainConfig(**base), tmp_path / "run", progress=False)
    weights = tmp_path / "run" / "best.pt"
    if damage == "another model":
        train(TrainConfig(**{**base, "width": 16}), tmp_path / "other", progress=False)
    bad = {"empty": lambda: b"", "garbage": lambda: b"\x00not weights" * 50,
           "truncated": lambda: weights.read_bytes()[: weights.stat().st_size // 2],
           "another model": lambda: (tmp_path / "other" / "best.pt").read_bytes()}
    if damage == "a list":
        torch.save([torch.zeros(2)], weights)
    else:
        weights.write_bytes(bad[damage]())
    kept = weights.read_bytes()
    with pytest.raises(CorruptFileError, match="best.pt"):
        load_checkpoint(tmp_path / "run")
    assert weights.read_bytes() == kept
