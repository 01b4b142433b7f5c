"""Differentiable augmentation: per-image vs siamese parameters, fills with the dataset mean,
Histo-DD's `all` preset, and what each op does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import MACENKO
from histodistill import config
from histodistill.augment import PRESETS, Augment, AugmentConfig
from histodistill.stain import fit

MEAN, STD = (0.7, 0.5, 0.6), (0.2, 0.25, 0.15)


def augment(**settings) -> AugmentConfig:
    """An ``augment`` section: the schema's defaults with ``settings``."""
    return AugmentConfig.from_config({**config.defaults("$defs/augment"), **settings})


def test_network_training_draws_parameters_per_image_and_matching_draws_once():
    aug = Augment(augment(preset="dsa", mode="all"), None, MEAN, STD)
    x = torch.zeros(6, 3, 16, 16)
    x[:, :, 4:12, 4:12] = 1.0
    out = aug(x, torch.Generator().manual_seed(0))  # training: each image its own draw
    assert len({tuple(o.flatten().tolist()) for o in out}) == 6
    params = aug.sample(torch.Generator().manual_seed(0))  # matching: one shared draw
    same = aug.apply(x, params)
    assert all(torch.equal(same[0], s) for s in same[1:])
    assert all(v.shape == (6,) for _, p in aug.sample(torch.Generator(), 6) for v in p.values())


def test_siamese_augmentation_is_identical_and_differentiable():
    aug = Augment(augment(preset="dsa", mode="all"))
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    params = aug.sample(torch.Generator().manual_seed(3))
    a, b = aug.apply(x, params), aug.apply(x.detach().clone(), params)
    torch.testing.assert_close(a, b)
    a.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert [op for op, _ in params] == ["color", "crop", "cutout", "flip", "scale", "rotate"]


@pytest.mark.parametrize("op,params", [
    ("crop", {"dx": torch.tensor([1.0]), "dy": torch.tensor([-1.0])}),
    ("cutout", {"cx": torch.tensor([0.5]), "cy": torch.tensor([0.5])}),
    ("scale", {"sx": torch.tensor([1.2]), "sy": torch.tensor([1.2])}),
    ("rotate", {"theta": torch.tensor([0.26])}),
])
def test_geometric_fills_are_the_dataset_mean(op, params):
    """Inputs are normalised, so the uncovered area is 0 there: the dataset mean in pixels,
    never black."""
    aug = Augment(augment(preset="none"), None, MEAN, STD)
    pixels = torch.zeros(1, 3, 16, 16)  # a black image: any filled pixel stands out
    x = (pixels - torch.tensor(MEAN).reshape(1, 3, 1, 1)) / torch.tensor(STD).reshape(1, 3, 1, 1)
    out = aug.apply(x, [(op, params)])
    back = out * torch.tensor(STD).reshape(1, 3, 1, 1) + torch.tensor(MEAN).reshape(1, 3, 1, 1)
    filled = (out.abs() < 1e-5).all(1)[0]  # positions equal to the mean in every channel
    assert filled.any()
    torch.testing.assert_close(back[0, :, filled].mean(1), torch.tensor(MEAN), atol=1e-5, rtol=0)


def test_crop_translates_by_whole_pixels():
    aug = Augment(augment(preset="none", crop=0.25))
    x = torch.arange(64.0).reshape(1, 1, 8, 8).expand(1, 3, 8, 8)
    out = aug.apply(x, [("crop", {"dx": torch.tensor([1.0]), "dy": torch.tensor([0.0])})])
    # dx = +1 of a 2 px range shifts the content 2 px to the left; the right edge is filled with 0
    torch.testing.assert_close(out[..., :6], x[..., 2:], atol=1e-4, rtol=0)
    assert out[..., 6:].abs().max() < 1e-4


def test_all_preset_is_histodd_table_2_and_applies_stain_on_every_call(target_image):
    cfg = augment(preset="all")
    assert cfg.ops == ["stain", "rotate", "flip", "scale"] and cfg.mode == "all"
    assert "color" not in cfg.ops  # colour jitter works against stain normalisation
    template = fit(target_image[:256, :256], **MACENKO)
    aug = Augment(cfg, template)
    gen = torch.Generator().manual_seed(0)
    assert all([op for op, _ in aug.sample(gen)][0] == "stain" for _ in range(20))


def test_dsa_preset_draws_one_op_per_call_like_dsa():
    aug = Augment(augment(preset="dsa"))
    gen = torch.Generator().manual_seed(0)
    drawn = [aug.sample(gen)[0][0] for _ in range(200)]
    assert set(drawn) == set(PRESETS["dsa"][0]) and all(len(aug.sample(gen)) == 1 for _ in range(5))


def test_augmentation_presets_and_errors():
    assert augment(preset="none").ops == []
    with pytest.raises(ValueError, match="unknown augmentation op"):
        augment(ops=["shear"])
    with pytest.raises(ValueError, match="unknown augmentation preset"):
        augment(preset="everything")
    with pytest.raises(ValueError, match="needs the dataset's stain template"):
        Augment(augment(preset="stain"))


def test_flip_and_rotate_do_what_they_say():
    aug = Augment(augment(preset="none"))
    x = torch.arange(16.0).reshape(1, 1, 4, 4).expand(2, 3, 4, 4)
    flipped = aug.apply(x, [("flip", {"flip": torch.tensor([1.0, 0.0])})])
    assert torch.equal(flipped[0], x[0].flip(2)) and torch.equal(flipped[1], x[1])
    rotated = aug.apply(x, [("rotate", {"theta": torch.tensor([np.pi / 2])})])
    # positive angles turn clockwise on screen (image y axis points down)
    torch.testing.assert_close(rotated, torch.rot90(x, -1, (2, 3)), atol=1e-4, rtol=0)


def test_stain_op_works_in_pixels_and_returns_normalised_inputs(target_image):
    template = fit(target_image[:256, :256], **MACENKO)
    aug = Augment(augment(ops=["stain"], mode="all"), template, MEAN, STD)
    pixels = torch.from_numpy(target_image[256:288, 256:288].copy()).permute(2, 0, 1)[None] / 255.0
    x = (pixels - torch.tensor(MEAN).reshape(1, 3, 1, 1)) / torch.tensor(STD).reshape(1, 3, 1, 1)
    out = aug.apply(x, aug.sample(torch.Generator()))
    expect = (aug.normaliser(pixels) - torch.tensor(MEAN).reshape(1, 3, 1, 1)) / torch.tensor(STD).reshape(1, 3, 1, 1)
    torch.testing.assert_close(out, expect.float(), atol=1e-5, rtol=0)
