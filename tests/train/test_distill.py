"""Distillation from trained models: the loss against an independent KL, its reach into both
stages, and the teachers a run refuses before it writes anything."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from engine.data.episodes import EpisodeSampler
from engine.errors import CorruptFileError, InvalidValueError, MissingFileError
from engine.nn import MatchingNetwork
from engine.train import TrainConfig, episode_loss, load_sets, resume_config, train
from engine.train.loop import distillation

BASE = dict(n_way=5, n_query=1, val_every=2, val_episodes=2, val_way=5, width=8, pretrain_epochs=1,
            pretrain_batch=256)


def kl_reference(student: np.ndarray, teacher: np.ndarray) -> float:
    """KL(teacher || student) of two sets of logits, the mean over rows, in float64."""
    def log_softmax(x):
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    ls, lt = log_softmax(student.astype(np.float64)), log_softmax(teacher.astype(np.float64))
    return float((np.exp(lt) * (lt - ls)).sum(axis=1).mean())


def test_distillation_is_the_kl_from_the_teacher_to_the_student():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(7, 5)) * 3, rng.normal(size=(7, 5)) * 3
    got = distillation(torch.as_tensor(s), torch.as_tensor(t)).item()
    assert got == pytest.approx(kl_reference(s, t), rel=1e-9)
    assert got > 0 and distillation(torch.as_tensor(t), torch.as_tensor(t)).item() == pytest.approx(0, abs=1e-12)
    # logits or log-probabilities of the same answer: the same loss (a constant per row does not matter)
    shifted = torch.as_tensor(s + rng.normal(size=(7, 1)))
    assert distillation(shifted, torch.as_tensor(t)).item() == pytest.approx(got, rel=1e-9)


def _episode(seed=0):
    images = (np.random.default_rng(seed).random((8, 4, 28, 28)) < 0.2).astype(np.uint8) * 255
    return EpisodeSampler(images, 5, 1, 3, seed=seed).sample()


def test_an_episode_distilled_from_itself_adds_nothing_and_from_another_adds_the_kl():
    torch.manual_seed(0)
    ep = _episode()
    model, other = MatchingNetwork(width=8), MatchingNetwork(width=8)
    for m in (model, other):
        m.eval()
    with torch.no_grad():
        plain, _ = episode_loss(model, ep)
        itself, _ = episode_loss(model, ep, teacher=model, distill=0.3)
        assert itself.item() == pytest.approx(0.7 * plain.item(), rel=1e-6)
        mixed, _ = episode_loss(model, ep, teacher=other, distill=0.3)
        from engine.data import as_input

        other.process_support_set(as_input(ep.support_x), torch.from_numpy(ep.support_y))
        theirs = other(as_input(ep.query_x)).numpy()
        model.process_support_set(as_input(ep.support_x), torch.from_numpy(ep.support_y))
        mine = model(as_input(ep.query_x)).numpy()
    assert mixed.item() == pytest.approx(0.7 * plain.item() + 0.3 * kl_reference(mine, theirs), rel=1e-5)


def test_distilled_episodes_bring_the_student_to_the_teachers_answer():
    """distill=1: the loss is the KL alone, so training lowers it on episodes it never saw, and
    further than training on the labels alone does."""
    torch.manual_seed(1)
    rng = np.random.default_rng(3)
    protos = rng.random((10, 28, 28)) < 0.15
    images = ((protos[:, None] ^ (rng.random((10, 8, 28, 28)) < 0.1)) * 255).astype(np.uint8)
    fixed = [EpisodeSampler(images, 5, 1, 2, seed=s).sample() for s in range(4)]

    def gap(student):
        student.eval()
        with torch.no_grad():
            return np.mean([(episode_loss(student, e, teacher=teacher, distill=1.0)[0]).item() for e in fixed])

    def trained(distill, seed=2, steps=100):
        torch.manual_seed(seed)
        student = MatchingNetwork(width=8)
        opt = torch.optim.Adam(student.parameters(), lr=3e-3)
        sampler = EpisodeSampler(images, 5, 1, 2, seed=99)
        student.train()
        for _ in range(steps):
            loss, _ = episode_loss(student, sampler.sample(), teacher=teacher, distill=distill)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return student

    teacher = None
    teacher = trained(0.0, seed=5, steps=60)  # on the labels: an answer of its own, sure of itself
    teacher.eval()
    torch.manual_seed(2)
    before = gap(MatchingNetwork(width=8))
    distilled, labelled = gap(trained(1.0)), gap(trained(0.0))
    assert distilled < 0.25 * before and distilled < 0.75 * labelled, (before, distilled, labelled)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    for seed in (1, 2):
        train(TrainConfig(episodes=2, seed=seed, **BASE), root / f"seed{seed}", progress=False)
    train(TrainConfig(episodes=2, seed=1, **{**BASE, "background": "small2"}), root / "small2", progress=False)
    train(TrainConfig(episodes=2, seed=1, image_size=32, **BASE), root / "size32", progress=False)
    train(TrainConfig(episodes=2, seed=1, fce=True, fce_steps=1, **BASE), root / "fce", progress=False)
    shutil.copytree(root / "seed1", root / "damaged")
    kept = (root / "damaged" / "best.pt").read_bytes()
    (root / "damaged" / "best.pt").write_bytes(kept[: len(kept) // 2])
    (root / "link").symlink_to(root / "seed1")
    return root


def test_the_supervised_stage_distils_from_each_class_direction_at_the_teachers_temperature(teachers, monkeypatch):
    """One batch with distill=1: the loss is the KL from the teacher's answer on the very batch the
    model saw (its cosine to each class's unit mean direction, over its temperature), recomputed
    here in float64 from the teacher's embeddings."""
    from engine.data import as_input, pixels
    from engine.train import loop

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = (rng.random((6, 5, 28, 28)) < 0.2).astype(np.uint8) * 255
    cfg = TrainConfig(**{**BASE, "pretrain_epochs": 1, "pretrain_batch": 30, "distill": 1.0,
                         "teachers": [str(teachers / "seed1"), str(teachers / "seed2")]})
    teacher = loop.load_teachers(cfg)
    with torch.no_grad():
        z = teacher.embed_support(as_input(pixels(images.reshape(30, 28, 28)))).double().numpy()
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    means = z.reshape(6, 5, -1).mean(1)
    directions = means / np.linalg.norm(means, axis=1, keepdims=True)
    np.testing.assert_allclose(loop.class_directions(teacher, images).double().numpy(), directions, atol=1e-5)
    model = MatchingNetwork(width=8)
    seen, answers = [], []
    model.g_backbone.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    real = loop.distillation

    def spy(s, t):
        answers.append((s.detach().double().numpy(), t.double().numpy()))
        return real(s, t)

    monkeypatch.setattr(loop, "distillation", spy)
    rows = loop.pretrain(model, images, cfg, rng, progress=False, teacher=teacher)
    ((student, answer),) = answers
    with torch.no_grad():
        zt = teacher.embed_support(seen[0]).double().numpy()  # the jittered batch the model saw
    zt /= np.linalg.norm(zt, axis=1, keepdims=True)
    np.testing.assert_allclose(answer, zt @ directions.T / teacher.temperature.item(), rtol=1e-4, atol=1e-4)
    assert rows[0]["loss"] == pytest.approx(kl_reference(student, answer), rel=1e-5)


def test_a_distilled_run_trains_both_stages_against_the_teachers_and_resumes_only_with_them(teachers, tmp_path,
                                                                                          monkeypatch):
    from engine.train import loop

    calls = []
    real = loop.distillation
    monkeypatch.setattr(loop, "distillation", lambda s, t: calls.append(s.shape) or real(s, t))
    for seed in (1, 2):  # copies: one is changed below
        shutil.copytree(teachers / f"seed{seed}", tmp_path / f"t{seed}")
    cfg = TrainConfig(episodes=2, seed=3, distill=0.5, teachers=[str(tmp_path / "t1"), tmp_path / "t2"], **BASE)
    train(cfg, tmp_path / "run", progress=False)
    n_classes = len(load_sets(cfg)[0])  # the supervised stage's answer is over every training class
    assert {shape[1] for shape in calls} == {5, n_classes}  # both stages: the batches, then the episodes
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["distill"] == 0.5 and saved["teachers"] == [str(tmp_path / "t1"), str(tmp_path / "t2")]
    assert saved["teacher_digests"] == [hashlib.sha256((tmp_path / t / "best.pt").read_bytes()).hexdigest()
                                        for t in ("t1", "t2")]
    with pytest.raises(InvalidValueError, match="teachers"):  # another teacher: another model
        train(TrainConfig(episodes=4, seed=3, distill=0.5, teachers=[str(tmp_path / "t1")], **BASE),
              tmp_path / "run", resume=True, progress=False)
    again = resume_config(tmp_path / "run", episodes=4)  # as engine train --resume reads the run
    assert again.teachers == saved["teachers"] and again.distill == 0.5
    train(again, tmp_path / "run", resume=True, progress=False)
    assert json.loads((tmp_path / "run" / "state.json").read_text())["episode"] == 4
    # a teacher retrained in its folder is another teacher: refused, the run unchanged
    shutil.copyfile(teachers / "seed1" / "best.pt", tmp_path / "t2" / "best.pt")
    before = (tmp_path / "run" / "model.pt").read_bytes()
    with pytest.raises(InvalidValueError, match="t2: its best.pt is not the one"):
        train(resume_config(tmp_path / "run", episodes=6), tmp_path / "run", resume=True, progress=False)
    assert (tmp_path / "run" / "model.pt").read_bytes() == before
    for damage in ("seed1", [3], [""]):  # a config.json whose teachers are not a list of folders
        (tmp_path / "run" / "config.json").write_text(json.dumps({**saved, "teachers": damage}))
        with pytest.raises(CorruptFileError, match="teachers"):
            resume_config(tmp_path / "run")


@pytest.mark.parametrize("bad, error, word", [
    ({"distill": 0.5, "teachers": []}, InvalidValueError, "teachers"),
    ({"distill": 0.0, "teachers": ["x"]}, InvalidValueError, "distill"),
    ({"distill": 1.5, "teachers": ["x"]}, InvalidValueError, "distill"),
    ({"distill": float("nan"), "teachers": ["x"]}, InvalidValueError, "distill"),
    ({"distill": True, "teachers": ["x"]}, InvalidValueError, "distill"),
    ({"distill": 0.5, "teachers": "seed1"}, InvalidValueError, "teachers"),
    ({"distill": 0.5, "teachers": [3]}, InvalidValueError, "teachers"),
    ({"distill": 0.5, "teachers": [""]}, InvalidValueError, "teachers"),
    ({"distill": 0.5, "teachers": ["x"] * 17}, InvalidValueError, "teachers"),
    ({"distill": 0.5, "teachers": ["seed1", "link"]}, InvalidValueError, "twice"),
    ({"distill": 0.5, "teachers": ["seed1"], "topk": 4}, InvalidValueError, "topk_tail"),
    ({"distill": 0.5, "teachers": ["seed1"], "teacher_digests": ["ab"]}, InvalidValueError, "teacher_digests"),
    ({"distill": 0.5, "teachers": ["nowhere"]}, MissingFileError, "config.json"),
    ({"distill": 0.5, "teachers": ["damaged"]}, CorruptFileError, "best.pt"),
    ({"distill": 0.5, "teachers": ["small2"]}, InvalidValueError, "background"),
    ({"distill": 0.5, "teachers": ["size32"]}, InvalidValueError, "image_size"),
    ({"distill": 0.5, "teachers": ["fce"]}, InvalidValueError, "Full Context"),
    ({"distill": 0.5, "teachers": ["run"]}, InvalidValueError, "itself"),
    ({"distill": 0.5, "teachers": ["run/inside"]}, InvalidValueError, "lies in it"),
])
def test_a_bad_teacher_is_refused_before_the_run_writes_anything(teachers, tmp_path, bad, error, word):
    out = tmp_path / "run"
    if isinstance(bad["teachers"], list):
        named = ("nowhere", "small2", "size32", "fce", "damaged", "seed1", "link")
        bad = {**bad, "teachers": [str(tmp_path / t) if str(t).startswith("run") else str(teachers / t) if t in named
                                   else t for t in bad["teachers"]]}
    if word in ("itself", "lies in it"):  # a finished run in the folder, its teacher the folder or a run in it
        train(TrainConfig(episodes=2, seed=4, **BASE), out, progress=False)
        shutil.copytree(teachers / "seed1", out / "inside")

    def files():
        return {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} if out.exists() else None

    before = files()
    with pytest.raises(error, match=word):
        train(TrainConfig(episodes=2, seed=3, **{**BASE, **bad}), out, progress=False)
    assert files() == before


def test_engine_train_force_keeps_the_old_run_when_its_teacher_is_refused(teachers, tmp_path):
    from typer.testing import CliRunner

    from engine.cli import app

    out = tmp_path / "run"
    train(TrainConfig(episodes=2, seed=4, **BASE), out, progress=False)
    shutil.copytree(teachers / "seed1", out / "inside")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for teacher, word in ((out, "itself"), (out / "inside", "lies in it"), (teachers / "small2", "background"),
                          (teachers / "nowhere", "config.json")):
        result = CliRunner().invoke(app, ["train", "--out", str(out), "--force", "--image-size", "28", "--teacher",
                                          str(teacher), "--distill", "0.5"])
        assert result.exit_code == 2 and word in result.output, result.output
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
