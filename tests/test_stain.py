"""Macenko fit, template choice and the differentiable normaliser."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import MACENKO
from histodistill import stain

H = np.array([0.65, 0.70, 0.29])
E = np.array([0.20, 0.85, 0.48])
H, E = H / np.linalg.norm(H), E / np.linalg.norm(E)


def synthesise(h: np.ndarray, e: np.ndarray, seed: int = 0, size: int = 96, scale=(1.0, 1.0),
               io: float = 240.0) -> np.ndarray:
    """RGB uint8 image from known stain vectors: nuclei (mostly H), stroma (mostly E), glass."""
    rng = np.random.default_rng(seed)
    ch = rng.gamma(2.0, 0.35, (size, size)) * (rng.random((size, size)) < 0.35)
    ce = rng.gamma(3.0, 0.2, (size, size)) * (rng.random((size, size)) < 0.8)
    od = scale[0] * ch[..., None] * h + scale[1] * ce[..., None] * e
    return np.clip(io * np.exp(-od) - 1, 0, 255).round().astype(np.uint8)


def angle(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.degrees(np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1, 1))))


def test_known_stain_vectors_are_recovered_within_5_degrees():
    template = stain.fit(synthesise(H, E), **MACENKO)
    assert angle(template.stain_matrix[0], H) < 5
    assert angle(template.stain_matrix[1], E) < 5


def test_normaliser_returns_the_template_for_the_template():
    img = synthesise(H, E, seed=1)
    template = stain.fit(img, **MACENKO)
    out = stain.normalise(img.transpose(2, 0, 1)[None].copy(), template)[0].transpose(1, 2, 0)
    assert np.abs(out.astype(float) - img).mean() < 1.0


def test_normaliser_maps_another_stain_onto_the_template():
    h2 = np.array([0.45, 0.80, 0.40])
    e2 = np.array([0.35, 0.80, 0.48])
    target = synthesise(H, E, seed=2)
    source = synthesise(h2 / np.linalg.norm(h2), e2 / np.linalg.norm(e2), seed=2, scale=(1.4, 0.6))
    out = stain.normalise(source.transpose(2, 0, 1)[None].copy(), stain.fit(target, **MACENKO))[0]
    out = out.transpose(1, 2, 0).astype(float)
    # same concentrations, re-stained with the template's stains: close to the target itself
    assert np.abs(out - target).mean() < 0.25 * np.abs(source.astype(float) - target).mean()


def test_close_to_reference_macenko_on_real_tissue(target_image, cmu_slide):
    torchstain = pytest.importorskip("torchstain")
    import openslide

    crop = np.asarray(openslide.OpenSlide(str(cmu_slide)).read_region((800, 1200), 0, (384, 384))
                      .convert("RGB"))
    ref_norm = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    ref_norm.fit(torch.from_numpy(target_image.copy()).permute(2, 0, 1).float())
    reference, _, _ = ref_norm.normalize(torch.from_numpy(crop.copy()).permute(2, 0, 1).float(),
                                         stains=False)
    template = stain.fit(target_image, **{**MACENKO, "ignore_clipped": False})  # the reference's percentile
    np.testing.assert_allclose(np.array(template.stain_matrix), ref_norm.HERef.T.numpy(), atol=2e-3)
    ours = stain.normalise(crop.transpose(2, 0, 1)[None].copy(), template)[0].transpose(1, 2, 0)
    diff = np.abs(ours.astype(float) - reference.numpy())
    assert diff.mean() < 1.5 and np.percentile(diff, 99) < 6
    assert np.abs(crop.astype(float) - reference.numpy()).mean() > 10  # normalising did change it


@pytest.mark.slow
def test_normaliser_passes_gradcheck():
    # Percentiles are differentiable away from ties, so jitter breaks the ties of uint8 pixels.
    img = synthesise(H, E, seed=4, size=12).transpose(2, 0, 1)[None] / 255.0
    jitter = np.random.default_rng(0).uniform(0, 2e-3, img.shape)
    template = stain.fit(synthesise(H, E, seed=5), **MACENKO)
    norm = stain.MacenkoNormaliser(template)
    x = torch.from_numpy(img * 0.9 + 0.03 + jitter).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: norm(t), (x,), eps=1e-6, atol=1e-4, rtol=1e-3)


def test_gradient_reaches_input_in_float32_batches():
    template = stain.fit(synthesise(H, E, seed=6), **MACENKO)
    x = torch.from_numpy(np.stack([synthesise(H, E, seed=s, size=32) for s in range(3)])
                         .transpose(0, 3, 1, 2) / 255.0).float().requires_grad_(True)
    out = stain.MacenkoNormaliser(template)(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_blank_images_pass_through_unchanged():
    template = stain.fit(synthesise(H, E), **MACENKO)
    blank = torch.full((2, 3, 16, 16), 0.93)
    blank[1, :, :4, :4] = 0.2  # a few stained pixels are not enough to fit stains
    out = stain.MacenkoNormaliser(template)(blank)
    assert torch.equal(out, blank)


def test_fit_rejects_a_blank_image():
    with pytest.raises(ValueError, match="too few stained pixels"):
        stain.fit(np.full((32, 32, 3), 235, np.uint8), **MACENKO)


def test_template_is_the_patch_closest_to_dataset_statistics():
    rng = np.random.default_rng(0)
    base = synthesise(H, E, seed=7, size=32).transpose(2, 0, 1).astype(int)
    patches = np.stack([np.clip(base + d, 0, 255) for d in (-40, -20, 0, 25, 35)]).astype(np.uint8)
    patches = patches[rng.permutation(5)]
    template, stats = stain.choose_template(lambda idx: patches[idx], np.arange(5), **MACENKO)
    # the dataset mean sits nearest the unshifted patch
    assert np.abs(patches[template.index].astype(int) - base).max() == 0
    assert len(stats["dataset_mean"]) == 3


def test_blank_candidates_are_passed_over():
    good = synthesise(H, E, seed=8, size=32).transpose(2, 0, 1)
    blank = np.full_like(good, 236)
    patches = np.stack([blank, blank, blank, good])
    template, _ = stain.choose_template(lambda idx: patches[idx], np.arange(4), **MACENKO)
    assert template.index == 3


def test_template_json_round_trip(tmp_path):
    template = stain.fit(synthesise(H, E), **MACENKO)
    template.index, template.slide = 7, "tumor_001"
    template.save(tmp_path / "t.json", split="train")
    loaded = stain.StainTemplate.load(tmp_path / "t.json")
    assert loaded.stain_matrix == template.stain_matrix and loaded.index == 7


def test_saturated_pixels_do_not_set_the_concentration_percentile():
    """A set with a few percent of pixels clipped to 0 or 255 (what an image optimiser leaves
    at its bounds) is normalised as it would be without them: the 99th percentile of the
    concentrations is taken over unclipped pixels only."""
    img = synthesise(H, E, seed=3)
    template = stain.fit(synthesise(H, E, seed=4), **MACENKO)
    clean = stain.normalise(img.transpose(2, 0, 1)[None].copy(), template)[0]
    rng = np.random.default_rng(0)
    damaged = img.copy()
    hit = rng.random(img.shape[:2]) < 0.04
    damaged[hit] = np.where(rng.random((int(hit.sum()), 1)) < 0.5, 0, 255)  # black or white
    out = stain.normalise(damaged.transpose(2, 0, 1)[None].copy(), template)[0]
    kept = ~hit
    diff = np.abs(out.astype(float) - clean.astype(float)).transpose(1, 2, 0)[kept].mean()
    assert diff < 1.0
    # the fitted template ignores them too
    fitted = stain.fit(damaged, **MACENKO)
    reference = stain.fit(img, **MACENKO)
    assert np.allclose(fitted.max_concentrations, reference.max_concentrations, rtol=0.1)
    x = torch.from_numpy(damaged).permute(2, 0, 1)[None].double() / 255
    conc = torch.arange(x[0, 0].numel(), dtype=torch.float64).repeat(1, 2, 1)
    expected = torch.quantile(conc[..., torch.from_numpy(~hit.reshape(-1))], 0.99, dim=-1)
    assert torch.allclose(stain.max_concentrations(conc, x, ignore_clipped=True), expected)
    # the reference's percentile (every pixel) is what the saturated pixels wash out
    plain = stain.fit(damaged, **{**MACENKO, "ignore_clipped": False})
    assert not np.allclose(plain.max_concentrations, reference.max_concentrations, rtol=0.1)
