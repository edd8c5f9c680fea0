"""Matching Networks in torch: shapes, FCE reductions, memory equivalence, top-k gradients."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.nn import AttentionLSTM, ConvEmbedding, MatchingNetwork, SupportBiLSTM


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def episode(n_way=5, k_shot=2, n_query=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(n_way * k_shot, 1, 28, 28, generator=g)
    sy = torch.arange(n_way).repeat_interleave(k_shot)
    qx = torch.rand(n_way * n_query, 1, 28, 28, generator=g)
    return sx, sy, qx


def test_conv_embedding_shape():
    assert ConvEmbedding()(torch.rand(7, 1, 28, 28)).shape == (7, 64)
    assert ConvEmbedding()(torch.rand(2, 28, 28)).shape == (2, 64)


def test_a_width_a_block_sets_each_blocks_filters_and_the_last_sets_the_embedding():
    from engine.errors import InvalidValueError

    net = ConvEmbedding(width=[4, 6, 8, 12], pool="flat", image_size=40)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 4), (4, 6), (6, 8), (8, 12)]
    assert net.out_dim == 48 and net(torch.rand(3, 1, 40, 40)).shape == (3, 48)  # 12 filters x a 2x2 map
    assert ConvEmbedding(width=(4, 6, 8, np.int64(12)))(torch.rand(2, 1, 28, 28)).shape == (2, 12)
    model = MatchingNetwork(width=(4, 6, 8, 12), image_size=40, pool="flat")
    assert model.config()["width"] == [4, 6, 8, 12]  # plain ints in a list: written as JSON
    again = MatchingNetwork.from_config(json.loads(json.dumps(model.config())))
    again.load_state_dict(model.state_dict())  # the same shapes, block by block
    assert again.dim == 48
    for bad in (0, -3, 2.5, True, "64", None, [8, 8, 8], [8, 8, 8, 8, 8], [8, 8, 0, 8], [8, 8, True, 8],
                [8, 8, 8.0, 8], 10**6):
        with pytest.raises(InvalidValueError, match="width"):
            MatchingNetwork(width=bad)
    model.config()["width"].append(99)  # the caller's copy
    assert model.config()["width"] == [4, 6, 8, 12]
    for blocks in (0, -1, 2.0, True, 17):
        with pytest.raises(InvalidValueError, match="blocks"):
            ConvEmbedding(width=8, blocks=blocks)
    assert ConvEmbedding(width=[4, 8], blocks=2).out_dim == 8


def test_a_flat_pool_keeps_the_last_map_whole():
    from engine.errors import InvalidValueError

    flat = ConvEmbedding(width=8, pool="flat", image_size=40)  # 40 -> 20 -> 10 -> 5 -> 2: a 2x2 map
    mean = ConvEmbedding(width=8)
    mean.load_state_dict(flat.state_dict())  # the same weights, the map averaged
    flat.eval(), mean.eval()
    x = torch.rand(5, 1, 40, 40)
    with torch.no_grad():
        z = flat(x)
        assert flat.out_dim == 32 and z.shape == (5, 32)
        # each filter's four positions, in the map's order; their mean is the averaged embedding
        torch.testing.assert_close(z.reshape(5, 8, 4).mean(2), mean(x))
        assert not torch.allclose(z.reshape(5, 8, 4)[..., 0], z.reshape(5, 8, 4)[..., 3])
        at28 = ConvEmbedding(width=8, pool="flat", image_size=28)  # a 1x1 map: the two pools agree
        at28.load_state_dict(flat.state_dict())
        at28.eval()
        x28 = torch.rand(3, 1, 28, 28)
        torch.testing.assert_close(at28(x28), mean(x28))
    net = MatchingNetwork(width=8, image_size=40, pool="flat")
    assert net.dim == 32 and MatchingNetwork.from_config(net.config()).dim == 32
    for bad in ({"pool": "max", "image_size": 40}, {"pool": "flat"}, {"pool": ["flat"], "image_size": 40}):
        with pytest.raises(InvalidValueError, match="pool"):
            MatchingNetwork(width=8, **bad)
    for side in ("40", 40.0, True):
        with pytest.raises(InvalidValueError, match="image_size"):
            ConvEmbedding(width=8, pool="flat", image_size=side)
    with pytest.raises(InvalidValueError, match="2x2 map whole"):  # 48x48 would leave 3x3: another length
        flat(torch.rand(2, 1, 48, 48))


@pytest.mark.parametrize("fce", [False, True])
def test_forward_gives_log_probabilities(fce):
    sx, sy, qx = episode()
    model = MatchingNetwork(fce=fce, fce_steps=3).eval()
    model.process_support_set(sx, sy * 10)  # any integer labels; columns are the sorted classes
    logp = model(qx)
    assert logp.shape == (15, 5) and model.classes.tolist() == [0, 10, 20, 30, 40]
    assert (logp <= 0).all()
    np.testing.assert_allclose(logp.exp().sum(1).detach().numpy(), 1.0, atol=1e-5)


def test_forward_before_support_is_an_error():
    with pytest.raises(RuntimeError, match="process_support_set"):
        MatchingNetwork()(torch.rand(1, 1, 28, 28))


def test_plain_kernel_matches_a_reference():
    """Without FCE: softmax over cosine / T of the backbone embeddings (eq. 1), computed independently."""
    sx, sy, qx = episode()
    model = MatchingNetwork(temperature=0.3).eval()
    model.process_support_set(sx, sy)
    with torch.no_grad():
        g = model.g_backbone(sx).double().numpy()
        h = model.g_backbone(qx).double().numpy()
        logp = model(qx).double().numpy()
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    h /= np.linalg.norm(h, axis=1, keepdims=True)
    a = np.exp(h @ g.T / 0.3)
    a /= a.sum(1, keepdims=True)
    ref = np.stack([a[:, sy.numpy() == c].sum(1) for c in range(5)], 1)
    np.testing.assert_allclose(np.exp(logp), ref, atol=1e-5)


def test_fce_with_no_steps_and_no_bilstm_is_the_plain_kernel():
    sx, sy, qx = episode()
    plain = MatchingNetwork().eval()
    fce = MatchingNetwork(fce=True, fce_steps=0).eval()
    fce.load_state_dict(plain.state_dict(), strict=False)
    fce.support_lstm = None
    for m in (plain, fce):
        m.process_support_set(sx, sy)
    torch.testing.assert_close(fce(qx), plain(qx))


def test_attention_lstm_with_zero_steps_returns_f_prime():
    f_prime = torch.rand(4, 8)
    assert torch.equal(AttentionLSTM(8, steps=0)(f_prime, torch.rand(6, 8)), f_prime)


def test_bilstm_states_add_to_the_skip_connection():
    lstm = SupportBiLSTM(8)
    with torch.no_grad():
        for p in lstm.parameters():
            p.zero_()  # zero weights: every LSTM state is 0, so g = g'
    g_prime = torch.rand(5, 8)
    torch.testing.assert_close(lstm(g_prime), g_prime)


def test_full_context_sees_the_whole_support_set():
    lstm = SupportBiLSTM(8)
    g_prime = torch.rand(5, 8)
    changed = g_prime.clone()
    changed[4] += 1.0
    out_a, out_b = lstm(g_prime), lstm(changed)
    assert not torch.allclose(out_a[0], out_b[0])  # the first embedding depends on the last sample


def test_attention_read_is_softmax_over_unit_support():
    cell = AttentionLSTM(8, steps=1)
    h, support = torch.rand(3, 8), torch.rand(6, 8)
    unit = F.normalize(support, dim=1).double().numpy()
    w = np.exp(h.double().numpy() @ unit.T)
    w /= w.sum(1, keepdims=True)
    np.testing.assert_allclose(cell.read(h, F.normalize(support, dim=1)).double().numpy(), w @ unit, atol=1e-6)


@pytest.mark.parametrize("fce", [False, True])
def test_memory_backed_inference_equals_in_batch(fce):
    sx, sy, qx = episode(n_way=6, k_shot=3, n_query=4)
    model = MatchingNetwork(fce=fce, fce_steps=2, temperature=0.2).eval()
    model.process_support_set(sx, sy)
    with torch.no_grad():
        in_batch = model(qx).exp().numpy()
    memory = model.to_memory(sx, sy.numpy())
    res = model.query_memory(memory, qx, k=len(sx))
    assert res.classes.tolist() == list(range(6))
    assert abs(memory.temperature - 0.2) < 1e-6
    np.testing.assert_allclose(res.probs, in_batch, atol=1e-4)
    assert (res.tail_bound == 0).all()


def test_topk_training_path_has_the_dense_gradients():
    sx, sy, qx = episode(n_way=5, k_shot=4, n_query=3)
    target = torch.arange(5).repeat_interleave(3)
    weights = MatchingNetwork(temperature=0.2).state_dict()
    grads = []
    for topk in (None, len(sx)):
        model = MatchingNetwork(temperature=0.2)
        model.load_state_dict(weights)
        model.eval()  # batch-norm statistics fixed, so both paths see the same embeddings
        model.process_support_set(sx, sy)
        logp = model.forward_topk(qx, topk) if topk else model(qx)
        F.nll_loss(logp, target).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "log_temperature" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_topk_path_with_small_k_still_trains():
    sx, sy, qx = episode(n_way=5, k_shot=4, n_query=3)
    model = MatchingNetwork()
    model.process_support_set(sx, sy)
    logp = model.forward_topk(qx, 3)
    assert logp.shape == (15, 5)
    F.nll_loss(logp.clamp_min(-1e4), torch.arange(5).repeat_interleave(3)).backward()
    assert model.g_backbone.net[0][0].weight.grad is not None


def test_topk_path_with_the_estimated_tail_is_closer_to_dense_attention():
    """With the rest of each class estimated, a small top-k answers nearly as the dense
    softmax does; without it, top-k probabilities are renormalised over k slots."""
    sx, sy, qx = episode(n_way=5, k_shot=20, n_query=6)
    torch.manual_seed(0)
    model = MatchingNetwork(temperature=0.5).eval()
    model.process_support_set(sx, sy)
    target = torch.arange(5).repeat_interleave(6)
    dense = model(qx).exp()
    plain = model.forward_topk(qx, 8).exp()
    logp = model.forward_topk(qx, 8, estimate_tail=True)
    tv = lambda p: 0.5 * (p - dense).abs().sum(dim=1).mean().item()  # noqa: E731
    assert tv(logp.exp()) < tv(plain) / 2, (tv(logp.exp()), tv(plain))
    torch.testing.assert_close(logp.exp().sum(dim=1), torch.ones(len(qx)))
    F.nll_loss(logp, target).backward()  # gradients reach both embeddings and T, all finite
    for p in (model.g_backbone.net[0][0].weight, model.log_temperature):
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_a_view_moves_every_image_by_its_map():
    """A one-pixel translation map equals rolling the pixels (away from the edges)."""
    from engine.data.augment import apply_view, view_maps

    x = torch.zeros(3, 1, 28, 28)
    x[:, 0, 10:14, 9:12] = 1.0
    x[1, 0, 18, 20] = 0.5
    theta = torch.tensor([[1.0, 0.0, 2.0 / 28], [0.0, 1.0, 0.0]])  # read one pixel to the right
    np.testing.assert_allclose(apply_view(x, theta).numpy(), np.roll(x.numpy(), -1, axis=3), atol=1e-6)
    maps = view_maps(5, shift=1.0, rotate=5.0, scale=0.05)
    assert maps.shape == (5, 2, 3) and torch.equal(maps[0], torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
    assert torch.equal(maps, view_maps(5, shift=1.0, rotate=5.0, scale=0.05))  # fixed, not drawn per call
    assert (maps[1:, :, 2].abs() <= 2.0 / 28 + 1e-7).all() and not torch.allclose(maps[1], maps[2])
    with pytest.raises(ValueError, match="views"):
        view_maps(0)


def test_test_time_views_average_the_backbone_over_fixed_moves():
    from engine.data.augment import apply_view, view_maps

    torch.manual_seed(0)
    model = MatchingNetwork(views=4)
    x = (torch.rand(6, 28, 28) < 0.2).float()
    with torch.no_grad():
        model.train()
        assert torch.equal(model.embed_support(x), model.g_backbone(x))  # training sees one view
        model.eval()
        together = model.embed_support(x)
        reference = torch.stack([model.g_backbone(apply_view(x.unsqueeze(1), m)) for m in view_maps(4)]).mean(0)
        np.testing.assert_allclose(together.numpy(), reference.numpy(), atol=1e-5)
        alone = torch.cat([model.embed_queries(x[i : i + 1]) for i in range(6)])  # h alike, batch or not
        np.testing.assert_allclose(alone.numpy(), together.numpy(), atol=1e-5)
        np.testing.assert_allclose(model.embed_support(x, batch_size=4).numpy(), together.numpy(), atol=1e-5)
        many = (torch.rand(70, 28, 28) < 0.2).float()  # 280 image views: the bulk, channels-last path
        np.testing.assert_allclose(model.embed_support(many).numpy(),
                                   torch.cat([model.embed_support(many[i : i + 1]) for i in range(70)]).numpy(),
                                   atol=1e-5)
    with_grad = model.embed_support(x)  # eval mode with gradients: the same answer, and they reach g
    np.testing.assert_allclose(with_grad.detach().numpy(), together.numpy(), atol=1e-5)
    with_grad.sum().backward()
    assert model.g_backbone.net[0][0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        model.views = 1
        np.testing.assert_allclose(model.embed_support(x).numpy(), model.g_backbone(x).numpy(), atol=1e-5)
    model.views = 3
    assert MatchingNetwork.from_config(model.config()).views == 3
    assert MatchingNetwork.from_config({k: v for k, v in model.config().items() if k != "views"}).views == 1
    for bad in (0, -2, 1.5, True, "4"):
        with pytest.raises(ValueError, match="views"):
            model.views = bad
    assert model.views == 3


def test_backbone_runs_channels_last_with_the_default_layouts_answers():
    """The backbone keeps its weights channels-last; its embeddings (and their gradients) are the
    ones the default layout gives, and a checkpoint written in the default layout loads unchanged."""
    torch.manual_seed(0)
    net = ConvEmbedding()
    conv = net.net[1][0].weight  # 64 -> 64 channels (with one input channel both layouts are one)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x = (torch.rand(9, 1, 28, 28) < 0.2).float()
    reference = copy.deepcopy(net).to(memory_format=torch.contiguous_format)
    for mode in ("train", "eval"):
        getattr(net, mode)(), getattr(reference, mode)()
        ours, theirs = net(x), reference.net(x.contiguous()).flatten(1)  # reference: no layout change at all
        np.testing.assert_allclose(ours.detach().numpy(), theirs.detach().numpy(), rtol=1e-4, atol=1e-5)
    ours.sum().backward(), theirs.sum().backward()
    np.testing.assert_allclose(conv.grad.numpy(), reference.net[1][0].weight.grad.numpy(), rtol=1e-4, atol=1e-5)
    old = {k: v.contiguous() for k, v in reference.state_dict().items()}  # a checkpoint from before
    loaded = ConvEmbedding()
    loaded.load_state_dict(old)
    loaded.eval()
    assert loaded.net[1][0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x[:, 0]).numpy(), theirs.detach().numpy(), rtol=1e-4, atol=1e-5)


def test_an_ensemble_attends_by_the_mean_of_its_members_logits():
    """Reference: each member's cosine logits computed by hand (its own views and temperature),
    averaged, then a softmax summed per class."""
    from engine.nn import ensemble

    torch.manual_seed(0)
    a, b = MatchingNetwork(temperature=0.1), MatchingNetwork(temperature=0.3, width=32)
    a.views = 3
    x, q, y = torch.rand(10, 1, 28, 28), torch.rand(4, 1, 28, 28), torch.arange(10) % 5
    logits = []
    with torch.no_grad():
        for m in (a, b):
            g = torch.nn.functional.normalize(m.backbone_features(x)[0].double(), dim=1)
            h = torch.nn.functional.normalize(m.backbone_features(q)[1].double(), dim=1)
            logits.append(h @ g.T / m.temperature.double())
        att = torch.softmax((logits[0] + logits[1]) / 2, dim=1)
        want = torch.stack([att[:, y == c].sum(1) for c in range(5)], 1)
        both = ensemble([a, b])
        both.process_support_set(x, y)
        got = both(q).exp()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    memory = both.to_memory(x, y.tolist())  # and through a memory, as eval_oneshot answers
    np.testing.assert_allclose(both.query_memory(memory, q, k=10).probs, want.numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="FCE"):
        ensemble([MatchingNetwork(fce=True)])
