"""Generator stages: noise schedules and DDIM against closed forms, U-ViT shapes, classifier
guidance, bit-exact resume, decoder-only fine-tuning, the synthetic store and quality metrics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_toy_store
from histodistill import config
from histodistill.data.store import PatchStore
from histodistill.generate.autoencoder import AutoencoderKL, AutoencoderLoss, Perceptual
from histodistill.generate.diffusion import Schedule, cfg_eps
from histodistill.generate.histodiffusion import (LatentClassifier, finetune_decoder,
                                                  guidance_grad, train_latent_classifier)
from histodistill.generate.quality import frechet_distance, generator_quality, precision_recall, store_outputs
from histodistill.generate.autoencoder import load_autoencoder, train_autoencoder
from histodistill.generate.generator import train_generator
from histodistill.generate.sample import sample_synthetic
from histodistill.generate.uvit import UViT, build
from histodistill.io import InputError
from histodistill.state import load_state

AE = {**config.defaults("generate.autoencoder"), "ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1,
      "z_channels": 3, "downsample": 2, "lr": 1e-3, "batch": 8, "steps": 4, "kl_weight": 1e-6,
      "disc_weight": 0.5, "disc_start": 2, "disc_layers": 1, "scale_batches": 2}
GEN = {**config.defaults("generate.generator"), "preset": "tiny", "dim": 32, "depth": 2, "heads": 2,
       "patch_size": 2, "steps": 6, "batch": 8, "lr": 1e-3, "weight_decay": 0.03, "betas": [0.99, 0.99],
       "warmup": 2, "ema": 0.9, "label_dropout": 0.5,
       "schedule": {**config.defaults("generate.generator.schedule"), "kind": "linear", "timesteps": 1000}}
CLF = {**config.defaults("generate.latent_classifier"), "ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1,
       "heads": 2, "steps": 4, "batch": 8, "lr": 1e-3, "weight_decay": 0.05}
FT = {**config.defaults("generate.finetune"), "steps": 3, "batch": 8, "lr": 1e-3, "lambda_ce": 0.1,
      "aux": {"net": "convnet", "net_kwargs": {"width": 8, "depth": 2}, "steps": 2, "lr": 0.01}}
LINEAR = {"timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012}  # LDM's and U-ViT's
COSINE = {"timesteps": 1000, "s": 0.008}  # Nichol & Dhariwal's
UVIT = {"mlp_ratio": 4.0, "grad_checkpoint": False}  # U-ViT's
# a training's operational settings: no checkpoint written, the toy store held whole
RUN = {"checkpoint_every": 1000, "cache_mb": 64, "progress": False}


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A toy 16 px store, a briefly trained autoencoder (f2: 8 x 8 x 3 latents), both U-ViTs,
    the latent classifier and the fine-tuned decoder."""
    tmp = tmp_path_factory.mktemp("gen")
    files = {"store": make_toy_store(tmp / "toy.zarr")}
    files["autoencoder"] = tmp / "ae.pt"
    train_autoencoder(files["store"], files["autoencoder"], AE, seed=0, **RUN)
    for mode in ("cond", "uncond"):
        files[mode] = tmp / f"uvit_{mode}.pt"
        train_generator(files["store"], files["autoencoder"], files[mode], cfg=GEN, mode=mode, seed=0,
                        **RUN)
    files["classifier"] = tmp / "clf.pt"
    train_latent_classifier(files["store"], files["autoencoder"], files["classifier"], cfg=CLF,
                            schedule_cfg=GEN["schedule"], seed=0, **RUN)
    files["decoder"] = tmp / "dec.pt"
    finetune_decoder(files["store"], files["autoencoder"], files["decoder"], cfg=FT, seed=0, **RUN)
    return files


# ---- schedule and sampler against closed forms ------------------------------------------------
def test_linear_schedule_closed_form() -> None:
    s = Schedule.linear(timesteps=1000, beta_start=0.00085, beta_end=0.012)
    t = torch.arange(1000, dtype=torch.float64)
    expected = (0.00085 ** 0.5 + t / 999 * (0.012 ** 0.5 - 0.00085 ** 0.5)) ** 2
    assert torch.allclose(s.betas, expected, rtol=0, atol=1e-15)
    assert s.betas[0].item() == pytest.approx(0.00085) and s.betas[-1].item() == pytest.approx(0.012)
    abar = s.alphas_cumprod
    assert abar[0].item() == pytest.approx(1 - 0.00085)
    assert abar[499].item() == pytest.approx(float(np.prod(1 - expected[:500].numpy())), rel=1e-12)
    assert abar[-1].item() == pytest.approx(0.0047, abs=2e-4)  # Stable Diffusion's final abar


def test_cosine_schedule_closed_form() -> None:
    s = Schedule.cosine(timesteps=1000, s=0.008)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):
        assert s.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert s.betas.max().item() <= 0.999


def test_q_sample_and_one_ddim_step_match_closed_form() -> None:
    s = Schedule.linear(**LINEAR)
    z0, noise = torch.full((1, 1, 2, 2), 0.7), torch.full((1, 1, 2, 2), -0.4)
    a = float(s.alphas_cumprod[300])
    z_t = s.q_sample(z0, torch.tensor([300]), noise)
    assert torch.allclose(z_t, math.sqrt(a) * z0 + math.sqrt(1 - a) * noise)
    eps, extra = torch.full_like(z0, 0.25), torch.full_like(z0, 1.5)
    a_t, a_p = float(s.alphas_cumprod[300]), float(s.alphas_cumprod[250])
    x0 = (z_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    z_prev, pred = s.ddim_step(z_t, eps, 300, 250, 0.0, None)  # deterministic DDIM, eq. 12
    assert torch.allclose(pred, x0)
    assert torch.allclose(z_prev, math.sqrt(a_p) * x0 + math.sqrt(1 - a_p) * eps)
    sigma = math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))  # eta = 1
    z_prev, _ = s.ddim_step(z_t, eps, 300, 250, 1.0, extra)
    want = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - sigma ** 2) * eps + sigma * extra
    assert torch.allclose(z_prev, want)
    # eta 1 over one step is DDPM's posterior variance beta_t (1 - abar_{t-1}) / (1 - abar_t)
    a_p1 = float(s.alphas_cumprod[299])
    ddpm_var = float(s.betas[300]) * (1 - a_p1) / (1 - a_t)
    assert (1 - a_p1) / (1 - a_t) * (1 - a_t / a_p1) == pytest.approx(ddpm_var, rel=1e-9)
    # the last step goes to the clean latent
    z_last, pred = s.ddim_step(z_t, eps, 300, -1, 0.0, None)
    assert torch.allclose(z_last, pred)


def test_ddim_with_the_exact_noise_of_a_point_mass_returns_it() -> None:
    """For data concentrated at mu the optimal eps is (z_t - sqrt(abar) mu) / sqrt(1 - abar);
    DDIM (eta 0 and 1) must land on mu from any noise."""
    s = Schedule.cosine(**COSINE)
    mu = torch.tensor([0.5, -1.0, 2.0]).reshape(1, 3, 1, 1)

    def eps(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = s.abar(t, z)
        return (z - a.sqrt() * mu) / (1 - a).sqrt()

    for eta in (0.0, 1.0):
        out = s.sample(eps, (4, 3, 1, 1), 20, eta, torch.Generator().manual_seed(0), torch.device("cpu"))
        assert torch.allclose(out, mu.expand(4, 3, 1, 1), atol=1e-5)
    assert s.ddim_timesteps(4) == [750, 500, 250, 0]
    with pytest.raises(ValueError, match="DDIM steps"):
        s.ddim_timesteps(0)


# ---- U-ViT --------------------------------------------------------------------------------
@pytest.mark.parametrize("size,patch", [(4, 1), (7, 1), (8, 2), (16, 4)])
def test_uvit_maps_shapes_with_labels_and_null(size: int, patch: int) -> None:
    torch.manual_seed(0)
    net = UViT(3, size, patch_size=patch, dim=32, depth=4, heads=4, **UVIT, num_classes=3).eval()
    z, t = torch.randn(5, 3, size, size), torch.randint(1000, (5,))
    y = torch.tensor([0, 1, 2, 3, 1])  # 3 is the null label
    out = net(z, t, y)
    assert out.shape == z.shape
    assert net.null_label == 3 and net.pos_embed.shape[1] == 2 + (size // patch) ** 2
    assert len(net.in_blocks) == len(net.out_blocks) == 2
    assert all(b.skip_linear is not None for b in net.out_blocks)
    with torch.no_grad():  # labels and time are tokens: they change the prediction
        assert not torch.allclose(net(z, t, torch.zeros_like(y)), net(z, t, torch.full_like(y, 3)))
        assert not torch.allclose(net(z, t, y), net(z, t + 1, y))
    uncond = UViT(3, size, patch_size=patch, dim=32, depth=4, heads=4, **UVIT).eval()
    assert uncond(z, t).shape == z.shape and uncond.pos_embed.shape[1] == 1 + (size // patch) ** 2
    with pytest.raises(ValueError, match="no class labels"):
        uncond(z, t, y)


def test_uvit_rejects_bad_geometry_and_builds_presets() -> None:
    with pytest.raises(ValueError, match="patch size"):
        UViT(3, 7, patch_size=2, dim=32, depth=4, heads=4, **UVIT)
    with pytest.raises(ValueError, match="even"):
        UViT(3, 8, patch_size=2, dim=32, depth=3, heads=4, **UVIT)
    net = build({**config.defaults("generate.generator"), "preset": "small", "patch_size": 2}, 4, 8, 10)
    assert net.dim == 512 and len(net.in_blocks) == 6  # U-ViT-S: 13 blocks of width 512
    with pytest.raises(ValueError, match="preset"):
        build({**config.defaults("generate.generator"), "preset": "huge"}, 4, 8, 10)


def test_cfg_eps_combines_conditional_and_null_predictions() -> None:
    calls = []

    def net(z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(y.clone())
        return y.float().reshape(-1, 1, 1, 1).expand_as(z)  # eps = label value

    z, t, y = torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), torch.tensor([1, 2])
    out = cfg_eps(net, y, 9, 0.4)(z, t)
    assert torch.allclose(out[:, 0, 0, 0], 1.4 * y.float() - 0.4 * 9)  # (1 + s) c - s u
    assert calls[-1].tolist() == [1, 2, 9, 9]
    assert torch.equal(cfg_eps(net, y, 9, 0.0)(z, t)[:, 0, 0, 0], y.float())


# ---- autoencoder --------------------------------------------------------------------------
@pytest.mark.parametrize("size,mult", [(28, [1, 2, 4]), (32, [1, 2, 4, 4]), (16, [1, 2])])
def test_autoencoder_shapes_and_kl(size: int, mult: list[int]) -> None:
    ae = AutoencoderKL(size, ch=8, ch_mult=mult, num_res_blocks=1, z_channels=3)
    x = torch.rand(2, 3, size, size) * 2 - 1
    post = ae.encode(x)
    down = 2 ** (len(mult) - 1)
    assert post.mean.shape == (2, 3, ae.latent_size, ae.latent_size)
    assert ae.latent_size == math.ceil(size / down)
    assert ae.decode(post.sample(torch.Generator().manual_seed(0))).shape == x.shape
    from histodistill.generate.autoencoder import DiagonalGaussian

    unit = DiagonalGaussian(torch.zeros(2, 6, 4, 4))  # mean 0, log-variance 0
    assert torch.equal(unit.kl(), torch.zeros(2))  # N(0, 1) has no KL to N(0, 1)
    shifted = DiagonalGaussian(torch.cat([torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)], 1))
    assert torch.allclose(shifted.kl(), torch.full((2,), 0.5 * 48))  # mu^2 / 2 per element


@pytest.mark.slow
def test_perceptual_loads_local_weights_only(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    features = torchvision.models.vgg16(weights=None).features[:30]
    path = tmp_path / "vgg.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    perc = Perceptual(path)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(perc(x, x), torch.zeros(2, 1, 1, 1), atol=1e-6)
    assert (perc(x, x.flip(-1)) > 0).all()
    (tmp_path / "bad.pth").write_text("not weights")
    with pytest.raises(InputError, match="perceptual.vgg"):
        Perceptual(tmp_path / "bad.pth")
    settings = config.defaults("generate.autoencoder")
    loss = AutoencoderLoss({**settings, "perceptual": {**settings["perceptual"], "vgg": str(path)},
                            "disc_weight": 0})
    assert loss.perceptual is not None and loss.discriminator is None
    assert AutoencoderLoss({**settings, "disc_weight": 0}).perceptual is None  # off without a file


# ---- guidance -----------------------------------------------------------------------------
@pytest.mark.slow
def test_classifier_guidance_raises_the_guided_class_probability() -> None:
    """A latent classifier trained to tell latents of mean -1 from mean +1 at every noise
    level; DDIM from the same noise, guided to each class, ends with a higher probability of
    the guided class than unguided sampling."""
    s = Schedule.linear(**LINEAR)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    clf = LatentClassifier(3, 4, 2, ch=8, ch_mult=[1, 2], num_res_blocks=1, heads=2)
    opt = torch.optim.Adam(clf.parameters(), 3e-3)
    for _ in range(60):
        y = torch.randint(2, (32,), generator=gen)
        z0 = (2.0 * y - 1).reshape(-1, 1, 1, 1) + 0.3 * torch.randn(32, 3, 4, 4, generator=gen)
        t = torch.randint(1000, (32,), generator=gen)
        z_t = s.q_sample(z0, t, torch.randn(z0.shape, generator=gen))
        loss = torch.nn.functional.cross_entropy(clf(z_t, t), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.eval().requires_grad_(False)
    net = UViT(3, 4, patch_size=2, dim=16, depth=2, heads=2, **UVIT).eval()  # an untrained noise predictor
    eps = lambda z, t: net(z, t)  # noqa: E731

    def prob(c: int, g: float) -> float:
        y = torch.full((16,), c)
        with torch.no_grad():
            z = s.sample(eps, (16, 3, 4, 4), 10, 0.0, torch.Generator().manual_seed(5),
                         torch.device("cpu"), guidance_grad(clf, y), g)
            return float(clf(z, torch.zeros(16, dtype=torch.long)).softmax(1)[:, c].mean())

    for c in (0, 1):
        assert prob(c, 1.0) > prob(c, 0.0) + 0.05
        assert prob(c, 4.0) > prob(c, 1.0)


# ---- trainings: resume and decoder-only fine-tuning ---------------------------------------
@pytest.mark.slow
def test_generator_resumed_ends_bit_identical(toy: dict[str, Path], tmp_path: Path) -> None:
    whole = train_generator(toy["store"], toy["autoencoder"], tmp_path / "a.pt", cfg=GEN, mode="cond",
                            seed=3, checkpoint=tmp_path / "a.ckpt", checkpoint_every=2, cache_mb=64,
                            progress=False)
    ckpt = tmp_path / "b.ckpt"
    part = train_generator(toy["store"], toy["autoencoder"], tmp_path / "b.pt", cfg=GEN, mode="cond",
                           seed=3, checkpoint=ckpt, checkpoint_every=100, cache_mb=64, stop_after=3,
                           progress=False)
    assert part.step == 3 and ckpt.exists() and not (tmp_path / "b.pt").exists()
    train_generator(toy["store"], toy["autoencoder"], tmp_path / "b.pt", cfg=GEN, mode="cond", seed=3,
                    checkpoint=ckpt, checkpoint_every=100, cache_mb=64, progress=False)
    assert not ckpt.exists()  # the output supersedes the checkpoint
    a, b = (load_state(tmp_path / f"{k}.pt") for k in "ab")
    assert a["ema"].keys() == b["ema"].keys()
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert a["history"] == b["history"]
    assert whole.step == GEN["steps"]
    # another seed ends elsewhere: the comparison could fail
    c = train_generator(toy["store"], toy["autoencoder"], tmp_path / "c.pt", cfg=GEN, mode="cond", seed=4,
                        **RUN)
    assert not all(torch.equal(c.ema["net"].state_dict()[k], a["ema"][k]) for k in a["ema"])


@pytest.mark.slow
def test_autoencoder_resume_with_discriminator_and_reservoir(toy: dict[str, Path],
                                                             tmp_path: Path) -> None:
    """With the discriminator on and the split streamed through a small reservoir."""
    cfg = {**AE, "steps": 5}
    whole = train_autoencoder(toy["store"], tmp_path / "a.pt", cfg, seed=1, checkpoint_every=1000,
                              cache_mb=0.005, progress=False)
    ckpt = tmp_path / "b.ckpt"
    train_autoencoder(toy["store"], tmp_path / "b.pt", cfg, seed=1, checkpoint=ckpt, checkpoint_every=1000,
                      cache_mb=0.005, stop_after=3, progress=False)
    resumed = train_autoencoder(toy["store"], tmp_path / "b.pt", cfg, seed=1, checkpoint=ckpt,
                                checkpoint_every=1000, cache_mb=0.005, progress=False)
    sa, sb = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_decoder_finetuning_changes_only_the_decoder(toy: dict[str, Path]) -> None:
    before = load_autoencoder(toy["autoencoder"], torch.device("cpu")).state_dict()
    after = finetune_decoder(toy["store"], toy["autoencoder"], toy["decoder"].with_name("d2.pt"),
                             cfg=FT, seed=0, **RUN).state_dict()
    decoder = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    others = [k for k in before if k not in decoder]
    assert decoder and others
    assert all(torch.equal(before[k], after[k]) for k in others)  # encoder, quant_conv, scale
    changed = [k for k in decoder if not torch.equal(before[k], after[k])]
    assert len(changed) > len(decoder) // 2
    saved = load_state(toy["decoder"].with_name("d2.pt"))
    assert sorted(saved["decoder"]) == sorted(decoder)


# ---- sampling into a store ----------------------------------------------------------------
SAMPLING = {"uvit": {"steps": 4, "eta": 0.0, "cfg_scale": 0.4},
            "histodiffusion": {"steps": 4, "eta": 1.0, "guidance_scale": 1.0}}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["uvit", "histodiffusion"])
def test_sample_synthetic_store_layout_and_resume(toy: dict[str, Path], tmp_path: Path,
                                                  name: str) -> None:
    files = {"autoencoder": toy["autoencoder"]}
    files.update({"uvit": toy["cond"]} if name == "uvit" else
                 {"uvit": toy["uncond"], "decoder": toy["decoder"], "classifier": toy["classifier"]})
    out = sample_synthetic(name, files, tmp_path / "a.zarr", cfg=SAMPLING[name], seed=0, per_class=5, batch=2,
                           progress=False)
    store = PatchStore(out)
    assert len(store) == 10 and store.class_names == ["dark", "bright"]
    assert store.array("label").tolist() == [0] * 5 + [1] * 5
    assert (store.array("split") == 0).all() and store.patches().dtype == np.uint8
    assert store.attrs["generator"] == name and store.attrs["sampling"] == SAMPLING[name]
    assert len(store.attrs["channel_mean"]) == 3 and store.attrs["patch_size"] == 16
    # interrupted after two batches (one class done but one row), resumed: the same store
    b = tmp_path / "b.zarr"
    assert sample_synthetic(name, files, b, cfg=SAMPLING[name], seed=0, per_class=5, batch=2, stop_after=2,
                            progress=False) is None
    assert not b.exists() and (tmp_path / "b.zarr.partial").exists()
    sample_synthetic(name, files, b, cfg=SAMPLING[name], seed=0, per_class=5, batch=2, progress=False)
    assert np.array_equal(PatchStore(b).patches(), store.patches())
    # a finished batch damaged (a chunk of the partial store lost), or the metadata: redone
    for damage in ("chunk", "metadata"):
        d = tmp_path / f"d_{damage}.zarr"
        sample_synthetic(name, files, d, cfg=SAMPLING[name], seed=0, per_class=5, batch=2, stop_after=2, progress=False)
        partial = tmp_path / f"d_{damage}.zarr.partial"
        if damage == "chunk":
            next(p for p in sorted((partial / "patches").rglob("*"))
                 if p.is_file() and p.name != "zarr.json").unlink()
        else:
            (partial / "zarr.json").write_text("{")
        sample_synthetic(name, files, d, cfg=SAMPLING[name], seed=0, per_class=5, batch=2, progress=False)
        assert np.array_equal(PatchStore(d).patches(), store.patches()), damage
    other = sample_synthetic(name, files, tmp_path / "c.zarr", cfg=SAMPLING[name], seed=1, per_class=5, batch=2,
                             progress=False)
    assert not np.array_equal(PatchStore(other).patches(), store.patches())


# ---- quality ------------------------------------------------------------------------------
def test_frechet_distance_known_answers() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, -2.0, 0.5, 0.0])
    assert frechet_distance(a, a + shift) == pytest.approx(float((shift ** 2).sum()), rel=1e-6)
    # scaling by 2: trace term tr(S + 4S - 2 * 2S) = tr(S)
    assert frechet_distance(a, 2 * a) == pytest.approx(
        float(((a.mean(0)) ** 2).sum() + np.trace(np.cov(a, rowvar=False))), rel=1e-6)


def test_precision_recall_of_covering_and_collapsed_sets() -> None:
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 8))
    assert precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
    p, r = precision_recall(real, real + 100.0, k=3)
    assert p == 0.0 and r == 0.0
    collapsed = np.repeat(real[:5], 10, 0) + 1e-3 * rng.normal(size=(50, 8))  # mode collapse
    p, r = precision_recall(real, collapsed, k=3)
    assert p == 1.0 and r == pytest.approx(5 / 400)
    with pytest.raises(ValueError, match="k=3"):
        precision_recall(real[:3], real, k=3)


def test_class_agreement_sees_a_generator_that_ignores_its_label(tmp_path: Path) -> None:
    """A classifier that separates the toy classes agrees with every label; one that says "dark"
    for everything (as a conditional generator that ignores its label looks to a good
    classifier) agrees with exactly the dark rows, and the quality file reports it per class."""
    store = make_toy_store(tmp_path / "toy.zarr")

    def by_brightness(x: torch.Tensor) -> torch.Tensor:
        bright = (x.float().mean((1, 2, 3)) > 130).long()
        return torch.nn.functional.one_hot(bright, 2).float()

    def always_dark(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 2).float()

    labels = PatchStore(store).array("label")[PatchStore(store).indices("train")]
    (right, dark), y = store_outputs([by_brightness, always_dark], PatchStore(store), "train", 7)
    np.testing.assert_array_equal(y, labels)  # one pass, in store order, over batches of 7
    assert (right.argmax(1) == y).all()
    np.testing.assert_array_equal(dark.argmax(1) == y, labels == 0)

    def embed(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)

    cfg = {**config.defaults("generate.quality"), "seed": 0, "k": 3, "max_real": 0, "grid_per_class": 2}
    out = generator_quality(store, store, embed, cfg=cfg, out=tmp_path / "q.json", grid=tmp_path / "q.png",
                            encoder_name="toy", classify=always_dark)
    assert out["class_agreement"] == pytest.approx(0.5) and out["real_agreement"] == pytest.approx(0.5)
    assert out["class_agreement_per_class"] == {"dark": 1.0, "bright": 0.0}
    assert out["fid_in_domain"] == pytest.approx(0.0, abs=1e-6) and out["precision"] == 1.0
    assert "class_agreement" not in generator_quality(store, store, embed, cfg=cfg, out=tmp_path / "u.json",
                                                      grid=tmp_path / "u.png", encoder_name="toy")


# ---- bad input ----------------------------------------------------------------------------
def test_pooled_stores_must_share_the_patch_size(tmp_path: Path) -> None:
    from histodistill.generate.data import PatchSource, pooled, sources

    a = make_toy_store(tmp_path / "a.zarr", size=16)
    b = make_toy_store(tmp_path / "b.zarr", size=8)
    with pytest.raises(InputError, match=r"\[train_autoencoder\].*b\.zarr.*patch size 8"):
        PatchSource(sources(a, pooled([b])), 16, 0, torch.device("cpu"), "train_autoencoder")
    with pytest.raises(InputError, match="unknown split 'training'"):
        PatchSource([(str(a), ["training"])], 16, 0, torch.device("cpu"), "train_generator")
    # a pooled store contributes every split: the toy store's 16 test rows too
    src = PatchSource(sources(a, pooled([make_toy_store(tmp_path / "c.zarr")])), 16, 0,
                      torch.device("cpu"), "train_autoencoder")
    assert len(src.samplers) == 3 and src.weights.tolist() == pytest.approx([48 / 112, 48 / 112, 16 / 112])
    x, y = src.batch(10)
    assert x.shape == (10, 3, 16, 16) and -1 <= float(x.min()) and float(x.max()) <= 1
