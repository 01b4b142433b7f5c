"""Distillation methods: matching, model augmentation, siamese augmentation, resume, coresets."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from histodistill import models
from histodistill.augment import Augment, AugmentConfig
from histodistill.distill import METHODS, Context, build
from histodistill.distill.coreset import herding_order
from histodistill.distill.matching import match_loss, matched_params, model_augment

NET = {"width": 8, "norm": "none"}


def toy_data(n_per_class: int = 24, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes that differ in brightness and texture."""
    g = torch.Generator().manual_seed(seed)
    x0 = 0.35 + 0.1 * torch.rand(n_per_class, 3, size, size, generator=g)
    x1 = 0.6 + 0.3 * torch.rand(n_per_class, 3, size, size, generator=g)
    return torch.cat([x0, x1]), torch.arange(2).repeat_interleave(n_per_class)


def pool(seed: int = 0, size: int = 16, n: int = 2) -> dict:
    states = []
    for k in range(n):
        torch.manual_seed(seed + k)
        states.append(models.build("convnet", 2, size, **NET).state_dict())
    return {"net": "convnet", "net_kwargs": NET, "states": states}


def context(checkpoint=None, seed: int = 0) -> Context:
    x, y = toy_data()
    return Context(x, y, 2, seed, None, checkpoint, pool(), progress=False)


SETTINGS = {
    "histodd": {"outer_loop": 4, "inner_loop": 2, "lr_img": 0.01, "lr_net": 0.01, "alpha": 0.01,
                "batch_real": 8, "batch_net": 8, "augment": {"ops": ["flip", "rotate"]},
                "checkpoint_every": 1},
    "dc": {"net": "convnet", "net_kwargs": NET, "iterations": 3, "outer_loop": 2, "inner_loop": 2,
           "lr_img": 0.01, "lr_net": 0.01, "batch_real": 8, "checkpoint_every": 1},
    "dsa": {"net": "convnet", "net_kwargs": NET, "iterations": 3, "outer_loop": 2, "inner_loop": 2,
            "lr_img": 0.01, "lr_net": 0.01, "batch_real": 8, "augment": {"preset": "dsa"},
            "checkpoint_every": 1},
    "dm": {"net": "convnet", "net_kwargs": NET, "iterations": 4, "lr_img": 0.1, "batch_real": 8,
           "augment": {"preset": "dsa"}, "checkpoint_every": 1},
    "random": {},
    "herding": {"net": "convnet", "net_kwargs": NET, "train": {"epochs": 2, "batch": 16}},
    "forgetting": {"net": "convnet", "net_kwargs": NET, "train": {"epochs": 3, "batch": 16}},
}


def test_every_method_is_registered_and_configured_here():
    assert set(METHODS) == set(SETTINGS)


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_method_returns_ipc_images_per_class(method):
    ctx = context()
    images, labels = build(method, SETTINGS[method], 3, ctx).run()
    assert images.shape == (6, 3, 16, 16) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    if method in ("random", "herding", "forgetting"):  # coresets hold real patches of their class
        for img, lab in zip(images, labels):
            match = (ctx.x == img).flatten(1).all(1).nonzero().flatten()
            assert len(match) >= 1 and (ctx.y[match] == lab).all()


@pytest.mark.parametrize("distance", ["l1", "cos"])
def test_matching_distance_is_zero_for_identical_batches_and_images_move_to_reduce_it(distance):
    torch.manual_seed(0)
    net = models.build("convnet", 2, 16, width=8, norm="instancenorm")  # DC's network
    params = matched_params(net, distance, include_fc=True)
    x, y = toy_data(8)
    real, y_real = x[:8], y[:8]
    zero = match_loss(net, params, real, y_real, real.clone(), y_real, distance).item()
    assert zero == pytest.approx(0, abs=1e-4)
    syn = x[8:12].clone().requires_grad_(True)  # start from the other class's images
    y_syn = torch.zeros(4, dtype=torch.long)
    opt = torch.optim.Adam([syn], lr=0.003)
    losses = []
    for _ in range(30):
        loss = match_loss(net, params, real, y_real, syn, y_syn, distance)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_l1_matching_skips_biases_norms_and_head_unless_asked():
    net = models.build("convnet", 2, 16, width=8, norm="instancenorm")
    assert all(p.dim() == 4 for p in matched_params(net, "l1", include_fc=False))
    assert any(p.dim() == 2 for p in matched_params(net, "l1", include_fc=True))
    assert len(matched_params(net, "cos", True)) == len(list(net.parameters()))


def test_model_augmentation_gives_each_filter_a_perturbation_of_norm_alpha_w():
    torch.manual_seed(0)
    net = models.build("convnet", 2, 16, width=8, norm="instancenorm")
    before = copy.deepcopy(net.state_dict())
    model_augment(net, 0.05, torch.Generator().manual_seed(1))
    for name, after in net.state_dict().items():
        delta = after - before[name]
        if after.dim() >= 2:
            ratio = delta.flatten(1).norm(dim=1) / before[name].flatten(1).norm(dim=1)
            torch.testing.assert_close(ratio, torch.full_like(ratio, 0.05))
        else:
            assert torch.equal(delta, torch.zeros_like(delta))


def test_real_and_synthetic_batches_get_identical_augmentation(monkeypatch):
    calls = []
    real_apply = Augment.apply

    def spy(self, x, params):
        calls.append((x.shape[0], params))
        return real_apply(self, x, params)

    monkeypatch.setattr(Augment, "apply", spy)
    cfg = {**SETTINGS["histodd"], "outer_loop": 1, "inner_loop": 2, "batch_net": 5,
           "augment": {"preset": "dsa", "mode": "all"}}
    build("histodd", cfg, 3, context()).run()
    matches = [c for c in calls if c[0] in (8, 3)]  # (real batch, synthetic class) pairs
    pairs = list(zip(matches[::2], matches[1::2]))
    assert len(pairs) == 2 * 2  # inner loops x classes
    for (n_real, p_real), (n_syn, p_syn) in pairs:
        assert (n_real, n_syn) == (8, 3) and p_real is p_syn and len(p_real) == 6
    assert pairs[0][0][1] != pairs[1][0][1]  # fresh parameters for every match


@pytest.mark.parametrize("method", ["histodd", "dc", "dm"])
def test_interrupted_run_resumes_to_the_same_result(method, tmp_path):
    cfg = SETTINGS[method]
    reference, _ = build(method, cfg, 2, context()).run()
    ckpt = tmp_path / f"{method}.ckpt"
    partial, _ = build(method, cfg, 2, context(ckpt)).run(stop_after=2)
    assert ckpt.exists() and not torch.equal(partial, reference)
    resumed, _ = build(method, cfg, 2, context(ckpt)).run()
    torch.testing.assert_close(resumed, reference, rtol=0, atol=1e-6)


def test_checkpoint_from_other_settings_is_ignored(tmp_path):
    ckpt = tmp_path / "h.ckpt"
    build("histodd", SETTINGS["histodd"], 2, context(ckpt)).run(stop_after=1)
    other = {**SETTINGS["histodd"], "lr_img": 0.02}
    fresh, _ = build("histodd", other, 2, context()).run()
    resumed, _ = build("histodd", other, 2, context(ckpt)).run()
    torch.testing.assert_close(resumed, fresh, rtol=0, atol=1e-6)


def test_same_seed_same_result_other_seed_other_result():
    a, _ = build("dm", SETTINGS["dm"], 2, context(seed=0)).run()
    b, _ = build("dm", SETTINGS["dm"], 2, context(seed=0)).run()
    c, _ = build("dm", SETTINGS["dm"], 2, context(seed=1)).run()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_histodd_starts_from_the_random_coreset():
    ctx = context()
    start, _ = build("random", {}, 3, ctx).run()
    cfg = {**SETTINGS["histodd"], "lr_img": 0.0}
    images, _ = build("histodd", cfg, 3, ctx).run()
    torch.testing.assert_close(images, start)


def test_histodd_without_pool_and_too_few_patches_are_clear_errors():
    ctx = context()
    ctx.pool = {}
    with pytest.raises(ValueError, match="needs the pre-trained network pool"):
        build("histodd", SETTINGS["histodd"], 2, ctx).run()
    with pytest.raises(ValueError, match="fewer than ipc=100"):
        build("random", {}, 100, context())
    with pytest.raises(KeyError, match="unknown distillation method 'mtt'"):
        build("mtt", {}, 2, context())


def test_herding_known_answer():
    feats = torch.tensor([[0.0], [10.0], [4.0], [6.0], [5.2]])
    # the mean is 5.04: first the closest point, then the pair that keeps the mean closest
    assert herding_order(feats, 3) == [4, 2, 3]


def test_siamese_augmentation_is_identical_and_differentiable():
    aug = Augment(AugmentConfig.from_config({"preset": "dsa", "mode": "all"}))
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    params = aug.sample(torch.Generator().manual_seed(3))
    a, b = aug.apply(x, params), aug.apply(x.detach().clone(), params)
    torch.testing.assert_close(a, b)
    a.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert [op for op, _ in params] == ["color", "crop", "cutout", "flip", "scale", "rotate"]


def test_augmentation_presets_and_errors():
    assert AugmentConfig.from_config({"preset": "none"}).ops == []
    assert AugmentConfig.from_config({"preset": "all"}).ops[-1] == "stain"
    with pytest.raises(ValueError, match="unknown augmentation op"):
        AugmentConfig.from_config({"ops": ["shear"]})
    with pytest.raises(ValueError, match="needs the dataset's stain template"):
        Augment(AugmentConfig.from_config({"preset": "stain"}))


def test_flip_and_rotate_do_what_they_say():
    aug = Augment(AugmentConfig(ops=[]))
    x = torch.arange(16.0).reshape(1, 1, 4, 4).expand(1, 3, 4, 4)
    assert torch.equal(aug.apply(x, [("flip", {"flip": 1.0})]), x.flip(3))
    rotated = aug.apply(x, [("rotate", {"theta": np.pi / 2})])
    # positive angles turn clockwise on screen (image y axis points down)
    torch.testing.assert_close(rotated, torch.rot90(x, -1, (2, 3)), atol=1e-4, rtol=0)


def test_forgetting_keeps_the_most_forgotten(monkeypatch):
    import histodistill.distill.coreset as coreset

    ctx = context()
    flips = {0: [True, False, True, False], 5: [True, False, False, False], 30: [True, False, True, False]}

    def fake_train(net, x, y, cfg, gen, aug=None, on_epoch=None):
        for epoch in range(4):  # rows 0 and 30 are forgotten twice, row 5 once, others never
            correct = torch.ones(len(x), dtype=torch.bool)
            for row, pattern in flips.items():
                correct[row] = pattern[epoch]
            on_epoch(epoch, correct)
        return [0.0] * 4

    monkeypatch.setattr(coreset, "train", fake_train)
    images, _ = build("forgetting", SETTINGS["forgetting"], 2, ctx).run()
    torch.testing.assert_close(images[0], ctx.x[0])  # class 0: row 0 (two events) first
    torch.testing.assert_close(images[1], ctx.x[5])  # then row 5 (one event)
    torch.testing.assert_close(images[2], ctx.x[30])  # class 1 (rows 24-47): row 30
