"""GLaD and SLFD: the low-rank normal over logits, the stochastic loss against cross-entropy, what
latent distillation optimises, its start from encoded real patches, and resume."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import AUGMENT, make_toy_store, method_settings
from histodistill import config
from histodistill.data.real import RealData
from histodistill.data.store import PatchStore
from histodistill.distill import Context, build
from histodistill.distill.slfd import StochasticHead, stochastic_cross_entropy
from histodistill.generate.autoencoder import load_autoencoder, train_autoencoder

AE = {**config.defaults("generate.autoencoder"), "ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1,
      "z_channels": 3, "downsample": 2, "lr": 1e-3, "batch": 8, "steps": 3, "kl_weight": 1e-6,
      "disc_weight": 0.0, "disc_start": 10, "disc_layers": 1, "scale_batches": 2}
TINY = {"net": "convnet", "net_kwargs": {"width": 8, "depth": 2}, "iterations": 3,
        "outer_loop": 1, "inner_loop": 1, "lr_latent": 1.0, "unit_grad": False, "lr_net": 0.01,
        "batch_real": 8, "augment": {**AUGMENT, "preset": "dsa"}, "checkpoint_every": 1}
GLAD = method_settings("glad", **TINY)
SLFD = method_settings("slfd", **TINY, rank=2, mc_samples=4, lr_module=0.1, init_var=0.01, min_var=1e-4,
                       max_var=1.0, learn_shift=True)


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("latent")
    store = make_toy_store(tmp / "toy.zarr", n_per_class=12, size=16)
    train_autoencoder(store, tmp / "ae.pt", AE, seed=0, checkpoint_every=1000, cache_mb=64, progress=False)
    return {"store": store, "ae": tmp / "ae.pt", "tmp": tmp}


def distiller(toy: dict[str, Path], method: str, cfg: dict, checkpoint: Path | None = None):  # noqa: ANN201
    real = RealData(PatchStore(toy["store"]), "train", 64, 0, torch.device("cpu"))
    ctx = Context(real, 0, None, checkpoint, {}, False, "toy", autoencoder=toy["ae"])
    return build(method, copy.deepcopy(cfg), 2, ctx)


def test_low_rank_normal_covariance_is_diag_plus_factor_factor_t() -> None:
    torch.manual_seed(0)
    head = StochasticHead(dim=5, classes=3, rank=2, init_var=0.01, min_var=1e-4, max_var=1.0)
    for layer in (head.mean, head.log_diag, head.factor):
        torch.nn.init.normal_(layer.weight, std=0.3)
    f, logits = torch.randn(4, 5), torch.randn(4, 3)
    dist = head(f, logits)
    factor = torch.tanh(head.factor(f)).view(4, 3, 2) * (head.max_var / 2) ** 0.5
    diag = head.min_var + (head.max_var - head.min_var) * torch.sigmoid(head.log_diag(f))
    expected = (torch.diag_embed(diag) + factor @ factor.transpose(1, 2)).detach().double()
    assert torch.allclose(dist.covariance_matrix, expected, atol=1e-6)
    assert torch.allclose(dist.loc, (logits + head.mean(f)).double())
    # and the samples the loss uses have that covariance
    samples = dist.rsample((40000,))
    centred = samples - samples.mean(0)
    empirical = torch.einsum("mbi,mbj->bij", centred, centred) / (len(samples) - 1)
    assert torch.allclose(empirical, expected, atol=0.05 * float(expected.abs().max()))


def test_the_variance_is_bounded_and_the_rank_at_most_the_classes() -> None:
    """Whatever the module's weights (the old module's capacitance entries passed 1e7): the
    diagonal stays in [min_var, max_var], each factor entry within sqrt(max_var / rank), so every
    logit's variance is at most 2 max_var; a rank above the class count is cut to it."""
    torch.manual_seed(0)
    head = StochasticHead(dim=5, classes=2, rank=10, init_var=0.01, min_var=1e-4, max_var=1.0)
    assert head.rank == 2
    f, logits = torch.randn(4, 5), torch.randn(4, 2)
    start = head(f, logits)
    assert torch.allclose(start.cov_diag, torch.full((4, 2), 0.01, dtype=torch.float64))
    for std in (100.0, -100.0):
        torch.nn.init.constant_(head.log_diag.bias, std)
        torch.nn.init.normal_(head.factor.weight, std=abs(std))
        with torch.no_grad():
            dist = head(f, logits)
        assert 1e-4 * (1 - 1e-5) <= float(dist.cov_diag.min()) <= float(dist.cov_diag.max()) <= 1.0
        assert float(dist.cov_factor.abs().max()) <= 0.5 ** 0.5 + 1e-6
        assert float(dist.covariance_matrix.diagonal(dim1=1, dim2=2).max()) <= 2.0 + 1e-6
        assert torch.isfinite(stochastic_cross_entropy(dist, torch.tensor([0, 1, 1, 0]), 8))
    with pytest.raises(ValueError, match="init_var"):
        StochasticHead(dim=5, classes=2, rank=2, init_var=2.0, min_var=1e-4, max_var=1.0)


def test_the_modules_input_comes_from_the_generator_not_the_matching_network(toy) -> None:
    """The module reads the latents and the decoder's first part, so re-initialising the
    matching network (every iteration) leaves its input unchanged."""
    slfd = distiller(toy, "slfd", SLFD)
    slfd.init_state()
    seen = []
    forward = slfd.head.forward
    slfd.head.forward = lambda features, logits: seen.append(features.detach()) or forward(
        features, logits)
    y = slfd.y_syn[slfd.syn_slice(0)]
    for _ in range(2):
        net = slfd.new_net("convnet", SLFD["net_kwargs"])  # a fresh initialisation each time
        slfd.syn_loss(net, slfd.syn(0), y)
    assert torch.equal(seen[0], seen[1])
    latents = slfd.images[slfd.syn_slice(0)].detach()
    expected = torch.cat([latents.mean((2, 3)), slfd.ae.first_features(latents).mean((2, 3))], 1)
    assert torch.allclose(seen[0], expected, atol=1e-6)


@pytest.mark.slow
def test_slfd_steps_its_module_like_its_latents(toy) -> None:
    """unit_grad: each module tensor moves by exactly lr_module in its first step (no momentum
    yet), as each latent moves by lr_latent."""
    cfg = {**SLFD, "unit_grad": True, "lr_module": 0.05, "lr_latent": 0.2}
    d = distiller(toy, "slfd", cfg)
    d.init_state()
    before = [p.detach().clone() for p in d.head.parameters()]
    latents = d.images.detach().clone()
    d.step(0)
    moved = [float((p.detach() - b).norm()) for p, b in zip(d.head.parameters(), before)]
    assert all(m == pytest.approx(0.05, rel=1e-4) for m in moved if m > 0)
    assert any(m > 0 for m in moved)
    steps = (d.images.detach() - latents).flatten(1).norm(dim=1)
    assert torch.allclose(steps, torch.full_like(steps, 0.2), rtol=1e-4)


def test_without_learn_shift_the_module_learns_the_covariance_only(toy) -> None:
    """learn_shift false (the latent_distill study's slfd_no_shift): the mean layer stays at
    zero while the covariance layers move."""
    d = distiller(toy, "slfd", {**SLFD, "unit_grad": True, "learn_shift": False})
    d.init_state()
    before = {k: v.clone() for k, v in d.head.state_dict().items()}
    d.step(0)
    after = d.head.state_dict()
    assert all(torch.equal(after[k], torch.zeros_like(after[k])) for k in ("mean.weight", "mean.bias"))
    assert any(not torch.equal(after[k], before[k]) for k in after if not k.startswith("mean."))


def test_stochastic_loss_is_cross_entropy_when_the_variance_is_zero() -> None:
    torch.manual_seed(1)
    logits, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 0])
    still = torch.distributions.LowRankMultivariateNormal(logits, torch.zeros(6, 4, 2),
                                                          torch.full((6, 4), 1e-14))
    assert float(stochastic_cross_entropy(still, y, 8)) == pytest.approx(
        float(F.cross_entropy(logits, y)), abs=1e-5)
    noisy = torch.distributions.LowRankMultivariateNormal(logits, torch.ones(6, 4, 2), torch.ones(6, 4))
    assert abs(float(stochastic_cross_entropy(noisy, y, 8)) - float(F.cross_entropy(logits, y))) > 1e-2
    # one sample: minus the log-likelihood of that sample
    torch.manual_seed(2)
    eta = noisy.rsample((1,))
    torch.manual_seed(2)
    assert float(stochastic_cross_entropy(noisy, y, 1)) == pytest.approx(
        float(F.cross_entropy(eta[0], y)), abs=1e-5)


def test_slfd_loss_at_zero_variance_is_the_networks_cross_entropy(toy) -> None:
    slfd = distiller(toy, "slfd", {**SLFD, "init_var": 1e-14, "min_var": 1e-15})
    slfd.init_state()
    net = slfd.new_net("convnet", SLFD["net_kwargs"])
    y = slfd.y_syn[slfd.syn_slice(1)]
    with torch.no_grad():
        x = slfd.syn(1)
        loss, reference = slfd.syn_loss(net, x, y), F.cross_entropy(net(x), y)
    assert loss.item() == pytest.approx(reference.item(), abs=1e-5)


@pytest.mark.parametrize("method", ["glad", "slfd"])
def test_latent_distillation_changes_only_the_latents_and_the_stochastic_module(toy, method) -> None:
    d = distiller(toy, method, GLAD if method == "glad" else SLFD)
    d.init_state()
    ae = load_autoencoder(toy["ae"], torch.device("cpu"))
    # latents start as the scaled posterior means of the random real patches of each class
    pixels = d.ctx.real.pixels_of(d.random_rows())
    start = (ae.encode(pixels * 2 - 1).mode() * ae.scale_factor).detach()
    assert torch.allclose(d.images, start, atol=1e-6)
    decoder = {k: v.clone() for k, v in d.ae.state_dict().items()}
    head = {k: v.clone() for k, v in d.head.state_dict().items()} if method == "slfd" else {}
    trainable = [p for group in d.opt.param_groups for p in group["params"]]
    d.step(0)
    d.step(1)
    assert all(torch.equal(v, d.ae.state_dict()[k]) for k, v in decoder.items())  # frozen
    assert not any(p.requires_grad for p in d.ae.parameters())
    assert not torch.allclose(d.images, start)  # the latents moved
    if method == "slfd":
        assert any(not torch.equal(v, d.head.state_dict()[k]) for k, v in head.items())
        assert {id(p) for p in trainable} == {id(d.images), *map(id, d.head.parameters())}
    else:
        assert [id(p) for p in trainable] == [id(d.images)]
    images = d.result()
    assert images.shape == (4, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    assert torch.allclose(images, ((ae.images(d.images.detach()) + 1) / 2).clamp(0, 1), atol=1e-6)


@pytest.mark.slow
def test_slfd_resumes_to_the_same_images_and_module(toy) -> None:
    whole = distiller(toy, "slfd", SLFD)
    images, _ = whole.run()
    ckpt = toy["tmp"] / "slfd.ckpt"
    distiller(toy, "slfd", SLFD, ckpt).run(stop_after=1)
    assert ckpt.exists()
    resumed = distiller(toy, "slfd", SLFD, ckpt)
    again, labels = resumed.run()
    assert torch.allclose(images, again, atol=1e-6) and labels.tolist() == [0, 0, 1, 1]
    for k, v in whole.head.state_dict().items():
        assert torch.allclose(v, resumed.head.state_dict()[k], atol=1e-6)


def test_glad_needs_the_autoencoder(toy) -> None:
    real = RealData(PatchStore(toy["store"]), "train", 64, 0, torch.device("cpu"))
    d = build("glad", dict(GLAD), 2, Context(real, 0, None, None, {}, False))
    with pytest.raises(ValueError, match="autoencoder; none given"):
        d.init_state()


def test_cross_arch_is_the_mean_over_the_architectures_not_distilled_with() -> None:
    from histodistill.metrics import METRICS, cross_arch
    from histodistill.params import evaluate_settings

    patch = {a: {m: {"mean": mean, "std": std} for m in METRICS}
             for a, mean, std in (("convnet", 0.5, 0.1), ("resnet18", 0.6, 0.2), ("vit", 0.7, 0.0))}
    summary = cross_arch(patch, "convnet")
    assert summary["archs"] == ["resnet18", "vit"] and summary["excluded"] == "convnet"
    assert summary["acc"]["mean"] == pytest.approx(0.65) and summary["acc"]["std"] == pytest.approx(0.1)
    assert cross_arch(patch, None)["acc"]["mean"] == pytest.approx(0.6)  # nothing to leave out
    evaluate = {"archs": ["convnet"], "arch_kwargs": {"convnet": {"width": 8}, "vit": {"dim": 64}},
                "runs": 5, "cross_arch": {"methods": ["glad"], "archs": ["convnet", "vit", "alexnet"]},
                "stain_norm": False, "stain_norm_methods": ["histodd"]}
    glad, dm = evaluate_settings(evaluate, "glad"), evaluate_settings(evaluate, "dm")
    assert glad["extra_archs"] == ["vit", "alexnet"] and glad["archs"] == ["convnet"]
    assert glad["arch_kwargs"] == {"convnet": {"width": 8}, "vit": {"dim": 64}}
    assert "extra_archs" not in dm and "cross_arch" not in dm and dm["arch_kwargs"] == {"convnet": {"width": 8}}
    # the stain protocol is resolved per method: Histo-DD's paper normalises at test time
    assert evaluate_settings(evaluate, "histodd")["stain_norm"] is True
    assert dm["stain_norm"] is False and "stain_norm_methods" not in dm
